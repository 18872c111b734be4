// Layer norm forward and backward CUDA kernels (math and launcher contract in layer_norm.cuh).
//
// Rows are spread over "row groups": blockDim.x threads (a multiple of 32) share one row, blockDim.y rows share a
// block. blockDim.x == 32 is a warp per row (narrow rows, reductions by shuffles only); wider rows take more warps
// (block per row, reductions through shared memory). Two kernel shapes:
//   *_reg:  each thread keeps NV accesses of VEC elements of its row in registers (VEC * sizeof(T) == 16 bytes:
//           16-byte loads and stores); statistics in two passes over the registers (mean, then sum of squared
//           deviations), so the row is read once from global memory.
//   *_loop: any N, any alignment: strided loops over the row (VEC == 1 for the scalar path); the row is re-read per
//           pass (from L1/L2).
// Backward parameter gradients: the fused *_reg backward keeps per-thread column sums of dy * xhat and dy over the
// rows of its block in registers (grid-stride over rows), combines the row groups of a block in shared memory and
// writes one partial row per block into a float32 workspace (2, P, N); a column kernel then sums the P partials in
// a fixed order (deterministic). Where the fused kernel does not apply, a column-tiled kernel writes the partials.
#include "layer_norm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace fastseq {
namespace cuda {
namespace {

constexpr int kRowBlockThreads = 256;  // threads per block when several rows share one (narrow rows)
constexpr int kFwdRegElems = 32;       // elements per thread held in registers: forward
constexpr int kBwdRegVecs = 4;         // 16-byte accesses per thread per operand held in registers: backward
constexpr int kBwdParamThreads = 512;  // launch bound of the fused backward with parameter gradients

// ---------------------------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved as one access (a 16-byte access when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// Makes the compiler treat the pack as freshly written (an empty asm on its 32-bit words), so that values derived
// from it before this point are recomputed after it instead of being kept live in registers.
template <typename T, int VEC>
__device__ __forceinline__ void opaque(Pack<T, VEC>& p) {
  static_assert(sizeof(Pack<T, VEC>) % 4 == 0, "pack of 32-bit words");
  uint32_t* u = reinterpret_cast<uint32_t*>(&p);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Pack<T, VEC>) / 4); ++i) asm volatile("" : "+r"(u[i]));
}

// Loads VEC elements of an optional (N,) vector as float; `fill` where the vector is absent.
template <typename T, int VEC>
__device__ __forceinline__ void load_param(const T* p, int64_t c, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    const Pack<T, VEC> v = load_pack<T, VEC>(p + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_f(v.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = fill;
  }
}

// Butterfly sum over the 32 lanes; every lane gets the same (bitwise) result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums each of K values over the blockDim.x threads of one row group (same threadIdx.y); every thread of the group
// gets the sums. blockDim.x is a multiple of 32 and blockDim.x * blockDim.y <= 1024, so the warps of a block number
// at most 32. Must be reached by every thread of the block: it synchronizes the block when blockDim.x > 32.
// red: shared, 32 * K floats.
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], float* red) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x == 32) return;  // uniform over the block
  const int lane = threadIdx.x & 31;
  const int nw = blockDim.x >> 5;
  const int first = threadIdx.y * nw;  // this row group's first warp in the block
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[(first + (threadIdx.x >> 5)) * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nw ? red[(first + lane) * K + k] : 0.f);
  __syncthreads();  // red may be reused by the next call
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

// 1 / sqrt(var + eps); NaN where the sum of squares overflowed (var = inf), as torch gives, not 0.
__device__ __forceinline__ float row_rstd(float var, float eps) {
  return isinf(var) ? __int_as_float(0x7fc00000) : rsqrtf(var + eps);
}

// Row held in registers: requires N % VEC == 0, 16-byte aligned rows and N <= blockDim.x * NV * VEC.
// grid.x = ceil(M / blockDim.y).
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024, 1) ln_fwd_reg_kernel(const T* __restrict__ x,       // (M, N)
                                                          const T* __restrict__ weight,  // (N,) or null
                                                          const T* __restrict__ bias,    // (N,) or null
                                                          T* __restrict__ y,             // (M, N)
                                                          float* __restrict__ mean,      // (M,)
                                                          float* __restrict__ rstd,      // (M,)
                                                          int64_t M, int N, float eps) {
  __shared__ float red[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;
  const int64_t off = active ? row * N : 0;

  float v[NV][VEC];
  float s[1] = {0.f};
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (active && c < N) {
      const Pack<T, VEC> p = load_pack<T, VEC>(x + off + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = to_f(p.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) s[0] += v[k][i];
  }
  group_sum(s, red);
  const float mu = s[0] / N;

  float q[1] = {0.f};
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[k][i] - mu;
        q[0] += d * d;
      }
    }
  }
  group_sum(q, red);
  const float rs = row_rstd(q[0] / N, eps);

  if (!active) return;  // no barrier below
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int c = (threadIdx.x + k * blockDim.x) * VEC;
    if (c < N) {
      float w[VEC], b[VEC];
      load_param<T, VEC>(weight, c, 1.f, w);
      load_param<T, VEC>(bias, c, 0.f, b);
      Pack<T, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = from_f<T>((v[k][i] - mu) * rs * w[i] + b[i]);
      store_pack<T, VEC>(y + off + c, o);
    }
  }
}

// Any N; VEC == 1, or N % VEC == 0 with 16-byte aligned rows. Three passes over the row: sum, sum of squared
// deviations, output. grid.x = ceil(M / blockDim.y).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024, 1) ln_fwd_loop_kernel(const T* __restrict__ x,       // (M, N)
                                                           const T* __restrict__ weight,  // (N,) or null
                                                           const T* __restrict__ bias,    // (N,) or null
                                                           T* __restrict__ y,             // (M, N)
                                                           float* __restrict__ mean,      // (M,)
                                                           float* __restrict__ rstd,      // (M,)
                                                           int64_t M, int N, float eps) {
  __shared__ float red[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;
  const T* xr = x + (active ? row * N : 0);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  float s[1] = {0.f};
  if (active) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      const Pack<T, VEC> p = load_pack<T, VEC>(xr + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s[0] += to_f(p.v[i]);
    }
  }
  group_sum(s, red);
  const float mu = s[0] / N;

  float q[1] = {0.f};
  if (active) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      const Pack<T, VEC> p = load_pack<T, VEC>(xr + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = to_f(p.v[i]) - mu;
        q[0] += d * d;
      }
    }
  }
  group_sum(q, red);
  const float rs = row_rstd(q[0] / N, eps);

  if (!active) return;  // no barrier below
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  T* yr = y + row * N;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
    const Pack<T, VEC> p = load_pack<T, VEC>(xr + c);
    float w[VEC], b[VEC];
    load_param<T, VEC>(weight, c, 1.f, w);
    load_param<T, VEC>(bias, c, 0.f, b);
    Pack<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_f<T>((to_f(p.v[i]) - mu) * rs * w[i] + b[i]);
    store_pack<T, VEC>(yr + c, o);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward

// Adds the column sums of the other row groups of the block (shared buffer, fixed order) to row group 0's and
// writes them as one partial row. Called by every thread of the block.
template <int NV, int VEC>
__device__ __forceinline__ void combine_and_store(const float (&acc)[NV][VEC], float* comb, float* out, int N) {
  float a[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) a[k][i] = acc[k][i];
  if (blockDim.y > 1) {  // uniform over the block
    if (threadIdx.y > 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * VEC;
        if (c < N) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) comb[static_cast<int64_t>(threadIdx.y - 1) * N + c + i] = a[k][i];
        }
      }
    }
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int r = 1; r < static_cast<int>(blockDim.y); ++r) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int c = (threadIdx.x + k * blockDim.x) * VEC;
          if (c < N) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) a[k][i] += comb[static_cast<int64_t>(r - 1) * N + c + i];
          }
        }
      }
    }
    __syncthreads();  // comb is reused by the next call
  }
  if (threadIdx.y == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (c < N) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[c + i] = a[k][i];
      }
    }
  }
}

// Row held in registers (x and dy in their own dtype): requires N % VEC == 0, 16-byte aligned rows and
// N <= blockDim.x * NV * VEC. Grid-stride over rows: the row groups of block b take rows b * blockDim.y + j,
// then + gridDim.x * blockDim.y, ... With PARAM, block b also writes its column sums of dy * xhat to
// part[0][b][:] and of dy to part[1][b][:] (P = gridDim.x), and dynamic shared memory holds
// (blockDim.y - 1) * N floats.
template <typename T, int VEC, int NV, bool PARAM, int MAXT>
__global__ void __launch_bounds__(MAXT, 1) ln_bwd_reg_kernel(const T* __restrict__ dy,        // (M, N)
                                                          const T* __restrict__ x,         // (M, N)
                                                          const T* __restrict__ weight,    // (N,) or null
                                                          const float* __restrict__ mean,  // (M,)
                                                          const float* __restrict__ rstd,  // (M,)
                                                          T* __restrict__ dx,              // (M, N)
                                                          float* __restrict__ part,  // (2, gridDim.x, N); PARAM
                                                          int64_t M, int N) {
  __shared__ float red[64];
  extern __shared__ float comb[];  // (blockDim.y - 1, N) float32; PARAM only
  constexpr int NA = PARAM ? NV : 1;
  float acc_w[NA][VEC], acc_b[NA][VEC];
#pragma unroll
  for (int k = 0; k < NA; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc_w[k][i] = acc_b[k][i] = 0.f;

  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M; base += row_step) {  // uniform
    const int64_t row = base + threadIdx.y;
    const bool active = row < M;
    const int64_t off = active ? row * N : 0;
    const float mu = active ? mean[row] : 0.f;
    const float rs = active ? rstd[row] : 0.f;

    Pack<T, VEC> xp[NV], gp[NV];
    float s[2] = {0.f, 0.f};  // sum g, sum g * xhat
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * VEC;
      if (active && c < N) {
        xp[k] = load_pack<T, VEC>(x + off + c);
        gp[k] = load_pack<T, VEC>(dy + off + c);
        float w[VEC];
        load_param<T, VEC>(weight, c, 1.f, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float xh = (to_f(xp[k].v[i]) - mu) * rs;
          const float d = to_f(gp[k].v[i]);
          const float g = d * w[i];
          s[0] += g;
          s[1] += g * xh;
          if constexpr (PARAM) {
            acc_w[k][i] += d * xh;
            acc_b[k][i] += d;
          }
        }
      }
    }
    group_sum(s, red);
    const float mg = s[0] / N, mgx = s[1] / N;

    if (active) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * VEC;
        if (c < N) {
          opaque(xp[k]);  // x and dy stay packed in registers across the reduction, not as floats
          opaque(gp[k]);
          float w[VEC];
          load_param<T, VEC>(weight, c, 1.f, w);
          Pack<T, VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float xh = (to_f(xp[k].v[i]) - mu) * rs;
            const float g = to_f(gp[k].v[i]) * w[i];
            o.v[i] = from_f<T>(rs * (g - mg - xh * mgx));
          }
          store_pack<T, VEC>(dx + off + c, o);
        }
      }
    }
  }

  if constexpr (PARAM) {
    const int64_t P = gridDim.x;
    combine_and_store<NV, VEC>(acc_w, comb, part + static_cast<int64_t>(blockIdx.x) * N, N);
    combine_and_store<NV, VEC>(acc_b, comb, part + (P + blockIdx.x) * N, N);
  }
}

// dx only, any N; VEC == 1, or N % VEC == 0 with 16-byte aligned rows. Two passes over the row.
// grid.x = ceil(M / blockDim.y).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024, 1) ln_bwd_loop_kernel(const T* __restrict__ dy,        // (M, N)
                                                           const T* __restrict__ x,         // (M, N)
                                                           const T* __restrict__ weight,    // (N,) or null
                                                           const float* __restrict__ mean,  // (M,)
                                                           const float* __restrict__ rstd,  // (M,)
                                                           T* __restrict__ dx,              // (M, N)
                                                           int64_t M, int N) {
  __shared__ float red[64];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < M;
  const int64_t off = active ? row * N : 0;
  const float mu = active ? mean[row] : 0.f;
  const float rs = active ? rstd[row] : 0.f;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;

  float s[2] = {0.f, 0.f};  // sum g, sum g * xhat
  if (active) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(x + off + c);
      const Pack<T, VEC> dv = load_pack<T, VEC>(dy + off + c);
      float w[VEC];
      load_param<T, VEC>(weight, c, 1.f, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = to_f(dv.v[i]) * w[i];
        s[0] += g;
        s[1] += g * ((to_f(xv.v[i]) - mu) * rs);
      }
    }
  }
  group_sum(s, red);
  const float mg = s[0] / N, mgx = s[1] / N;

  if (!active) return;  // no barrier below
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < N; c += step) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + off + c);
    const Pack<T, VEC> dv = load_pack<T, VEC>(dy + off + c);
    float w[VEC];
    load_param<T, VEC>(weight, c, 1.f, w);
    Pack<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float xh = (to_f(xv.v[i]) - mu) * rs;
      o.v[i] = from_f<T>(rs * (to_f(dv.v[i]) * w[i] - mg - xh * mgx));
    }
    store_pack<T, VEC>(dx + off + c, o);
  }
}

constexpr int kColTile = 32;     // columns per block of the column kernels (blockDim.x)
constexpr int kPartRowsTPB = 8;  // blockDim.y of ln_bwd_param_partial_kernel
constexpr int kReduceTPB = 16;   // blockDim.y of ln_bwd_param_reduce_kernel

// Column sums over chunks of rows: part[0][p][c] = sum over rows r of chunk p of dy[r][c] * xhat[r][c],
// part[1][p][c] = sum of dy[r][c]; chunk p = rows [p * rows_per_chunk, min(M, (p + 1) * rows_per_chunk)).
// block (kColTile, kPartRowsTPB), grid (ceil(N / kColTile), P).
template <typename T>
__global__ void __launch_bounds__(kColTile* kPartRowsTPB)
    ln_bwd_param_partial_kernel(const T* __restrict__ dy,        // (M, N)
                                const T* __restrict__ x,         // (M, N)
                                const float* __restrict__ mean,  // (M,)
                                const float* __restrict__ rstd,  // (M,)
                                float* __restrict__ part,        // (2, gridDim.y, N)
                                int64_t M, int N, int64_t rows_per_chunk) {
  __shared__ float sw[kPartRowsTPB][kColTile + 1], sb[kPartRowsTPB][kColTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  float aw = 0.f, ab = 0.f;
  if (c < N) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kPartRowsTPB) {
      const float d = to_f(dy[r * N + c]);
      aw += d * ((to_f(x[r * N + c]) - mean[r]) * rstd[r]);
      ab += d;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int j = 0; j < kPartRowsTPB; ++j) {
      tw += sw[j][threadIdx.x];
      tb += sb[j][threadIdx.x];
    }
    part[static_cast<int64_t>(blockIdx.y) * N + c] = tw;
    part[(static_cast<int64_t>(gridDim.y) + blockIdx.y) * N + c] = tb;
  }
}

// dweight[c] = sum_p part[0][p][c], dbias[c] = sum_p part[1][p][c], in a fixed order.
// block (kColTile, kReduceTPB), grid (ceil(N / kColTile), 2): blockIdx.y = 0 dweight, 1 dbias.
template <typename T>
__global__ void __launch_bounds__(kColTile* kReduceTPB)
    ln_bwd_param_reduce_kernel(const float* __restrict__ part,  // (2, P, N)
                               T* __restrict__ dweight,         // (N,) or null
                               T* __restrict__ dbias,           // (N,) or null
                               int P, int N) {
  __shared__ float s[kReduceTPB][kColTile + 1];
  T* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // uniform over the block
  const float* src = part + static_cast<int64_t>(blockIdx.y) * P * N;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  float a = 0.f;
  if (c < N) {
    for (int p = threadIdx.y; p < P; p += kReduceTPB) a += src[static_cast<int64_t>(p) * N + c];
  }
  s[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float t = 0.f;
#pragma unroll
    for (int j = 0; j < kReduceTPB; ++j) t += s[j][threadIdx.x];
    out[c] = from_f<T>(t);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launch shape of a row kernel. nv > 0: the *_reg kernel with NV = nv; nv == 0: the *_loop kernel.
struct RowPlan {
  int vec;   // elements per access
  int nv;    // accesses per thread held in registers, a power of two; 0 = loop kernel
  int tpr;   // threads per row (blockDim.x), a multiple of 32
  int rows;  // rows per block (blockDim.y)
};

// nv_max: most accesses per thread the *_reg kernel holds (a power of two); max_threads: its launch bound.
RowPlan plan_rows(int64_t N, int vec, int nv_max, int max_threads) {
  const int64_t nvec = N / vec;  // vec divides N
  RowPlan p{vec, 0, 32, 1};
  if (vec > 1) {
    if (nvec <= 32 * nv_max) {  // a warp per row
      p.nv = 1;
      while (32 * p.nv < nvec) p.nv *= 2;
    } else {
      const int64_t t = round_up(ceil_div(nvec, nv_max), 32);
      if (t <= max_threads) {
        p.nv = nv_max;
        p.tpr = static_cast<int>(t);
      }
    }
  }
  if (p.nv == 0) p.tpr = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, round_up(ceil_div(nvec, 8), 32))));
  p.rows = std::max(1, kRowBlockThreads / p.tpr);
  return p;
}

// Calls f(std::integral_constant<int, NV>) for nv in {1, 2, 4, 8}, NV <= NV_MAX.
template <int NV_MAX, typename F>
void with_nv(int nv, F&& f) {
  if (nv == 1) f(std::integral_constant<int, 1>{});
  if constexpr (NV_MAX >= 2) if (nv == 2) f(std::integral_constant<int, 2>{});
  if constexpr (NV_MAX >= 4) if (nv == 4) f(std::integral_constant<int, 4>{});
  if constexpr (NV_MAX >= 8) if (nv == 8) f(std::integral_constant<int, 8>{});
}

cudaError_t sm_count(int* n) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, dev);
}

template <typename T>
cudaError_t fwd_typed(const T* x, const T* weight, const T* bias, T* y, float* mean, float* rstd, int64_t M, int N,
                      float eps, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = N % V == 0 && aligned16(x) && aligned16(y) && aligned16(weight) && aligned16(bias);
  const RowPlan p = plan_rows(N, vec ? V : 1, kFwdRegElems / V, 1024);
  const int64_t grid = ceil_div(M, p.rows);
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  const dim3 block(p.tpr, p.rows);
  if (p.nv > 0) {
    with_nv<kFwdRegElems / V>(p.nv, [&](auto nvc) {
      ln_fwd_reg_kernel<T, V, decltype(nvc)::value>
          <<<static_cast<unsigned>(grid), block, 0, stream>>>(x, weight, bias, y, mean, rstd, M, N, eps);
    });
  } else if (vec) {
    ln_fwd_loop_kernel<T, V><<<static_cast<unsigned>(grid), block, 0, stream>>>(x, weight, bias, y, mean, rstd, M, N, eps);
  } else {
    ln_fwd_loop_kernel<T, 1><<<static_cast<unsigned>(grid), block, 0, stream>>>(x, weight, bias, y, mean, rstd, M, N, eps);
  }
  return cudaGetLastError();
}

// Backward launch shape for one access width (VEC = 16 / sizeof(T), or 1).
struct BwdPlan {
  RowPlan row;
  int64_t grid;            // blocks of the dx kernel
  int64_t parts;           // P: partial rows in the workspace (0 without parameter gradients)
  int64_t rows_per_chunk;  // rows per partial of the column kernel (loop path with parameter gradients)
  size_t smem;             // dynamic shared memory of the fused kernel
};

template <typename T>
cudaError_t plan_bwd(int64_t M, int N, bool vec, bool param, BwdPlan* out) {
  constexpr int V = 16 / sizeof(T);
  BwdPlan b{};
  b.row = plan_rows(N, vec ? V : 1, kBwdRegVecs, param ? kBwdParamThreads : 1024);
  b.grid = ceil_div(M, b.row.rows);
  if (b.grid > INT_MAX) return cudaErrorInvalidValue;
  if (param && b.row.nv > 0) {  // fused: one partial row per block, blocks = what fits on the device at once
    b.smem = static_cast<size_t>(b.row.rows - 1) * N * sizeof(float);
    int sms = 0, occ = 0;
    cudaError_t err = sm_count(&sms);
    if (err != cudaSuccess) return err;
    with_nv<kBwdRegVecs>(b.row.nv, [&](auto nvc) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &occ, ln_bwd_reg_kernel<T, V, decltype(nvc)::value, true, kBwdParamThreads>, b.row.tpr * b.row.rows,
          b.smem);
    });
    if (err != cudaSuccess) return err;
    b.grid = std::min<int64_t>(b.grid, static_cast<int64_t>(sms) * std::max(occ, 1));
    b.parts = b.grid;
  } else if (param) {  // column kernel: about 2048 blocks, at least 8 rows per chunk
    const int64_t gx = ceil_div(N, kColTile);
    const int64_t want = std::min<int64_t>({ceil_div(M, 8), std::max<int64_t>(1, ceil_div(2048, gx)), 65535});
    b.rows_per_chunk = ceil_div(M, want);
    b.parts = ceil_div(M, b.rows_per_chunk);
  }
  *out = b;
  return cudaSuccess;
}

template <typename T>
cudaError_t bwd_typed(const T* dy, const T* x, const T* weight, const float* mean, const float* rstd, T* dx,
                      T* dweight, T* dbias, float* workspace, int64_t workspace_numel, int64_t M, int N,
                      cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = N % V == 0 && aligned16(dy) && aligned16(x) && aligned16(weight) && aligned16(dx);
  const bool param = dweight != nullptr || dbias != nullptr;
  BwdPlan b;
  cudaError_t err = plan_bwd<T>(M, N, vec, param, &b);
  if (err != cudaSuccess) return err;
  if (param && (workspace == nullptr || workspace_numel < 2 * b.parts * N || b.parts > INT_MAX))
    return cudaErrorInvalidValue;

  const dim3 block(b.row.tpr, b.row.rows);
  const unsigned grid = static_cast<unsigned>(b.grid);
  if (b.row.nv > 0) {
    with_nv<kBwdRegVecs>(b.row.nv, [&](auto nvc) {
      constexpr int NV = decltype(nvc)::value;
      if (param) {
        ln_bwd_reg_kernel<T, V, NV, true, kBwdParamThreads>
            <<<grid, block, b.smem, stream>>>(dy, x, weight, mean, rstd, dx, workspace, M, N);
      } else {
        ln_bwd_reg_kernel<T, V, NV, false, 1024>
            <<<grid, block, 0, stream>>>(dy, x, weight, mean, rstd, dx, nullptr, M, N);
      }
    });
  } else {
    if (vec) {
      ln_bwd_loop_kernel<T, V><<<grid, block, 0, stream>>>(dy, x, weight, mean, rstd, dx, M, N);
    } else {
      ln_bwd_loop_kernel<T, 1><<<grid, block, 0, stream>>>(dy, x, weight, mean, rstd, dx, M, N);
    }
    if (param) {
      const dim3 pgrid(static_cast<unsigned>(ceil_div(N, kColTile)), static_cast<unsigned>(b.parts));
      ln_bwd_param_partial_kernel<T><<<pgrid, dim3(kColTile, kPartRowsTPB), 0, stream>>>(
          dy, x, mean, rstd, workspace, M, N, b.rows_per_chunk);
    }
  }
  if (param) {
    const dim3 rgrid(static_cast<unsigned>(ceil_div(N, kColTile)), 2);
    ln_bwd_param_reduce_kernel<T><<<rgrid, dim3(kColTile, kReduceTPB), 0, stream>>>(
        workspace, dweight, dbias, static_cast<int>(b.parts), N);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_workspace_typed(int64_t M, int N, int64_t* numel) {
  constexpr int V = 16 / sizeof(T);
  int64_t parts = 0;
  for (const bool vec : {false, true}) {
    if (vec && N % V != 0) continue;
    BwdPlan b;
    const cudaError_t err = plan_bwd<T>(M, N, vec, true, &b);
    if (err != cudaSuccess) return err;
    parts = std::max(parts, b.parts);
  }
  *numel = 2 * parts * N;
  return cudaSuccess;
}

}  // namespace

cudaError_t layer_norm_fwd_launch(LayerNormDtype dtype, const void* x, const void* weight, const void* bias, void* y,
                                  float* mean, float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream) {
  if (M < 0 || N < 1 || N > INT_MAX) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int n = static_cast<int>(N);
  switch (dtype) {
    case LayerNormDtype::kFloat32:
      return fwd_typed<float>(static_cast<const float*>(x), static_cast<const float*>(weight),
                              static_cast<const float*>(bias), static_cast<float*>(y), mean, rstd, M, n, eps, stream);
    case LayerNormDtype::kFloat16:
      return fwd_typed<__half>(static_cast<const __half*>(x), static_cast<const __half*>(weight),
                               static_cast<const __half*>(bias), static_cast<__half*>(y), mean, rstd, M, n, eps,
                               stream);
    case LayerNormDtype::kBFloat16:
      return fwd_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(weight),
                                      static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), mean,
                                      rstd, M, n, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_bwd_workspace_numel(LayerNormDtype dtype, int64_t M, int64_t N, bool need_param_grads,
                                           int64_t* numel) {
  *numel = 0;
  if (M < 0 || N < 1 || N > INT_MAX) return cudaErrorInvalidValue;
  if (M == 0 || !need_param_grads) return cudaSuccess;
  const int n = static_cast<int>(N);
  switch (dtype) {
    case LayerNormDtype::kFloat32: return bwd_workspace_typed<float>(M, n, numel);
    case LayerNormDtype::kFloat16: return bwd_workspace_typed<__half>(M, n, numel);
    case LayerNormDtype::kBFloat16: return bwd_workspace_typed<__nv_bfloat16>(M, n, numel);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_bwd_launch(LayerNormDtype dtype, const void* dy, const void* x, const void* weight,
                                  const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                                  float* workspace, int64_t workspace_numel, int64_t M, int64_t N,
                                  cudaStream_t stream) {
  if (M < 0 || N < 1 || N > INT_MAX) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const int n = static_cast<int>(N);
  switch (dtype) {
    case LayerNormDtype::kFloat32:
      return bwd_typed<float>(static_cast<const float*>(dy), static_cast<const float*>(x),
                              static_cast<const float*>(weight), mean, rstd, static_cast<float*>(dx),
                              static_cast<float*>(dweight), static_cast<float*>(dbias), workspace, workspace_numel, M,
                              n, stream);
    case LayerNormDtype::kFloat16:
      return bwd_typed<__half>(static_cast<const __half*>(dy), static_cast<const __half*>(x),
                               static_cast<const __half*>(weight), mean, rstd, static_cast<__half*>(dx),
                               static_cast<__half*>(dweight), static_cast<__half*>(dbias), workspace, workspace_numel,
                               M, n, stream);
    case LayerNormDtype::kBFloat16:
      return bwd_typed<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(x),
                                      static_cast<const __nv_bfloat16*>(weight), mean, rstd,
                                      static_cast<__nv_bfloat16*>(dx), static_cast<__nv_bfloat16*>(dweight),
                                      static_cast<__nv_bfloat16*>(dbias), workspace, workspace_numel, M, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastseq
