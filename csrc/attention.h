// Scaled dot-product attention, flash style (the L x S score matrix never reaches memory), forward and backward.
//   out = softmax(q k^T * scale + mask) v, with dropout on the probabilities; lse = logsumexp of the scaled,
//   masked scores per query row (what backward needs to recompute the probabilities).
// Shapes: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq a multiple of Hk (GQA: query head h reads
// key/value head h / (Hq / Hk)); any strides with a unit last dim. attn_mask: an additive float mask broadcastable to
// (B, Hq, L, S), passed as a 4-D tensor whose broadcast dims have stride 0 (a bool mask is turned into 0 / -inf by
// the caller); none when absent. is_causal: query i sees keys j <= i (top-left triangle). Rows with no visible key
// give out = 0 and lse = -inf.
// Dropout: each kept probability is scaled by 1 / (1 - dropout_p); the keep decision for (b, h, i, j) is a pure
// function of (seed, offset, b, h, i, j) so that backward regenerates it bit for bit.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace fastseq {
#define FASTSEQ_ATTENTION_DECLS                                                                                    \
  /* Returns out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32 (float64 for float64 inputs). */              \
  std::tuple<at::Tensor, at::Tensor> sdpa_fwd(                                                                     \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,   \
      bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset);                               \
  /* dout, out: (B, Hq, L, Ev); lse from sdpa_fwd. Returns dq, dk, dv (shaped like q, k, v) and, when need_dmask,  \
     d(scores) (B, Hq, L, S) in float32 (float64 for float64 inputs) -- the gradient of an additive mask before reducing it to the mask's shape  \
     (undefined otherwise). */                                                                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_bwd(                                             \
      const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, \
      const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,             \
      double dropout_p, int64_t seed, int64_t offset, bool need_dmask);

namespace cpu {  // float32, float64, bfloat16
FASTSEQ_ATTENTION_DECLS
// Whether bfloat16 inputs (forward and backward) run on the CPU's bf16 dot products (AVX512_BF16;
// FASTSEQ_CPU_BF16_DOT=0 keeps the float32 path).
bool sdpa_bf16_dot();
}  // namespace cpu
#ifdef WITH_CUDA
namespace cuda {  // forward only, float16 / bfloat16, head dims 64 and 128, no dropout (tensor cores)
std::tuple<at::Tensor, at::Tensor> sdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                                            double dropout_p, int64_t seed, int64_t offset);
// Why the kernel cannot run attention of q (B, Hq, L, E) with v (B, Hk, S, Ev) and dropout_p; empty when it can.
std::string sdpa_unsupported(const at::Tensor& q, const at::Tensor& v, double dropout_p);
}  // namespace cuda
#endif
#undef FASTSEQ_ATTENTION_DECLS
}  // namespace fastseq
