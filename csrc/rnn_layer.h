// Recurrent layers: one direction of one layer over a whole sequence, the time loop on the host (declared here,
// bound in bindings.cpp). The input projection of all time steps is one GEMM; each step is a GEMM of h with W_hh^T
// followed by the fused cell kernel; backward runs the fused pointwise backward per step (in reverse) and computes
// the weight gradients as a few large GEMMs over all time steps.
// Layout: x (T, N, C) time-major and contiguous, or packed: x (sum(batch_sizes), C) with batch_sizes (T,) int64 on
// the CPU, non-increasing (torch.nn.utils.rnn.PackedSequence's layout); each step then runs on the active batch only.
// mode: "lstm", "gru", "rnn_tanh", "rnn_relu". reverse: run from the last step to the first (the backward direction of
// a bidirectional layer). w_hr: (P, H) LSTM projection (proj_size = P) or none: then h has size P.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastseq {
#define FASTSEQ_RNN_LAYER_DECLS                                                                                    \
  /* h0: (N, Hout) with Hout = P if w_hr else H; c0: (N, H) for lstm (none otherwise); w_ih (G*H, C),             \
     w_hh (G*H, Hout). Returns y (T, N, Hout) (or (sum(batch_sizes), Hout) packed), h_n (N, Hout), c_n (N, H)     \
     (undefined unless lstm), and `saved`: the tensors rnn_layer_bwd needs, [h of every step (rows, Hout), the     \
     activated gates (rows, 4H) (lstm [i, f, g, o], gru [r, z, n, hn]), c of every step (rows, H) (lstm),          \
     o * tanh(c) (rows, H) (with w_hr)] with rows = T*N or sum(batch_sizes); pass them back unchanged. */           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_fwd(                           \
      const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,     \
      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,                       \
      const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,                  \
      const std::optional<at::Tensor>& batch_sizes);                                                              \
  /* dy like y; dh_n like h_n; dc_n like c_n (lstm) -- zeros where the caller has no gradient. Returns dx, dh0,    \
     dc0 (undefined unless lstm) and the weight gradients {dw_ih, dw_hh, db_ih, db_hh, dw_hr} (undefined where     \
     absent). */                                                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_bwd(                           \
      const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const std::optional<at::Tensor>& dc_n, \
      const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,      \
      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,        \
      const std::optional<at::Tensor>& w_hr, bool reverse, const std::optional<at::Tensor>& batch_sizes,           \
      const std::vector<at::Tensor>& saved);

// CPU: float32, float64, bfloat16 (csrc/cpu/rnn_layer.cpp).
namespace cpu { FASTSEQ_RNN_LAYER_DECLS }
#ifdef WITH_CUDA
// CUDA: float32, float16, bfloat16 (csrc/cuda/rnn_layer_glue.cpp: a host loop of ATen GEMMs and the cell kernels of
// csrc/cuda/rnn_cell.cuh on the current stream).
namespace cuda { FASTSEQ_RNN_LAYER_DECLS }
#endif
#undef FASTSEQ_RNN_LAYER_DECLS
}  // namespace fastseq
