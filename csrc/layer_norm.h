// Layer norm: tensor-level entry points of the extension (declared here, bound in bindings.cpp).
//   y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim of a contiguous (M, N) matrix.
// Statistics (mean, rstd) are float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace fastseq {
#define FASTSEQ_LAYER_NORM_DECLS                                                                                 \
  /* x: (M, N) contiguous; weight, bias: (N,) or none. Returns y (M, N), mean (M,), rstd (M,). */                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(                                                 \
      const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,       \
      double eps);                                                                                               \
  /* dy, x: (M, N) contiguous; weight: (N,) or none; mean, rstd: (M,). Returns dx (M, N), dweight (N,) and      \
     dbias (N,) in the input's dtype (undefined tensors where need_* is false). */                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(                                                 \
      const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,                        \
      const at::Tensor& mean, const at::Tensor& rstd, bool need_dweight, bool need_dbias);

namespace cpu {
FASTSEQ_LAYER_NORM_DECLS
/* y of layer_norm_fwd alone, its statistics not kept: a forward whose backward will not run. */
at::Tensor layer_norm_fwd_output(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps);
}  // namespace cpu
#ifdef WITH_CUDA
namespace cuda { FASTSEQ_LAYER_NORM_DECLS }  // float32, float16, bfloat16 CUDA tensors
#endif
#undef FASTSEQ_LAYER_NORM_DECLS
}  // namespace fastseq
