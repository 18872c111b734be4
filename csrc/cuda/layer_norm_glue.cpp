// Layer norm, CUDA tensors: checks the arguments, allocates the outputs (and the float32 workspace of the backward,
// through the caching allocator) and calls the launchers of layer_norm.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../layer_norm.h"
#include "layer_norm.cuh"

namespace fastseq {
namespace cuda {
namespace {

LayerNormDtype dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return LayerNormDtype::kFloat32;
    case at::kHalf: return LayerNormDtype::kFloat16;
    case at::kBFloat16: return LayerNormDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "layer_norm (CUDA): ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A contiguous 2-D CUDA tensor.
void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "layer_norm (CUDA): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "layer_norm (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, "layer_norm (CUDA): ", name, " must be 2-D (M, N), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "layer_norm (CUDA): ", name, " must be contiguous, got strides ", t.strides());
}

// A contiguous tensor of the given shape, dtype and device.
void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                const at::Device& device) {
  TORCH_CHECK(t.device() == device, "layer_norm (CUDA): ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "layer_norm (CUDA): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "layer_norm (CUDA): ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "layer_norm (CUDA): ", name, " must be contiguous, got strides ", t.strides());
}

// Data pointer of an optional (N,) parameter of x's dtype and device, or nullptr when absent.
const void* param_ptr(const std::optional<at::Tensor>& p, const char* name, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return nullptr;
  check_like(*p, name, {x.size(1)}, x.scalar_type(), x.device());
  return p->data_ptr();
}

void check_cols(int64_t N) {
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, "layer_norm (CUDA): the normalized size N must be in [1, 2^31 - 1], got ", N);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  check_matrix(x, "x");
  const LayerNormDtype tag = dtype_tag(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  const void* w = param_ptr(weight, "weight", x);
  const void* b = param_ptr(bias, "bias", x);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};
  check_cols(N);

  const cudaError_t err = layer_norm_fwd_launch(tag, x.data_ptr(), w, b, y.data_ptr(), mean.data_ptr<float>(),
                                                rstd.data_ptr<float>(), M, N, static_cast<float>(eps),
                                                c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "layer_norm_fwd (CUDA): ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool need_dweight, bool need_dbias) {
  check_matrix(x, "x");
  const LayerNormDtype tag = dtype_tag(x, "x");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(dy.defined(), "layer_norm (CUDA): dy is undefined");
  check_like(dy, "dy", x.sizes(), x.scalar_type(), x.device());
  TORCH_CHECK(mean.defined() && rstd.defined(), "layer_norm (CUDA): mean and rstd must be defined");
  check_like(mean, "mean", {M}, at::kFloat, x.device());
  check_like(rstd, "rstd", {M}, at::kFloat, x.device());
  const void* w = param_ptr(weight, "weight", x);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dweight, dbias;
  if (M == 0) {  // sums over no rows
    if (need_dweight) dweight = at::zeros({N}, x.options());
    if (need_dbias) dbias = at::zeros({N}, x.options());
    return {dx, dweight, dbias};
  }
  check_cols(N);
  if (need_dweight) dweight = at::empty({N}, x.options());
  if (need_dbias) dbias = at::empty({N}, x.options());

  int64_t ws_numel = 0;
  cudaError_t err = layer_norm_bwd_workspace_numel(tag, M, N, need_dweight || need_dbias, &ws_numel);
  TORCH_CHECK(err == cudaSuccess, "layer_norm_bwd (CUDA): ", cudaGetErrorString(err));
  at::Tensor workspace;
  if (ws_numel > 0) workspace = at::empty({ws_numel}, x.options().dtype(at::kFloat));

  err = layer_norm_bwd_launch(tag, dy.data_ptr(), x.data_ptr(), w, mean.data_ptr<float>(), rstd.data_ptr<float>(),
                              dx.data_ptr(), need_dweight ? dweight.data_ptr() : nullptr,
                              need_dbias ? dbias.data_ptr() : nullptr,
                              ws_numel > 0 ? workspace.data_ptr<float>() : nullptr, ws_numel, M, N,
                              c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "layer_norm_bwd (CUDA): ", cudaGetErrorString(err));
  return {dx, dweight, dbias};
}

}  // namespace cuda
}  // namespace fastseq
