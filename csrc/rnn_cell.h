// Recurrent cell steps: the pointwise part after the GEMMs, fused (declared here, bound in bindings.cpp).
// igates = x W_ih^T, hgates = h W_hh^T are computed by the caller (gates_mm: the library GEMM, on the CPU a
// hand-written one at a few rows); biases are added here.
// All tensors contiguous, on one device, of one dtype (biases/peephole may be none).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace fastseq {
#define FASTSEQ_RNN_CELL_DECLS                                                                                      \
  /* LSTM, gate order i, f, g, o. igates, hgates: (N, 4H); cx: (N, H); b_ih, b_hh: (4H,); peephole: (3, H) rows  \
     p_i, p_f, p_o. Returns hy (N, H), cy (N, H), workspace (N, 4H) = activated gates [i, f, g, o]. */           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd(                                                   \
      const at::Tensor& igates, const at::Tensor& hgates, const at::Tensor& cx,                                   \
      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,                               \
      const std::optional<at::Tensor>& peephole);                                                                 \
  /* dhy, dcy, cx, cy: (N, H); workspace: (N, 4H). Returns dgates (N, 4H) = d(pre-activation gates),            \
     dcx (N, H), dpeephole (3, H) (undefined when peephole is none). */                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd(                                                   \
      const at::Tensor& dhy, const at::Tensor& dcy, const at::Tensor& cx, const at::Tensor& cy,                   \
      const at::Tensor& workspace, const std::optional<at::Tensor>& peephole);                                    \
  /* GRU, gate order r, z, n. igates, hgates: (N, 3H); hx: (N, H); b_ih, b_hh: (3H,).                            \
     Returns hy (N, H), workspace (N, 4H) = [r, z, n, hn] with hn = hgates_n + b_hn. */                           \
  std::tuple<at::Tensor, at::Tensor> gru_cell_fwd(                                                                \
      const at::Tensor& igates, const at::Tensor& hgates, const at::Tensor& hx,                                   \
      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);                              \
  /* dhy, hx: (N, H); workspace: (N, 4H). Returns d_igates (N, 3H), d_hgates (N, 3H), dhx (N, H) where dhx is     \
     only the direct term dhy * z (the caller adds d_hgates @ W_hh). */                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd(                                                    \
      const at::Tensor& dhy, const at::Tensor& hx, const at::Tensor& workspace);                                  \
  /* Elman RNN. igates, hgates: (N, H); b_ih, b_hh: (H,); nonlinearity "tanh" or "relu". Returns hy (N, H). */    \
  at::Tensor rnn_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates,                                     \
                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,           \
                          const std::string& nonlinearity);                                                       \
  /* dhy, hy: (N, H). Returns d(pre-activation) (N, H). */                                                        \
  at::Tensor rnn_cell_bwd(const at::Tensor& dhy, const at::Tensor& hy, const std::string& nonlinearity);          \
  /* A step's gate GEMM: x (N, K), w (G*H, K). Returns x w^T (N, G*H). */                                         \
  at::Tensor gates_mm(const at::Tensor& x, const at::Tensor& w);

namespace cpu { FASTSEQ_RNN_CELL_DECLS }
#ifdef WITH_CUDA
namespace cuda { FASTSEQ_RNN_CELL_DECLS }
#endif
#undef FASTSEQ_RNN_CELL_DECLS
}  // namespace fastseq
