// Recurrent cell steps on CUDA: fused pointwise kernels after the GEMMs (LSTM, peephole LSTM, GRU, Elman RNN),
// forward and backward. One thread per (n, j) hidden unit, grid-stride loops; offsets are int32 when every array
// has at most 2^30 elements and int64 otherwise. Loads/stores in the input dtype, gate math in float32
// (rnn_cell.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "rnn_cell.cuh"

namespace fastseq {
namespace cuda {
namespace {

constexpr int kThreads = 256;        // threads per block, every kernel
constexpr int64_t kMaxBlocks = 8192;  // grid cap of the 1-D grid-stride kernels
constexpr int64_t kMaxGridDim = 65535;
constexpr int64_t kPeepholeTargetBlocks = 2048;  // blocks aimed at by the peephole backward's 2-D grid

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T, typename I>
__device__ __forceinline__ float ld_or_zero(const T* p, I k) {
  return p != nullptr ? ld(p + k) : 0.f;
}

// First index and stride of a 1-D grid-stride loop.
template <typename I>
__device__ __forceinline__ I grid_start() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}
template <typename I>
__device__ __forceinline__ I grid_stride() {
  return static_cast<I>(blockDim.x) * static_cast<I>(gridDim.x);
}

template <typename T, typename I, bool kPeephole>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_fwd_kernel(const T* __restrict__ igates,    // (N, 4H)
                         const T* __restrict__ hgates,    // (N, 4H)
                         const T* __restrict__ cx,        // (N, H)
                         const T* __restrict__ b_ih,      // (4H,) or null
                         const T* __restrict__ b_hh,      // (4H,) or null
                         const T* __restrict__ peephole,  // (3, H), read only when kPeephole
                         T* __restrict__ hy,              // (N, H)
                         T* __restrict__ cy,              // (N, H)
                         T* __restrict__ workspace,       // (N, 4H) [i, f, g, o]
                         I N, I H) {
  const I total = N * H;
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    const I n = idx / H;
    const I j = idx - n * H;
    const I g0 = n * 4 * H + j;  // gate i of unit (n, j); gate k at g0 + k * H
    float pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const I o = g0 + k * H;
      pre[k] = ld(igates + o) + ld(hgates + o) + ld_or_zero(b_ih, k * H + j) + ld_or_zero(b_hh, k * H + j);
    }
    float p_i = 0.f, p_f = 0.f, p_o = 0.f;
    if (kPeephole) {
      p_i = ld(peephole + j);
      p_f = ld(peephole + H + j);
      p_o = ld(peephole + 2 * H + j);
    }
    const LstmFwdOut r = lstm_fwd_math<kPeephole>(pre[0], pre[1], pre[2], pre[3], ld(cx + idx), p_i, p_f, p_o);
    st(workspace + g0, r.i);
    st(workspace + g0 + H, r.f);
    st(workspace + g0 + 2 * H, r.g);
    st(workspace + g0 + 3 * H, r.o);
    st(cy + idx, r.cy);
    st(hy + idx, r.hy);
  }
}

struct PeepholeTerms {
  float i, f, o;  // di * cx, df * cx, do * cy of one unit
};

// Backward of unit (n, j): writes dgates and dcx, returns the unit's peephole-gradient terms.
template <typename T, typename I, bool kPeephole>
__device__ __forceinline__ PeepholeTerms lstm_cell_bwd_unit(const T* __restrict__ dhy, const T* __restrict__ dcy,
                                                            const T* __restrict__ cx, const T* __restrict__ cy,
                                                            const T* __restrict__ workspace, T* __restrict__ dgates,
                                                            T* __restrict__ dcx, I n, I j, I H, float p_i, float p_f,
                                                            float p_o) {
  const I u = n * H + j;
  const I g0 = n * 4 * H + j;
  const float cxv = ld(cx + u);
  const float cyv = ld(cy + u);
  const LstmBwdOut r =
      lstm_bwd_math<kPeephole>(ld(dhy + u), ld(dcy + u), cxv, cyv, ld(workspace + g0), ld(workspace + g0 + H),
                               ld(workspace + g0 + 2 * H), ld(workspace + g0 + 3 * H), p_i, p_f, p_o);
  st(dgates + g0, r.di);
  st(dgates + g0 + H, r.df);
  st(dgates + g0 + 2 * H, r.dg);
  st(dgates + g0 + 3 * H, r.do_);
  st(dcx + u, r.dcx);
  return PeepholeTerms{r.di * cxv, r.df * cxv, r.do_ * cyv};
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_bwd_kernel(const T* __restrict__ dhy,        // (N, H)
                         const T* __restrict__ dcy,        // (N, H)
                         const T* __restrict__ cx,         // (N, H)
                         const T* __restrict__ cy,         // (N, H)
                         const T* __restrict__ workspace,  // (N, 4H) [i, f, g, o]
                         T* __restrict__ dgates,           // (N, 4H)
                         T* __restrict__ dcx,              // (N, H)
                         I N, I H) {
  const I total = N * H;
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    const I n = idx / H;
    lstm_cell_bwd_unit<T, I, false>(dhy, dcy, cx, cy, workspace, dgates, dcx, n, idx - n * H, H, 0.f, 0.f, 0.f);
  }
}

// Peephole backward on a 2-D grid: threadIdx.x / blockIdx.x walk columns j, threadIdx.y / blockIdx.y walk rows n
// (both grid-stride). Each thread sums its rows' peephole terms in float32, the block reduces over threadIdx.y in
// shared memory (fixed tree), and row blockIdx.y of partials receives the block's sums.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_bwd_peephole_kernel(const T* __restrict__ dhy,        // (N, H)
                                  const T* __restrict__ dcy,        // (N, H)
                                  const T* __restrict__ cx,         // (N, H)
                                  const T* __restrict__ cy,         // (N, H)
                                  const T* __restrict__ workspace,  // (N, 4H) [i, f, g, o]
                                  const T* __restrict__ peephole,   // (3, H)
                                  T* __restrict__ dgates,           // (N, 4H)
                                  T* __restrict__ dcx,              // (N, H)
                                  float* __restrict__ partials,     // (gridDim.y, 3, H)
                                  I N, I H) {
  __shared__ float red[3][kThreads];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int bx = blockDim.x;
  const int by = blockDim.y;  // power of two, bx * by == kThreads
  const int t = ty * bx + tx;
  const I row_stride = static_cast<I>(by) * static_cast<I>(gridDim.y);
  // The column-tile loop is uniform across the block, so the barriers below are reached by every thread.
  for (I j0 = static_cast<I>(blockIdx.x) * bx; j0 < H; j0 += static_cast<I>(bx) * static_cast<I>(gridDim.x)) {
    const I j = j0 + tx;
    PeepholeTerms acc{0.f, 0.f, 0.f};
    if (j < H) {
      const float p_i = ld(peephole + j);
      const float p_f = ld(peephole + H + j);
      const float p_o = ld(peephole + 2 * H + j);
      for (I n = static_cast<I>(blockIdx.y) * by + ty; n < N; n += row_stride) {
        const PeepholeTerms d =
            lstm_cell_bwd_unit<T, I, true>(dhy, dcy, cx, cy, workspace, dgates, dcx, n, j, H, p_i, p_f, p_o);
        acc.i += d.i;
        acc.f += d.f;
        acc.o += d.o;
      }
    }
    red[0][t] = acc.i;
    red[1][t] = acc.f;
    red[2][t] = acc.o;
    __syncthreads();
    for (int s = by / 2; s > 0; s /= 2) {
      if (ty < s) {
#pragma unroll
        for (int k = 0; k < 3; ++k) red[k][t] += red[k][t + s * bx];
      }
      __syncthreads();
    }
    if (ty == 0 && j < H) {
      const int64_t base = static_cast<int64_t>(blockIdx.y) * 3 * static_cast<int64_t>(H) + static_cast<int64_t>(j);
#pragma unroll
      for (int k = 0; k < 3; ++k) partials[base + k * static_cast<int64_t>(H)] = red[k][tx];
    }
    __syncthreads();  // red is reused by the next column tile
  }
}

// dpeephole[c] = sum over rows r (in order) of partials[r, c], c over the 3H columns.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_cell_peephole_reduce_kernel(const float* __restrict__ partials,  // (rows, 3H)
                                     T* __restrict__ dpeephole,           // (3H,)
                                     int64_t rows, int64_t cols) {
  for (int64_t c = grid_start<int64_t>(); c < cols; c += grid_stride<int64_t>()) {
    float s = 0.f;
    for (int64_t r = 0; r < rows; ++r) s += partials[r * cols + c];
    st(dpeephole + c, s);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    gru_cell_fwd_kernel(const T* __restrict__ igates,  // (N, 3H)
                        const T* __restrict__ hgates,  // (N, 3H)
                        const T* __restrict__ hx,      // (N, H)
                        const T* __restrict__ b_ih,    // (3H,) or null
                        const T* __restrict__ b_hh,    // (3H,) or null
                        T* __restrict__ hy,            // (N, H)
                        T* __restrict__ workspace,     // (N, 4H) [r, z, n, hn]
                        I N, I H) {
  const I total = N * H;
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    const I n = idx / H;
    const I j = idx - n * H;
    const I g0 = n * 3 * H + j;  // gate r of unit (n, j) in igates / hgates
    const I w0 = n * 4 * H + j;  // r of unit (n, j) in workspace
    const float pre_r = ld(igates + g0) + ld(hgates + g0) + ld_or_zero(b_ih, j) + ld_or_zero(b_hh, j);
    const float pre_z =
        ld(igates + g0 + H) + ld(hgates + g0 + H) + ld_or_zero(b_ih, H + j) + ld_or_zero(b_hh, H + j);
    const float in_n = ld(igates + g0 + 2 * H) + ld_or_zero(b_ih, 2 * H + j);
    const float hn = ld(hgates + g0 + 2 * H) + ld_or_zero(b_hh, 2 * H + j);
    const GruFwdOut r = gru_fwd_math(pre_r, pre_z, in_n, hn, ld(hx + idx));
    st(workspace + w0, r.r);
    st(workspace + w0 + H, r.z);
    st(workspace + w0 + 2 * H, r.n);
    st(workspace + w0 + 3 * H, hn);
    st(hy + idx, r.hy);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    gru_cell_bwd_kernel(const T* __restrict__ dhy,        // (N, H)
                        const T* __restrict__ hx,         // (N, H)
                        const T* __restrict__ workspace,  // (N, 4H) [r, z, n, hn]
                        T* __restrict__ d_igates,         // (N, 3H)
                        T* __restrict__ d_hgates,         // (N, 3H)
                        T* __restrict__ dhx,              // (N, H)
                        I N, I H) {
  const I total = N * H;
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    const I n = idx / H;
    const I j = idx - n * H;
    const I g0 = n * 3 * H + j;
    const I w0 = n * 4 * H + j;
    const GruBwdOut r = gru_bwd_math(ld(dhy + idx), ld(hx + idx), ld(workspace + w0), ld(workspace + w0 + H),
                                     ld(workspace + w0 + 2 * H), ld(workspace + w0 + 3 * H));
    st(d_igates + g0, r.dr);
    st(d_igates + g0 + H, r.dz);
    st(d_igates + g0 + 2 * H, r.dn);
    st(d_hgates + g0, r.dr);
    st(d_hgates + g0 + H, r.dz);
    st(d_hgates + g0 + 2 * H, r.dhn);
    st(dhx + idx, r.dhx);
  }
}

template <typename T, typename I, CellActivation kAct>
__global__ void __launch_bounds__(kThreads)
    rnn_cell_fwd_kernel(const T* __restrict__ igates,  // (N, H)
                        const T* __restrict__ hgates,  // (N, H)
                        const T* __restrict__ b_ih,    // (H,) or null
                        const T* __restrict__ b_hh,    // (H,) or null
                        T* __restrict__ hy,            // (N, H)
                        I N, I H) {
  const I total = N * H;
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    const I j = idx - (idx / H) * H;
    st(hy + idx, rnn_fwd_math<kAct>(ld(igates + idx) + ld(hgates + idx) + ld_or_zero(b_ih, j) + ld_or_zero(b_hh, j)));
  }
}

template <typename T, typename I, CellActivation kAct>
__global__ void __launch_bounds__(kThreads)
    rnn_cell_bwd_kernel(const T* __restrict__ dhy,  // (N, H)
                        const T* __restrict__ hy,   // (N, H)
                        T* __restrict__ dpre,       // (N, H)
                        I total) {
  for (I idx = grid_start<I>(); idx < total; idx += grid_stride<I>()) {
    st(dpre + idx, rnn_bwd_math<kAct>(ld(dhy + idx), ld(hy + idx)));
  }
}

// ---- host side ----------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, TypeTag<I>{}) with T the element type of dtype and I the offset type: int32 when the
// largest array has at most 2^30 elements (index + grid stride then stays below 2^31), int64 otherwise.
template <typename F>
cudaError_t dispatch(CellDtype dtype, int64_t max_elems, F&& f) {
  const bool small = max_elems <= (int64_t{1} << 30);
  switch (dtype) {
    case CellDtype::kFloat32:
      return small ? f(TypeTag<float>{}, TypeTag<int32_t>{}) : f(TypeTag<float>{}, TypeTag<int64_t>{});
    case CellDtype::kFloat16:
      return small ? f(TypeTag<__half>{}, TypeTag<int32_t>{}) : f(TypeTag<__half>{}, TypeTag<int64_t>{});
    case CellDtype::kBFloat16:
      return small ? f(TypeTag<__nv_bfloat16>{}, TypeTag<int32_t>{})
                   : f(TypeTag<__nv_bfloat16>{}, TypeTag<int64_t>{});
  }
  return cudaErrorInvalidValue;
}

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Block and grid of lstm_cell_bwd_peephole_kernel; a function of N and H only.
struct PeepholeLaunch {
  dim3 block, grid;
};

PeepholeLaunch peephole_launch(int64_t N, int64_t H) {
  int bx = 1;
  while (bx < 32 && bx < H) bx *= 2;
  const int by = kThreads / bx;
  const int64_t gx = std::max<int64_t>(1, std::min((H + bx - 1) / bx, kMaxGridDim));
  const int64_t gy = std::max<int64_t>(
      1, std::min({(N + by - 1) / by, std::max<int64_t>(1, kPeepholeTargetBlocks / gx), kMaxGridDim}));
  return PeepholeLaunch{dim3(static_cast<unsigned int>(bx), static_cast<unsigned int>(by)),
                        dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy))};
}

template <typename T>
const T* cp(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* mp(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

cudaError_t launch_lstm_cell_fwd(CellDtype dtype, int64_t N, int64_t H, const void* igates, const void* hgates,
                                 const void* cx, const void* b_ih, const void* b_hh, const void* peephole, void* hy,
                                 void* cy, void* workspace, cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  return dispatch(dtype, N * 4 * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    const unsigned int blocks = blocks_for(N * H);
    if (peephole != nullptr) {
      lstm_cell_fwd_kernel<T, I, true><<<blocks, kThreads, 0, stream>>>(
          cp<T>(igates), cp<T>(hgates), cp<T>(cx), cp<T>(b_ih), cp<T>(b_hh), cp<T>(peephole), mp<T>(hy), mp<T>(cy),
          mp<T>(workspace), static_cast<I>(N), static_cast<I>(H));
    } else {
      lstm_cell_fwd_kernel<T, I, false><<<blocks, kThreads, 0, stream>>>(
          cp<T>(igates), cp<T>(hgates), cp<T>(cx), cp<T>(b_ih), cp<T>(b_hh), nullptr, mp<T>(hy), mp<T>(cy),
          mp<T>(workspace), static_cast<I>(N), static_cast<I>(H));
    }
    return cudaGetLastError();
  });
}

int64_t lstm_cell_bwd_partial_rows(int64_t N, int64_t H) { return peephole_launch(N, H).grid.y; }

cudaError_t launch_lstm_cell_bwd(CellDtype dtype, int64_t N, int64_t H, const void* dhy, const void* dcy,
                                 const void* cx, const void* cy, const void* workspace, const void* peephole,
                                 void* dgates, void* dcx, void* dpeephole, float* partials, cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  if (peephole != nullptr && (dpeephole == nullptr || partials == nullptr)) return cudaErrorInvalidValue;
  return dispatch(dtype, N * 4 * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    if (peephole == nullptr) {
      lstm_cell_bwd_kernel<T, I><<<blocks_for(N * H), kThreads, 0, stream>>>(
          cp<T>(dhy), cp<T>(dcy), cp<T>(cx), cp<T>(cy), cp<T>(workspace), mp<T>(dgates), mp<T>(dcx),
          static_cast<I>(N), static_cast<I>(H));
      return cudaGetLastError();
    }
    const PeepholeLaunch l = peephole_launch(N, H);
    lstm_cell_bwd_peephole_kernel<T, I><<<l.grid, l.block, 0, stream>>>(
        cp<T>(dhy), cp<T>(dcy), cp<T>(cx), cp<T>(cy), cp<T>(workspace), cp<T>(peephole), mp<T>(dgates), mp<T>(dcx),
        partials, static_cast<I>(N), static_cast<I>(H));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    lstm_cell_peephole_reduce_kernel<T><<<blocks_for(3 * H), kThreads, 0, stream>>>(partials, mp<T>(dpeephole),
                                                                                    l.grid.y, 3 * H);
    return cudaGetLastError();
  });
}

cudaError_t launch_gru_cell_fwd(CellDtype dtype, int64_t N, int64_t H, const void* igates, const void* hgates,
                                const void* hx, const void* b_ih, const void* b_hh, void* hy, void* workspace,
                                cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  return dispatch(dtype, N * 4 * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    gru_cell_fwd_kernel<T, I><<<blocks_for(N * H), kThreads, 0, stream>>>(
        cp<T>(igates), cp<T>(hgates), cp<T>(hx), cp<T>(b_ih), cp<T>(b_hh), mp<T>(hy), mp<T>(workspace),
        static_cast<I>(N), static_cast<I>(H));
    return cudaGetLastError();
  });
}

cudaError_t launch_gru_cell_bwd(CellDtype dtype, int64_t N, int64_t H, const void* dhy, const void* hx,
                                const void* workspace, void* d_igates, void* d_hgates, void* dhx,
                                cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  return dispatch(dtype, N * 4 * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    gru_cell_bwd_kernel<T, I><<<blocks_for(N * H), kThreads, 0, stream>>>(
        cp<T>(dhy), cp<T>(hx), cp<T>(workspace), mp<T>(d_igates), mp<T>(d_hgates), mp<T>(dhx), static_cast<I>(N),
        static_cast<I>(H));
    return cudaGetLastError();
  });
}

cudaError_t launch_rnn_cell_fwd(CellDtype dtype, CellActivation act, int64_t N, int64_t H, const void* igates,
                                const void* hgates, const void* b_ih, const void* b_hh, void* hy,
                                cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  return dispatch(dtype, N * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    const unsigned int blocks = blocks_for(N * H);
    if (act == CellActivation::kTanh) {
      rnn_cell_fwd_kernel<T, I, CellActivation::kTanh><<<blocks, kThreads, 0, stream>>>(
          cp<T>(igates), cp<T>(hgates), cp<T>(b_ih), cp<T>(b_hh), mp<T>(hy), static_cast<I>(N), static_cast<I>(H));
    } else {
      rnn_cell_fwd_kernel<T, I, CellActivation::kRelu><<<blocks, kThreads, 0, stream>>>(
          cp<T>(igates), cp<T>(hgates), cp<T>(b_ih), cp<T>(b_hh), mp<T>(hy), static_cast<I>(N), static_cast<I>(H));
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_rnn_cell_bwd(CellDtype dtype, CellActivation act, int64_t N, int64_t H, const void* dhy,
                                const void* hy, void* dpre, cudaStream_t stream) {
  if (N == 0 || H == 0) return cudaSuccess;
  return dispatch(dtype, N * H, [&](auto tt, auto it) {
    using T = typename decltype(tt)::type;
    using I = typename decltype(it)::type;
    const unsigned int blocks = blocks_for(N * H);
    if (act == CellActivation::kTanh) {
      rnn_cell_bwd_kernel<T, I, CellActivation::kTanh>
          <<<blocks, kThreads, 0, stream>>>(cp<T>(dhy), cp<T>(hy), mp<T>(dpre), static_cast<I>(N * H));
    } else {
      rnn_cell_bwd_kernel<T, I, CellActivation::kRelu>
          <<<blocks, kThreads, 0, stream>>>(cp<T>(dhy), cp<T>(hy), mp<T>(dpre), static_cast<I>(N * H));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastseq
