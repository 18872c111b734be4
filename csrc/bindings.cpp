// The one Python module of the extension, fastseq._C: every op's entry points, each dispatched on the device of
// its first tensor to the CPU kernels (csrc/cpu) or the CUDA kernels (csrc/cuda, in CUDA builds only).
#include <torch/extension.h>

#include <ATen/autocast_mode.h>

#include <memory>
#include <string>

#include "attention.h"
#include "layer_norm.h"
#include "rnn_cell.h"
#include "rnn_layer.h"

namespace {

// Calls fastseq::cpu::fn or fastseq::cuda::fn by the device of `t`; a CUDA tensor in a CPU-only build is an error.
#ifdef WITH_CUDA
#define FASTSEQ_DISPATCH(t, fn, ...) \
  ((t).is_cuda() ? fastseq::cuda::fn(__VA_ARGS__) : fastseq::cpu::fn(__VA_ARGS__))
#else
#define FASTSEQ_DISPATCH(t, fn, ...)                                                                            \
  ([&] {                                                                                                        \
    TORCH_CHECK(!(t).is_cuda(), #fn ": fastseq._C was built without CUDA; rebuild where nvcc is found or with " \
                                "FASTSEQ_FORCE_CUDA=1");                                                       \
    return fastseq::cpu::fn(__VA_ARGS__);                                                                       \
  }())
#endif

using OptTensor = std::optional<at::Tensor>;
using OptString = std::optional<std::string>;

// Step kernels written in Python (the Triton backend's) for the time loop: `steps` has an attribute in_place and
// methods forward(gi, hg, h_prev, c_prev, h, c, gates) and backward(dh, dh_out, dc, dc_out, h_prev, c_prev, h, c,
// gates, dgi, dgh) taking the step's rows as tensor views (None where absent; fastseq/kernels/rnn_layer.py).
class PySteps final : public fastseq::CellSteps {
 public:
  PySteps(const fastseq::Layer& layer, const py::object& steps)
      : CellSteps(layer), steps_(steps), in_place_(steps.attr("in_place").cast<bool>()),
        forward_(steps.attr("forward")), backward_(steps.attr("backward")) {}
  bool in_place() const override { return in_place_; }
  void forward(const fastseq::StepFwd& s) override {
    const int64_t n = s.n;
    forward_(view(s.gi, n), view(s.hg, n), view(s.h_prev, n), view(s.c_prev, n), view(s.h, n), view(s.c, n),
             view(s.gates, n));
  }
  void backward(const fastseq::StepBwd& s) override {
    const int64_t n = s.n;
    backward_(view(s.dh, n), view(s.dh_out, n), view(s.dc, n), view(s.dc_out, n), view(s.h_prev, n),
              view(s.c_prev, n), view(s.h, n), view(s.c, n), view(s.gates, n), view(s.dgi, n), view(s.dgh, n));
  }
  // The whole loop in one call where `steps` has forward_sequence / backward_sequence and they take this layer
  // (they return whether they ran): the schedule as (T, 4) int64 (per step its batch size, first row, rows
  // continuing from the previous step, the previous step's first row) and the loop's buffers.
  bool forward_sequence(const fastseq::ForwardLoop& F) override {
    if (!py::hasattr(steps_, "forward_sequence")) return false;
    return steps_.attr("forward_sequence")(schedule(F.S), F.gi, F.y, opt(F.c_seq), opt(F.gates), L.h0, opt(L.c0),
                                           L.w_hh, opt(L.w_hr)).cast<bool>();
  }
  bool backward_sequence(const fastseq::BackwardLoop& B) override {
    if (!py::hasattr(steps_, "backward_sequence")) return false;
    return steps_.attr("backward_sequence")(schedule(B.S), B.dy, B.h_seq, opt(B.c_seq), opt(B.gates), B.dgi, B.dgh,
                                            B.dh, opt(B.dc), L.h0, opt(L.c0), L.w_hh, opt(L.w_hr)).cast<bool>();
  }

 private:
  static py::object view(const fastseq::Rows& rows, int64_t n) {
    return rows ? py::cast(rows.view(n)) : py::none();
  }
  static py::object opt(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }
  static at::Tensor schedule(const fastseq::Schedule& S) {
    at::Tensor out = at::empty({S.T, 4}, at::TensorOptions().dtype(at::kLong));
    int64_t* p = out.mutable_data_ptr<int64_t>();
    for (int64_t k = 0; k < S.T; ++k) {
      p[4 * k] = S.rows[k];
      p[4 * k + 1] = S.off[k];
      p[4 * k + 2] = S.prev[k];
      p[4 * k + 3] = k > 0 ? S.off[k - 1] : 0;
    }
    return out;
  }
  py::object steps_;
  bool in_place_;
  py::object forward_, backward_;
};

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() && t->defined() ? OptTensor(t->contiguous()) : OptTensor();
}

// fastseq.functional's checks of a cell step's arguments, true where they all pass: floating tensors of input's
// dtype and device; input (N, C) or (C,); w_ih (G*H, C); w_hh (G*H, H); b_ih, b_hh (G*H,) or None; each state
// (N, H) ((H,) for 1-D input); peephole (3, H) or None.
bool cell_args_ok(const at::Tensor& x, const std::vector<at::Tensor>& states, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& peephole,
                  int64_t gates) {
  auto like = [&](const at::Tensor& t) {
    return t.defined() && t.scalar_type() == x.scalar_type() && t.device() == x.device();
  };
  auto absent_or = [&](const OptTensor& t, at::IntArrayRef shape) {
    return !t.has_value() || (like(*t) && t->sizes() == shape);
  };
  if (!x.defined() || !x.is_floating_point() || (x.dim() != 1 && x.dim() != 2)) return false;
  if (!like(w_hh) || w_hh.dim() != 2) return false;
  const int64_t H = w_hh.size(1), C = x.size(-1);
  if (w_hh.size(0) != gates * H || !like(w_ih) || w_ih.sizes() != at::IntArrayRef{gates * H, C}) return false;
  if (!absent_or(b_ih, {gates * H}) || !absent_or(b_hh, {gates * H}) || !absent_or(peephole, {3, H})) return false;
  const std::vector<int64_t> state = x.dim() == 2 ? std::vector<int64_t>{x.size(0), H} : std::vector<int64_t>{H};
  for (const at::Tensor& t : states) {
    if (!like(t) || t.sizes() != at::IntArrayRef(state)) return false;
  }
  return true;
}

// fastseq.functional.layer_norm's checks, true where they all pass: a floating input whose trailing dims are
// `shape` (non-empty, no zero size); weight and bias of `shape`, on input's device, of input's dtype (or float32
// with bfloat16 / float16 input).
bool layer_norm_args_ok(const at::Tensor& x, const std::vector<int64_t>& shape, const OptTensor& w,
                        const OptTensor& b) {
  const int64_t dims = static_cast<int64_t>(shape.size());
  if (!x.defined() || !x.is_floating_point() || dims == 0 || x.dim() < dims) return false;
  for (int64_t i = 0; i < dims; ++i) {
    if (shape[i] <= 0 || x.size(x.dim() - dims + i) != shape[i]) return false;
  }
  const bool mixed = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  auto ok = [&](const OptTensor& p) {
    if (!p.has_value()) return true;
    return p->defined() && p->device() == x.device() && p->sizes() == at::IntArrayRef(shape) &&
           (p->scalar_type() == x.scalar_type() || (mixed && p->scalar_type() == at::kFloat));
  };
  return ok(w) && ok(b);
}

// x as the kernels take it: (M, n) contiguous rows of the trailing n elements (x itself where it is that already).
at::Tensor rows(const at::Tensor& x, int64_t n) {
  return (x.dim() == 2 && x.size(1) == n ? x : x.reshape({-1, n})).contiguous();
}

// A layer norm parameter as the kernels take it: (n,) contiguous in x's dtype (float32 parameters of bfloat16 /
// float16 x are cast); none stays none.
OptTensor flat_param(const OptTensor& p, int64_t n, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return OptTensor();
  if (p->dim() == 1 && p->scalar_type() == x.scalar_type() && p->is_contiguous()) return p;  // no op to dispatch
  return p->reshape({n}).to(x.scalar_type()).contiguous();
}

// Layer norm over the trailing dims of x whose product is n: y (x's shape), mean, rstd (one per row). The flattening,
// the casts of weight and bias to x's dtype and the kernel in one call (at one row the op is per-call overhead).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x, int64_t n, const OptTensor& w,
                                                                   const OptTensor& b, double eps) {
  const at::Tensor x2 = rows(x, n);
  auto [y, mean, rstd] = FASTSEQ_DISPATCH(x2, layer_norm_fwd, x2, flat_param(w, n, x), flat_param(b, n, x), eps);
  if (y.sizes() != x.sizes()) y.resize_(x.sizes());  // in place: a view of y would refuse in-place use of the output
  return std::make_tuple(y, mean, rstd);
}

// Layer norm with its autograd formula in C++: the eager path of the cpu and cuda backends (fastseq/ops/layer_norm.py
// `apply`), whose Python autograd.Function would cost ~10 us a call against ~3 us for the whole op at one row.
// Saved: x, weight, bias, mean, rstd (not y: the output may be changed in place, as torch's). The backward runs
// layer_norm_bwd on the forward's device, the gradients of weight and bias in their own dtype; a backward that is
// itself differentiated (create_graph) takes the gradients of ATen's layer_norm instead (torch's double backward).
struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, std::vector<int64_t> shape,
                            const OptTensor& w, const OptTensor& b, double eps) {
    auto [y, mean, rstd] = layer_norm_forward(x, c10::multiply_integers(shape), w, b, eps);
    ctx->save_for_backward({x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &rstd = saved[4];
    const std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
    // needs_input_grad counts the tensor arguments given: x, then weight and bias where present
    const bool need_dx = ctx->needs_input_grad(0), need_dw = w.defined() && ctx->needs_input_grad(1),
               need_db = b.defined() && ctx->needs_input_grad(w.defined() ? 2 : 1);
    at::Tensor dx, dw, db;
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph: gradients that are a graph themselves
      std::vector<at::Tensor> wrt;
      for (const auto& [t, need] : {std::pair{x, need_dx}, std::pair{w, need_dw}, std::pair{b, need_db}}) {
        if (need && t.requires_grad()) wrt.push_back(t);
      }
      if (!wrt.empty()) {
        const at::Tensor y = at::layer_norm(x, shape, w, b, ctx->saved_data["eps"].toDouble());
        const auto got = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/true, /*create_graph=*/true,
                                               /*allow_unused=*/true);
        size_t i = 0;
        if (need_dx && x.requires_grad()) dx = got[i++];
        if (need_dw && w.requires_grad()) dw = got[i++];
        if (need_db && b.requires_grad()) db = got[i++];
      }
      return {dx, at::Tensor(), dw, db, at::Tensor()};
    }
    const int64_t n = c10::multiply_integers(shape);
    const at::Tensor x2 = rows(x, n), dy2 = rows(grads[0], n);
    std::tie(dx, dw, db) = FASTSEQ_DISPATCH(x2, layer_norm_bwd, dy2, x2, flat_param(w, n, x), mean, rstd, need_dw,
                                            need_db);
    const auto pdtype = w.defined() ? w.scalar_type() : x.scalar_type();  // the parameters' (bias's as weight's)
    auto param_grad = [&](const at::Tensor& g) { return (shape.size() == 1 ? g : g.reshape(shape)).to(pdtype); };
    return {need_dx ? (dx.sizes() == x.sizes() ? dx : dx.reshape(x.sizes())) : at::Tensor(), at::Tensor(),
            need_dw ? param_grad(dw) : at::Tensor(), need_db ? param_grad(db) : at::Tensor(), at::Tensor()};
  }
};

// A cell step's forward in one call (a step at batch 1 is mostly per-call overhead): the gate GEMMs x W_ih^T and
// h W_hh^T (gates_mm), then the fused pointwise kernel. x (N, C); h, c (N, H); w_ih (G*H, C); w_hh (G*H, H); b_ih,
// b_hh (G*H,) or none; peephole (3, H) or none. LSTM: hy, cy, workspace (N, 4H); GRU: hy, workspace (N, 4H).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                         const OptTensor& b_ih, const OptTensor& b_hh,
                                                         const OptTensor& peephole) {
  const at::Tensor ig = FASTSEQ_DISPATCH(x, gates_mm, x, w_ih), hg = FASTSEQ_DISPATCH(h, gates_mm, h, w_hh);
  return FASTSEQ_DISPATCH(ig, lstm_cell_fwd, ig, hg, c.contiguous(), contiguous(b_ih), contiguous(b_hh),
                          contiguous(peephole));
}

std::tuple<at::Tensor, at::Tensor> gru_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                                            const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
  const at::Tensor ig = FASTSEQ_DISPATCH(x, gates_mm, x, w_ih), hg = FASTSEQ_DISPATCH(h, gates_mm, h, w_hh);
  return FASTSEQ_DISPATCH(ig, gru_cell_fwd, ig, hg, h.contiguous(), contiguous(b_ih), contiguous(b_hh));
}

at::Tensor rnn_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const OptTensor& b_ih, const OptTensor& b_hh, const std::string& nonlinearity) {
  const at::Tensor ig = FASTSEQ_DISPATCH(x, gates_mm, x, w_ih), hg = FASTSEQ_DISPATCH(h, gates_mm, h, w_hh);
  return FASTSEQ_DISPATCH(ig, rnn_cell_fwd, ig, hg, contiguous(b_ih), contiguous(b_hh), nonlinearity);
}

// A cell step (cell "lstm", "gru", "rnn_tanh" or "rnn_relu"; no peephole) with its autograd formula in C++: the
// eager path of the cpu and cuda backends (fastseq/ops/rnn_cell.py), whose Python autograd.Function costs ~20 us a
// step forward and backward against ~100 us for the whole step at batch 1. The same kernels and formula as the
// custom ops': the fused pointwise backward gives the gates' gradients dg_i (of x W_ih^T) and dg_h (of h W_hh^T;
// the same tensor but for GRU), then dx = dg_i W_ih, dh = dg_h W_hh (+ GRU's direct term), dW_ih = dg_i^T x,
// dW_hh = dg_h^T h, db_ih = sum dg_i, db_hh = sum dg_h. Outputs: hy (and cy for LSTM). Saved: the arguments, the
// workspace, and for LSTM a copy of cy (the caller may change cy in place, as torch's LSTMCell allows), for the RNN
// hy itself (changing it in place is an error at backward, as in torch). A backward that is itself differentiated
// (create_graph) takes the gradients of ATen's own cell (torch's double backward).
struct CellFunction : public torch::autograd::Function<CellFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const std::string& cell,
                                                const at::Tensor& x, const at::Tensor& h, const OptTensor& c,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                const OptTensor& b_ih, const OptTensor& b_hh) {
    torch::autograd::variable_list out;
    at::Tensor kept;  // the workspace (LSTM, GRU) or hy (RNN)
    at::Tensor cy_copy;
    if (cell == "lstm") {
      auto [hy, cy, ws] = lstm_step(x, h, *c, w_ih, w_hh, b_ih, b_hh, std::nullopt);
      out = {hy, cy};
      kept = ws;
      cy_copy = cy.clone();
    } else if (cell == "gru") {
      auto [hy, ws] = gru_step(x, h, w_ih, w_hh, b_ih, b_hh);
      out = {hy};
      kept = ws;
    } else {
      out = {rnn_step(x, h, w_ih, w_hh, b_ih, b_hh, cell.substr(4))};
      kept = out[0];
    }
    ctx->save_for_backward({x, h, c.value_or(at::Tensor()), w_ih, w_hh, b_ih.value_or(at::Tensor()),
                            b_hh.value_or(at::Tensor()), kept, cy_copy});
    ctx->saved_data["cell"] = cell;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &h = s[1], &c = s[2], &w_ih = s[3], &w_hh = s[4], &b_ih = s[5], &b_hh = s[6],
                     &kept = s[7], &cy = s[8];
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    // needs_input_grad counts the tensor arguments given: x, h, c (LSTM), w_ih, w_hh, then the biases present
    bool need[7] = {};  // x, h, c, w_ih, w_hh, b_ih, b_hh
    const bool given[7] = {true, true, c.defined(), true, true, b_ih.defined(), b_hh.defined()};
    for (int i = 0, k = 0; i < 7; ++i) need[i] = given[i] && ctx->needs_input_grad(k++);
    std::vector<at::Tensor> result(8);  // one per forward argument: cell, x, h, c, w_ih, w_hh, b_ih, b_hh
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph: gradients that are a graph themselves
      const at::Tensor* args[7] = {&x, &h, &c, &w_ih, &w_hh, &b_ih, &b_hh};
      std::vector<at::Tensor> wrt;
      std::vector<int> at_arg;
      for (int i = 0; i < 7; ++i) {
        if (need[i] && args[i]->requires_grad()) wrt.push_back(*args[i]), at_arg.push_back(i);
      }
      if (wrt.empty()) return result;
      torch::autograd::variable_list outs;
      if (cell == "lstm") {
        auto [hy, cy2] = at::lstm_cell(x, {h, c}, w_ih, w_hh, b_ih, b_hh);
        outs = {hy, cy2};
      } else if (cell == "gru") {
        outs = {at::gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)};
      } else {
        outs = {cell == "rnn_tanh" ? at::rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh)
                                   : at::rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh)};
      }
      grads.resize(outs.size());
      const auto got = torch::autograd::grad(outs, wrt, grads, /*retain_graph=*/true, /*create_graph=*/true,
                                             /*allow_unused=*/true);
      for (size_t j = 0; j < got.size(); ++j) {
        const at::Tensor& t = wrt[j];
        result[at_arg[j] + 1] = got[j].defined() ? got[j] : at::zeros_like(t);
      }
      return result;
    }
    at::Tensor dg_i, dg_h, dh_direct;
    if (cell == "lstm") {
      at::Tensor dc;
      std::tie(dg_i, dc, std::ignore) = FASTSEQ_DISPATCH(kept, lstm_cell_bwd, grads[0].contiguous(),
                                                         grads[1].contiguous(), c.contiguous(), cy, kept,
                                                         std::nullopt);
      dg_h = dg_i;
      if (need[2]) result[3] = dc;
    } else if (cell == "gru") {
      std::tie(dg_i, dg_h, dh_direct) = FASTSEQ_DISPATCH(kept, gru_cell_bwd, grads[0].contiguous(), h.contiguous(),
                                                         kept);
    } else {
      dg_i = dg_h = FASTSEQ_DISPATCH(kept, rnn_cell_bwd, grads[0].contiguous(), kept, cell.substr(4));
    }
    if (need[0]) result[1] = dg_i.mm(w_ih);
    if (need[1]) result[2] = dh_direct.defined() ? at::addmm(dh_direct, dg_h, w_hh) : dg_h.mm(w_hh);
    if (need[3]) result[4] = dg_i.t().mm(x);
    if (need[4]) result[5] = dg_h.t().mm(h);
    if (need[5]) result[6] = dg_i.sum(0);
    if (need[6]) result[7] = dg_h.is_same(dg_i) && need[5] ? result[6].clone() : dg_h.sum(0);
    return result;
  }
};

// The step kernels of a call: Python's `steps` where given, else those of x's device.
fastseq::StepsFactory steps_factory(const at::Tensor& x, const py::object& steps) {
  if (!steps.is_none()) {
    return [steps](const fastseq::Layer& layer) -> std::unique_ptr<fastseq::CellSteps> {
      return std::make_unique<PySteps>(layer, steps);
    };
  }
#ifdef WITH_CUDA
  if (x.is_cuda()) return fastseq::cuda::layer_steps;
#else
  TORCH_CHECK(!x.is_cuda(), "rnn_layer: fastseq._C was built without CUDA; rebuild where nvcc is found or with "
                            "FASTSEQ_FORCE_CUDA=1");
#endif
  return fastseq::cpu::layer_steps;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseq fused kernels (C++ CPU and CUDA)";
#ifdef WITH_CUDA
#define FASTSEQ_STR2(x) #x
#define FASTSEQ_STR(x) FASTSEQ_STR2(x)
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = FASTSEQ_STR(FASTSEQ_CUDA_ARCHS);  // e.g. "sm80_sm90"
#else
  m.attr("with_cuda") = false;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  m.attr("cpu_capability") = "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  m.attr("cpu_capability") = "AVX2";
#else
  m.attr("cpu_capability") = "DEFAULT";
#endif

  m.def("layer_norm_fwd", [](const at::Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
    return FASTSEQ_DISPATCH(x, layer_norm_fwd, x, w, b, eps);
  }, "y, mean, rstd = layer_norm_fwd(x (M,N), weight (N,)?, bias (N,)?, eps)");
  // The op's whole forward in one call from Python (a layer norm of a few rows is mostly per-call overhead): x of
  // any shape whose trailing dims hold n elements, weight / bias of n elements (cast to x's dtype: float32
  // parameters of bfloat16 / float16 x); y has x's shape.
  m.def("layer_norm_forward", &layer_norm_forward, "y, mean, rstd = layer_norm_forward(x, n, weight?, bias?, eps)");
  m.def("layer_norm", [](const at::Tensor& x, const std::vector<int64_t>& shape, const OptTensor& w,
                         const OptTensor& b, double eps) -> OptTensor {
    if (!layer_norm_args_ok(x, shape, w, b)) return std::nullopt;  // fastseq.functional's checks name the error
    auto needs = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
    if (!torch::autograd::GradMode::is_enabled() || !(x.requires_grad() || needs(w) || needs(b))) {
      const int64_t n = c10::multiply_integers(shape);  // no graph to record: y alone where the kernel can
      if (!x.is_cpu()) return std::get<0>(layer_norm_forward(x, n, w, b, eps));
      at::Tensor y = fastseq::cpu::layer_norm_fwd_output(rows(x, n), flat_param(w, n, x), flat_param(b, n, x), eps);
      return y.sizes() == x.sizes() ? y : y.resize_(x.sizes());
    }
    return LayerNormFunction::apply(x, shape, w, b, eps);
  },
        "y = layer_norm(x, normalized_shape, weight?, bias?, eps), differentiable (its autograd formula in C++); "
        "None where the arguments fail fastseq.functional's checks (the checks and the op in one call)");
  m.def("layer_norm_args_ok", &layer_norm_args_ok,
        "Whether layer_norm's arguments pass fastseq.functional's checks (their fast path, as cell_args_ok)",
        py::arg("input"), py::arg("normalized_shape"), py::arg("weight"), py::arg("bias"));
  m.def("layer_norm_bwd", [](const at::Tensor& dy, const at::Tensor& x, const OptTensor& w, const at::Tensor& mean,
                             const at::Tensor& rstd, bool need_dw, bool need_db) {
    return FASTSEQ_DISPATCH(x, layer_norm_bwd, dy, x, w, mean, rstd, need_dw, need_db);
  }, "dx, dweight, dbias = layer_norm_bwd(dy, x, weight?, mean, rstd, need_dweight, need_dbias)");

  m.def("lstm_cell_fwd", [](const at::Tensor& ig, const at::Tensor& hg, const at::Tensor& cx, const OptTensor& b_ih,
                            const OptTensor& b_hh, const OptTensor& peephole) {
    return FASTSEQ_DISPATCH(ig, lstm_cell_fwd, ig, hg, cx, b_ih, b_hh, peephole);
  }, "hy, cy, workspace = lstm_cell_fwd(igates, hgates, cx, b_ih?, b_hh?, peephole?)");
  // A whole cell step in one call from Python: the GEMMs x W_ih^T and h W_hh^T (gates_mm) then the fused pointwise
  // kernel (a cell step at batch 1 is mostly per-call overhead).
  m.def("lstm_cell_step", &lstm_step, "hy, cy, workspace = lstm_cell_step(x, h, c, w_ih, w_hh, b_ih?, b_hh?, "
        "peephole?): a whole step in one call (the gate GEMMs, then the fused pointwise kernel)");
  m.def("gru_cell_step", &gru_step, "hy, workspace = gru_cell_step(x, h, w_ih, w_hh, b_ih?, b_hh?)");
  m.def("rnn_cell_step", &rnn_step, "hy = rnn_cell_step(x, h, w_ih, w_hh, b_ih?, b_hh?, nonlinearity)");
  m.def("cell", [](const std::string& cell, const at::Tensor& x, const at::Tensor& h, const OptTensor& c,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh) {
    TORCH_CHECK(cell == "lstm" || cell == "gru" || cell == "rnn_tanh" || cell == "rnn_relu",
                "cell: expected lstm, gru, rnn_tanh or rnn_relu, got ", cell);
    TORCH_CHECK((cell == "lstm") == c.has_value(), "cell: c is given for lstm, and only for lstm");
    auto needs = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
    if (torch::autograd::GradMode::is_enabled() &&
        (x.requires_grad() || h.requires_grad() || needs(c) || w_ih.requires_grad() || w_hh.requires_grad() ||
         needs(b_ih) || needs(b_hh))) {
      return CellFunction::apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
    }
    if (cell == "lstm") {  // no graph to record
      auto [hy, cy, ws] = lstm_step(x, h, *c, w_ih, w_hh, b_ih, b_hh, std::nullopt);
      return torch::autograd::variable_list{hy, cy};
    }
    if (cell == "gru") return torch::autograd::variable_list{std::get<0>(gru_step(x, h, w_ih, w_hh, b_ih, b_hh))};
    return torch::autograd::variable_list{rnn_step(x, h, w_ih, w_hh, b_ih, b_hh, cell.substr(4))};
  }, "[hy] or [hy, cy] = cell(cell, x, h, c?, w_ih, w_hh, b_ih?, b_hh?): one step of an LSTM (c given), GRU or "
     "Elman RNN (rnn_tanh, rnn_relu) without peephole, differentiable (its autograd formula in C++)");
  m.def("cell_args_ok", &cell_args_ok,
        "Whether a cell step's arguments pass fastseq.functional's checks (the fast path of those checks: where "
        "this is False they run and raise the precise error)", py::arg("input"), py::arg("states"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("peephole"), py::arg("gates"));
  m.def("lstm_cell_bwd", [](const at::Tensor& dhy, const at::Tensor& dcy, const at::Tensor& cx, const at::Tensor& cy,
                            const at::Tensor& ws, const OptTensor& peephole) {
    return FASTSEQ_DISPATCH(ws, lstm_cell_bwd, dhy, dcy, cx, cy, ws, peephole);
  }, "dgates, dcx, dpeephole = lstm_cell_bwd(dhy, dcy, cx, cy, workspace, peephole?)");
  m.def("gru_cell_fwd", [](const at::Tensor& ig, const at::Tensor& hg, const at::Tensor& hx, const OptTensor& b_ih,
                           const OptTensor& b_hh) {
    return FASTSEQ_DISPATCH(ig, gru_cell_fwd, ig, hg, hx, b_ih, b_hh);
  }, "hy, workspace = gru_cell_fwd(igates, hgates, hx, b_ih?, b_hh?)");
  m.def("gru_cell_bwd", [](const at::Tensor& dhy, const at::Tensor& hx, const at::Tensor& ws) {
    return FASTSEQ_DISPATCH(ws, gru_cell_bwd, dhy, hx, ws);
  }, "d_igates, d_hgates, dhx_direct = gru_cell_bwd(dhy, hx, workspace)");
  m.def("rnn_cell_fwd", [](const at::Tensor& ig, const at::Tensor& hg, const OptTensor& b_ih, const OptTensor& b_hh,
                           const std::string& nonlinearity) {
    return FASTSEQ_DISPATCH(ig, rnn_cell_fwd, ig, hg, b_ih, b_hh, nonlinearity);
  }, "hy = rnn_cell_fwd(igates, hgates, b_ih?, b_hh?, nonlinearity)");
  m.def("rnn_cell_bwd", [](const at::Tensor& dhy, const at::Tensor& hy, const std::string& nonlinearity) {
    return FASTSEQ_DISPATCH(hy, rnn_cell_bwd, dhy, hy, nonlinearity);
  }, "dgates = rnn_cell_bwd(dhy, hy, nonlinearity)");

  m.def("sdpa_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
                       bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset) {
    return FASTSEQ_DISPATCH(q, sdpa_fwd, q, k, v, mask, is_causal, scale, dropout_p, seed, offset);
  }, "out, lse = sdpa_fwd(q, k, v, attn_mask?, is_causal, scale, dropout_p, seed, offset)");
  m.def("sdpa_bwd", [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const OptTensor& mask, bool is_causal,
                       double scale, double dropout_p, int64_t seed, int64_t offset, bool need_dmask) {
    TORCH_CHECK(!q.is_cuda(), "sdpa_bwd: the CUDA C++ attention kernel is forward-only; use the triton backend");
    return fastseq::cpu::sdpa_bwd(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, offset,
                                  need_dmask);
  }, "dq, dk, dv, dscores = sdpa_bwd(dout, q, k, v, out, lse, attn_mask?, is_causal, scale, dropout_p, seed, offset, need_dmask)");

  m.def("sdpa_cpu_bf16_dot", &fastseq::cpu::sdpa_bf16_dot,
        "whether the CPU attention of bfloat16 inputs (forward and backward) runs on bf16 dot products (AVX512_BF16)");
#ifdef WITH_CUDA
  m.def("sdpa_cuda_unsupported", [](const at::Tensor& q, const at::Tensor& v, double dropout_p) -> OptString {
    const std::string why = fastseq::cuda::sdpa_unsupported(q, v, dropout_p);
    return why.empty() ? OptString() : OptString(why);
  }, "why the CUDA C++ attention kernel cannot run these shapes, or None");
#endif

  // Sequence layers: one direction of one layer, the time loop of csrc/rnn_layer.cpp with the step kernels of the
  // tensors' device, or those of `steps`, a Python object (fastseq.kernels.rnn_layer.LayerSteps: Triton's).
  m.def("rnn_layer_fwd", [](const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const OptTensor& c0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                            const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& peephole, bool reverse,
                            const OptTensor& batch_sizes, const py::object& steps, bool need_saved) {
    return fastseq::rnn_layer_fwd(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse, batch_sizes,
                                  steps_factory(x, steps), need_saved);
  }, "y, h_n, c_n, saved = rnn_layer_fwd(mode, x, h0, c0?, w_ih, w_hh, b_ih?, b_hh?, w_hr?, peephole?, reverse, "
     "batch_sizes?, steps?, need_saved=True)", py::arg("mode"), py::arg("x"), py::arg("h0"), py::arg("c0"),
     py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"), py::arg("peephole"),
     py::arg("reverse"), py::arg("batch_sizes"), py::arg("steps") = py::none(), py::arg("need_saved") = true);
  m.def("rnn_layer_bwd", [](const std::string& mode, const at::Tensor& dy, const at::Tensor& dh_n,
                            const OptTensor& dc_n, const at::Tensor& x, const at::Tensor& h0, const OptTensor& c0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& b_ih,
                            const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& peephole, bool reverse,
                            const OptTensor& batch_sizes, const std::vector<at::Tensor>& saved,
                            const py::object& steps) {
    return fastseq::rnn_layer_bwd(mode, dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, reverse,
                                  batch_sizes, saved, steps_factory(x, steps));
  }, "dx, dh0, dc0, [dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeephole] = rnn_layer_bwd(mode, dy, dh_n, dc_n?, x, h0, "
     "c0?, w_ih, w_hh, b_ih?, b_hh?, w_hr?, peephole?, reverse, batch_sizes?, saved, steps?)", py::arg("mode"),
     py::arg("dy"), py::arg("dh_n"), py::arg("dc_n"), py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
     py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"), py::arg("peephole"), py::arg("reverse"),
     py::arg("batch_sizes"), py::arg("saved"), py::arg("steps") = py::none());
  py::list modes;
  for (const fastseq::ModeInfo& info : fastseq::kModes) {
    modes.append(py::make_tuple(info.name, info.gates, info.saved, info.cell, info.peephole, info.projection));
  }
  m.attr("rnn_modes") = modes;  // (name, gates, saved, cell, peephole, projection): fastseq/modes.py's twin

  m.def("autocast_cast", [](const at::Tensor& t, at::ScalarType dtype) {
    return at::autocast::cached_cast(dtype, t, t.device().type());
  }, "t cast to dtype as torch.autocast casts an op's arguments: a float32 leaf that requires grad (a weight) is "
     "cast once per autocast region (torch's autocast cache), anything else on every call");
}
