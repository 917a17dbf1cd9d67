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

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace glmkit_simd
