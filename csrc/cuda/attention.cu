// Scaled dot-product attention forward on tensor cores (contract and index math in attention.cuh).
//
// One thread block per (query block of BM = 64 or 128 rows, b, h); BM / 16 warps, each owning 16 query rows. The Q
// tile is staged through shared memory once and kept in registers as mma A fragments (reloaded from shared per key
// tile for D = 128 with a mask, to stay within 255 registers); K and V tiles of 64 keys go through shared memory
// with cp.async (16-byte, zero-filled past S), overlapped with compute: V of tile n loads while S = Q K_n^T and the
// softmax run, K of tile n + 1 loads while O += P V_n runs. Shared tiles are XOR-swizzled in 16-byte chunks
// (attn::smem_offset) and read with ldmatrix (.trans for V). S and O are float32 mma.sync m16n8k16 accumulators;
// the online softmax runs in registers in the log2 domain (scale * log2(e) folded into one multiply, ex2.approx),
// row statistics reduced over the 4 lanes of a quad; P goes to the PV mma as A fragments straight from the S
// accumulators. The output is staged through the Q tile's shared memory for 16-byte stores.
// Shared memory: (BM + 2 * 64) * D * 2 bytes: 24 / 32 KiB (D = 64, BM = 64 / 128), 48 / 64 KiB (D = 128).
#include "attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fastseq {
namespace cuda {
namespace {

using attn::kBlockN;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- device helpers ------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// Two floats rounded to T and packed into 32 bits, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a b, m16n8k16, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x (MUFU, flush-to-zero; 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// 16-byte global -> shared copy; src_bytes == 0 writes zeros (src is then not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Rows [row0, row0 + ROWS) of a (rows, D) global matrix with row stride `ld` into a swizzled shared tile; rows at
// or past `nrows` are zero-filled. Thread tid copies chunk tid % (D / 8) of rows tid / (D / 8) + it * kRowStep;
// kRowStep is a multiple of 8, so the row's swizzle (row % 8) is the same for all of a thread's rows.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t ld, int row0, int nrows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowStep = THREADS / kChunksPerRow;
  static_assert(THREADS % kChunksPerRow == 0 && kRowStep % 8 == 0 && ROWS % kRowStep == 0,
                "tile rows must divide evenly over the threads, in steps of 8 rows");
  const int r = tid / kChunksPerRow, col = (tid % kChunksPerRow) * 8;
  T* dst = s + attn::smem_offset(r, col, D);
  const T* src = g + static_cast<int64_t>(row0 + r) * ld + col;
#pragma unroll
  for (int it = 0; it < ROWS / kRowStep; ++it) {
    const bool valid = row0 + r + it * kRowStep < nrows;
    cp_async16(dst + it * kRowStep * D, valid ? src : g, valid ? 16 : 0);
    src += kRowStep * ld;
  }
}

struct FwdParams {
  const void* q;     // (B, Hq, L, D)
  const void* k;     // (B, Hk, S, D)
  const void* v;     // (B, Hk, S, D)
  const void* mask;  // (B, Hq, L, S) or nullptr
  void* out;         // (B, Hq, L, D) contiguous
  float* lse;        // (B, Hq, L) contiguous
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, m_sb, m_sh, m_sl, m_ss;
  int64_t BH, Hq, group;  // group = Hq / Hk
  int L, S;               // at most attn::kMaxLen, so that row and column indices past them still fit in int
  float scale_log2;  // scale * log2(e)
  bool causal;
};

// MaskT: void (no mask), float, or T.
template <typename T, int D, int BM, typename MaskT>
__global__ void __launch_bounds__(BM * 2, (D == 64 && BM == 64 && std::is_void_v<MaskT>) ? 3 : 1)
    sdpa_fwd_kernel(const FwdParams p) {
  constexpr int kWarps = BM / 16;
  constexpr int kThreads = kWarps * 32;
  constexpr int kDSteps = D / 16;         // k-steps of S = Q K^T over the head dim
  constexpr int kSTiles = kBlockN / 8;    // n-tiles of S
  constexpr int kPSteps = kBlockN / 16;   // k-steps of O += P V over the keys
  constexpr int kOTiles = D / 8;          // n-tiles of O
  constexpr bool kHasMask = !std::is_void_v<MaskT>;
  // Q's A fragments stay in registers, except for D = 128 with a mask, where registers run out: reloaded per tile.
  constexpr bool kQInRegs = !(D == 128 && kHasMask);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (BM, D), later the output tile
  T* sK = sQ + BM * D;                     // (kBlockN, D)
  T* sV = sK + kBlockN * D;                // (kBlockN, D)

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t bh = blockIdx.y + static_cast<int64_t>(blockIdx.z) * gridDim.y;
  if (bh >= p.BH) return;
  // Causal: the heaviest query blocks (most key tiles) first.
  const int64_t m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
  const int m0 = static_cast<int>(m_block) * BM;
  const int r0 = m0 + warp * 16;  // first query row of this warp
  const int L = p.L, S = p.S;

  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int n_tiles = static_cast<int>(attn::num_key_tiles(m0, BM, S, p.causal));
  // Mask rows of this lane's two query rows (clamped into [0, L): rows past L are computed but never stored).
  const MaskT* mrow[2];
  if constexpr (kHasMask) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = min(r0 + attn::mma_c_row(lane, 2 * r), L - 1);
      mrow[r] = static_cast<const MaskT*>(p.mask) + b * p.m_sb + h * p.m_sh + row * p.m_sl;
    }
  }

  load_tile<T, D, BM, kThreads>(sQ, q, p.q_sl, m0, L, tid);
  if (n_tiles > 0) load_tile<T, D, kBlockN, kThreads>(sK, k, p.k_sl, 0, S, tid);
  cp_async_commit();

  uint32_t qf[kQInRegs ? kDSteps : 1][4];
  float o[kOTiles][4];
#pragma unroll
  for (int nt = 0; nt < kOTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // per lane: rows r0 + lane/4 and r0 + lane/4 + 8 (log2 domain)
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums over its columns

  for (int nb = 0; nb < n_tiles; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_nb in shared; every warp is done with V_{nb-1}
    if constexpr (kQInRegs) {
      if (nb == 0) {
#pragma unroll
        for (int kk = 0; kk < kDSteps; ++kk)
          ldsm_x4(qf[kk], sQ + attn::smem_offset(warp * 16 + attn::ldsm_q_row(lane), kk * 16 + attn::ldsm_q_col(lane),
                                                 D));
      }
    }
    load_tile<T, D, kBlockN, kThreads>(sV, v, p.v_sl, n0, S, tid);
    cp_async_commit();

    const bool active = !attn::warp_tile_hidden(r0, n0, p.causal);
    float s[kSTiles][4];
    if (active) {
      // S = Q K^T
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        uint32_t qa[4];
        if constexpr (kQInRegs) {
#pragma unroll
          for (int j = 0; j < 4; ++j) qa[j] = qf[kk][j];
        } else {
          ldsm_x4(qa, sQ + attn::smem_offset(warp * 16 + attn::ldsm_q_row(lane), kk * 16 + attn::ldsm_q_col(lane), D));
        }
#pragma unroll
        for (int np = 0; np < kSTiles / 2; ++np) {
          uint32_t kf[4];
          ldsm_x4(kf, sK + attn::smem_offset(np * 16 + attn::ldsm_k_row(lane), kk * 16 + attn::ldsm_k_col(lane), D));
          mma16816<T>(s[2 * np], qa, kf[0], kf[1]);
          mma16816<T>(s[2 * np + 1], qa, kf[2], kf[3]);
        }
      }
      // scale, mask, online softmax (log2 domain)
      const bool elementwise = attn::warp_tile_needs_mask(r0, n0, S, p.causal, kHasMask);
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x = s[nt][i] * p.scale_log2;
          if (elementwise) {
            const int row = r0 + attn::mma_c_row(lane, i), col = n0 + nt * 8 + attn::mma_c_col(lane, i);
            // mask columns clamped into [0, S): columns past S are -inf anyway
            if constexpr (kHasMask) x = fmaf(to_f(mrow[i >> 1][min(col, S - 1) * p.m_ss]), kLog2e, x);
            if (col >= S || (p.causal && col > row)) x = -INFINITY;
          }
          s[nt][i] = x;
          tile_max[i >> 1] = fmaxf(tile_max[i >> 1], x);
        }
      float m_use[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(row_max[r], tile_max[r]);
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no visible key so far: exp2(-inf - 0) = 0
        const float alpha = fast_exp2(row_max[r] - m_use[r]);
        row_max[r] = m_new;
        row_sum[r] *= alpha;
#pragma unroll
        for (int nt = 0; nt < kOTiles; ++nt) {
          o[nt][2 * r] *= alpha;
          o[nt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float e = fast_exp2(s[nt][i] - m_use[i >> 1]);
          s[nt][i] = e;
          row_sum[i >> 1] += e;
        }
    }

    cp_async_wait_all();
    __syncthreads();  // V_nb in shared; every warp is done with K_nb
    if (nb + 1 < n_tiles) load_tile<T, D, kBlockN, kThreads>(sK, k, p.k_sl, n0 + kBlockN, S, tid);
    cp_async_commit();

    if (active) {
      // O += P V: P's A fragments are the S accumulators of n-tiles 2kk and 2kk + 1.
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
        const uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < kOTiles / 2; ++np) {
          uint32_t vf[4];
          ldsm_x4_trans(vf, sV + attn::smem_offset(kk * 16 + attn::ldsm_v_row(lane),
                                                   np * 16 + attn::ldsm_v_col(lane), D));
          mma16816<T>(o[2 * np], pf, vf[0], vf[1]);
          mma16816<T>(o[2 * np + 1], pf, vf[2], vf[3]);
        }
      }
    }
  }

  // Finalize: full row sums over the quad, normalize, lse.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // l = 0: no visible key (out 0, lse -inf); l NaN: a NaN score or value (out and lse NaN, as torch gives)
    inv[r] = l == 0.f ? 0.f : 1.f / l;
    const int row = r0 + attn::mma_c_row(lane, 2 * r);
    if ((lane & 3) == 0 && row < L) p.lse[bh * L + row] = l == 0.f ? -INFINITY : (row_max[r] + log2f(l)) * kLn2;
  }
  cp_async_wait_all();
  __syncthreads();  // the Q tile's shared memory is free (only this warp reads its 16 rows from here on)
#pragma unroll
  for (int nt = 0; nt < kOTiles; ++nt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + attn::mma_c_row(lane, 2 * r), col = nt * 8 + attn::mma_c_col(lane, 2 * r);
      *reinterpret_cast<uint32_t*>(sQ + attn::smem_offset(row, col, D)) =
          pack2<T>(o[nt][2 * r] * inv[r], o[nt][2 * r + 1] * inv[r]);
    }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + bh * L * D;  // bh is int64
  constexpr int kChunksPerRow = D / 8;
#pragma unroll
  for (int it = 0; it < 16 * kChunksPerRow / 32; ++it) {
    const int c = lane + it * 32;
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = r0 + r;
    if (row < L)
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * D + col) =
          *reinterpret_cast<const uint4*>(sQ + attn::smem_offset(warp * 16 + r, col, D));
  }
}

template <typename T, int D, int BM, typename MaskT>
cudaError_t launch(const FwdParams& p, int64_t num_m_blocks, cudaStream_t stream) {
  auto kernel = sdpa_fwd_kernel<T, D, BM, MaskT>;
  const size_t smem = static_cast<size_t>(BM + 2 * kBlockN) * D * sizeof(T);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  constexpr int64_t kMaxGridY = 65535;
  const int64_t gy = p.BH < kMaxGridY ? p.BH : kMaxGridY;
  const int64_t gz = (p.BH + gy - 1) / gy;
  if (num_m_blocks > INT_MAX || gz > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_m_blocks), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
  kernel<<<grid, BM * 2, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D, int BM>
cudaError_t dispatch_mask(AttnMaskDtype mask_dtype, const FwdParams& p, int64_t num_m_blocks, cudaStream_t stream) {
  switch (mask_dtype) {
    case AttnMaskDtype::kNone: return launch<T, D, BM, void>(p, num_m_blocks, stream);
    case AttnMaskDtype::kFloat32: return launch<T, D, BM, float>(p, num_m_blocks, stream);
    case AttnMaskDtype::kFloat16:
      if constexpr (std::is_same_v<T, __half>) return launch<T, D, BM, T>(p, num_m_blocks, stream);
      return cudaErrorInvalidValue;
    case AttnMaskDtype::kBFloat16:
      if constexpr (std::is_same_v<T, __nv_bfloat16>) return launch<T, D, BM, T>(p, num_m_blocks, stream);
      return cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

// Query block of 128 rows, or 64 when 128-row blocks would leave SMs idle.
template <typename T, int D>
cudaError_t dispatch_block(AttnMaskDtype mask_dtype, const FwdParams& p, cudaStream_t stream) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int64_t blocks128 = (p.L + 127) / 128;
  if (blocks128 * p.BH >= 2 * static_cast<int64_t>(sms))
    return dispatch_mask<T, D, 128>(mask_dtype, p, blocks128, stream);
  return dispatch_mask<T, D, 64>(mask_dtype, p, (p.L + 63) / 64, stream);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool strides_mult8(const int64_t s[3]) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

}  // namespace

cudaError_t sdpa_fwd_launch(AttnDtype dtype, AttnMaskDtype mask_dtype, const void* q, const void* k, const void* v,
                            const void* mask, void* out, float* lse, const int64_t q_strides[3],
                            const int64_t k_strides[3], const int64_t v_strides[3], const int64_t mask_strides[4],
                            int64_t B, int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t E, float scale,
                            bool is_causal, cudaStream_t stream) {
  if (B < 0 || Hq < 0 || Hk < 1 || Hq % Hk != 0 || L < 0 || S < 0 || L > attn::kMaxLen || S > attn::kMaxLen)
    return cudaErrorInvalidValue;
  if (E != 64 && E != 128) return cudaErrorInvalidValue;
  if ((mask == nullptr) != (mask_dtype == AttnMaskDtype::kNone)) return cudaErrorInvalidValue;
  if (B * Hq * L == 0) return cudaSuccess;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(out) || !strides_mult8(q_strides) ||
      !strides_mult8(k_strides) || !strides_mult8(v_strides))
    return cudaErrorInvalidValue;

  FwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.mask = mask;
  p.out = out;
  p.lse = lse;
  p.q_sb = q_strides[0], p.q_sh = q_strides[1], p.q_sl = q_strides[2];
  p.k_sb = k_strides[0], p.k_sh = k_strides[1], p.k_sl = k_strides[2];
  p.v_sb = v_strides[0], p.v_sh = v_strides[1], p.v_sl = v_strides[2];
  p.m_sb = p.m_sh = p.m_sl = p.m_ss = 0;
  if (mask != nullptr) {
    p.m_sb = mask_strides[0], p.m_sh = mask_strides[1], p.m_sl = mask_strides[2], p.m_ss = mask_strides[3];
  }
  p.BH = B * Hq;
  p.Hq = Hq;
  p.group = Hq / Hk;
  p.L = static_cast<int>(L);
  p.S = static_cast<int>(S);
  p.scale_log2 = scale * kLog2e;
  p.causal = is_causal;

  if (dtype == AttnDtype::kFloat16)
    return E == 64 ? dispatch_block<__half, 64>(mask_dtype, p, stream)
                   : dispatch_block<__half, 128>(mask_dtype, p, stream);
  if (dtype == AttnDtype::kBFloat16)
    return E == 64 ? dispatch_block<__nv_bfloat16, 64>(mask_dtype, p, stream)
                   : dispatch_block<__nv_bfloat16, 128>(mask_dtype, p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastseq
