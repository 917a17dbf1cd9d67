// Skinny matrix products for decoding on x86 CPUs: y (M, N) = x (M, K) @ W (N, K)^T for a few rows
// M (a decode step's batch), with W in fp32, bf16, int8 (per-row scale) or int4 (group-wise scale
// and min, glmkit's packed layout: low nibble = even column). Decoding is bound by reading W once
// per step; PyTorch's CPU linear reads it at a fraction of the memory bandwidth for M = 1 and far
// below it for M = 2..16 (a GEMM path meant for large M). Here every weight row is read once and
// multiplied into all M activation rows while it sits in L1, with AVX2 + FMA, rows split over
// OpenMP threads (the caller passes PyTorch's thread count). x is fp32 (the caller converts), y is
// fp32. Plain C ABI, no PyTorch headers: glmkit/kernels.py compiles it in about a second with the
// system compiler and calls it through ctypes with tensors' data pointers (shapes checked there).
// kernels.py builds one of two variants, chosen by the CPU: AVX2 + FMA, or that plus AVX-512 (F, BW, VL)
// and VNNI, where the integer dot products are vpdpbusd / vpdpwssd (one instruction for what AVX2 does in
// three or two) and 32 vector registers hold up to 8 activation rows' sums. The integer sums are exact in
// both, and everything else is the same code, so both variants give the same bits.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define GLMKIT_VNNI 1
#else
#define GLMKIT_VNNI 0
#endif

namespace {

using namespace glmkit_simd;

// Activation rows per pass over a weight row in the integer kernels: their int32 sums and fp32
// accumulators must stay in registers (16 with AVX2, 32 with AVX-512).
constexpr int kMaxRows = GLMKIT_VNNI ? 8 : 4;

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
#if GLMKIT_VNNI
      a0[j] = _mm256_dpwssd_epi32(a0[j], w0, _mm256_loadu_si256(xj));
      a1[j] = _mm256_dpwssd_epi32(a1[j], w1, _mm256_loadu_si256(xj + 1));
#else
      a0[j] = _mm256_add_epi32(a0[j], _mm256_madd_epi16(w0, _mm256_loadu_si256(xj)));
      a1[j] = _mm256_add_epi32(a1[j], _mm256_madd_epi16(w1, _mm256_loadu_si256(xj + 1)));
#endif
    }
  }
  for (int j = 0; j < MB; ++j) {
    int32_t s = hsum_epi32(_mm256_add_epi32(a0[j], a1[j]));
    for (int64_t t = k; t < K; ++t) s += static_cast<int32_t>(w[t]) * x[j * ldx + t];
    out[j] = s;
  }
}

// Up to MB activation rows: dot_rows_q8 for the largest block size that fits mb (MB >= mb >= 1).
template <int MB>
inline void rows_q8(int64_t mb, const int16_t* x, int64_t ldx, const int8_t* w, int64_t K, int32_t* out) {
  if constexpr (MB > 1)
    if (mb < MB) return rows_q8<MB - 1>(mb, x, ldx, w, K, out);
  dot_rows_q8<MB>(x, ldx, w, K, out);
}

void q8(const int16_t* xq, const float* sx, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
        float* y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    int32_t out[kMaxRows];
    const int8_t* wr = w + n * K;
    for (int64_t m = 0; m < M; m += kMaxRows) {  // the weight row stays in L1 across the blocks
      int64_t mb = std::min<int64_t>(kMaxRows, M - m);
      rows_q8<kMaxRows>(mb, xq + m * K, K, wr, K, out);
      for (int64_t j = 0; j < mb; ++j) y[(m + j) * N + n] = static_cast<float>(out[j]) * sx[m + j] * scale[n];
    }
  }
}

// int4 weights come two per byte, low nibble = even column. Their products use int8 activations:
// each (row, group) of x is rounded to int8 steps of its own absmax / 127 (as llama.cpp's Q8_0 does
// for its 4-bit formats), so one instruction multiplies 32 unsigned nibbles by 32 signed activations
// and sums them in fours (vpdpbusd with VNNI; AVX2's maddubs sums pairs, then madd with ones the pairs
// of pairs). The loop takes 64 columns (32 bytes, one load) at a time: masking the low nibbles gives
// the even columns of both 32-column halves, shifting and masking the odd ones, so the activations are
// stored in that order per 64 columns (see glmkit_gemv_int4) instead of the nibbles being shuffled back
// into column order. Each product pair is at most 2 * 15 * 127 = 3810 in magnitude, so AVX2's int16
// sums cannot saturate; the int32 lanes 0-3 then hold columns 0-31 of the chunk, lanes 4-7 columns
// 32-63. With w = q * scale + min per group g:
//   dot(x, w) = sum_g scale_g * (sx_g * dot(q_g, xq_g)) + sum_g min_g * xsum_g,
// sx (M, G) the activation steps and xsum (M, G) the exact fp32 sums of x per group. The scales and
// mins (N, G) each, fp32 or bf16 (S), are read as the model stores them (two streams beside the
// weights; no copy of them is made, which at 30B parameters would be 2 GB); in bf16 they add 4 bytes
// per group to its 32 (group 64), in fp32 8. The first sum scales
// whole int32 vectors per group (groups of 64 or more; groups of 32 scale lanes 0-3 and 4-7 by their
// own group's factor); the second, the mins' term, is a dot product over the groups of each row,
// 8 groups per instruction (int4_tile), rather than a scalar per group inside the loop.

// 32 bytes of packed weights (64 columns) split into their low (even columns) and high nibbles.
inline void nibbles(const uint8_t* w, __m256i& lo, __m256i& hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
}

// acc + the int32 lanes of one chunk: even / odd nibbles against the matching 32 activations each.
inline __m256i dot64(__m256i acc, __m256i lo, __m256i hi, __m256i x_even, __m256i x_odd) {
#if GLMKIT_VNNI
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, x_even), hi, x_odd);
#else
  __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_even), _mm256_maddubs_epi16(hi, x_odd));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

// acc + per int32 lane the sum of 4 unsigned codes times 4 signed activations (vpdpbusd; AVX2 in two steps whose
// int16 pair sums, at most 2 * 15 * 127, cannot saturate).
inline __m256i dot4(__m256i acc, __m256i w, __m256i x) {
#if GLMKIT_VNNI
  return _mm256_dpbusd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

// MB activation rows against one chunk of 64 columns at k: a[j] += its int32 lanes.
template <int MB>
inline void chunk_int4(const int8_t* x, int64_t ldx, const uint8_t* w, int64_t k, __m256i* a) {
  __m256i lo, hi;
  nibbles(w + k / 2, lo, hi);
  for (int j = 0; j < MB; ++j) {
    const __m256i* xj = reinterpret_cast<const __m256i*>(x + j * ldx + k);
    a[j] = dot64(a[j], lo, hi, _mm256_loadu_si256(xj), _mm256_loadu_si256(xj + 1));
  }
}

// Groups of 32: one chunk holds two groups. MB activation rows against one weight row w (K / 2 bytes);
// sc, mn: this row's G scales and mins.
template <int MB, typename S>
inline void dot_rows_int4_g32(const int8_t* x, int64_t ldx, const float* sx, const float* xsum, int64_t G,
                              const uint8_t* w, const S* sc, const S* mn, float* out) {
  __m256 acc[MB];
  __m256i a[MB];
  float lin[MB];
  for (int j = 0; j < MB; ++j) acc[j] = _mm256_setzero_ps(), lin[j] = 0.0f;
  const __m256i pick = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t g = 0; g < G; g += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * g) + 1024, _MM_HINT_T0);
    for (int j = 0; j < MB; ++j) a[j] = _mm256_setzero_si256();
    chunk_int4<MB>(x, ldx, w, 32 * g, a);
    const float s0 = to_float(sc[g]), m0 = to_float(mn[g]);
    const float s1 = to_float(sc[g + 1]), m1 = to_float(mn[g + 1]);
    for (int j = 0; j < MB; ++j) {
      const float* sj = sx + j * G + g;
      __m256 f = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_set_ps(0.0f, 0.0f, s1 * sj[1], s0 * sj[0])), pick);
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[j]), f, acc[j]);
      lin[j] += m0 * xsum[j * G + g] + m1 * xsum[j * G + g + 1];
    }
  }
  for (int j = 0; j < MB; ++j) out[j] = hsum(acc[j]) + lin[j];
}

// One scale (fp32 or bf16) in all 8 lanes.
inline __m256 bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline __m256 bcast(const uint16_t* p) { return _mm256_set1_ps(to_float(*p)); }

// The mins' term of one weight row and one activation row: sum_g min_g * xs_g, mn the row's G mins.
template <typename S>
inline float mins_dot(const S* mn, const float* xs, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(load8(mn + g), _mm256_loadu_ps(xs + g), acc);
  // the last groups as one zero-padded vector: a scalar tail loop would be vectorized differently by the AVX-512
  // build, and both builds must give the same bits
  if (g < G) acc = _mm256_fmadd_ps(load_part(mn + g, G - g), load_part(xs + g, G - g), acc);
  return hsum(acc);
}

// Groups of a multiple of 64 columns, CH = gs / 64 chunks per group (0: gs / 64 at run time). R weight
// rows (ldw bytes apart, sc and mn their (R, G) scales and mins) times MB activation rows (ldx apart, in the chunk
// order above; sx and xsum (MB, G)): y[j * ldy + r] = dot(x_j, w_r). Each chunk of a weight row is
// unpacked once for all MB rows; R > 1 (one activation row) runs R accumulation chains side by side
// and prefetches a later block of R contiguous rows as one stream.
constexpr int64_t kPrefetchBytes = 2048;

template <int R, int MB, int CH, typename S>
inline void int4_tile(const int8_t* x, int64_t ldx, const float* sx, const float* xsum, int64_t G, const uint8_t* w,
                      int64_t ldw, int64_t gs, const S* sc, const S* mn, float* y, int64_t ldy) {
  const int64_t chunks = CH ? CH : gs / 64;
  // R > 1: the block of R rows kPrefetchBytes or more ahead is prefetched while this one is read (rows of K 512 or
  // 768 are 1-1.5 KB a block of 4: one block ahead is too close to cover the memory's latency, 15% slower)
  const int64_t ahead = R * ldw * std::max<int64_t>(1, (kPrefetchBytes + R * ldw - 1) / (R * ldw));
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < G; g0 += 8) {
    // the factors scale_g * sx_g of 8 groups at once, one lane each: per group a lane is broadcast (one
    // permute) instead of a scale converted and broadcast and a product taken per group
    __m256 fac[R][MB];
    const int64_t gn = std::min<int64_t>(8, G - g0);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < MB; ++j)
        fac[r][j] = _mm256_mul_ps(load_part(sc + r * G + g0, gn), load_part(sx + j * G + g0, gn));
    for (int64_t gi = 0; gi < gn; ++gi) {
      const int64_t g = g0 + gi;
      __m256i a[R][MB];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < MB; ++j) a[r][j] = _mm256_setzero_si256();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k = g * gs + 64 * c;
        if (R == 1) {
          _mm_prefetch(reinterpret_cast<const char*>(w + k / 2) + 1024, _MM_HINT_T0);  // the hardware prefetcher alone falls behind
        } else {
          const char* pf = reinterpret_cast<const char*>(w + ahead) + R * (k / 2);  // 32 bytes per row per chunk
          for (int i = 0; i < R * 32; i += 64) _mm_prefetch(pf + i, _MM_HINT_T0);
        }
        for (int r = 0; r < R; ++r) {
          __m256i lo, hi;
          nibbles(w + r * ldw + k / 2, lo, hi);
          for (int j = 0; j < MB; ++j) {
            const __m256i* xj = reinterpret_cast<const __m256i*>(x + j * ldx + k);
            a[r][j] = dot64(a[r][j], lo, hi, _mm256_loadu_si256(xj), _mm256_loadu_si256(xj + 1));
          }
        }
      }
      const __m256i lane = _mm256_set1_epi32(static_cast<int>(gi));
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < MB; ++j)
          acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][j]), _mm256_permutevar8x32_ps(fac[r][j], lane), acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MB; ++j) y[j * ldy + r] = hsum(acc[r][j]) + mins_dot(mn + r * G, xsum + j * G, G);
}

// Up to MB activation rows against one weight row: int4_tile for the block size mb (MB >= mb >= 1).
template <int MB, int CH, typename S>
inline void rows_int4(int64_t mb, const int8_t* x, int64_t ldx, const float* sx, const float* xsum, int64_t G,
                      const uint8_t* w, int64_t gs, const S* sc, const S* mn, float* y, int64_t ldy) {
  if constexpr (MB > 1)
    if (mb < MB) return rows_int4<MB - 1, CH>(mb, x, ldx, sx, xsum, G, w, gs, sc, mn, y, ldy);
  int4_tile<1, MB, CH>(x, ldx, sx, xsum, G, w, 0, gs, sc, mn, y, ldy);
}

// The rows of J matrices of one input K wide (J = 1: one product): every matrix's output rows in one parallel
// region, split evenly over the threads. One activation row: tiles of 4 output rows when every N[j] is a multiple
// of 4; else one output row at a time, the weight row staying in L1 across the activation rows' blocks.
template <int CH, typename S>
void int4_rows(const int8_t* xq, const float* sx, const float* xsum, int64_t M, int64_t K, int64_t gs, int64_t J,
               const uint8_t* const* w, const S* const* sc, const S* const* mn, const int64_t* N, float* const* y,
               int threads) {
  const int64_t G = K / gs, ldw = K / 2;
  bool tiles = M == 1;
  for (int64_t j = 0; j < J; ++j) tiles = tiles && N[j] % 4 == 0;
  const int64_t unit = tiles ? 4 : 1;
  std::vector<int64_t> start(J + 1, 0);  // the first unit of each matrix in the common index
  for (int64_t j = 0; j < J; ++j) start[j + 1] = start[j] + N[j] / unit;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < start[J]; ++t) {
    int64_t j = 0;
    while (t >= start[j + 1]) ++j;
    const int64_t n = (t - start[j]) * unit;
    const uint8_t* wn = w[j] + n * ldw;
    const S *scn = sc[j] + n * G, *mnn = mn[j] + n * G;
    if (tiles) {
      int4_tile<4, 1, CH>(xq, K, sx, xsum, G, wn, ldw, gs, scn, mnn, y[j] + n, N[j]);
    } else {
      for (int64_t m = 0; m < M; m += kMaxRows)
        rows_int4<kMaxRows, CH>(std::min<int64_t>(kMaxRows, M - m), xq + m * K, K, sx + m * G, xsum + m * G, G, wn, gs,
                                scn, mnn, y[j] + m * N[j] + n, N[j]);
    }
  }
}

template <typename S>
void int4_g32(const int8_t* xq, const float* sx, const float* xsum, int64_t M, int64_t K, const uint8_t* w,
              const S* sc, const S* mn, int64_t N, float* y, int threads) {
  const int64_t G = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    float out[4];
    const uint8_t* wr = w + n * (K / 2);
    const S *scr = sc + n * G, *mnr = mn + n * G;
    for (int64_t m = 0; m < M; m += 4) {
      int64_t mb = std::min<int64_t>(4, M - m);
      const int8_t* xm = xq + m * K;
      const float *s = sx + m * G, *xs = xsum + m * G;
      switch (mb) {
        case 4: dot_rows_int4_g32<4>(xm, K, s, xs, G, wr, scr, mnr, out); break;
        case 3: dot_rows_int4_g32<3>(xm, K, s, xs, G, wr, scr, mnr, out); break;
        case 2: dot_rows_int4_g32<2>(xm, K, s, xs, G, wr, scr, mnr, out); break;
        default: dot_rows_int4_g32<1>(xm, K, s, xs, G, wr, scr, mnr, out); break;
      }
      for (int64_t j = 0; j < mb; ++j) y[(m + j) * N + n] = out[j];
    }
  }
}

template <typename S>
void int4(const int8_t* xq, const float* sx, const float* xsum, int64_t M, int64_t K, int64_t gs, int64_t J,
          const uint8_t* const* w, const S* const* sc, const S* const* mn, const int64_t* N, float* const* y,
          int threads) {
  switch (gs) {  // the common group sizes get a fixed chunk count per group
    case 32:
      for (int64_t j = 0; j < J; ++j) int4_g32(xq, sx, xsum, M, K, w[j], sc[j], mn[j], N[j], y[j], threads);
      break;
    case 64: int4_rows<1>(xq, sx, xsum, M, K, gs, J, w, sc, mn, N, y, threads); break;
    case 128: int4_rows<2>(xq, sx, xsum, M, K, gs, J, w, sc, mn, N, y, threads); break;
    default: int4_rows<0>(xq, sx, xsum, M, K, gs, J, w, sc, mn, N, y, threads); break;
  }
}

// The int4 kernels' activations: x (M, K) fp32 rounded per (row, group of gs) to int8 steps of its absmax / 127
// into xd (M, K), stored per 64 columns as the even columns of each 32-column half then the odd ones (see
// above); sx (M, G) the steps, xsum (M, G) the sums per group (8 lanes of partial sums, then across them).
// Every int4 product of a decode step runs this on one thread before its parallel region, ~1M values a step at
// GLM-4.7-Flash's shape: a scalar sum is one chain of dependent adds (4 cycles a value) and each value was rounded
// and stored alone, ~2 ms a step in all; here 8 values per instruction, the rounding (cvtps: nearest even, as
// nearbyint) and the even/odd split in registers.
void int4_activations(const float* x, int64_t M, int64_t K, int64_t gs, int8_t* xd, float* sx, float* xsum) {
  const int64_t G = K / gs;  // gs: 32 or a multiple of 64
  std::vector<float> inv(G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // per 128-bit lane of 16 bytes in column order: the 8 even columns, then the 8 odd ones
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t g = 0; g < G; ++g) {
      __m256 am = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t i = g * gs; i < (g + 1) * gs; i += 8) {
        const __m256 v = _mm256_loadu_ps(xr + i);
        am = _mm256_max_ps(am, _mm256_andnot_ps(sign, v));
        sum = _mm256_add_ps(sum, v);
      }
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      const float amax = _mm_cvtss_f32(_mm_max_ss(a4, _mm_movehdup_ps(a4)));
      const float step = amax > 0.0f ? amax / 127.0f : 1.0f;
      sx[m * G + g] = step, xsum[m * G + g] = hsum(sum), inv[g] = 1.0f / step;
    }
    int8_t* d = xd + m * K;
    for (int64_t k = 0; k < K; k += 32) {  // 32 columns (one half of a 64-column chunk) in one group
      const __m256 s = _mm256_set1_ps(inv[k / gs]);
      __m256i c[4];
      for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * j), s));
      // |values| <= 127: the saturating packs are exact. Bytes come out as 4-column units in the order
      // (0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31): `order` puts them back in column order
      __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      b = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(b, order), split);
      b = _mm256_permute4x64_epi64(b, 0xD8);  // the 16 even columns, then the 16 odd ones
      const int64_t base = k / 64 * 64, h = k / 32 % 2;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + base + 16 * h), _mm256_castsi256_si128(b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + base + 32 + 16 * h), _mm256_extracti128_si256(b, 1));
    }
  }
}

}  // namespace

// The C ABI (kernels.py checks shapes, dtypes and contiguity before calling).
// 1 when this library was built with AVX-512 VNNI, 0 for the AVX2 build.
extern "C" int glmkit_gemv_vnni() { return GLMKIT_VNNI; }

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

// J int4 products of one input x (M, K): y[j] (M, N[j]) = x w[j]^T, each matrix as glmkit_gemv_int4's, all of
// one K, gs and s_type. The activations are rounded once and the J matrices' rows run in one parallel region.
// Latent attention's q_a and kv_a both read the normed hidden state: one region a layer fewer, where each region
// ends waiting for the slower thread. Each y[j] is the same, bit for bit, as its own glmkit_gemv_int4 call's.
extern "C" int glmkit_gemv_int4_many(const float* x, int64_t M, int64_t K, int s_type, int64_t gs, int64_t J,
                                     const uint8_t* const* w, const void* const* scales, const void* const* mins,
                                     const int64_t* N, float* const* y, int threads) {
  if (gs <= 0 || (gs != 32 && gs % 64) || K % gs || K % 64 || s_type < 0 || s_type > 1 || J < 1) return 1;
  int64_t G = K / gs;
  std::vector<int8_t> xd(M * K);
  std::vector<float> sx(M * G), xsum(M * G);
  int4_activations(x, M, K, gs, xd.data(), sx.data(), xsum.data());
  if (s_type == 0)
    int4(xd.data(), sx.data(), xsum.data(), M, K, gs, J, w, reinterpret_cast<const float* const*>(scales),
         reinterpret_cast<const float* const*>(mins), N, y, threads);
  else
    int4(xd.data(), sx.data(), xsum.data(), M, K, gs, J, w, reinterpret_cast<const uint16_t* const*>(scales),
         reinterpret_cast<const uint16_t* const*>(mins), N, y, threads);
  return 0;
}

// glmkit's int4 layout: w uint8 (N, K/2); scales and mins (N, K/gs) each, both fp32 (s_type 0) or both
// bf16 (s_type 1); through int8 activations quantized per group. gs: 32 or a multiple of 64 (a 64-column
// chunk holds two whole groups or part of one); K: a multiple of 64.
extern "C" int glmkit_gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const void* scales,
                                const void* mins, int s_type, int64_t gs, int64_t N, float* y, int threads) {
  return glmkit_gemv_int4_many(x, M, K, s_type, gs, 1, &w, &scales, &mins, &N, &y, threads);
}

// ---- per-head products of latent attention's absorbed form ------------------------------------------------------
// A decode step of latent attention folds kv_b's key rows into the query (q_lat[h] = q_nope[h] W_UK[h], a product
// over W_UK's rows) and applies its value rows to the attention output (W_UV[h] y[h]). As PyTorch einsums of a
// bf16 weight and a few rows these run through batched GEMMs far below the memory bandwidth; here each head's
// (N, K) block of the weight (rows ldr apart, heads ldh apart, fp32 or bf16) is read once for the M rows. x (M, H,
// Kx) fp32, y (M, H, Ky) fp32; trans 0: y[m, h, n] = dot(x[m, h, :K], W[h][n, :]) (Kx = K, Ky = N); trans 1:
// y[m, h, k] = sum_n x[m, h, n] W[h][n, k] (Kx = N, Ky = K).
template <typename W>
void heads_gemv(const float* x, int64_t M, int64_t H, const W* w, int64_t N, int64_t K, int64_t ldr, int64_t ldh,
                int trans, float* y, int threads) {
  const int64_t Kx = trans ? N : K, Ky = trans ? K : N;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t h = 0; h < H; ++h) {
    const W* wh = w + h * ldh;
    if (!trans) {
      float out[4];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; m += 4) {
          const int64_t mb = std::min<int64_t>(4, M - m);
          const float* xm = x + (m * H + h) * Kx;
          switch (mb) {
            case 4: dot_rows<W, 4>(xm, H * Kx, wh + n * ldr, K, out); break;
            case 3: dot_rows<W, 3>(xm, H * Kx, wh + n * ldr, K, out); break;
            case 2: dot_rows<W, 2>(xm, H * Kx, wh + n * ldr, K, out); break;
            default: dot_rows<W, 1>(xm, H * Kx, wh + n * ldr, K, out); break;
          }
          for (int64_t j = 0; j < mb; ++j) y[((m + j) * H + h) * Ky + n] = out[j];
        }
      continue;
    }
    for (int64_t m = 0; m < M; ++m) std::fill(y + (m * H + h) * Ky, y + (m * H + h) * Ky + K, 0.0f);
    for (int64_t n = 0; n < N; ++n) {  // row n of the head's block, added into every row's output
      const W* wr = wh + n * ldr;
      for (int64_t m = 0; m < M; ++m) {
        float* ym = y + (m * H + h) * Ky;
        const float a = x[(m * H + h) * Kx + n];
        const __m256 va = _mm256_set1_ps(a);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) _mm256_storeu_ps(ym + k, _mm256_fmadd_ps(va, load8(wr + k), _mm256_loadu_ps(ym + k)));
        for (; k < K; ++k) ym[k] += a * to_float(wr[k]);
      }
    }
  }
}

// ---- a mixture-of-experts layer's experts in one call ------------------------------------------------------
// A decode step of an MoE layer runs a few SwiGLU experts (the routed ones and the shared one) on a few rows
// each. As separate calls that is ~10 per expert, each with its own activation rounding, thread start and
// barrier, and on a machine shared with other work a 2-thread parallel region can wait a whole scheduler
// slice for its second thread. Here the whole layer is one parallel region of three phases: every expert's
// gate + up rows (the token's activations rounded once for all experts), SiLU(gate) * up, then the down rows,
// where each thread owns a range of output channels and adds every expert's weighted contribution to them (no
// reduction, no race when several experts write one token's row). The products are int4_tile's, so the
// result is what glmkit_gemv_int4 gives per expert, summed in fp32.
// struct GlmkitExpert: simd.h (decode.cpp builds tables of them too)

namespace {

// Output rows [0, N) of one weight against the m activation rows x (ldx apart, sx / xsum (m, G)), into y[j * ldy + n],
// for output rows n in [n0, n1) (multiples of 4 apart from n1 = N).
template <int CH, typename S>
void int4_block(const int8_t* x, int64_t m, int64_t K, const float* sx, const float* xsum, const uint8_t* w, const S* sc,
                const S* mn, int64_t gs, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t G = K / gs, ldw = K / 2;
  int64_t n = n0;
  if (m == 1)
    for (; n + 4 <= n1; n += 4)
      int4_tile<4, 1, CH>(x, K, sx, xsum, G, w + n * ldw, ldw, gs, sc + n * G, mn + n * G, y + n, ldy);
  for (; n < n1; ++n)
    for (int64_t j = 0; j < m; j += kMaxRows)
      rows_int4<kMaxRows, CH>(std::min<int64_t>(kMaxRows, m - j), x + j * K, K, sx + j * G, xsum + j * G, G, w + n * ldw,
                              gs, sc + n * G, mn + n * G, y + j * ldy + n, ldy);
}

// Output channels per product in moe_int4's down phase (a multiple of 4): each thread walks one expert's rows of
// its channel range at a time, in blocks of this many, so the weights it reads are one long contiguous stream per
// expert rather than 4 rows of each expert in turn.
constexpr int64_t kDownRows = 64;

template <int CH, typename S>
void moe_int4(const float* x, int64_t M, int64_t C, int64_t gs, int64_t J, const GlmkitExpert* ex, const int64_t* off,
              const int64_t* rows, const float* weights, float* out, int threads) {
  const int64_t P = off[J], Gc = C / gs;
  int64_t Fmax = 0;
  for (int64_t j = 0; j < J; ++j) Fmax = std::max(Fmax, ex[j].f);
  // the hidden activations of pair p start at hoff[p]: each expert's rows contiguous, F_j apart
  std::vector<int64_t> hoff(P + 1, 0);
  for (int64_t j = 0; j < J; ++j)
    for (int64_t p = off[j]; p < off[j + 1]; ++p) hoff[p + 1] = hoff[p] + ex[j].f;
  std::vector<int8_t> xd(M * C), xg(P * C), hd(hoff[P]);
  std::vector<float> sx(M * Gc), xs(M * Gc), sxg(P * Gc), xsg(P * Gc), h(P * 2 * Fmax), hs(hoff[P] / gs),
      hsum(hoff[P] / gs), y(P * kDownRows * threads);
  int4_activations(x, M, C, gs, xd.data(), sx.data(), xs.data());
  for (int64_t p = 0; p < P; ++p) {  // each (token, expert) pair's activations, grouped by expert
    std::memcpy(&xg[p * C], &xd[rows[p] * C], C);
    std::memcpy(&sxg[p * Gc], &sx[rows[p] * Gc], Gc * sizeof(float));
    std::memcpy(&xsg[p * Gc], &xs[rows[p] * Gc], Gc * sizeof(float));
  }
  // work items of the up phase: (expert, block of 64 output rows), so that small experts still spread
  std::vector<int64_t> item_job, item_row;
  for (int64_t j = 0; j < J; ++j)
    for (int64_t n = 0; n < 2 * ex[j].f; n += 64) item_job.push_back(j), item_row.push_back(n);
  const int64_t items = static_cast<int64_t>(item_job.size());
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t j = item_job[i], n0 = item_row[i], F2 = 2 * ex[j].f, m = off[j + 1] - off[j];
      int4_block<CH>(&xg[off[j] * C], m, C, &sxg[off[j] * Gc], &xsg[off[j] * Gc], ex[j].up,
                     static_cast<const S*>(ex[j].up_scales), static_cast<const S*>(ex[j].up_mins), gs, n0,
                     std::min(F2, n0 + 64), &h[off[j] * 2 * Fmax], 2 * Fmax);
    }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < P; ++p) {  // SiLU(gate) * up, rounded for the down rows (in place over the gate half)
      const int64_t j = std::upper_bound(off, off + J + 1, p) - off - 1, F = ex[j].f;
      float* hp = &h[p * 2 * Fmax];
      for (int64_t f = 0; f < F; ++f) hp[f] = hp[f] / (1.0f + std::exp(-hp[f])) * hp[F + f];
      int4_activations(hp, 1, F, gs, &hd[hoff[p]], &hs[hoff[p] / gs], &hsum[hoff[p] / gs]);
    }
    // this thread's range of output channels (whole tiles of 4), each expert's rows in it read as one stream
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads(), tiles = (C + 3) / 4;
    const int64_t c0 = std::min(C, 4 * (tiles * tid / nth)), c1 = std::min(C, 4 * (tiles * (tid + 1) / nth));
    float* t = &y[tid * P * kDownRows];
    for (int64_t j = 0; j < J; ++j) {
      const int64_t m = off[j + 1] - off[j], F = ex[j].f;
      const int64_t h0 = hoff[off[j]];
      for (int64_t n0 = c0; n0 < c1; n0 += kDownRows) {
        const int64_t n1 = std::min(c1, n0 + kDownRows);
        int4_block<CH>(&hd[h0], m, F, &hs[h0 / gs], &hsum[h0 / gs], ex[j].down + n0 * (F / 2),
                       static_cast<const S*>(ex[j].down_scales) + n0 * (F / gs),
                       static_cast<const S*>(ex[j].down_mins) + n0 * (F / gs), gs, 0, n1 - n0, t, kDownRows);
        for (int64_t r = 0; r < m; ++r) {
          const int64_t p = off[j] + r;
          for (int64_t n = n0; n < n1; ++n) out[rows[p] * C + n] += weights[p] * t[r * kDownRows + n - n0];
        }
      }
    }
  }
}

}  // namespace

// ---- dequantization for many-row products ------------------------------------------------------------
// Prefill multiplies hundreds of activation rows by each weight; there the machine's GEMM (bf16 or fp32)
// is several times faster than any weight-only kernel, so kernels.py dequantizes the weight a tile of
// output rows at a time with these and hands each tile to PyTorch's GEMM. The weights are computed in
// fp32 (w = q * scale + min, one rounding) and stored as fp32 or as bf16 rounded to nearest even.
namespace {

inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(uint16_t* out, __m256 v) {  // fp32 -> bf16, round to nearest even (finite values)
  __m256i u = _mm256_castps_si256(v);
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));  // all <= 0xFFFF
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), p);
}
inline void store1(float* out, float v) { *out = v; }
inline void store1(uint16_t* out, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  *out = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

template <typename O>
void dequant_q8(const int8_t* w, const float* scale, int64_t R, int64_t K, O* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* wr = w + r * K;
    O* o = out + r * K;
    const __m256 s = _mm256_set1_ps(scale[r]);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) store8(o + k, _mm256_mul_ps(load8(wr + k), s));
    for (; k < K; ++k) store1(o + k, wr[k] * scale[r]);
  }
}

// 32 columns (16 bytes) of one int4 row: the low nibbles are the even columns, the high ones the odd.
template <typename O>
inline void dequant32_int4(const uint8_t* w, __m256 s, __m256 mn, O* out) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  // columns 0-15, 16-31
  const __m128i parts[4] = {c0, _mm_srli_si128(c0, 8), c1, _mm_srli_si128(c1, 8)};
  for (int i = 0; i < 4; ++i)
    store8(out + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), s, mn));
}

template <typename O, typename S>
void dequant_int4(const uint8_t* w, const S* sc, const S* mn, int64_t gs, int64_t R, int64_t K, O* out, int threads) {
  const int64_t G = K / gs;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* wr = w + r * (K / 2);
    const S *sr = sc + r * G, *mr = mn + r * G;
    O* o = out + r * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(to_float(sr[g])), m = _mm256_set1_ps(to_float(mr[g]));
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) dequant32_int4(wr + k / 2, s, m, o + k);
    }
  }
}

// 8 packed bytes (16 columns, low nibble = even column) as fp32: the 8 even columns and the 8 odd ones.
inline void nibbles16(const uint8_t* w, __m256& even, __m256& odd) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
  even = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0F)));
  odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

// NB int4 rows (ldw bytes apart; scales and mins G apart) against one fp32 row p in the nibbles' order (per 16
// columns the 8 even, then the 8 odd) with its group sums xs: y[i] = sum_g s_ig sum_k p_k q_ik + m_ig xs_g.
template <int NB, typename S>
inline void int4_rows_fp32(const float* p, const float* xs, const uint8_t* w, int64_t ldw, const S* sc, const S* mn,
                           int64_t G, int64_t gs, float* y) {
  __m256 acc[NB];
  float base[NB];
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps(), base[i] = 0.0f;
  for (int64_t g = 0; g < G; ++g) {
    __m256 t[NB];
    for (int i = 0; i < NB; ++i) t[i] = _mm256_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
      const __m256 xe = _mm256_loadu_ps(p + k), xo = _mm256_loadu_ps(p + k + 8);
      for (int i = 0; i < NB; ++i) {
        __m256 e, o;
        nibbles16(w + i * ldw + k / 2, e, o);
        t[i] = _mm256_fmadd_ps(o, xo, _mm256_fmadd_ps(e, xe, t[i]));
      }
    }
    for (int i = 0; i < NB; ++i) {
      acc[i] = _mm256_fmadd_ps(t[i], _mm256_set1_ps(to_float(sc[i * G + g])), acc[i]);
      base[i] += to_float(mn[i * G + g]) * xs[g];
    }
  }
  for (int i = 0; i < NB; ++i) y[i] = hsum(acc[i]) + base[i];
}

// heads_gemv_int4 (below) for K a multiple of 64, reading each int4 row where it lies: nothing is dequantized into
// memory first (that costs 3-4x the read of the row itself, and latent attention's kv_b is read twice per layer).
// trans (W_UK, a sum over the rows): fp32 products (activations not rounded), each group's scale and min applied
// to its sums, y[k] = sum_n (x_n s_ng) q_nk + sum_n x_n m_ng, over 64-column blocks (8 accumulators, the even and
// the odd columns apart as the nibbles hold them, interleaved once at the end). Otherwise (W_UV, a product per
// row), groups of a multiple of 64: the int4 linears' own path (int4_activations, int4_block: int8 activations per
// group, VNNI dot products, read at the memory bandwidth); groups of 32: fp32, y_n = sum_g s_ng sum_k x_k q_nk +
// sum_g m_ng sum_k x_k, four rows at a time against x rearranged once into the nibbles' order.
template <typename S>
void heads_int4_direct(const float* x, int64_t M, int64_t H, const uint8_t* w, const S* sc, const S* mn, int64_t gs,
                       int64_t N, int64_t K, int64_t ldh, int trans, float* y, int threads) {
  const int64_t G = K / gs, ldw = K / 2, Kx = trans ? N : K, Ky = trans ? K : N;
  if (trans) {
    const int64_t B = K / 64;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < H * B; ++item) {  // a head's blocks in a row: one thread reads its cache lines
      const int64_t h = item / B, k0 = item % B * 64, g0 = k0 / gs, g1 = (k0 + 32) / gs;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + (m * H + h) * Kx;
        __m256 ev[4], od[4];
        for (int j = 0; j < 4; ++j) ev[j] = od[j] = _mm256_setzero_ps();
        float base0 = 0.0f, base1 = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t r = h * ldh + n;
          const float xv = xm[n];
          const uint8_t* wr = w + r * ldw + k0 / 2;
          _mm_prefetch(reinterpret_cast<const char*>(wr + 8 * ldw), _MM_HINT_T0);
          const __m256 c0 = _mm256_set1_ps(xv * to_float(sc[r * G + g0]));
          const __m256 c1 = _mm256_set1_ps(xv * to_float(sc[r * G + g1]));
          base0 += xv * to_float(mn[r * G + g0]);
          base1 += xv * to_float(mn[r * G + g1]);
          for (int j = 0; j < 4; ++j) {  // columns k0 + 16 j .. + 15; the first two in group g0, the last two in g1
            __m256 e, o;
            nibbles16(wr + 8 * j, e, o);
            ev[j] = _mm256_fmadd_ps(j < 2 ? c0 : c1, e, ev[j]);
            od[j] = _mm256_fmadd_ps(j < 2 ? c0 : c1, o, od[j]);
          }
        }
        float* ym = y + (m * H + h) * Ky + k0;
        for (int j = 0; j < 4; ++j) {
          const __m256 b = _mm256_set1_ps(j < 2 ? base0 : base1);
          const __m256 lo = _mm256_unpacklo_ps(ev[j], od[j]), hi = _mm256_unpackhi_ps(ev[j], od[j]);
          _mm256_storeu_ps(ym + 16 * j, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), b));
          _mm256_storeu_ps(ym + 16 * j + 8, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x31), b));
        }
      }
    }
    return;
  }
  if (gs % 64 == 0) {  // the value rows as any int4 linear reads them: int8 activations, integer dot products
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> xr(M * K), sx(M * G), xsum(M * G);
      std::vector<int8_t> xd(M * K);
#pragma omp for schedule(static)
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t m = 0; m < M; ++m) std::copy(x + (m * H + h) * Kx, x + (m * H + h) * Kx + K, xr.data() + m * K);
        int4_activations(xr.data(), M, K, gs, xd.data(), sx.data(), xsum.data());
        const uint8_t* wh = w + h * ldh * ldw;
        const S *sh = sc + h * ldh * G, *mh = mn + h * ldh * G;
        if (gs == 64)
          int4_block<1, S>(xd.data(), M, K, sx.data(), xsum.data(), wh, sh, mh, gs, 0, N, y + h * Ky, H * Ky);
        else if (gs == 128)
          int4_block<2, S>(xd.data(), M, K, sx.data(), xsum.data(), wh, sh, mh, gs, 0, N, y + h * Ky, H * Ky);
        else
          int4_block<0, S>(xd.data(), M, K, sx.data(), xsum.data(), wh, sh, mh, gs, 0, N, y + h * Ky, H * Ky);
      }
    }
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> xp(M * K), xs(M * G);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t m = 0; m < M; ++m) {  // per 16 columns: the 8 even, then the 8 odd; and each group's sum
        const float* xm = x + (m * H + h) * Kx;
        float* p = xp.data() + m * K;
        for (int64_t k = 0; k < K; k += 16)
          for (int i = 0; i < 8; ++i) p[k + i] = xm[k + 2 * i], p[k + 8 + i] = xm[k + 2 * i + 1];
        for (int64_t g = 0; g < G; ++g) {
          float t = 0.0f;
          for (int64_t k = g * gs; k < (g + 1) * gs; ++k) t += xm[k];
          xs[m * G + g] = t;
        }
      }
      for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const uint8_t* wr = w + (h * ldh + n0) * ldw;
        const S *sr = sc + (h * ldh + n0) * G, *mr = mn + (h * ldh + n0) * G;
        for (int64_t m = 0; m < M; ++m) {
          float* ym = y + (m * H + h) * Ky + n0;
          switch (std::min<int64_t>(4, N - n0)) {
            case 4: int4_rows_fp32<4>(xp.data() + m * K, xs.data() + m * G, wr, ldw, sr, mr, G, gs, ym); break;
            case 3: int4_rows_fp32<3>(xp.data() + m * K, xs.data() + m * G, wr, ldw, sr, mr, G, gs, ym); break;
            case 2: int4_rows_fp32<2>(xp.data() + m * K, xs.data() + m * G, wr, ldw, sr, mr, G, gs, ym); break;
            default: int4_rows_fp32<1>(xp.data() + m * K, xs.data() + m * G, wr, ldw, sr, mr, G, gs, ym); break;
          }
        }
      }
    }
  }
}

// kv_b's key rows (W_UK, trans above) as integer dot products. The fp32 form is compute-bound (each nibble widened
// to fp32 for one FMA: 7-10 ms a step over GLM-4.7-Flash's 47 layers, for 1 MB of codes a layer), and the int4
// linears' integer path needs a dot product per output along the codes' rows, which W_UK sums across. So the key
// rows are regrouped once per weight (kernels.uk_codes, which fused.py's plan and the eager path share: the same
// bytes as the rows themselves, 0.94 MiB a layer at H 20, N 192, K 512): per head and per 32 outputs k, 64 bytes
// per 4 rows n, in which int32 lane i of the first 32 bytes holds rows n..n+3 of output k + i (low nibbles) and
// k + 8 + i (high nibbles), the second 32 bytes the same for k + 16 and k + 24 (rows padded with code 0 to a
// multiple of 8). One
// vpdpbusd multiplies 8 outputs' 4 codes by the 4 activations broadcast to every lane, and the sums land in output
// order (no horizontal sums). With w_nk = s_ng q_nk + m_ng (g = k's group):
//   y_k = sum_n (x_n s_ng) q_nk + sum_n x_n m_ng,
// so each group g has its own activations x_n s_ng, rounded to int8 steps of their absmax / 127 per 64 rows (as
// int4_activations rounds a linear's per group of 64 columns), and the mins' term base_g in fp32. The codes are
// unsigned (0..15, mean 7.5), so the rounding errors e_n meet weights of one sign and add up; base_g also takes
// 7.5 sum_n e_n (the exact sum of the activations less their rounded sum), which leaves sum_n e_n (q_nk - 7.5): under
// half the error of the int4 linears' rounding (0.67% of the output's norm on random codes instead of 1.6%; W_UV's
// is 1.5%). The AVX2 build sums the same int32s (maddubs, madd), so both give the same bits.
template <typename S>
void heads_uk_int4(const float* x, int64_t M, int64_t H, const uint8_t* codes, const S* sc, const S* mn, int64_t gs,
                   int64_t N, int64_t K, int64_t ldh, float* y, int threads) {
  const int64_t G = K / gs, Np = (N + 7) / 8 * 8, C = (N + 63) / 64, KB = K / 32;
#pragma omp parallel num_threads(threads)
  {
    // each thread rounds the activations of the heads its (head, 32 outputs) items need, itself (a head split
    // between two threads is done by both): no barrier between the two phases, which on a machine shared with other
    // work can wait a whole scheduler slice for the other thread
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num(), i0 = H * KB * t / T, i1 = H * KB * (t + 1) / T;
    const int64_t h0 = i0 / KB, Hn = i1 > i0 ? (i1 - 1) / KB + 1 - h0 : 0;
    std::vector<int8_t> xq(M * Hn * Np * G);  // (M, Hn, Np / 4, G, 4): per 4 rows each group's activations, rounded
    std::vector<float> step(M * Hn * G * C), base(M * Hn * G);
    // per row n the factors x_n s_ng of 8 groups in a vector (a scale row holds them side by side; one scalar loop
    // per group reading the scales G apart cost as much as the products), their absmax per 64 rows and group, and
    // the mins' sums base_g; then 4 rows' rounded factors per group packed into one int32 (the dpbusd lane)
    const int64_t G8 = (G + 7) / 8 * 8;
    std::vector<float> a(Np * G8, 0.0f), amax(C * G8), inv(C * G8), steps(C * G8), b(G8), as(G8);  // a: rows N.. 0
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i byte = _mm256_set1_epi32(0xFF);
    for (int64_t ph = 0; ph < M * Hn; ++ph) {  // (m, h - h0)
      const int64_t h = h0 + ph % Hn, mh = ph / Hn * H + h;
      const float* xm = x + mh * N;
      for (int64_t g = 0; g < G; g += 8) {
        __m256 bs = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
          __m256 am = _mm256_setzero_ps();
          for (int64_t n = 64 * c; n < std::min(N, 64 * c + 64); ++n) {
            const __m256 xv = _mm256_set1_ps(xm[n]);
            const __m256 v = _mm256_mul_ps(xv, load_part(sc + (h * ldh + n) * G + g, G - g));
            _mm256_storeu_ps(&a[n * G8 + g], v);
            am = _mm256_max_ps(am, _mm256_andnot_ps(sign, v));
            sum = _mm256_add_ps(sum, v);
            bs = _mm256_fmadd_ps(xv, load_part(mn + (h * ldh + n) * G + g, G - g), bs);
          }
          _mm256_storeu_ps(&amax[c * G8 + g], am);
        }
        _mm256_storeu_ps(&b[g], bs);
        _mm256_storeu_ps(&as[g], sum);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) {
          const float am = amax[c * G8 + g], s = am > 0.0f ? am / 127.0f : 1.0f;
          step[(ph * G + g) * C + c] = steps[c * G8 + g] = s, inv[c * G8 + g] = 1.0f / s;
        }
      for (int64_t g = 0; g < G; g += 8) {
        __m256 err = _mm256_loadu_ps(&as[g]);  // sum_n x_n s_ng less the rounded sum, chunk by chunk
        for (int64_t c = 0; c < C; ++c) {
          const __m256 vi = _mm256_loadu_ps(&inv[c * G8 + g]);
          __m256i qs = _mm256_setzero_si256();
          for (int64_t n = 64 * c; n < std::min(Np, 64 * c + 64); n += 4) {
            __m256i p = _mm256_setzero_si256();
            for (int j = 0; j < 4; ++j) {  // nearest even, as int4_activations' nearbyint; byte j of each lane
              const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(&a[(n + j) * G8 + g]), vi));
              qs = _mm256_add_epi32(qs, r);
              p = _mm256_or_si256(p, _mm256_slli_epi32(_mm256_and_si256(r, byte), 8 * j));
            }
            int8_t* dst = &xq[((ph * Np + n) * G + 4 * g)];  // ((ph, n / 4), g, 4)
            if (G - g >= 8) {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p);
            } else {
              alignas(32) int8_t t[32];
              _mm256_store_si256(reinterpret_cast<__m256i*>(t), p);
              std::memcpy(dst, t, 4 * (G - g));
            }
          }
          err = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(qs), _mm256_loadu_ps(&steps[c * G8 + g]), err);
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, _mm256_fmadd_ps(_mm256_set1_ps(7.5f), err, _mm256_loadu_ps(&b[g])));
        for (int64_t i = 0; i < std::min<int64_t>(8, G - g); ++i) base[ph * G + g + i] = t[i];
      }
    }
    for (int64_t item = i0; item < i1; ++item) {  // (head, 32 outputs): 16 Np contiguous bytes of codes
      const int64_t h = item / KB, k0 = item % KB * 32, g = k0 / gs;
      const uint8_t* wb = codes + item * Np * 16;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t mh = m * H + h, ph = m * Hn + h - h0;
        const int8_t* q = &xq[ph * Np * G + 4 * g];  // rows n..n+3 at q + n * G
        __m256 f[4];
        for (int j = 0; j < 4; ++j) f[j] = _mm256_setzero_ps();
        for (int64_t c = 0; c < C; ++c) {
          __m256i acc[2][4];  // two steps of 4 rows in flight, each into its own sums: vpdpbusd's latency is 5 cycles
          for (int t = 0; t < 2; ++t)
            for (int j = 0; j < 4; ++j) acc[t][j] = _mm256_setzero_si256();
          const int64_t n1 = std::min(Np, 64 * c + 64);
          for (int64_t n = 64 * c; n < n1; n += 8) {
            const uint8_t* wn = wb + n * 16;
            // the 128 bytes kPrefetchBytes ahead (1 KB was too close: 4.96 -> 4.37 ms for 47 layers, from memory)
            _mm_prefetch(reinterpret_cast<const char*>(wn) + kPrefetchBytes, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wn) + kPrefetchBytes + 64, _MM_HINT_T0);
            for (int t = 0; t < 2; ++t) {
              int32_t x4;
              std::memcpy(&x4, q + (n + 4 * t) * G, 4);
              const __m256i xb = _mm256_set1_epi32(x4);
              __m256i lo0, hi0, lo1, hi1;
              nibbles(wn + 64 * t, lo0, hi0);
              nibbles(wn + 64 * t + 32, lo1, hi1);
              acc[t][0] = dot4(acc[t][0], lo0, xb), acc[t][1] = dot4(acc[t][1], hi0, xb);
              acc[t][2] = dot4(acc[t][2], lo1, xb), acc[t][3] = dot4(acc[t][3], hi1, xb);
            }
          }
          const __m256 s = _mm256_set1_ps(step[(ph * G + g) * C + c]);
          for (int j = 0; j < 4; ++j)
            f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[0][j], acc[1][j])), s, f[j]);
        }
        const __m256 b = _mm256_set1_ps(base[ph * G + g]);
        for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + mh * K + k0 + 8 * j, _mm256_add_ps(f[j], b));
      }
    }
  }
}

// heads_gemv (above) with each head's block of rows in glmkit's int4 layout: rows h * ldh + n (n < N) of packed w
// (K/2 bytes a row), sc and mn (K/gs a row). K a multiple of 64: heads_int4_direct. Otherwise each row is
// dequantized to fp32 once (the activations are not rounded: these products are small) and used for the M rows as
// heads_gemv uses an fp32 one.
template <typename S>
void heads_gemv_int4(const float* x, int64_t M, int64_t H, const uint8_t* w, const S* sc, const S* mn, int64_t gs,
                     int64_t N, int64_t K, int64_t ldh, int trans, float* y, int threads) {
  if (K % 64 == 0) return heads_int4_direct(x, M, H, w, sc, mn, gs, N, K, ldh, trans, y, threads);
  const int64_t G = K / gs, Kx = trans ? N : K, Ky = trans ? K : N;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(K);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < H; ++h) {
      if (trans)
        for (int64_t m = 0; m < M; ++m) std::fill(y + (m * H + h) * Ky, y + (m * H + h) * Ky + K, 0.0f);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t r = h * ldh + n;
        for (int64_t g = 0; g < G; ++g) {
          const __m256 s = _mm256_set1_ps(to_float(sc[r * G + g])), m0 = _mm256_set1_ps(to_float(mn[r * G + g]));
          for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) dequant32_int4(w + r * (K / 2) + k / 2, s, m0, &row[k]);
        }
        if (!trans) {
          float out[4];
          for (int64_t m = 0; m < M; m += 4) {
            const int64_t mb = std::min<int64_t>(4, M - m);
            const float* xm = x + (m * H + h) * Kx;
            switch (mb) {
              case 4: dot_rows<float, 4>(xm, H * Kx, row.data(), K, out); break;
              case 3: dot_rows<float, 3>(xm, H * Kx, row.data(), K, out); break;
              case 2: dot_rows<float, 2>(xm, H * Kx, row.data(), K, out); break;
              default: dot_rows<float, 1>(xm, H * Kx, row.data(), K, out); break;
            }
            for (int64_t j = 0; j < mb; ++j) y[((m + j) * H + h) * Ky + n] = out[j];
          }
          continue;
        }
        for (int64_t m = 0; m < M; ++m) {
          float* ym = y + (m * H + h) * Ky;
          const __m256 va = _mm256_set1_ps(x[(m * H + h) * Kx + n]);
          for (int64_t k = 0; k < K; k += 8)
            _mm256_storeu_ps(ym + k, _mm256_fmadd_ps(va, _mm256_loadu_ps(&row[k]), _mm256_loadu_ps(ym + k)));
        }
      }
    }
  }
}

}  // namespace

// Rows [0, R) of an int8 weight (R, K) with per-row fp32 scales into out (R, K): fp32 (out_type 0) or bf16 (1).
extern "C" int glmkit_dequant_q8(const int8_t* w, const float* scale, int64_t R, int64_t K, void* out, int out_type,
                                 int threads) {
  if (out_type == 0) dequant_q8(w, scale, R, K, static_cast<float*>(out), threads);
  else if (out_type == 1) dequant_q8(w, scale, R, K, static_cast<uint16_t*>(out), threads);
  else return 1;
  return 0;
}

// Rows [0, R) of glmkit's int4 layout (w (R, K/2), scales and mins (R, K/gs) as in glmkit_gemv_int4) into out
// (R, K): fp32 (out_type 0) or bf16 (1). gs: a multiple of 32 that divides K.
extern "C" int glmkit_dequant_int4(const uint8_t* w, const void* scales, const void* mins, int s_type, int64_t gs,
                                   int64_t R, int64_t K, void* out, int out_type, int threads) {
  if (gs <= 0 || gs % 32 || K % gs || s_type < 0 || s_type > 1 || out_type < 0 || out_type > 1) return 1;
  const float *sf = static_cast<const float*>(scales), *mf = static_cast<const float*>(mins);
  const uint16_t *sb = static_cast<const uint16_t*>(scales), *mb = static_cast<const uint16_t*>(mins);
  if (s_type == 0 && out_type == 0) dequant_int4(w, sf, mf, gs, R, K, static_cast<float*>(out), threads);
  if (s_type == 0 && out_type == 1) dequant_int4(w, sf, mf, gs, R, K, static_cast<uint16_t*>(out), threads);
  if (s_type == 1 && out_type == 0) dequant_int4(w, sb, mb, gs, R, K, static_cast<float*>(out), threads);
  if (s_type == 1 && out_type == 1) dequant_int4(w, sb, mb, gs, R, K, static_cast<uint16_t*>(out), threads);
  return 0;
}

// The experts of one MoE layer for M rows x (M, C) fp32: expert j (ex[j]) takes the pairs p in [off[j], off[j+1]),
// each the activation row rows[p] with weight weights[p], and out (M, C) fp32 gets out[rows[p]] += weights[p] *
// down(SiLU(gate) * up)(x[rows[p]]). Scales and mins fp32 (s_type 0) or bf16 (1); gs a multiple of 64 dividing C
// and every F; C and 2F multiples of 4.
extern "C" int glmkit_moe_int4(const float* x, int64_t M, int64_t C, int64_t gs, int s_type, int64_t J,
                               const GlmkitExpert* ex, const int64_t* off, const int64_t* rows, const float* weights,
                               float* out, int threads) {
  if (gs <= 0 || gs % 64 || C % gs || C % 4 || s_type < 0 || s_type > 1 || J < 0 || off[0] != 0) return 1;
  for (int64_t j = 0; j < J; ++j)
    if (ex[j].f <= 0 || ex[j].f % gs || off[j + 1] < off[j]) return 1;
  for (int64_t p = 0; p < off[J]; ++p)
    if (rows[p] < 0 || rows[p] >= M) return 1;
  threads = std::max(threads, 1);
#define GLMKIT_MOE(CH, S) moe_int4<CH, S>(x, M, C, gs, J, ex, off, rows, weights, out, threads)
  if (s_type == 0) {
    if (gs == 64) GLMKIT_MOE(1, float); else if (gs == 128) GLMKIT_MOE(2, float); else GLMKIT_MOE(0, float);
  } else {
    if (gs == 64) GLMKIT_MOE(1, uint16_t); else if (gs == 128) GLMKIT_MOE(2, uint16_t); else GLMKIT_MOE(0, uint16_t);
  }
#undef GLMKIT_MOE
  return 0;
}

// Per-head products (heads_gemv above): w fp32 (wtype 0) or bf16 (1).
extern "C" int glmkit_heads_gemv(const float* x, int64_t M, int64_t H, const void* w, int wtype, int64_t N, int64_t K,
                                 int64_t ldr, int64_t ldh, int trans, float* y, int threads) {
  if (M < 0 || H < 0 || N < 0 || K < 0 || ldr < K || (trans != 0 && trans != 1)) return 1;
  if (wtype == 0) heads_gemv(x, M, H, static_cast<const float*>(w), N, K, ldr, ldh, trans, y, threads);
  else if (wtype == 1) heads_gemv(x, M, H, static_cast<const uint16_t*>(w), N, K, ldr, ldh, trans, y, threads);
  else return 1;
  return 0;
}

// heads_gemv_int4 above: scales and mins fp32 (s_type 0) or bf16 (1); gs a multiple of 32 dividing K.
extern "C" int glmkit_heads_gemv_int4(const float* x, int64_t M, int64_t H, const uint8_t* w, const void* scales,
                                      const void* mins, int s_type, int64_t gs, int64_t N, int64_t K, int64_t ldh,
                                      int trans, float* y, int threads) {
  if (M < 0 || H < 0 || N < 0 || gs <= 0 || gs % 32 || K % gs || (trans != 0 && trans != 1)) return 1;
  if (s_type == 0)
    heads_gemv_int4(x, M, H, w, static_cast<const float*>(scales), static_cast<const float*>(mins), gs, N, K, ldh, trans,
                    y, threads);
  else if (s_type == 1)
    heads_gemv_int4(x, M, H, w, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(mins), gs, N, K, ldh,
                    trans, y, threads);
  else
    return 1;
  return 0;
}

// heads_uk_int4 above: x (M, H, N) -> y (M, H, K) with kv_b's key rows regrouped in codes (kernels.heads_uk_codes)
// and their scales and mins read in place (rows h * ldh + n, K / gs each, fp32 (s_type 0) or bf16 (1)); gs a
// multiple of 32 dividing K.
extern "C" int glmkit_heads_uk_int4(const float* x, int64_t M, int64_t H, const uint8_t* codes, const void* scales,
                                    const void* mins, int s_type, int64_t gs, int64_t N, int64_t K, int64_t ldh,
                                    float* y, int threads) {
  if (M < 0 || H < 0 || N < 0 || N > ldh || gs <= 0 || gs % 32 || K % gs || s_type < 0 || s_type > 1) return 1;
  if (s_type == 0)
    heads_uk_int4(x, M, H, codes, static_cast<const float*>(scales), static_cast<const float*>(mins), gs, N, K, ldh,
                  y, threads);
  else
    heads_uk_int4(x, M, H, codes, static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(mins), gs, N, K,
                  ldh, y, threads);
  return 0;
}
