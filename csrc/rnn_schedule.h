// The step schedule of a recurrent layer over a (possibly packed) sequence, read by the one time loop
// (csrc/rnn_layer.cpp) and the steps of each backend. Host code only.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace fastseq {

// The steps of a (possibly packed) sequence in the order they run: k = 0 .. T-1 is time step k, or T-1-k when
// reversed. Step k works on rows [0, rows[k]) of the batch, stored at rows [off[k], off[k] + rows[k]) of the
// (sum(rows), .) layout. Rows [0, prev[k]) continue from step k-1, rows [prev[k], rows[k]) start from h0/c0;
// rows [done[k], rows[k]) take their last step at step k (their state there is h_n/c_n).
struct Schedule {
  int64_t T = 0, N = 0, total = 0;
  bool packed = false;
  bool uniform = true;  // every step runs on all N rows
  std::vector<int64_t> rows, off, prev, done;

  Schedule(const char* fn, const at::Tensor& x, int64_t N_, const std::optional<at::Tensor>& batch_sizes,
           bool reverse)
      : N(N_), packed(batch_sizes.has_value() && batch_sizes->defined()) {
    std::vector<int64_t> sizes;
    if (packed) {
      const at::Tensor& bs = *batch_sizes;
      TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1, fn,
                  ": expected batch_sizes to be a 1-D int64 tensor on the CPU, got ", bs.scalar_type(), " of shape ",
                  bs.sizes(), " on ", bs.device());
      const at::Tensor b = bs.contiguous();
      sizes.assign(b.const_data_ptr<int64_t>(), b.const_data_ptr<int64_t>() + b.numel());
      TORCH_CHECK(sizes.empty() || sizes[0] == N, fn, ": expected batch_sizes[0] to equal the batch size of h0 (",
                  N, "), got ", sizes.empty() ? 0 : sizes[0]);
      int64_t sum = 0;
      for (size_t i = 0; i < sizes.size(); ++i) {
        TORCH_CHECK(sizes[i] >= 1 && (i == 0 || sizes[i] <= sizes[i - 1]), fn,
                    ": expected batch_sizes to be positive and non-increasing, got ", at::IntArrayRef(sizes));
        sum += sizes[i];
      }
      TORCH_CHECK(sum == x.size(0), fn, ": expected sum(batch_sizes) = ", sum, " rows in x, got ", x.size(0));
    } else {
      sizes.assign(x.size(0), N);
    }
    T = static_cast<int64_t>(sizes.size());
    std::vector<int64_t> first(T + 1, 0);  // first row of time step t
    for (int64_t i = 0; i < T; ++i) first[i + 1] = first[i] + sizes[i];
    total = first[T];
    for (int64_t k = 0; k < T; ++k) {
      const int64_t step = reverse ? T - 1 - k : k;
      rows.push_back(sizes[step]);
      off.push_back(first[step]);
      uniform = uniform && sizes[step] == N;
    }
    for (int64_t k = 0; k < T; ++k) {
      prev.push_back(k > 0 ? std::min(rows[k - 1], rows[k]) : 0);
      done.push_back(k + 1 < T ? std::min(rows[k + 1], rows[k]) : 0);
    }
  }

  // Calls f(lo, hi, continues) for the row ranges of step k whose state comes from one place: the previous step
  // (continues) or the initial state.
  template <typename F>
  void for_segments(int64_t k, const F& f) const {
    if (prev[k] > 0) f(int64_t{0}, prev[k], true);
    if (rows[k] > prev[k]) f(prev[k], rows[k], false);
  }
};

}  // namespace fastseq
