// AVX2 helpers shared by gemv.cpp and decode.cpp: 8 weights to fp32 lanes, scalar conversion, horizontal sum;
// and the int4 expert record both pass to glmkit_moe_int4.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

struct GlmkitExpert {  // one SwiGLU expert in int4; field order must match kernels.py (_CExpert)
  const uint8_t* up;      // (2F, C/2) packed: rows [gate (F) | up (F)]
  const void* up_scales;  // (2F, C/gs)
  const void* up_mins;
  const uint8_t* down;      // (C, F/2) packed
  const void* down_scales;  // (C, F/gs)
  const void* down_mins;
  int64_t f;  // the expert's width F
};

namespace glmkit_simd {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 bits: bf16 -> fp32 is a 16-bit left shift
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
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(int8_t v) { return static_cast<float>(v); }

// p[0, n) in lanes 0..n-1 and zeros above (n <= 8, else all 8), reading nothing past p + n. Built in registers: 8
// scalar stores to the stack read back as one vector wait on store forwarding (~20 cycles each time), which made
// the int4 kernels' last partial block of groups cost as much as a whole row of K 2048 for K 768.
inline __m256 load_part(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
}
inline __m256 load_part(const uint16_t* p, int64_t n) {
  if (n >= 8) return load8(p);
  __m128i h = _mm_setzero_si128();
  switch (n) {  // falls through: lanes n-1 down to 0
    case 7: h = _mm_insert_epi16(h, p[6], 6); [[fallthrough]];
    case 6: h = _mm_insert_epi16(h, p[5], 5); [[fallthrough]];
    case 5: h = _mm_insert_epi16(h, p[4], 4); [[fallthrough]];
    case 4: h = _mm_insert_epi16(h, p[3], 3); [[fallthrough]];
    case 3: h = _mm_insert_epi16(h, p[2], 2); [[fallthrough]];
    case 2: h = _mm_insert_epi16(h, p[1], 1); [[fallthrough]];
    case 1: h = _mm_insert_epi16(h, p[0], 0); [[fallthrough]];
    default: break;
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace glmkit_simd
