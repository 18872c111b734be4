// Layer norm on the CPU: one pass of statistics and one of output per row, rows in parallel.
//   mean = sum_j x_j / N, var = sum_j (x_j - mean)^2 / N, rstd = 1 / sqrt(var + eps)
//   y_j = (x_j - mean) * rstd * w_j + b_j
//   backward: xhat = (x - mean) * rstd, g = dy * w, dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)),
//             dw = sum_rows dy * xhat, db = sum_rows dy
// float32 and float64 rows are read in place; bfloat16 rows are widened to float32 in a per-thread buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/memory.h"
#include "layer_norm.h"

namespace fastseq::cpu {
namespace {

using at::vec::Vectorized;

// The type statistics are computed in: float for float32/bfloat16, double for float64.
template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows of a reduced-precision type are widened into `buf` (N floats); float/double rows are used in place.
template <typename T>
const acc_t<T>* widen(const T* row, int64_t N, std::vector<acc_t<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return row;
  } else {
    buf.resize(N);
    at::vec::convert(row, buf.data(), N);
    return buf.data();
  }
}

template <typename T>
void narrow(const acc_t<T>* src, T* dst, int64_t N) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (src != dst) std::copy(src, src + N, dst);
  } else {
    at::vec::convert(src, dst, N);
  }
}

// Sum over j < N of f(x1[j], x2[j]) for two rows x1, x2 (N,), with four vector accumulators so that the adds do
// not form one serial dependency chain; f is generic: (vector, vector) -> vector, and (scalar, scalar) -> scalar
// for the tail.
template <typename A, typename F>
A row_sum(const A* x1, const A* x2, int64_t N, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 4 * W <= N; j += 4 * W) {
    s0 = s0 + f(V::loadu(x1 + j), V::loadu(x2 + j));
    s1 = s1 + f(V::loadu(x1 + j + W), V::loadu(x2 + j + W));
    s2 = s2 + f(V::loadu(x1 + j + 2 * W), V::loadu(x2 + j + 2 * W));
    s3 = s3 + f(V::loadu(x1 + j + 3 * W), V::loadu(x2 + j + 3 * W));
  }
  for (; j + W <= N; j += W) s0 = s0 + f(V::loadu(x1 + j), V::loadu(x2 + j));
  A sum = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, (s0 + s1) + (s2 + s3));
  for (; j < N; ++j) sum += f(x1[j], x2[j]);
  return sum;
}

// mean and 1/sqrt(var + eps) of one row x (N,): the exact mean first, then the squared deviations from it
// (two passes over a row that stays in cache; robust to a large mean). When a sum overflows although every x is
// finite (|x| beyond ~1e19 in float32), the statistics are taken of x / s, s = 2^floor(log2 max|x|) (exact), and
// scaled back: mean = s mean(x/s), rstd = 1 / (s sqrt(var(x/s) + eps / s^2)), the right answer where torch gives
// NaN. A row holding inf or NaN gives NaN, as torch does.
template <typename A>
void row_stats(const A* x, int64_t N, double eps, A& mean, A& rstd) {
  using V = Vectorized<A>;
  const A n = static_cast<A>(N);
  mean = row_sum<A>(x, x, N, [](auto a, auto) { return a; }) / n;
  const A m = mean;
  const A ssq = row_sum<A>(x, x, N, [m](auto a, auto) { const auto d = a - decltype(a)(m); return d * d; });
  rstd = A(1) / std::sqrt(ssq / n + static_cast<A>(eps));
  if (std::isfinite(mean) && std::isfinite(ssq)) return;
  const A amax = at::vec::reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a.abs(), b.abs()); }, x, N);
  if (!std::isfinite(amax)) {  // inf or NaN in the row
    rstd = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const A s = std::exp2(std::floor(std::log2(amax))), inv = A(1) / s;
  const A ms = row_sum<A>(x, x, N, [inv](auto a, auto) { return a * decltype(a)(inv); }) / n;
  const A ssq_s = row_sum<A>(x, x, N, [inv, ms](auto a, auto) {
    const auto d = a * decltype(a)(inv) - decltype(a)(ms);
    return d * d;
  });
  mean = ms * s;
  rstd = A(1) / (s * std::sqrt(ssq_s / n + static_cast<A>(eps) * inv * inv));
}

// Rows per task of at::parallel_for: ~32K elements, so that a few short rows run on the calling thread alone.
int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

template <typename T>
void fwd_kernel(const T* x, const T* w, const T* b, T* y, acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N,
                double eps) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  // x, y: (M, N); w, b: (N,) or null; mean, rstd: (M,)
  std::vector<A> wbuf, bbuf;  // weight and bias widened once (float32 / float64 ones are read in place)
  const A* wa = w ? widen(w, N, wbuf) : nullptr;
  const A* ba = b ? widen(b, N, bbuf) : nullptr;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<A> xbuf(std::is_same_v<T, A> ? 0 : N), ybuf(std::is_same_v<T, A> ? 0 : N);
    for (const auto r : c10::irange(begin, end)) {
      const A* xr = widen(x + r * N, N, xbuf);
      A mu, rs;
      row_stats(xr, N, eps, mu, rs);
      mean[r] = mu;
      rstd[r] = rs;
      A* yr = std::is_same_v<T, A> ? reinterpret_cast<A*>(y + r * N) : ybuf.data();
      const V vs(rs), vmu(mu);
      int64_t j = 0;
      for (; j + V::size() <= N; j += V::size()) {
        V v = (V::loadu(xr + j) - vmu) * vs;
        if (wa) v = v * V::loadu(wa + j);
        if (ba) v = v + V::loadu(ba + j);
        v.store(yr + j);
      }
      for (; j < N; ++j) {
        A v = (xr[j] - mu) * rs;
        if (wa) v *= wa[j];
        if (ba) v += ba[j];
        yr[j] = v;
      }
      narrow<T>(yr, y + r * N, N);
    }
  });
}

template <typename T>
void bwd_kernel(const T* dy, const T* x, const T* w, const acc_t<T>* mean, const acc_t<T>* rstd, T* dx,
                acc_t<T>* dw_part, acc_t<T>* db_part, int64_t M, int64_t N) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  // dy, x, dx: (M, N); w: (N,) or null; mean, rstd: (M,);
  // dw_part, db_part: (parts, N) zero-filled partial sums, one per thread (parts = 1 where at::parallel_for runs
  // on the calling thread alone: it is thread 0 then), or null when not needed
  std::vector<A> wa(N, A(1));  // weight widened once (ones without weight, so that g = dy)
  if (w) at::vec::convert(w, wa.data(), N);
  const A* wv = wa.data();
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    const bool widened = !std::is_same_v<T, A>;
    std::vector<A> xbuf(widened ? N : 0), dybuf(widened ? N : 0), dxbuf(widened ? N : 0);
    A* dwp = dw_part ? dw_part + at::get_thread_num() * N : nullptr;
    A* dbp = db_part ? db_part + at::get_thread_num() * N : nullptr;
    for (const auto r : c10::irange(begin, end)) {
      const A* xr = widen(x + r * N, N, xbuf);
      const A* dyr = widen(dy + r * N, N, dybuf);
      const A mu = mean[r], rs = rstd[r];
      const V vmu(mu), vrs(rs);
      // pass 1: a = sum(g), c = sum(g * xhat) with g = dy * w, xhat = (x - mean) * rstd; dweight += dy * xhat,
      // dbias += dy (two accumulator pairs to keep the sums off one dependency chain)
      auto step = [&](int64_t j, V& sa, V& sc) {
        const V d = V::loadu(dyr + j), xh = (V::loadu(xr + j) - vmu) * vrs, g = d * V::loadu(wv + j);
        sa = sa + g;
        sc = sc + g * xh;
        if (dwp) (V::loadu(dwp + j) + d * xh).store(dwp + j);
        if (dbp) (V::loadu(dbp + j) + d).store(dbp + j);
      };
      V sa0(0), sc0(0), sa1(0), sc1(0);
      int64_t j = 0;
      for (; j + 2 * W <= N; j += 2 * W) {
        step(j, sa0, sc0);
        step(j + W, sa1, sc1);
      }
      for (; j + W <= N; j += W) step(j, sa0, sc0);
      auto vsum = [](V v) { return at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, v); };
      A sa = vsum(sa0 + sa1), sc = vsum(sc0 + sc1);
      for (; j < N; ++j) {
        const A xh = (xr[j] - mu) * rs, g = dyr[j] * wv[j];
        sa += g;
        sc += g * xh;
        if (dwp) dwp[j] += dyr[j] * xh;
        if (dbp) dbp[j] += dyr[j];
      }
      // pass 2: dx = rstd * (g - a/N - xhat * c/N)
      const A a = sa / static_cast<A>(N), c = sc / static_cast<A>(N);
      const V va(a), vc(c);
      A* dxr = widened ? dxbuf.data() : reinterpret_cast<A*>(dx + r * N);
      for (j = 0; j + W <= N; j += W) {
        const V xh = (V::loadu(xr + j) - vmu) * vrs, g = V::loadu(dyr + j) * V::loadu(wv + j);
        (vrs * (g - va - xh * vc)).store(dxr + j);
      }
      for (; j < N; ++j) dxr[j] = rs * (dyr[j] * wv[j] - a - (xr[j] - mu) * rs * c);
      narrow<T>(dxr, dx + r * N, N);
    }
  });
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "layer_norm: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "layer_norm: ", name, " must be a contiguous 2-D tensor, got shape ",
              t.sizes(), t.is_contiguous() ? "" : " (non-contiguous)");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
              "layer_norm (cpu): ", name, " must be float32, float64 or bfloat16, got ", dt);
}

const void* check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p || !p->defined()) return nullptr;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "layer_norm: ", name, " must have shape (", x.size(1),
              ",), got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), "layer_norm: ", name, " dtype ", p->scalar_type(),
              " does not match input dtype ", x.scalar_type());
  TORCH_CHECK(p->device() == x.device() && p->is_contiguous(), "layer_norm: ", name,
              " must be a contiguous tensor on ", x.device());
  return p->data_ptr();
}

template <typename T>
T* param(const std::optional<at::Tensor>& p) {
  return p && p->defined() ? p->data_ptr<T>() : nullptr;
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  check_2d(x, "input");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty_output_like(x);
  auto mean = at::empty({M}, x.options().dtype(stat_type(x)));
  auto rstd = at::empty({M}, x.options().dtype(stat_type(x)));
  if (M == 0 || N == 0) return {y, mean.fill_(0), rstd.fill_(1.0 / std::sqrt(eps))};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), param<scalar_t>(weight), param<scalar_t>(bias),
                         y.data_ptr<scalar_t>(), mean.data_ptr<acc_t<scalar_t>>(), rstd.data_ptr<acc_t<scalar_t>>(),
                         M, N, eps);
  });
  return {y, mean, rstd};
}

at::Tensor layer_norm_fwd_output(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  check_2d(x, "input");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty_output_like(x);
  if (M == 0 || N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    std::vector<acc_t<scalar_t>> stats(2 * M);  // mean, rstd: written by the kernel, read by nobody
    fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), param<scalar_t>(weight), param<scalar_t>(bias),
                         y.data_ptr<scalar_t>(), stats.data(), stats.data() + M, M, N, eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool need_dweight, bool need_dbias) {
  check_2d(x, "input");
  check_2d(dy, "grad_output");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "layer_norm_bwd: grad_output ",
              dy.sizes(), " ", dy.scalar_type(), " must match input ", x.sizes(), " ", x.scalar_type());
  check_param(weight, x, "weight");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(mean.numel() == M && rstd.numel() == M && mean.scalar_type() == stat_type(x) &&
                  rstd.scalar_type() == stat_type(x) && mean.is_contiguous() && rstd.is_contiguous(),
              "layer_norm_bwd: mean and rstd must be contiguous (", M, ",) ", stat_type(x), " tensors, got ",
              mean.sizes(), " ", mean.scalar_type(), " and ", rstd.sizes(), " ", rstd.scalar_type());
  auto dx = empty_output_like(x);
  const int64_t parts = M <= row_grain(N) ? 1 : at::get_num_threads();
  auto acc_opts = x.options().dtype(stat_type(x));
  auto zeros = [&] {  // filled here: at::zeros' own zero_ dispatch costs ~0.4 us, at one row a tenth of the kernel
    at::Tensor part = parts == 1 ? at::empty({N}, acc_opts) : at::empty({parts, N}, acc_opts);
    std::memset(part.data_ptr(), 0, part.nbytes());
    return part;
  };
  auto dw_part = need_dweight ? zeros() : at::Tensor();
  auto db_part = need_dbias ? zeros() : at::Tensor();
  if (M > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
      using A = acc_t<scalar_t>;
      bwd_kernel<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           weight && weight->defined() ? weight->data_ptr<scalar_t>() : nullptr,
                           mean.data_ptr<A>(), rstd.data_ptr<A>(), dx.data_ptr<scalar_t>(),
                           need_dweight ? dw_part.data_ptr<A>() : nullptr,
                           need_dbias ? db_part.data_ptr<A>() : nullptr, M, N);
    });
  }
  auto total = [&](const at::Tensor& part) { return (parts == 1 ? part : part.sum(0)).to(x.scalar_type()); };
  auto dw = need_dweight ? total(dw_part) : at::Tensor();
  auto db = need_dbias ? total(db_part) : at::Tensor();
  return {dx, dw, db};
}

}  // namespace fastseq::cpu
