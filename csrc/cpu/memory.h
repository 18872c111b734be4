// Output allocation for CPU kernels. A fresh large tensor costs a page fault per 4 KiB page on first touch (~2 us
// each on these machines), which for memory-bound kernels costs more than the kernel itself (a 256 MiB output:
// ~100 ms of faults against ~20 ms of copying), and the C library hands large freed blocks back to the system, so
// that a training loop pays them again every step (a layer's 4 MiB weight gradients: ~1000 faults a step).
// Outputs of at least 4 MiB therefore come from OutputAllocator, which advises transparent huge pages on a fresh
// block (a fault per 2 MiB instead of per 4 KiB) and keeps freed blocks, up to kCachedBytes in all, for the next
// output of the same size.
#pragma once
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/record_function.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <deque>
#include <iterator>
#include <mutex>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastseq::cpu {

// A c10::Allocator over torch's c10::alloc_cpu that keeps freed blocks for reuse (oldest dropped first beyond
// kCachedBytes). Allocations and frees (including reuse and return to the cache) are reported to torch's profiler as
// torch's own CPU allocator reports them, so memory figures count a cached block only while a tensor holds it.
class OutputAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kCachedBytes = size_t(64) << 20;

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::kCPU)};
    Block* block = take(n);
    if (block == nullptr) block = new Block{fresh(n), n};
    report(block->ptr, static_cast<int64_t>(n));
    return {block->ptr, block, &release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  struct State {
    std::mutex mutex;
    std::deque<Block*> cached;  // oldest first
    size_t cached_bytes = 0;
    size_t allocated_bytes = 0;
  };
  // never destroyed: tensors may be freed during interpreter shutdown
  static State& state() {
    static State* s = new State();
    return *s;
  }

  static void* fresh(size_t n) {
    void* p = c10::alloc_cpu(n);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(1) << 21;
    const auto begin = reinterpret_cast<uintptr_t>(p);
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + n) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
    return p;
  }
  static Block* take(size_t n) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    for (auto it = s.cached.rbegin(); it != s.cached.rend(); ++it) {
      if ((*it)->bytes == n) {
        Block* block = *it;
        s.cached.erase(std::next(it).base());
        s.cached_bytes -= n;
        return block;
      }
    }
    return nullptr;
  }
  static void report(void* p, int64_t delta) {
    State& s = state();
    size_t total;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      s.allocated_bytes += static_cast<size_t>(delta);
      total = s.allocated_bytes;
    }
    if (c10::memoryProfilingEnabled()) c10::reportMemoryUsageToProfiler(p, delta, total, 0, c10::Device(c10::kCPU));
  }
  static void release(void* ctx) {
    if (ctx == nullptr) return;
    auto* block = static_cast<Block*>(ctx);
    report(block->ptr, -static_cast<int64_t>(block->bytes));
    std::vector<Block*> dropped;
    {
      State& s = state();
      std::lock_guard<std::mutex> lock(s.mutex);
      if (block->bytes > kCachedBytes) {
        dropped.push_back(block);
      } else {
        s.cached.push_back(block);
        s.cached_bytes += block->bytes;
        while (s.cached_bytes > kCachedBytes) {
          dropped.push_back(s.cached.front());
          s.cached_bytes -= s.cached.front()->bytes;
          s.cached.pop_front();
        }
      }
    }
    for (Block* b : dropped) {
      c10::free_cpu(b->ptr);
      delete b;
    }
  }
};

// at::empty(sizes, options) (contiguous); blocks of at least min_bytes (4 MiB unless given) come from OutputAllocator.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               size_t min_bytes = size_t(4) << 20) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < min_bytes) return at::empty(sizes, options);
  static OutputAllocator* allocator = new OutputAllocator();  // never destroyed, as the storages point to it
  // a profiler event of its own, as at::empty has, so that memory figures see the allocation when it happens, not
  // netted against the frees of the op that makes it
  RECORD_FUNCTION("fastseq::empty_output", std::vector<c10::IValue>());
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

// at::empty_like(like) (contiguous), with the allocation of empty_output.
inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

}  // namespace fastseq::cpu
