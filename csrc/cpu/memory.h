// Output allocation for CPU kernels. A fresh large tensor costs a page fault per 4 KiB page on first touch, which
// for memory-bound kernels costs more than the kernel itself (a 256 MiB output: ~100 ms of faults against ~20 ms of
// copying). Advising transparent huge pages on the 2 MiB-aligned interior before the first write cuts that 3-5x.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastseq::cpu {

// at::empty(sizes, options) (contiguous), with huge pages advised for outputs of at least 4 MiB.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(out.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (out.nbytes() >= 2 * kHuge && last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  return out;
}

// at::empty_like(like) (contiguous), with huge pages advised for outputs of at least 4 MiB.
inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

}  // namespace fastseq::cpu
