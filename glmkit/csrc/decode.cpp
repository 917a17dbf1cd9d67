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
// copy; half the bytes of bf16 to read per key). GLM-4.7-Flash's layers too: latent attention in the absorbed
// form over a latent cache (fp32 / bf16), and mixture-of-experts layers (the router's exact choice, int4 experts
// through glmkit_moe_int4, any others linear by linear). fused.py builds the structs below from a model
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
extern "C" int glmkit_gemv_int4_many(const float* x, int64_t M, int64_t K, int s_type, int64_t gs, int64_t J,
                                     const uint8_t* const* w, const void* const* scales, const void* const* mins,
                                     const int64_t* N, float* const* y, int threads);
extern "C" int glmkit_heads_gemv(const float* x, int64_t M, int64_t H, const void* w, int wtype, int64_t N, int64_t K,
                                 int64_t ldr, int64_t ldh, int trans, float* y, int threads);
extern "C" int glmkit_heads_gemv_int4(const float* x, int64_t M, int64_t H, const uint8_t* w, const void* scales,
                                      const void* mins, int s_type, int64_t gs, int64_t N, int64_t K, int64_t ldh,
                                      int trans, float* y, int threads);
extern "C" int glmkit_heads_uk_int4(const float* x, int64_t M, int64_t H, const uint8_t* codes, const void* scales,
                                    const void* mins, int s_type, int64_t gs, int64_t N, int64_t K, int64_t ldh,
                                    float* y, int threads);
extern "C" int glmkit_moe_int4(const float* x, int64_t M, int64_t C, int64_t gs, int s_type, int64_t J,
                               const GlmkitExpert* ex, const int64_t* off, const int64_t* rows, const float* weights,
                               float* out, int threads);

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

// Latent attention (layers.LatentAttention), decoded in the absorbed form: the query's no-rope part goes
// through kv_b's key rows of its head (W_UK) and is scored against the cached latent c itself, the
// attention-weighted sum of c through the value rows (W_UV). n = 0 marks a linear that is absent: `q`
// (the low-rank query q_a -> q_norm -> q_b is used) or `q_a` / `q_b` (a full-rank query).
struct GlmkitMla {
  GlmkitLinear q, q_a, q_b, kv_a, kv_b;
  GlmkitNorm q_norm, kv_norm;  // RMSNorms of widths q_rank and kv_rank, eps latent_eps
  const uint8_t* uk;  // int4 kv_b: its key rows regrouped for glmkit_heads_uk_int4 (kernels.heads_uk_codes), or null
};

// A mixture-of-experts layer (layers.MoE with layers.Router): sigmoid scores of an fp32 router, the choice
// steered by a correction bias within the topk_group best groups, weights renormalized and scaled.
struct GlmkitMoe {
  const float* router;       // (E, C) fp32
  const float* bias;         // (E,) fp32 score correction
  const GlmkitLinear* up;    // (E + 1,): the experts' [gate | up] rows, then the shared expert's (n = 0: none)
  const GlmkitLinear* down;  // (E + 1,)
  const GlmkitExpert* int4;  // (E + 1,) the same experts for glmkit_moe_int4, or null (then linear by linear)
  int64_t E, k, groups, topk_group, gs;
  int32_t normalize, s_type;
  float scale;
};

struct GlmkitLayer {
  GlmkitNorm norm1, norm2, post_attn, post_mlp;  // post_*: sandwich norms only
  GlmkitLinear qkv, out, up, down;               // qkv: MHA only; up, down: a dense MLP only
  const GlmkitMla* mla;                          // latent attention, or null
  const GlmkitMoe* moe;                          // experts, or null
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
  // latent attention (layers whose `mla` is set): widths, rope pairs interleaved or halves, softmax scale
  int64_t q_rank, kv_rank, nope_dim, v_dim;  // rotary_dim is the rope width P; the cache holds [c ; k_pe]
  int32_t rope_interleave;
  float mla_scale, latent_eps;
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

// RMSNorm of M rows of width n, `ld` apart, in place (the latent norms: statistics in double as `norm`).
void rms(float* x, const float* w, int64_t n, int64_t ld, float eps, int64_t M) {
  for (int64_t r = 0; r < M; ++r) {
    float* xr = x + r * ld;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / n + eps));
    for (int64_t i = 0; i < n; ++i) xr[i] = xr[i] * inv * w[i];
  }
}

// Per-head products with rows [row0, row0 + rows) of each head's block of `ldh` rows of w (kv_b: W_UK at row0 0,
// W_UV at row0 nope_dim): trans 1 x (M, H, rows) -> y (M, H, K), trans 0 x (M, H, K) -> y (M, H, rows).
int heads(const GlmkitLinear& w, const float* x, int64_t M, int64_t H, int64_t row0, int64_t rows, int64_t ldh,
          int trans, float* y, int threads) {
  const int64_t K = w.k;
  if (w.kind == 0 || w.kind == 1) {
    const char* p = static_cast<const char*>(w.w) + row0 * K * (w.kind ? 2 : 4);
    return glmkit_heads_gemv(x, M, H, p, w.kind, rows, K, K, ldh * K, trans, y, threads);
  }
  if (w.kind == 3 || w.kind == 4) {
    const int64_t off = row0 * (K / w.group) * (w.kind == 4 ? 2 : 4);
    return glmkit_heads_gemv_int4(x, M, H, static_cast<const uint8_t*>(w.w) + row0 * (K / 2),
                                  static_cast<const char*>(w.scale) + off, static_cast<const char*>(w.mins) + off,
                                  w.kind - 3, w.group, rows, K, ldh, trans, y, threads);
  }
  return 10;
}

// Scores of NH heads' queries (ldq apart) against one key of D values: out[h * ldo] = q_h . k. The key is read
// once for all NH heads, and the 2 * NH accumulators are independent chains (one chain per head would wait on
// the FMA's latency at every step).
template <int NH, typename T>
inline void head_dots(const float* q, int64_t ldq, const T* k, int64_t D, float* out, int64_t ldo) {
  __m256 acc[NH][2];
  for (int h = 0; h < NH; ++h) acc[h][0] = acc[h][1] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 k0 = load8(k + d), k1 = load8(k + d + 8);
    for (int h = 0; h < NH; ++h) {
      acc[h][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ldq + d), k0, acc[h][0]);
      acc[h][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ldq + d + 8), k1, acc[h][1]);
    }
  }
  for (; d + 8 <= D; d += 8) {
    const __m256 k0 = load8(k + d);
    for (int h = 0; h < NH; ++h) acc[h][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * ldq + d), k0, acc[h][0]);
  }
  for (int h = 0; h < NH; ++h) {
    float s = hsum(_mm256_add_ps(acc[h][0], acc[h][1]));
    for (int64_t t = d; t < D; ++t) s += q[h * ldq + t] * to_float(k[t]);
    out[h * ldo] = s;
  }
}

// o[h * ldo + d] += sum_i p[h * ldp + i] * keys[i][d] for NH heads, d < R, the keys added in order (each output
// element's sum is the same chain of FMAs as one axpy per key): a tile of keys is read once per 16 columns for all
// NH heads, the heads' partial sums staying in registers across the tile.
template <int NH, typename T>
inline void head_sums(float* o, int64_t ldo, const float* p, int64_t ldp, const T* const* keys, int64_t nk, int64_t R) {
  int64_t d = 0;
  for (; d + 16 <= R; d += 16) {
    __m256 acc[NH][2];
    for (int h = 0; h < NH; ++h)
      acc[h][0] = _mm256_loadu_ps(o + h * ldo + d), acc[h][1] = _mm256_loadu_ps(o + h * ldo + d + 8);
    for (int64_t i = 0; i < nk; ++i) {
      const __m256 k0 = load8(keys[i] + d), k1 = load8(keys[i] + d + 8);
      for (int h = 0; h < NH; ++h) {
        const __m256 w = _mm256_set1_ps(p[h * ldp + i]);
        acc[h][0] = _mm256_fmadd_ps(w, k0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(w, k1, acc[h][1]);
      }
    }
    for (int h = 0; h < NH; ++h)
      _mm256_storeu_ps(o + h * ldo + d, acc[h][0]), _mm256_storeu_ps(o + h * ldo + d + 8, acc[h][1]);
  }
  for (; d + 8 <= R; d += 8)
    for (int h = 0; h < NH; ++h) {
      __m256 a = _mm256_loadu_ps(o + h * ldo + d);
      for (int64_t i = 0; i < nk; ++i) a = _mm256_fmadd_ps(_mm256_set1_ps(p[h * ldp + i]), load8(keys[i] + d), a);
      _mm256_storeu_ps(o + h * ldo + d, a);
    }
  for (; d < R; ++d)
    for (int h = 0; h < NH; ++h)
      for (int64_t i = 0; i < nk; ++i) o[h * ldo + d] += p[h * ldp + i] * to_float(keys[i][d]);
}

// f(std::integral_constant<int, NH>) for the next group of NH = min(4, left) heads (left >= 1): head_dots and
// head_sums take the group's size as a template argument, so their accumulators stay in registers.
template <typename F>
inline void by_heads(int64_t left, F&& f) {
  switch (std::min<int64_t>(4, left)) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Absorbed latent attention of M rows over one layer's latent cache (one key head [c ; k_pe] of Dk values):
// ql (M, H, Dk) the queries [q_nope W_UK ; rotated q_pe], o (M, H, R) the attention-weighted sums of c. The
// heads are split into one chunk per thread; a thread reads each cached latent once for the scores of all its
// heads (4 at a time) and once per 4 heads for the weighted sum, a tile of kKeyTile latents at a time.
constexpr int64_t kKeyTile = 16;

template <typename T>
void attend_latent(const GlmkitModel& m, const GlmkitCache& c, int64_t layer, int64_t M, const float* ql,
                   const int64_t* idx, float* o, float* scores, int64_t smax, int threads) {
  const int64_t H = m.n_heads, R = m.kv_rank, Dk = m.kv_rank + m.rotary_dim, BS = c.block;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(H, threads)), per = (H + chunks - 1) / chunks;
  const T* kc = static_cast<const T*>(c.k);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t bc = 0; bc < M * chunks; ++bc) {
    const int64_t b = bc / chunks, h0 = (bc % chunks) * per, h1 = std::min(H, h0 + per);
    const int64_t n = std::max(idx[b] + 1, c.sep[b]);
    if (h1 <= h0) continue;
    std::vector<const T*> keys;  // the visible latents in order (keys after idx[b] are visible only in Part A)
    keys.reserve(n);
    for (int64_t s0 = 0; s0 < n; s0 += BS) {
      const int64_t p = block_of(c, b, s0 / BS), e = std::min(n, s0 + BS) - s0;
      const T* kb = kc + (layer * c.n_blocks + p) * BS * Dk;
      const uint8_t* valid = c.valid + p * BS;
      for (int64_t i = 0; i < e; ++i)
        if (valid[i]) keys.push_back(kb + i * Dk);
    }
    const int64_t nk = static_cast<int64_t>(keys.size());
    const float* q = ql + (b * H + h0) * Dk;
    float* sc = scores + (b * H + h0) * smax;  // head h0 + j's scores, then probabilities, at sc[j * smax + i]
    float* out = o + (b * H + h0) * R;
    std::fill(out, out + (h1 - h0) * R, 0.0f);
    for (int64_t i = 0; i < nk; ++i)
      for (int64_t j = 0; j < h1 - h0; j += 4) {
        const float* qj = q + j * Dk;
        float* sj = sc + j * smax + i;
        by_heads(h1 - h0 - j, [&](auto nh) { head_dots<nh.value>(qj, Dk, keys[i], Dk, sj, smax); });
      }
    for (int64_t j = 0; j < h1 - h0; ++j) {  // softmax: exp(s - max) / their sum, in key order
      float* sj = sc + j * smax;
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
      for (int64_t i = 0; i < nk; ++i) sj[i] = sj[i] * m.mla_scale, mx = std::max(mx, sj[i]);
      for (int64_t i = 0; i < nk; ++i) sj[i] = std::exp(sj[i] - mx), sum += sj[i];
      for (int64_t i = 0; i < nk; ++i) sj[i] /= sum;
    }
    for (int64_t i0 = 0; i0 < nk; i0 += kKeyTile) {
      const int64_t ni = std::min(kKeyTile, nk - i0);
      for (int64_t j = 0; j < h1 - h0; j += 4) {
        float* oj = out + j * R;
        const float* pj = sc + j * smax + i0;
        by_heads(h1 - h0 - j, [&](auto nh) { head_sums<nh.value>(oj, R, pj, smax, &keys[i0], ni, R); });
      }
    }
  }
}

// y (M, H * v_dim): a latent attention layer's heads for the M rows at slots idx (before `out`), its latent
// [c ; k_pe] written to the cache. cs, sn: the rows' rope tables (M, rotary_dim / 2).
template <typename T>
int mla_attention(const GlmkitModel& m, const GlmkitMla& A, const GlmkitCache& c, int64_t l, int64_t M,
                  const float* h, const int64_t* idx, const float* cs, const float* sn, float* y, float* scores,
                  int64_t smax, int threads) {
  const int64_t H = m.n_heads, R = m.kv_rank, P = m.rotary_dim, Dn = m.nope_dim, Dv = m.v_dim, QW = Dn + P, Dk = R + P;
  std::vector<float> q(M * H * QW), lat(M * Dk), qn(M * H * Dn), ql(M * H * Dk), t(M * H * R), o(M * H * R);
  int rc;
  const GlmkitLinear& first = A.q.n ? A.q : A.q_a;  // the two products of h: the query's first, and kv_a
  std::vector<float> qa(A.q.n ? 0 : M * m.q_rank);
  float* q1 = A.q.n ? q.data() : qa.data();
  if (first.kind >= 3 && first.kind == A.kv_a.kind && first.group == A.kv_a.group && first.k == A.kv_a.k &&
      !first.bias && !A.kv_a.bias) {
    // int4 both (as quantized together): one call, the activations rounded once, one parallel region
    const uint8_t* w[2] = {static_cast<const uint8_t*>(first.w), static_cast<const uint8_t*>(A.kv_a.w)};
    const void *sc[2] = {first.scale, A.kv_a.scale}, *mn[2] = {first.mins, A.kv_a.mins};
    const int64_t n[2] = {first.n, A.kv_a.n};
    float* y[2] = {q1, lat.data()};
    rc = glmkit_gemv_int4_many(h, M, first.k, first.kind - 3, first.group, 2, w, sc, mn, n, y, threads);
  } else {
    rc = linear(first, h, M, q1, threads);
    if (!rc) rc = linear(A.kv_a, h, M, lat.data(), threads);
  }
  if (rc) return rc;
  if (!A.q.n) {
    rms(qa.data(), A.q_norm.w, m.q_rank, m.q_rank, m.latent_eps, M);
    if ((rc = linear(A.q_b, qa.data(), M, q.data(), threads))) return rc;
  }
  rms(lat.data(), A.kv_norm.w, R, Dk, m.latent_eps, M);
  for (int64_t b = 0; b < M; ++b) {
    const float *cb = cs + b * (P / 2), *sb = sn + b * (P / 2);
    rotate(lat.data() + b * Dk + R, P, cb, sb, m.rope_interleave);
    for (int64_t hh = 0; hh < H; ++hh) {
      float* qh = q.data() + (b * H + hh) * QW;
      rotate(qh + Dn, P, cb, sb, m.rope_interleave);
      std::memcpy(qn.data() + (b * H + hh) * Dn, qh, Dn * sizeof(float));
      std::memcpy(ql.data() + (b * H + hh) * Dk + R, qh + Dn, P * sizeof(float));
    }
    // the latent into the cache (one key head of Dk values; there is no value)
    const int64_t off = ((l * c.n_blocks + block_of(c, b, idx[b] / c.block)) * c.block + idx[b] % c.block) * Dk;
    T* kc = static_cast<T*>(c.k) + off;
    for (int64_t d = 0; d < Dk; ++d) {
      if constexpr (sizeof(T) == 2) kc[d] = float_to_bf16(lat[b * Dk + d]);
      else kc[d] = lat[b * Dk + d];
    }
  }
  if (A.uk)  // q_nope W_UK: integer dot products on the regrouped key rows, else each head's rows where they lie
    rc = glmkit_heads_uk_int4(qn.data(), M, H, A.uk, A.kv_b.scale, A.kv_b.mins, A.kv_b.kind - 3, A.kv_b.group, Dn, R,
                              Dn + Dv, t.data(), threads);
  else
    rc = heads(A.kv_b, qn.data(), M, H, 0, Dn, Dn + Dv, 1, t.data(), threads);
  if (rc) return rc;
  for (int64_t bh = 0; bh < M * H; ++bh) std::memcpy(ql.data() + bh * Dk, t.data() + bh * R, R * sizeof(float));
  attend_latent<T>(m, c, l, M, ql.data(), idx, o.data(), scores, smax, threads);
  return heads(A.kv_b, o.data(), M, H, Dn, Dv, Dn + Dv, 0, y, threads);  // W_UV per head
}

// out (M, C) = the MoE layer on h (M, C): the router's choice per row, then the chosen experts and the shared
// one, weighted (int4 experts: one glmkit_moe_int4 call; others linear by linear).
int moe(const GlmkitModel& m, const GlmkitMoe& X, const float* h, int64_t M, float* out, int threads) {
  const int64_t C = m.dim, E = X.E, k = X.k;
  std::vector<float> logit(M * E), w(M * k);
  std::vector<int64_t> ids(M * k);
  int rc = glmkit_gemv_dense(h, M, C, X.router, 0, nullptr, E, logit.data(), threads);
  if (rc) return rc;
  std::vector<float> score(E), choice(E);
  for (int64_t b = 0; b < M; ++b) {
    for (int64_t e = 0; e < E; ++e) {
      score[e] = 1.0f / (1.0f + std::exp(-logit[b * E + e]));
      choice[e] = score[e] + X.bias[e];
    }
    if (X.groups > 1) {  // only the topk_group groups with the best two-expert sums compete
      const int64_t gsz = E / X.groups;
      std::vector<float> best(X.groups);
      for (int64_t g = 0; g < X.groups; ++g) {
        float a = -std::numeric_limits<float>::infinity(), a2 = a;
        for (int64_t e = g * gsz; e < (g + 1) * gsz; ++e) {
          if (choice[e] > a) a2 = a, a = choice[e];
          else if (choice[e] > a2) a2 = choice[e];
        }
        best[g] = a + a2;
      }
      std::vector<char> keep(X.groups, 0);
      for (int64_t j = 0; j < X.topk_group; ++j) {
        int64_t arg = -1;
        for (int64_t g = 0; g < X.groups; ++g)
          if (!keep[g] && (arg < 0 || best[g] > best[arg])) arg = g;
        keep[arg] = 1;
      }
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / gsz]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    float total = 0.0f;
    for (int64_t j = 0; j < k; ++j) {  // the k best, best first
      int64_t arg = -1;
      for (int64_t e = 0; e < E; ++e)
        if (arg < 0 || choice[e] > choice[arg]) arg = e;
      ids[b * k + j] = arg;
      w[b * k + j] = score[arg];
      total += score[arg];
      choice[arg] = -std::numeric_limits<float>::infinity();
    }
    for (int64_t j = 0; j < k; ++j) w[b * k + j] = (X.normalize ? w[b * k + j] / (total + 1e-20f) : w[b * k + j]) * X.scale;
  }
  std::fill(out, out + M * C, 0.0f);
  const bool shared = X.up[E].n > 0;
  if (X.int4) {  // (token, weight) pairs grouped by expert, the shared expert last with weight 1 for every row
    std::vector<int64_t> order, off(1, 0), rows;
    std::vector<float> wts;
    std::vector<GlmkitExpert> jobs;
    for (int64_t e = 0; e < E; ++e) {
      const size_t before = rows.size();
      for (int64_t p = 0; p < M * k; ++p)
        if (ids[p] == e) rows.push_back(p / k), wts.push_back(w[p]);
      if (rows.size() > before) jobs.push_back(X.int4[e]), off.push_back(static_cast<int64_t>(rows.size()));
    }
    if (shared) {
      for (int64_t b = 0; b < M; ++b) rows.push_back(b), wts.push_back(1.0f);
      jobs.push_back(X.int4[E]), off.push_back(static_cast<int64_t>(rows.size()));
    }
    return glmkit_moe_int4(h, M, C, X.gs, X.s_type, static_cast<int64_t>(jobs.size()), jobs.data(), off.data(),
                           rows.data(), wts.data(), out, threads);
  }
  int64_t Fmax = 0;
  for (int64_t e = 0; e <= E; ++e) Fmax = std::max(Fmax, X.down[e].k);
  std::vector<float> up(2 * Fmax), act(Fmax), y(C);
  auto expert = [&](int64_t e, const float* x, float wt, float* o) {
    const int64_t F = X.down[e].k;
    int r = linear(X.up[e], x, 1, up.data(), threads);
    if (r) return r;
    for (int64_t f = 0; f < F; ++f) act[f] = up[f] / (1.0f + std::exp(-up[f])) * up[F + f];
    if ((r = linear(X.down[e], act.data(), 1, y.data(), threads))) return r;
    for (int64_t i = 0; i < C; ++i) o[i] += wt * y[i];
    return 0;
  };
  for (int64_t b = 0; b < M; ++b) {
    for (int64_t j = 0; j < k; ++j)
      if ((rc = expert(ids[b * k + j], h + b * C, w[b * k + j], out + b * C))) return rc;
    if (shared && (rc = expert(E, h + b * C, 1.0f, out + b * C))) return rc;
  }
  return 0;
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
  int64_t F = 0, HD = H * D;  // the widest dense MLP; the attention output's width
  for (int64_t l = 0; l < m.n_layers; ++l) {
    if (!m.layers[l].moe) F = std::max(F, m.layers[l].down.k);
    if (m.layers[l].mla) HD = std::max(HD, H * m.v_dim);
  }
  const int64_t QKV = (H + 2 * KH) * D;
  std::vector<float> h(M * C), a(M * C), qkv(M * QKV), att(M * HD), up(M * 2 * F), act(M * F);
  std::vector<float> scores(M * H * smax), cs_p(M * (r / 2)), sn_p(M * (r / 2)), cs_b(M * (r / 2)), sn_b(M * (r / 2));
  if (m.position && !m.inv_freq) return 1;
  if (m.position) rope_table(pos, M, r, m.inv_freq, m.rope_scale, cs_p.data(), sn_p.data());
  if (m.position == 1) rope_table(block, M, r, m.inv_freq, m.rope_scale, cs_b.data(), sn_b.data());
  int rc;
  for (int64_t l = 0; l < m.n_layers; ++l) {
    const GlmkitLayer& L = m.layers[l];
    norm(m, L.norm1, x, h.data(), M);
    if (L.mla) {
      if (c.kind == 2) return 1;  // no int8 latent cache
      rc = c.kind == 1 ? mla_attention<uint16_t>(m, *L.mla, c, l, M, h.data(), idx, cs_p.data(), sn_p.data(), att.data(),
                                                 scores.data(), smax, threads)
                       : mla_attention<float>(m, *L.mla, c, l, M, h.data(), idx, cs_p.data(), sn_p.data(), att.data(),
                                              scores.data(), smax, threads);
      if (rc) return rc;
    } else {
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
    }
    if ((rc = linear(L.out, att.data(), M, a.data(), threads))) return rc;
    if (m.sandwich) norm(m, L.post_attn, a.data(), a.data(), M);
    for (int64_t i = 0; i < M * C; ++i) x[i] = (m.deepnorm ? h[i] * m.alpha : x[i]) + a[i];
    norm(m, L.norm2, x, h.data(), M);
    if (L.moe) {
      if ((rc = moe(m, *L.moe, h.data(), M, a.data(), threads))) return rc;
    } else {
      const int64_t Fl = L.down.k;
      if ((rc = linear(L.up, h.data(), M, up.data(), threads))) return rc;
      for (int64_t b = 0; b < M; ++b)
        for (int64_t f = 0; f < Fl; ++f) {
          if (m.swiglu) {  // rows [gate (F) | up (F)]
            float g = up[b * 2 * Fl + f];
            act[b * Fl + f] = g / (1.0f + std::exp(-g)) * up[b * 2 * Fl + Fl + f];
          } else {
            act[b * Fl + f] = m.gelu_exact ? gelu_erf(up[b * Fl + f]) : gelu_tanh(up[b * Fl + f]);
          }
        }
      if ((rc = linear(L.down, act.data(), M, a.data(), threads))) return rc;
    }
    if (m.sandwich) norm(m, L.post_mlp, a.data(), a.data(), M);
    for (int64_t i = 0; i < M * C; ++i) x[i] = (m.deepnorm ? h[i] * m.alpha : x[i]) + a[i];
  }
  norm(m, m.norm, x, h.data(), M);
  return linear(m.head, h.data(), M, logits, threads);
}
