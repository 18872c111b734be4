// CPU kernels of the recurrent layers: one direction of one layer over a whole sequence (LSTM with optional
// projection, GRU, Elman RNN), forward and backward, with the time loop in C++.
// Forward: gi = x W_ih^T for all steps in one GEMM; per step hg = h W_hh^T (one GEMM into a preallocated buffer)
// and the fused cell row kernels of rnn_cell_kernels.h, which read their rows straight out of the sequence buffers
// and write h, c and the activated gates straight into them (no per-step allocation); with a projection the step
// ends with h = (o * tanh(c)) W_hr^T. Backward runs the fused pointwise backward per step in reverse order, keeps
// the gate gradients of all steps in one (rows, G*H) buffer and computes dx, dW_ih, dW_hh, db and dW_hr as a few
// GEMMs over all steps. Packed sequences run each step on its active rows only. Gate math in
// at::opmath_type<scalar_t>; buffers in the input dtype. Supported dtypes: float32, float64, bfloat16. The per-step
// recurrent GEMMs (h W_hh^T forward, dgates W_hh backward) of float32 steps with few rows run a hand-written GEMM on
// W_hh packed once per call; others call the library GEMM. Float32 layers of few rows without projection run the
// whole time loop in one parallel region, the hidden units split between threads (forward_sliced, backward_sliced).
#include "rnn_layer.h"
#include "rnn_schedule.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "cpu/memory.h"
#include "cpu/rnn_cell_kernels.h"

namespace fastseq::cpu {
namespace {

using namespace cell;

enum class Mode { kLstm, kGru, kRnnTanh, kRnnRelu };

Mode parse_mode(const char* fn, const std::string& mode) {
  TORCH_CHECK(mode == "lstm" || mode == "gru" || mode == "rnn_tanh" || mode == "rnn_relu", fn,
              ": expected mode 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '", mode, "'");
  return mode == "lstm" ? Mode::kLstm : mode == "gru" ? Mode::kGru : mode == "rnn_tanh" ? Mode::kRnnTanh
                                                                                         : Mode::kRnnRelu;
}

int64_t gate_count(Mode mode) { return mode == Mode::kLstm ? 4 : mode == Mode::kGru ? 3 : 1; }

at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

// The validated, contiguous operands of one layer direction.
struct Layer {
  Mode mode;
  int64_t G, H, Hout, C, N;
  at::ScalarType dtype;
  bool proj;
  at::Tensor x2d, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh;

  Layer(const char* fn, const std::string& mode_name, const at::Tensor& x, const at::Tensor& h0_,
        const std::optional<at::Tensor>& c0_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
        const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
        const std::optional<at::Tensor>& w_hr_, bool packed)
      : mode(parse_mode(fn, mode_name)), G(gate_count(mode)), proj(present(w_hr_)) {
    TORCH_CHECK(x.defined() && x.device().is_cpu(), fn, ": expected x to be a CPU tensor");
    dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, fn,
                ": expected x of dtype Float, Double or BFloat16, got ", dtype);
    TORCH_CHECK(x.dim() == (packed ? 2 : 3), fn, ": expected x of ", packed ? "2 dims (sum(batch_sizes), C)" :
                "3 dims (T, N, C)", ", got shape ", x.sizes());
    TORCH_CHECK(w_ih_.defined() && w_ih_.dim() == 2 && w_ih_.size(0) % G == 0, fn, ": expected w_ih of shape (",
                G, "*H, C), got ", w_ih_.defined() ? w_ih_.sizes() : at::IntArrayRef{});
    H = w_ih_.size(0) / G;
    C = w_ih_.size(1);
    check_tensor(fn, "w_ih", w_ih_, {G * H, C}, dtype, false);
    TORCH_CHECK(x.size(-1) == C, fn, ": expected x with ", C, " features (w_ih's input size), got shape ", x.sizes());
    TORCH_CHECK(!proj || mode == Mode::kLstm, fn, ": w_hr (projection) is only supported for mode 'lstm'");
    Hout = proj ? w_hr_->size(0) : H;
    if (proj) check_tensor(fn, "w_hr", *w_hr_, {Hout, H}, dtype, false);
    check_tensor(fn, "w_hh", w_hh_, {G * H, Hout}, dtype, false);
    check_optional(fn, "b_ih", b_ih_, {G * H}, dtype, false);
    check_optional(fn, "b_hh", b_hh_, {G * H}, dtype, false);
    TORCH_CHECK(h0_.defined() && h0_.dim() == 2, fn, ": expected h0 of shape (N, ", Hout, "), got ",
                h0_.defined() ? h0_.sizes() : at::IntArrayRef{});
    N = packed ? h0_.size(0) : x.size(1);  // packed: batch_sizes[0] is checked against it
    check_tensor(fn, "h0", h0_, {N, Hout}, dtype, false);
    if (mode == Mode::kLstm) {
      TORCH_CHECK(present(c0_), fn, ": expected c0 for mode 'lstm', got none");
      check_tensor(fn, "c0", *c0_, {N, H}, dtype, false);
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

  // The bias the forward row kernels add: b_ih + b_hh (G*H), or the GRU layout (4H), in the op-math dtype.
  at::Tensor row_bias() const {
    return mode == Mode::kGru ? gru_bias(b_ih, b_hh, H, dtype) : summed_bias(b_ih, b_hh, G * H, dtype);
  }
};

// out = a @ b into a view of a preallocated buffer.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// ---- small-batch recurrent GEMM (float32) ----
// A step's h W_hh^T at a few rows is a thin GEMM that a library call runs far from peak. The right-hand side B
// (K, groups * cols) is packed once per layer call into column panels of kPanel columns, K-major inside a panel, so
// each panel streams contiguously: each group of `cols` columns (a gate's H columns) is split into its own panels,
// zero-padded past the group's end, so that a range of panels covers the same hidden units of every gate. A step
// then runs all of its rows against one panel at a time with the rows' accumulators in registers.
// A panel is two float vectors wide: 16 columns with AVX2, 32 with AVX-512.
constexpr int64_t kPanel = 2 * Vectorized<float>::size();
// Layers of at most this many rows use the packed GEMM (measured at one thread, H = 512: faster than the library
// GEMM up to 16 rows, on par or faster at 64 and 128).
constexpr int64_t kSmallRows = 64;
// Layers of at most this many rows run the whole time loop in one parallel region (forward_sliced, backward_sliced).
// Measured on 2 cores, H = 512: on par with a parallel region per GEMM and per cell update at 16 rows, 10-20% slower
// at 32 and 64 rows, several times faster at 1 row with H = 128.
constexpr int64_t kSlicedRows = 16;

using VecF = Vectorized<float>;
constexpr int64_t kVecs = kPanel / VecF::size();  // vectors per panel row

// The buffer that holds the packed panels: one per calling thread, reused by its later calls (grown when needed,
// never shrunk; at most the size of the largest W_hh packed, rounded up to whole panels). A fresh buffer of several
// MiB per call costs a page fault per 4 KiB page on first touch.
float* panel_buffer(int64_t floats) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < floats) {
    buffer = at::Tensor();  // release the old one first
    buffer = empty_output({floats}, at::TensorOptions().dtype(at::kFloat));
  }
  return buffer.mutable_data_ptr<float>();
}

// At most one Panels may be alive per thread (they share the thread's panel_buffer).
struct Panels {
  int64_t K, cols, per_group, count;  // count = groups * per_group panels
  float* data;                        // panel i, row k at (i * K + k) * kPanel

  // B's element (k, g * cols + c) at b[k * sk + (g * cols + c) * sc].
  Panels(const float* b, int64_t sk, int64_t sc, int64_t K_, int64_t cols_, int64_t groups)
      : K(K_), cols(cols_), per_group((cols_ + kPanel - 1) / kPanel), count(groups * per_group) {
    data = panel_buffer(count * K * kPanel);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* dst = data + i * K * kPanel;
        const int64_t c0 = column(i), w = width(i);
        if (w < kPanel) std::fill(dst, dst + K * kPanel, 0.f);
        // read b along its contiguous dimension
        if (sk < sc) {
          // sk == 1: a transpose, in 8 x 8 tiles while they fit (measured 2x faster than element by element)
          int64_t k = 0;
          if (sk == 1 && w == kPanel) {
            for (; k + 8 <= K; k += 8)
              for (int64_t c = 0; c < w; c += 8)
                at::vec::transpose_mxn<float, 8, 8>(b + k + (c0 + c) * sc, sc, dst + k * kPanel + c, kPanel);
          }
          for (int64_t c = 0; c < w; ++c)
            for (int64_t kk = k; kk < K; ++kk) dst[kk * kPanel + c] = b[kk * sk + (c0 + c) * sc];
        } else {
          for (int64_t k = 0; k < K; ++k)
            for (int64_t c = 0; c < w; ++c) dst[k * kPanel + c] = b[k * sk + (c0 + c) * sc];
        }
      }
    });
  }
  const float* panel(int64_t i) const { return data + i * K * kPanel; }
  int64_t column(int64_t i) const { return (i / per_group) * cols + (i % per_group) * kPanel; }  // its first column
  int64_t width(int64_t i) const { return std::min(kPanel, cols - (i % per_group) * kPanel); }
};

// Rows a panel keeps in registers at once: 2 * kRows accumulators (12 of the 16 AVX2 registers, 24 of the 32 AVX-512
// ones), next to the panel row and the broadcast row value.
constexpr int kRows = VecF::size() == 16 ? 12 : 6;

// out rows [0, R) of one panel: out[r, c] (+)= sum_k a[r * lda + k] * panel[k, c] for c < w. R <= kRows rows in
// registers; with few rows, U independent partial sums over k hide the FMA latency.
template <int R>
void panel_rows(const float* a, int64_t lda, const float* panel, int64_t K, float* out, int64_t ldo, int64_t w,
                bool accumulate) {
  constexpr int U = R >= 4 ? 1 : 4 / R;
  VecF acc[U][R][kVecs];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) acc[u][r][v] = VecF(0.f);
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      VecF wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = VecF::loadu(panel + (k + u) * kPanel + v * VecF::size());
      for (int r = 0; r < R; ++r) {
        const VecF av(a[r * lda + k + u]);
        for (int v = 0; v < kVecs; ++v) acc[u][r][v] = at::vec::fmadd(av, wv[v], acc[u][r][v]);
      }
    }
  }
  for (; k < K; ++k) {
    VecF wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = VecF::loadu(panel + k * kPanel + v * VecF::size());
    for (int r = 0; r < R; ++r) {
      const VecF av(a[r * lda + k]);
      for (int v = 0; v < kVecs; ++v) acc[0][r][v] = at::vec::fmadd(av, wv[v], acc[0][r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float tile[kPanel];
    for (int v = 0; v < kVecs; ++v) {
      VecF s = acc[0][r][v];
      for (int u = 1; u < U; ++u) s = s + acc[u][r][v];
      s.store(tile + v * VecF::size());
    }
    float* o = out + r * ldo;
    if (accumulate) {
      for (int64_t c = 0; c < w; ++c) o[c] += tile[c];
    } else {
      std::memcpy(o, tile, w * sizeof(float));
    }
  }
}

// panel_rows<rows> for 1 <= rows <= R.
template <int R>
void panel_tail(int64_t rows, const float* a, int64_t lda, const float* panel, int64_t K, float* out, int64_t ldo,
                int64_t w, bool accumulate) {
  if (rows == R) {
    panel_rows<R>(a, lda, panel, K, out, ldo, w, accumulate);
  } else if constexpr (R > 1) {
    panel_tail<R - 1>(rows, a, lda, panel, K, out, ldo, w, accumulate);
  }
}

// The columns of panel i of out (M, B.cols * groups) row stride ldo (+)= a (M, K) row stride lda @ B, the rows in
// blocks of equal size (at most kRows each: 8 rows run as 4 + 4, not 6 + 2).
void panel_gemm(const Panels& B, int64_t i, const float* a, int64_t lda, int64_t M, float* out, int64_t ldo,
                bool accumulate) {
  const int64_t blocks = (M + kRows - 1) / kRows;
  out += B.column(i);
  for (int64_t b = 0, m = 0; b < blocks; ++b) {
    const int64_t rows = M / blocks + (b < M % blocks ? 1 : 0);
    panel_tail<kRows>(rows, a + m * lda, lda, B.panel(i), B.K, out + m * ldo, ldo, B.width(i), accumulate);
    m += rows;
  }
}

// out (M, B.cols * groups) row stride ldo (+)= a (M, K) row stride lda @ B. Panels in parallel.
void packed_gemm(const Panels& B, const float* a, int64_t lda, int64_t M, float* out, int64_t ldo, bool accumulate) {
  // about 64K multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * B.K * kPanel));
  at::parallel_for(0, B.count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) panel_gemm(B, i, a, lda, M, out, ldo, accumulate);
  });
}

// ---- the time loop in one parallel region (float32, few rows) ----
// With few rows a step is too short for a parallel region per GEMM and per cell update (each costs microseconds of
// fork and join). Instead the whole time loop runs inside one region: worker w owns hidden units [j0, j1) (whole
// panels) of every gate, computes their part of the step and meets the others at a barrier once per step, where the
// step needs all of h (forward) or all of the gate gradients (backward).

// A spinning barrier for the workers of one at::parallel_for(0, parts, 1, ...): a worker that was handed the parts
// [begin, end) counts for end - begin of them (at::parallel_for runs several parts on one thread when it has fewer
// threads, and all of them inline inside another parallel region), so it never waits for a worker that does not
// exist. Spins, then yields, so that an oversubscribed machine still moves on.
class Barrier {
 public:
  explicit Barrier(int64_t parts) : parts_(parts) {}
  void wait(int64_t weight) {
    const int64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(weight, std::memory_order_acq_rel) + weight == parts_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins > 4096) std::this_thread::yield();
    }
  }

 private:
  const int64_t parts_;
  std::atomic<int64_t> count_{0}, gen_{0};
};

// Workers for a loop whose steps run rows x cols x K multiply-adds on `panels` hidden-unit panels: at most one per
// thread and per panel, and about 32K multiply-adds of a step each (fewer steps do not repay a barrier).
int64_t worker_count(int64_t rows, int64_t cols, int64_t K, int64_t panels) {
  const int64_t by_work = std::max<int64_t>(1, rows * cols * K / 32768);
  return std::max<int64_t>(1, std::min({static_cast<int64_t>(at::get_num_threads()), panels, by_work}));
}

// Runs body(p0, p1, weight, barrier) on `workers` workers in one parallel region; the worker of parts [b, e)
// owns panels [p0, p1) of `panels` (parts split them evenly) and has weight e - b at the barrier.
template <typename F>
void run_workers(int64_t workers, int64_t panels, const F& body) {
  Barrier barrier(workers);
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    body(b * panels / workers, e * panels / workers, e - b, barrier);
  });
}

// ---- the cell update of one row of a step ----
// The forward cell update of row r of step k over hidden units [j0, j1), reading its inputs from and writing its
// outputs into the sequence buffers (rows = S.total): gates (rows, gw) x W_ih^T in its first G*H columns, the
// activated gates out; hg (N, G*H) h W_hh^T of the step; h0 (N, H), c0 (N, H) (LSTM, else null); bias as
// Layer::row_bias; y (rows, H) h of every step (the GRU's previous h); h_raw (rows, H) where the LSTM writes
// o * tanh(c) (y without projection); c_all (rows, H) c of every step (LSTM, else null).
template <typename scalar_t>
struct ForwardRow {
  Mode mode;
  int64_t H, gw;
  scalar_t* gates;
  scalar_t* hg;  // written by the step's recurrent GEMM, read here
  const scalar_t* h0;
  const scalar_t* c0;
  const at::opmath_type<scalar_t>* bias;
  scalar_t* y;
  scalar_t* h_raw;
  scalar_t* c_all;

  void operator()(const Schedule& S, int64_t k, int64_t r, int64_t j0, int64_t j1) const {
    const int64_t row = S.off[k] + r, prev_row = k > 0 ? S.off[k - 1] + r : 0;
    const bool continues = r < S.prev[k];
    scalar_t* g = gates + row * gw;
    const scalar_t* hg_row = hg + r * gate_count(mode) * H;
    switch (mode) {
      case Mode::kLstm: {
        const scalar_t* cx = continues ? c_all + prev_row * H : c0 + r * H;
        over_h([&](auto vec, int64_t j) {
          return lstm_fwd_span<scalar_t, decltype(vec)::value, false>(j, j1, H, g, hg_row, cx, bias, nullptr,
                                                                      h_raw + row * H, c_all + row * H, g);
        }, j0);
        break;
      }
      case Mode::kGru: {
        const scalar_t* hx = continues ? y + prev_row * H : h0 + r * H;
        over_h([&](auto vec, int64_t j) {
          return gru_fwd_span<scalar_t, decltype(vec)::value>(j, j1, H, g, hg_row, hx, bias, y + row * H, g);
        }, j0);
        break;
      }
      case Mode::kRnnTanh:
      case Mode::kRnnRelu: {
        const bool relu = mode == Mode::kRnnRelu;
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return relu ? rnn_fwd_span<scalar_t, kVec, true>(j, j1, g, hg_row, bias, y + row * H)
                      : rnn_fwd_span<scalar_t, kVec, false>(j, j1, g, hg_row, bias, y + row * H);
        }, j0);
        break;
      }
    }
  }
};

// The backward cell update of row r of step k over hidden units [j0, j1): dh (N, H) d h_t of the step's rows in
// (the GRU writes the direct term d h_{t-1} = d h_t * z back); dhy (N, H) the LSTM's d(o * tanh(c)) (dh without
// projection); dc (N, H) d c_t in, d c_{t-1} out (LSTM, else null); h_seq (rows, H) h of every step; ws (rows, 4H)
// the saved gates (LSTM, GRU); c_all (rows, H) (LSTM); h0, c0 (N, H); dgi, dgh (rows, G*H) the gate gradients out
// (dgh: the GRU's recurrent side, else the same as dgi).
template <typename scalar_t>
struct BackwardRow {
  Mode mode;
  int64_t H;
  scalar_t* dh;
  const scalar_t* dhy;
  scalar_t* dc;
  const scalar_t* h_seq;
  const scalar_t* ws;
  const scalar_t* c_all;
  const scalar_t* h0;
  const scalar_t* c0;
  scalar_t* dgi;
  scalar_t* dgh;

  void operator()(const Schedule& S, int64_t k, int64_t r, int64_t j0, int64_t j1) const {
    const int64_t row = S.off[k] + r, prev_row = k > 0 ? S.off[k - 1] + r : 0, GH = gate_count(mode) * H;
    const bool continues = r < S.prev[k];
    switch (mode) {
      case Mode::kLstm: {
        const scalar_t* cx = continues ? c_all + prev_row * H : c0 + r * H;
        // the kernel reads each element of dc before writing it
        over_h([&](auto vec, int64_t j) {
          return lstm_bwd_span<scalar_t, decltype(vec)::value, false>(j, j1, H, dhy + r * H, dc + r * H, cx,
                                                                      c_all + row * H, ws + row * 4 * H, nullptr,
                                                                      dgi + row * GH, dc + r * H, nullptr);
        }, j0);
        break;
      }
      case Mode::kGru: {
        const scalar_t* hx = continues ? h_seq + prev_row * H : h0 + r * H;
        over_h([&](auto vec, int64_t j) {
          return gru_bwd_span<scalar_t, decltype(vec)::value>(j, j1, H, dh + r * H, hx, ws + row * 4 * H,
                                                              dgi + row * GH, dgh + row * GH, dh + r * H);
        }, j0);
        break;
      }
      case Mode::kRnnTanh:
      case Mode::kRnnRelu: {
        const bool relu = mode == Mode::kRnnRelu;
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return relu ? rnn_bwd_span<scalar_t, kVec, true>(j, j1, dh + r * H, h_seq + row * H, dgi + row * H)
                      : rnn_bwd_span<scalar_t, kVec, false>(j, j1, dh + r * H, h_seq + row * H, dgi + row * H);
        }, j0);
        break;
      }
    }
  }
};

// The forward time loop of a float32 layer without projection in one parallel region. W: W_hh^T packed (K = H,
// G groups of H columns); cell: the row update and its buffers (h_raw = y).
void forward_sliced(const Schedule& S, const Panels& W, const ForwardRow<float>& cell) {
  const int64_t H = cell.H, G = gate_count(cell.mode), GH = G * H;
  float* hg = cell.hg;
  const int64_t workers = worker_count(S.N, GH, H, W.per_group);
  run_workers(workers, W.per_group, [&](int64_t p0, int64_t p1, int64_t weight, Barrier& barrier) {
    const int64_t j0 = p0 * kPanel, j1 = std::min(p1 * kPanel, H);
    for (int64_t k = 0; k < S.T; ++k) {
      const int64_t n = S.rows[k], np = S.prev[k], off_prev = k > 0 ? S.off[k - 1] : 0;
      // this worker's columns of h W_hh^T for every gate
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i = g * W.per_group + p;
          if (np > 0) panel_gemm(W, i, cell.y + off_prev * H, H, np, hg, GH, false);
          if (n > np) panel_gemm(W, i, cell.h0 + np * H, H, n - np, hg + np * GH, GH, false);
        }
      }
      for (int64_t r = 0; r < n; ++r) cell(S, k, r, j0, j1);
      barrier.wait(weight);  // the next step reads all of h
    }
  });
}

// The backward time loop of a float32 layer without projection in one parallel region. W: W_hh packed (K = G*H,
// H columns); dy (rows, H); cell: the row update and its buffers (dhy = dh).
void backward_sliced(const Schedule& S, const Panels& W, const float* dy, const BackwardRow<float>& cell) {
  const int64_t H = cell.H, GH = gate_count(cell.mode) * H;
  const bool gru = cell.mode == Mode::kGru;
  const int64_t workers = worker_count(S.N, H, GH, W.per_group);
  run_workers(workers, W.per_group, [&](int64_t p0, int64_t p1, int64_t weight, Barrier& barrier) {
    const int64_t j0 = p0 * kPanel, j1 = std::min(p1 * kPanel, H);
    for (int64_t k = S.T - 1; k >= 0; --k) {
      const int64_t n = S.rows[k], off = S.off[k];
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = j0; j < j1; ++j) cell.dh[r * H + j] += dy[(off + r) * H + j];
        cell(S, k, r, j0, j1);
      }
      barrier.wait(weight);  // the recurrent GEMM reads every gate gradient of the step
      // d h_{t-1} (this worker's columns) = dgates W_hh (+ the direct term for GRU)
      for (int64_t p = p0; p < p1; ++p) panel_gemm(W, p, cell.dgh + off * GH, GH, n, cell.dh, H, gru);
    }
  });
}

// Runs row(r) for r in [0, n), rows in parallel; width = elements of work per row.
template <typename F>
void for_rows(int64_t n, int64_t width, const F& row) {
  at::parallel_for(0, n, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(r);
  });
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
  const int64_t H = L.H, Hout = L.Hout, GH = L.G * L.H;
  const bool lstm = L.mode == Mode::kLstm, gru = L.mode == Mode::kGru;
  const auto opts = L.x2d.options();

  // Sequence buffers, (S.total, .): y = h of every step (projected for LSTM with w_hr); c of every step (LSTM);
  // o * tanh(c) before the projection. gates: x W_ih^T of every step in its first G*H columns, which the cell
  // kernels overwrite in place with the activated gates (LSTM [i, f, g, o], GRU [r, z, n, hn]: 4H columns).
  at::Tensor y = empty_output({S.total, Hout}, opts);
  at::Tensor c_all = lstm ? empty_output({S.total, H}, opts) : at::Tensor();
  at::Tensor h_raw = L.proj ? empty_output({S.total, H}, opts) : at::Tensor();
  at::Tensor h_n = L.h0.clone();
  at::Tensor c_n = lstm ? L.c0.clone() : at::Tensor();
  const int64_t gw = lstm || gru ? 4 * H : H;  // row stride of gates
  at::Tensor gates = empty_output({S.total, gw}, opts);
  mm_into(gates.narrow(1, 0, GH), L.x2d, L.w_ih.t());
  at::Tensor hg = at::empty({L.N, GH}, opts);  // h W_hh^T of the current step
  const at::Tensor w_hh_t = L.w_hh.t(), w_hr_t = L.proj ? L.w_hr.t() : at::Tensor();
  // float32 steps of at most kSmallRows rows run the packed GEMM on W_hh^T (K = Hout, G groups of H columns).
  const bool small = L.dtype == at::kFloat &&
                     std::any_of(S.rows.begin(), S.rows.end(), [](int64_t n) { return n <= kSmallRows; });
  const std::optional<Panels> w_pack =
      small ? std::optional<Panels>(std::in_place, L.w_hh.const_data_ptr<float>(), 1, Hout, Hout, H, L.G)
            : std::nullopt;
  // Otherwise a GEMM of a few rows with W_hh^T is a matrix-vector product, which runs faster (measured ~25% with MKL
  // at H = 512) streaming a row-major copy of W_hh^T than reading W_hh's rows as columns.
  constexpr int64_t kFewRows = 8;
  const bool few = !small && std::any_of(S.rows.begin(), S.rows.end(), [](int64_t n) { return n < kFewRows; });
  const at::Tensor w_hh_tc = few ? w_hh_t.contiguous() : at::Tensor();
  // out = a W_hh^T for a step's rows a.
  auto recurrent_mm = [&](at::Tensor out, const at::Tensor& a) {
    const int64_t rows = a.size(0);
    if (small && rows <= kSmallRows) {
      packed_gemm(*w_pack, a.const_data_ptr<float>(), a.stride(0), rows, out.mutable_data_ptr<float>(),
                  out.stride(0), false);
    } else {
      mm_into(out, a, rows < kFewRows ? w_hh_tc : w_hh_t);
    }
  };
  // Rows that take their last step at step k leave their state in h_n, c_n.
  auto finish_rows = [&](int64_t k) {
    const int64_t n = S.rows[k], d = S.done[k];  // rows [d, n) end here
    if (n > d) {
      h_n.narrow(0, d, n - d).copy_(y.narrow(0, S.off[k] + d, n - d));
      if (lstm) c_n.narrow(0, d, n - d).copy_(c_all.narrow(0, S.off[k] + d, n - d));
    }
  };
  const at::Tensor bias = L.row_bias();

  // The row update over this call's buffers, in the element type of `tag`.
  auto forward_row = [&](auto tag) {
    using T = decltype(tag);
    T* y_p = y.mutable_data_ptr<T>();
    return ForwardRow<T>{L.mode,
                         H,
                         gw,
                         gates.mutable_data_ptr<T>(),
                         hg.mutable_data_ptr<T>(),
                         L.h0.const_data_ptr<T>(),
                         lstm ? L.c0.const_data_ptr<T>() : nullptr,
                         bias.const_data_ptr<at::opmath_type<T>>(),
                         y_p,
                         L.proj ? h_raw.mutable_data_ptr<T>() : y_p,
                         lstm ? c_all.mutable_data_ptr<T>() : nullptr};
  };
  if (small && L.N <= kSlicedRows && !L.proj) {
    forward_sliced(S, *w_pack, forward_row(float{}));
    for (int64_t k = 0; k < S.T; ++k) finish_rows(k);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, L.dtype, "rnn_layer_fwd", [&] {
      const ForwardRow<scalar_t> cell = forward_row(scalar_t{});
      const int64_t width = lstm ? 10 * H : gru ? 12 * H : 3 * H;  // work per row
      for (int64_t k = 0; k < S.T; ++k) {
        const int64_t n = S.rows[k], np = S.prev[k], off = S.off[k], off_prev = k > 0 ? S.off[k - 1] : 0;
        if (np > 0) recurrent_mm(hg.narrow(0, 0, np), y.narrow(0, off_prev, np));
        if (n > np) recurrent_mm(hg.narrow(0, np, n - np), L.h0.narrow(0, np, n - np));
        for_rows(n, width, [&](int64_t r) { cell(S, k, r, 0, H); });
        if (L.proj) mm_into(y.narrow(0, off, n), h_raw.narrow(0, off, n), w_hr_t);
        finish_rows(k);
      }
    });
  }

  // saved: [h of every step (a copy: y is returned to the caller), gates (LSTM, GRU), c (LSTM), o*tanh(c) (w_hr)]
  std::vector<at::Tensor> saved{empty_output({S.total, Hout}, opts).copy_(y)};
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
    check_tensor(fn, "dy", dy, {S.total, Hout}, L.dtype, false);
  } else {
    check_tensor(fn, "dy", dy, {S.T, N, Hout}, L.dtype, false);
  }
  check_tensor(fn, "dh_n", dh_n, {N, Hout}, L.dtype, false);
  if (lstm) {
    check_optional(fn, "dc_n", dc_n, {N, H}, L.dtype, false);
  } else {
    TORCH_CHECK(!present(dc_n), fn, ": expected no dc_n for mode '", mode, "'");
  }
  const size_t n_saved = 1 + (lstm || gru) + lstm + L.proj;
  TORCH_CHECK(saved.size() == n_saved, fn, ": expected ", n_saved, " saved tensors (rnn_layer_fwd's), got ",
              saved.size());
  const at::Tensor& h_seq = saved[0];
  check_tensor(fn, "saved[0] (h)", h_seq, {S.total, Hout}, L.dtype);
  const at::Tensor ws = lstm || gru ? saved[1] : at::Tensor();
  if (ws.defined()) check_tensor(fn, "saved[1] (gates)", ws, {S.total, 4 * H}, L.dtype);
  const at::Tensor c_all = lstm ? saved[2] : at::Tensor();
  if (lstm) check_tensor(fn, "saved[2] (c)", c_all, {S.total, H}, L.dtype);
  const at::Tensor h_raw = L.proj ? saved[3] : at::Tensor();
  if (L.proj) check_tensor(fn, "saved[3] (o*tanh(c))", h_raw, {S.total, H}, L.dtype);

  const at::Tensor dy2d = dy.contiguous().view({S.total, Hout});
  // dh_state / dc_state rows [0, n) hold the gradient flowing into h / c of the current step from later steps (and
  // dh_n / dc_n for rows that end there); once every step has run they hold dh0 / dc0.
  at::Tensor dh_state = dh_n.contiguous().clone();
  at::Tensor dc_state = lstm ? (present(dc_n) ? dc_n->contiguous().clone() : at::zeros({N, H}, opts)) : at::Tensor();
  // d(pre-activation gates) of every step; GRU's differ between the input and the recurrent side (n gate).
  at::Tensor dgi = empty_output({S.total, GH}, opts);
  at::Tensor dgh = gru ? empty_output({S.total, GH}, opts) : dgi;
  // With a projection: dh of every step (for dW_hr) and d(o * tanh(c)) of the current step.
  at::Tensor dh_all = L.proj ? empty_output({S.total, Hout}, opts) : at::Tensor();
  at::Tensor dh_raw = L.proj ? at::empty({N, H}, opts) : at::Tensor();
  // dh += dgates W_hh for a step's rows: float32 steps of at most kSmallRows rows run the packed GEMM on W_hh (K = GH,
  // Hout columns).
  const bool small = L.dtype == at::kFloat &&
                     std::any_of(S.rows.begin(), S.rows.end(), [](int64_t n) { return n <= kSmallRows; });
  const std::optional<Panels> w_pack =
      small ? std::optional<Panels>(std::in_place, L.w_hh.const_data_ptr<float>(), Hout, 1, GH, Hout, 1)
            : std::nullopt;
  auto recurrent_mm = [&](at::Tensor out, const at::Tensor& dg, bool accumulate) {
    const int64_t rows = dg.size(0);
    if (small && rows <= kSmallRows) {
      packed_gemm(*w_pack, dg.const_data_ptr<float>(), dg.stride(0), rows, out.mutable_data_ptr<float>(),
                  out.stride(0), accumulate);
    } else if (accumulate) {
      out.addmm_(dg, L.w_hh);
    } else {
      mm_into(out, dg, L.w_hh);
    }
  };

  // The row update over this call's buffers, in the element type of `tag`.
  auto backward_row = [&](auto tag) {
    using T = decltype(tag);
    T* dh_p = dh_state.mutable_data_ptr<T>();
    return BackwardRow<T>{L.mode,
                          H,
                          dh_p,
                          L.proj ? dh_raw.const_data_ptr<T>() : dh_p,
                          lstm ? dc_state.mutable_data_ptr<T>() : nullptr,
                          h_seq.const_data_ptr<T>(),
                          ws.defined() ? ws.const_data_ptr<T>() : nullptr,
                          lstm ? c_all.const_data_ptr<T>() : nullptr,
                          L.h0.const_data_ptr<T>(),
                          lstm ? L.c0.const_data_ptr<T>() : nullptr,
                          dgi.mutable_data_ptr<T>(),
                          dgh.mutable_data_ptr<T>()};
  };
  if (small && N <= kSlicedRows && !L.proj) {
    backward_sliced(S, *w_pack, dy2d.const_data_ptr<float>(), backward_row(float{}));
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, L.dtype, "rnn_layer_bwd", [&] {
      const BackwardRow<scalar_t> cell = backward_row(scalar_t{});
      const int64_t width = lstm ? 12 * H : gru ? 13 * H : 3 * H;  // work per row
      for (int64_t k = S.T - 1; k >= 0; --k) {
        const int64_t n = S.rows[k], off = S.off[k];
        if (L.proj) {
          at::Tensor dh = dh_all.narrow(0, off, n);
          at::add_out(dh, dh_state.narrow(0, 0, n), dy2d.narrow(0, off, n));
          mm_into(dh_raw.narrow(0, 0, n), dh, L.w_hr);
        } else {
          dh_state.narrow(0, 0, n).add_(dy2d.narrow(0, off, n));
        }
        for_rows(n, width, [&](int64_t r) { cell(S, k, r, 0, H); });
        // d h_{t-1} = dgates W_hh (+ the GRU's direct term d h_t * z, which the row update left in dh_state)
        recurrent_mm(dh_state.narrow(0, 0, n), dgh.narrow(0, off, n), gru);
      }
    });
  }

  // dW_hh = sum over steps of dgates_hh^T h_prev, as one GEMM over h_prev gathered per step (rows that continue
  // from the previous step, then rows that start from h0). With every step on all N rows h_prev is h0 followed by
  // h of the sequence shifted by a step, but splitting the GEMM there makes one of rank N, which the library GEMM
  // runs far from peak at small N (profiled at N = 1, H = 512, T = 100: 1.75 ms for the rank-1 part, 1.2 ms for the
  // other 99 steps; the gather: ~10 us).
  at::Tensor dw_hh;
  if (S.T == 0) {
    dw_hh = at::zeros({GH, Hout}, opts);
  } else {
    at::Tensor h_prev = empty_output({S.total, Hout}, opts);
    const auto* hs = static_cast<const char*>(h_seq.const_data_ptr());
    const auto* h0b = static_cast<const char*>(L.h0.const_data_ptr());
    auto* hp = static_cast<char*>(h_prev.mutable_data_ptr());
    const int64_t row_bytes = Hout * static_cast<int64_t>(h_seq.element_size());
    at::parallel_for(0, S.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t np = S.prev[k], off = S.off[k];
        if (np > 0) std::memcpy(hp + off * row_bytes, hs + S.off[k - 1] * row_bytes, np * row_bytes);
        if (S.rows[k] > np) {
          std::memcpy(hp + (off + np) * row_bytes, h0b + np * row_bytes, (S.rows[k] - np) * row_bytes);
        }
      }
    });
    dw_hh = empty_output({GH, Hout}, opts);
    mm_into(dw_hh, dgh.t(), h_prev);
  }
  at::Tensor dx = empty_output(x.sizes(), opts);
  mm_into(dx.view({S.total, L.C}), dgi, L.w_ih);
  at::Tensor dw_ih = empty_output({GH, L.C}, opts);
  mm_into(dw_ih, dgi.t(), L.x2d);
  at::Tensor db_ih = L.b_ih.defined() ? dgi.sum(0) : at::Tensor();
  at::Tensor db_hh;
  if (L.b_hh.defined()) db_hh = gru ? dgh.sum(0) : (db_ih.defined() ? db_ih.clone() : dgi.sum(0));
  at::Tensor dw_hr = L.proj ? at::mm(dh_all.t(), h_raw) : at::Tensor();
  at::Tensor dc0 = lstm ? dc_state : at::Tensor();
  return {dx, dh_state, dc0, {dw_ih, dw_hh, db_ih, db_hh, dw_hr}};
}

}  // namespace fastseq::cpu
