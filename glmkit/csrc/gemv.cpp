// Skinny matrix products for decoding on x86 CPUs: y (M, N) = x (M, K) @ W (N, K)^T for a few rows
// M (a decode step's batch), with W in fp32, bf16, int8 (per-row scale) or int4 (group-wise scale
// and min, glmkit's packed layout: low nibble = even column). Decoding is bound by reading W once
// per step; PyTorch's CPU linear reads it at a fraction of the memory bandwidth for M = 1 and far
// below it for M = 2..16 (a GEMM path meant for large M). Here every weight row is read once and
// multiplied into all M activation rows while it sits in L1, with AVX2 + FMA, rows split over
// OpenMP threads (the caller passes PyTorch's thread count). x is fp32 (the caller converts), y is
// fp32. Plain C ABI, no PyTorch headers: glmkit/kernels.py compiles it in about a second with the
// system compiler and calls it through ctypes with tensors' data pointers (shapes checked there).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace glmkit_simd;

// MB activation rows against weight row w (K values): out[j] = dot(x[j], w). Two accumulators per
// row hide the FMA latency; MB <= 4 keeps 2 * MB accumulators plus operands in the 16 registers.
template <typename W, int MB>
inline void dot_rows(const float* x, int64_t ldx, const W* w, int64_t K, float* out) {
  __m256 a0[MB], a1[MB];
  for (int j = 0; j < MB; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1024, _MM_HINT_T0);  // the hardware prefetcher alone falls behind
    __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int j = 0; j < MB; ++j) {
      a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * ldx + k), a0[j]);
      a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * ldx + k + 8), a1[j]);
    }
  }
  for (int j = 0; j < MB; ++j) {
    float s = hsum(_mm256_add_ps(a0[j], a1[j]));
    for (int64_t t = k; t < K; ++t) s += to_float(w[t]) * x[j * ldx + t];
    out[j] = s;
  }
}

template <typename W>
void dense(const float* x, int64_t M, int64_t K, const W* w, const float* scale, int64_t N, float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    float out[4];
    const W* wr = w + n * K;
    float s = scale ? scale[n] : 1.0f;
    for (int64_t m = 0; m < M; m += 4) {  // rows of x in blocks of 4, the weight row stays in L1
      int64_t mb = std::min<int64_t>(4, M - m);
      const float* xm = x + m * K;
      switch (mb) {
        case 4: dot_rows<W, 4>(xm, K, wr, K, out); break;
        case 3: dot_rows<W, 3>(xm, K, wr, K, out); break;
        case 2: dot_rows<W, 2>(xm, K, wr, K, out); break;
        default: dot_rows<W, 1>(xm, K, wr, K, out); break;
      }
      for (int64_t j = 0; j < mb; ++j) y[(m + j) * N + n] = out[j] * s;
    }
  }
}

// ---- quantized weights: integer dot products ----------------------------------------------------------
// Converting int8 / int4 weights to float costs more instructions than the FMA itself, and those
// kernels would be compute-bound. Instead the few activation rows are quantized to int16 with one
// scale per row (|xq| <= 8191: 14 bits, finer than the bf16 activations a quantized model runs in)
// and the weights are widened to int16 for _mm256_madd_epi16 (16 products, pairwise summed, per
// instruction). int32 sums cannot overflow: 127 * 8191 * 2 per madd lane, K / 32 additions per
// accumulator, below 2^31 for K < 32768 (kernels.py checks).
constexpr float kXMax = 8191.0f;

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// xq (M, K) int16 and sx (M,): x[m] ~= xq[m] * sx[m].
void quantize_rows(const float* x, int64_t M, int64_t K, int16_t* xq, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    __m256 vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(xr[t]));
    float scale = amax > 0.0f ? amax / kXMax : 1.0f, inv = 1.0f / scale;
    sx[m] = scale;
    int16_t* q = xq + m * K;
    __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 16 <= K; k += 16) {
      __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv));  // round to nearest even
      __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vinv));
      // packs works within 128-bit lanes: a0-3 b0-3 a4-7 b4-7; permute back to a0-7 b0-7
      __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), p);
    }
    for (int64_t t = k; t < K; ++t) q[t] = static_cast<int16_t>(std::nearbyint(xr[t] * inv));
  }
}

template <int MB>
inline void dot_rows_q8(const int16_t* x, int64_t ldx, const int8_t* w, int64_t K, int32_t* out) {
  __m256i a0[MB], a1[MB];
  for (int j = 0; j < MB; ++j) a0[j] = a1[j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1024, _MM_HINT_T0);
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16)));
    for (int j = 0; j < MB; ++j) {
      const __m256i* xj = reinterpret_cast<const __m256i*>(x + j * ldx + k);
      a0[j] = _mm256_add_epi32(a0[j], _mm256_madd_epi16(w0, _mm256_loadu_si256(xj)));
      a1[j] = _mm256_add_epi32(a1[j], _mm256_madd_epi16(w1, _mm256_loadu_si256(xj + 1)));
    }
  }
  for (int j = 0; j < MB; ++j) {
    int32_t s = hsum_epi32(_mm256_add_epi32(a0[j], a1[j]));
    for (int64_t t = k; t < K; ++t) s += static_cast<int32_t>(w[t]) * x[j * ldx + t];
    out[j] = s;
  }
}

void q8(const int16_t* xq, const float* sx, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
        float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    int32_t out[4];
    const int8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; m += 4) {
      int64_t mb = std::min<int64_t>(4, M - m);
      const int16_t* xm = xq + m * K;
      switch (mb) {
        case 4: dot_rows_q8<4>(xm, K, wr, K, out); break;
        case 3: dot_rows_q8<3>(xm, K, wr, K, out); break;
        case 2: dot_rows_q8<2>(xm, K, wr, K, out); break;
        default: dot_rows_q8<1>(xm, K, wr, K, out); break;
      }
      for (int64_t j = 0; j < mb; ++j) y[(m + j) * N + n] = static_cast<float>(out[j]) * sx[m + j] * scale[n];
    }
  }
}

// int4 weights come two per byte, low nibble = even column. Their products use int8 activations:
// each (row, group) of x is rounded to int8 steps of its own absmax / 127 (as llama.cpp's Q8_0 does
// for its 4-bit formats), so _mm256_maddubs_epi16 multiplies 32 unsigned nibbles by 32 signed
// activations per instruction, about twice the work per instruction of the int16 path, which
// matters because int4 weights are cheap to read and the kernel would be compute-bound. Rather than
// interleave the nibbles back into column order, the activations are stored de-interleaved per 32
// columns (even columns, then odd; see glmkit_gemv_int4): 16 bytes of weights, split into low and high
// nibbles, then give one 32-lane vector matching one 32-lane x load.
// w = q * scale + min per group g: dot(x, w) = sum_g scale_g * sx_g * dot(q_g, xq_g) + min_g * sum(x_g);
// sx (M, G) holds the activation steps and xsum (M, G) the exact fp32 sums of x per group.
// maddubs sums two products of at most 15 * 127 (no int16 saturation); madd with ones widens to int32.
template <int MB>
inline void dot_rows_int4(const int8_t* x, int64_t ldx, const float* sx, const float* xsum, int64_t G, const uint8_t* w,
                          int64_t gs, const float* sc, const float* mn, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256 acc[MB];
  float lin[MB];
  for (int j = 0; j < MB; ++j) acc[j] = _mm256_setzero_ps(), lin[j] = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    __m256i a[MB];
    for (int j = 0; j < MB; ++j) a[j] = _mm256_setzero_si256();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k / 2) + 1024, _MM_HINT_T0);
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));  // [even | odd]
      for (int j = 0; j < MB; ++j) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j * ldx + k));
        a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
      }
    }
    for (int j = 0; j < MB; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[j]), _mm256_set1_ps(sc[g] * sx[j * G + g]), acc[j]);
      lin[j] += mn[g] * xsum[j * G + g];
    }
  }
  for (int j = 0; j < MB; ++j) out[j] = hsum(acc[j]) + lin[j];
}

void int4(const int8_t* xq, const float* sx, const float* xsum, int64_t M, int64_t K, const uint8_t* w,
          const float* scales, const float* mins, int64_t gs, int64_t N, float* y, int threads) {
  int64_t G = K / gs;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    float out[4];
    const uint8_t* wr = w + n * (K / 2);
    const float* sc = scales + n * G;
    const float* mn = mins + n * G;
    for (int64_t m = 0; m < M; m += 4) {
      int64_t mb = std::min<int64_t>(4, M - m);
      const int8_t* xm = xq + m * K;
      const float *s = sx + m * G, *xs = xsum + m * G;
      switch (mb) {
        case 4: dot_rows_int4<4>(xm, K, s, xs, G, wr, gs, sc, mn, out); break;
        case 3: dot_rows_int4<3>(xm, K, s, xs, G, wr, gs, sc, mn, out); break;
        case 2: dot_rows_int4<2>(xm, K, s, xs, G, wr, gs, sc, mn, out); break;
        default: dot_rows_int4<1>(xm, K, s, xs, G, wr, gs, sc, mn, out); break;
      }
      for (int64_t j = 0; j < mb; ++j) y[(m + j) * N + n] = out[j];
    }
  }
}

}  // namespace

// The C ABI (kernels.py checks shapes, dtypes and contiguity before calling).
// wtype: 0 fp32, 1 bf16, 2 int8. scale: per output row, or null. y: (M, N) fp32.
extern "C" int glmkit_gemv_dense(const float* x, int64_t M, int64_t K, const void* w, int wtype, const float* scale,
                                 int64_t N, float* y, int threads) {
  switch (wtype) {
    case 0: dense(x, M, K, static_cast<const float*>(w), scale, N, y, threads); return 0;
    case 1: dense(x, M, K, static_cast<const uint16_t*>(w), scale, N, y, threads); return 0;
    case 2: dense(x, M, K, static_cast<const int8_t*>(w), scale, N, y, threads); return 0;
    default: return 1;
  }
}

// int8 weights (N, K) with a per-row scale, through int16 activations. K < 32768.
extern "C" int glmkit_gemv_q8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                              float* y, int threads) {
  if (K >= 32768) return 1;
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M);
  quantize_rows(x, M, K, xq.data(), sx.data());
  q8(xq.data(), sx.data(), M, K, w, scale, N, y, threads);
  return 0;
}

// glmkit's int4 layout: w uint8 (N, K/2), scales and mins fp32 (N, K/gs), through int8 activations
// quantized per group; the group size gs is a multiple of 32.
extern "C" int glmkit_gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const float* scales,
                                const float* mins, int64_t gs, int64_t N, float* y, int threads) {
  if (gs % 32 || K % gs) return 1;
  int64_t G = K / gs;
  std::vector<int8_t> xd(M * K);
  std::vector<float> sx(M * G), xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * gs;
      float amax = 0.0f, sum = 0.0f;
      for (int64_t i = 0; i < gs; ++i) amax = std::max(amax, std::fabs(xg[i])), sum += xg[i];
      float step = amax > 0.0f ? amax / 127.0f : 1.0f, inv = 1.0f / step;
      sx[m * G + g] = step;
      xsum[m * G + g] = sum;
      int8_t* d = xd.data() + m * K + g * gs;
      for (int64_t k = 0; k < gs; k += 32)  // de-interleave: even columns, then odd, per 32
        for (int i = 0; i < 16; ++i) {
          d[k + i] = static_cast<int8_t>(std::nearbyint(xg[k + 2 * i] * inv));
          d[k + 16 + i] = static_cast<int8_t>(std::nearbyint(xg[k + 2 * i + 1] * inv));
        }
    }
  int4(xd.data(), sx.data(), xsum.data(), M, K, w, scales, mins, gs, N, y, threads);
  return 0;
}
