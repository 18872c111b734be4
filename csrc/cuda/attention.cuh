// Scaled dot-product attention forward on tensor cores (flash style): launcher over raw pointers (no torch types)
// and the index math of the kernel's tiles and mma.sync fragments, kept __host__ __device__ so that it can be
// checked on the host.
//   out = softmax(q k^T * scale + mask) v per (b, h) and query row i, over the keys j visible to i;
//   lse[i] = log(sum_j exp(q_i . k_j * scale + mask_ij)) (natural log, float32).
// q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, E) (Ev == E), Hq a multiple of Hk: query head h reads key/value
// head h / (Hq / Hk). Head dims E in {64, 128}; float16 or bfloat16; float32 accumulation and softmax.
// mask: additive, broadcastable to (B, Hq, L, S) and given by its 4-D strides (0 on broadcast dims); float32 or the
// input dtype; nullptr when absent. is_causal: query i sees keys j <= i (top-left triangle). Rows with no visible
// key (every key masked to -inf, or S == 0) give out = 0 and lse = -inf. No dropout.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastseq {
namespace cuda {

enum class AttnDtype : int { kFloat16 = 0, kBFloat16 = 1 };
enum class AttnMaskDtype : int { kNone = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Forward. Strides are in elements; q/k/v strides are (batch, head, row) of tensors with a unit last-dim stride, and
// must be multiples of 8 with q, k, v, out 16-byte aligned (16-byte cp.async); a stride of a size-1 dim may be
// given as 0. mask_strides are (batch, head, query row, key column), any values (0 on broadcast dims).
// Requires E in {64, 128}, 1 <= Hk, Hq % Hk == 0, 0 <= L, S <= 2^30. Returns cudaErrorInvalidValue for
// arguments it cannot serve, else the launch error; B * Hq * L == 0 launches nothing.
cudaError_t sdpa_fwd_launch(AttnDtype dtype, AttnMaskDtype mask_dtype,
                            const void* q,     // (B, Hq, L, E) dtype, strides q_strides
                            const void* k,     // (B, Hk, S, E) dtype, strides k_strides
                            const void* v,     // (B, Hk, S, E) dtype, strides v_strides
                            const void* mask,  // (B, Hq, L, S) mask_dtype, strides mask_strides, or nullptr
                            void* out,         // (B, Hq, L, E) dtype, contiguous, output
                            float* lse,        // (B, Hq, L) float32, contiguous, output
                            const int64_t q_strides[3], const int64_t k_strides[3], const int64_t v_strides[3],
                            const int64_t mask_strides[4], int64_t B, int64_t Hq, int64_t Hk, int64_t L, int64_t S,
                            int64_t E, float scale, bool is_causal, cudaStream_t stream);

// ---- index math (host-checkable) ----------------------------------------------------------------------------
namespace attn {

constexpr int kBlockN = 64;           // keys per K/V tile
constexpr int64_t kMaxLen = 1 << 30;  // largest L and S (indices past them by a tile still fit in int)

// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: lane `lane` holds, in element slot i (two 16-bit
// elements per 32-bit register, the lower-indexed slot in the low half), these (row, col) of each operand.
// A (16 x 16, row-major), i in [0, 8): registers {a0a1, a2a3, a4a5, a6a7}.
__host__ __device__ constexpr int mma_a_row(int lane, int i) { return (lane >> 2) + ((i >> 1) & 1) * 8; }
__host__ __device__ constexpr int mma_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >> 2) * 8; }
// B (16 x 8, "col": B[k][n] read from an n-major buffer), i in [0, 4): row = k, col = n.
__host__ __device__ constexpr int mma_b_row(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >> 1) * 8; }
__host__ __device__ constexpr int mma_b_col(int lane, int /*i*/) { return lane >> 2; }
// C / D (16 x 8 float32), i in [0, 4).
__host__ __device__ constexpr int mma_c_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
__host__ __device__ constexpr int mma_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j, which lands in register j. These give the
// (row, col) within a 16 x 16 tile whose address lane `lane` supplies (col a multiple of 8).
//   Q (A operand, 16 query rows x 16 dims): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//   = registers a0a1, a2a3, a4a5, a6a7.
__host__ __device__ constexpr int ldsm_q_row(int lane) { return lane & 15; }
__host__ __device__ constexpr int ldsm_q_col(int lane) { return (lane >> 4) * 8; }
//   K (B operand of two n-tiles, 16 keys x 16 dims, K row-major = B "col"): matrices (keys 0-7, dims 0-7),
//   (0-7, 8-15), (8-15, 0-7), (8-15, 8-15) = {b0b1, b2b3} of keys 0-7, then of keys 8-15.
__host__ __device__ constexpr int ldsm_k_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
__host__ __device__ constexpr int ldsm_k_col(int lane) { return ((lane >> 3) & 1) * 8; }
//   V (B operand of two n-tiles, 16 keys x 16 dims, V row-major, loaded with .trans): matrices (keys 0-7,
//   dims 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = {b0b1, b2b3} of dims 0-7, then of dims 8-15.
__host__ __device__ constexpr int ldsm_v_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
__host__ __device__ constexpr int ldsm_v_col(int lane) { return (lane >> 4) * 8; }

// Element offset of (row, col) in a shared tile of rows of D 16-bit elements: the 16-byte chunk index is XORed
// with row % 8, so that the 8 row addresses of one ldmatrix matrix (8 consecutive rows, same logical chunk) and
// the 16-byte cp.async writes fall into distinct banks.
__host__ __device__ constexpr int smem_offset(int row, int col, int D) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Number of key tiles a query block [m0, m0 + block_m) reads: all of them, or with is_causal only those holding a
// key j <= m0 + block_m - 1 (whole tiles above the diagonal are skipped).
__host__ __device__ constexpr int64_t num_key_tiles(int64_t m0, int block_m, int64_t S, bool causal) {
  return ((causal ? (S < m0 + block_m ? S : m0 + block_m) : S) + kBlockN - 1) / kBlockN;
}
// Whether a warp's 16 query rows [r0, r0 + 16) see no key of the tile starting at n0 (causal only): the warp skips
// the tile, which leaves its softmax state exactly as an all -inf tile would.
__host__ __device__ constexpr bool warp_tile_hidden(int64_t r0, int64_t n0, bool causal) {
  return causal && n0 > r0 + 15;
}
// Whether a warp's rows need per-element masking in the tile at n0: a float mask, keys past S, or keys above the
// causal diagonal for some row (j > i for the warp's first row r0).
__host__ __device__ constexpr bool warp_tile_needs_mask(int64_t r0, int64_t n0, int64_t S, bool causal,
                                                        bool has_mask) {
  return has_mask || n0 + kBlockN > S || (causal && n0 + kBlockN - 1 > r0);
}

}  // namespace attn
}  // namespace cuda
}  // namespace fastseq
