// The sampler's uniforms (glmkit/sampling.py exponential_noise): u = ((h >> 9) + 0.5) / 2**23 with
// h = mix32(row_hash ^ mix32(token id)), murmur3's 32-bit finaliser, exactly as the PyTorch path computes it
// (there in int64 with split products; here in uint32, whose wrap-around is defined). PyTorch takes the log,
// so both paths give the same bits. Several times faster than the int64 tensor arithmetic at 150k tokens.
#include <cstdint>

static inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// rows (B,) int64 in [0, 2**32): each row's hash of (key, step); out (B, V) fp32.
extern "C" int glmkit_uniform_noise(const int64_t* rows, int64_t B, int64_t V, float* out) {
  if (B < 0 || V < 0) return 1;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < (V + 4095) / 4096; ++c) {
      const uint32_t r = static_cast<uint32_t>(rows[b]);
      float* o = out + b * V;
      const int64_t end = (c + 1) * 4096 < V ? (c + 1) * 4096 : V;
      for (int64_t v = c * 4096; v < end; ++v) {
        const uint32_t h = mix32(r ^ mix32(static_cast<uint32_t>(v)));
        o[v] = (static_cast<float>(h >> 9) + 0.5f) * 0x1p-23f;
      }
    }
  }
  return 0;
}
