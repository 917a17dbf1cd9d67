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
#include <cstdint>

namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 bits  // bf16 -> fp32 is a 16-bit left shift
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline float to_float(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// MB activation rows against weight row w (K values): out[j] = dot(x[j], w). Two accumulators per
// row hide the FMA latency; MB <= 4 keeps 2 * MB accumulators plus operands in the 16 registers.
template <typename W, int MB>
inline void dot_rows(const float* x, int64_t ldx, const W* w, int64_t K, float* out) {
  __m256 a0[MB], a1[MB];
  for (int j = 0; j < MB; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
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

// 16 int4 values (8 bytes, low nibble first) -> two vectors of 8 floats in column order.
inline void load16_int4(const uint8_t* p, __m256& lo8, __m256& hi8) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  __m128i q = _mm_unpacklo_epi8(lo, hi);  // q0 q1 q2 ... q15
  lo8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
  hi8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
}

// w = q * scale + min per group: dot(x, w) = sum_g scale_g * dot(x_g, q_g) + min_g * sum(x_g);
// xsum (M, G) holds the per-group activation sums.
template <int MB>
inline void dot_rows_int4(const float* x, int64_t ldx, const float* xsum, int64_t G, const uint8_t* w, int64_t K,
                          int64_t gs, const float* sc, const float* mn, float* out) {
  __m256 acc[MB];
  float lin[MB];
  for (int j = 0; j < MB; ++j) acc[j] = _mm256_setzero_ps(), lin[j] = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    __m256 a0[MB], a1[MB];
    for (int j = 0; j < MB; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      __m256 w0, w1;
      load16_int4(w + k / 2, w0, w1);
      for (int j = 0; j < MB; ++j) {
        a0[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * ldx + k), a0[j]);
        a1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * ldx + k + 8), a1[j]);
      }
    }
    __m256 s = _mm256_set1_ps(sc[g]);
    for (int j = 0; j < MB; ++j) {
      acc[j] = _mm256_fmadd_ps(_mm256_add_ps(a0[j], a1[j]), s, acc[j]);
      lin[j] += mn[g] * xsum[j * G + g];
    }
  }
  for (int j = 0; j < MB; ++j) out[j] = hsum(acc[j]) + lin[j];
}

void int4(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* w, const float* scales,
          const float* mins, int64_t gs, int64_t N, float* y, int threads) {
  int64_t G = K / gs;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    float out[4];
    const uint8_t* wr = w + n * (K / 2);
    const float* sc = scales + n * G;
    const float* mn = mins + n * G;
    for (int64_t m = 0; m < M; m += 4) {
      int64_t mb = std::min<int64_t>(4, M - m);
      const float* xm = x + m * K;
      const float* xs = xsum + m * G;
      switch (mb) {
        case 4: dot_rows_int4<4>(xm, K, xs, G, wr, K, gs, sc, mn, out); break;
        case 3: dot_rows_int4<3>(xm, K, xs, G, wr, K, gs, sc, mn, out); break;
        case 2: dot_rows_int4<2>(xm, K, xs, G, wr, K, gs, sc, mn, out); break;
        default: dot_rows_int4<1>(xm, K, xs, G, wr, K, gs, sc, mn, out); break;
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

// glmkit's int4 layout: w uint8 (N, K/2), scales and mins fp32 (N, K/gs), xsum fp32 (M, K/gs).
extern "C" int glmkit_gemv_int4(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* w,
                                const float* scales, const float* mins, int64_t gs, int64_t N, float* y, int threads) {
  if (gs % 16 || K % gs) return 1;
  int4(x, xsum, M, K, w, scales, mins, gs, N, y, threads);
  return 0;
}
