// One decode step of a glmkit GLM on x86 CPUs, every layer in one native call.
//
// A decode step is bound by reading the weights once (gemv.cpp reads them near the memory
// bandwidth), but an eager PyTorch step spends as long again outside the matrix products: ~25 small
// operator calls per layer (norms, rotary, cache writes, attention, residuals, dtype conversions),
// each a few microseconds of dispatch and allocation for a few hundred numbers of work, plus the
// Python between them. Here the whole step runs in C++: the residual stream stays in fp32, the
// matrix products go through gemv.cpp's kernels, attention reads the cache only up to each row's
// write position, and nothing is allocated per operator. The cache is contiguous (a row is one block
// of max_len slots) or paged (blocks of a pool, found through each row's block table).
//
// Scope: the switches of glmkit's ModelConfig (RMSNorm / LayerNorm; rope_partial, rope_2d, or no
// rotary, learned positions being added by the caller with the embeddings; pre-LN / deepnorm
// residuals; sandwich norms; SwiGLU / tanh or erf GELU; biases), weights fp32, bf16, int8 (per row) or int4
// (glmkit's group-wise layout), caches fp32, bf16 or int8 (one fp32 scale per key and value vector,
// model.quantize_kv: keys written quantized, read as int8 times their scale, never dequantized to a
// copy; half the bytes of bf16 to read per key). fused.py builds the structs below from a model
// and checks everything else (shapes, dtypes, contiguity, row counts); plain C ABI, called through
// ctypes with the GIL released.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

extern "C" int glmkit_gemv_dense(const float* x, int64_t M, int64_t K, const void* w, int wtype, const float* scale,
                                 int64_t N, float* y, int threads);
extern "C" int glmkit_gemv_q8(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N,
                              float* y, int threads);
extern "C" int glmkit_gemv_int4(const float* x, int64_t M, int64_t K, const uint8_t* w, const void* scales,
                                const void* mins, int s_type, int64_t gs, int64_t N, float* y, int threads);

// Field order and types must match fused.py (_CLinear, _CNorm, _CLayer, _CModel, _CCache).
struct GlmkitLinear {
  const void* w;       // (N, K) fp32 / bf16 / int8, or (N, K/2) uint8 for int4
  const void* scale;   // int8: (N,) fp32; int4: (N, K/group) scales, fp32 or bf16; else null
  const void* mins;    // int4: (N, K/group) mins, the scales' dtype; else null
  const float* bias;   // (N,) or null
  int64_t n, k, group;
  int32_t kind;  // 0 fp32, 1 bf16, 2 int8, 3 int4 with fp32 scales and mins, 4 int4 with bf16 ones
};

struct GlmkitNorm {
  const float* w;  // (C,)
  const float* b;  // (C,) for LayerNorm, else null
};

struct GlmkitLayer {
  GlmkitNorm norm1, norm2, post_attn, post_mlp;  // post_*: sandwich norms only
  GlmkitLinear qkv, out, up, down;
};

struct GlmkitModel {
  const GlmkitLayer* layers;
  GlmkitNorm norm;
  GlmkitLinear head;
  int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, rotary_dim;
  int32_t layernorm, position, swiglu, sandwich, deepnorm;  // position: 0 none, 1 rope_2d, 2 rope_partial
  int32_t gelu_exact;                                       // GELU (not SwiGLU): 1 erf form, 0 tanh form
  float eps, alpha, rope_scale;                             // rope_scale: cos and sin times this
  const float* inv_freq;                                    // (rotary_dim / 2,): layers.rope_frequencies
};

struct GlmkitCache {
  void* k;               // (L, N, K, block, D): N blocks of `block` slots
  void* v;               // (L, N, K, block, D)
  uint8_t* valid;        // (N, block): real (non-padding) keys
  const int64_t* sep;    // (B,): Part A lengths. Row b sees its valid keys s < sep[b] or s <= idx[b] (model.visible)
  const int64_t* table;  // (B, row_blocks): slot s of row b is in block table[b, s / block]; null: block b (contiguous)
  float* k_scale;        // int8: (L, N, K, block), the scale of each key vector; else null
  float* v_scale;        // int8: (L, N, K, block)
  int64_t batch, max_len, block, row_blocks, n_blocks;
  int32_t kind;  // cache dtype: 0 fp32, 1 bf16, 2 int8 (with scales)
};

namespace {

using namespace glmkit_simd;

// The block holding slots [j * block, (j + 1) * block) of row b.
inline int64_t block_of(const GlmkitCache& c, int64_t b, int64_t j) { return c.table ? c.table[b * c.row_blocks + j] : b; }

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch's conversion (NaN kept NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

template <typename T>
inline void axpy(float* out, float p, const T* v, int64_t D) {  // out += p * v
  __m256 vp = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(vp, load8(v + d), _mm256_loadu_ps(out + d)));
  for (; d < D; ++d) out[d] += p * to_float(v[d]);
}

int linear(const GlmkitLinear& l, const float* x, int64_t M, float* y, int threads) {
  int rc;
  switch (l.kind) {
    case 0:
    case 1: rc = glmkit_gemv_dense(x, M, l.k, l.w, l.kind, nullptr, l.n, y, threads); break;
    case 2:
    {
      const float* s = static_cast<const float*>(l.scale);
      rc = l.k < 32768 ? glmkit_gemv_q8(x, M, l.k, static_cast<const int8_t*>(l.w), s, l.n, y, threads)
                       : glmkit_gemv_dense(x, M, l.k, l.w, 2, s, l.n, y, threads);
      break;
    }
    case 3:
    case 4:
      rc = glmkit_gemv_int4(x, M, l.k, static_cast<const uint8_t*>(l.w), l.scale, l.mins, l.kind - 3, l.group, l.n, y,
                            threads);
      break;
    default: return 10;
  }
  if (rc) return rc;
  if (l.bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < l.n; ++n) y[m * l.n + n] += l.bias[n];
  return 0;
}

// y = norm(x) row by row (y may alias x): statistics in double, as exact as PyTorch's fp32 reductions.
void norm(const GlmkitModel& m, const GlmkitNorm& p, const float* x, float* y, int64_t M) {
  const int64_t C = m.dim;
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    if (m.layernorm) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < C; ++i) mean += xr[i];
      mean /= C;
      for (int64_t i = 0; i < C; ++i) var += (xr[i] - mean) * (xr[i] - mean);
      float inv = static_cast<float>(1.0 / std::sqrt(var / C + m.eps)), mu = static_cast<float>(mean);
      for (int64_t i = 0; i < C; ++i) yr[i] = (xr[i] - mu) * inv * p.w[i] + p.b[i];
    } else {
      double ss = 0;
      for (int64_t i = 0; i < C; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      float inv = static_cast<float>(1.0 / std::sqrt(ss / C + m.eps));
      for (int64_t i = 0; i < C; ++i) yr[i] = xr[i] * inv * p.w[i];
    }
  }
}

// cos / sin tables (M, r/2) for positions p, from the model's inverse frequencies (the table the eager
// Rotary computes, layers.rope_frequencies), times `scale`: the product rounded to fp32 as PyTorch's.
void rope_table(const int64_t* p, int64_t M, int64_t r, const float* inv, float scale, float* cs, float* sn) {
  for (int64_t i = 0; i < r / 2; ++i) {
    for (int64_t m = 0; m < M; ++m) {
      float a = static_cast<float>(p[m]) * inv[i];
      cs[m * (r / 2) + i] = std::cos(a) * scale;
      sn[m * (r / 2) + i] = std::sin(a) * scale;
    }
  }
}

// Rotate pairs (x[i], x[i + r/2]) for i < r/2 (ChatGLM-6B halves) or (x[2i], x[2i+1]) (GLM-4).
inline void rotate(float* x, int64_t r, const float* cs, const float* sn, bool interleaved) {
  for (int64_t i = 0; i < r / 2; ++i) {
    int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + r / 2;
    float x1 = x[a], x2 = x[b];
    x[a] = x1 * cs[i] - x2 * sn[i];
    x[b] = x2 * cs[i] + x1 * sn[i];
  }
}

// Keys and values are T: float, bf16 bits (uint16_t) or int8_t. An int8 key's score is its dot product
// with the query times its scale; an int8 value is added with its probability times its scale.
template <typename T>
void attend(const GlmkitModel& m, const GlmkitCache& c, int64_t layer, int64_t M, const float* qkv, const int64_t* idx,
            float* att, float* scores, int64_t smax, int threads) {
  const int64_t H = m.n_heads, KH = m.n_kv_heads, D = m.head_dim, BS = c.block;
  const int64_t QKV = (H + 2 * KH) * D, group = H / KH;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const T* kc = static_cast<const T*>(c.k);
  const T* vc = static_cast<const T*>(c.v);
  constexpr bool q8 = std::is_same_v<T, int8_t>;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t bh = 0; bh < M * H; ++bh) {
    const int64_t b = bh / H, h = bh % H, kh = h / group, n = std::max(idx[b] + 1, c.sep[b]);
    const float* q = qkv + b * QKV + h * D;
    float* sc = scores + bh * smax;
    float* o = att + b * H * D + h * D;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
    // three passes over the row's blocks: scores, exp and sum, weighted values
    for (int pass = 0; pass < 3; ++pass) {
      if (pass == 2) std::fill(o, o + D, 0.0f);
      for (int64_t s0 = 0; s0 < n; s0 += BS) {  // keys after idx[b] are visible only in Part A
        const int64_t p = block_of(c, b, s0 / BS), e = std::min(n, s0 + BS) - s0;
        const int64_t base = ((layer * c.n_blocks + p) * KH + kh) * BS * D;
        const uint8_t* valid = c.valid + p * BS;
        const float* ks = q8 ? c.k_scale + base / D : nullptr;  // (block,) scales of these keys and values
        const float* vs = q8 ? c.v_scale + base / D : nullptr;
        float* sb = sc + s0;
        for (int64_t i = 0; i < e; ++i) {
          if (pass == 0) {
            if (valid[i]) {
              sb[i] = dot(q, kc + base + i * D, D) * (q8 ? ks[i] * scale : scale);
              mx = std::max(mx, sb[i]);
            }
          } else if (pass == 1) {
            sb[i] = valid[i] ? std::exp(sb[i] - mx) : 0.0f;
            sum += sb[i];
          } else if (sb[i] > 0.0f) {
            axpy(o, q8 ? sb[i] / sum * vs[i] : sb[i] / sum, vc + base + i * D, D);
          }
        }
      }
    }
  }
}

// Quantize one vector x (D,) as model.quantize_kv does: s = max|x| / 127, q = round half to even of x / s.
inline void quantize(const float* x, int64_t D, int8_t* q, float* s) {
  float amax = 0.0f;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  *s = amax / 127.0f;
  const float div = std::max(*s, std::numeric_limits<float>::min());
  for (int64_t d = 0; d < D; ++d) q[d] = static_cast<int8_t>(std::clamp(std::nearbyint(x[d] / div), -127.0f, 127.0f));
}

template <typename T>
void store_kv(const GlmkitModel& m, const GlmkitCache& c, int64_t layer, int64_t M, const float* qkv, const int64_t* idx) {
  const int64_t H = m.n_heads, KH = m.n_kv_heads, D = m.head_dim, BS = c.block;
  const int64_t QKV = (H + 2 * KH) * D;
  T* kc = static_cast<T*>(c.k);
  T* vc = static_cast<T*>(c.v);
  for (int64_t b = 0; b < M; ++b)
    for (int64_t kh = 0; kh < KH; ++kh) {
      const float* kp = qkv + b * QKV + H * D + kh * D;
      const float* vp = qkv + b * QKV + (H + KH) * D + kh * D;
      const int64_t off = (((layer * c.n_blocks + block_of(c, b, idx[b] / BS)) * KH + kh) * BS + idx[b] % BS) * D;
      if constexpr (std::is_same_v<T, int8_t>) {
        quantize(kp, D, kc + off, c.k_scale + off / D);
        quantize(vp, D, vc + off, c.v_scale + off / D);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          if constexpr (sizeof(T) == 2) {
            kc[off + d] = float_to_bf16(kp[d]);
            vc[off + d] = float_to_bf16(vp[d]);
          } else {
            kc[off + d] = kp[d];
            vc[off + d] = vp[d];
          }
        }
      }
    }
}

inline float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

inline float gelu_erf(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f)); }

}  // namespace

// x (M, C) fp32: the step's input embeddings (learned positions already added), overwritten.
// pos, block (M,): positions and block positions; idx (M,): the cache slot each row writes (its
// query's slot). Row b uses cache row b. logits (M, V) fp32.
// Returns 0, or non-zero if an argument is out of range (nothing useful is written then).
extern "C" int glmkit_decode_step(const GlmkitModel* mp, const GlmkitCache* cp, int64_t M, float* x, const int64_t* pos,
                                  const int64_t* block, const int64_t* idx, float* logits, int threads) {
  const GlmkitModel& m = *mp;
  const GlmkitCache& c = *cp;
  const int64_t C = m.dim, H = m.n_heads, KH = m.n_kv_heads, D = m.head_dim, r = m.rotary_dim;
  if (M < 1 || M > c.batch || KH < 1 || H % KH || c.block < 1 || c.max_len > c.block * c.row_blocks) return 1;
  if (c.kind < 0 || c.kind > 2 || (c.kind == 2 && !(c.k_scale && c.v_scale))) return 1;
  int64_t smax = 0;
  for (int64_t b = 0; b < M; ++b) {
    if (idx[b] < 0 || idx[b] >= c.max_len || c.sep[b] < 0 || c.sep[b] > c.max_len) return 2;  // before any write
    const int64_t n = std::max(idx[b] + 1, c.sep[b]);
    for (int64_t j = 0; j * c.block < n; ++j)
      if (block_of(c, b, j) < 0 || block_of(c, b, j) >= c.n_blocks) return 2;
    smax = std::max(smax, n);
  }
  for (int64_t b = 0; b < M; ++b)  // the new key is real
    c.valid[block_of(c, b, idx[b] / c.block) * c.block + idx[b] % c.block] = 1;
  const int64_t QKV = (H + 2 * KH) * D, F = m.layers[0].down.k;
  std::vector<float> h(M * C), a(M * C), qkv(M * QKV), att(M * H * D), up(M * m.layers[0].up.n), act(M * F);
  std::vector<float> scores(M * H * smax), cs_p(M * (r / 2)), sn_p(M * (r / 2)), cs_b(M * (r / 2)), sn_b(M * (r / 2));
  if (m.position && !m.inv_freq) return 1;
  if (m.position) rope_table(pos, M, r, m.inv_freq, m.rope_scale, cs_p.data(), sn_p.data());
  if (m.position == 1) rope_table(block, M, r, m.inv_freq, m.rope_scale, cs_b.data(), sn_b.data());
  int rc;
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const GlmkitLayer& L = m.layers[l];
    norm(m, L.norm1, x, h.data(), M);
    if ((rc = linear(L.qkv, h.data(), M, qkv.data(), threads))) return rc;
    if (m.position)
      for (int64_t b = 0; b < M; ++b)
        for (int64_t j = 0; j < H + KH; ++j) {  // query heads, then key heads
          float* v = qkv.data() + b * QKV + j * D;
          const float *cp_ = cs_p.data() + b * (r / 2), *sp_ = sn_p.data() + b * (r / 2);
          if (m.position == 2) {
            rotate(v, r, cp_, sp_, true);
          } else {  // rope_2d: first half of the head by position, second by block position
            rotate(v, r, cp_, sp_, false);
            rotate(v + r, r, cs_b.data() + b * (r / 2), sn_b.data() + b * (r / 2), false);
          }
        }
    if (c.kind == 2) {
      store_kv<int8_t>(m, c, l, M, qkv.data(), idx);
      attend<int8_t>(m, c, l, M, qkv.data(), idx, att.data(), scores.data(), smax, threads);
    } else if (c.kind == 1) {
      store_kv<uint16_t>(m, c, l, M, qkv.data(), idx);
      attend<uint16_t>(m, c, l, M, qkv.data(), idx, att.data(), scores.data(), smax, threads);
    } else {
      store_kv<float>(m, c, l, M, qkv.data(), idx);
      attend<float>(m, c, l, M, qkv.data(), idx, att.data(), scores.data(), smax, threads);
    }
    if ((rc = linear(L.out, att.data(), M, a.data(), threads))) return rc;
    if (m.sandwich) norm(m, L.post_attn, a.data(), a.data(), M);
    for (int64_t i = 0; i < M * C; ++i) x[i] = (m.deepnorm ? h[i] * m.alpha : x[i]) + a[i];
    norm(m, L.norm2, x, h.data(), M);
    if ((rc = linear(L.up, h.data(), M, up.data(), threads))) return rc;
    for (int64_t b = 0; b < M; ++b)
      for (int64_t f = 0; f < F; ++f) {
        if (m.swiglu) {  // rows [gate (F) | up (F)]
          float g = up[b * 2 * F + f];
          act[b * F + f] = g / (1.0f + std::exp(-g)) * up[b * 2 * F + F + f];
        } else {
          act[b * F + f] = m.gelu_exact ? gelu_erf(up[b * F + f]) : gelu_tanh(up[b * F + f]);
        }
      }
    if ((rc = linear(L.down, act.data(), M, a.data(), threads))) return rc;
    if (m.sandwich) norm(m, L.post_mlp, a.data(), a.data(), M);
    for (int64_t i = 0; i < M * C; ++i) x[i] = (m.deepnorm ? h[i] * m.alpha : x[i]) + a[i];
  }
  norm(m, m.norm, x, h.data(), M);
  return linear(m.head, h.data(), M, logits, threads);
}
