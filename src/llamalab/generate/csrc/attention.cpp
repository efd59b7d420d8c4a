// One decode step's attention for each layer, in one call: rotary embedding of the new token's
// query and key, the key and value written into the KV cache, and the query heads' attention over
// the cache slots [0, pos] (grouped-query: query head h reads key/value head h / (n_heads /
// n_kv_heads)).
//
// Why one call: in eager PyTorch the same step is ~25 small tensor ops per layer (the rotation as
// a complex multiply, dtype conversions of q, k and v, two cache writes, two batched products, a
// softmax, reshapes), each costing a few microseconds of dispatch for well under a microsecond of
// arithmetic. With SmolLM2-135M's 30 layers that was ~5-7 ms of a 28 ms bf16 step on the 2-core
// AVX2 EPYC, the part of the step that halving the weights' bytes does not shrink.
//
// Numerics follow the eager path of `generate/fast.py`: the rotation in fp32, its result rounded to
// the model's dtype (the eager path's `type_as`) and the key then to the cache's as stored; scores,
// softmax and the weighted sum of values in fp32, the output rounded once to the model's dtype.
// The cache may be in another dtype than the activations (`Transformer.kv_cache_dtype`): an f16 or
// bf16 cache of an fp32 model, widened exactly as it is read, halves the bytes each step reads.
//
// Vector code: AVX2 + FMA for head_dim a multiple of 8 (every x86-64 CPU the decode kernel runs on
// has it, AVX-512 ones included: this is ~1% of a step's arithmetic, not worth a second path):
// scores four slots at a time (independent FMA chains), exp by a polynomial 8 lanes at a time, the
// weighted sum of values in registers. Scalar code elsewhere (and for other head sizes).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "x86_simd.h"

#ifdef LLAMALAB_X86
// The AVX2 paths also read an f16 cache (F16C's conversions: every AVX2 CPU has them).
#define ATTN_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

int llamalab_gemv_isa_level();  // gemv.cpp: the kernels' path (2 and up: AVX-512)

namespace {

// Work (multiply-adds) below which splitting the heads over threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = 16384;

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
float dot_scalar(const float* q, const T* k, int64_t d) {
  float s = 0.0f;
  for (int64_t c = 0; c < d; ++c) s += q[c] * widen(k[c]);
  return s;
}

template <typename T>
void axpy_scalar(float a, const T* v, float* out, int64_t d) {
  for (int64_t c = 0; c < d; ++c) out[c] += a * widen(v[c]);
}

#ifdef LLAMALAB_X86
ATTN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// Eight bf16 values as fp32: zero-extended to 32 bits, shifted into the top half.
ATTN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Eight f16 values as fp32 (exact).
ATTN_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Four dot products q . k[t], t = 0..3 (rows `stride` apart), d a multiple of 8: four independent
// FMA chains (one chain per score would wait on the FMA latency), reduced together.
using llamalab_simd::hsum256;

template <typename T>
ATTN_AVX2 __m128 dot4_avx2(const float* q, const T* k, int64_t stride, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t c = 0; c < d; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    a0 = _mm256_fmadd_ps(qv, load8(k + c), a0);
    a1 = _mm256_fmadd_ps(qv, load8(k + stride + c), a1);
    a2 = _mm256_fmadd_ps(qv, load8(k + 2 * stride + c), a2);
    a3 = _mm256_fmadd_ps(qv, load8(k + 3 * stride + c), a3);
  }
  // hadd within 128-bit halves: [a0 a1 a2 a3 partial sums | the same of the upper lanes]
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The largest of p[0..n) (-inf for none; NaNs skipped, as std::max(top, p[t]) skips them), 8 lanes
// at a time: the scalar loop waited on each comparison (~14% of a long context's attention).
ATTN_AVX2 inline float max_avx2(const float* p, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) m = _mm256_max_ps(_mm256_loadu_ps(p + t), m);  // (a NaN in the first operand: the second)
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float top = lanes[0];
  for (int j = 1; j < 8; ++j) top = std::max(top, lanes[j]);
  for (; t < n; ++t) top = std::max(top, p[t]);
  return top;
}

using llamalab_simd::exp_avx2;

// sc[0..n) <- exp(sc - max), returns 1 / their sum: a softmax's numerators and normaliser.
ATTN_AVX2 inline float exp_shifted_avx2(float* sc, int64_t n) {
  const float top = max_avx2(sc, n);
  const __m256 topv = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + t), topv));
    _mm256_storeu_ps(sc + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  float total = hsum256(sums);
  for (; t < n; ++t) {
    sc[t] = std::exp(sc[t] - top);
    total += sc[t];
  }
  return 1.0f / total;
}

// softmax(q . K[0..end) * scale) . V[0..end) for one query head, d a multiple of 8.
template <typename T>
ATTN_AVX2 void attend_avx2(const float* q, const T* k, const T* v, int64_t end, int64_t d, float scale,
                                    std::vector<float>& scores, float* out) {
  scores.resize(static_cast<size_t>(end + 8));
  int64_t t = 0;
  for (; t + 4 <= end; t += 4) _mm_storeu_ps(scores.data() + t, _mm_mul_ps(dot4_avx2<T>(q, k + t * d, d, d),
                                                                          _mm_set1_ps(scale)));
  for (; t < end; ++t) scores[t] = dot_scalar<T>(q, k + t * d, d) * scale;
  const float inv = exp_shifted_avx2(scores.data(), end);
  // 64 columns (8 registers of sums) at a time over every slot: the sums stay in registers.
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    const int64_t blocks = std::min<int64_t>(8, (d - c0) / 8);
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (t = 0; t < end; ++t) {
      const __m256 p = _mm256_set1_ps(scores[t]);
      const T* vt = v + t * d + c0;
      for (int j = 0; j < blocks; ++j) acc[j] = _mm256_fmadd_ps(p, load8(vt + 8 * j), acc[j]);
    }
    const __m256 iv = _mm256_set1_ps(inv);
    for (int j = 0; j < blocks; ++j) _mm256_storeu_ps(out + c0 + 8 * j, _mm256_mul_ps(acc[j], iv));
  }
}

// The same for the `g` query heads of one key/value head (grouped-query attention) at once: each
// block of slots' keys and values is read by every head of the group while it is in L1 (one head
// after another read the whole cache g times from L2 / memory: at batch 8 and a few hundred slots
// the step's largest cost after the products; measured at 8 rows and ~420 slots, 9% less time
// than one head at a time: the fp32 cache's bytes, not their reuse, are most of it). Every head's
// arithmetic is attend_avx2's, in the same order (the value sums kept in `out` between blocks of
// slots: fp32 stores are exact).
template <typename T>
ATTN_AVX2 void attend_group_avx2(const float* q, int64_t g, const T* k, const T* v, int64_t end, int64_t d,
                                     float scale, std::vector<float>& scores, float* out) {
  const int64_t stride = end + 8;
  scores.resize(static_cast<size_t>(g * stride));
  int64_t t = 0;
  for (; t + 4 <= end; t += 4)
    for (int64_t i = 0; i < g; ++i)
      _mm_storeu_ps(scores.data() + i * stride + t,
                    _mm_mul_ps(dot4_avx2<T>(q + i * d, k + t * d, d, d), _mm_set1_ps(scale)));
  for (; t < end; ++t)
    for (int64_t i = 0; i < g; ++i) scores[i * stride + t] = dot_scalar<T>(q + i * d, k + t * d, d) * scale;
  std::vector<float> inv(static_cast<size_t>(g));
  for (int64_t i = 0; i < g; ++i) inv[static_cast<size_t>(i)] = exp_shifted_avx2(scores.data() + i * stride, end);
  std::fill(out, out + g * d, 0.0f);
  constexpr int64_t kSlots = 16;  // slots per block: 16 value rows of a 64-wide head are 4 KB
  for (int64_t t0 = 0; t0 < end; t0 += kSlots) {
    const int64_t t1 = std::min(end, t0 + kSlots);
    for (int64_t i = 0; i < g; ++i)
      for (int64_t c0 = 0; c0 < d; c0 += 64) {
        const int64_t blocks = std::min<int64_t>(8, (d - c0) / 8);
        float* o = out + i * d + c0;
        __m256 acc[8];
        for (int j = 0; j < blocks; ++j) acc[j] = _mm256_loadu_ps(o + 8 * j);
        for (t = t0; t < t1; ++t) {
          const __m256 pr = _mm256_set1_ps(scores[i * stride + t]);
          const T* vt = v + t * d + c0;
          for (int j = 0; j < blocks; ++j) acc[j] = _mm256_fmadd_ps(pr, load8(vt + 8 * j), acc[j]);
        }
        for (int j = 0; j < blocks; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
      }
  }
  for (int64_t i = 0; i < g; ++i) {
    const __m256 iv = _mm256_set1_ps(inv[static_cast<size_t>(i)]);
    for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(out + i * d + c, _mm256_mul_ps(_mm256_loadu_ps(out + i * d + c), iv));
  }
}

// Eight fp32 values stored as C, rounded to nearest even as static_cast<C> rounds them.
ATTN_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
ATTN_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One head's rotary embedding, 4 (x[2i], x[2i+1]) pairs by (cos, sin) = (rp[2i], rp[2i+1]) at a time,
// stored as C; d a multiple of 8. The scalar loop's arithmetic, x0 c - x1 s and x1 c + x0 s with each
// product rounded (no FMA: the scalar code is built for baseline x86-64), so the same bits. The scalar
// loop's conversions to f16 in software were most of a batch-8 call's fixed cost (20 us a layer at
// 8 rows, 1 slot, before; the weights' products of that step take ~7 ms).
template <typename C>
ATTN_AVX2 void rotate_avx2(const float* x, const float* rp, int64_t d, C* out) {
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i), t = _mm256_loadu_ps(rp + i);
    const __m256 a = _mm256_mul_ps(v, _mm256_moveldup_ps(t));                          // x0 c, x1 c
    const __m256 b = _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), _mm256_movehdup_ps(t));  // x1 s, x0 s
    store8(out + i, _mm256_addsub_ps(a, b));                                             // x0 c - x1 s, x1 c + x0 s
  }
}

template <typename C>
ATTN_AVX2 void copy_avx2(const float* x, int64_t d, C* out) {
  for (int64_t i = 0; i < d; i += 8) store8(out + i, _mm256_loadu_ps(x + i));
}

// ---- AVX-512: the same for head_dim a multiple of 16 ---------------------------------------------
// Half the FMAs of the AVX2 kernel per slot and head (16 lanes), and two changes of structure:
// a head's scores for 16 slots at once (16 accumulators, the key rows read from L1 once per head),
// summed across lanes by one transpose-and-add tree for the 16 (~3 instructions a score, against a
// horizontal sum each), and the weighted sum of values for up to 4 heads of the group per value row
// read. Every sum is in fp32, in another order than the AVX2 kernel's. Head sizes 16, 32, 48, 64
// and 128 (compiled for each: the sums stay in registers); others take the AVX2 kernel.
LLAMALAB_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LLAMALAB_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
LLAMALAB_AVX512 inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// r[j] = the sum of v[j]'s 16 lanes, j = 0..15.
LLAMALAB_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 w[8], u[4];
  for (int j = 0; j < 8; ++j)
    w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xdd));
}

// The weighted value sums of HN heads (<= 4) over one head_dim of ND x 16 columns, in registers.
template <typename T, int ND, int HN>
LLAMALAB_AVX512 void value_sums_avx512(const float* scores, int64_t stride, const float* inv, const T* v, int64_t end,
                                       float* out) {
  constexpr int64_t d = 16 * ND;
  for (int c0 = 0; c0 < ND; c0 += 4) {  // 4 x 16 columns at a time (16 accumulators at most)
    constexpr int kCols = ND < 4 ? ND : 4;
    __m512 acc[HN][kCols];
    for (int h = 0; h < HN; ++h)
      for (int c = 0; c < kCols; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < end; ++t) {
      __m512 vr[kCols];
      for (int c = 0; c < kCols; ++c) vr[c] = load16(v + t * d + 16 * (c0 + c));
      for (int h = 0; h < HN; ++h) {
        const __m512 p = _mm512_set1_ps(scores[h * stride + t]);
        for (int c = 0; c < kCols; ++c) acc[h][c] = _mm512_fmadd_ps(p, vr[c], acc[h][c]);
      }
    }
    for (int h = 0; h < HN; ++h) {
      const __m512 iv = _mm512_set1_ps(inv[h]);
      for (int c = 0; c < kCols; ++c) _mm512_storeu_ps(out + h * d + 16 * (c0 + c), _mm512_mul_ps(acc[h][c], iv));
    }
  }
}

// head_dim = 16 ND (ND a multiple of 4, or below 4).
template <typename T, int ND>
LLAMALAB_AVX512 void attend_group_avx512(const float* q, int64_t g, const T* k, const T* v, int64_t end, float scale,
                                         std::vector<float>& scores, float* out) {
  constexpr int64_t d = 16 * ND;
  const int64_t stride = end + 16;
  scores.resize(static_cast<size_t>(g * stride));
  for (int64_t i = 0; i < g; ++i) {
    __m512 qv[ND];
    for (int c = 0; c < ND; ++c) qv[c] = _mm512_loadu_ps(q + i * d + 16 * c);
    float* sc = scores.data() + i * stride;
    int64_t t = 0;
    for (; t + 16 <= end; t += 16) {
      __m512 acc[16];
      for (int s = 0; s < 16; ++s) {
        const T* kt = k + (t + s) * d;
        __m512 a = _mm512_mul_ps(qv[0], load16(kt));
        for (int c = 1; c < ND; ++c) a = _mm512_fmadd_ps(qv[c], load16(kt + 16 * c), a);
        acc[s] = a;
      }
      _mm512_storeu_ps(sc + t, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
    for (; t < end; ++t) {
      const T* kt = k + t * d;
      __m512 a = _mm512_mul_ps(qv[0], load16(kt));
      for (int c = 1; c < ND; ++c) a = _mm512_fmadd_ps(qv[c], load16(kt + 16 * c), a);
      sc[t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
  float inv[64];  // (g <= 64: checked by the caller)
  for (int64_t i = 0; i < g; ++i) inv[i] = exp_shifted_avx2(scores.data() + i * stride, end);  // as AVX2's
  for (int64_t i0 = 0; i0 < g; i0 += 4) {  // up to 4 heads per value row read
    const float* sc = scores.data() + i0 * stride;
    float* o = out + i0 * d;
    switch (std::min<int64_t>(4, g - i0)) {
      case 1: value_sums_avx512<T, ND, 1>(sc, stride, inv + i0, v, end, o); break;
      case 2: value_sums_avx512<T, ND, 2>(sc, stride, inv + i0, v, end, o); break;
      case 3: value_sums_avx512<T, ND, 3>(sc, stride, inv + i0, v, end, o); break;
      default: value_sums_avx512<T, ND, 4>(sc, stride, inv + i0, v, end, o); break;
    }
  }
}

// The AVX-512 kernel for head_dim d, if it has one (16, 32, 48, 64, 128); false: use another.
template <typename T>
bool attend_group_avx512_for(const float* q, int64_t g, const T* k, const T* v, int64_t end, int64_t d, float scale,
                             std::vector<float>& scores, float* out) {
  if (g > 64) return false;
  switch (d) {
    case 16: attend_group_avx512<T, 1>(q, g, k, v, end, scale, scores, out); return true;
    case 32: attend_group_avx512<T, 2>(q, g, k, v, end, scale, scores, out); return true;
    case 48: attend_group_avx512<T, 3>(q, g, k, v, end, scale, scores, out); return true;
    case 64: attend_group_avx512<T, 4>(q, g, k, v, end, scale, scores, out); return true;
    case 128: attend_group_avx512<T, 8>(q, g, k, v, end, scale, scores, out); return true;
    default: return false;
  }
}
#endif

bool cpu_has_avx2() {
#ifdef LLAMALAB_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// softmax(q . K[0..end) * scale) . V[0..end) for one query head, into `out` (d fp32 values).
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t end, int64_t d, float scale, bool avx2,
            std::vector<float>& scores, float* out) {
#ifdef LLAMALAB_X86
  if (avx2 && d % 8 == 0) return attend_avx2<T>(q, k, v, end, d, scale, scores, out);
#else
  (void)avx2;
#endif
  scores.resize(static_cast<size_t>(end));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < end; ++t) {
    scores[t] = dot_scalar<T>(q, k + t * d, d) * scale;
    top = std::max(top, scores[t]);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < end; ++t) {
    scores[t] = std::exp(scores[t] - top);
    total += scores[t];
  }
  std::fill(out, out + d, 0.0f);
  const float inv = 1.0f / total;
  for (int64_t t = 0; t < end; ++t) axpy_scalar<T>(scores[t] * inv, v + t * d, out, d);
}

// Row b's token at position pos[b] (`rope_stride` 0: one rotary table for every row, else row b's
// table at rope + b * rope_stride). T: the model's activations (qkv, the output); C: the cache's
// dtype (T, or a 16-bit cache of an fp32 model: half the bytes each step reads).
template <typename T, typename C>
void step(const at::Tensor& qkv, const float* rope, int64_t rope_stride, at::Tensor& k_cache, at::Tensor& v_cache,
          const int64_t* positions, int64_t nh, int64_t nkv, at::Tensor& y) {
  const int64_t bsz = qkv.size(0), d = k_cache.size(3), slots = k_cache.size(2), half = d / 2;
  const int64_t width = (nh + 2 * nkv) * d;
  const T* in = static_cast<const T*>(qkv.data_ptr());
  C* kc = static_cast<C*>(k_cache.data_ptr());
  C* vc = static_cast<C*>(v_cache.data_ptr());
  T* yp = static_cast<T*>(y.data_ptr());
  // The rotated queries in fp32 after their rounding to T, (B, nh, d).
  std::vector<float> q(static_cast<size_t>(bsz * nh * d));
  const bool avx2 = cpu_has_avx2(), avx512 = llamalab_gemv_isa_level() >= 2;
#ifdef LLAMALAB_X86
  // fp32 activations into an fp32 or f16 cache: in vectors (see rotate_avx2), the same results.
  constexpr bool kVector = std::is_same_v<T, float> && (std::is_same_v<C, float> || std::is_same_v<C, c10::Half>);
  const bool vector = kVector && avx2 && d % 8 == 0;
#endif
  for (int64_t b = 0; b < bsz; ++b) {
    const T* row = in + b * width;
    const int64_t pos = positions[b];
    const float* rp = rope + b * rope_stride;  // (d/2, 2): cos, sin
#ifdef LLAMALAB_X86
    if constexpr (kVector) {
      if (vector) {
        for (int64_t h = 0; h < nh; ++h) rotate_avx2<float>(row + h * d, rp, d, q.data() + (b * nh + h) * d);
        for (int64_t g = 0; g < nkv; ++g) {
          rotate_avx2<C>(row + (nh + g) * d, rp, d, kc + ((b * nkv + g) * slots + pos) * d);
          copy_avx2<C>(row + (nh + nkv + g) * d, d, vc + ((b * nkv + g) * slots + pos) * d);
        }
        continue;
      }
    }
#endif
    for (int64_t h = 0; h < nh + nkv; ++h) {
      const T* x = row + h * d;
      const bool is_key = h >= nh;
      C* key = is_key ? kc + ((b * nkv + (h - nh)) * slots + pos) * d : nullptr;
      float* qh = is_key ? nullptr : q.data() + (b * nh + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = widen(x[2 * i]), x1 = widen(x[2 * i + 1]);
        const float c = rp[2 * i], s = rp[2 * i + 1];
        // Rounded to the activations' dtype (the eager path's `type_as`), then the key to the cache's.
        const float r0 = widen(static_cast<T>(x0 * c - x1 * s)), r1 = widen(static_cast<T>(x0 * s + x1 * c));
        if (is_key) {
          key[2 * i] = static_cast<C>(r0);
          key[2 * i + 1] = static_cast<C>(r1);
        } else {
          qh[2 * i] = r0;
          qh[2 * i + 1] = r1;
        }
      }
    }
    for (int64_t g = 0; g < nkv; ++g) {
      const T* x = row + (nh + nkv + g) * d;
      C* dst = vc + ((b * nkv + g) * slots + pos) * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<C>(widen(x[c]));
    }
  }
  const int64_t group = nh / nkv;
  int64_t longest = 1;
  for (int64_t b = 0; b < bsz; ++b) longest = std::max(longest, positions[b] + 1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Over (row, key/value head) pairs: the group's query heads together (see attend_group_avx2).
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, 2 * longest * d * group));
  at::parallel_for(0, bsz * nkv, grain, [&](int64_t p0, int64_t p1) {
    std::vector<float> scores, out(static_cast<size_t>(group * d));
    for (int64_t bg = p0; bg < p1; ++bg) {
      const int64_t b = bg / nkv, g = bg % nkv;
      const int64_t base = bg * slots * d, first = b * nh + g * group;  // (b * nkv + g) = bg
#ifdef LLAMALAB_X86
      if (avx512 && attend_group_avx512_for<C>(q.data() + first * d, group, kc + base, vc + base, positions[b] + 1, d,
                                                 scale, scores, out.data())) {
      } else if (avx2 && d % 8 == 0) {
        attend_group_avx2<C>(q.data() + first * d, group, kc + base, vc + base, positions[b] + 1, d, scale, scores,
                             out.data());
      } else
#endif
      {
        for (int64_t i = 0; i < group; ++i)
          attend<C>(q.data() + (first + i) * d, kc + base, vc + base, positions[b] + 1, d, scale, avx2, scores,
                    out.data() + i * d);
      }
      T* dst = yp + first * d;  // the group's heads are consecutive in the output row
      for (int64_t c = 0; c < group * d; ++c) dst[c] = static_cast<T>(out[c]);
    }
  });
}

// The checks both ops share; returns qkv's batch size.
int64_t check_step(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t n_heads,
                   int64_t n_kv_heads) {
  TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "decode_attention: ", n_heads,
              " query heads do not split into groups of ", n_kv_heads, " key/value heads");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == n_kv_heads,
              "decode_attention: expected key and value caches (B, ", n_kv_heads, ", T, head_dim), got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const at::ScalarType dt = k_cache.scalar_type(), xt = qkv.scalar_type();
  TORCH_CHECK((xt == at::kFloat || xt == at::kBFloat16) &&
                  (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf) && v_cache.scalar_type() == dt &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu() && qkv.device().is_cpu(),
              "decode_attention: expected an fp32 or bf16 qkv and fp32, bf16 or f16 caches of one dtype, on the "
              "CPU, got qkv ", qkv.scalar_type(), ", caches ", k_cache.scalar_type(), "/", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: the caches must be contiguous");
  const int64_t d = k_cache.size(3);
  TORCH_CHECK(d % 2 == 0, "decode_attention: head_dim ", d, " is odd (rotary embeddings rotate pairs)");
  const int64_t width = (n_heads + 2 * n_kv_heads) * d;
  TORCH_CHECK(qkv.dim() >= 2 && qkv.size(-1) == width && qkv.numel() == qkv.size(0) * width,
              "decode_attention: expected qkv (B, [1,] ", width, ") = one token's q, k, v per row, got ",
              qkv.sizes());
  const int64_t bsz = qkv.size(0);
  TORCH_CHECK(bsz <= k_cache.size(0), "decode_attention: ", bsz, " rows for a cache of ", k_cache.size(0));
  return bsz;
}

at::Tensor run_step(const at::Tensor& qkv, const at::Tensor& rope, int64_t rope_stride, at::Tensor& k_cache,
                    at::Tensor& v_cache, const int64_t* positions, int64_t n_heads, int64_t n_kv_heads) {
  const at::Tensor x = qkv.contiguous();
  std::vector<int64_t> shape = qkv.sizes().vec();
  shape.back() = n_heads * k_cache.size(3);
  at::Tensor y = at::empty(shape, qkv.options());
  const float* rp = rope.data_ptr<float>();
  const bool bf16 = qkv.scalar_type() == at::kBFloat16;
  switch (k_cache.scalar_type()) {
    case at::kBFloat16:
      if (bf16) step<c10::BFloat16, c10::BFloat16>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
      else step<float, c10::BFloat16>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
      break;
    case at::kHalf:
      if (bf16) step<c10::BFloat16, c10::Half>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
      else step<float, c10::Half>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
      break;
    default:
      if (bf16) step<c10::BFloat16, float>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
      else step<float, float>(x, rp, rope_stride, k_cache, v_cache, positions, n_heads, n_kv_heads, y);
  }
  return y;
}

// Every row at position `pos`.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& k_cache, at::Tensor& v_cache,
                            int64_t pos, int64_t n_heads, int64_t n_kv_heads) {
  const int64_t bsz = check_step(qkv, k_cache, v_cache, n_heads, n_kv_heads), d = k_cache.size(3);
  TORCH_CHECK(pos >= 0 && pos < k_cache.size(2), "decode_attention: position ", pos, " outside the cache's ",
              k_cache.size(2), " slots");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.numel() == d && rope.device().is_cpu(),
              "decode_attention: expected the position's rotary table, ", d / 2, " (cos, sin) fp32 pairs, got ",
              rope.sizes(), " ", rope.scalar_type());
  const std::vector<int64_t> positions(static_cast<size_t>(bsz), pos);
  return run_step(qkv, rope.contiguous(), 0, k_cache, v_cache, positions.data(), n_heads, n_kv_heads);
}

// Row b at its own position positions[b] (continuous batching: rows of different lengths), with
// its own rotary table rope[b]; it attends over its slots [0, positions[b]].
at::Tensor decode_attention_rows(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& k_cache,
                                 at::Tensor& v_cache, const at::Tensor& positions, int64_t n_heads,
                                 int64_t n_kv_heads) {
  const int64_t bsz = check_step(qkv, k_cache, v_cache, n_heads, n_kv_heads), d = k_cache.size(3);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == bsz && positions.scalar_type() == at::kLong &&
                  positions.device().is_cpu(),
              "decode_attention_rows: expected (", bsz, ",) int64 CPU positions, one per row, got ", positions.sizes(),
              " ", positions.scalar_type());
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < bsz; ++b)
    TORCH_CHECK(pp[b] >= 0 && pp[b] < k_cache.size(2), "decode_attention_rows: row ", b, "'s position ", pp[b],
                " outside the cache's ", k_cache.size(2), " slots");
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.numel() == bsz * d && rope.device().is_cpu(),
              "decode_attention_rows: expected each row's rotary table, (", bsz, ", ", d / 2,
              ", 2) fp32, got ", rope.sizes(), " ", rope.scalar_type());
  return run_step(qkv, rope.contiguous(), d, k_cache, v_cache, pp, n_heads, n_kv_heads);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llamalab, m) {
  m.def("decode_attention(Tensor qkv, Tensor rope, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, "
        "int n_heads, int n_kv_heads) -> Tensor");
  m.def("decode_attention_rows(Tensor qkv, Tensor rope, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor positions, "
        "int n_heads, int n_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_rows", &decode_attention_rows);
}
