// CPU kernels of the recurrent cell steps (LSTM, peephole LSTM, GRU, Elman RNN): the pointwise part after the
// GEMMs, forward and backward, fused into one pass over the gates. Rows (batch) run in parallel with
// at::parallel_for; the loop over H is vectorized with at::vec::Vectorized and finished with a scalar tail. The
// gate math runs in at::opmath_type<scalar_t> (float for bfloat16, float64 for float64); outputs and workspaces are
// stored in the input dtype. Supported dtypes: float32, float64, bfloat16.
#include "rnn_cell.h"

#include "cpu/rnn_cell_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace fastseq {
namespace cpu {
namespace {

using namespace cell;

// ---- validation ----
// The tensor whose dtype and (N, H) the others must match.
void check_leader(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": expected ", name, " on the CPU, got device ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, fn, ": expected ", name,
              " of dtype Float, Double or BFloat16, got ", dt);
  TORCH_CHECK(t.dim() == 2, fn, ": expected ", name, " to be 2-D (N, H), got shape ", t.sizes());
}

bool is_relu(const char* fn, const std::string& nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", fn,
              ": expected nonlinearity 'tanh' or 'relu', got '", nonlinearity, "'");
  return nonlinearity == "relu";
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates,
                                                             const at::Tensor& cx,
                                                             const std::optional<at::Tensor>& b_ih,
                                                             const std::optional<at::Tensor>& b_hh,
                                                             const std::optional<at::Tensor>& peephole) {
  constexpr const char* fn = "lstm_cell_fwd";
  check_leader(fn, "cx", cx);
  const int64_t N = cx.size(0), H = cx.size(1);
  const auto dt = cx.scalar_type();
  check_tensor(fn, "cx", cx, {N, H}, dt);
  check_tensor(fn, "igates", igates, {N, 4 * H}, dt);
  check_tensor(fn, "hgates", hgates, {N, 4 * H}, dt);
  check_optional(fn, "b_ih", b_ih, {4 * H}, dt);
  check_optional(fn, "b_hh", b_hh, {4 * H}, dt);
  check_optional(fn, "peephole", peephole, {3, H}, dt);

  at::Tensor hy = at::empty({N, H}, cx.options());
  at::Tensor cy = at::empty({N, H}, cx.options());
  at::Tensor ws = at::empty({N, 4 * H}, cx.options());
  const at::Tensor bias = summed_bias(b_ih, b_hh, 4 * H, dt);
  const bool peep = present(peephole);
  const at::Tensor p = peep ? peephole->to(at::toOpMathType(dt)).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstm_cell_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* ig = igates.const_data_ptr<scalar_t>();
    const scalar_t* hg = hgates.const_data_ptr<scalar_t>();
    const scalar_t* c = cx.const_data_ptr<scalar_t>();
    const opmath_t* b = bias.const_data_ptr<opmath_t>();
    const opmath_t* pp = peep ? p.const_data_ptr<opmath_t>() : nullptr;
    scalar_t* h_out = hy.mutable_data_ptr<scalar_t>();
    scalar_t* c_out = cy.mutable_data_ptr<scalar_t>();
    scalar_t* w = ws.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(8 * H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t g4 = n * 4 * H, g1 = n * H;
        over_h([&](auto vec, int64_t j) {
          return peep ? lstm_fwd_span<scalar_t, decltype(vec)::value, true>(j, H, H, ig + g4, hg + g4, c + g1, b, pp,
                                                                             h_out + g1, c_out + g1, w + g4)
                      : lstm_fwd_span<scalar_t, decltype(vec)::value, false>(j, H, H, ig + g4, hg + g4, c + g1, b, pp,
                                                                              h_out + g1, c_out + g1, w + g4);
        });
      }
    });
  });
  return {hy, cy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd(const at::Tensor& dhy, const at::Tensor& dcy,
                                                             const at::Tensor& cx, const at::Tensor& cy,
                                                             const at::Tensor& workspace,
                                                             const std::optional<at::Tensor>& peephole) {
  constexpr const char* fn = "lstm_cell_bwd";
  check_leader(fn, "cx", cx);
  const int64_t N = cx.size(0), H = cx.size(1);
  const auto dt = cx.scalar_type();
  check_tensor(fn, "dhy", dhy, {N, H}, dt);
  check_tensor(fn, "dcy", dcy, {N, H}, dt);
  check_tensor(fn, "cx", cx, {N, H}, dt);
  check_tensor(fn, "cy", cy, {N, H}, dt);
  check_tensor(fn, "workspace", workspace, {N, 4 * H}, dt);
  check_optional(fn, "peephole", peephole, {3, H}, dt);

  at::Tensor dgates = at::empty({N, 4 * H}, cx.options());
  at::Tensor dcx = at::empty({N, H}, cx.options());
  const bool peep = present(peephole);
  const auto opmath = at::toOpMathType(dt);
  const at::Tensor p = peep ? peephole->to(opmath).contiguous() : at::Tensor();
  // Rows split into nchunks contiguous chunks, one task each; chunk k sums its peephole terms into acc[k], and the
  // chunks are reduced in a fixed order afterwards.
  const int64_t nchunks =
      std::min<int64_t>(N, std::clamp<int64_t>(N * 10 * H / kGrain, 1, at::get_num_threads()));
  at::Tensor acc = peep ? at::zeros({std::max<int64_t>(nchunks, 1), 3, H}, at::TensorOptions().dtype(opmath))
                        : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "lstm_cell_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* dh = dhy.const_data_ptr<scalar_t>();
    const scalar_t* dc = dcy.const_data_ptr<scalar_t>();
    const scalar_t* c = cx.const_data_ptr<scalar_t>();
    const scalar_t* c_new = cy.const_data_ptr<scalar_t>();
    const scalar_t* w = workspace.const_data_ptr<scalar_t>();
    const opmath_t* pp = peep ? p.const_data_ptr<opmath_t>() : nullptr;
    scalar_t* dg = dgates.mutable_data_ptr<scalar_t>();
    scalar_t* dc_out = dcx.mutable_data_ptr<scalar_t>();
    opmath_t* a = peep ? acc.mutable_data_ptr<opmath_t>() : nullptr;
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        opmath_t* a_k = peep ? a + k * 3 * H : nullptr;
        for (int64_t n = k * N / nchunks; n < (k + 1) * N / nchunks; ++n) {
          const int64_t g4 = n * 4 * H, g1 = n * H;
          over_h([&](auto vec, int64_t j) {
            return peep ? lstm_bwd_span<scalar_t, decltype(vec)::value, true>(
                              j, H, H, dh + g1, dc + g1, c + g1, c_new + g1, w + g4, pp, dg + g4, dc_out + g1, a_k)
                        : lstm_bwd_span<scalar_t, decltype(vec)::value, false>(
                              j, H, H, dh + g1, dc + g1, c + g1, c_new + g1, w + g4, pp, dg + g4, dc_out + g1, a_k);
          });
        }
      }
    });
  });
  at::Tensor dpeephole = peep ? acc.sum(0).to(dt) : at::Tensor();
  return {dgates, dcx, dpeephole};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates,
                                                const at::Tensor& hx, const std::optional<at::Tensor>& b_ih,
                                                const std::optional<at::Tensor>& b_hh) {
  constexpr const char* fn = "gru_cell_fwd";
  check_leader(fn, "hx", hx);
  const int64_t N = hx.size(0), H = hx.size(1);
  const auto dt = hx.scalar_type();
  check_tensor(fn, "hx", hx, {N, H}, dt);
  check_tensor(fn, "igates", igates, {N, 3 * H}, dt);
  check_tensor(fn, "hgates", hgates, {N, 3 * H}, dt);
  check_optional(fn, "b_ih", b_ih, {3 * H}, dt);
  check_optional(fn, "b_hh", b_hh, {3 * H}, dt);

  at::Tensor hy = at::empty({N, H}, hx.options());
  at::Tensor ws = at::empty({N, 4 * H}, hx.options());
  const at::Tensor bias = gru_bias(b_ih, b_hh, H, dt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "gru_cell_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* ig = igates.const_data_ptr<scalar_t>();
    const scalar_t* hg = hgates.const_data_ptr<scalar_t>();
    const scalar_t* h = hx.const_data_ptr<scalar_t>();
    const opmath_t* b = bias.const_data_ptr<opmath_t>();
    scalar_t* h_out = hy.mutable_data_ptr<scalar_t>();
    scalar_t* w = ws.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(12 * H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t g3 = n * 3 * H, g1 = n * H;
        over_h([&](auto vec, int64_t j) {
          return gru_fwd_span<scalar_t, decltype(vec)::value>(j, H, H, ig + g3, hg + g3, h + g1, b, h_out + g1,
                                                              w + n * 4 * H);
        });
      }
    });
  });
  return {hy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd(const at::Tensor& dhy, const at::Tensor& hx,
                                                            const at::Tensor& workspace) {
  constexpr const char* fn = "gru_cell_bwd";
  check_leader(fn, "hx", hx);
  const int64_t N = hx.size(0), H = hx.size(1);
  const auto dt = hx.scalar_type();
  check_tensor(fn, "dhy", dhy, {N, H}, dt);
  check_tensor(fn, "hx", hx, {N, H}, dt);
  check_tensor(fn, "workspace", workspace, {N, 4 * H}, dt);

  at::Tensor dig = at::empty({N, 3 * H}, hx.options());
  at::Tensor dhg = at::empty({N, 3 * H}, hx.options());
  at::Tensor dhx = at::empty({N, H}, hx.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "gru_cell_bwd", [&] {
    const scalar_t* dh = dhy.const_data_ptr<scalar_t>();
    const scalar_t* h = hx.const_data_ptr<scalar_t>();
    const scalar_t* w = workspace.const_data_ptr<scalar_t>();
    scalar_t* di = dig.mutable_data_ptr<scalar_t>();
    scalar_t* dhh = dhg.mutable_data_ptr<scalar_t>();
    scalar_t* dh_out = dhx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(13 * H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t g3 = n * 3 * H, g1 = n * H;
        over_h([&](auto vec, int64_t j) {
          return gru_bwd_span<scalar_t, decltype(vec)::value>(j, H, H, dh + g1, h + g1, w + n * 4 * H, di + g3,
                                                              dhh + g3, dh_out + g1);
        });
      }
    });
  });
  return {dig, dhg, dhx};
}

at::Tensor rnn_cell_fwd(const at::Tensor& igates, const at::Tensor& hgates, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::string& nonlinearity) {
  constexpr const char* fn = "rnn_cell_fwd";
  const bool relu = is_relu(fn, nonlinearity);
  check_leader(fn, "igates", igates);
  const int64_t N = igates.size(0), H = igates.size(1);
  const auto dt = igates.scalar_type();
  check_tensor(fn, "igates", igates, {N, H}, dt);
  check_tensor(fn, "hgates", hgates, {N, H}, dt);
  check_optional(fn, "b_ih", b_ih, {H}, dt);
  check_optional(fn, "b_hh", b_hh, {H}, dt);

  at::Tensor hy = at::empty({N, H}, igates.options());
  const at::Tensor bias = summed_bias(b_ih, b_hh, H, dt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "rnn_cell_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* ig = igates.const_data_ptr<scalar_t>();
    const scalar_t* hg = hgates.const_data_ptr<scalar_t>();
    const opmath_t* b = bias.const_data_ptr<opmath_t>();
    scalar_t* h_out = hy.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(3 * H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t g1 = n * H;
        over_h([&](auto vec, int64_t j) {
          return relu ? rnn_fwd_span<scalar_t, decltype(vec)::value, true>(j, H, ig + g1, hg + g1, b, h_out + g1)
                      : rnn_fwd_span<scalar_t, decltype(vec)::value, false>(j, H, ig + g1, hg + g1, b, h_out + g1);
        });
      }
    });
  });
  return hy;
}

at::Tensor rnn_cell_bwd(const at::Tensor& dhy, const at::Tensor& hy, const std::string& nonlinearity) {
  constexpr const char* fn = "rnn_cell_bwd";
  const bool relu = is_relu(fn, nonlinearity);
  check_leader(fn, "hy", hy);
  const int64_t N = hy.size(0), H = hy.size(1);
  const auto dt = hy.scalar_type();
  check_tensor(fn, "dhy", dhy, {N, H}, dt);
  check_tensor(fn, "hy", hy, {N, H}, dt);

  at::Tensor dpre = at::empty({N, H}, hy.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "rnn_cell_bwd", [&] {
    const scalar_t* dh = dhy.const_data_ptr<scalar_t>();
    const scalar_t* y = hy.const_data_ptr<scalar_t>();
    scalar_t* d = dpre.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(3 * H), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t g1 = n * H;
        over_h([&](auto vec, int64_t j) {
          return relu ? rnn_bwd_span<scalar_t, decltype(vec)::value, true>(j, H, dh + g1, y + g1, d + g1)
                      : rnn_bwd_span<scalar_t, decltype(vec)::value, false>(j, H, dh + g1, y + g1, d + g1);
        });
      }
    });
  });
  return dpre;
}

// x w^T: with at most kDotRows float32 rows fastseq's matrix-vector products (cell::dot_mm, which a library GEMM
// call runs with more overhead than work at a step's sizes: 7 us for 1 x 128 x 512 here, of ~3 us of loads from
// L2); others the library GEMM.
at::Tensor gates_mm(const at::Tensor& x, const at::Tensor& w) {
  if (!dot_mm_fits(x, w)) return at::mm(x, w.t());
  const at::Tensor a = x.contiguous(), b = w.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  dot_mm(a.const_data_ptr<float>(), a.size(1), a.size(0), a.size(1), b.const_data_ptr<float>(), b.size(0),
         out.mutable_data_ptr<float>(), out.size(1));
  return out;
}

}  // namespace cpu
}  // namespace fastseq
