// CPU step kernels of the recurrent layers (csrc/rnn_layer.h's CellSteps): the time loop is csrc/rnn_layer.cpp's;
// this file gives it the fused cell row kernels of rnn_cell_kernels.h, which read their rows straight out of the
// sequence buffers and write h, c and the activated gates straight into them, in place (no per-step allocation),
// the recurrent GEMMs, and the whole time loop in one parallel region for float32 layers of few rows. Gate math in
// at::opmath_type<scalar_t>; buffers in the input dtype. Supported dtypes: float32, float64, bfloat16. The per-step
// recurrent GEMMs (h W_hh^T forward, dgates W_hh backward) of float32 steps with few rows run a hand-written GEMM on
// W_hh packed once per call (layers of more than one step), or for one row the cells' matrix-vector products on
// W_hh as it is (forward); others call the library GEMM. Float32 layers of few rows without projection run the
// whole time loop in one parallel region, the hidden units split between threads (forward_sliced, backward_sliced).
#include "rnn_layer.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "cpu/memory.h"
#include "cpu/rnn_cell_kernels.h"

namespace fastseq::cpu {
namespace {

using namespace cell;

// out = a @ b into a view of a preallocated buffer.
void mm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor o = out;
  at::mm_out(o, a, b);
}

// ---- small-batch recurrent GEMM (float32) ----
// A step's h W_hh^T at a few rows is a thin GEMM that a library call runs far from peak. The right-hand side B
// (K, groups * cols) is packed once per layer call into column panels of kPanel columns, K-major inside a panel, so
// each panel streams contiguously: each group of `cols` columns (a gate's H columns) is split into its own panels,
// zero-padded past the group's end, so that a range of panels covers the same hidden units of every gate. A step
// then runs all of its rows against one panel at a time with the rows' accumulators in registers.
// A panel is two float vectors wide: 16 columns with AVX2, 32 with AVX-512.
constexpr int64_t kPanel = 2 * Vectorized<float>::size();

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


// ---- the cell update of rows of a step ----
// The forward cell update of rows [r0, r1) of a step segment over hidden units [j0, j1). bias: as CpuSteps::bias;
// peep: (3H) opmath, or null.
template <typename T>
void forward_rows(Mode mode, int64_t H, const StepFwd& s, const at::opmath_type<T>* bias,
                  const at::opmath_type<T>* peep, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* ig = s.gi.at<T>() + r * s.gi.stride();
    const T* hg = s.hg.at<T>() + r * s.hg.stride();
    T* h = s.h.at<T>() + r * s.h.stride();
    switch (mode) {
      case Mode::kLstm:
      case Mode::kPeepholeLstm: {
        const T* cx = s.c_prev.at<T>() + r * s.c_prev.stride();
        T* cy = s.c.at<T>() + r * s.c.stride();
        T* ws = s.gates.at<T>() + r * s.gates.stride();
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return peep ? lstm_fwd_span<T, kVec, true>(j, j1, H, ig, hg, cx, bias, peep, h, cy, ws)
                      : lstm_fwd_span<T, kVec, false>(j, j1, H, ig, hg, cx, bias, nullptr, h, cy, ws);
        }, j0);
        break;
      }
      case Mode::kGru: {
        const T* hx = s.h_prev.at<T>() + r * s.h_prev.stride();
        T* ws = s.gates.at<T>() + r * s.gates.stride();
        over_h([&](auto vec, int64_t j) {
          return gru_fwd_span<T, decltype(vec)::value>(j, j1, H, ig, hg, hx, bias, h, ws);
        }, j0);
        break;
      }
      case Mode::kRnnTanh:
      case Mode::kRnnRelu: {
        const bool relu = mode == Mode::kRnnRelu;
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return relu ? rnn_fwd_span<T, kVec, true>(j, j1, ig, hg, bias, h)
                      : rnn_fwd_span<T, kVec, false>(j, j1, ig, hg, bias, h);
        }, j0);
        break;
      }
    }
  }
}

// The backward cell update of rows [r0, r1) of a step segment over hidden units [j0, j1); peep as forward_rows.
// The kernels read each element of dc (lstm) and dh (gru) before writing it, so dc_out / dh_out may alias them.
template <typename T>
void backward_rows(Mode mode, int64_t H, const StepBwd& s, const at::opmath_type<T>* peep, int64_t r0, int64_t r1,
                   int64_t j0, int64_t j1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* dh = s.dh.at<T>() + r * s.dh.stride();
    T* dgi = s.dgi.at<T>() + r * s.dgi.stride();
    switch (mode) {
      case Mode::kLstm:
      case Mode::kPeepholeLstm: {
        const T* dc = s.dc.at<T>() + r * s.dc.stride();
        const T* cx = s.c_prev.at<T>() + r * s.c_prev.stride();
        const T* cy = s.c.at<T>() + r * s.c.stride();
        const T* ws = s.gates.at<T>() + r * s.gates.stride();
        T* dcx = s.dc_out.at<T>() + r * s.dc_out.stride();
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return peep ? lstm_bwd_span<T, kVec, true>(j, j1, H, dh, dc, cx, cy, ws, peep, dgi, dcx, nullptr)
                      : lstm_bwd_span<T, kVec, false>(j, j1, H, dh, dc, cx, cy, ws, nullptr, dgi, dcx, nullptr);
        }, j0);
        break;
      }
      case Mode::kGru: {
        const T* hx = s.h_prev.at<T>() + r * s.h_prev.stride();
        const T* ws = s.gates.at<T>() + r * s.gates.stride();
        T* dgh = s.dgh.at<T>() + r * s.dgh.stride();
        T* dhx = s.dh_out.at<T>() + r * s.dh_out.stride();
        over_h([&](auto vec, int64_t j) {
          return gru_bwd_span<T, decltype(vec)::value>(j, j1, H, dh, hx, ws, dgi, dgh, dhx);
        }, j0);
        break;
      }
      case Mode::kRnnTanh:
      case Mode::kRnnRelu: {
        const bool relu = mode == Mode::kRnnRelu;
        const T* hy = s.h.at<T>() + r * s.h.stride();
        over_h([&](auto vec, int64_t j) {
          constexpr bool kVec = decltype(vec)::value;
          return relu ? rnn_bwd_span<T, kVec, true>(j, j1, dh, hy, dgi) : rnn_bwd_span<T, kVec, false>(j, j1, dh, hy, dgi);
        }, j0);
        break;
      }
    }
  }
}

// Runs row(r) for r in [0, n), rows in parallel; width = elements of work per row.
template <typename F>
void for_rows(int64_t n, int64_t width, const F& row) {
  at::parallel_for(0, n, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(r);
  });
}

// Layers of at most this many rows use the packed GEMM (measured at one thread, H = 512: faster than the library
// GEMM up to 16 rows, on par or faster at 64 and 128).
constexpr int64_t kSmallRows = 64;
// Layers of at most this many rows run the whole time loop in one parallel region (forward_sliced, backward_sliced).
// Measured on 2 cores, H = 512: on par with a parallel region per GEMM and per cell update at 16 rows, 10-20% slower
// at 32 and 64 rows, several times faster at 1 row with H = 128.
constexpr int64_t kSlicedRows = 16;
// Otherwise a GEMM of a few rows with W_hh^T is a matrix-vector product, which runs faster (measured ~25% with MKL
// at H = 512) streaming a row-major copy of W_hh^T than reading W_hh's rows as columns.
constexpr int64_t kFewRows = 8;
// A copy of W_hh (the packed panels, W_hh^T) costs about two passes over W_hh (a read and a write), repaid only
// over more than one step, each of which reads W_hh once: a layer of one step (rows of x per row of the batch, the
// average length of packed sequences) multiplies W_hh as it is in its backward, and in its forward at most
// kDotRows rows (dots()). Measured on 2 cores, H = 512: at T = 1 forward+backward 1.2-1.9x faster at N in {1, 16};
// at T = 2 the copies are even or ahead. A one-step forward of 16-64 rows still packs W_hh: the library GEMM on
// W_hh^T there is 5-10% slower than packing and the packed GEMM (measured alternated in one process).
constexpr int64_t kCopyMinSteps = 2;

class CpuSteps final : public CellSteps {
 public:
  explicit CpuSteps(const Layer& layer)
      : CellSteps(layer),
        dtype_(layer.x2d.scalar_type()),
        copies_w_hh_(layer.x2d.size(0) >= kCopyMinSteps * std::max<int64_t>(layer.N, 1)) {
    TORCH_CHECK(layer.x2d.device().is_cpu(), "rnn_layer (CPU): expected CPU tensors, got ", layer.x2d.device());
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble || dtype_ == at::kBFloat16,
                "rnn_layer (CPU): expected x of dtype Float, Double or BFloat16, got ", dtype_);
    const std::optional<at::Tensor> b_ih(L.b_ih), b_hh(L.b_hh);
    bias_ = L.gru() ? gru_bias(b_ih, b_hh, L.H, dtype_) : summed_bias(b_ih, b_hh, L.G * L.H, dtype_);
    if (L.peephole.defined()) peep_ = L.peephole.to(at::toOpMathType(dtype_)).contiguous();
  }

  bool in_place() const override { return true; }
  at::Tensor empty(at::IntArrayRef sizes) const override { return empty_output(sizes, L.x2d.options()); }

  void forward(const StepFwd& s) override {
    const int64_t H = L.H, width = L.lstm() ? 10 * H : L.gru() ? 12 * H : 3 * H;  // work per row
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype_, "rnn_layer_fwd", [&] {
      const auto* bias = bias_.const_data_ptr<at::opmath_type<scalar_t>>();
      const auto* peep = peep_.defined() ? peep_.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
      for_rows(s.n, width, [&](int64_t r) { forward_rows<scalar_t>(L.mode(), H, s, bias, peep, r, r + 1, 0, H); });
    });
  }

  void backward(const StepBwd& s) override {
    const int64_t H = L.H, width = L.lstm() ? 12 * H : L.gru() ? 13 * H : 3 * H;  // work per row
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype_, "rnn_layer_bwd", [&] {
      const auto* peep = peep_.defined() ? peep_.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
      for_rows(s.n, width, [&](int64_t r) { backward_rows<scalar_t>(L.mode(), H, s, peep, r, r + 1, 0, H); });
    });
  }

  // Float32 sequences of at most kDotRows rows in all (a step or two of one or two rows: decoding) run
  // cell::dot_mm, others the library GEMM.
  void input_projection(const at::Tensor& out) override {
    if (!dot_mm_fits(L.x2d, L.w_ih) || !L.w_ih.is_contiguous()) return CellSteps::input_projection(out);
    dot_mm(L.x2d.const_data_ptr<float>(), L.x2d.size(1), L.x2d.size(0), L.x2d.size(1),
           L.w_ih.const_data_ptr<float>(), L.w_ih.size(0), out.mutable_data_ptr<float>(), out.stride(0));
  }

  // Float32 layers where dots() run cell::dot_mm on W_hh as it is (no packed copy); other float32 steps of at
  // most kSmallRows rows the packed GEMM on W_hh^T (K = Hout, G groups of H columns).
  void recurrent_fwd(const at::Tensor& out, const at::Tensor& h) override {
    const int64_t rows = h.size(0);
    if (dots()) {
      dot_mm(h.const_data_ptr<float>(), h.stride(0), rows, L.Hout, L.w_hh.const_data_ptr<float>(), L.G * L.H,
             out.mutable_data_ptr<float>(), out.stride(0));
    } else if (dtype_ == at::kFloat && rows <= kSmallRows) {
      packed_gemm(forward_panels(), h.const_data_ptr<float>(), h.stride(0), rows, out.mutable_data_ptr<float>(),
                  out.stride(0), false);
    } else if (copies_w_hh_ && rows < kFewRows) {
      if (!w_hh_tc_.defined()) w_hh_tc_ = L.w_hh.t().contiguous();
      mm_into(out, h, w_hh_tc_);
    } else {
      mm_into(out, h, L.w_hh.t());
    }
  }

  // dh (+)= dgates W_hh: float32 steps of at most kSmallRows rows run the packed GEMM on W_hh (K = G*H, Hout columns).
  void recurrent_bwd(const at::Tensor& out, const at::Tensor& dg, bool accumulate) override {
    const int64_t rows = dg.size(0);
    if (dtype_ == at::kFloat && copies_w_hh_ && rows <= kSmallRows) {
      packed_gemm(backward_panels(), dg.const_data_ptr<float>(), dg.stride(0), rows, out.mutable_data_ptr<float>(),
                  out.stride(0), accumulate);
    } else {
      CellSteps::recurrent_bwd(out, dg, accumulate);
    }
  }

  bool forward_sequence(const ForwardLoop& F) override {
    if (!sliced()) return false;
    forward_sliced(F, dots() ? nullptr : &forward_panels(), bias_.const_data_ptr<float>(),
                   peep_.defined() ? peep_.const_data_ptr<float>() : nullptr);
    return true;
  }

  bool backward_sequence(const BackwardLoop& B) override {
    if (!sliced()) return false;
    backward_sliced(B, backward_panels(), peep_.defined() ? peep_.const_data_ptr<float>() : nullptr);
    return true;
  }

 private:
  // Float32 layers of at most kSlicedRows rows without projection run the time loop in one parallel region.
  bool sliced() const { return dtype_ == at::kFloat && copies_w_hh_ && L.N <= kSlicedRows && !L.proj; }
  // Float32 forwards that multiply W_hh as it is (cell::dot_block) instead of a packed copy: one row (each step
  // streams W_hh once either way: measured even at T = 100, H = 256-1024, and no copy is made or held), or at most
  // kDotRows rows in a single step (no copy is made then either). At 2-4 rows over longer sequences the packed GEMM
  // is 1.1-1.3x faster (its panel rows are reused across the rows in registers).
  bool dots() const {
    return dtype_ == at::kFloat && L.w_hh.is_contiguous() && (L.N == 1 || (!copies_w_hh_ && L.N <= kDotRows));
  }
  // W_hh packed, once per call: W_hh^T for the forward, W_hh for the backward (a call uses one of them; they share
  // the thread's panel buffer).
  const Panels& forward_panels() {
    if (!panels_) panels_.emplace(L.w_hh.const_data_ptr<float>(), 1, L.Hout, L.Hout, L.H, L.G);
    return *panels_;
  }
  const Panels& backward_panels() {
    if (!panels_) panels_.emplace(L.w_hh.const_data_ptr<float>(), L.Hout, 1, L.G * L.H, L.Hout, 1);
    return *panels_;
  }

  // The forward time loop in one parallel region: worker w owns hidden units [j0, j1) (whole panels) of every gate.
  // W: W_hh^T packed, or null: W_hh read as it is (dots()).
  void forward_sliced(const ForwardLoop& F, const Panels* W, const float* bias, const float* peep) const {
    const Schedule& S = F.S;
    const int64_t H = L.H, G = L.G, GH = G * H;
    float* hg = F.hg.mutable_data_ptr<float>();
    const float* y = F.y.const_data_ptr<float>();
    const float* h0 = L.h0.const_data_ptr<float>();
    const float* w_hh = L.w_hh.const_data_ptr<float>();
    const int64_t per_group = (H + kPanel - 1) / kPanel;
    const int64_t workers = worker_count(S.N, GH, H, per_group);
    run_workers(workers, per_group, [&](int64_t p0, int64_t p1, int64_t weight, Barrier& barrier) {
      const int64_t j0 = p0 * kPanel, j1 = std::min(p1 * kPanel, H);
      // out rows [0, rows) (row stride GH), this worker's columns of every gate, = a (rows, H) W_hh^T
      auto columns = [&](const float* a, int64_t rows, float* out) {
        for (int64_t g = 0; g < G; ++g) {
          if (W == nullptr) {
            dot_block(a, H, rows, H, w_hh + (g * H + j0) * H, j1 - j0, out + g * H + j0, GH);
            continue;
          }
          for (int64_t p = p0; p < p1; ++p) panel_gemm(*W, g * per_group + p, a, H, rows, out, GH, false);
        }
      };
      for (int64_t k = 0; k < S.T; ++k) {
        const int64_t n = S.rows[k], np = S.prev[k], off_prev = k > 0 ? S.off[k - 1] : 0;
        if (np > 0) columns(y + off_prev * H, np, hg);
        if (n > np) columns(h0 + np * H, n - np, hg + np * GH);
        S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
          const StepFwd s = F.segment(k, lo, hi, continues);
          forward_rows<float>(L.mode(), H, s, bias, peep, 0, s.n, j0, j1);
        });
        barrier.wait(weight);  // the next step reads all of h
      }
    });
  }

  // The backward time loop in one parallel region (dhy = dh: no projection).
  void backward_sliced(const BackwardLoop& B, const Panels& W, const float* peep) const {
    const Schedule& S = B.S;
    const int64_t H = L.H, GH = L.G * H;
    const bool gru = L.gru();
    float* dh = B.dh.mutable_data_ptr<float>();
    const float* dy = B.dy.const_data_ptr<float>();
    const float* dgh = B.dgh.const_data_ptr<float>();
    const int64_t workers = worker_count(S.N, H, GH, W.per_group);
    run_workers(workers, W.per_group, [&](int64_t p0, int64_t p1, int64_t weight, Barrier& barrier) {
      const int64_t j0 = p0 * kPanel, j1 = std::min(p1 * kPanel, H);
      for (int64_t k = S.T - 1; k >= 0; --k) {
        const int64_t n = S.rows[k], off = S.off[k];
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t j = j0; j < j1; ++j) dh[r * H + j] += dy[(off + r) * H + j];
        }
        S.for_segments(k, [&](int64_t lo, int64_t hi, bool continues) {
          const StepBwd s = B.segment(k, lo, hi, continues);
          backward_rows<float>(L.mode(), H, s, peep, 0, s.n, j0, j1);
        });
        barrier.wait(weight);  // the recurrent GEMM reads every gate gradient of the step
        // d h_{t-1} (this worker's columns) = dgates W_hh (+ the direct term for GRU)
        for (int64_t p = p0; p < p1; ++p) panel_gemm(W, p, dgh + off * GH, GH, n, dh, H, gru);
      }
    });
  }

  at::ScalarType dtype_;
  bool copies_w_hh_;  // whether the sequence is long enough to repay a copy of W_hh in every case (kCopyMinSteps)
  at::Tensor bias_;  // b_ih + b_hh (G*H) or the GRU layout (4H, gru_bias), opmath
  at::Tensor peep_;  // (3, H) opmath, or undefined
  at::Tensor w_hh_tc_;  // W_hh^T contiguous, for steps of fewer than kFewRows rows (not float32, copies_w_hh_)
  std::optional<Panels> panels_;
};

}  // namespace

std::unique_ptr<CellSteps> layer_steps(const Layer& layer) { return std::make_unique<CpuSteps>(layer); }

}  // namespace fastseq::cpu
