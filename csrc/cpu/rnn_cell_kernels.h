// Row kernels of the recurrent cell steps (LSTM, peephole LSTM, GRU, Elman RNN), shared by the cell ops
// (rnn_cell.cpp) and the sequence layers (rnn_layer.cpp): each *_span function runs the fused pointwise math of one
// batch row over raw pointers, so a caller can point it at any rows of larger buffers (a layer's per-step slices)
// without allocating. The gate math runs in at::opmath_type<scalar_t> (float for bfloat16, float64 for float64);
// values are stored in scalar_t. Built with CPU_CAPABILITY set, at::vec::Vectorized uses that ISA.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastseq::cpu::cell {

using at::vec::Vectorized;

// Elements of pointwise work per parallel task (ATen's grain size).
inline constexpr int64_t kGrain = 32768;

// ---- activations, one definition per lane type; stable for any finite input (exp overflows to inf, 1/inf = 0) ----
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  return Vectorized<T>(T(1)) / (Vectorized<T>(T(1)) + x.neg().exp());
}
inline float tanh_act(float x) { return std::tanh(x); }
inline double tanh_act(double x) { return std::tanh(x); }
template <typename T>
inline Vectorized<T> tanh_act(const Vectorized<T>& x) { return x.tanh(); }
// float lanes: Cephes' tanhf, x + x^3 P(x^2) for |x| < 0.625, else 1 - 2 / (exp(2|x|) + 1) with the sign of x
// (~2 ulp; exp(2|x|) = inf gives 1). A few times cheaper than Sleef's 1-ulp tanh, which took more time than all the
// other pointwise math of an LSTM step.
template <>
inline Vectorized<float> tanh_act(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V ax = x.abs(), z = x * x;
  V p = at::vec::fmadd(V(-5.70498872745e-3f), z, V(2.06390887954e-2f));
  p = at::vec::fmadd(p, z, V(-5.37397155531e-2f));
  p = at::vec::fmadd(p, z, V(1.33314422036e-1f));
  p = at::vec::fmadd(p, z, V(-3.33332819422e-1f));
  const V small = at::vec::fmadd(p * z, x, x);
  const V big = (V(1.f) - V(2.f) / ((ax + ax).exp() + V(1.f))) ^ (x & V(-0.f));  // sign of x
  return V::blendv(big, small, ax < V(0.625f));
}
inline float relu_act(float x) { return std::max(x, 0.f); }
inline double relu_act(double x) { return std::max(x, 0.0); }
template <typename T>
inline Vectorized<T> relu_act(const Vectorized<T>& x) { return at::vec::maximum(x, Vectorized<T>(T(0))); }
// 1 where y > 0 else 0 (relu'(x) expressed through its output y = relu(x)).
// relu's derivative as torch takes it from the output: 0 where y <= 0, else 1 (so a NaN output passes dy on)
inline float positive(float y) { return y <= 0.f ? 0.f : 1.f; }
inline double positive(double y) { return y <= 0.0 ? 0.0 : 1.0; }
template <typename T>
inline Vectorized<T> positive(const Vectorized<T>& y) { return Vectorized<T>(T(1)) - y.le(Vectorized<T>(T(0))); }

// ---- lanes: kVec = true moves Vectorized<opmath_t>::size() elements at a time, false one (the tail) ----
// load/store take pointers to scalar_t (tensor data) or opmath_t (biases, peephole, accumulators).
template <typename scalar_t, bool kVec>
struct Lanes;

template <typename scalar_t>
struct Lanes<scalar_t, true> {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vectorized<opmath_t>;
  static constexpr int64_t kWidth = V::size();
  template <typename T>
  static V load(const T* p) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }
  template <typename T>
  static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, kWidth);
    }
  }
};

template <typename scalar_t>
struct Lanes<scalar_t, false> {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = opmath_t;
  static constexpr int64_t kWidth = 1;
  template <typename T>
  static V load(const T* p) { return static_cast<V>(*p); }
  template <typename T>
  static void store(T* p, const V& v) { *p = static_cast<T>(v); }
};

// Runs a row from column j0: span(std::true_type, j0) covers the vectorizable prefix of the span's range and returns
// where it stopped, span(std::false_type, j) the scalar tail from there.
template <typename Span>
inline void over_h(const Span& span, int64_t j0 = 0) {
  span(std::false_type{}, span(std::true_type{}, j0));
}

// ---- LSTM ----
// One row. ig, hg: (4H) pre-activations; bias: (4H) opmath, b_ih + b_hh; peep: (3H) opmath [p_i, p_f, p_o];
// cx, hy, cy: (H); ws: (4H) activated [i, f, g, o]. Processes columns [j, end) (end <= H, the gate stride) in steps
// of kWidth while they fit; returns j. The other row kernels likewise.
template <typename scalar_t, bool kVec, bool kPeep>
inline int64_t lstm_fwd_span(int64_t j, int64_t end, int64_t H, const scalar_t* ig, const scalar_t* hg,
                             const scalar_t* cx, const at::opmath_type<scalar_t>* bias,
                             const at::opmath_type<scalar_t>* peep, scalar_t* hy, scalar_t* cy, scalar_t* ws) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  for (; j + L::kWidth <= end; j += L::kWidth) {
    const V c = L::load(cx + j);
    V pi = L::load(ig + j) + L::load(hg + j) + L::load(bias + j);
    V pf = L::load(ig + H + j) + L::load(hg + H + j) + L::load(bias + H + j);
    const V pg = L::load(ig + 2 * H + j) + L::load(hg + 2 * H + j) + L::load(bias + 2 * H + j);
    V po = L::load(ig + 3 * H + j) + L::load(hg + 3 * H + j) + L::load(bias + 3 * H + j);
    if constexpr (kPeep) {
      pi = pi + L::load(peep + j) * c;
      pf = pf + L::load(peep + H + j) * c;
    }
    const V i = sigmoid(pi);
    const V f = sigmoid(pf);
    const V g = tanh_act(pg);
    const V c_new = f * c + i * g;
    if constexpr (kPeep) po = po + L::load(peep + 2 * H + j) * c_new;
    const V o = sigmoid(po);
    L::store(hy + j, o * tanh_act(c_new));
    L::store(cy + j, c_new);
    L::store(ws + j, i);
    L::store(ws + H + j, f);
    L::store(ws + 2 * H + j, g);
    L::store(ws + 3 * H + j, o);
  }
  return j;
}

// One row. dhy, dcy, cx, cy, dcx: (H); ws: (4H) [i, f, g, o]; dg: (4H) d(pre-activations);
// peep: (3H) opmath; acc: (3H) opmath running sums of the peephole gradient terms for this row's chunk, or null
// (a layer sums them over all steps afterwards).
template <typename scalar_t, bool kVec, bool kPeep>
inline int64_t lstm_bwd_span(int64_t j, int64_t end, int64_t H, const scalar_t* dhy, const scalar_t* dcy,
                             const scalar_t* cx, const scalar_t* cy, const scalar_t* ws,
                             const at::opmath_type<scalar_t>* peep, scalar_t* dg, scalar_t* dcx,
                             at::opmath_type<scalar_t>* acc) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  const V one(1);
  for (; j + L::kWidth <= end; j += L::kWidth) {
    const V dh = L::load(dhy + j);
    const V c = L::load(cx + j);
    const V c_new = L::load(cy + j);
    const V i = L::load(ws + j);
    const V f = L::load(ws + H + j);
    const V g = L::load(ws + 2 * H + j);
    const V o = L::load(ws + 3 * H + j);
    const V tc = tanh_act(c_new);
    const V do_pre = dh * tc * o * (one - o);
    V dct = L::load(dcy + j) + dh * o * (one - tc * tc);
    if constexpr (kPeep) dct = dct + do_pre * L::load(peep + 2 * H + j);
    const V di_pre = dct * g * i * (one - i);
    const V df_pre = dct * c * f * (one - f);
    const V dg_pre = dct * i * (one - g * g);
    V dc = dct * f;
    if constexpr (kPeep) {
      dc = dc + di_pre * L::load(peep + j) + df_pre * L::load(peep + H + j);
      if (acc != nullptr) {
        L::store(acc + j, L::load(acc + j) + di_pre * c);
        L::store(acc + H + j, L::load(acc + H + j) + df_pre * c);
        L::store(acc + 2 * H + j, L::load(acc + 2 * H + j) + do_pre * c_new);
      }
    }
    L::store(dg + j, di_pre);
    L::store(dg + H + j, df_pre);
    L::store(dg + 2 * H + j, dg_pre);
    L::store(dg + 3 * H + j, do_pre);
    L::store(dcx + j, dc);
  }
  return j;
}

// ---- GRU ----
// One row. ig, hg: (3H); bias: (4H) opmath [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; hx, hy: (H);
// ws: (4H) [r, z, n, hn].
template <typename scalar_t, bool kVec>
inline int64_t gru_fwd_span(int64_t j, int64_t end, int64_t H, const scalar_t* ig, const scalar_t* hg,
                            const scalar_t* hx, const at::opmath_type<scalar_t>* bias, scalar_t* hy, scalar_t* ws) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  for (; j + L::kWidth <= end; j += L::kWidth) {
    const V r = sigmoid(L::load(ig + j) + L::load(hg + j) + L::load(bias + j));
    const V z = sigmoid(L::load(ig + H + j) + L::load(hg + H + j) + L::load(bias + H + j));
    const V hn = L::load(hg + 2 * H + j) + L::load(bias + 3 * H + j);
    const V n = tanh_act(L::load(ig + 2 * H + j) + L::load(bias + 2 * H + j) + r * hn);
    const V h = L::load(hx + j);
    L::store(hy + j, n + z * (h - n));
    L::store(ws + j, r);
    L::store(ws + H + j, z);
    L::store(ws + 2 * H + j, n);
    L::store(ws + 3 * H + j, hn);
  }
  return j;
}

// One row. dhy, hx, dhx: (H); ws: (4H) [r, z, n, hn]; dig, dhg: (3H).
template <typename scalar_t, bool kVec>
inline int64_t gru_bwd_span(int64_t j, int64_t end, int64_t H, const scalar_t* dhy, const scalar_t* hx,
                            const scalar_t* ws, scalar_t* dig, scalar_t* dhg, scalar_t* dhx) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  const V one(1);
  for (; j + L::kWidth <= end; j += L::kWidth) {
    const V dh = L::load(dhy + j);
    const V r = L::load(ws + j);
    const V z = L::load(ws + H + j);
    const V n = L::load(ws + 2 * H + j);
    const V hn = L::load(ws + 3 * H + j);
    const V dn_pre = dh * (one - z) * (one - n * n);
    const V dr_pre = dn_pre * hn * r * (one - r);
    const V dz_pre = dh * (L::load(hx + j) - n) * z * (one - z);
    L::store(dig + j, dr_pre);
    L::store(dig + H + j, dz_pre);
    L::store(dig + 2 * H + j, dn_pre);
    L::store(dhg + j, dr_pre);
    L::store(dhg + H + j, dz_pre);
    L::store(dhg + 2 * H + j, dn_pre * r);
    L::store(dhx + j, dh * z);
  }
  return j;
}

// ---- Elman RNN ----
// One row. ig, hg, hy: (H); bias: (H) opmath, b_ih + b_hh.
template <typename scalar_t, bool kVec, bool kRelu>
inline int64_t rnn_fwd_span(int64_t j, int64_t H, const scalar_t* ig, const scalar_t* hg,
                            const at::opmath_type<scalar_t>* bias, scalar_t* hy) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  for (; j + L::kWidth <= H; j += L::kWidth) {
    const V pre = L::load(ig + j) + L::load(hg + j) + L::load(bias + j);
    if constexpr (kRelu) {
      L::store(hy + j, relu_act(pre));
    } else {
      L::store(hy + j, tanh_act(pre));
    }
  }
  return j;
}

// One row. dhy, hy, dpre: (H).
template <typename scalar_t, bool kVec, bool kRelu>
inline int64_t rnn_bwd_span(int64_t j, int64_t H, const scalar_t* dhy, const scalar_t* hy, scalar_t* dpre) {
  using L = Lanes<scalar_t, kVec>;
  using V = typename L::V;
  for (; j + L::kWidth <= H; j += L::kWidth) {
    const V y = L::load(hy + j);
    if constexpr (kRelu) {
      L::store(dpre + j, L::load(dhy + j) * positive(y));
    } else {
      L::store(dpre + j, L::load(dhy + j) * (V(1) - y * y));
    }
  }
  return j;
}

// ---- helpers ----
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Validation shared by the cell and layer ops: t is a CPU tensor of `dtype` and `shape` (and contiguous where the
// kernel reads it raw without making it so).
inline void check_tensor(const char* fn, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                         at::ScalarType dtype, bool contiguous = true) {
  TORCH_CHECK(t.defined(), fn, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), fn, ": expected ", name, " on the CPU, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": expected ", name, " of dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, fn, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), fn, ": expected ", name, " to be contiguous, got strides ",
              t.strides());
}

inline void check_optional(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                           at::IntArrayRef shape, at::ScalarType dtype, bool contiguous = true) {
  if (present(t)) check_tensor(fn, name, *t, shape, dtype, contiguous);
}

// b_ih + b_hh in the op-math dtype, (G*H,); zeros where a bias is none.
// Summed element by element, not with tensor ops (three ATen calls are a cell step's overhead at batch 1);
// b_ih, b_hh: contiguous, of dtype.
inline at::Tensor summed_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                              int64_t size, at::ScalarType dtype) {
  at::Tensor bias = at::empty({size}, at::TensorOptions().dtype(at::toOpMathType(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "summed_bias", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t* out = bias.mutable_data_ptr<opmath_t>();
    const scalar_t* a = present(b_ih) ? b_ih->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = present(b_hh) ? b_hh->const_data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < size; ++i) {
      out[i] = (a ? static_cast<opmath_t>(a[i]) : opmath_t(0)) + (b ? static_cast<opmath_t>(b[i]) : opmath_t(0));
    }
  });
  return bias;
}

// The GRU row kernels' bias in the op-math dtype, (4H,): [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; b_hn stays apart,
// it is scaled by r. Zeros where a bias is none.
// Element by element, as summed_bias; b_ih, b_hh: contiguous, of dtype.
inline at::Tensor gru_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, int64_t H,
                           at::ScalarType dtype) {
  at::Tensor bias = at::empty({4 * H}, at::TensorOptions().dtype(at::toOpMathType(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "gru_bias", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    opmath_t* out = bias.mutable_data_ptr<opmath_t>();
    const scalar_t* a = present(b_ih) ? b_ih->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b = present(b_hh) ? b_hh->const_data_ptr<scalar_t>() : nullptr;
    auto get = [](const scalar_t* p, int64_t i) { return p ? static_cast<opmath_t>(p[i]) : opmath_t(0); };
    for (int64_t i = 0; i < 2 * H; ++i) out[i] = get(a, i) + get(b, i);   // r, z: b_i + b_h
    for (int64_t i = 2 * H; i < 3 * H; ++i) out[i] = get(a, i);           // n: b_in
    for (int64_t i = 0; i < H; ++i) out[3 * H + i] = get(b, 2 * H + i);   // b_hn
  });
  return bias;
}

// Rows per parallel task so that a task holds about kGrain elements of work (width = elements per row).
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, width)); }

// ---- x w^T for a few float32 rows ----
// A matrix-vector product per row of x: each output is the dot product of a row of x with a row of w (both
// contiguous), four rows of w at a time with every row of x in registers, so that w streams once; blocks of w's
// rows in parallel. Measured 2-2.5x MKL's GEMM at 1 x 512 x 2048 here (a library GEMM of one row reads w as the
// columns of a transposed operand).
inline constexpr int64_t kDotRows = 4;

// out[i] = dot(x, w + i * K) for i < R: x (K,), w R rows of K floats. R fixed at compile time, so that the
// accumulators stay in registers.
template <int R>
inline void dot_rows(const float* x, const float* w, int64_t K, float* out) {
  using VecF = Vectorized<float>;
  VecF acc[R];
  for (int i = 0; i < R; ++i) acc[i] = VecF(0.f);
  int64_t k = 0;
  for (; k + VecF::size() <= K; k += VecF::size()) {
    const VecF xv = VecF::loadu(x + k);
    for (int i = 0; i < R; ++i) acc[i] = at::vec::fmadd(xv, VecF::loadu(w + i * K + k), acc[i]);
  }
  for (int i = 0; i < R; ++i) {
    float sum = at::vec::vec_reduce_all<float>([](VecF& u, VecF& v) { return u + v; }, acc[i]);
    for (int64_t kk = k; kk < K; ++kk) sum += x[kk] * w[i * K + kk];
    out[i] = sum;
  }
}

// Whether dot_mm runs x (N, K) w^T (w (J, K)): float32 2-D operands, N <= kDotRows, K at least a vector.
inline bool dot_mm_fits(const at::Tensor& x, const at::Tensor& w) {
  return x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 2 && w.dim() == 2 &&
         x.size(0) <= kDotRows && x.size(1) == w.size(1) && x.size(1) >= Vectorized<float>::size();
}

// out (N, J) row stride ldo = x (N, K) row stride ldx @ w^T, w (J, K) contiguous, on the calling thread: four rows
// of w at a time against every row of x, so that w streams once.
inline void dot_block(const float* x, int64_t ldx, int64_t N, int64_t K, const float* w, int64_t J, float* out,
                      int64_t ldo) {
  for (int64_t j = 0; j < J; j += 4) {
    for (int64_t r = 0; r < N; ++r) {
      const float* xr = x + r * ldx;
      float* out_r = out + r * ldo + j;
      switch (std::min<int64_t>(4, J - j)) {
        case 4: dot_rows<4>(xr, w + j * K, K, out_r); break;
        case 3: dot_rows<3>(xr, w + j * K, K, out_r); break;
        case 2: dot_rows<2>(xr, w + j * K, K, out_r); break;
        default: dot_rows<1>(xr, w + j * K, K, out_r);
      }
    }
  }
}

// dot_block with blocks of w's rows in parallel; N <= kDotRows.
inline void dot_mm(const float* x, int64_t ldx, int64_t N, int64_t K, const float* w, int64_t J, float* out,
                   int64_t ldo) {
  // groups of 4 rows of w, about 64K multiply-adds per task
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 4 * N * K));
  at::parallel_for(0, (J + 3) / 4, grain, [&](int64_t begin, int64_t end) {
    const int64_t j0 = 4 * begin, j1 = std::min(4 * end, J);
    dot_block(x, ldx, N, K, w + j0 * K, j1 - j0, out + j0, ldo);
  });
}

}  // namespace fastseq::cpu::cell
