// Scaled dot-product attention forward, CUDA tensors: checks the arguments, allocates out and lse, and calls the
// tensor-core launcher of attention.cu on the current stream. The shapes the kernel serves are stated once,
// by sdpa_unsupported (which the Python layer asks before choosing this backend).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "../attention.h"
#include "attention.cuh"

namespace fastseq {
namespace cuda {
namespace {

// A defined 4-D CUDA tensor on `device`.
void check_4d(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), "sdpa_fwd (CUDA): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "sdpa_fwd (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "sdpa_fwd (CUDA): ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, "sdpa_fwd (CUDA): ", name, " must be 4-D (B, H, rows, head_dim), got shape ", t.sizes());
}

// Stride of dim d, 0 for a size-1 dim (its index is always 0).
int64_t stride_or_0(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// q / k / v as the kernel reads them: unit last-dim stride, 16-byte aligned data, strides of the other dims
// multiples of 8 elements (16-byte cp.async). Anything else (rare: odd slices) is copied into a fresh tensor.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < 3 && ok; ++d) ok = stride_or_0(t, d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

std::string sdpa_unsupported(const at::Tensor& q, const at::Tensor& v, double dropout_p) {
  const int64_t E = q.size(-1), Ev = v.size(-1);
  if (dropout_p != 0.0) return "the CUDA C++ kernel has no dropout";
  if (E != Ev || (E != 64 && E != 128)) {
    return "the CUDA C++ kernel needs head dims E == Ev in (64, 128), got E=" + std::to_string(E) +
           ", Ev=" + std::to_string(Ev);
  }
  if (q.size(-2) > attn::kMaxLen || v.size(-2) > attn::kMaxLen) {
    return "the CUDA C++ kernel needs sequence lengths of at most " + std::to_string(attn::kMaxLen);
  }
  return "";
}

std::tuple<at::Tensor, at::Tensor> sdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                                            double dropout_p, int64_t seed, int64_t offset) {
  (void)seed;  // the keep decisions of dropout; this kernel has none
  (void)offset;
  TORCH_CHECK(q.defined(), "sdpa_fwd (CUDA): q is undefined");
  const at::Device device = q.device();
  check_4d(q, "q", device);
  check_4d(k, "k", device);
  check_4d(v, "v", device);
  const std::string unsupported = sdpa_unsupported(q, v, dropout_p);
  TORCH_CHECK(unsupported.empty(), "sdpa_fwd (CUDA): ", unsupported, "; use the triton or cpu backend");
  const at::ScalarType st = q.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16,
              "sdpa_fwd (CUDA): q must be float16 or bfloat16 (tensor-core kernel), got ", st);
  TORCH_CHECK(k.scalar_type() == st, "sdpa_fwd (CUDA): k must have q's dtype ", st, ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == st, "sdpa_fwd (CUDA): v must have q's dtype ", st, ", got ", v.scalar_type());

  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "sdpa_fwd (CUDA): batch sizes must match: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(v.size(1) == Hk, "sdpa_fwd (CUDA): k and v must have the same number of heads, got k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(v.size(2) == S, "sdpa_fwd (CUDA): k and v must have the same sequence length, got k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(Hk >= 1 && Hq % Hk == 0, "sdpa_fwd (CUDA): q's head count must be a multiple of k's, got q ",
              q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(k.size(3) == E, "sdpa_fwd (CUDA): q and k must have the same head dim, got q ", q.sizes(), ", k ",
              k.sizes());

  AttnMaskDtype mask_dtype = AttnMaskDtype::kNone;
  const void* mask_ptr = nullptr;
  int64_t mask_strides[4] = {0, 0, 0, 0};
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == device, "sdpa_fwd (CUDA): attn_mask must be on ", device, ", got ", m.device());
    TORCH_CHECK(m.dim() == 4, "sdpa_fwd (CUDA): attn_mask must be 4-D, broadcastable to (B, Hq, L, S) = (", B, ", ",
                Hq, ", ", L, ", ", S, "), got shape ", m.sizes());
    const int64_t target[4] = {B, Hq, L, S};
    for (int64_t d = 0; d < 4; ++d) {
      TORCH_CHECK(m.size(d) == target[d] || m.size(d) == 1, "sdpa_fwd (CUDA): attn_mask of shape ", m.sizes(),
                  " is not broadcastable to (B, Hq, L, S) = (", B, ", ", Hq, ", ", L, ", ", S, ")");
      mask_strides[d] = stride_or_0(m, d);
    }
    if (m.scalar_type() == at::kFloat) {
      mask_dtype = AttnMaskDtype::kFloat32;
    } else if (m.scalar_type() == st) {
      mask_dtype = st == at::kHalf ? AttnMaskDtype::kFloat16 : AttnMaskDtype::kBFloat16;
    } else {
      TORCH_CHECK(false, "sdpa_fwd (CUDA): attn_mask must be an additive float32 or ", st,
                  " mask (a bool mask is turned into 0 / -inf by the caller), got ", m.scalar_type());
    }
    mask_ptr = m.data_ptr();
  }

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({B, Hq, L, E}, q.options());
  at::Tensor lse = at::empty({B, Hq, L}, q.options().dtype(at::kFloat));
  if (B * Hq * L == 0) return {out, lse};

  const at::Tensor qk = kernel_layout(q), kk = kernel_layout(k), vk = kernel_layout(v);
  const int64_t q_strides[3] = {stride_or_0(qk, 0), stride_or_0(qk, 1), stride_or_0(qk, 2)};
  const int64_t k_strides[3] = {stride_or_0(kk, 0), stride_or_0(kk, 1), stride_or_0(kk, 2)};
  const int64_t v_strides[3] = {stride_or_0(vk, 0), stride_or_0(vk, 1), stride_or_0(vk, 2)};
  const AttnDtype dtype = st == at::kHalf ? AttnDtype::kFloat16 : AttnDtype::kBFloat16;
  const cudaError_t err =
      sdpa_fwd_launch(dtype, mask_dtype, qk.data_ptr(), kk.data_ptr(), vk.data_ptr(), mask_ptr, out.data_ptr(),
                      lse.data_ptr<float>(), q_strides, k_strides, v_strides, mask_strides, B, Hq, Hk, L, S, E,
                      static_cast<float>(scale), is_causal, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "sdpa_fwd (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace cuda
}  // namespace fastseq
