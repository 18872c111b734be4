// Layer norm CUDA launchers over raw pointers (no torch header here; see layer_norm_glue.cpp for the tensor side).
//   forward:  mean = sum_j x_j / N, var = sum_j (x_j - mean)^2 / N (biased), rstd = 1 / sqrt(var + eps),
//             y = (x - mean) * rstd * weight + bias, for each row of a contiguous (M, N) matrix.
//   backward: xhat = (x - mean) * rstd, g = dy * weight,
//             dx = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat)),
//             dweight = sum_rows(dy * xhat), dbias = sum_rows(dy) (deterministic: per-block partial sums in a
//             float32 workspace, then a column reduction; no atomics).
// x, y, dy, dx, weight, bias, dweight, dbias are of the element type named by the dtype tag; mean, rstd and the
// workspace are float32. All matrices are row-major and contiguous. Each launcher launches on `stream` and returns
// cudaGetLastError() (cudaErrorInvalidValue for arguments it cannot serve); M == 0 launches nothing.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastseq {
namespace cuda {

enum class LayerNormDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward. Requires 1 <= N <= INT32_MAX.
cudaError_t layer_norm_fwd_launch(LayerNormDtype dtype,
                                  const void* x,       // (M, N) dtype
                                  const void* weight,  // (N,) dtype, or nullptr (= ones)
                                  const void* bias,    // (N,) dtype, or nullptr (= zeros)
                                  void* y,             // (M, N) dtype, output
                                  float* mean,         // (M,) float32, output
                                  float* rstd,         // (M,) float32, output
                                  int64_t M, int64_t N, float eps, cudaStream_t stream);

// Writes to *numel the number of float32 elements of the backward workspace for these sizes on the current device
// (0 when no parameter gradient is wanted or M == 0). Independent of pointer alignment.
cudaError_t layer_norm_bwd_workspace_numel(LayerNormDtype dtype, int64_t M, int64_t N, bool need_param_grads,
                                           int64_t* numel);

// Backward. dweight / dbias may each be nullptr (not computed); when either is wanted, `workspace` must hold
// the floats that layer_norm_bwd_workspace_numel(dtype, M, N, true, ..) gives (its contents on entry do not matter).
cudaError_t layer_norm_bwd_launch(LayerNormDtype dtype,
                                  const void* dy,      // (M, N) dtype
                                  const void* x,       // (M, N) dtype
                                  const void* weight,  // (N,) dtype, or nullptr (= ones)
                                  const float* mean,   // (M,) float32, from the forward
                                  const float* rstd,   // (M,) float32, from the forward
                                  void* dx,            // (M, N) dtype, output
                                  void* dweight,       // (N,) dtype, output, or nullptr
                                  void* dbias,         // (N,) dtype, output, or nullptr
                                  float* workspace,    // (workspace_numel,) float32 scratch, or nullptr if unused
                                  int64_t workspace_numel, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastseq
