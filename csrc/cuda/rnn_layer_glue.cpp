// CUDA step kernels of the recurrent layers (csrc/rnn_layer.h's CellSteps): the time loop is csrc/rnn_layer.cpp's;
// this file gives it the cell kernels of rnn_cell.cuh on the current stream, which read their rows from the
// sequence buffers and write h, c and the activated gates of the step straight into them. The kernels take
// __restrict__ pointers, so none runs in place (in_place() is false): the loop gives x W_ih^T a buffer of its own
// and alternates the backward's dc (LSTM) and dh (GRU) states between two buffers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <memory>
#include <optional>

#include "../rnn_layer.h"
#include "rnn_cell.cuh"

namespace fastseq {
namespace cuda {
namespace {

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, "fastseq ", fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

class CudaSteps final : public CellSteps {
 public:
  explicit CudaSteps(const Layer& layer) : CellSteps(layer), guard_(layer.x2d.device()) {
    TORCH_CHECK(layer.x2d.is_cuda(), "rnn_layer (CUDA): expected CUDA tensors, got ", layer.x2d.device());
    switch (layer.x2d.scalar_type()) {
      case at::kFloat:
        dtype_ = CellDtype::kFloat32;
        break;
      case at::kHalf:
        dtype_ = CellDtype::kFloat16;
        break;
      case at::kBFloat16:
        dtype_ = CellDtype::kBFloat16;
        break;
      default:
        TORCH_CHECK(false, "rnn_layer (CUDA): expected x of dtype Float, Half or BFloat16, got ",
                    layer.x2d.scalar_type());
    }
    act_ = L.mode() == Mode::kRnnRelu ? CellActivation::kRelu : CellActivation::kTanh;
    if (L.peephole.defined()) {  // the peephole backward also reduces dpeephole over the rows (unused here)
      const int64_t rows = lstm_cell_bwd_partial_rows(L.N, L.H);
      dpeep_ = at::empty({3, L.H}, L.x2d.options());
      partials_ = at::empty({rows, 3, L.H}, L.x2d.options().dtype(at::kFloat));
    }
  }

  bool in_place() const override { return false; }

  void forward(const StepFwd& s) override {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t H = L.H;
    switch (L.mode()) {
      case Mode::kLstm:
      case Mode::kPeepholeLstm:
        check_launch(launch_lstm_cell_fwd(dtype_, s.n, H, s.gi.addr(), s.hg.addr(), s.c_prev.addr(), ptr(L.b_ih),
                                          ptr(L.b_hh), ptr(L.peephole), s.h.addr(), s.c.addr(), s.gates.addr(),
                                          stream),
                     "rnn_layer_fwd");
        break;
      case Mode::kGru:
        check_launch(launch_gru_cell_fwd(dtype_, s.n, H, s.gi.addr(), s.hg.addr(), s.h_prev.addr(), ptr(L.b_ih),
                                         ptr(L.b_hh), s.h.addr(), s.gates.addr(), stream),
                     "rnn_layer_fwd");
        break;
      case Mode::kRnnTanh:
      case Mode::kRnnRelu:
        check_launch(launch_rnn_cell_fwd(dtype_, act_, s.n, H, s.gi.addr(), s.hg.addr(), ptr(L.b_ih), ptr(L.b_hh),
                                         s.h.addr(), stream),
                     "rnn_layer_fwd");
        break;
    }
  }

  void backward(const StepBwd& s) override {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t H = L.H;
    switch (L.mode()) {
      case Mode::kLstm:
      case Mode::kPeepholeLstm:
        check_launch(launch_lstm_cell_bwd(dtype_, s.n, H, s.dh.addr(), s.dc.addr(), s.c_prev.addr(), s.c.addr(),
                                          s.gates.addr(), ptr(L.peephole), s.dgi.addr(), s.dc_out.addr(),
                                          dpeep_.defined() ? dpeep_.data_ptr() : nullptr,
                                          partials_.defined() ? partials_.data_ptr<float>() : nullptr, stream),
                     "rnn_layer_bwd");
        break;
      case Mode::kGru:
        check_launch(launch_gru_cell_bwd(dtype_, s.n, H, s.dh.addr(), s.h_prev.addr(), s.gates.addr(), s.dgi.addr(),
                                         s.dgh.addr(), s.dh_out.addr(), stream),
                     "rnn_layer_bwd");
        break;
      case Mode::kRnnTanh:
      case Mode::kRnnRelu:
        check_launch(launch_rnn_cell_bwd(dtype_, act_, s.n, H, s.dh.addr(), s.h.addr(), s.dgi.addr(), stream),
                     "rnn_layer_bwd");
        break;
    }
  }

 private:
  const c10::cuda::CUDAGuard guard_;
  CellDtype dtype_;
  CellActivation act_;
  at::Tensor dpeep_, partials_;  // scratch of the peephole backward kernel (the loop sums dpeephole itself)
};

}  // namespace

std::unique_ptr<CellSteps> layer_steps(const Layer& layer) { return std::make_unique<CudaSteps>(layer); }

}  // namespace cuda
}  // namespace fastseq
