// The time loop of a recurrent layer, written once for every backend (the contract of csrc/rnn_layer.h): the
// schedule of (packed) steps, the buffers, the GEMMs and the sums over all steps; the per-step cell kernels, the
// recurrent GEMMs' implementation and where buffers live are the backend's CellSteps. Tensor level only: ATen runs
// the GEMMs on whichever device the tensors are on.
#include "rnn_layer.h"

#include <algorithm>
#include <utility>

namespace fastseq {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

// t is a tensor on x's device, of x's dtype and of `shape`.
void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape) {
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

// out = a @ b into a view of a preallocated buffer.
void mm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor o = out;
  at::mm_out(o, a, b);
}

// The state gradients of the backward alternate between two buffers when the steps do not run in place: step k
// reads `in` and writes `out`. Rows [np, n) of step k started from the initial state, so their gradient in `out` is
// final (rows of dh0 / dc0); the steps still to run write rows below np only, into either buffer, so the rows are
// copied into `in` as well.
void keep_final_rows(const at::Tensor& in, const at::Tensor& out, int64_t k, int64_t np, int64_t n) {
  if (k > 0 && n > np) in.narrow(0, np, n - np).copy_(out.narrow(0, np, n - np));
}

// The row of every row's previous state in cat({states of every step, initial state}): the previous step's row, or
// the initial state's. Used to gather h_prev (dW_hh) and c_prev (the peephole gradient) for all steps at once.
at::Tensor previous_rows(const Schedule& S, const at::Device& device) {
  std::vector<int64_t> index(S.total);
  for (int64_t k = 0; k < S.T; ++k) {
    S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
      const int64_t start = continues ? S.off[k - 1] : S.total;
      for (int64_t r = lo; r < hi; ++r) index[S.off[k] + r] = start + r;
    });
  }
  return at::tensor(index, at::TensorOptions().dtype(at::kLong)).to(device);
}

// The previous state of every row (rows, width): from `seq` (the states of every step) and `initial` (N, width).
// Unpacked, it is the initial state then the sequence shifted by a step (in the order of time); packed, a gather.
at::Tensor previous_states(const Schedule& S, const at::Tensor& seq, const at::Tensor& initial, bool reverse) {
  if (!S.uniform) return at::cat({seq, initial}).index_select(0, previous_rows(S, seq.device()));
  const int64_t rest = S.total - S.N;
  if (rest == 0) return initial.clone();
  return reverse ? at::cat({seq.narrow(0, S.N, rest), initial}) : at::cat({initial, seq.narrow(0, 0, rest)});
}

}  // namespace

Layer::Layer(const char* fn, const std::string& mode, const at::Tensor& x, const at::Tensor& h0_,
             const std::optional<at::Tensor>& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
             const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
             const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& peephole_, bool packed)
    : info(&mode_info(fn, mode)), G(info->gates), proj(present(w_hr_)) {
  TORCH_CHECK(x.defined(), fn, ": expected x to be a tensor");
  TORCH_CHECK(x.dim() == (packed ? 2 : 3), fn, ": expected x of ",
              packed ? "2 dims (sum(batch_sizes), C)" : "3 dims (T, N, C)", ", got shape ", x.sizes());
  TORCH_CHECK(w_ih_.defined() && w_ih_.dim() == 2 && w_ih_.size(0) % G == 0, fn, ": expected w_ih of shape (", G,
              "*H, C), got ", w_ih_.defined() ? w_ih_.sizes() : at::IntArrayRef{});
  H = w_ih_.size(0) / G;
  C = w_ih_.size(1);
  check_tensor(fn, "w_ih", w_ih_, x, {G * H, C});
  TORCH_CHECK(x.size(-1) == C, fn, ": expected x with ", C, " features (w_ih's input size), got shape ", x.sizes());
  TORCH_CHECK(!proj || info->projection, fn, ": w_hr (projection) is not supported for mode '", mode, "'");
  Hout = proj ? w_hr_->size(0) : H;
  if (proj) check_tensor(fn, "w_hr", *w_hr_, x, {Hout, H});
  check_tensor(fn, "w_hh", w_hh_, x, {G * H, Hout});
  check_optional(fn, "b_ih", b_ih_, x, {G * H});
  check_optional(fn, "b_hh", b_hh_, x, {G * H});
  TORCH_CHECK(h0_.defined() && h0_.dim() == 2, fn, ": expected h0 of shape (N, ", Hout, "), got ",
              h0_.defined() ? h0_.sizes() : at::IntArrayRef{});
  N = packed ? h0_.size(0) : x.size(1);  // packed: batch_sizes[0] is checked against it
  check_tensor(fn, "h0", h0_, x, {N, Hout});
  if (info->cell) {
    TORCH_CHECK(present(c0_), fn, ": expected c0 for mode '", mode, "', got none");
    check_tensor(fn, "c0", *c0_, x, {N, H});
    c0 = c0_->contiguous();
  } else {
    TORCH_CHECK(!present(c0_), fn, ": expected no c0 for mode '", mode, "'");
  }
  if (info->peephole) {
    TORCH_CHECK(present(peephole_), fn, ": expected peephole for mode '", mode, "', got none");
    check_tensor(fn, "peephole", *peephole_, x, {3, H});
    peephole = peephole_->contiguous();
  } else {
    TORCH_CHECK(!present(peephole_), fn, ": expected no peephole for mode '", mode, "'");
  }
  x2d = x.contiguous().view({packed ? x.size(0) : x.size(0) * x.size(1), C});
  h0 = h0_.contiguous();
  w_ih = w_ih_.contiguous();
  w_hh = w_hh_.contiguous();
  w_hr = contiguous_or_none(w_hr_);
  b_ih = contiguous_or_none(b_ih_);
  b_hh = contiguous_or_none(b_hh_);
}

void CellSteps::input_projection(const at::Tensor& out) { mm_into(out, L.x2d, L.w_ih.t()); }
void CellSteps::recurrent_fwd(const at::Tensor& out, const at::Tensor& h) { mm_into(out, h, L.w_hh.t()); }

void CellSteps::recurrent_bwd(const at::Tensor& out, const at::Tensor& dg, bool accumulate) {
  if (accumulate) {
    out.addmm_(dg, L.w_hh);
  } else {
    mm_into(out, dg, L.w_hh);
  }
}

StepFwd ForwardLoop::segment(int64_t k, int64_t lo, int64_t hi, bool continues) const {
  const int64_t row = S.off[k] + lo, prev = k > 0 ? S.off[k - 1] + lo : 0;
  StepFwd s{hi - lo};
  s.gi = {&gi, row};
  s.hg = {&hg, lo};
  s.h = {&h_cell(), row};
  if (L.lstm()) {
    s.c_prev = continues ? Rows{&c_seq, prev} : Rows{&L.c0, lo};
    s.c = {&c_seq, row};
  }
  if (L.gru()) s.h_prev = continues ? Rows{&y, prev} : Rows{&L.h0, lo};
  if (gates.defined()) s.gates = {&gates, row};
  return s;
}

StepBwd BackwardLoop::segment(int64_t k, int64_t lo, int64_t hi, bool continues) const {
  const int64_t row = S.off[k] + lo, prev = k > 0 ? S.off[k - 1] + lo : 0;
  StepBwd s{hi - lo};
  s.dh = {L.proj ? &dh_raw : &dh, lo};
  s.dgi = {&dgi, row};
  s.dgh = {&dgh, row};
  if (gates.defined()) s.gates = {&gates, row};
  if (L.lstm()) {
    s.dc = s.dc_out = {&dc, lo};
    s.c_prev = continues ? Rows{&c_seq, prev} : Rows{&L.c0, lo};
    s.c = {&c_seq, row};
  } else if (L.gru()) {
    s.dh_out = {&dh, lo};
    s.h_prev = continues ? Rows{&h_seq, prev} : Rows{&L.h0, lo};
  } else {
    s.h = {&h_seq, row};
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_fwd(
    const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& peephole, bool reverse, const std::optional<at::Tensor>& batch_sizes,
    const StepsFactory& make_steps, bool need_saved) {
  constexpr const char* fn = "rnn_layer_fwd";
  const Layer L(fn, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, present(batch_sizes));
  const Schedule S(fn, x, L.N, batch_sizes, reverse);
  const std::unique_ptr<CellSteps> steps = make_steps(L);
  const int64_t H = L.H, GH = L.G * L.H, width = L.saved_width();

  ForwardLoop F{L, S};
  F.y = steps->empty({S.total, L.Hout});
  if (L.lstm()) F.c_seq = steps->empty({S.total, H});
  if (L.proj) F.h_raw = steps->empty({S.total, H});
  if (width > 0) F.gates = steps->empty({S.total, width});
  // x W_ih^T of every step; run in place, the cell kernels overwrite it with the gates (or h) it becomes
  if (!steps->in_place()) {
    F.gi = steps->empty({S.total, GH});
  } else {
    F.gi = width > 0 ? F.gates.narrow(1, 0, GH) : F.y;
  }
  steps->input_projection(F.gi);
  F.hg = at::empty({L.N, GH}, L.x2d.options());
  at::Tensor h_n = L.h0.clone();
  at::Tensor c_n = L.lstm() ? L.c0.clone() : at::Tensor();
  // Rows that take their last step at step k leave their state in h_n, c_n.
  auto finish_rows = [&](int64_t k) {
    const int64_t n = S.rows[k], d = S.done[k];  // rows [d, n) end here
    if (n > d) {
      h_n.narrow(0, d, n - d).copy_(F.y.narrow(0, S.off[k] + d, n - d));
      if (L.lstm()) c_n.narrow(0, d, n - d).copy_(F.c_seq.narrow(0, S.off[k] + d, n - d));
    }
  };

  if (steps->forward_sequence(F)) {
    for (int64_t k = 0; k < S.T; ++k) finish_rows(k);
  } else {
    const at::Tensor w_hr_t = L.proj ? L.w_hr.t() : at::Tensor();
    for (int64_t k = 0; k < S.T; ++k) {
      const int64_t n = S.rows[k], np = S.prev[k], off = S.off[k];
      if (np > 0) steps->recurrent_fwd(F.hg.narrow(0, 0, np), F.y.narrow(0, S.off[k - 1], np));
      if (n > np) steps->recurrent_fwd(F.hg.narrow(0, np, n - np), L.h0.narrow(0, np, n - np));
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        steps->forward(F.segment(k, lo, hi, continues));
      });
      if (L.proj) mm_into(F.y.narrow(0, off, n), F.h_raw.narrow(0, off, n), w_hr_t);
      finish_rows(k);
    }
  }

  // saved: h of every step (a copy: y is returned to the caller), the gates, c, o*tanh(c) (undefined where absent)
  std::vector<at::Tensor> saved(4);
  if (need_saved) saved = {steps->empty({S.total, L.Hout}).copy_(F.y), F.gates, F.c_seq, F.h_raw};
  at::Tensor y = F.y;
  if (!S.packed) y.resize_({S.T, L.N, L.Hout});  // (T, N, Hout) in place: a view would refuse in-place use of y
  return {y, h_n, c_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_layer_bwd(
    const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n, const std::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& peephole, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::vector<at::Tensor>& saved,
    const StepsFactory& make_steps) {
  constexpr const char* fn = "rnn_layer_bwd";
  const Layer L(fn, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, present(batch_sizes));
  const Schedule S(fn, x, L.N, batch_sizes, reverse);
  const int64_t H = L.H, Hout = L.Hout, GH = L.G * L.H, N = L.N, width = L.saved_width();
  const bool lstm = L.lstm(), gru = L.gru();

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
  TORCH_CHECK(saved.size() == 4, fn, ": expected the 4 saved tensors of rnn_layer_fwd, got ", saved.size());
  auto take = [&](size_t i, const char* name, at::IntArrayRef shape) {
    check_tensor(fn, name, saved[i], x, shape);
    return saved[i].contiguous();
  };
  const std::unique_ptr<CellSteps> steps = make_steps(L);
  BackwardLoop B{L, S};
  B.h_seq = take(0, "saved h", {S.total, Hout});
  if (width > 0) B.gates = take(1, "saved gates", {S.total, width});
  if (lstm) B.c_seq = take(2, "saved c", {S.total, H});
  if (L.proj) B.h_raw = take(3, "saved o*tanh(c)", {S.total, H});
  B.dy = dy.contiguous().view({S.total, Hout});
  B.dh = dh_n.contiguous().clone();
  if (lstm) B.dc = present(dc_n) ? dc_n->contiguous().clone() : at::zeros({N, H}, L.x2d.options());
  B.dgi = steps->empty({S.total, GH});
  B.dgh = gru ? steps->empty({S.total, GH}) : B.dgi;
  // With a projection: dh of every step (for dW_hr) and d(o * tanh(c)) of the current step.
  const at::Tensor dh_all = L.proj ? steps->empty({S.total, Hout}) : at::Tensor();
  if (L.proj) B.dh_raw = at::empty({N, H}, L.x2d.options());

  if (!steps->backward_sequence(B)) {
    // Not in place, the state the cell kernels update (lstm: dc, gru: dh) alternates with `other`.
    const bool in_place = steps->in_place();
    at::Tensor other = in_place ? at::Tensor() : lstm ? B.dc.clone() : gru ? B.dh.clone() : at::Tensor();
    for (int64_t k = S.T - 1; k >= 0; --k) {
      const int64_t n = S.rows[k], np = S.prev[k], off = S.off[k];
      if (L.proj) {
        at::Tensor dh = dh_all.narrow(0, off, n);
        at::add_out(dh, B.dh.narrow(0, 0, n), B.dy.narrow(0, off, n));
        mm_into(B.dh_raw.narrow(0, 0, n), dh, L.w_hr);
      } else {
        B.dh.narrow(0, 0, n).add_(B.dy.narrow(0, off, n));
      }
      S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
        StepBwd s = B.segment(k, lo, hi, continues);
        if (!in_place && lstm) s.dc_out = {&other, lo};
        if (!in_place && gru) s.dh_out = {&other, lo};
        steps->backward(s);
      });
      at::Tensor& state = lstm ? B.dc : B.dh;  // what the cell kernels updated
      if (gru) {  // d h_{t-1} = the direct term d h_t * z (written by the cell) + dgates_h W_hh
        steps->recurrent_bwd((in_place ? B.dh : other).narrow(0, 0, n), B.dgh.narrow(0, off, n), true);
      }
      if (!in_place && (lstm || gru)) {
        keep_final_rows(state, other, k, np, n);
        std::swap(state, other);
      }
      if (!gru) steps->recurrent_bwd(B.dh.narrow(0, 0, n), B.dgi.narrow(0, off, n), false);  // d h_{t-1}
    }
  }

  // dW_hh = sum over steps of dgates_h^T h_prev, as one GEMM over h_prev of every row gathered (splitting the GEMM
  // at the first step instead makes one of rank N, which a library GEMM runs far from peak at small N).
  at::Tensor dw_hh;
  if (S.T == 0) {
    dw_hh = at::zeros({GH, Hout}, L.x2d.options());
  } else {
    dw_hh = steps->empty({GH, Hout});
    mm_into(dw_hh, B.dgh.t(), previous_states(S, B.h_seq, L.h0, reverse));
  }
  at::Tensor dx = steps->empty(x.sizes());
  mm_into(dx.view({S.total, L.C}), B.dgi, L.w_ih);
  at::Tensor dw_ih = steps->empty({GH, L.C});
  mm_into(dw_ih, B.dgi.t(), L.x2d);
  at::Tensor db_ih = L.b_ih.defined() ? B.dgi.sum(0) : at::Tensor();
  at::Tensor db_hh;
  if (L.b_hh.defined()) db_hh = gru ? B.dgh.sum(0) : (db_ih.defined() ? db_ih.clone() : B.dgi.sum(0));
  at::Tensor dw_hr = L.proj ? at::mm(dh_all.t(), B.h_raw) : at::Tensor();
  // d p_i = sum of d(pre i) * c_prev, d p_f = sum of d(pre f) * c_prev, d p_o = sum of d(pre o) * c, over all rows
  at::Tensor dpeephole;
  if (L.info->peephole) {
    dpeephole = at::zeros({3, H}, L.x2d.options());
    if (S.T > 0) {
      const at::Tensor c_prev = previous_states(S, B.c_seq, L.c0, reverse);
      dpeephole[0] = (B.dgi.narrow(1, 0, H) * c_prev).sum(0);
      dpeephole[1] = (B.dgi.narrow(1, H, H) * c_prev).sum(0);
      dpeephole[2] = (B.dgi.narrow(1, 3 * H, H) * B.c_seq).sum(0);
    }
  }
  at::Tensor dc0 = lstm ? B.dc : at::Tensor();
  return {dx, B.dh, dc0, {dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeephole}};
}

}  // namespace fastseq
