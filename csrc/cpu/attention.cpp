// Scaled dot-product attention on the CPU, flash style: tiles of BM query rows against BN keys, online softmax,
// nothing of size L x S in memory (except the optional d(scores) output of backward).
//   forward, per query block i and key block j:  s = q_i k_j^T * scale + mask (causal: -inf above the diagonal)
//     m' = max(m, rowmax s), p = exp(s - m'), l' = l * exp(m - m') + rowsum p, o' = o * exp(m - m') + drop(p) v_j
//     out = o / l, lse = m + log l   (l = 0: out = 0, lse = -inf)
//   backward (flash-attention 2): D = rowsum(dout * out), p = exp(s - lse), dP = drop(dout v^T),
//     dS = p * (dP - D), dv = sum drop(p)^T dout, dk = scale * sum dS^T q, dq = scale * sum dS k
//   drop(x) = x * keep / (1 - dropout_p), keep = uniform(seed, offset + ((b * Hq + h) * L + i) * S + j) >= dropout_p,
//   uniform = Philox4x32-10 (key = seed, counter = (lo, hi, 0, 0) of the 64-bit element counter), first word
//   mapped to [0, 1) exactly as Triton's tl.rand does, so the GPU kernels can draw the same mask.
// Work splits: forward over (b, h, query block); backward over (b, kv head, key chunk) -- a task owns dk and dv of its
// key blocks and accumulates dq of all query rows into a partial buffer of its chunk (summed at the end).
// Tiles are multiplied by a register-blocked at::vec kernel (6 rows x 2 vectors of accumulators). float32 and
// float64 compute in their own type; bfloat16 on a CPU with bf16 dot products (AVX512_BF16) multiplies bf16 tiles
// into float32 (see bf16_gemm), elsewhere it is widened to float32 up front and narrowed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#include <cstdlib>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
// Native bfloat16 dot products (AVX512_BF16), compiled where the compiler knows them and used where the CPU has them.
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define FASTSEQ_BF16_DOT 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "attention.h"
#include "cpu/memory.h"

namespace fastseq::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBM = 64;  // query rows per tile
constexpr int64_t kBN = 128;  // keys per tile (a multiple of 16: vector widths, dropout lanes)
constexpr int kMR = 6;       // rows of the register block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every buffer of a call (outputs, packed operands, partial sums) of at least 64 KiB comes from empty_output's
// cache: a call allocates several of a few MiB and frees most of them on return, and the C library, handing them
// back to the system, made the next call fault them in again (b=2 h=12 s=512 d=64 bf16 in a MultiheadAttention
// forward: ~1700 page faults a call, where torch's attention has none).
at::Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options, size_t(64) << 10);
}

// ---------------------------------------------------------------------------------------------------------------
// Tile GEMM: C (M, N) (+)= A (M, K) B (K, N). A is read as a[r * rs + k * cs] (so a transposed operand costs
// nothing), B row-major with leading dim ldb, C row-major with leading dim ldc. Columns go in panels of NV vectors;
// the last vector of a panel may be partial (`last` < W elements).

template <typename T, int MR, int NV, bool PART, bool ACC>
void micro_kernel(int64_t K, const T* a, int64_t rs, int64_t cs, const T* b, int64_t ldb, T* c, int64_t ldc,
                  int last) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      if constexpr (ACC) {
        acc[r][v] = (PART && v == NV - 1) ? V::loadu(c + r * ldc + v * W, last) : V::loadu(c + r * ldc + v * W);
      } else {
        acc[r][v] = V(T(0));
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b + k * ldb;
    V bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = (PART && v == NV - 1) ? V::loadu(bk + v * W, last) : V::loadu(bk + v * W);
    }
    const T* ak = a + k * cs;
    for (int r = 0; r < MR; ++r) {
      const V av(ak[r * rs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      if (PART && v == NV - 1) {
        acc[r][v].store(c + r * ldc + v * W, last);
      } else {
        acc[r][v].store(c + r * ldc + v * W);
      }
    }
  }
}

template <typename T, bool ACC>
using micro_fn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, int);

// table[mr - 1][nv - 1][part]
template <typename T, bool ACC, int MR>
constexpr std::array<std::array<micro_fn<T, ACC>, 2>, 2> row_table() {
  return {{{{&micro_kernel<T, MR, 1, false, ACC>, &micro_kernel<T, MR, 1, true, ACC>}},
           {{&micro_kernel<T, MR, 2, false, ACC>, &micro_kernel<T, MR, 2, true, ACC>}}}};
}

template <typename T, bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t rs, int64_t cs, const T* b, int64_t ldb, T* c,
          int64_t ldc) {
  static_assert(kMR == 6, "the dispatch table below lists 6 row counts");
  static constexpr std::array<std::array<std::array<micro_fn<T, ACC>, 2>, 2>, kMR> table = {
      row_table<T, ACC, 1>(), row_table<T, ACC, 2>(), row_table<T, ACC, 3>(),
      row_table<T, ACC, 4>(), row_table<T, ACC, 5>(), row_table<T, ACC, 6>()};
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t n0 = 0; n0 < N; n0 += 2 * W) {
    const int64_t nn = std::min<int64_t>(2 * W, N - n0);
    const int64_t nv = ceil_div(nn, W);
    const int last = static_cast<int>(nn - (nv - 1) * W);
    const bool part = last != W;
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, M - m0);
      table[mr - 1][nv - 1][part](K, a + m0 * rs, rs, cs, b + n0, ldb, c + m0 * ldc + n0, ldc, last);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10, first output word, as Triton's tl.rand(seed, counter) with a 64-bit counter.

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUintToUniform = 4.6566127342e-10f;

uint32_t philox_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c0, pb = uint64_t(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

float philox_uniform(uint64_t seed, uint64_t counter) {
  int32_t x = static_cast<int32_t>(philox_word(seed, counter));
  x = x < 0 ? ~x : x;  // Triton's -x - 1 without the overflow
  return static_cast<float>(x) * kUintToUniform;
}

#if defined(__AVX2__)
// high and low 32-bit halves of a * b per lane (unsigned)
inline __m256i mulhilo(__m256i a, __m256i b, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// uniforms of counters base .. base + 8 * NB - 1 (NB independent lanes of 8 in flight hide the multiply latency)
template <int NB>
inline void philox_uniform8x(uint64_t seed, uint64_t base, __m256* u) {
  const __m256i sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i ra = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
  __m256i c0[NB], c1[NB], c2[NB], c3[NB];
  for (int t = 0; t < NB; ++t) {
    const uint64_t first = base + 8 * t;
    const __m256i lo = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first)));
    c0[t] = _mm256_add_epi32(lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0[t], sign));
    c1[t] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(first >> 32))), carry);
    c2[t] = c3[t] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int32_t>(k0)), vk1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    for (int t = 0; t < NB; ++t) {
      __m256i lo_a, lo_b;
      const __m256i hi_a = mulhilo(ra, c0[t], lo_a), hi_b = mulhilo(rb, c2[t], lo_b);
      c0[t] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[t]), vk0);
      c2[t] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[t]), vk1);
      c1[t] = lo_b;
      c3[t] = lo_a;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int t = 0; t < NB; ++t) {
    const __m256i x = _mm256_xor_si256(c0[t], _mm256_srai_epi32(c0[t], 31));
    u[t] = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUintToUniform));
  }
}
#endif

// keep[j] = (uniform(counter + j) >= p) ? rp : 0 for j < n; keep has room for n rounded up to 16.
template <typename T>
void dropout_row(uint64_t seed, uint64_t counter, int64_t n, float p, T rp, T* keep) {
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 vp = _mm256_set1_ps(p);
  for (; j < n; j += 16) {
    __m256 u[2];
    philox_uniform8x<2>(seed, counter + j, u);
    const int bits = _mm256_movemask_ps(_mm256_cmp_ps(u[0], vp, _CMP_GE_OQ)) |
                     (_mm256_movemask_ps(_mm256_cmp_ps(u[1], vp, _CMP_GE_OQ)) << 8);
    for (int t = 0; t < 16; ++t) keep[j + t] = (bits >> t) & 1 ? rp : T(0);
  }
#endif
  for (; j < n; ++j) keep[j] = philox_uniform(seed, counter + j) >= p ? rp : T(0);
}

// ---------------------------------------------------------------------------------------------------------------
// Shared geometry and row helpers.

struct Geometry {
  int64_t B, Hq, Hk, G, L, S, E, Ev;
};

// Strided 4-D view: element (b, h, i, j) at p[b * s0 + h * s1 + i * s2 + j * s3].
template <typename T>
struct View4 {
  T* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  T* at(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Scores of one tile row in place: s[j] = s[j] * scale + mask[j], -inf above the causal diagonal (keys j0 + j > i)
// and in the padding n <= j < npad.
template <typename T>
void score_row(T* s, int64_t n, int64_t npad, T scale, const T* mrow, int64_t msj, bool causal, int64_t i,
               int64_t j0) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vs(scale);
  int64_t j = 0;
  if (mrow && msj == 1) {
    for (; j + W <= n; j += W) (V::loadu(s + j) * vs + V::loadu(mrow + j)).store(s + j);
    for (; j < n; ++j) s[j] = s[j] * scale + mrow[j];
  } else if (mrow) {
    for (; j < n; ++j) s[j] = s[j] * scale + mrow[j * msj];
  } else {
    for (; j + W <= n; j += W) (V::loadu(s + j) * vs).store(s + j);
    for (; j < n; ++j) s[j] *= scale;
  }
  const int64_t visible = causal ? std::clamp<int64_t>(i - j0 + 1, 0, n) : n;
  std::fill(s + visible, s + npad, -std::numeric_limits<T>::infinity());
}

template <typename T>
Vectorized<T> fast_exp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// bfloat16 tile products on the CPU's bf16 dot products (vdpbf16ps: a pair of bf16 products added into a float32
// lane), for bfloat16 inputs: q, k, v and dout stay bf16, the probabilities and dS are rounded to bf16 for the
// products they enter (as torch's CPU kernel does), every product accumulates in float32. Operands go in pairs
// along K, each 32-bit word holding two bf16 (the lower one first): A (M, K2) words (a[r, 2k], a[r, 2k+1]) and B
// (K2, N) words (b[2k, n], b[2k+1, n]), zero padding past an odd K; pack_bf16 lays q, k, v and dout out so.

// Whether the bf16 products run: compiled in, the CPU has AVX512F/BW/VL and AVX512_BF16 with the OS saving their
// state, and FASTSEQ_CPU_BF16_DOT is not 0 (which keeps the float32 path: widened inputs).
bool bf16_dot_enabled() {
#ifdef FASTSEQ_BF16_DOT
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6u) != 0xE6u) return false;  // the OS saves SSE, AVX and AVX-512 state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const unsigned f = 1u << 16, bw = 1u << 30, vl = 1u << 31;  // AVX512F, AVX512BW, AVX512VL
    if ((b & (f | bw | vl)) != (f | bw | vl)) return false;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));  // AVX512_BF16
  }();
  const char* env = std::getenv("FASTSEQ_CPU_BF16_DOT");
  return has && !(env && env[0] == '0');
#else
  return false;
#endif
}

#ifdef FASTSEQ_BF16_DOT
#define FASTSEQ_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n > 0 ? (1u << n) - 1 : 0u); }

// C (MR, nn) (+)= A (MR, K2) B (K2, nn) for nn <= 32 columns, A[r, k] at a[r * rs + k * cs]: two float32 vectors of
// accumulators per row, named one by one (held in arrays, GCC kept them in memory across the loop: a third of the
// speed).
template <int MR>
FASTSEQ_BF16_TARGET void bf16_micro(int64_t K2, const uint32_t* __restrict a, int64_t rs, int64_t cs,
                                    const uint32_t* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
                                    int nn, bool accumulate) {
  static_assert(MR >= 1 && MR <= 6, "rows 1 to 6");
  const __mmask16 m0 = lanes(nn), m1 = lanes(nn - 16);
  __m512 x0 = _mm512_setzero_ps(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0;
  __m512 y0 = x0, y1 = x0, y2 = x0, y3 = x0, y4 = x0, y5 = x0;
  const uint32_t *a0 = a, *a1 = a + rs, *a2 = a + 2 * rs, *a3 = a + 3 * rs, *a4 = a + 4 * rs, *a5 = a + 5 * rs;
  for (int64_t k = 0; k < K2; ++k) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b + k * ldb);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + k * ldb + 16);
    const int64_t ka = k * cs;
#define FASTSEQ_ROW(r)                                                               \
  if constexpr (MR > r) {                                                            \
    const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a##r[ka]));    \
    x##r = _mm512_dpbf16_ps(x##r, av, b0);                                           \
    y##r = _mm512_dpbf16_ps(y##r, av, b1);                                           \
  }
    FASTSEQ_ROW(0) FASTSEQ_ROW(1) FASTSEQ_ROW(2) FASTSEQ_ROW(3) FASTSEQ_ROW(4) FASTSEQ_ROW(5)
#undef FASTSEQ_ROW
  }
#define FASTSEQ_OUT(r)                                                                 \
  if constexpr (MR > r) {                                                              \
    float* cr = c + r * ldc;                                                           \
    if (accumulate) {                                                                  \
      x##r = _mm512_add_ps(x##r, _mm512_maskz_loadu_ps(m0, cr));                       \
      y##r = _mm512_add_ps(y##r, _mm512_maskz_loadu_ps(m1, cr + 16));                  \
    }                                                                                  \
    _mm512_mask_storeu_ps(cr, m0, x##r);                                               \
    _mm512_mask_storeu_ps(cr + 16, m1, y##r);                                          \
  }
  FASTSEQ_OUT(0) FASTSEQ_OUT(1) FASTSEQ_OUT(2) FASTSEQ_OUT(3) FASTSEQ_OUT(4) FASTSEQ_OUT(5)
#undef FASTSEQ_OUT
}

// C (M, N) (+)= A (M, K2) B (K2, N) in pairs as above: A[r, k] at a[r * rs + k * cs] (so A may be a transposed
// operand), B row-major with leading dim ldb; strides in words.
void bf16_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* a, int64_t rs, int64_t cs, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  using Micro = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t, int,
                         bool);
  static constexpr Micro table[kMR] = {&bf16_micro<1>, &bf16_micro<2>, &bf16_micro<3>,
                                       &bf16_micro<4>, &bf16_micro<5>, &bf16_micro<6>};
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int nn = static_cast<int>(std::min<int64_t>(32, N - n0));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, M - m0);
      table[mr - 1](K2, a + m0 * rs, rs, cs, b + n0, ldb, c + m0 * ldc + n0, ldc, nn, accumulate);
    }
  }
}

// out[j] = bf16(x[j]) for j < n (round to nearest even), zero for n <= j < npad (npad even).
FASTSEQ_BF16_TARGET void to_bf16(const float* x, int64_t n, int64_t npad, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes(n - j), x + j));
    _mm256_mask_storeu_epi16(out + j, lanes(n - j), (__m256i)h);
  }
  for (int64_t j = n; j < npad; ++j) out[j] = 0;
}

// Two rows as pairs: out[j] = (bf16(x0[j]), bf16(x1[j])) for j < n, the upper half zero where x1 is null.
FASTSEQ_BF16_TARGET void to_bf16_pairs(const float* x0, const float* x1, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x0 + j)));
    if (x1) {
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x1 + j)));
      w = _mm512_or_si512(w, _mm512_slli_epi32(hi, 16));
    }
    _mm512_mask_storeu_epi32(out + j, m, w);
  }
}
#else
void bf16_gemm(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
               int64_t, bool) {
  TORCH_CHECK(false, "sdpa (cpu): built without bf16 dot products");
}
void to_bf16(const float*, int64_t, int64_t, uint16_t*) { TORCH_CHECK(false, "sdpa (cpu): built without bf16"); }
void to_bf16_pairs(const float*, const float*, int64_t, uint32_t*) {
  TORCH_CHECK(false, "sdpa (cpu): built without bf16");
}
#endif

using BF16 = c10::BFloat16;

// The layouts of bf16 operands, for x (B, H, R, D) with a unit stride in D; each runs over (b, h, block of kBN rows).
enum class Pairs {
  kAlongD,     // (B * H, R, ceil(D / 2)): rows as pairs along D (the A operand of a product over D)
  kAlongRows,  // (B * H, ceil(R / kBN) * kBN / 2, D): pairs of rows (the B operand of a product over R)
  kBlocksT,    // (B * H, ceil(R / kBN), ceil(D / 2), kBN): each block of kBN rows transposed, pairs along D (the B
               //   operand of a product over D whose columns are rows of x)
};

// x packed in the given layout (int32 words), zero past R and D (the padding of every layout).
at::Tensor pack_bf16(const at::Tensor& x_, Pairs layout) {
  const int64_t B = x_.size(0), H = x_.size(1), R = x_.size(2), D = x_.size(3);
  const int64_t nb = ceil_div(R, kBN), D2 = (D + 1) / 2;
  const int64_t size = layout == Pairs::kAlongD      ? B * H * R * D2
                       : layout == Pairs::kAlongRows ? B * H * nb * kBN / 2 * D
                                                     : B * H * nb * D2 * kBN;
  at::Tensor packed = buffer({size}, x_.options().dtype(at::kInt));
  uint32_t* out = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const View4<const BF16> x = view4<const BF16>(x_);
  // word d2 of a row: its elements 2 d2 and 2 d2 + 1 (the lower first; the upper zero past D), read as they lie
  auto word = [D](const uint16_t* row, int64_t d2) -> uint32_t {
    if (2 * d2 + 1 >= D) return row[2 * d2];
    uint32_t w;
    std::memcpy(&w, row + 2 * d2, sizeof(w));
    return w;
  };
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    for (const auto t : c10::irange(begin, end)) {
      const int64_t bh = t / nb, r0 = (t % nb) * kBN, n = std::min(kBN, R - r0);
      const auto* base = reinterpret_cast<const uint16_t*>(x.at(bh / H, bh % H, r0));
      auto row = [&](int64_t r) { return r < n ? base + r * x.s2 : nullptr; };
      if (layout == Pairs::kAlongD) {  // a row's bytes as they lie, the upper half of an odd D's last word zero
        uint32_t* o = out + (bh * R + r0) * D2;
        for (const auto r : c10::irange(n)) {
          std::memcpy(o + r * D2, row(r), (D / 2) * sizeof(uint32_t));
          if (D % 2) o[r * D2 + D2 - 1] = row(r)[D - 1];
        }
      } else if (layout == Pairs::kAlongRows) {  // two rows interleaved
        uint32_t* o = out + (bh * nb * kBN + r0) / 2 * D;
        for (int64_t r = 0; r < kBN; r += 2, o += D) {
          const uint16_t *x0 = row(r), *x1 = row(r + 1);
          int64_t d = 0;
#if defined(__AVX2__)
          for (; x1 && d + 16 <= D; d += 16) {
            const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + d));
            const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + d));
            const __m256i lo = _mm256_unpacklo_epi16(a0, a1), hi = _mm256_unpackhi_epi16(a0, a1);  // per 128 bits
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
          }
#endif
          for (; d < D; ++d) o[d] = (x0 ? x0[d] : 0u) | (x1 ? uint32_t(x1[d]) << 16 : 0u);
        }
      } else {  // the (n, D2) words transposed, in 8 x 8 tiles of whole words where rows lie a whole word apart
        uint32_t* o = out + t * D2 * kBN;
        std::fill(o, o + D2 * kBN, 0u);
        int64_t r = 0;
        if (x.s2 % 2 == 0) {
          for (; r + 8 <= n; r += 8) {
            int64_t d2 = 0;
            for (; d2 + 8 <= D / 2; d2 += 8) {  // 32-bit moves only: the bits are copied, never computed on
              at::vec::transpose_mxn<float, 8, 8>(reinterpret_cast<const float*>(row(r)) + d2, x.s2 / 2,
                                                 reinterpret_cast<float*>(o + d2 * kBN + r), kBN);
            }
            for (; d2 < D2; ++d2) {
              for (int64_t rr = r; rr < r + 8; ++rr) o[d2 * kBN + rr] = word(row(rr), d2);
            }
          }
        }
        for (; r < n; ++r) {
          for (const auto d2 : c10::irange(D2)) o[d2 * kBN + r] = word(row(r), d2);
        }
      }
    }
  });
  return packed;
}

const uint32_t* words(const at::Tensor& packed) {
  return reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
}

// The bf16 operands of a forward and backward, packed once per call; K2 = ceil(E / 2), V2 = ceil(Ev / 2), keys
// padded to whole blocks (Sp = nkb * kBN), query rows likewise (Lp = ceil(L / kBN) * kBN).
struct Bf16Operands {
  int64_t K2, V2;
  const uint32_t* q;          // (B * Hq, L, K2)       kAlongD: A of q k^T
  const uint32_t* kt;         // (B * Hk, nkb, K2, kBN) kBlocksT: B of q k^T
  const uint32_t* v;          // (B * Hk, Sp / 2, Ev)  kAlongRows: B of p v (forward)
  const uint32_t* vt;         // (B * Hk, nkb, V2, kBN) kBlocksT: B of dout v^T (backward)
  const uint32_t* k;          // (B * Hk, Sp / 2, E)   kAlongRows: B of dS k (backward)
  const uint32_t* dout;       // (B * Hq, L, V2)       kAlongD: A of dout v^T (backward)
  const uint32_t* q_rows;     // (B * Hq, Lp / 2, E)   kAlongRows: B of dS^T q (backward)
  const uint32_t* dout_rows;  // (B * Hq, Lp / 2, Ev)  kAlongRows: B of p^T dout (backward)
};

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct FwdArgs {
  Geometry g;
  View4<const T> q;        // (B, Hq, L, E)
  const T* kt;             // (B * Hk, nkb, E, kBN) packed k^T, zero padded
  View4<const T> v;        // (B, Hk, S, Ev)
  View4<const T> mask;     // (B, Hq, L, S) broadcast view, or p == nullptr
  bool causal;
  T scale;
  bool dropout;
  float p;
  T rp;                    // 1 / (1 - p), 0 when p == 1
  uint64_t seed, offset;
  T* out;                  // (B, Hq, L, Ev) contiguous, or null where out_bf16 is set
  T* lse;                  // (B, Hq, L)
  const Bf16Operands* bf16 = nullptr;  // bfloat16 inputs on bf16 dot products (T = float): q, k, v read from here
  c10::BFloat16* out_bf16 = nullptr;   // (B, Hq, L, Ev) contiguous: the output of bfloat16 inputs (T = float)
};

// k (B, Hk, S, E) -> kt (B * Hk, nkb, E, kBN): key block j transposed, columns past S zero.
template <typename T>
void pack_kt(const View4<const T>& k, const Geometry& g, T* kt) {
  const int64_t nkb = ceil_div(g.S, kBN);
  at::parallel_for(0, g.B * g.Hk * nkb, 1, [&](int64_t begin, int64_t end) {
    for (const auto t : c10::irange(begin, end)) {
      const int64_t bh = t / nkb, jb = t % nkb, b = bh / g.Hk, h = bh % g.Hk;
      const int64_t j0 = jb * kBN, n = std::min(kBN, g.S - j0);
      T* dst = kt + t * g.E * kBN;
      std::fill(dst, dst + g.E * kBN, T(0));
      for (const auto j : c10::irange(n)) {
        const T* row = k.at(b, h, j0 + j);
        for (const auto e : c10::irange(g.E)) dst[e * kBN + j] = row[e];
      }
    }
  });
}

template <typename T>
void fwd_kernel(const FwdArgs<T>& a) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const Geometry& g = a.g;
  const int64_t nqb = ceil_div(g.L, kBM), nkb = ceil_div(g.S, kBN);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Bf16Operands* bf = nullptr;
  if constexpr (std::is_same_v<T, float>) bf = a.bf16;
  const int64_t K2 = bf ? bf->K2 : 0;
  at::parallel_for(0, g.B * g.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(kBM * kBN), acc(kBM * g.Ev), m(kBM), l(kBM), keep(kBN);
    std::vector<uint16_t> pbuf(bf ? kBM * kBN : 0);  // the probabilities in bf16, as A of p v
    for (const auto t : c10::irange(begin, end)) {
      const int64_t b = t / (g.Hq * nqb), h = (t / nqb) % g.Hq, i0 = (t % nqb) * kBM;
      const int64_t M = std::min(kBM, g.L - i0), hk = h / g.G;
      const T* qp = bf ? nullptr : a.q.at(b, h, i0);
      const int64_t row0 = (b * g.Hq + h) * g.L + i0;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), T(0));
      const int64_t nkb_vis = a.causal ? std::min(nkb, (i0 + M - 1) / kBN + 1) : nkb;
      for (const auto jb : c10::irange(nkb_vis)) {
        const int64_t j0 = jb * kBN, n = std::min(kBN, g.S - j0), npad = ceil_div(n, W) * W;
        const int64_t block = (b * g.Hk + hk) * nkb + jb;
        if constexpr (std::is_same_v<T, float>) {
          if (bf) bf16_gemm(M, npad, K2, bf->q + row0 * K2, K2, 1, bf->kt + block * K2 * kBN, kBN, sbuf.data(), kBN,
                            false);
        }
        if (!bf) gemm<T, false>(M, npad, g.E, qp, a.q.s2, 1, a.kt + block * g.E * kBN, kBN, sbuf.data(), kBN);
        for (const auto r : c10::irange(M)) {
          const int64_t i = i0 + r;
          T* s = sbuf.data() + r * kBN;
          score_row<T>(s, n, npad, a.scale, a.mask.p ? a.mask.at(b, h, i) + j0 * a.mask.s3 : nullptr, a.mask.s3,
                       a.causal, i, j0);
          const T mx = at::vec::reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, s, npad);
          const T m_new = std::isnan(mx) ? mx : std::max(m[r], mx);  // a NaN score (or an earlier one) sticks
          if (m_new == neg_inf) {  // nothing visible yet in this row
            std::fill(s, s + npad, T(0));
            continue;
          }
          const T alpha = std::exp(m[r] - m_new);
          const V vm(m_new);
          V vsum(T(0));
          for (int64_t j = 0; j < npad; j += W) {
            const V e = fast_exp<T>(V::loadu(s + j) - vm);
            e.store(s + j);
            vsum = vsum + e;
          }
          l[r] = l[r] * alpha + at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, vsum);
          m[r] = m_new;
          if (alpha != T(1)) {
            T* o = acc.data() + r * g.Ev;
            at::vec::map([alpha](V x) { return x * V(alpha); }, o, o, g.Ev);
          }
          if (a.dropout) {
            dropout_row<T>(a.seed, a.offset + static_cast<uint64_t>(((b * g.Hq + h) * g.L + i) * g.S + j0), n, a.p,
                           a.rp, keep.data());
            for (int64_t j = 0; j < n; ++j) s[j] *= keep[j];
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          if (bf) {
            const int64_t n2 = (n + 1) / 2;  // pairs of keys
            for (const auto r : c10::irange(M)) to_bf16(sbuf.data() + r * kBN, n, 2 * n2, pbuf.data() + r * kBN);
            bf16_gemm(M, g.Ev, n2, reinterpret_cast<const uint32_t*>(pbuf.data()), kBN / 2, 1,
                      bf->v + block * (kBN / 2) * g.Ev, g.Ev, acc.data(), g.Ev, true);
          }
        }
        if (!bf) gemm<T, true>(M, g.Ev, n, sbuf.data(), kBN, 1, a.v.at(b, hk, j0), a.v.s2, acc.data(), g.Ev);
      }
      for (const auto r : c10::irange(M)) {
        const int64_t row = (b * g.Hq + h) * g.L + i0 + r;
        // l = 0: no visible key (out 0, lse -inf); l NaN: a NaN score (out and lse NaN, as torch gives)
        const T inv = l[r] == T(0) ? T(0) : T(1) / l[r];
        const T* o = acc.data() + r * g.Ev;
        if (a.out_bf16) {
          c10::BFloat16* ob = a.out_bf16 + row * g.Ev;
          for (const auto e : c10::irange(g.Ev)) ob[e] = c10::BFloat16(static_cast<float>(o[e] * inv));
        } else {
          at::vec::map([inv](V x) { return x * V(inv); }, a.out + row * g.Ev, o, g.Ev);
        }
        a.lse[row] = l[r] == T(0) ? neg_inf : m[r] + std::log(l[r]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BwdArgs {
  Geometry g;
  View4<const T> q, k, v;  // (B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev)
  View4<const T> dout;     // (B, Hq, L, Ev)
  const T* lse;            // (B, Hq, L) contiguous
  const T* delta;          // (B, Hq, L) contiguous: rowsum(dout * out)
  View4<const T> mask;
  bool causal;
  T scale;
  bool dropout;
  float p;
  T rp;
  uint64_t seed, offset;
  int64_t chunks;          // key blocks of a (b, kv head) are split round-robin into this many tasks
  T* dq_part;              // (chunks, B, Hq, L, E) zero-filled, unscaled
  T* dk;                   // (B, Hk, S, E) contiguous, or null where dk_bf16 is set
  T* dv;                   // (B, Hk, S, Ev) contiguous, or null where dv_bf16 is set
  T* dmask;                // (B, Hq, L, S) zero-filled, or null
  const Bf16Operands* bf16 = nullptr;  // bfloat16 inputs on bf16 dot products (T = float): q, k, v, dout read here
  c10::BFloat16 *dk_bf16 = nullptr, *dv_bf16 = nullptr;  // dk, dv of bfloat16 inputs, written as such (T = float)
};

template <typename T>
void bwd_kernel(const BwdArgs<T>& a) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const Geometry& g = a.g;
  const int64_t nqb = ceil_div(g.L, kBM), nkb = ceil_div(g.S, kBN), C = a.chunks;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Bf16Operands* bf = nullptr;
  if constexpr (std::is_same_v<T, float>) bf = a.bf16;
  const int64_t K2 = bf ? bf->K2 : 0, V2 = bf ? bf->V2 : 0, Lp2 = ceil_div(g.L, kBN) * kBN / 2;
  at::parallel_for(0, g.B * g.Hk * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> kt(bf ? 0 : g.E * kBN), vt(bf ? 0 : g.Ev * kBN), pbuf(kBM * kBN), dsbuf(kBM * kBN),
        dk_acc(kBN * g.E), dv_acc(kBN * g.Ev), keep(kBN);
    // bf16 path: P and dS as pairs of query rows (A of p^T dout, dS^T q), dS as bf16 rows (A of dS k)
    std::vector<uint32_t> p_pairs(bf ? kBM / 2 * kBN : 0), ds_pairs(bf ? kBM / 2 * kBN : 0);
    std::vector<uint16_t> ds_bf16(bf ? kBM * kBN : 0);
    for (const auto t : c10::irange(begin, end)) {
      const int64_t b = t / (g.Hk * C), hk = (t / C) % g.Hk, c = t % C;
      for (int64_t jb = c; jb < nkb; jb += C) {
        const int64_t j0 = jb * kBN, n = std::min(kBN, g.S - j0), npad = ceil_div(n, W) * W;
        const int64_t block = (b * g.Hk + hk) * nkb + jb;
        std::fill(kt.begin(), kt.end(), T(0));
        std::fill(vt.begin(), vt.end(), T(0));
        for (int64_t j = 0; j < (bf ? 0 : n); ++j) {
          const T* kr = a.k.at(b, hk, j0 + j);
          const T* vr = a.v.at(b, hk, j0 + j);
          for (const auto e : c10::irange(g.E)) kt[e * kBN + j] = kr[e];
          for (const auto e : c10::irange(g.Ev)) vt[e * kBN + j] = vr[e];
        }
        std::fill(dk_acc.begin(), dk_acc.end(), T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        const T* kp = bf ? nullptr : a.k.at(b, hk, j0);
        for (int64_t h = hk * g.G; h < (hk + 1) * g.G; ++h) {
          for (int64_t ib = a.causal ? j0 / kBM : 0; ib < nqb; ++ib) {
            const int64_t i0 = ib * kBM, M = std::min(kBM, g.L - i0);
            const int64_t row0 = (b * g.Hq + h) * g.L + i0;
            const T* qp = bf ? nullptr : a.q.at(b, h, i0);
            const T* dop = bf ? nullptr : a.dout.at(b, h, i0);
            T* dqp = a.dq_part + (c * g.B * g.Hq * g.L + row0) * g.E;
            // P = exp(s - lse)
            if constexpr (std::is_same_v<T, float>) {
              if (bf) bf16_gemm(M, npad, K2, bf->q + row0 * K2, K2, 1, bf->kt + block * K2 * kBN, kBN, pbuf.data(),
                                kBN, false);
            }
            if (!bf) gemm<T, false>(M, npad, g.E, qp, a.q.s2, 1, kt.data(), kBN, pbuf.data(), kBN);
            for (const auto r : c10::irange(M)) {
              const int64_t i = i0 + r;
              T* s = pbuf.data() + r * kBN;
              const T lse = a.lse[row0 + r];
              if (!std::isfinite(lse)) {  // no visible key (-inf): P = 0; a NaN or +inf score: P NaN, as in softmax
                std::fill(s, s + npad, lse == neg_inf ? T(0) : std::numeric_limits<T>::quiet_NaN());
                continue;
              }
              score_row<T>(s, n, npad, a.scale, a.mask.p ? a.mask.at(b, h, i) + j0 * a.mask.s3 : nullptr,
                           a.mask.s3, a.causal, i, j0);
              const V vl(lse);
              for (int64_t j = 0; j < npad; j += W) fast_exp<T>(V::loadu(s + j) - vl).store(s + j);
            }
            // dP = dout v^T; dS = P * (drop(dP) - D); P <- drop(P)
            if constexpr (std::is_same_v<T, float>) {
              if (bf) bf16_gemm(M, npad, V2, bf->dout + row0 * V2, V2, 1, bf->vt + block * V2 * kBN, kBN,
                                dsbuf.data(), kBN, false);
            }
            if (!bf) gemm<T, false>(M, npad, g.Ev, dop, a.dout.s2, 1, vt.data(), kBN, dsbuf.data(), kBN);
            for (const auto r : c10::irange(M)) {
              T* pr = pbuf.data() + r * kBN;
              T* dr = dsbuf.data() + r * kBN;
              const V vd(a.delta[row0 + r]);
              if (a.dropout) {
                dropout_row<T>(a.seed, a.offset + static_cast<uint64_t>((row0 + r) * g.S + j0), n, a.p, a.rp,
                               keep.data());
                std::fill(keep.begin() + n, keep.begin() + npad, T(0));
                for (int64_t j = 0; j < npad; j += W) {
                  const V pv = V::loadu(pr + j), kv = V::loadu(keep.data() + j);
                  (pv * (V::loadu(dr + j) * kv - vd)).store(dr + j);
                  (pv * kv).store(pr + j);
                }
              } else {
                for (int64_t j = 0; j < npad; j += W) {
                  (V::loadu(pr + j) * (V::loadu(dr + j) - vd)).store(dr + j);
                }
              }
              if (a.dmask) std::copy(dr, dr + n, a.dmask + (row0 + r) * g.S + j0);
            }
            // dv += drop(P)^T dout, dk += dS^T q, dq += dS k (both scaled at the end)
            if constexpr (std::is_same_v<T, float>) {
              if (bf) {
                const int64_t M2 = (M + 1) / 2, n2 = (n + 1) / 2;
                for (const auto r2 : c10::irange(M2)) {
                  const bool odd = 2 * r2 + 1 < M;
                  const float *p0 = pbuf.data() + 2 * r2 * kBN, *d0 = dsbuf.data() + 2 * r2 * kBN;
                  to_bf16_pairs(p0, odd ? p0 + kBN : nullptr, n, p_pairs.data() + r2 * kBN);
                  to_bf16_pairs(d0, odd ? d0 + kBN : nullptr, n, ds_pairs.data() + r2 * kBN);
                }
                for (const auto r : c10::irange(M)) {
                  to_bf16(dsbuf.data() + r * kBN, n, 2 * n2, ds_bf16.data() + r * kBN);
                }
                const int64_t prow0 = (b * g.Hq + h) * Lp2 + i0 / 2;  // the tile's first pair of query rows
                bf16_gemm(n, g.Ev, M2, p_pairs.data(), 1, kBN, bf->dout_rows + prow0 * g.Ev, g.Ev, dv_acc.data(),
                          g.Ev, true);
                bf16_gemm(n, g.E, M2, ds_pairs.data(), 1, kBN, bf->q_rows + prow0 * g.E, g.E, dk_acc.data(), g.E,
                          true);
                bf16_gemm(M, g.E, n2, reinterpret_cast<const uint32_t*>(ds_bf16.data()), kBN / 2, 1,
                          bf->k + block * (kBN / 2) * g.E, g.E, dqp, g.E, true);
              }
            }
            if (!bf) {
              gemm<T, true>(n, g.Ev, M, pbuf.data(), 1, kBN, dop, a.dout.s2, dv_acc.data(), g.Ev);
              gemm<T, true>(n, g.E, M, dsbuf.data(), 1, kBN, qp, a.q.s2, dk_acc.data(), g.E);
              gemm<T, true>(M, g.E, n, dsbuf.data(), kBN, 1, kp, a.k.s2, dqp, g.E);
            }
          }
        }
        const int64_t krow0 = (b * g.Hk + hk) * g.S + j0;
        const V vs(a.scale);
        for (const auto j : c10::irange(n)) {
          const T *dkr = dk_acc.data() + j * g.E, *dvr = dv_acc.data() + j * g.Ev;
          if (a.dk_bf16) {
            c10::BFloat16 *dko = a.dk_bf16 + (krow0 + j) * g.E, *dvo = a.dv_bf16 + (krow0 + j) * g.Ev;
            for (const auto e : c10::irange(g.E)) dko[e] = c10::BFloat16(static_cast<float>(dkr[e] * a.scale));
            for (const auto e : c10::irange(g.Ev)) dvo[e] = c10::BFloat16(static_cast<float>(dvr[e]));
          } else {
            at::vec::map([vs](V x) { return x * vs; }, a.dk + (krow0 + j) * g.E, dkr, g.E);
            std::copy(dvr, dvr + g.Ev, a.dv + (krow0 + j) * g.Ev);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Checks and set-up shared by forward and backward.

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), "sdpa (cpu): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "sdpa (cpu): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "sdpa (cpu): ", name, " must be 4-D (B, H, len, dim), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, "sdpa (cpu): ", name,
              " must be float32, float64 or bfloat16, got ", dt);
  TORCH_CHECK(dt == q.scalar_type(), "sdpa (cpu): ", name, " dtype ", dt, " does not match query dtype ",
              q.scalar_type());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "sdpa (cpu): ", name,
              " must have a unit stride in its last dim, got strides ", t.strides());
}

Geometry check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_operand(q, "query", q);
  check_operand(k, "key", q);
  check_operand(v, "value", q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "sdpa (cpu): batch sizes differ: query ",
              q.size(0), ", key ", k.size(0), ", value ", v.size(0));
  TORCH_CHECK(v.size(1) == k.size(1), "sdpa (cpu): key has ", k.size(1), " heads but value has ", v.size(1));
  TORCH_CHECK((k.size(1) > 0 && q.size(1) % k.size(1) == 0) || (k.size(1) == 0 && q.size(1) == 0),
              "sdpa (cpu): query heads (", q.size(1), ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "sdpa (cpu): key embedding dim ", k.size(3), " does not match query's ",
              q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "sdpa (cpu): value length ", v.size(2), " does not match key length ",
              k.size(2));
  const int64_t Hk = k.size(1);
  return {q.size(0), q.size(1), Hk, Hk > 0 ? q.size(1) / Hk : 1, q.size(2), k.size(2), q.size(3), v.size(3)};
}

// The mask as a (B, Hq, L, S) view in the compute dtype; stride-0 dims are kept stride 0 through the conversion.
at::Tensor prepare_mask(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q, const Geometry& g) {
  if (!attn_mask || !attn_mask->defined()) return {};
  at::Tensor m = *attn_mask;
  TORCH_CHECK(m.device().is_cpu(), "sdpa (cpu): attn_mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.scalar_type() == q.scalar_type(), "sdpa (cpu): attn_mask dtype ", m.scalar_type(),
              " does not match query dtype ", q.scalar_type(), " (a bool mask is converted by the caller)");
  TORCH_CHECK(m.dim() == 4, "sdpa (cpu): attn_mask must be 4-D, got shape ", m.sizes());
  const int64_t target[4] = {g.B, g.Hq, g.L, g.S};
  for (const auto d : c10::irange(4)) {
    TORCH_CHECK(m.size(d) == target[d] || m.size(d) == 1, "sdpa (cpu): attn_mask of shape ", m.sizes(),
                " is not broadcastable to (", g.B, ", ", g.Hq, ", ", g.L, ", ", g.S, ")");
    if (m.size(d) > 1 && m.stride(d) == 0) m = m.narrow(d, 0, 1);
  }
  if (m.scalar_type() != acc_type(q)) m = m.to(acc_type(q));
  return m.expand({g.B, g.Hq, g.L, g.S});
}

at::Tensor to_acc(const at::Tensor& t) { return t.scalar_type() == acc_type(t) ? t : t.to(acc_type(t)); }

// t converted to dtype dt (an output: allocated as empty_output does)
at::Tensor narrowed(const at::Tensor& t, at::ScalarType dt) {
  return buffer(t.sizes(), t.options().dtype(dt)).copy_(t);
}

void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "sdpa (cpu): dropout_p must lie in [0, 1], got ", p);
}

}  // namespace

bool sdpa_bf16_dot() { return bf16_dot_enabled(); }

std::tuple<at::Tensor, at::Tensor> sdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                                            double dropout_p, int64_t seed, int64_t offset) {
  const Geometry g = check_qkv(q, k, v);
  check_dropout(dropout_p);
  const at::Tensor mask = prepare_mask(attn_mask, q, g);
  const auto acc = acc_type(q);
  // out in the inputs' dtype (a bfloat16 output written by the kernel), lse in the compute dtype
  at::Tensor out = buffer({g.B, g.Hq, g.L, g.Ev}, q.options());
  at::Tensor lse = buffer({g.B, g.Hq, g.L}, q.options().dtype(acc));
  auto* out_bf16 = q.scalar_type() == at::kBFloat16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  if (g.B * g.Hq * g.L > 0 && q.scalar_type() == at::kBFloat16 && bf16_dot_enabled()) {
    const at::Tensor qe = pack_bf16(q, Pairs::kAlongD), kt = pack_bf16(k, Pairs::kBlocksT);
    const at::Tensor vr = pack_bf16(v, Pairs::kAlongRows);
    const Bf16Operands bf{(g.E + 1) / 2, 0, words(qe), words(kt), words(vr)};
    FwdArgs<float> args{g, {}, nullptr, {}, view4<const float>(mask), is_causal, static_cast<float>(scale),
                        dropout_p > 0.0, static_cast<float>(dropout_p),
                        dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f,
                        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), nullptr,
                        lse.data_ptr<float>(), &bf, out_bf16};
    fwd_kernel<float>(args);
  } else if (g.B * g.Hq * g.L > 0) {
    const at::Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v);
    AT_DISPATCH_FLOATING_TYPES(acc, "sdpa_fwd_cpu", [&] {
      using T = scalar_t;
      at::Tensor kt = buffer({g.B * g.Hk * ceil_div(g.S, kBN) * g.E * kBN}, q.options().dtype(acc));
      pack_kt<T>(view4<const T>(ka), g, kt.data_ptr<T>());
      FwdArgs<T> args{g,
                      view4<const T>(qa),
                      kt.data_ptr<T>(),
                      view4<const T>(va),
                      view4<const T>(mask),
                      is_causal,
                      static_cast<T>(scale),
                      dropout_p > 0.0,
                      static_cast<float>(dropout_p),
                      dropout_p < 1.0 ? static_cast<T>(1.0 / (1.0 - dropout_p)) : T(0),
                      static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset),
                      out_bf16 ? nullptr : out.data_ptr<T>(),
                      lse.data_ptr<T>()};
      if constexpr (std::is_same_v<T, float>) args.out_bf16 = out_bf16;
      fwd_kernel<T>(args);
    });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool need_dmask) {
  const Geometry g = check_qkv(q, k, v);
  check_dropout(dropout_p);
  check_operand(dout, "grad_out", q);
  check_operand(out, "out", q);
  const std::vector<int64_t> out_shape{g.B, g.Hq, g.L, g.Ev};
  TORCH_CHECK(dout.sizes() == out_shape, "sdpa (cpu): grad_out must have shape ", out_shape, ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == out_shape, "sdpa (cpu): out must have shape ", out_shape, ", got ", out.sizes());
  const auto acc = acc_type(q);
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == acc &&
                  lse.sizes() == std::vector<int64_t>({g.B, g.Hq, g.L}),
              "sdpa (cpu): lse must be a CPU ", acc, " tensor of shape (", g.B, ", ", g.Hq, ", ", g.L, "), got ",
              lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  const at::Tensor mask = prepare_mask(attn_mask, q, g);
  const auto opts = q.options().dtype(acc);
  // the kernel writes every row of dk and dv (bfloat16 ones as such); dq and dmask accumulate (dmask rows a causal
  // mask skips stay 0)
  const bool bf16_in = q.scalar_type() == at::kBFloat16;
  at::Tensor dk = buffer({g.B, g.Hk, g.S, g.E}, bf16_in ? q.options() : opts);
  at::Tensor dv = buffer({g.B, g.Hk, g.S, g.Ev}, bf16_in ? q.options() : opts);
  auto* dk_bf16 = bf16_in ? dk.data_ptr<c10::BFloat16>() : nullptr;
  auto* dv_bf16 = bf16_in ? dv.data_ptr<c10::BFloat16>() : nullptr;
  at::Tensor dmask = need_dmask ? buffer({g.B, g.Hq, g.L, g.S}, opts).zero_() : at::Tensor();
  const int64_t nkb = ceil_div(g.S, kBN);
  // enough tasks to keep every thread busy; each extra chunk costs one more dq-sized partial buffer
  const int64_t bh = std::max<int64_t>(g.B * g.Hk, 1);
  const int64_t chunks = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), bh), 1, std::max<int64_t>(nkb, 1));
  at::Tensor dq_part = buffer({chunks, g.B, g.Hq, g.L, g.E}, opts).zero_();
  const bool run = g.B * g.Hq * g.L > 0 && g.S > 0;
  const at::Tensor delta = run ? (to_acc(dout) * to_acc(out)).sum(-1).contiguous() : at::Tensor();  // D
  const at::Tensor lse_c = lse.contiguous();
  if (run && bf16_in && bf16_dot_enabled()) {
    const at::Tensor qe = pack_bf16(q, Pairs::kAlongD), qr = pack_bf16(q, Pairs::kAlongRows);
    const at::Tensor kt = pack_bf16(k, Pairs::kBlocksT), kr = pack_bf16(k, Pairs::kAlongRows);
    const at::Tensor vt = pack_bf16(v, Pairs::kBlocksT);
    const at::Tensor de = pack_bf16(dout, Pairs::kAlongD), dr = pack_bf16(dout, Pairs::kAlongRows);
    Bf16Operands bf{(g.E + 1) / 2, (g.Ev + 1) / 2, words(qe), words(kt), nullptr, words(vt), words(kr), words(de),
                    words(qr), words(dr)};
    BwdArgs<float> args{g, {}, {}, {}, {}, lse_c.data_ptr<float>(), delta.data_ptr<float>(),
                        view4<const float>(mask), is_causal, static_cast<float>(scale), dropout_p > 0.0,
                        static_cast<float>(dropout_p),
                        dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f,
                        static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), chunks,
                        dq_part.data_ptr<float>(), nullptr, nullptr, need_dmask ? dmask.data_ptr<float>() : nullptr,
                        &bf, dk_bf16, dv_bf16};
    bwd_kernel<float>(args);
  } else if (run) {
    const at::Tensor qa = to_acc(q), ka = to_acc(k), va = to_acc(v), da = to_acc(dout);
    AT_DISPATCH_FLOATING_TYPES(acc, "sdpa_bwd_cpu", [&] {
      using T = scalar_t;
      BwdArgs<T> args{g,
                      view4<const T>(qa),
                      view4<const T>(ka),
                      view4<const T>(va),
                      view4<const T>(da),
                      lse_c.data_ptr<T>(),
                      delta.data_ptr<T>(),
                      view4<const T>(mask),
                      is_causal,
                      static_cast<T>(scale),
                      dropout_p > 0.0,
                      static_cast<float>(dropout_p),
                      dropout_p < 1.0 ? static_cast<T>(1.0 / (1.0 - dropout_p)) : T(0),
                      static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset),
                      chunks,
                      dq_part.data_ptr<T>(),
                      bf16_in ? nullptr : dk.data_ptr<T>(),
                      bf16_in ? nullptr : dv.data_ptr<T>(),
                      need_dmask ? dmask.data_ptr<T>() : nullptr};
      if constexpr (std::is_same_v<T, float>) {
        args.dk_bf16 = dk_bf16;
        args.dv_bf16 = dv_bf16;
      }
      bwd_kernel<T>(args);
    });
  }
  if (!run) {
    dk.zero_();
    dv.zero_();
  }
  at::Tensor dq = dq_part[0];
  if (chunks > 1) at::sum_out(dq = buffer({g.B, g.Hq, g.L, g.E}, opts), dq_part, 0);
  dq.mul_(scale);
  const auto dt = q.scalar_type();
  if (dt != acc) return {narrowed(dq, dt), dk, dv, dmask};
  return {dq, dk, dv, dmask};
}

}  // namespace fastseq::cpu
