// Recurrent cell steps on CUDA: launchers over raw pointers (no torch types) and the per-element gate math.
// All arrays are contiguous, row-major, of the dtype named by `dtype`; gate math runs in float32.
// N is the batch, H the hidden size; one thread handles one (n, j) hidden unit. Bias and peephole pointers may be
// null (treated as zeros / no peephole connections). When N * H == 0 a launcher launches nothing and returns
// cudaSuccess. Each launcher returns the error of its launches (cudaGetLastError()).
#pragma once
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

namespace fastseq {
namespace cuda {

enum class CellDtype : int { kFloat32, kFloat16, kBFloat16 };
enum class CellActivation : int { kTanh, kRelu };

// ---- per-element math (float32; __host__ __device__ so that it can be checked on the host) -------------------

// sigmoid(x) without overflow: e = exp(-|x|) lies in (0, 1], so neither branch can produce inf / inf.
__host__ __device__ inline float cell_sigmoid(float x) {
  const float e = expf(-fabsf(x));
  const float s = 1.f / (1.f + e);
  return x >= 0.f ? s : e * s;
}

struct LstmFwdOut {
  float i, f, g, o, cy, hy;
};

// pre_*: igates + hgates + b_ih + b_hh of gate *; cx: previous cell; p_*: peephole weights (ignored unless kPeephole).
template <bool kPeephole>
__host__ __device__ inline LstmFwdOut lstm_fwd_math(float pre_i, float pre_f, float pre_g, float pre_o, float cx,
                                                    float p_i, float p_f, float p_o) {
  LstmFwdOut r;
  r.i = cell_sigmoid(kPeephole ? pre_i + p_i * cx : pre_i);
  r.f = cell_sigmoid(kPeephole ? pre_f + p_f * cx : pre_f);
  r.g = tanhf(pre_g);
  r.cy = r.f * cx + r.i * r.g;
  r.o = cell_sigmoid(kPeephole ? pre_o + p_o * r.cy : pre_o);
  r.hy = r.o * tanhf(r.cy);
  return r;
}

struct LstmBwdOut {
  float di, df, dg, do_, dcx;  // d(pre-activation) of the four gates, d(cx)
};

// i, f, g, o: activated gates (workspace); cx, cy: cell before and after the step.
template <bool kPeephole>
__host__ __device__ inline LstmBwdOut lstm_bwd_math(float dhy, float dcy, float cx, float cy, float i, float f,
                                                    float g, float o, float p_i, float p_f, float p_o) {
  const float tc = tanhf(cy);
  LstmBwdOut r;
  r.do_ = dhy * tc * o * (1.f - o);
  float dc = dcy + dhy * o * (1.f - tc * tc);
  if (kPeephole) dc += r.do_ * p_o;
  r.di = dc * g * i * (1.f - i);
  r.df = dc * cx * f * (1.f - f);
  r.dg = dc * i * (1.f - g * g);
  r.dcx = dc * f;
  if (kPeephole) r.dcx += r.di * p_i + r.df * p_f;
  return r;
}

struct GruFwdOut {
  float r, z, n, hy;
};

// pre_r, pre_z: igates + hgates + b_ih + b_hh; in_n = igates_n + b_in; hn = hgates_n + b_hn.
__host__ __device__ inline GruFwdOut gru_fwd_math(float pre_r, float pre_z, float in_n, float hn, float hx) {
  GruFwdOut o;
  o.r = cell_sigmoid(pre_r);
  o.z = cell_sigmoid(pre_z);
  o.n = tanhf(in_n + o.r * hn);
  o.hy = o.n + o.z * (hx - o.n);  // = (1 - z) * n + z * hx
  return o;
}

struct GruBwdOut {
  float dr, dz, dn, dhn, dhx;  // d(pre r), d(pre z), d(pre n), d(hgates_n) = dn * r, direct d(hx) = dhy * z
};

__host__ __device__ inline GruBwdOut gru_bwd_math(float dhy, float hx, float r, float z, float n, float hn) {
  GruBwdOut o;
  o.dn = dhy * (1.f - z) * (1.f - n * n);
  o.dz = dhy * (hx - n) * z * (1.f - z);
  o.dr = o.dn * hn * r * (1.f - r);
  o.dhn = o.dn * r;
  o.dhx = dhy * z;
  return o;
}

// relu keeps NaN (x < 0 is false for NaN); its derivative at 0 is 0, as in torch (threshold_backward on hy > 0).
template <CellActivation kAct>
__host__ __device__ inline float rnn_fwd_math(float pre) {
  return kAct == CellActivation::kTanh ? tanhf(pre) : (pre < 0.f ? 0.f : pre);
}

template <CellActivation kAct>
__host__ __device__ inline float rnn_bwd_math(float dhy, float hy) {
  return kAct == CellActivation::kTanh ? dhy * (1.f - hy * hy) : (hy <= 0.f ? 0.f : dhy);
}

// ---- launchers ------------------------------------------------------------------------------------------------

// LSTM forward, gate order i, f, g, o.
cudaError_t launch_lstm_cell_fwd(CellDtype dtype, int64_t N, int64_t H,
                                 const void* igates,    // (N, 4H)  x W_ih^T
                                 const void* hgates,    // (N, 4H)  h W_hh^T
                                 const void* cx,        // (N, H)
                                 const void* b_ih,      // (4H,) or null
                                 const void* b_hh,      // (4H,) or null
                                 const void* peephole,  // (3, H) rows p_i, p_f, p_o, or null
                                 void* hy,              // (N, H)   out
                                 void* cy,              // (N, H)   out
                                 void* workspace,       // (N, 4H)  out: activated gates [i, f, g, o]
                                 cudaStream_t stream);

// Rows of the float32 scratch (rows, 3, H) that launch_lstm_cell_bwd needs when peephole is given (depends only on
// N and H, so the batch reduction of dpeephole is deterministic).
int64_t lstm_cell_bwd_partial_rows(int64_t N, int64_t H);

// LSTM backward. With peephole, dpeephole[k, j] = sum_n (di, df, do)[n, j] * (cx, cx, cy)[n, j], reduced over the
// batch in a fixed order: per-block float32 partials, then a second kernel sums them.
cudaError_t launch_lstm_cell_bwd(CellDtype dtype, int64_t N, int64_t H,
                                 const void* dhy,        // (N, H)
                                 const void* dcy,        // (N, H)
                                 const void* cx,         // (N, H)
                                 const void* cy,         // (N, H)
                                 const void* workspace,  // (N, 4H)  activated gates [i, f, g, o]
                                 const void* peephole,   // (3, H) or null
                                 void* dgates,           // (N, 4H)  out: d(pre-activation gates)
                                 void* dcx,              // (N, H)   out
                                 void* dpeephole,        // (3, H)   out; null when peephole is null
                                 float* partials,        // (lstm_cell_bwd_partial_rows(N, H), 3, H) float32
                                                         // scratch; null when peephole is null
                                 cudaStream_t stream);

// GRU forward, gate order r, z, n.
cudaError_t launch_gru_cell_fwd(CellDtype dtype, int64_t N, int64_t H,
                                const void* igates,  // (N, 3H)
                                const void* hgates,  // (N, 3H)
                                const void* hx,      // (N, H)
                                const void* b_ih,    // (3H,) or null
                                const void* b_hh,    // (3H,) or null
                                void* hy,            // (N, H)   out
                                void* workspace,     // (N, 4H)  out: [r, z, n, hn], hn = hgates_n + b_hn
                                cudaStream_t stream);

// GRU backward; dhx is only the direct term dhy * z (the caller adds d_hgates @ W_hh).
cudaError_t launch_gru_cell_bwd(CellDtype dtype, int64_t N, int64_t H,
                                const void* dhy,        // (N, H)
                                const void* hx,         // (N, H)
                                const void* workspace,  // (N, 4H)  [r, z, n, hn]
                                void* d_igates,         // (N, 3H)  out: [dr, dz, dn] (pre-activation)
                                void* d_hgates,         // (N, 3H)  out: [dr, dz, dn * r]
                                void* dhx,              // (N, H)   out
                                cudaStream_t stream);

// Elman RNN forward: hy = act(igates + b_ih + hgates + b_hh).
cudaError_t launch_rnn_cell_fwd(CellDtype dtype, CellActivation act, int64_t N, int64_t H,
                                const void* igates,  // (N, H)
                                const void* hgates,  // (N, H)
                                const void* b_ih,    // (H,) or null
                                const void* b_hh,    // (H,) or null
                                void* hy,            // (N, H)  out
                                cudaStream_t stream);

// Elman RNN backward: d(pre-activation) from dhy and the output hy.
cudaError_t launch_rnn_cell_bwd(CellDtype dtype, CellActivation act, int64_t N, int64_t H,
                                const void* dhy,  // (N, H)
                                const void* hy,   // (N, H)
                                void* dpre,       // (N, H)  out
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastseq
