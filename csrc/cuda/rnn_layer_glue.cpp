// Recurrent layers on CUDA, tensor level: one direction of one layer over a whole sequence (LSTM with optional
// projection, GRU, Elman RNN), forward and backward, with the time loop on the host (the contract of
// csrc/rnn_layer.h). Everything runs on the current stream.
// Forward: x W_ih^T of every step in one GEMM; per step h W_hh^T (an ATen GEMM into a step buffer) and the cell
// kernel of rnn_cell.cuh, which reads its rows from the sequence buffers and writes h, c and the activated gates of
// the step straight into them; with a projection the step ends with h = (o * tanh(c)) W_hr^T.
// Backward: per step in reverse, dh += dy, the pointwise backward kernel writes the step's d(pre-activation gates)
// into a (rows, G*H) buffer of all steps, dh = dgates W_hh; then dx, dW_ih, dW_hh, the bias gradients and dW_hr are a
// few GEMMs over all steps. Packed sequences run each step on its active rows only.
// The cell kernels take __restrict__ pointers, so none runs in place: x W_ih^T has a buffer of its own, and the
// backward's dc (LSTM) and dh (GRU) states, which the kernels read and update, alternate between two buffers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../rnn_layer.h"
#include "../rnn_schedule.h"
#include "rnn_cell.cuh"

namespace fastseq {
namespace cuda {
namespace {

enum class Mode { kLstm, kGru, kRnnTanh, kRnnRelu };

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

Mode parse_mode(const char* fn, const std::string& mode) {
  TORCH_CHECK(mode == "lstm" || mode == "gru" || mode == "rnn_tanh" || mode == "rnn_relu", fn,
              ": expected mode 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '", mode, "'");
  return mode == "lstm" ? Mode::kLstm : mode == "gru" ? Mode::kGru : mode == "rnn_tanh" ? Mode::kRnnTanh
                                                                                         : Mode::kRnnRelu;
}

int64_t gate_count(Mode mode) { return mode == Mode::kLstm ? 4 : mode == Mode::kGru ? 3 : 1; }

CellDtype cell_dtype(const char* fn, const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.is_cuda(), fn, ": expected x to be a CUDA tensor");
  switch (x.scalar_type()) {
    case at::kFloat:
      return CellDtype::kFloat32;
    case at::kHalf:
      return CellDtype::kFloat16;
    case at::kBFloat16:
      return CellDtype::kBFloat16;
    default:
      TORCH_CHECK(false, fn, ": expected x of dtype Float, Half or BFloat16, got ", x.scalar_type());
  }
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), fn, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), fn, ": expected ", name, " on ", x.device(), ", got device ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": expected ", name, " of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, fn, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
}

void check_optional(const char* fn, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x,
                    at::IntArrayRef shape) {
  if (present(t)) check_tensor(fn, name, *t, x, shape);
}

at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

// Address of row r of a contiguous 2-D tensor; null for an undefined one (an absent bias).
void* row(const at::Tensor& t, int64_t r) {
  if (!t.defined()) return nullptr;
  return static_cast<char*>(t.data_ptr()) + r * t.stride(0) * static_cast<int64_t>(t.element_size());
}

// out = a @ b into a view of a preallocated buffer.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

void check_launch(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, "fastseq ", fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The validated, contiguous operands of one layer direction.
struct Layer {
  Mode mode;
  CellDtype dtype;
  int64_t G, H, Hout, C, N;
  bool proj;
  at::Tensor x2d, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh;

  Layer(const char* fn, const std::string& mode_name, const at::Tensor& x, const at::Tensor& h0_,
        const std::optional<at::Tensor>& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
        const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
        const std::optional<at::Tensor>& w_hr_, bool packed)
      : mode(parse_mode(fn, mode_name)), dtype(cell_dtype(fn, x)), G(gate_count(mode)), proj(present(w_hr_)) {
    TORCH_CHECK(x.dim() == (packed ? 2 : 3), fn, ": expected x of ", packed ? "2 dims (sum(batch_sizes), C)" :
                "3 dims (T, N, C)", ", got shape ", x.sizes());
    TORCH_CHECK(w_ih_.defined() && w_ih_.dim() == 2 && w_ih_.size(0) % G == 0, fn, ": expected w_ih of shape (",
                G, "*H, C), got ", w_ih_.defined() ? w_ih_.sizes() : at::IntArrayRef{});
    H = w_ih_.size(0) / G;
    C = w_ih_.size(1);
    check_tensor(fn, "w_ih", w_ih_, x, {G * H, C});
    TORCH_CHECK(x.size(-1) == C, fn, ": expected x with ", C, " features (w_ih's input size), got shape ", x.sizes());
    TORCH_CHECK(!proj || mode == Mode::kLstm, fn, ": w_hr (projection) is only supported for mode 'lstm'");
    Hout = proj ? w_hr_->size(0) : H;
    if (proj) check_tensor(fn, "w_hr", *w_hr_, x, {Hout, H});
    check_tensor(fn, "w_hh", w_hh_, x, {G * H, Hout});
    check_optional(fn, "b_ih", b_ih_, x, {G * H});
    check_optional(fn, "b_hh", b_hh_, x, {G * H});
    TORCH_CHECK(h0_.defined() && h0_.dim() == 2, fn, ": expected h0 of shape (N, ", Hout, "), got ",
                h0_.defined() ? h0_.sizes() : at::IntArrayRef{});
    N = packed ? h0_.size(0) : x.size(1);  // packed: batch_sizes[0] is checked against it
    check_tensor(fn, "h0", h0_, x, {N, Hout});
    if (mode == Mode::kLstm) {
      TORCH_CHECK(present(c0_), fn, ": expected c0 for mode 'lstm', got none");
      check_tensor(fn, "c0", *c0_, x, {N, H});
      c0 = c0_->contiguous();
    } else {
      TORCH_CHECK(!present(c0_), fn, ": expected no c0 for mode '", mode_name, "'");
    }
    x2d = x.contiguous().view({packed ? x.size(0) : x.size(0) * x.size(1), C});
    h0 = h0_.contiguous();
    w_ih = w_ih_.contiguous();
    w_hh = w_hh_.contiguous();
    w_hr = contiguous_or_none(w_hr_);
    b_ih = contiguous_or_none(b_ih_);
    b_hh = contiguous_or_none(b_hh_);
  }

  CellActivation activation() const { return mode == Mode::kRnnRelu ? CellActivation::kRelu : CellActivation::kTanh; }
};

// The backward's dc (LSTM) and dh (GRU) states alternate between two buffers: step k reads `in` and writes `out`.
// Rows [np, n) of step k started from the initial state, so their gradient in `out` is final (rows of dc0 / dh0);
// the steps still to run write rows below np only, into either buffer, so the rows are copied into `in` as well.
void keep_final_rows(const at::Tensor& in, const at::Tensor& out, int64_t k, int64_t np, int64_t n) {
  if (k > 0 && n > np) in.narrow(0, np, n - np).copy_(out.narrow(0, np, n - np));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_fwd(
    const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr, bool reverse,
    const std::optional<at::Tensor>& batch_sizes) {
  constexpr const char* fn = "rnn_layer_fwd";
  const Layer L(fn, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, present(batch_sizes));
  const Schedule S(fn, x, L.N, batch_sizes, reverse);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t H = L.H, Hout = L.Hout, GH = L.G * L.H;
  const bool lstm = L.mode == Mode::kLstm, gru = L.mode == Mode::kGru;
  const auto opts = L.x2d.options();

  // Sequence buffers, (S.total, .): y = h of every step (projected for LSTM with w_hr); c of every step (LSTM);
  // o * tanh(c) before the projection; the activated gates (LSTM [i, f, g, o], GRU [r, z, n, hn]).
  at::Tensor y = at::empty({S.total, Hout}, opts);
  at::Tensor c_all = lstm ? at::empty({S.total, H}, opts) : at::Tensor();
  at::Tensor h_raw = L.proj ? at::empty({S.total, H}, opts) : at::Tensor();
  at::Tensor gates = lstm || gru ? at::empty({S.total, 4 * H}, opts) : at::Tensor();
  const at::Tensor gi = at::mm(L.x2d, L.w_ih.t());  // x W_ih^T of every step
  at::Tensor hg = at::empty({L.N, GH}, opts);        // h W_hh^T of the current step
  at::Tensor h_n = L.h0.clone();
  at::Tensor c_n = lstm ? L.c0.clone() : at::Tensor();
  const at::Tensor w_hh_t = L.w_hh.t(), w_hr_t = L.proj ? L.w_hr.t() : at::Tensor();
  const at::Tensor& h_cell = L.proj ? h_raw : y;  // where the cell writes its h
  const void* b_ih_p = row(L.b_ih, 0);
  const void* b_hh_p = row(L.b_hh, 0);

  for (int64_t k = 0; k < S.T; ++k) {
    const int64_t n = S.rows[k], np = S.prev[k], off = S.off[k], off_prev = k > 0 ? S.off[k - 1] : 0;
    if (np > 0) mm_into(hg.narrow(0, 0, np), y.narrow(0, off_prev, np), w_hh_t);
    if (n > np) mm_into(hg.narrow(0, np, n - np), L.h0.narrow(0, np, n - np), w_hh_t);
    if (lstm) {
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        const void* cx = continues ? row(c_all, off_prev + lo) : row(L.c0, lo);
        check_launch(launch_lstm_cell_fwd(L.dtype, hi - lo, H, row(gi, off + lo), row(hg, lo), cx, b_ih_p, b_hh_p,
                                          nullptr, row(h_cell, off + lo), row(c_all, off + lo),
                                          row(gates, off + lo), stream),
                     fn);
      });
      if (L.proj) mm_into(y.narrow(0, off, n), h_raw.narrow(0, off, n), w_hr_t);
    } else if (gru) {
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        const void* hx = continues ? row(y, off_prev + lo) : row(L.h0, lo);
        check_launch(launch_gru_cell_fwd(L.dtype, hi - lo, H, row(gi, off + lo), row(hg, lo), hx, b_ih_p, b_hh_p,
                                         row(y, off + lo), row(gates, off + lo), stream),
                     fn);
      });
    } else {
      check_launch(launch_rnn_cell_fwd(L.dtype, L.activation(), n, H, row(gi, off), row(hg, 0), b_ih_p, b_hh_p,
                                       row(y, off), stream),
                   fn);
    }
    const int64_t d = S.done[k];  // rows [d, n) end here
    if (n > d) {
      h_n.narrow(0, d, n - d).copy_(y.narrow(0, off + d, n - d));
      if (lstm) c_n.narrow(0, d, n - d).copy_(c_all.narrow(0, off + d, n - d));
    }
  }

  // saved: [h of every step (a copy: y is returned to the caller), gates (LSTM, GRU), c (LSTM), o*tanh(c) (w_hr)]
  std::vector<at::Tensor> saved{y.clone()};
  if (lstm || gru) saved.push_back(gates);
  if (lstm) saved.push_back(c_all);
  if (L.proj) saved.push_back(h_raw);
  if (!S.packed) y.resize_({S.T, L.N, Hout});  // (T, N, Hout) in place: a view would refuse in-place use of y
  return {y, h_n, c_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_bwd(
    const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const std::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, const std::optional<at::Tensor>& batch_sizes,
    const std::vector<at::Tensor>& saved) {
  constexpr const char* fn = "rnn_layer_bwd";
  const Layer L(fn, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, present(batch_sizes));
  const Schedule S(fn, x, L.N, batch_sizes, reverse);
  const int64_t H = L.H, Hout = L.Hout, GH = L.G * L.H, N = L.N;
  const bool lstm = L.mode == Mode::kLstm, gru = L.mode == Mode::kGru;
  const auto opts = L.x2d.options();

  if (S.packed) {
    check_tensor(fn, "dy", dy, x, {S.total, Hout});
  } else {
    check_tensor(fn, "dy", dy, x, {S.T, N, Hout});
  }
  check_tensor(fn, "dh_n", dh_n, x, {N, Hout});
  if (lstm) {
    check_optional(fn, "dc_n", dc_n, x, {N, H});
  } else {
    TORCH_CHECK(!present(dc_n), fn, ": expected no dc_n for mode '", mode, "'");
  }
  const size_t n_saved = 1 + (lstm || gru) + lstm + L.proj;
  TORCH_CHECK(saved.size() == n_saved, fn, ": expected ", n_saved, " saved tensors (rnn_layer_fwd's), got ",
              saved.size());
  check_tensor(fn, "saved[0] (h)", saved[0], x, {S.total, Hout});
  if (lstm || gru) check_tensor(fn, "saved[1] (gates)", saved[1], x, {S.total, 4 * H});
  if (lstm) check_tensor(fn, "saved[2] (c)", saved[2], x, {S.total, H});
  if (L.proj) check_tensor(fn, "saved[3] (o*tanh(c))", saved[3], x, {S.total, H});
  const at::Tensor h_seq = saved[0].contiguous();
  const at::Tensor ws = lstm || gru ? saved[1].contiguous() : at::Tensor();
  const at::Tensor c_all = lstm ? saved[2].contiguous() : at::Tensor();
  const at::Tensor h_raw = L.proj ? saved[3].contiguous() : at::Tensor();

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor dy2d = dy.contiguous().view({S.total, Hout});
  // dh_state / dc_state rows [0, n) hold the gradient flowing into h / c of the current step from later steps (and
  // dh_n / dc_n for rows that end there); once every step has run they hold dh0 / dc0. dh_next / dc_next: the other
  // buffer of the GRU's dh and the LSTM's dc (see keep_final_rows).
  at::Tensor dh_state = dh_n.contiguous().clone();
  at::Tensor dh_next = gru ? dh_state.clone() : at::Tensor();
  at::Tensor dc_state = lstm ? (present(dc_n) ? dc_n->contiguous().clone() : at::zeros({N, H}, opts)) : at::Tensor();
  at::Tensor dc_next = lstm ? dc_state.clone() : at::Tensor();
  // d(pre-activation gates) of every step; GRU's differ between the input and the recurrent side (n gate).
  at::Tensor dgi = at::empty({S.total, GH}, opts);
  at::Tensor dgh = gru ? at::empty({S.total, GH}, opts) : dgi;
  // With a projection: dh of every step (for dW_hr) and d(o * tanh(c)) of the current step.
  at::Tensor dh_all = L.proj ? at::empty({S.total, Hout}, opts) : at::Tensor();
  at::Tensor dh_raw = L.proj ? at::empty({N, H}, opts) : at::Tensor();

  for (int64_t k = S.T - 1; k >= 0; --k) {
    const int64_t n = S.rows[k], np = S.prev[k], off = S.off[k], off_prev = k > 0 ? S.off[k - 1] : 0;
    if (L.proj) {
      at::Tensor dh = dh_all.narrow(0, off, n);
      at::add_out(dh, dh_state.narrow(0, 0, n), dy2d.narrow(0, off, n));
      mm_into(dh_raw.narrow(0, 0, n), dh, L.w_hr);
    } else {
      dh_state.narrow(0, 0, n).add_(dy2d.narrow(0, off, n));
    }
    if (lstm) {
      const at::Tensor& dhy = L.proj ? dh_raw : dh_state;  // d(o * tanh(c))
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        const void* cx = continues ? row(c_all, off_prev + lo) : row(L.c0, lo);
        check_launch(launch_lstm_cell_bwd(L.dtype, hi - lo, H, row(dhy, lo), row(dc_state, lo), cx,
                                          row(c_all, off + lo), row(ws, off + lo), nullptr, row(dgi, off + lo),
                                          row(dc_next, lo), nullptr, nullptr, stream),
                     fn);
      });
      keep_final_rows(dc_state, dc_next, k, np, n);
      std::swap(dc_state, dc_next);
      mm_into(dh_state.narrow(0, 0, n), dgi.narrow(0, off, n), L.w_hh);
    } else if (gru) {
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        const void* hx = continues ? row(h_seq, off_prev + lo) : row(L.h0, lo);
        // the direct term d h_{t-1} = d h_t * z into dh_next
        check_launch(launch_gru_cell_bwd(L.dtype, hi - lo, H, row(dh_state, lo), hx, row(ws, off + lo),
                                         row(dgi, off + lo), row(dgh, off + lo), row(dh_next, lo), stream),
                     fn);
      });
      dh_next.narrow(0, 0, n).addmm_(dgh.narrow(0, off, n), L.w_hh);
      keep_final_rows(dh_state, dh_next, k, np, n);
      std::swap(dh_state, dh_next);
    } else {
      check_launch(launch_rnn_cell_bwd(L.dtype, L.activation(), n, H, row(dh_state, 0), row(h_seq, off),
                                       row(dgi, off), stream),
                   fn);
      mm_into(dh_state.narrow(0, 0, n), dgi.narrow(0, off, n), L.w_hh);
    }
  }

  // dW_hh = sum over steps of dgates_hh^T h_prev. With every step on all N rows, h_prev of the steps after the
  // first is h of the sequence shifted by one step: two GEMMs. Otherwise h_prev is gathered (one index_select from
  // h of every step and h0, by an index built here) for one GEMM.
  at::Tensor dw_hh;
  if (S.T == 0) {
    dw_hh = at::zeros({GH, Hout}, opts);
  } else if (S.uniform) {
    const int64_t first = S.off[0], rest = S.total - N;
    dw_hh = at::mm(dgh.narrow(0, first, N).t(), L.h0);
    if (rest > 0) {
      dw_hh.addmm_(dgh.narrow(0, reverse ? 0 : N, rest).t(), h_seq.narrow(0, reverse ? N : 0, rest));
    }
  } else {
    std::vector<int64_t> index(S.total);  // row of each row's h_prev in cat({h_seq, h0})
    for (int64_t k = 0; k < S.T; ++k) {
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        const int64_t start = continues ? S.off[k - 1] : S.total;
        for (int64_t r = lo; r < hi; ++r) index[S.off[k] + r] = start + r;
      });
    }
    const at::Tensor idx = at::tensor(index, at::TensorOptions().dtype(at::kLong)).to(x.device());
    dw_hh = at::mm(dgh.t(), at::cat({h_seq, L.h0}).index_select(0, idx));
  }
  at::Tensor dx = at::mm(dgi, L.w_ih).view(x.sizes());
  at::Tensor dw_ih = at::mm(dgi.t(), L.x2d);
  at::Tensor db_ih = L.b_ih.defined() ? dgi.sum(0) : at::Tensor();
  at::Tensor db_hh;
  if (L.b_hh.defined()) db_hh = gru ? dgh.sum(0) : (db_ih.defined() ? db_ih.clone() : dgi.sum(0));
  at::Tensor dw_hr = L.proj ? at::mm(dh_all.t(), h_raw) : at::Tensor();
  at::Tensor dc0 = lstm ? dc_state : at::Tensor();
  return {dx, dh_state, dc0, {dw_ih, dw_hh, db_ih, db_hh, dw_hr}};
}

}  // namespace cuda
}  // namespace fastseq
