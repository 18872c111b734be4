// Recurrent layers: one direction of one layer over a whole sequence. The time loop is written once
// (csrc/rnn_layer.cpp, tensor level, ATen GEMMs on either device) and calls a backend's step kernels through
// CellSteps: the C++ CPU row kernels (csrc/cpu/rnn_layer.cpp), the CUDA cell kernels (csrc/cuda/rnn_layer_glue.cpp)
// or the Triton cell kernels (fastseq/kernels/rnn_layer.py, through a Python adapter in bindings.cpp).
// Forward: x W_ih^T of every step in one GEMM; per step h W_hh^T (CellSteps::recurrent_fwd) and the step's cell
// kernel (CellSteps::forward), which reads its rows from the sequence buffers and writes h, c and the activated
// gates straight into them; with a projection the step ends with h = (o * tanh(c)) W_hr^T. Backward: per step in
// reverse dh += dy, the cell's backward writes the step's d(pre-activation gates) into a (rows, G*H) buffer of all
// steps, dh = dgates W_hh (CellSteps::recurrent_bwd); then dx, dW_ih, dW_hh, the biases, dW_hr and the peephole
// gradient are GEMMs and sums over all steps. A backend may run the whole loop in one call instead
// (CellSteps::forward_sequence / backward_sequence: the CPU's few-row path), on the same buffers.
// Layout: x (T, N, C) time-major, or packed: x (sum(batch_sizes), C) with batch_sizes (T,) int64 on the CPU,
// non-increasing (torch.nn.utils.rnn.PackedSequence's layout); each step then runs on its active rows only.
// mode: a name of csrc/rnn_modes.h. reverse: run from the last step to the first (the backward direction of a
// bidirectional layer). w_hr: (P, H) projection (proj_size = P) or none: then h has size P. peephole: (3, H) for
// mode peephole_lstm.
#pragma once
#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rnn_modes.h"
#include "rnn_schedule.h"

namespace fastseq {

// The validated, contiguous operands of one layer direction, on x's device and of x's dtype (each backend's
// steps check that they support it). G gates of H hidden units; h has Hout = P (projection) or H units.
struct Layer {
  const ModeInfo* info;
  int64_t G, H, Hout, C, N;
  bool proj;
  at::Tensor x2d, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, peephole;  // undefined where absent

  Layer(const char* fn, const std::string& mode, const at::Tensor& x, const at::Tensor& h0,
        const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
        const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
        const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& peephole, bool packed);
  Mode mode() const { return info->mode; }
  bool lstm() const { return info->cell; }  // lstm, peephole_lstm
  bool gru() const { return info->mode == Mode::kGru; }
  int64_t saved_width() const { return info->saved * H; }  // activated gates per row (0: none)
};

// Rows [first, first + n) of a 2-D row-major buffer (unit column stride, row stride t->stride(0)): an operand of
// a step kernel. t null: the operand is absent.
struct Rows {
  const at::Tensor* t = nullptr;
  int64_t first = 0;

  explicit operator bool() const { return t != nullptr; }
  void* addr() const {
    return static_cast<char*>(t->data_ptr()) + first * t->stride(0) * static_cast<int64_t>(t->element_size());
  }
  template <typename T>
  T* at() const { return static_cast<T*>(addr()); }
  int64_t stride() const { return t->stride(0); }
  at::Tensor view(int64_t n) const { return t->narrow(0, first, n); }
};

// The forward of rows [lo, hi) of one step whose previous state comes from one place (a segment of the schedule:
// the previous step, or h0 / c0); n = hi - lo rows.
struct StepFwd {
  int64_t n;
  Rows gi;      // (n, G*H) x W_ih^T in; run in place, it is the first G*H columns of `gates` (lstm, gru) or `h` (rnn)
  Rows hg;      // (n, G*H) h W_hh^T in
  Rows h_prev;  // (n, H) the previous h (gru)
  Rows c_prev;  // (n, H) the previous c (lstm)
  Rows h;       // (n, H) out: h (lstm with projection: o * tanh(c))
  Rows c;       // (n, H) out: c (lstm)
  Rows gates;   // (n, saved_width) out: the activated gates (lstm, gru)
};

// The backward of rows [lo, hi) of one step (a segment, as StepFwd).
struct StepBwd {
  int64_t n;
  Rows dh;      // (n, H) d h_t in (lstm: d(o * tanh(c)))
  Rows dh_out;  // (n, H) gru: out, the direct term d h_{t-1} = d h_t * z (dh itself when run in place)
  Rows dc;      // (n, H) lstm: d c_t in
  Rows dc_out;  // (n, H) lstm: d c_{t-1} out (dc itself when run in place)
  Rows h_prev;  // (n, H) gru: the previous h
  Rows c_prev;  // (n, H) lstm: the previous c
  Rows h;       // (n, H) rnn: h of the step
  Rows c;       // (n, H) lstm: c of the step
  Rows gates;   // (n, saved_width) lstm, gru: the saved activated gates
  Rows dgi;     // (n, G*H) out: d(pre-activation gates), the input side
  Rows dgh;     // (n, G*H) gru: out, the recurrent side (dgi itself otherwise)
};

struct ForwardLoop;
struct BackwardLoop;

// A backend's step kernels for one layer direction (one call of rnn_layer_fwd or rnn_layer_bwd).
class CellSteps {
 public:
  explicit CellSteps(const Layer& layer) : L(layer) {}
  virtual ~CellSteps() = default;
  // Whether the cell kernels run in place: gi over the gates (h) it becomes, dc_out over dc, dh_out over dh.
  virtual bool in_place() const = 0;
  // A sequence buffer on the layer's device (the CPU's keeps large blocks for reuse).
  virtual at::Tensor empty(at::IntArrayRef sizes) const { return at::empty(sizes, L.x2d.options()); }
  virtual void forward(const StepFwd& s) = 0;
  virtual void backward(const StepBwd& s) = 0;
  // out (rows, G*H) = x2d W_ih^T, the input projection of every step; out (n, G*H) = h (n, Hout) W_hh^T;
  // out (n, Hout) = (or +=, accumulate) dg (n, G*H) W_hh. ATen GEMMs here.
  virtual void input_projection(const at::Tensor& out);
  virtual void recurrent_fwd(const at::Tensor& out, const at::Tensor& h);
  virtual void recurrent_bwd(const at::Tensor& out, const at::Tensor& dg, bool accumulate);
  // The whole time loop in one call over the loop's buffers, where the backend has one for this layer; false: the
  // loop runs step by step.
  virtual bool forward_sequence(const ForwardLoop&) { return false; }
  virtual bool backward_sequence(const BackwardLoop&) { return false; }

 protected:
  const Layer& L;
};

// The forward's buffers (rows = S.total): y (rows, Hout) h of every step; c_seq (rows, H) c of every step (lstm);
// h_raw (rows, H) o * tanh(c) before the projection; gates (rows, saved_width) the activated gates; gi x W_ih^T
// (gates, y or a buffer of its own); hg (N, G*H) h W_hh^T of the current step.
struct ForwardLoop {
  const Layer& L;
  const Schedule& S;
  at::Tensor y, c_seq, h_raw, gates, gi, hg;
  // Step k, rows [lo, hi): continues = from step k-1, else from h0 / c0.
  StepFwd segment(int64_t k, int64_t lo, int64_t hi, bool continues) const;
  const at::Tensor& h_cell() const { return L.proj ? h_raw : y; }  // where the cell writes its h
};

// The backward's buffers: dy (rows, Hout); dh (N, Hout) d h of the current step (once every step has run, dh0);
// dh_raw (N, H) d(o * tanh(c)) of the current step (projection); dc (N, H) (lstm; dc0 at the end); the saved
// h_seq, gates, c_seq, h_raw of the forward; dgi, dgh (rows, G*H) the gate gradients of every step.
struct BackwardLoop {
  const Layer& L;
  const Schedule& S;
  at::Tensor dy, dh, dh_raw, dc, h_seq, gates, c_seq, h_raw, dgi, dgh;
  // Step k, rows [lo, hi), run in place (dh_out = dh, dc_out = dc).
  StepBwd segment(int64_t k, int64_t lo, int64_t hi, bool continues) const;
};

// Gives a backend's steps for the layer of a call.
using StepsFactory = std::function<std::unique_ptr<CellSteps>(const Layer&)>;

/* h0: (N, Hout); c0: (N, H) for lstm modes (none otherwise); w_ih (G*H, C), w_hh (G*H, Hout). Returns y (T, N, Hout)
   (or (sum(batch_sizes), Hout) packed), h_n (N, Hout), c_n (N, H) (undefined unless lstm), and `saved`: the four
   tensors rnn_layer_bwd needs, [h of every step (rows, Hout), the activated gates (rows, saved_width) (lstm, gru),
   c of every step (rows, H) (lstm), o * tanh(c) (rows, H) (with w_hr)], undefined where absent, with rows = T*N or
   sum(batch_sizes); pass them back (the absent ones as anything: they are not read). Without need_saved (a forward
   that no backward follows) `saved` is four undefined tensors and the copy of h it would hold is not made. */
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_fwd(
    const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& peephole, bool reverse, const std::optional<at::Tensor>& batch_sizes,
    const StepsFactory& make_steps, bool need_saved = true);
/* dy like y; dh_n like h_n; dc_n like c_n (lstm) or none (zeros). Returns dx, dh0, dc0 (undefined unless lstm) and
   the weight gradients {dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeephole} (undefined where absent). */
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_bwd(
    const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const std::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& peephole, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::vector<at::Tensor>& saved,
    const StepsFactory& make_steps);

// The step kernels of each device. CPU: float32, float64, bfloat16 (csrc/cpu/rnn_layer.cpp).
namespace cpu {
std::unique_ptr<CellSteps> layer_steps(const Layer& layer);
}
#ifdef WITH_CUDA
// CUDA: float32, float16, bfloat16 (csrc/cuda/rnn_layer_glue.cpp: the cell kernels of csrc/cuda/rnn_cell.cuh on the
// current stream).
namespace cuda {
std::unique_ptr<CellSteps> layer_steps(const Layer& layer);
}
#endif
}  // namespace fastseq
