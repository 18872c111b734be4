// Recurrent cell steps on CUDA, tensor level: validate, allocate, launch rnn_cell.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <tuple>

#include "../rnn_cell.h"
#include "rnn_cell.cuh"

namespace fastseq {
namespace cuda {
namespace {

// Dtype tag of the op's leading tensor, which must be a float32 / float16 / bfloat16 CUDA tensor.
CellDtype cell_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  switch (t.scalar_type()) {
    case at::kFloat:
      return CellDtype::kFloat32;
    case at::kHalf:
      return CellDtype::kFloat16;
    case at::kBFloat16:
      return CellDtype::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// t must be 2-D; returns its sizes.
std::pair<int64_t, int64_t> sizes_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", t.sizes());
  return {t.size(0), t.size(1)};
}

// t: defined, on ref's device, of ref's dtype, of the given shape, contiguous.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ", t.strides());
}

// Checks an optional tensor like check_like; returns its data or null when it is none / undefined.
const void* optional_data(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& ref,
                          at::IntArrayRef shape) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_like(*t, name, ref, shape);
  return t->data_ptr();
}

CellActivation cell_activation(const std::string& nonlinearity) {
  if (nonlinearity == "tanh") return CellActivation::kTanh;
  if (nonlinearity == "relu") return CellActivation::kRelu;
  TORCH_CHECK(false, "nonlinearity: expected \"tanh\" or \"relu\", got \"", nonlinearity, "\"");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastseq ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates,
                                                             const at::Tensor& cx,
                                                             const std::optional<at::Tensor>& b_ih,
                                                             const std::optional<at::Tensor>& b_hh,
                                                             const std::optional<at::Tensor>& peephole) {
  const CellDtype dtype = cell_dtype(igates, "igates");
  const auto [N, H] = sizes_2d(cx, "cx");
  check_like(igates, "igates", igates, {N, 4 * H});
  check_like(hgates, "hgates", igates, {N, 4 * H});
  check_like(cx, "cx", igates, {N, H});
  const void* b_ih_p = optional_data(b_ih, "b_ih", igates, {4 * H});
  const void* b_hh_p = optional_data(b_hh, "b_hh", igates, {4 * H});
  const void* peephole_p = optional_data(peephole, "peephole", igates, {3, H});
  const c10::cuda::CUDAGuard guard(igates.device());
  at::Tensor hy = at::empty({N, H}, igates.options());
  at::Tensor cy = at::empty({N, H}, igates.options());
  at::Tensor workspace = at::empty({N, 4 * H}, igates.options());
  check_launch(launch_lstm_cell_fwd(dtype, N, H, igates.data_ptr(), hgates.data_ptr(), cx.data_ptr(), b_ih_p,
                                    b_hh_p, peephole_p, hy.data_ptr(), cy.data_ptr(), workspace.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               "lstm_cell_fwd");
  return {hy, cy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd(const at::Tensor& dhy, const at::Tensor& dcy,
                                                             const at::Tensor& cx, const at::Tensor& cy,
                                                             const at::Tensor& workspace,
                                                             const std::optional<at::Tensor>& peephole) {
  const CellDtype dtype = cell_dtype(dhy, "dhy");
  const auto [N, H] = sizes_2d(cx, "cx");
  check_like(dhy, "dhy", dhy, {N, H});
  check_like(dcy, "dcy", dhy, {N, H});
  check_like(cx, "cx", dhy, {N, H});
  check_like(cy, "cy", dhy, {N, H});
  check_like(workspace, "workspace", dhy, {N, 4 * H});
  const void* peephole_p = optional_data(peephole, "peephole", dhy, {3, H});
  const c10::cuda::CUDAGuard guard(dhy.device());
  at::Tensor dgates = at::empty({N, 4 * H}, dhy.options());
  at::Tensor dcx = at::empty({N, H}, dhy.options());
  at::Tensor dpeephole;
  at::Tensor partials;
  if (peephole_p != nullptr) {
    // With no batch rows the launcher writes nothing, and the batch sum is zero.
    dpeephole = N == 0 ? at::zeros({3, H}, dhy.options()) : at::empty({3, H}, dhy.options());
    partials = at::empty({lstm_cell_bwd_partial_rows(N, H), 3, H}, dhy.options().dtype(at::kFloat));
  }
  check_launch(launch_lstm_cell_bwd(dtype, N, H, dhy.data_ptr(), dcy.data_ptr(), cx.data_ptr(), cy.data_ptr(),
                                    workspace.data_ptr(), peephole_p, dgates.data_ptr(), dcx.data_ptr(),
                                    dpeephole.defined() ? dpeephole.data_ptr() : nullptr,
                                    partials.defined() ? partials.data_ptr<float>() : nullptr,
                                    c10::cuda::getCurrentCUDAStream()),
               "lstm_cell_bwd");
  return {dgates, dcx, dpeephole};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates,
                                                const at::Tensor& hx, const std::optional<at::Tensor>& b_ih,
                                                const std::optional<at::Tensor>& b_hh) {
  const CellDtype dtype = cell_dtype(igates, "igates");
  const auto [N, H] = sizes_2d(hx, "hx");
  check_like(igates, "igates", igates, {N, 3 * H});
  check_like(hgates, "hgates", igates, {N, 3 * H});
  check_like(hx, "hx", igates, {N, H});
  const void* b_ih_p = optional_data(b_ih, "b_ih", igates, {3 * H});
  const void* b_hh_p = optional_data(b_hh, "b_hh", igates, {3 * H});
  const c10::cuda::CUDAGuard guard(igates.device());
  at::Tensor hy = at::empty({N, H}, igates.options());
  at::Tensor workspace = at::empty({N, 4 * H}, igates.options());
  check_launch(launch_gru_cell_fwd(dtype, N, H, igates.data_ptr(), hgates.data_ptr(), hx.data_ptr(), b_ih_p,
                                   b_hh_p, hy.data_ptr(), workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "gru_cell_fwd");
  return {hy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd(const at::Tensor& dhy, const at::Tensor& hx,
                                                            const at::Tensor& workspace) {
  const CellDtype dtype = cell_dtype(dhy, "dhy");
  const auto [N, H] = sizes_2d(hx, "hx");
  check_like(dhy, "dhy", dhy, {N, H});
  check_like(hx, "hx", dhy, {N, H});
  check_like(workspace, "workspace", dhy, {N, 4 * H});
  const c10::cuda::CUDAGuard guard(dhy.device());
  at::Tensor d_igates = at::empty({N, 3 * H}, dhy.options());
  at::Tensor d_hgates = at::empty({N, 3 * H}, dhy.options());
  at::Tensor dhx = at::empty({N, H}, dhy.options());
  check_launch(launch_gru_cell_bwd(dtype, N, H, dhy.data_ptr(), hx.data_ptr(), workspace.data_ptr(),
                                   d_igates.data_ptr(), d_hgates.data_ptr(), dhx.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               "gru_cell_bwd");
  return {d_igates, d_hgates, dhx};
}

at::Tensor rnn_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::string& nonlinearity) {
  const CellDtype dtype = cell_dtype(igates, "igates");
  const CellActivation act = cell_activation(nonlinearity);
  const auto [N, H] = sizes_2d(igates, "igates");
  check_like(igates, "igates", igates, {N, H});
  check_like(hgates, "hgates", igates, {N, H});
  const void* b_ih_p = optional_data(b_ih, "b_ih", igates, {H});
  const void* b_hh_p = optional_data(b_hh, "b_hh", igates, {H});
  const c10::cuda::CUDAGuard guard(igates.device());
  at::Tensor hy = at::empty({N, H}, igates.options());
  check_launch(launch_rnn_cell_fwd(dtype, act, N, H, igates.data_ptr(), hgates.data_ptr(), b_ih_p, b_hh_p,
                                   hy.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "rnn_cell_fwd");
  return hy;
}

at::Tensor rnn_cell_bwd(const at::Tensor& dhy, const at::Tensor& hy, const std::string& nonlinearity) {
  const CellDtype dtype = cell_dtype(dhy, "dhy");
  const CellActivation act = cell_activation(nonlinearity);
  const auto [N, H] = sizes_2d(hy, "hy");
  check_like(dhy, "dhy", dhy, {N, H});
  check_like(hy, "hy", dhy, {N, H});
  const c10::cuda::CUDAGuard guard(dhy.device());
  at::Tensor dpre = at::empty({N, H}, dhy.options());
  check_launch(launch_rnn_cell_bwd(dtype, act, N, H, dhy.data_ptr(), hy.data_ptr(), dpre.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               "rnn_cell_bwd");
  return dpre;
}

at::Tensor gates_mm(const at::Tensor& x, const at::Tensor& w) { return at::mm(x, w.t()); }

}  // namespace cuda
}  // namespace fastseq
