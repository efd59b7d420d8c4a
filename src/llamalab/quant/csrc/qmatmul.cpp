// Matrix products on GGUF quantized blocks, read where they lie (a memory map of the file), on
// x86-64 CPUs: y = x W^T for W in Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K or Q6_K blocks and x in fp32.
//
// The way llama.cpp does it: each row of x is quantized once per call to int8 in blocks of 32
// (one fp32 scale d_x per block, and d_x * sum(q_x) for the blocks' offsets), so that each block
// of a weight row against the matching block of x is one integer dot product of 32 pairs, scaled
// once. A block of 32 weights w_i = d * q_i + m (Q4_1: q_i in 0..15, m stored; Q4_0: q_i in 0..15,
// m = -8 d; Q8_0: q_i in -128..127, m = 0) against x_i ~ d_x * p_i contributes
//     d d_x * sum(q_i p_i)  +  m * d_x * sum(p_i)
// The integer sums go into 8 int32 lanes (AVX2: VPMADDUBSW then VPMADDWD against ones; AVX-512
// VNNI: one VPDPBUSD), are converted to fp32 and accumulated by one FMA with d d_x per block;
// the offsets are a scalar FMA per block. Only the horizontal sum of the lanes is left for the end.
//
// Q8_0's weights are signed: VPMADDUBSW multiplies unsigned by signed bytes, so the AVX2 path
// multiplies |w| by x carrying w's sign (VPSIGNB), as llama.cpp does; VPDPBUSD takes w + 128
// (w xor 0x80) and the offset term subtracts 128 d d_x sum(p_i).
//
// Rows of W are walked in groups (4 rows; 8 on the AVX-512 path, which holds two rows per
// register) against every row of x (decode: 1-4 rows; prefill: the whole prompt), so that one
// block of x serves the group from registers and the group's weights, a few KB, stay in L1 while
// the rows of x stream from L2. Threads split the groups of rows
// (at::parallel_for), over several weights at once: the q, k and v projections of a layer (or
// the gate and up projections) are one call whose outputs are concatenated, so x is normalised and
// quantized once for all of them.
//
// Before the product x can be replaced by RMSNorm(x) * norm, or by SwiGLU of its two halves
// (silu(gate) * up), computed in fp32 as in the decode kernel (generate/csrc/gemv.cpp); `other`
// (the residual) is added to the fp32 sums.
//
// Paths (`isa` reports, `set_isa` / LLAMALAB_QUANT_ISA force): avx2 (AVX2, FMA, F16C),
// avx512vnni (AVX-512F/BW/VL + VNNI: 512-bit VPDPBUSD on two rows at once, below) and amx (the
// same, and AMX int8 tiles for many rows of x, bf16 ones for prompts: see "AMX"). A CPU with none runs the
// pure-PyTorch reference of llamalab/quant/blocks.py instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLQ_X86 1
#define LLQ_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LLQ_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#include "../../generate/csrc/x86_simd.h"  // exp / silu in 8 lanes, shared with the decode kernels
// AMX needs GCC 11 / clang 12 (intrinsics and target names); with an older compiler the amx path
// compiles to stubs and is never offered (amx_usable() is false), the others are unchanged.
#if !defined(LLQ_NO_AMX) && ((defined(__clang__) && __clang_major__ >= 12) || \
                             (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define LLQ_HAVE_AMX 1
#define LLQ_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#define LLQ_AMXBF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#else
#define LLQ_HAVE_AMX 0
#define LLQ_AMX LLQ_VNNI
#define LLQ_AMXBF16 LLQ_VNNI
#endif
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace {

// GGML type ids (ggml.h, gguf-py's GGMLQuantizationType).
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14;
constexpr int64_t kBlock = 32;  // weights per block of x (and of the 32-block types)
constexpr int64_t kRowsAtOnce = 4;    // rows of W walked together by the 256-bit kernels
constexpr int64_t kMaxGroupRows = 8;  // ... and by any kernel (the 512-bit ones: 4 pairs)
constexpr int64_t kMaxRowsOfX = 4;    // rows of x a multi-row kernel takes at once

int64_t block_bytes(int64_t type) {
  switch (type) {
    case kQ4_0: return 18;  // fp16 d, 16 bytes of nibbles
    case kQ4_1: return 20;  // fp16 d, fp16 m, 16 bytes of nibbles
    case kQ8_0: return 34;  // fp16 d, 32 int8
    case kQ5_0: return 22;  // fp16 d, 32 fifth bits, 16 bytes of nibbles
    case kQ5_1: return 24;  // fp16 d, fp16 m, fifth bits, nibbles
    case kQ4_K: return 144;  // super-block of 256: fp16 d, dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
    case kQ6_K: return 210;  // super-block of 256: 128 bytes low nibbles, 64 of high 2 bits, 16 int8 scales, fp16 d
    default: return 0;
  }
}

// The same for the 32-block types, at compile time.
constexpr int64_t block_bytes_of(int64_t type) {
  return type == kQ4_1 ? 20 : type == kQ4_0 ? 18 : type == kQ5_0 ? 22 : type == kQ5_1 ? 24 : 34;
}

// Weights per block: 256 for the K-quants' super-blocks, else 32.
int64_t block_weights(int64_t type) { return type == kQ4_K || type == kQ6_K ? 256 : kBlock; }

const char* type_name(int64_t type) {
  switch (type) {
    case kQ4_0: return "Q4_0";
    case kQ4_1: return "Q4_1";
    case kQ8_0: return "Q8_0";
    case kQ5_0: return "Q5_0";
    case kQ5_1: return "Q5_1";
    case kQ4_K: return "Q4_K";
    case kQ6_K: return "Q6_K";
    default: return "unknown";
  }
}

enum Isa : int { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
const char* const kIsaNames[] = {"none", "avx2", "avx512vnni", "amx"};

bool amx_usable();

Isa cpu_best() {
#ifdef LLQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return amx_usable() ? kAmx : kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kNone;
}

std::atomic<int> g_isa{-1};

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = cpu_best();
    g_isa.store(isa);
  }
  return static_cast<Isa>(isa);
}

// One block of 32: q = round-half-even(x * 127 / max|x|); returns the sum of q, sets d = max|x| / 127.
// Scalar, and (below) the same in AVX2 as llama.cpp writes it: a libm nearbyint per element cost
// ~6 us per call at K = 576, ~1 ms of a SmolLM2 decode step.
int quantize_block_scalar(const float* xb, int8_t* qb, float* d_out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float inv = amax != 0.0f ? 127.0f / amax : 0.0f;
  int sum = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    qb[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));  // |x * inv| <= 127
    sum += qb[i];
  }
  *d_out = amax / 127.0f;
  return sum;
}

#ifdef LLQ_X86
LLQ_AVX2 int quantize_block_avx2(const float* xb, int8_t* qb, float* d_out) {
  __m256 v[4];
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float top = _mm_cvtss_f32(m4);
  const __m256 mul = _mm256_set1_ps(top != 0.0f ? 127.0f / top : 0.0f);
  __m256i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  // int32 -> int8 by two saturating packs (within 128-bit lanes), then the dwords back in order.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  *d_out = top / 127.0f;
  return _mm_cvtsi128_si32(t);
}
#endif

// x quantized per block of 32: int8 values, the block's scale, and its scale times the sum of the
// values (the offsets' factor). Buffers reused from call to call (per thread).
struct QuantizedX {
  std::vector<int8_t> q;  // (m_rows, k)
  std::vector<float> d;   // (m_rows, k / 32)
  std::vector<float> ds;  // (m_rows, k / 32): fp16(d * sum(q)), Q4_1's offsets as llama.cpp has them
  std::vector<float> dsum;  // (m_rows, k / 32): d * sum(q) in fp32 from the fp16 d (exact integer offsets)
};

// As llama.cpp's x86 quantize_row_q8_0 / q8_1 (its activations for these weight types), so that the
// products are the ones llama.cpp computes on the same file: q = round-half-even(x * 127 / max|x|),
// d = max|x| / 127 and d * sum(q) both kept as fp16 (block_q8_1's fields), used in fp32.
void quantize_x(const float* xf, int64_t m_rows, int64_t k, bool simd, QuantizedX& out) {
  const int64_t nb = k / kBlock;
  const size_t blocks = static_cast<size_t>(m_rows * nb);
  out.q.resize(static_cast<size_t>(m_rows * k));
  out.d.resize(blocks);
  out.ds.resize(blocks);
  out.dsum.resize(blocks);
  // A prompt's rows split over the threads (a decode step's one row: inline).
  at::parallel_for(0, m_rows * nb, std::max<int64_t>(1, 16384 / kBlock), [&](int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    float d;
#ifdef LLQ_X86
    const int sum = simd ? quantize_block_avx2(xf + i * kBlock, out.q.data() + i * kBlock, &d)
                         : quantize_block_scalar(xf + i * kBlock, out.q.data() + i * kBlock, &d);
#else
    (void)simd;
    const int sum = quantize_block_scalar(xf + i * kBlock, out.q.data() + i * kBlock, &d);
#endif
    const float d16 = static_cast<float>(c10::Half(d));
    out.d[i] = d16;
    out.ds[i] = static_cast<float>(c10::Half(d * static_cast<float>(sum)));
    out.dsum[i] = d16 * static_cast<float>(sum);
  }
  });
}

// The rows of x as the product reads them, in fp32: x, RMSNorm(x) * norm, or silu(gate) * up.
#ifdef LLQ_X86
// silu(gate) * up for the first k - k % 8 columns; returns how many it did.
LLQ_AVX2 int64_t swiglu_avx2(const float* gate, const float* up, float* out, int64_t k) {
  int64_t c = 0;
  for (; c + 8 <= k; c += 8)
    _mm256_storeu_ps(out + c, _mm256_mul_ps(llamalab_simd::silu_avx2(_mm256_loadu_ps(gate + c)), _mm256_loadu_ps(up + c)));
  return c;
}
#endif

void prepare(const float* x, int64_t m_rows, int64_t k, const float* norm, double eps, bool swiglu, bool simd,
             std::vector<float>& out) {
  out.resize(static_cast<size_t>(m_rows * k));
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 8192 / k), [&](int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    float* om = out.data() + m * k;
    if (swiglu) {
      const float* gate = x + m * 2 * k;
      const float* up = gate + k;
      int64_t c = 0;
#ifdef LLQ_X86
      // (a libm exp per element was ~40% of the down projection's call at 8 rows of x)
      if (simd) c = swiglu_avx2(gate, up, om, k);
#else
      (void)simd;
#endif
      for (; c < k; ++c) om[c] = gate[c] / (1.0f + std::exp(-gate[c])) * up[c];
      continue;
    }
    const float* xm = x + m * k;
    std::memcpy(om, xm, static_cast<size_t>(k) * sizeof(float));
    if (norm != nullptr) {
      float squares = 0.0f;
      for (int64_t c = 0; c < k; ++c) squares += om[c] * om[c];
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(k) + static_cast<float>(eps));
      for (int64_t c = 0; c < k; ++c) om[c] = om[c] * scale * norm[c];
    }
  }
  });
}

// One group of R weight rows (`w`, `row_bytes` apart) against one quantized row of x; sums[r].
using DotRows = void (*)(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx, const float* dsx,
                         int64_t nb, float* sums);

#ifdef LLQ_X86
LLQ_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LLQ_AVX2 inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// A Q4 block's 16 bytes of nibbles -> 32 bytes 0..15 in element order (low nibbles are elements
// 0-15, high nibbles 16-31).
LLQ_AVX2 inline __m256i nibbles(const uint8_t* qs) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Unsigned bytes u times signed bytes p, summed into 8 int32 lanes.
LLQ_AVX2 inline __m256i dot_u8s8_avx2(__m256i u, __m256i p) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, p), _mm256_set1_epi16(1));
}

LLQ_VNNI inline __m256i dot_u8s8_vnni(__m256i u, __m256i p) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, p);
}

// The 32 fifth bits of a Q5 block (a little-endian uint32: bit i for element i) -> 0x10 in byte i.
LLQ_AVX2 inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t x32;
  std::memcpy(&x32, qh, 4);
  const __m256i pick = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x32)), pick), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, bit), _mm256_set1_epi8(0x10));
}

// Decode streams every weight from memory once: while a group of `rows` rows is multiplied, the
// group `kPrefetchGroups` ahead is asked for, a slice per block (`at`: the slice's offset within a
// group's bytes, `n` its length), so that the reads of the next groups overlap this one's arithmetic.
constexpr int64_t kPrefetchGroups = 3;

LLQ_AVX2 inline void prefetch_ahead(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t at, int64_t n) {
  const char* ahead = reinterpret_cast<const char*>(w) + kPrefetchGroups * rows * row_bytes + at;
  for (int64_t o = 0; o < n; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
}

// The kernels of one instruction set: ATTR its target attribute, DOT its unsigned x signed byte
// dot product. (A macro, not a template: a function's target cannot depend on a template argument,
// and the intrinsics cannot be inlined into a function compiled for less.)
#define LLQ_DEFINE_KERNELS(SUFFIX, ATTR, DOT, VNNI)                                                     \
  /* Q4_0 / Q4_1, and Q5_0 / Q5_1 (the fifth bits or-ed into the nibbles) */                          \
  template <int64_t Type, int R>                                                                        \
  ATTR void dot_q4_##SUFFIX(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,     \
                            const float* dsx, int64_t nb, float* sums) {                                \
    constexpr bool five = Type == kQ5_0 || Type == kQ5_1, with_min = Type == kQ4_1 || Type == kQ5_1;   \
    constexpr int64_t bytes = block_bytes_of(Type);                                                     \
    constexpr int64_t qh_at = with_min ? 4 : 2, qs_at = qh_at + (five ? 4 : 0);                         \
    /* The block's fp16 d (and m) converted by one VCVTPH2PS and scaled by x's (d_x, s_x) in one    \
       multiply: lane 0 d d_x scales the products, lane 1 (m s_x, or d s_x) is summed for the        \
       offset (times -8 / -16 at the end: exact, a power of two). Half the scalar work of          \
       converting and scaling each separately, the same roundings. */                                 \
    constexpr float off_scale = with_min ? 1.0f : (five ? -16.0f : -8.0f);                              \
    __m256 acc[R];                                                                                      \
    __m128 off[R];                                                                                      \
    for (int r = 0; r < R; ++r) {                                                                       \
      acc[r] = _mm256_setzero_ps();                                                                     \
      off[r] = _mm_setzero_ps();                                                                        \
    }                                                                                                   \
    for (int64_t b = 0; b < nb; ++b) {                                                                  \
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock));          \
      const __m128 xs = _mm_unpacklo_ps(_mm_set_ss(dx[b]), _mm_set_ss(dsx[b]));                         \
      if (R > 1) prefetch_ahead(w, row_bytes, R, b * bytes * R, bytes * R);                             \
      for (int r = 0; r < R; ++r) {                                                                     \
        const uint8_t* blk = w + r * row_bytes + b * bytes;                                             \
        __m128i h;                                                                                      \
        if (with_min) {                                                                                 \
          int32_t dm;                                                                                   \
          std::memcpy(&dm, blk, 4);                                                                     \
          h = _mm_cvtsi32_si128(dm);                                                                    \
        } else {                                                                                        \
          int16_t d16;                                                                                  \
          std::memcpy(&d16, blk, 2);                                                                    \
          h = _mm_set1_epi16(d16);                                                                      \
        }                                                                                               \
        const __m128 scaled = _mm_mul_ps(_mm_cvtph_ps(h), xs);                                          \
        __m256i q = nibbles(blk + qs_at);                                                               \
        if (five) q = _mm256_or_si256(q, fifth_bits(blk + qh_at));                                      \
        const __m256i s = DOT(q, p);                                                                    \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcastss_ps(scaled), acc[r]);         \
        off[r] = _mm_add_ps(off[r], scaled);                                                            \
      }                                                                                                 \
    }                                                                                                   \
    for (int r = 0; r < R; ++r)                                                                         \
      sums[r] = hsum8(acc[r]) + off_scale * _mm_cvtss_f32(_mm_shuffle_ps(off[r], off[r], 1));          \
  }                                                                                                     \
  template <int R>                                                                                      \
  ATTR void dot_q8_##SUFFIX(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,     \
                            const float* dsx, int64_t nb, float* sums) {                                \
    __m256 acc[R];                                                                                      \
    float off[R];                                                                                       \
    for (int r = 0; r < R; ++r) {                                                                       \
      acc[r] = _mm256_setzero_ps();                                                                     \
      off[r] = 0.0f;                                                                                    \
    }                                                                                                   \
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));                                    \
    for (int64_t b = 0; b < nb; ++b) {                                                                  \
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock));          \
      const float db = dx[b], sb = dsx[b];                                                              \
      if (R > 1) prefetch_ahead(w, row_bytes, R, b * 34 * R, 34 * R);                                   \
      for (int r = 0; r < R; ++r) {                                                                     \
        const uint8_t* blk = w + r * row_bytes + b * 34;                                                \
        const float d = half(blk);                                                                      \
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));                \
        __m256i s;                                                                                      \
        if (VNNI) { /* sum (q + 128) p, less 128 sum p */                                               \
          s = DOT(_mm256_xor_si256(q, flip), p);                                                        \
          off[r] -= 128.0f * d * sb;                                                                    \
        } else { /* |q| times p with q's sign */                                                        \
          s = DOT(_mm256_sign_epi8(q, q), _mm256_sign_epi8(p, q));                                      \
        }                                                                                               \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * db), acc[r]);                \
      }                                                                                                 \
    }                                                                                                   \
    for (int r = 0; r < R; ++r) sums[r] = hsum8(acc[r]) + off[r];                                       \
  }

LLQ_DEFINE_KERNELS(avx2, LLQ_AVX2, dot_u8s8_avx2, false)
LLQ_DEFINE_KERNELS(vnni, LLQ_VNNI, dot_u8s8_vnni, true)
#undef LLQ_DEFINE_KERNELS

// ---- Q5_0 / Q5_1 and the K-quants Q4_K / Q6_K, 256-bit ---------------------------------------------
// The same scheme on the blocks' own layouts: each 32 weights of a row unpacked to unsigned bytes
// (Q5: nibble | fifth bit << 4, 0..31; Q4_K: one nibble of a 32-byte run, 0..15; Q6_K: low nibble
// | two high bits << 4, 0..63), one integer dot product with x's block, scaled per 32 (Q4_K: d times
// the sub-block's 6-bit scale; its offset -dmin m times d_x sum(p)) or per 16 (Q6_K: the int32 lanes
// 0-3 and 4-7 are the two halves, each with its int8 scale; the -32 in (q - 32) is a second dot
// product of 32s with x). x's blocks of 32 line up with the super-blocks' sub-blocks: 8 per 256.

// Q4_K's 12 bytes of 6-bit scales and mins (ggml's get_scale_min_k4) for the 8 sub-blocks, as two
// vectors of 8 floats: the bytes rearranged in four 32-bit words (scales 0-3 | 4-7 | mins 0-3 | 4-7)
// with masks and shifts, as llama.cpp does, then widened. (Decoding them a byte at a time cost as
// much as the products.)
LLQ_AVX2 inline void q4k_scales(const uint8_t* q, __m256& sc, __m256& mn) {
  uint32_t u[4];
  std::memcpy(u, q, 12);
  constexpr uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  const uint32_t mins_low = u[1] & k1;
  u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  u[2] = mins_low;
  u[0] &= k1;
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
}

#define LLQ_DEFINE_MORE_KERNELS(SUFFIX, ATTR, DOT)                                                      \
  template <int R>                                                                                      \
  ATTR void dot_q4k_##SUFFIX(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,    \
                             const float* dsx, int64_t nb, float* sums) {                               \
    const __m256i m4 = _mm256_set1_epi8(0x0F);                                                          \
    __m256 acc[R], off[R];                                                                              \
    for (int r = 0; r < R; ++r) {                                                                       \
      acc[r] = _mm256_setzero_ps();                                                                     \
      off[r] = _mm256_setzero_ps();                                                                     \
    }                                                                                                   \
    for (int64_t sb = 0; sb < nb / 8; ++sb) {                                                           \
      if (R > 1) prefetch_ahead(w, row_bytes, R, sb * 144 * R, 144 * R);                                \
      alignas(32) float scale[R][8];                                                                    \
      const __m256 dxs = _mm256_loadu_ps(dx + sb * 8), sxs = _mm256_loadu_ps(dsx + sb * 8);             \
      for (int r = 0; r < R; ++r) {                                                                     \
        const uint8_t* blk = w + r * row_bytes + sb * 144;                                              \
        __m256 sc, mn;                                                                                  \
        q4k_scales(blk + 4, sc, mn);                                                                    \
        _mm256_store_ps(scale[r], _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(half(blk))), dxs));    \
        off[r] = _mm256_fnmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(half(blk + 2))), sxs, off[r]);       \
      }                                                                                                 \
      for (int jp = 0; jp < 4; ++jp) {                                                                  \
        const int64_t b0 = sb * 8 + 2 * jp;                                                             \
        const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b0 * kBlock));      \
        const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (b0 + 1) * kBlock));\
        for (int r = 0; r < R; ++r) {                                                                   \
          const __m256i raw = _mm256_loadu_si256(                                                       \
              reinterpret_cast<const __m256i*>(w + r * row_bytes + sb * 144 + 16 + 32 * jp));          \
          const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);\
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo, p0)), _mm256_set1_ps(scale[r][2 * jp]), acc[r]);\
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(hi, p1)), _mm256_set1_ps(scale[r][2 * jp + 1]), acc[r]);\
        }                                                                                               \
      }                                                                                                 \
    }                                                                                                   \
    for (int r = 0; r < R; ++r) sums[r] = hsum8(acc[r]) + hsum8(off[r]);                                \
  }                                                                                                     \
  template <int R>                                                                                      \
  ATTR void dot_q6k_##SUFFIX(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,    \
                             const float* /*dsx*/, int64_t nb, float* sums) {                          \
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);   \
    __m256 acc[R];                                                                                      \
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();                                           \
    for (int64_t sb = 0; sb < nb / 8; ++sb) {                                                           \
      if (R > 1) prefetch_ahead(w, row_bytes, R, sb * 210 * R, 210 * R);                                \
      for (int h = 0; h < 2; ++h) {                                                                     \
        __m256i p[4], p32[4];                                                                           \
        for (int t = 0; t < 4; ++t) {                                                                   \
          p[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (sb * 8 + 4 * h + t) * kBlock));\
          p32[t] = DOT(c32, p[t]);                                                                      \
        }                                                                                               \
        for (int r = 0; r < R; ++r) {                                                                   \
          const uint8_t* blk = w + r * row_bytes + sb * 210;                                            \
          const uint8_t* ql = blk + 64 * h;                                                             \
          const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192) + 8 * h;                        \
          const float d = half(blk + 208);                                                              \
          const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));                  \
          const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));             \
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));  \
          __m256i q[4];                                                                                 \
          q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));\
          q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),                                              \
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)); \
          q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),                        \
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)); \
          q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),                        \
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4)); \
          for (int t = 0; t < 4; ++t) {                                                                 \
            const __m256i s = _mm256_sub_epi32(DOT(q[t], p[t]), p32[t]);                                \
            const float ds = d * dx[sb * 8 + 4 * h + t];                                                \
            const __m256 scale = _mm256_set_m128(_mm_set1_ps(ds * sc[2 * t + 1]), _mm_set1_ps(ds * sc[2 * t]));\
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);                             \
          }                                                                                             \
        }                                                                                               \
      }                                                                                                 \
    }                                                                                                   \
    for (int r = 0; r < R; ++r) sums[r] = hsum8(acc[r]);                                                \
  }

LLQ_DEFINE_MORE_KERNELS(avx2, LLQ_AVX2, dot_u8s8_avx2)
LLQ_DEFINE_MORE_KERNELS(vnni, LLQ_VNNI, dot_u8s8_vnni)
#undef LLQ_DEFINE_MORE_KERNELS

// ---- AVX-512 VNNI: two weight rows per 512-bit register ------------------------------------------
// A block of row r and the same block of row r + 1 share one register (row r in bytes 0-31, r + 1 in
// 32-63) against x's block in both halves, so one VPDPBUSD does both rows' 32 products. The blocks'
// fp16 scales come 8 blocks x 2 rows at a time by one gather of the dwords at the blocks' starts
// (d, and Q4_1's m beside it), are multiplied by x's 8 scales once, and each block picks its lane
// by a permute: per block and pair of rows about 11 instructions, against ~30 for two rows of the
// 256-bit kernel above. The offsets (m * s, or -8 d / -128 d times d_x sum(p)) go into the same
// accumulators, 8 blocks per FMA. Lanes 0-7 of a pair's accumulator sum to row r, 8-15 to r + 1.

// The byte offsets of 8 blocks (`bb` bytes each) in two rows `rb` bytes apart: lanes 0-7, 8-15.
LLQ_VNNI inline __m512i block_offsets(int32_t rb, int32_t bb) {
  return _mm512_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb, rb, rb + bb, rb + 2 * bb,
                           rb + 3 * bb, rb + 4 * bb, rb + 5 * bb, rb + 6 * bb, rb + 7 * bb);
}

// Up to 8 floats (the lanes of `m`; the others 0), in both halves of a register.
LLQ_VNNI inline __m512 twice(const float* p, __mmask8 m) {
  const __m256d v = _mm256_castps_pd(_mm256_maskz_loadu_ps(m, p));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(v), v, 1));
}

LLQ_VNNI inline float hsum16_low(__m512 v) { return hsum8(_mm512_castps512_ps256(v)); }
LLQ_VNNI inline float hsum16_high(__m512 v) {
  return hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <int64_t Type, int P>
LLQ_VNNI void dot_pairs_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                const float* dsx, int64_t nb, float* sums) {
  constexpr int64_t bytes = block_bytes_of(Type);
  constexpr int64_t qs_at = Type == kQ4_1 ? 4 : 2;
  const int32_t rb = static_cast<int32_t>(row_bytes);
  const int32_t bb = static_cast<int32_t>(bytes);
  // Byte offset of lane i's block: block i % 8 of row i / 8 (of the pair).
  const __m512i offsets = block_offsets(rb, bb);
  const __m512i pick_base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
  // [r.lo | r1.lo] and [r.hi | r1.hi] -> [r.lo, r.hi, r1.lo, r1.hi] (qwords).
  const __m512i interleave = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[P];
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
    const __mmask8 m8 = static_cast<__mmask8>((1u << n) - 1);
    const __mmask16 m16 = static_cast<__mmask16>(m8 | (m8 << 8));
    const __m512 dxx = twice(dx + b0, m8), sxx = twice(dsx + b0, m8);
    __m512 scale[P];
    for (int p = 0; p < P; ++p) {
      const uint8_t* base = w + 2 * p * row_bytes + b0 * bytes;
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m16, offsets, base, 1);
      const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
      scale[p] = _mm512_mul_ps(d, dxx);
      if constexpr (Type == kQ4_1) {
        const __m512 m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
        acc[p] = _mm512_fmadd_ps(m, sxx, acc[p]);
      } else {
        acc[p] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(Type == kQ4_0 ? -8.0f : -128.0f)), sxx, acc[p]);
      }
    }
    for (int i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      prefetch_ahead(w, row_bytes, 2 * P, b * bytes * 2 * P, bytes * 2 * P);
      const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock)));
      const __m512i pick = _mm512_add_epi32(pick_base, _mm512_set1_epi32(i));
      for (int p = 0; p < P; ++p) {
        const uint8_t* r0 = w + 2 * p * row_bytes + b * bytes;
        __m512i z;
        if constexpr (Type == kQ8_0) {
          z = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 2))),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + row_bytes + 2)), 1);
          z = _mm512_xor_si512(z, flip);  // q + 128, unsigned
        } else {
          const __m256i v = _mm256_inserti128_si256(
              _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + qs_at))),
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + row_bytes + qs_at)), 1);
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          z = _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), interleave, _mm512_castsi256_si512(hi));
        }
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z, x);
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_permutexvar_ps(pick, scale[p]), acc[p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    sums[2 * p] = hsum16_low(acc[p]);
    sums[2 * p + 1] = hsum16_high(acc[p]);
  }
}

// Q4_0 / Q4_1 on AVX-512 VNNI, four weight rows per 512-bit register: the 16 bytes of nibbles of
// the same block in rows r..r+3 fill one register; its low nibbles (elements 0-15 of each row)
// against x's first 16 bytes broadcast to all four lanes, and its high nibbles (16-31) against the
// next 16, are two VPDPBUSD into the same int32 lanes (same block, same scale): per block and 4
// rows ~11 instructions, half of them on port 0, the rest shared (measured ~1.6x the pair kernel).
// Lanes 4j..4j+3 hold row r+j. The scales come as in the pair kernel, by gathers of 8 blocks x 2
// rows, and each block's four are picked by one two-source permute; the offsets accumulate apart,
// in the gathers' lane order (lanes 0-7: the first row of a pair, 8-15: the second).
//
// Q5_0 / Q5_1 the same way: the four rows' fifth bits (bits 0-15 of each row's uint32 for the low
// nibbles, 16-31 for the high ones) make one 64-bit mask, which VPMOVM2B spreads to bytes, 0x10 where
// set, or-ed into the nibbles; the offsets are -16 d (Q5_0) or m (Q5_1) times d_x sum(p).
template <int64_t Type, int Q>
LLQ_VNNI void dot_quads_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                const float* dsx, int64_t nb, float* sums) {
  constexpr bool five = Type == kQ5_0 || Type == kQ5_1;
  constexpr bool with_min = Type == kQ4_1 || Type == kQ5_1;
  constexpr int64_t bytes = block_bytes_of(Type);
  constexpr int64_t qs_at = (with_min ? 4 : 2) + (five ? 4 : 0);
  const int32_t rb = static_cast<int32_t>(row_bytes);
  const int32_t bb = static_cast<int32_t>(bytes);
  const __m512i offsets = block_offsets(rb, bb);
  // Block i's scale for rows r..r+3: lane i of the first pair's vector (r), 8 + i (r+1), then of the
  // second pair's (16 + i, 24 + i in the two-source permute's numbering), each four times.
  const __m512i pick_base = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m128i rows4 = _mm_setr_epi32(0, rb, 2 * rb, 3 * rb);
  const __m128i halves = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  __m512 acc[Q], off[2 * Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_ps();
  for (int p = 0; p < 2 * Q; ++p) off[p] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
    const __mmask8 m8 = static_cast<__mmask8>((1u << n) - 1);
    const __mmask16 m16 = static_cast<__mmask16>(m8 | (m8 << 8));
    const __m512 dxx = twice(dx + b0, m8), sxx = twice(dsx + b0, m8);
    __m512 scale[2 * Q];
    for (int p = 0; p < 2 * Q; ++p) {
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m16, offsets,
                                                    w + 2 * p * row_bytes + b0 * bytes, 1);
      const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
      scale[p] = _mm512_mul_ps(d, dxx);
      if constexpr (with_min) {
        off[p] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))), sxx, off[p]);
      } else {
        off[p] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(five ? -16.0f : -8.0f)), sxx, off[p]);
      }
    }
    for (int i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      prefetch_ahead(w, row_bytes, 4 * Q, b * bytes * 4 * Q, bytes * 4 * Q);
      const int8_t* xb = qx + b * kBlock;
      const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
      const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
      const __m512i pick = _mm512_add_epi32(pick_base, _mm512_set1_epi32(i));
      for (int q = 0; q < Q; ++q) {
        const uint8_t* r0 = w + 4 * q * row_bytes + b * bytes + qs_at;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + row_bytes)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 2 * row_bytes)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 3 * row_bytes)), 3);
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        if constexpr (five) {
          // The four rows' qh words in one gather; one shuffle packs their low halves into the low
          // qword (the mask of the low nibbles) and their high halves into the high one.
          const __m128i h4 = _mm_i32gather_epi32(reinterpret_cast<const int*>(r0 - 4), rows4, 1);
          const __m128i packed = _mm_shuffle_epi8(h4, halves);
          const uint64_t mlo = static_cast<uint64_t>(_mm_cvtsi128_si64(packed));
          const uint64_t mhi = static_cast<uint64_t>(_mm_extract_epi64(packed, 1));
          const __m512i bit5 = _mm512_set1_epi8(0x10);
          lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_movm_epi8(mlo), bit5));
          hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_movm_epi8(mhi), bit5));
        }
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
        s = _mm512_dpbusd_epi32(s, hi, xhi);
        const __m512 sc = _mm512_permutex2var_ps(scale[2 * q], pick, scale[2 * q + 1]);
        acc[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[q]);
      }
    }
  }
  for (int q = 0; q < Q; ++q) {
    alignas(64) float a[16], o0[16], o1[16];
    _mm512_store_ps(a, acc[q]);
    _mm512_store_ps(o0, off[2 * q]);
    _mm512_store_ps(o1, off[2 * q + 1]);
    for (int j = 0; j < 4; ++j) {
      const float* o = j < 2 ? o0 : o1;
      const int half_at = (j & 1) * 8;
      float v = a[4 * j] + a[4 * j + 1] + a[4 * j + 2] + a[4 * j + 3];
      for (int l = 0; l < 8; ++l) v += o[half_at + l];
      sums[4 * q + j] = v;
    }
  }
}

// Q4_K on AVX-512 VNNI, two rows per 512-bit register: a 32-byte run of nibbles (two sub-blocks) of
// row r in the low half, of row r + 1 in the high half; the low nibbles against x's block 2j broadcast
// to both halves, the high ones against block 2j + 1. Each row's 8 sub-block scales d sc_j d_x are
// one vector product per super-block, the two rows' side by side, and each sub-block's pair of
// scales is picked by a permute; the offsets -dmin m_j d_x sum(p) are summed per row in scalars.
template <int P>
LLQ_VNNI void dot_q4k_pairs_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                    const float* dsx, int64_t nb, float* sums) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[P];
  __m256 off[2 * P];
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
  for (int r = 0; r < 2 * P; ++r) off[r] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    prefetch_ahead(w, row_bytes, 2 * P, sb * 144 * 2 * P, 144 * 2 * P);
    const __m256 dxs = _mm256_loadu_ps(dx + sb * 8), sxs = _mm256_loadu_ps(dsx + sb * 8);
    __m512 both[P];
    for (int p = 0; p < P; ++p) {
      __m256 half_scales[2];
      for (int h = 0; h < 2; ++h) {
        const uint8_t* blk = w + (2 * p + h) * row_bytes + sb * 144;
        __m256 sc, mn;
        q4k_scales(blk + 4, sc, mn);
        off[2 * p + h] = _mm256_fnmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(half(blk + 2))), sxs, off[2 * p + h]);
        half_scales[h] = _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(half(blk))), dxs);
      }
      both[p] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(half_scales[0])),
                                                    _mm256_castps_pd(half_scales[1]), 1));  // AVX-512F only
    }
    for (int jp = 0; jp < 4; ++jp) {
      const int64_t b0 = sb * 8 + 2 * jp;
      const __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b0 * kBlock)));
      const __m512i x1 =
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (b0 + 1) * kBlock)));
      const __m512i pick_lo = _mm512_setr_epi32(2 * jp, 2 * jp, 2 * jp, 2 * jp, 2 * jp, 2 * jp, 2 * jp, 2 * jp,
                                                8 + 2 * jp, 8 + 2 * jp, 8 + 2 * jp, 8 + 2 * jp, 8 + 2 * jp,
                                                8 + 2 * jp, 8 + 2 * jp, 8 + 2 * jp);
      const __m512i pick_hi = _mm512_add_epi32(pick_lo, _mm512_set1_epi32(1));
      for (int p = 0; p < P; ++p) {
        const uint8_t* q0 = w + 2 * p * row_bytes + sb * 144 + 16 + 32 * jp;
        const __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + row_bytes)), 1);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0);
        const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, x1);
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(pick_lo, both[p]), acc[p]);
        acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(pick_hi, both[p]), acc[p]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    sums[2 * p] = hsum16_low(acc[p]) + hsum8(off[2 * p]);
    sums[2 * p + 1] = hsum16_high(acc[p]) + hsum8(off[2 * p + 1]);
  }
}

// Q6_K on AVX-512 VNNI, two rows per 512-bit register as Q4_K: each 32 weights of row r in the low
// half, of row r + 1 in the high half, built from the low-nibble and high-bit runs of both rows at
// once; the -32 is one dot product of 32s with x per block, shared by every row; each row's 16 int8
// scales widen to 16 floats (times d) once per super-block, and a two-source permute picks the four
// a block needs (lanes 0-3, 4-7: row r's two halves of 16; 8-11, 12-15: row r + 1's).
// 32 bytes at `a` in the low half, 32 at `b` in the high half.
LLQ_VNNI inline __m512i load_pair(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

template <int P>
LLQ_VNNI void dot_q6k_pairs_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                    const float* /*dsx*/, int64_t nb, float* sums) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3), c32 = _mm512_set1_epi8(32);
  __m512 acc[P];
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    prefetch_ahead(w, row_bytes, 2 * P, sb * 210 * 2 * P, 210 * 2 * P);
    __m512 rs[2 * P];  // each row's 16 scales times its d
    for (int r = 0; r < 2 * P; ++r) {
      const uint8_t* blk = w + r * row_bytes + sb * 210;
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
      rs[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)), _mm512_set1_ps(half(blk + 208)));
    }
    for (int h = 0; h < 2; ++h) {
      __m512i px[4], p32[4];
      for (int t = 0; t < 4; ++t) {
        px[t] = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (sb * 8 + 4 * h + t) * kBlock)));
        p32[t] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, px[t]);
      }
      for (int p = 0; p < P; ++p) {
        const uint8_t* b0 = w + 2 * p * row_bytes + sb * 210;
        const uint8_t* b1 = b0 + row_bytes;
        const __m512i l0 = load_pair(b0 + 64 * h, b1 + 64 * h), l1 = load_pair(b0 + 64 * h + 32, b1 + 64 * h + 32);
        const __m512i hb = load_pair(b0 + 128 + 32 * h, b1 + 128 + 32 * h);
        __m512i q[4];
        q[0] = _mm512_or_si512(_mm512_and_si512(l0, m4), _mm512_slli_epi16(_mm512_and_si512(hb, m2), 4));
        q[1] = _mm512_or_si512(_mm512_and_si512(l1, m4),
                               _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 2), m2), 4));
        q[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l0, 4), m4),
                               _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4), m2), 4));
        q[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l1, 4), m4),
                               _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 6), m2), 4));
        for (int t = 0; t < 4; ++t) {
          const int j0 = 8 * h + 2 * t, j1 = j0 + 1;
          const __m512i pick = _mm512_setr_epi32(j0, j0, j0, j0, j1, j1, j1, j1, 16 + j0, 16 + j0, 16 + j0, 16 + j0,
                                                 16 + j1, 16 + j1, 16 + j1, 16 + j1);
          const __m512 scale = _mm512_mul_ps(_mm512_permutex2var_ps(rs[2 * p], pick, rs[2 * p + 1]),
                                             _mm512_set1_ps(dx[sb * 8 + 4 * h + t]));
          const __m512i sum = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[t], px[t]), p32[t]);
          acc[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[p]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    sums[2 * p] = hsum16_low(acc[p]);
    sums[2 * p + 1] = hsum16_high(acc[p]);
  }
}

// ---- AVX-512 VNNI, several rows of x at once (prefill) --------------------------------------------
// The kernels above take one row of x per call, so a prompt of M rows unpacks each weight block and
// gathers its scales M times. These take MX (2-4) rows of x against one group of 8 weight rows: a
// block's unpacked weights and its weight scales (picked per lane once) serve every row of x, each
// row adding only its dot products, a broadcast of its block scale and an FMA. `sums` is
// (MX, 8): row m of x against weight row j at sums[8 m + j]. x's rows are `k` (= 32 nb) apart.
template <int64_t Type, int MX>
LLQ_VNNI void dot_group_mx_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                   const float* dsx, int64_t nb, float* sums) {
  constexpr bool q8 = Type == kQ8_0;
  constexpr int64_t bytes = block_bytes_of(Type);
  constexpr int64_t qs_at = Type == kQ4_1 ? 4 : 2;
  constexpr int kUnits = q8 ? 4 : 2;  // registers per group of 8 rows: 4 pairs, or 2 quads (Q4)
  const int64_t k = nb * kBlock;
  const __m512i offsets = block_offsets(static_cast<int32_t>(row_bytes), static_cast<int32_t>(bytes));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i pick_pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
  const __m512i pick_quad = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  __m512 acc[kUnits][MX];
  __m512 off[4][MX];  // the offsets, in the gathers' layout (per pair of rows)
  for (int u = 0; u < kUnits; ++u)
    for (int m = 0; m < MX; ++m) acc[u][m] = _mm512_setzero_ps();
  for (int p = 0; p < 4; ++p)
    for (int m = 0; m < MX; ++m) off[p][m] = _mm512_setzero_ps();
  for (int64_t b0 = 0; b0 < nb; b0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, nb - b0));
    const __mmask8 m8 = static_cast<__mmask8>((1u << n) - 1);
    const __mmask16 m16 = static_cast<__mmask16>(m8 | (m8 << 8));
    __m512 dw[4];  // the weights' block scales of each pair of rows (not times x's)
    for (int p = 0; p < 4; ++p) {
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m16, offsets,
                                                    w + 2 * p * row_bytes + b0 * bytes, 1);
      dw[p] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
      const __m512 o = Type == kQ4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)))
                                     : _mm512_mul_ps(dw[p], _mm512_set1_ps(q8 ? -128.0f : -8.0f));
      for (int m = 0; m < MX; ++m) off[p][m] = _mm512_fmadd_ps(o, twice(dsx + m * nb + b0, m8), off[p][m]);
    }
    for (int i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      prefetch_ahead(w, row_bytes, 8, b * bytes * 8, bytes * 8);
      for (int u = 0; u < kUnits; ++u) {
        __m512 sw;  // each lane's weight scale for block b
        __m512i lo, hi;
        if constexpr (q8) {
          const uint8_t* r0 = w + 2 * u * row_bytes + b * bytes + 2;
          lo = _mm512_xor_si512(
              _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0))),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + row_bytes)), 1),
              flip);
          hi = lo;
          sw = _mm512_permutexvar_ps(_mm512_add_epi32(pick_pair, _mm512_set1_epi32(i)), dw[u]);
        } else {
          const uint8_t* r0 = w + 4 * u * row_bytes + b * bytes + qs_at;
          __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
          v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + row_bytes)), 1);
          v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 2 * row_bytes)), 2);
          v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 3 * row_bytes)), 3);
          lo = _mm512_and_si512(v, low4);
          hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          sw = _mm512_permutex2var_ps(dw[2 * u], _mm512_add_epi32(pick_quad, _mm512_set1_epi32(i)), dw[2 * u + 1]);
        }
        for (int m = 0; m < MX; ++m) {
          const int8_t* xb = qx + m * k + b * kBlock;
          __m512i s;
          if constexpr (q8) {
            s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_broadcast_i64x4(
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))));
          } else {
            s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_broadcast_i32x4(
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb))));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_broadcast_i32x4(
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16))));
          }
          acc[u][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sw, _mm512_set1_ps(dx[m * nb + b])),
                                      acc[u][m]);
        }
      }
    }
  }
  for (int m = 0; m < MX; ++m) {
    alignas(64) float a[16], o[16];
    float* out = sums + 8 * m;
    for (int j = 0; j < 8; ++j) out[j] = 0.0f;
    for (int p = 0; p < 4; ++p) {  // offsets: lanes 0-7 row 2p, 8-15 row 2p + 1
      _mm512_store_ps(o, off[p][m]);
      for (int l = 0; l < 8; ++l) {
        out[2 * p] += o[l];
        out[2 * p + 1] += o[8 + l];
      }
    }
    for (int u = 0; u < kUnits; ++u) {
      _mm512_store_ps(a, acc[u][m]);
      if constexpr (q8) {  // pair u: lanes 0-7 row 2u, 8-15 row 2u + 1
        for (int l = 0; l < 8; ++l) {
          out[2 * u] += a[l];
          out[2 * u + 1] += a[8 + l];
        }
      } else {  // quad u: lanes 4j..4j+3 row 4u + j
        for (int j = 0; j < 4; ++j) out[4 * u + j] += a[4 * j] + a[4 * j + 1] + a[4 * j + 2] + a[4 * j + 3];
      }
    }
  }
}

// ---- AVX-512 VNNI, 16 weight rows one per lane, against 1-8 rows of x (batched decode) ----------
// The kernels above put a block's 32 values of one or two weight rows side by side in a register,
// so each VPDPBUSD is followed by a conversion, a scaling and an FMA, and the lanes of a row are
// summed at the end: ~4-5 instructions per 64 multiply-adds. Here lane r of a register is weight
// row r of 16: register j holds bytes 4j..4j+3 of each row's 32 values (the layout of an AMX weight
// tile), built from the blocks where they lie by a 4 x 4 transpose of dwords (rows 4l + q's 16 bytes
// in lane l of register q; two rounds of unpacks leave dword t of row 4l + q at element 4l + q of
// register t) and, for Q4, a mask and a shift. Then a row of x adds its block by eight VPDPBUSD into
// one int32 accumulator (x's 4 bytes broadcast from memory), and the block is scaled once for all
// 16 rows: a conversion, a multiplication by d_x, an FMA with the 16 weight scales (one gather of the
// rows' first dword: d, and Q4_1's m beside it) and an FMA for the offsets: ~12 instructions per 512
// multiply-adds, the unpacking shared by every row of x. The lanes are the outputs: no sums at the end.
// Up to 4 rows of x, each row keeps two int32 accumulators (odd and even dwords), so that enough
// VPDPBUSD are independent to hide their latency.
template <int64_t Type, int MX>
LLQ_VNNI void dot_lanes_vnni512(const uint8_t* w, int64_t row_bytes, const int8_t* qx, const float* dx,
                                const float* dsx, int64_t nb, float* sums) {
  static_assert(Type == kQ4_0 || Type == kQ4_1 || Type == kQ8_0, "Q4_0, Q4_1 and Q8_0 only");
  constexpr bool q8 = Type == kQ8_0;
  constexpr int64_t bytes = block_bytes_of(Type);
  constexpr int64_t qs_at = Type == kQ4_1 ? 4 : 2;
  constexpr int kChains = MX <= 4 ? 2 : 1;
  const int64_t k = nb * kBlock;
  const __m512i starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // 16 bytes at `at` of rows 4l + q (l = 0..3) in the four lanes of register q, transposed to
  // d[t]: dword t of row r at element r.
  const auto transpose = [row_bytes](const uint8_t* at, __m512i* d) __attribute__((target(
                             "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))) {
    __m512i t[4];
    for (int q = 0; q < 4; ++q) {
      const uint8_t* p = at + q * row_bytes;
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * row_bytes)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * row_bytes)), 2);
      t[q] = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12 * row_bytes)), 3);
    }
    const __m512i a0 = _mm512_unpacklo_epi32(t[0], t[1]), a1 = _mm512_unpackhi_epi32(t[0], t[1]);
    const __m512i a2 = _mm512_unpacklo_epi32(t[2], t[3]), a3 = _mm512_unpackhi_epi32(t[2], t[3]);
    d[0] = _mm512_unpacklo_epi64(a0, a2);
    d[1] = _mm512_unpackhi_epi64(a0, a2);
    d[2] = _mm512_unpacklo_epi64(a1, a3);
    d[3] = _mm512_unpackhi_epi64(a1, a3);
  };
  __m512 acc[MX];
  for (int m = 0; m < MX; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    prefetch_ahead(w, row_bytes, 16, b * bytes * 16, bytes * 16);
    const __m512i g = _mm512_i32gather_epi32(starts, blk, 1);
    const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    const __m512 mw = Type == kQ4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)))
                                    : _mm512_mul_ps(dw, _mm512_set1_ps(q8 ? -128.0f : -8.0f));
    __m512i v[8];
    if constexpr (q8) {
      transpose(blk + qs_at, v);
      transpose(blk + qs_at + 16, v + 4);
      for (int j = 0; j < 8; ++j) v[j] = _mm512_xor_si512(v[j], flip);  // q + 128
    } else {
      transpose(blk + qs_at, v);
      for (int t = 0; t < 4; ++t) {
        v[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v[t], 4), low4);  // elements 16-31
        v[t] = _mm512_and_si512(v[t], low4);                            // elements 0-15
      }
    }
    __m512i s[MX][kChains];
    for (int m = 0; m < MX; ++m)
      for (int c = 0; c < kChains; ++c) s[m][c] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j)
      for (int m = 0; m < MX; ++m) {
        int32_t xj;
        std::memcpy(&xj, qx + m * k + b * kBlock + 4 * j, 4);
        s[m][j % kChains] = _mm512_dpbusd_epi32(s[m][j % kChains], v[j], _mm512_set1_epi32(xj));
      }
    for (int m = 0; m < MX; ++m) {
      const __m512i i = kChains == 2 ? _mm512_add_epi32(s[m][0], s[m][kChains - 1]) : s[m][0];
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_set1_ps(dx[m * nb + b]));
      acc[m] = _mm512_fmadd_ps(f, dw, acc[m]);
      acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsx[m * nb + b]), acc[m]);
    }
  }
  for (int m = 0; m < MX; ++m) _mm512_storeu_ps(sums + 16 * m, acc[m]);
}

// Rows of x from which the lane kernel is taken (below the AMX tiles' threshold); the variable
// LLAMALAB_LANES_MIN_ROWS moves it, for measuring.
int64_t lanes_min_rows() {
  static const int64_t rows = [] {
    const char* v = std::getenv("LLAMALAB_LANES_MIN_ROWS");
    return v != nullptr && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : int64_t{2};
  }();
  return rows;
}

using DotLanes = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const float*, int64_t, float*);
constexpr int64_t kLaneRows = 16;  // weight rows per lane kernel call
constexpr int64_t kLaneRowsOfX = 8;  // rows of x at most per call

template <int64_t Type>
DotLanes dot_lanes_for(int64_t mx) {
  switch (mx) {
    case 1: return &dot_lanes_vnni512<Type, 1>;
    case 2: return &dot_lanes_vnni512<Type, 2>;
    case 3: return &dot_lanes_vnni512<Type, 3>;
    case 4: return &dot_lanes_vnni512<Type, 4>;
    case 5: return &dot_lanes_vnni512<Type, 5>;
    case 6: return &dot_lanes_vnni512<Type, 6>;
    case 7: return &dot_lanes_vnni512<Type, 7>;
    default: return &dot_lanes_vnni512<Type, 8>;
  }
}

// The lane kernel for `type` and mx rows of x (nullptr: the type has none).
DotLanes dot_lanes_for(int64_t type, int64_t mx) {
  switch (type) {
    case kQ4_0: return dot_lanes_for<kQ4_0>(mx);
    case kQ4_1: return dot_lanes_for<kQ4_1>(mx);
    case kQ8_0: return dot_lanes_for<kQ8_0>(mx);
    default: return nullptr;
  }
}

// ---- AVX-512 VNNI, many rows of x (prefill, batched decode): panels ------------------------------
// A prompt of M rows reads each weight block M times. The kernels above unpack it (and gather and
// convert its scales) on every read; here a group of 8 weight rows, of any block type, is unpacked
// once into a panel that every row of x then reads from L1:
//   values: per block of 32, per pair of rows, 64 bytes (row 2u's 32 unsigned values, then 2u + 1's),
//   scales: per block, per pair, 16 floats: the int32 lanes' scales (lanes 0-3 elements 0-15 and 4-7
//           elements 16-31 of row 2u, then of row 2u + 1: Q6_K's scales per 16, the others' per 32),
//   mins:   per block, 8 floats: the offsets' factors of d_x sum(p) (Q4_1 / Q5_1 m, Q4_K -dmin m_j).
// A weight w = scale u + min (Q8_0: u = q + 128, min -128 d; Q4_0 / Q5_0: -8 d / -16 d; Q4_1 / Q5_1:
// m; Q4_K: -dmin m_j), the mins' terms one FMA per block for the 8 rows against d_x sum(p), as the
// kernels above do; Q6_K's bias 32 (its lanes' scales differ by half block) is subtracted in the
// int32 lanes instead, as 32 times x's lane sums (one more VPDPBUSD per block of x, shared by the
// group). One kernel for all types then takes 1-4 rows of x at a time against the panel: per block,
// pair of rows and row of x one VPDPBUSD, a conversion, a multiplication by x's scale and an FMA
// (Q6_K: and a subtraction), every operand in registers (16 accumulators, 4 panels of values and
// scales). Measured on the AVX-512 Xeon (1 thread, M = 128): ~30-35 GMAC/s for every type, as the
// direct Q4_0 / Q4_1 / Q8_0 kernels and ~2x theirs for Q5_0, Q4_K, Q6_K: the vector port, not memory,
// is the limit (4-5 instructions per 64 multiply-adds).
constexpr int64_t kPanelRows = 8;
constexpr int64_t kPanelMinRowsOfXAvx2 = 4;  // rows of x from which AVX2 takes panels

struct Panel {
  std::vector<uint8_t> values;  // (nb, 4, 64)
  std::vector<float> scales;    // (nb, 4, 16)
  std::vector<float> mins;      // (nb, 8)
  void resize(int64_t nb) {
    values.resize(static_cast<size_t>(nb * 256));
    scales.resize(static_cast<size_t>(nb * 64));
    mins.resize(static_cast<size_t>(nb * 8));
  }
};

// The bias subtracted in the int32 lanes: Q6_K's (its lanes' scales differ by half block); the other
// biased types (Q8_0 128, Q4_0 8, Q5_0 16) take -bias d as their blocks' min instead, one FMA per
// block for 8 rows, instead of one subtraction per block and pair of rows.
constexpr uint8_t panel_bias(int64_t type) { return type == kQ6_K ? 32 : 0; }
constexpr bool panel_mins(int64_t type) { return type != kQ6_K; }

// One weight row of nb blocks of 32 (the K-quants: nb / 8 super-blocks) unpacked block by block:
// put(b, the 32 unsigned values, the scale of elements 0-15, of 16-31, the min) with w = scale u +
// min. (AVX2 only: the panels of every path.)
template <class Put>
LLQ_AVX2 void unpack_blocks(int64_t type, const uint8_t* row, int64_t nb, const Put& put) {
  if (type == kQ4_K) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = row + sb * 144;
      const float d = half(blk), dmin = half(blk + 2);
      alignas(32) float sc[8], mn[8];
      __m256 scv, mnv;
      q4k_scales(blk + 4, scv, mnv);
      _mm256_store_ps(sc, scv);
      _mm256_store_ps(mn, mnv);
      for (int jp = 0; jp < 4; ++jp) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * jp));
        const int j = 2 * jp;
        put(sb * 8 + j, _mm256_and_si256(raw, m4), d * sc[j], d * sc[j], -dmin * mn[j]);
        put(sb * 8 + j + 1, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), d * sc[j + 1], d * sc[j + 1],
            -dmin * mn[j + 1]);
      }
    }
    return;
  }
  if (type == kQ6_K) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < nb / 8; ++sb) {
      const uint8_t* blk = row + sb * 210;
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      const float d = half(blk + 208);
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32));
        const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4)),
            _mm256_or_si256(_mm256_and_si256(l1, m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4))};
        for (int t = 0; t < 4; ++t)
          put(sb * 8 + 4 * h + t, q[t], d * sc[8 * h + 2 * t], d * sc[8 * h + 2 * t + 1], 0.0f);
      }
    }
    return;
  }
  const bool five = type == kQ5_0 || type == kQ5_1, with_min = type == kQ4_1 || type == kQ5_1;
  const int64_t bytes = block_bytes(type), qh_at = with_min ? 4 : 2, qs_at = qh_at + (five ? 4 : 0);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * bytes;
    const float d = half(blk);
    __m256i v;
    if (type == kQ8_0) {
      v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)),
                           _mm256_set1_epi8(static_cast<char>(0x80)));  // q + 128
    } else {
      v = nibbles(blk + qs_at);
      if (five) v = _mm256_or_si256(v, fifth_bits(blk + qh_at));
    }
    put(b, v, d, d, with_min ? half(blk + 2) : (type == kQ8_0 ? -128.0f : five ? -16.0f : -8.0f) * d);
  }
}

// Row r (0-7) of a panel, from one weight row.
LLQ_AVX2 void unpack_row(int64_t type, const uint8_t* row, int64_t nb, Panel& p, int r) {
  uint8_t* values = p.values.data() + (r >> 1) * 64 + (r & 1) * 32;  // block b at + 256 b
  float* scales = p.scales.data() + (r >> 1) * 16 + (r & 1) * 8;     // block b at + 64 b
  float* mins = p.mins.data() + r;                                    // block b at + 8 b
  // (Its own target attribute: a lambda does not take its caller's.)
  unpack_blocks(type, row, nb, [values, scales, mins](int64_t b, __m256i v, float s_lo, float s_hi, float m)
                                   __attribute__((target("avx2,fma,f16c"))) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + 256 * b), v);
    _mm256_storeu_ps(scales + 64 * b, _mm256_set_m128(_mm_set1_ps(s_hi), _mm_set1_ps(s_lo)));
    mins[8 * b] = m;
  });
}

// Rows `rows`..7 of a panel contribute nothing (a weight's last, partial group).
void clear_rows(Panel& p, int64_t nb, int64_t rows) {
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = rows; r < kPanelRows; ++r) {
      std::memset(p.values.data() + b * 256 + (r >> 1) * 64 + (r & 1) * 32, 0, 32);
      std::fill_n(p.scales.data() + b * 64 + (r >> 1) * 16 + (r & 1) * 8, 8, 0.0f);
      p.mins[static_cast<size_t>(b * 8 + r)] = 0.0f;
    }
}

// The 8 row sums of four pair accumulators (lanes 0-7 row 2u, 8-15 row 2u + 1), in row order.
LLQ_VNNI inline __m256 panel_sums(const __m512* a) {
  // Quarters [row 2u lanes 0-3 + 4-7 | ...]: rows 0-3 in x, rows 4-7 in y, 4 partial sums each.
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(a[0], a[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(a[2], a[3], _MM_SHUFFLE(3, 1, 3, 1)));
  // Per quarter q: [x0 + x1, x2 + x3, y0 + y1, y2 + y3], then element 0 row q's sum, element 2 row 4 + q's.
  __m512 s = _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, s));
}

// MX rows of x (`k` = 32 nb apart) against a panel: out[8 m + r] for row m of x and row r of the panel.
template <int MX, bool Bias, bool Mins>
LLQ_VNNI void panel_dot(const Panel& p, int64_t nb, uint8_t bias, const int8_t* qx, const float* dx,
                        const float* dsx, float* out) {
  const int64_t k = nb * kBlock;
  const __m512i biasv = _mm512_set1_epi8(static_cast<char>(bias));
  __m512 acc[MX][4];
  __m256 off[MX];
  for (int m = 0; m < MX; ++m) {
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    off[m] = _mm256_setzero_ps();
  }
  const uint8_t* values = p.values.data();
  const float* scales = p.scales.data();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i z[4];
    __m512 s[4];
    for (int u = 0; u < 4; ++u) {
      z[u] = _mm512_loadu_si512(values + 256 * b + 64 * u);
      s[u] = _mm512_loadu_ps(scales + 64 * b + 16 * u);
    }
    for (int m = 0; m < MX; ++m) {
      const __m512i xb =
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + m * k + b * kBlock)));
      const __m512 dm = _mm512_set1_ps(dx[m * nb + b]);
      __m512i bx = _mm512_setzero_si512();
      if constexpr (Bias) bx = _mm512_dpbusd_epi32(_mm512_setzero_si512(), biasv, xb);
      for (int u = 0; u < 4; ++u) {
        __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z[u], xb);
        if constexpr (Bias) i = _mm512_sub_epi32(i, bx);
        acc[m][u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s[u], dm), acc[m][u]);
      }
      if constexpr (Mins)
        off[m] = _mm256_fmadd_ps(_mm256_loadu_ps(p.mins.data() + 8 * b), _mm256_set1_ps(dsx[m * nb + b]), off[m]);
    }
  }
  for (int m = 0; m < MX; ++m) _mm256_storeu_ps(out + 8 * m, _mm256_add_ps(panel_sums(acc[m]), off[m]));
}

using PanelDot = void (*)(const Panel&, int64_t, uint8_t, const int8_t*, const float*, const float*, float*);

template <bool Bias, bool Mins>
PanelDot panel_dot_for(int64_t mx) {
  switch (mx) {
    case 1: return &panel_dot<1, Bias, Mins>;
    case 2: return &panel_dot<2, Bias, Mins>;
    case 3: return &panel_dot<3, Bias, Mins>;
    default: return &panel_dot<4, Bias, Mins>;
  }
}

PanelDot panel_dot_for(int64_t type, int64_t mx) {
  return panel_mins(type) ? panel_dot_for<false, true>(mx) : panel_dot_for<true, false>(mx);
}

// The same on AVX2, one row of x against the 8 rows of a panel (row r's block b: values at 256 b +
// 32 r, scales at 64 b + 8 r), 8 accumulators: per block and row VPMADDUBSW, VPMADDWD, a conversion,
// a multiplication by x's scale and an FMA, panel operands from L1. VPMADDUBSW's int16 pair sums
// hold these types' values (u <= 63: 2 x 63 x 127 < 32768); Q8_0 (u = q + 128) would saturate and
// keeps its direct kernel.
LLQ_AVX2 inline __m256 panel_sums_avx2(const __m256* a) {
  // Pairwise horizontal adds of 8 vectors down to one vector of their 8 sums.
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
  // q0: [r0 r1 r2 r3 | r0 r1 r2 r3] halves (low: lanes 0-3 of each row, high: 4-7); q1 likewise for r4-r7.
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

template <bool Bias, bool Mins>
LLQ_AVX2 void panel_dot_avx2(const Panel& p, int64_t nb, uint8_t bias, const int8_t* qx, const float* dx,
                             const float* dsx, float* out) {
  const __m256i ones = _mm256_set1_epi16(1), biasv = _mm256_set1_epi8(static_cast<char>(bias));
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  __m256 off = _mm256_setzero_ps();
  const uint8_t* values = p.values.data();
  const float* scales = p.scales.data();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + b * kBlock));
    const __m256 dm = _mm256_set1_ps(dx[b]);
    __m256i bx = _mm256_setzero_si256();
    if constexpr (Bias) bx = _mm256_madd_epi16(_mm256_maddubs_epi16(biasv, xb), ones);
    for (int r = 0; r < 8; ++r) {
      const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 256 * b + 32 * r));
      __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(z, xb), ones);
      if constexpr (Bias) i = _mm256_sub_epi32(i, bx);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(_mm256_loadu_ps(scales + 64 * b + 8 * r), dm),
                               acc[r]);
    }
    if constexpr (Mins) off = _mm256_fmadd_ps(_mm256_loadu_ps(p.mins.data() + 8 * b), _mm256_set1_ps(dsx[b]), off);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(panel_sums_avx2(acc), off));
}

PanelDot panel_dot_avx2_for(int64_t type) {
  return panel_mins(type) ? &panel_dot_avx2<false, true> : &panel_dot_avx2<true, false>;
}

// ---- AMX int8 tiles (Sapphire Rapids and later), many rows of x: prefill and batched decode -------
// One TDPBUSD multiplies a 16 x 64-byte tile by a 16 x 64-byte tile (16 x 16 x 64 multiply-adds, in
// ~16 cycles: ~30x what the VPDPBUSD panels above retire). The blocks' scales differ per block of
// 32, so each tile product is one block (K = 32): A is 16 weight rows' 32 values (row-major, from a
// panel of 16 rows, or for Q8_0 straight from the blocks, whose 32 int8 sit at a fixed stride), B
// x's block for 16 rows of x in VNNI order (dword j of x row m at row j, column m), built once per
// call. The 16 x 16 int32 result leaves the tile through memory and is scaled in fp32 per weight row
// (a vector over the 16 rows of x): one conversion, one multiplication by d_w d_x and one FMA, plus
// one FMA for the mins (d_x sum(p) times m, as the panels), ~4 instructions per 512 multiply-adds
// against ~5 per 64. Q8_0 is signed against signed (TDPBSSD: no offset at all); the others unsigned
// values against signed x (TDPBUSD). Q6_K, whose scales are per 16, keeps the VNNI panels.
//
// Tiles: 0-1 results (16 rows x 64 bytes), 2-3 weights (16 x 32), 4-5 x (8 x 64); two blocks in
// flight so the tile unit works on one while the vector unit scales the other. The tile state is
// configured at the start of each thread's share of the work and released at its end (the Linux
// kernel saves it on every switch while it is live; oneDNN, in the same threads, configures its own).
constexpr int64_t kAmxRows = 16;
constexpr int64_t kBf16Run = 4;     // groups of 32 weight rows at once on the bf16 tiles (see qmatmul)
constexpr int64_t kBf16Slice = 8;   // steps of 32 columns per slice of K there   // weight rows per tile, and rows of x per tile
constexpr int64_t kAmxSlice = 24;  // blocks of 32 per panel at most (see qmatmul)
// Rows of x from which the AMX tiles are taken over the lane kernels (Q4_0, Q4_1, Q8_0; measured
// with benchmarks/qmatmul_rows.py on SmolLM2's shapes, 2 threads: the lanes ahead at 8 and 16 rows,
// the tiles from 32); the variable LLAMALAB_AMX_MIN_ROWS moves it, for measuring. The types without
// lane kernels take the tiles over their panels from 16 rows, or 8 for calls of 1,024 weight rows
// and more (measured in SmolLM2's batched decode step: the panels' set-up spread over too few groups
// lost on the 576-row products).
int64_t amx_min_rows() {
  static const int64_t rows = [] {
    const char* v = std::getenv("LLAMALAB_AMX_MIN_ROWS");
    return v != nullptr && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : int64_t{32};
  }();
  return rows;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Cols: rows of x per tile, 16, or 8 for a batch of at most 8 (half the tile traffic, and two
// weight rows per vector when scaling).
LLQ_AMX void amx_configure(int cols) {
#if LLQ_HAVE_AMX
  TileConfig c;
  for (int t = 0; t < 2; ++t) c.rows[t] = 16, c.colsb[t] = static_cast<uint16_t>(4 * cols);
  for (int t = 2; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 32;
  for (int t = 4; t < 6; ++t) c.rows[t] = 8, c.colsb[t] = static_cast<uint16_t>(4 * cols);
  // (The intrinsics' asm tells the compiler neither that LDTILECFG reads all 64 bytes nor that
  // TILELOADD reads memory: a compiler barrier before each puts every store ahead of them.)
  asm volatile("" ::: "memory");
  _tile_loadconfig(&c);
#endif
}

LLQ_AMX void amx_release() {
#if LLQ_HAVE_AMX
  _tile_release();
#endif
}

// x's rows for the tiles: chunks of `cols` (8 or 16) rows, block b of chunk c at (c nb + b) 32 cols
// bytes, dword j of row m at byte 4 cols j + 4 m; d_x and the offsets' factor per (chunk, block) as
// 16 floats (rows past the last 0; 8 columns: the 8 twice, one for each of a vector's two weight rows).
struct AmxX {
  int64_t cols = 16;
  std::vector<int8_t> q;
  std::vector<float> d, ds;
};

void amx_prepare_x(const QuantizedX& qx, bool s16, int64_t m_rows, int64_t nb, AmxX& out) {
  const int64_t cols = m_rows <= 8 ? 8 : 16, chunks = (m_rows + cols - 1) / cols, k = nb * kBlock;
  out.cols = cols;
  out.q.assign(static_cast<size_t>(chunks * nb * 32 * cols), 0);
  out.d.assign(static_cast<size_t>(chunks * nb * 16), 0.0f);
  out.ds.assign(static_cast<size_t>(chunks * nb * 16), 0.0f);
  const float* ds = (s16 ? qx.ds : qx.dsum).data();
  for (int64_t m = 0; m < m_rows; ++m) {
    const int64_t c = m / cols, i = m % cols;
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* dst = out.q.data() + (c * nb + b) * 32 * cols + 4 * i;
      const int8_t* src = qx.q.data() + m * k + b * kBlock;
      for (int j = 0; j < 8; ++j) std::memcpy(dst + 4 * cols * j, src + 4 * j, 4);
      for (int64_t t = i; t < 16; t += cols) {
        out.d[static_cast<size_t>((c * nb + b) * 16 + t)] = qx.d[static_cast<size_t>(m * nb + b)];
        out.ds[static_cast<size_t>((c * nb + b) * 16 + t)] = ds[m * nb + b];
      }
    }
  }
}

// 16 weight rows (unpacked or in place) ready for the tiles: block b's values at a + b a_step, rows
// a_stride apart; its 16 scales and mins at 16 b.
struct AmxPanel {
  std::vector<uint8_t> values;  // (nb, 16, 32), where the weights are unpacked
  std::vector<float> scales, mins;  // (nb, 16)
  const uint8_t* a = nullptr;
  int64_t a_stride = 32, a_step = 512;
};

// A full group of 16 rows of Q4_0 / Q4_1 / Q5_0 / Q5_1 unpacked with 512-bit operations, 4 rows per
// register: the same block's 16 bytes of nibbles in rows 4g..4g+3 side by side, low and high nibbles
// split by one shift and two masks, each row's [low | high] put together by a two-source permute
// (Q5: the two rows' fifth bits as one 64-bit mask spread to 0x10 bytes), and the 16 rows' fp16
// d (and m) by one gather per block. ~3 instructions per row and block, against ~15 for unpack_blocks.
template <int64_t Type>
LLQ_AMX void amx_unpack_q4(const uint8_t* w, int64_t row_bytes, int64_t nb, AmxPanel& p, bool ahead) {
  constexpr bool five = Type == kQ5_0 || Type == kQ5_1, with_min = Type == kQ4_1 || Type == kQ5_1;
  constexpr int64_t bytes = block_bytes_of(Type), qh_at = with_min ? 4 : 2, qs_at = qh_at + (five ? 4 : 0);
  constexpr float bias = five ? -16.0f : -8.0f;
  const __m512i m4 = _mm512_set1_epi8(0x0F), x10 = _mm512_set1_epi8(0x10);
  const __m512i lo_hi_01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i lo_hi_23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    uint8_t* out = p.values.data() + 512 * b;
    for (int g = 0; g < 4; ++g) {
      const uint8_t* r0 = blk + 4 * g * row_bytes + qs_at;
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + row_bytes)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 2 * row_bytes)), 2);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 3 * row_bytes)), 3);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      __m512i a = _mm512_permutex2var_epi64(lo, lo_hi_01, hi);  // rows 4g, 4g + 1: [lo | hi] each
      __m512i c = _mm512_permutex2var_epi64(lo, lo_hi_23, hi);  // rows 4g + 2, 4g + 3
      if constexpr (five) {
        uint32_t h[4];
        for (int i = 0; i < 4; ++i) std::memcpy(&h[i], blk + (4 * g + i) * row_bytes + qh_at, 4);
        a = _mm512_or_si512(a, _mm512_and_si512(_mm512_movm_epi8(h[0] | (uint64_t{h[1]} << 32)), x10));
        c = _mm512_or_si512(c, _mm512_and_si512(_mm512_movm_epi8(h[2] | (uint64_t{h[3]} << 32)), x10));
      }
      _mm512_storeu_si512(out + 128 * g, a);
      _mm512_storeu_si512(out + 128 * g + 64, c);
    }
    // d (and m) of the 16 rows: scalar loads into a vector (a VPGATHERDD of them cost as much as the
    // rest of the unpacking)
    alignas(64) uint32_t heads[16];
    for (int r = 0; r < 16; ++r) std::memcpy(&heads[r], blk + r * row_bytes, 4);
    if (ahead)
      for (int r = 0; r < 16; ++r) _mm_prefetch(reinterpret_cast<const char*>(blk + (16 + r) * row_bytes), _MM_HINT_T0);
    const __m512i dm = _mm512_load_si512(heads);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
    _mm512_storeu_ps(p.scales.data() + 16 * b, d);
    _mm512_storeu_ps(p.mins.data() + 16 * b,
                     with_min ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)))
                              : _mm512_mul_ps(d, _mm512_set1_ps(bias)));
  }
}

// The group of `rows` (<= 16) weight rows at `w` into `p`. Q8_0 in full groups: in place, only its
// fp16 scales gathered (one gather per block for 16 rows); other types, and a last partial group,
// unpacked (rows past `rows` zero).
//
// With `ahead`, the same blocks of the next 16 rows are prefetched as each block is read, one
// prefetch per row and block, spread over the work: the next weights arrive while these are
// multiplied (a burst of prefetches of the whole next group at once stalled on the fill buffers).
LLQ_AMX void amx_panel(int64_t type, const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t nb, AmxPanel& p,
                       bool ahead) {
  p.scales.resize(static_cast<size_t>(nb * 16));
  p.mins.resize(static_cast<size_t>(nb * 16));  // (Q8_0: unused)
  if (type == kQ8_0) {
    for (int64_t b = 0; b < nb; ++b) {  // the 16 rows' fp16 d, rows past `rows` 0
      alignas(32) uint16_t d[16] = {};
      for (int64_t r = 0; r < rows; ++r) std::memcpy(&d[r], w + r * row_bytes + b * 34, 2);
      if (ahead)
        for (int64_t r = 0; r < kAmxRows; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + (kAmxRows + r) * row_bytes + b * 34), _MM_HINT_T0);
      _mm512_storeu_ps(p.scales.data() + 16 * b, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(d))));
    }
    if (rows == kAmxRows) {
      p.a = w + 2, p.a_stride = row_bytes, p.a_step = 34;
      return;
    }
    p.values.assign(static_cast<size_t>(nb * 512), 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < nb; ++b)
        std::memcpy(p.values.data() + 512 * b + 32 * r, w + r * row_bytes + b * 34 + 2, 32);
  } else if (rows == kAmxRows && (type == kQ4_0 || type == kQ4_1 || type == kQ5_0 || type == kQ5_1)) {
    p.values.resize(static_cast<size_t>(nb * 512));
    switch (type) {
      case kQ4_0: amx_unpack_q4<kQ4_0>(w, row_bytes, nb, p, ahead); break;
      case kQ4_1: amx_unpack_q4<kQ4_1>(w, row_bytes, nb, p, ahead); break;
      case kQ5_0: amx_unpack_q4<kQ5_0>(w, row_bytes, nb, p, ahead); break;
      default: amx_unpack_q4<kQ5_1>(w, row_bytes, nb, p, ahead); break;
    }
  } else {
    p.values.resize(static_cast<size_t>(nb * 512));
    if (rows < kAmxRows) {
      std::memset(p.values.data(), 0, p.values.size());
      std::fill(p.scales.begin(), p.scales.end(), 0.0f);
      std::fill(p.mins.begin(), p.mins.end(), 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* values = p.values.data() + 32 * r;
      float* scales = p.scales.data() + r;
      float* mins = p.mins.data() + r;
      unpack_blocks(type, w + r * row_bytes, nb,
                    [values, scales, mins](int64_t b, __m256i v, float s, float, float m)
                        __attribute__((target("avx2,fma,f16c"))) {
                      _mm256_storeu_si256(reinterpret_cast<__m256i*>(values + 512 * b), v);
                      scales[16 * b] = s;
                      mins[16 * b] = m;
                    });
    }
  }
  p.a = p.values.data(), p.a_stride = 32, p.a_step = 512;
}

// One block's 16 x cols int32 products (`c`: weight row r at cols r) scaled into the accumulators:
// 16 columns, one vector per weight row (lanes the rows of x); 8 columns, one per pair of weight
// rows (lanes 0-7 row 2u, 8-15 row 2u + 1), the pair's scales spread by a permute.
template <int Cols, bool Mins>
LLQ_AMX inline void amx_scale(const int32_t* c, const float* scales, const float* mins, __m512 dx, __m512 ds,
                              __m512* acc) {
  if constexpr (Cols == 16) {
    for (int r = 0; r < 16; ++r) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r));
      acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(dx, _mm512_set1_ps(scales[r])), acc[r]);
      if constexpr (Mins) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(mins[r]), ds, acc[r]);
    }
  } else {
    const __m512 s = _mm512_loadu_ps(scales);
    __m512 mn = _mm512_setzero_ps();
    if constexpr (Mins) mn = _mm512_loadu_ps(mins);
    for (int u = 0; u < 8; ++u) {
      const __m512i pick = _mm512_set_epi32(2 * u + 1, 2 * u + 1, 2 * u + 1, 2 * u + 1, 2 * u + 1, 2 * u + 1,
                                            2 * u + 1, 2 * u + 1, 2 * u, 2 * u, 2 * u, 2 * u, 2 * u, 2 * u, 2 * u, 2 * u);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * u));
      acc[u] = _mm512_fmadd_ps(v, _mm512_mul_ps(dx, _mm512_permutexvar_ps(pick, s)), acc[u]);
      if constexpr (Mins) acc[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick, mn), ds, acc[u]);
    }
  }
}

// A panel against one chunk of x (`Cols` rows): out[16 r + m] += for weight row r and row m of the
// chunk. Software-pipelined: a block's products are scaled kAmxLag blocks after its tile product
// was stored, so that the vector loads of what TILESTORED wrote need not wait for it.
constexpr int kAmxLag = 2;

// (Tile numbers are part of the instructions: a macro, not a parameter.)
#define LLQ_AMX_BLOCK(C, A, X)                                     \
  _tile_zero(C);                                                   \
  _tile_loadd(A, p.a + b * p.a_step, p.a_stride);                  \
  _tile_loadd(X, xq + b * 32 * Cols, 4 * Cols);                    \
  if constexpr (Signed) _tile_dpbssd(C, A, X);                     \
  else _tile_dpbusd(C, A, X);                                      \
  _tile_stored(C, c, 4 * Cols);

template <int Cols, bool Signed>
LLQ_AMX inline void amx_block(const AmxPanel& p, const int8_t* xq, int64_t b, int32_t* c) {
#if LLQ_HAVE_AMX
  if (b & 1) {
    LLQ_AMX_BLOCK(1, 3, 5)
  } else {
    LLQ_AMX_BLOCK(0, 2, 4)
  }
#endif
}
#undef LLQ_AMX_BLOCK

template <int Cols, bool Signed, bool Mins>
LLQ_AMX void amx_dot(const AmxPanel& p, const int8_t* xq, const float* xd, const float* xds, int64_t nb, float* out) {
  constexpr int kAcc = Cols == 16 ? 16 : 8;
  __m512 acc[kAcc];  // from `out` (the sums of the blocks before these), in its layout
  if constexpr (Cols == 16) {
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_loadu_ps(out + 16 * r);
  } else {
    for (int u = 0; u < 8; ++u)
      acc[u] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(out + 32 * u))),
                                                   _mm256_castps_pd(_mm256_loadu_ps(out + 32 * u + 16)), 1));
  }
  alignas(64) int32_t c[kAmxLag + 1][256];
  const float* sc = p.scales.data();
  const float* mn = p.mins.data();
  asm volatile("" ::: "memory");
  for (int64_t b = 0; b < nb + kAmxLag; ++b) {
    if (b < nb) amx_block<Cols, Signed>(p, xq, b, c[b % (kAmxLag + 1)]);
    const int64_t d = b - kAmxLag;
    if (d >= 0)
      amx_scale<Cols, Mins>(c[d % (kAmxLag + 1)], sc + 16 * d, mn + 16 * d, _mm512_loadu_ps(xd + 16 * d),
                            _mm512_loadu_ps(xds + 16 * d), acc);
  }
  if constexpr (Cols == 16) {
    for (int r = 0; r < 16; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
  } else {  // pair u: row 2u's 8 at 32 u, row 2u + 1's at 32 u + 16
    for (int u = 0; u < 8; ++u) {
      _mm256_storeu_ps(out + 32 * u, _mm512_castps512_ps256(acc[u]));
      _mm256_storeu_ps(out + 32 * u + 16, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[u]), 1)));
    }
  }
}

using AmxDot = void (*)(const AmxPanel&, const int8_t*, const float*, const float*, int64_t, float*);

AmxDot amx_dot_for(int64_t type, int64_t cols) {
  if (cols == 8) return type == kQ8_0 ? &amx_dot<8, true, false> : &amx_dot<8, false, true>;
  return type == kQ8_0 ? &amx_dot<16, true, false> : &amx_dot<16, false, true>;
}

// The tiles need the OS's consent (Linux 5.16+: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), once per
// process) besides the CPU's AMX-TILE and AMX-INT8 bits.
bool amx_usable() {
  static const bool ok = [] {
#if defined(__linux__) && LLQ_HAVE_AMX
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

// The bf16 tiles besides: AMX-BF16 (CPUID 7.0 EDX bit 22) and AVX512-BF16 for the conversions.
bool amx_bf16_usable() {
  static const bool ok = [] {
#if !LLQ_HAVE_AMX
    return false;
#endif
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!amx_usable() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u)) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return ok;
}

// ---- AMX bf16 tiles: prompts ------------------------------------------------------------------
// The int8 tiles above leave the tile unit after every block of 32 (each block has its own scales),
// so most of their time is the fp32 scaling, not the tile products. For a prompt (amx_bf16_min_tokens()
// tokens of one sequence, or amx_bf16_min_rows() rows of a 2-D x), the weights are instead dequantized
// once per group of 16 rows into bf16 (w = scale u +
// min in fp32, rounded to nearest even: the file's values to bf16's 8 bits), x is rounded to bf16
// once per call, and TDPBF16PS sums a 16 x 16 tile over the whole row in fp32 inside the tile: one
// store per 16 x 16 outputs. The weights' rounding costs ~2^-9 relative per weight, about what the
// int8 quantization of x costs the other paths (and x's bf16 rounding replaces that quantization).
// Tiles: 0-3 results (2 x 16 weight rows by 2 chunks of 16 rows of x), 4-5 weights (16 rows x 32
// bf16), 6-7 x (16 pairs of columns x 16 rows of x, bf16 pairs interleaved as TDPBF16PS reads them).
// From how many tokens of one sequence (x of shape (..., tokens, k): a prompt) the bf16 tiles are
// taken, and from how many rows of a 2-D x (rows of unrelated sequences: the head's last positions,
// decode rows). LLAMALAB_AMX_BF16_MIN_TOKENS / _MIN_ROWS move them, for measuring.
int64_t amx_bf16_min_tokens() {
  static const int64_t tokens = [] {
    // (benchmarks/qmatmul_rows.py --tokens --cold, SmolLM2's shapes, 2 threads, against the lane
    // kernels: converting the weights costs the tiles a fixed ~0.1 ms a layer, so they are 0.56-0.89x
    // at 16 tokens, 1.0-1.2x at 26, 1.4-1.9x at 64 and 1.8-2.5x at 200. A prompt of 16-25 tokens
    // loses a little alone and gains where it is batched, which would otherwise take the int8 tiles:
    // 8 chat prompts of ~23 tokens each were prefilled in 0.78x the time)
    const char* v = std::getenv("LLAMALAB_AMX_BF16_MIN_TOKENS");
    return v != nullptr && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : int64_t{16};
  }();
  return tokens;
}

int64_t amx_bf16_min_rows() {
  static const int64_t rows = [] {
    const char* v = std::getenv("LLAMALAB_AMX_BF16_MIN_ROWS");
    return v != nullptr && std::atoll(v) > 0 ? static_cast<int64_t>(std::atoll(v)) : int64_t{64};
  }();
  return rows;
}

LLQ_AMXBF16 void amx_configure_bf16() {
#if LLQ_HAVE_AMX
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  asm volatile("" ::: "memory");
  _tile_loadconfig(&c);
#endif
}

// x's rows in bf16 for the tiles: chunk c of 16 rows, step s of 32 columns at (c steps + s) 1024
// bytes; within a step, column pair j of row m at bf16 index 32 j + 2 m (rows past the last 0).
// A tile's 16 x 16 results (`block`: weight row r, row of x i at 16 r + i) into y's rows: row i of x
// gets the `hr` weight rows' outputs at y + i * ystride (plus `other`'s, at the same offsets, when
// given). Full tiles a row of x at a time by one gather of its column (reading the column a value
// at a time was ~20% of a 224-row product).
LLQ_VNNI void store_tile_rows(const float* block, int64_t mx, int64_t hr, float* y, const float* other,
                              int64_t ystride) {
  if (hr == 16) {
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(16));
    for (int64_t i = 0; i < mx; ++i) {
      __m512 v = _mm512_i32gather_ps(column, block + i, 4);
      if (other != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(other + i * ystride));
      _mm512_storeu_ps(y + i * ystride, v);
    }
    return;
  }
  for (int64_t i = 0; i < mx; ++i)
    for (int64_t r = 0; r < hr; ++r)
      y[i * ystride + r] = other != nullptr ? block[16 * r + i] + other[i * ystride + r] : block[16 * r + i];
}

// One row of x's `steps` blocks of 32 into its tiles' column (`dst`: its first pair): 32 floats
// rounded to nearest even by one conversion, and their 16 pairs scattered 64 bytes apart. (The
// same a value at a time, through c10::BFloat16, was ~15% of a 224-row product.)
LLQ_AMXBF16 void amx_bf16_x_row(const float* row, int64_t steps, c10::BFloat16* dst) {
#if LLQ_HAVE_AMX
  const __m512i apart = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  for (int64_t s = 0; s < steps; ++s) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 32 * s + 16), _mm512_loadu_ps(row + 32 * s));
    _mm512_i32scatter_epi32(dst + 512 * s, apart, reinterpret_cast<__m512i>(v), 4);
  }
#else
  (void)row, (void)steps, (void)dst;
#endif
}

// Returns where they start in `out` (64-byte aligned: a tile's rows are then whole cache lines).
c10::BFloat16* amx_bf16_x(const float* xf, int64_t m_rows, int64_t k, std::vector<c10::BFloat16>& out) {
  const int64_t chunks = (m_rows + 15) / 16, steps = k / 32;
  // (rounded up to an even count: the tiles take chunks in pairs, an odd last one with zeros)
  out.assign(static_cast<size_t>((chunks + 1) / 2 * 2 * steps * 512 + 32), c10::BFloat16(0.0f));
  c10::BFloat16* base =
      reinterpret_cast<c10::BFloat16*>((reinterpret_cast<uintptr_t>(out.data()) + 63) & ~static_cast<uintptr_t>(63));
  at::parallel_for(0, m_rows, std::max<int64_t>(1, 16384 / k), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t c = m / 16, i = m % 16;
      amx_bf16_x_row(xf + m * k, steps, base + c * steps * 512 + 2 * i);
    }
  });
  return base;
}

// The group's panel (int8 values in place or unpacked, scales, mins) as bf16 weights: step b (a
// block of 32) at 1024 b bytes, row r at + 64 r.
template <bool Signed>
LLQ_AMXBF16 void amx_bf16_weights(const AmxPanel& p, int64_t nb, c10::BFloat16* out) {
#if LLQ_HAVE_AMX
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < 16; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a + b * p.a_step + r * p.a_stride));
      const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
      const __m512i a = Signed ? _mm512_cvtepi8_epi32(lo) : _mm512_cvtepu8_epi32(lo);
      const __m512i c = Signed ? _mm512_cvtepi8_epi32(hi) : _mm512_cvtepu8_epi32(hi);
      const __m512 s = _mm512_set1_ps(p.scales[static_cast<size_t>(16 * b + r)]);
      const __m512 m = Signed ? _mm512_setzero_ps() : _mm512_set1_ps(p.mins[static_cast<size_t>(16 * b + r)]);
      const __m512 wa = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, m), wc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), s, m);
      _mm512_storeu_si512(out + b * 512 + 32 * r, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(wc, wa)));
    }
#endif
}

// Q4_0, Q4_1 and Q8_0 straight from their blocks into the bf16 panel, without the int8 panel between
// (which the other types still take): a row's block widened to 32 fp32 values, w = d u + m as above
// (Q4_0: u = q, m = -8 d; Q8_0: signed u, m = 0), rounded by one conversion. Rows past `rows` zero.
// Half of a 26-row prompt's product on the tiles was the two-pass dequantization.
template <int64_t Type>
LLQ_AMXBF16 void amx_bf16_weights_direct(const uint8_t* w, int64_t row_bytes, int64_t rows, int64_t nb,
                                         c10::BFloat16* out) {
#if LLQ_HAVE_AMX
  constexpr int64_t bytes = block_bytes_of(Type);
  const __m512i m4 = _mm512_set1_epi32(0x0F);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * bytes;
      // (the same block of the rows 16 further on: the next panel's, asked for while these are converted)
      _mm_prefetch(reinterpret_cast<const char*>(blk + kAmxRows * row_bytes), _MM_HINT_T0);
      uint16_t dh;
      std::memcpy(&dh, blk, 2);
      const float d = _cvtsh_ss(dh);
      __m512 lo, hi, m;
      if constexpr (Type == kQ8_0) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
        m = _mm512_setzero_ps();
      } else {
        const __m512i v =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (Type == kQ4_1 ? 4 : 2))));
        lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, m4));  // weights 0-15: the low nibbles
        hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));  // 16-31: the high ones
        if constexpr (Type == kQ4_1) {
          uint16_t mh;
          std::memcpy(&mh, blk + 2, 2);
          m = _mm512_set1_ps(_cvtsh_ss(mh));
        } else {
          m = _mm512_set1_ps(d * -8.0f);
        }
      }
      const __m512 sd = _mm512_set1_ps(d);
      const __m512 wa = _mm512_fmadd_ps(lo, sd, m), wc = _mm512_fmadd_ps(hi, sd, m);
      _mm512_storeu_si512(out + b * 512 + 32 * r, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(wc, wa)));
    }
  for (int64_t r = rows; r < kAmxRows; ++r)
    for (int64_t b = 0; b < nb; ++b) _mm512_storeu_si512(out + b * 512 + 32 * r, _mm512_setzero_si512());
#else
  (void)w, (void)row_bytes, (void)rows, (void)nb, (void)out;
#endif
}

// Two bf16 panels (weight rows 0-15 and 16-31 of a group of 32) against two chunks of x, nb steps
// (`resume`: added to the sums in `out`, for a row's K taken in slices): four independent sums
// (2 x 2 tiles), because one tile's sums each wait for the last product (TDPBF16PS's latency is several times its issue interval: measured, one accumulator per chunk
// ran the tile unit at a fifth of its rate). out[256 (2 i + j) + 16 r + m]: panel i, chunk j.
LLQ_AMXBF16 void amx_bf16_dot(const c10::BFloat16* w0, const c10::BFloat16* w1, const c10::BFloat16* x0,
                              const c10::BFloat16* x1, int64_t nb, float* out, bool resume) {
#if LLQ_HAVE_AMX
  asm volatile("" ::: "memory");
  if (resume) {  // the sums of the row's earlier steps, as stored (fp32, exact): the same sums as in one go
    _tile_loadd(0, out, 64);
    _tile_loadd(1, out + 256, 64);
    _tile_loadd(2, out + 512, 64);
    _tile_loadd(3, out + 768, 64);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(4, w0 + b * 512, 64);
    _tile_loadd(6, x0 + b * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, x1 + b * 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, w1 + b * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_stored(1, out + 256, 64);
  _tile_stored(2, out + 512, 64);
  _tile_stored(3, out + 768, 64);
#endif
}
#endif



struct Kernels {
  DotRows group = nullptr;  // `rows` rows at once
  int64_t rows = 1;
  DotRows pair = nullptr;   // 2 rows (nullptr: none)
  DotRows one = nullptr;    // 1 row
  DotRows group_x[kMaxRowsOfX + 1] = {};  // [mx]: a group against mx rows of x (sums (mx, rows)); none: per row
};

Kernels kernels_for(int64_t type, Isa isa) {
  Kernels k;
#ifdef LLQ_X86
  if (isa >= kAvx512Vnni) {  // (AMX: these below its rows-of-x threshold, and for Q6_K)
    switch (type) {
      case kQ4_0:
        return {&dot_quads_vnni512<kQ4_0, 2>, 8, &dot_pairs_vnni512<kQ4_0, 1>, &dot_q4_vnni<kQ4_0, 1>,
                {nullptr, nullptr, &dot_group_mx_vnni512<kQ4_0, 2>, &dot_group_mx_vnni512<kQ4_0, 3>,
                 &dot_group_mx_vnni512<kQ4_0, 4>}};
      case kQ4_1:
        return {&dot_quads_vnni512<kQ4_1, 2>, 8, &dot_pairs_vnni512<kQ4_1, 1>, &dot_q4_vnni<kQ4_1, 1>,
                {nullptr, nullptr, &dot_group_mx_vnni512<kQ4_1, 2>, &dot_group_mx_vnni512<kQ4_1, 3>,
                 &dot_group_mx_vnni512<kQ4_1, 4>}};
      case kQ8_0:
        return {&dot_pairs_vnni512<kQ8_0, 4>, 8, &dot_pairs_vnni512<kQ8_0, 1>, &dot_q8_vnni<1>,
                {nullptr, nullptr, &dot_group_mx_vnni512<kQ8_0, 2>, &dot_group_mx_vnni512<kQ8_0, 3>,
                 &dot_group_mx_vnni512<kQ8_0, 4>}};
      // Q5: the quad kernel; Q4_K, Q6_K: pairs.
      case kQ5_0: return {&dot_quads_vnni512<kQ5_0, 2>, 8, nullptr, &dot_q4_vnni<kQ5_0, 1>};
      case kQ5_1: return {&dot_quads_vnni512<kQ5_1, 2>, 8, nullptr, &dot_q4_vnni<kQ5_1, 1>};
      case kQ4_K: return {&dot_q4k_pairs_vnni512<4>, 8, &dot_q4k_pairs_vnni512<1>, &dot_q4k_vnni<1>};
      case kQ6_K: return {&dot_q6k_pairs_vnni512<4>, 8, &dot_q6k_pairs_vnni512<1>, &dot_q6k_vnni<1>};
      default: return k;
    }
  }
  if (isa == kAvx2) {
    switch (type) {
      case kQ4_0: return {&dot_q4_avx2<kQ4_0, kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q4_avx2<kQ4_0, 1>};
      case kQ4_1: return {&dot_q4_avx2<kQ4_1, kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q4_avx2<kQ4_1, 1>};
      case kQ8_0: return {&dot_q8_avx2<kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q8_avx2<1>};
      case kQ5_0: return {&dot_q4_avx2<kQ5_0, kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q4_avx2<kQ5_0, 1>};
      case kQ5_1: return {&dot_q4_avx2<kQ5_1, kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q4_avx2<kQ5_1, 1>};
      case kQ4_K: return {&dot_q4k_avx2<kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q4k_avx2<1>};
      case kQ6_K: return {&dot_q6k_avx2<kRowsAtOnce>, kRowsAtOnce, nullptr, &dot_q6k_avx2<1>};
      default: return k;
    }
  }
#else
  (void)type;
  (void)isa;
#endif
  return k;
}

struct Weight {
  const uint8_t* data;
  int64_t rows, row_bytes, col;  // col: where its outputs start in y's rows
  Kernels kernels;
  int64_t type;
  bool s16;
  bool panel = false;  // multiplied through panels (below)
  bool lanes = false;  // ... 16 rows at a time by the lane kernel (the last rows: `kernels`)
  bool amx = false;    // ... through AMX tiles
  bool bf16 = false;   // ... the bf16 ones (a prompt)  // offsets from the fp16 d * sum(q) (Q4_1, as llama.cpp), else from the exact one
};

at::Tensor qmatmul(const at::Tensor& x, at::TensorList weights, at::IntArrayRef types,
                   const std::optional<at::Tensor>& other, const std::optional<at::Tensor>& norm, double eps,
                   bool swiglu) {
  const Isa isa = current_isa();
  TORCH_CHECK(isa != kNone, "qmatmul: this CPU has neither AVX2+FMA+F16C nor AVX-512 VNNI");
  TORCH_CHECK(!weights.empty() && weights.size() == types.size(), "qmatmul: ", weights.size(), " weights and ",
              types.size(), " types");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "qmatmul: expected fp32 CPU input, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(!(swiglu && norm.has_value()), "qmatmul: swiglu and norm do not go together");
  int64_t k = -1, n = 0;
  std::vector<Weight> ws;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const int64_t bb = block_bytes(types[i]);
    TORCH_CHECK(bb > 0, "qmatmul: unsupported block type id ", types[i],
                " (expected Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14)");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.device().is_cpu() && w.is_contiguous(),
                "qmatmul: weight ", i, " must be a contiguous 2-D uint8 CPU tensor of blocks, got ", w.sizes(), " ",
                w.scalar_type());
    TORCH_CHECK(w.size(1) % bb == 0, "qmatmul: weight ", i, " rows of ", w.size(1), " bytes are not whole ",
                type_name(types[i]), " blocks of ", bb, " bytes");
    const int64_t wk = w.size(1) / bb * block_weights(types[i]);
    TORCH_CHECK(k < 0 || wk == k, "qmatmul: weights of ", k, " and ", wk, " columns in one call");
    k = wk;
    // Q4_1 / Q5_1 offsets from the fp16 d * sum(q) as llama.cpp's q8_1 activations have it; the others
    // (llama.cpp: q8_0 and q8_K activations, no such field) from the exact fp32 one.
    ws.push_back({w.data_ptr<uint8_t>(), w.size(0), w.size(1), n, kernels_for(types[i], isa), types[i],
                  types[i] == kQ4_1 || types[i] == kQ5_1});
    n += w.size(0);
  }
  const int64_t kx = swiglu ? 2 * k : k;
  TORCH_CHECK(x.size(-1) == kx, "qmatmul: input of ", x.size(-1), " features for weights of ", k, " columns",
              swiglu ? " (swiglu: twice the columns, gate then up)" : "");
  const at::Tensor x2 = x.reshape({-1, kx}).contiguous();
  const int64_t m_rows = x2.size(0), seq_rows = x.dim() >= 3 ? x.size(-2) : m_rows;
#ifdef LLQ_X86
  const int64_t bf16_from = x.dim() >= 3 ? amx_bf16_min_tokens() : amx_bf16_min_rows();
#endif
  at::Tensor nw;
  if (norm.has_value()) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == k && norm->device().is_cpu(),
                "qmatmul: `norm` must be a CPU vector of ", k, " weights, got ", norm->sizes());
    nw = norm->to(at::kFloat).contiguous();
  }
  at::Tensor o;
  if (other.has_value()) {
    TORCH_CHECK(other->numel() == m_rows * n, "qmatmul: `other` must have the output's ", m_rows * n, " elements");
    o = other->to(at::kFloat).reshape({m_rows, n}).contiguous();
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor y = at::empty({m_rows, n}, x2.options());
  if (m_rows == 0 || n == 0) return y.view(shape);
  // Scratch kept per thread from call to call: a decode step makes ~120 calls, each would otherwise
  // allocate and free these.
  // (The parallel region below reaches them through these references: a thread_local named inside
  // it would be each worker thread's own, empty, instance.)
  thread_local std::vector<float> xf_scratch;
  thread_local QuantizedX qx_scratch;
  thread_local std::vector<std::pair<int32_t, int64_t>> groups_scratch;
  std::vector<float>& xf = xf_scratch;
  QuantizedX& qx = qx_scratch;
  std::vector<std::pair<int32_t, int64_t>>& groups = groups_scratch;  // (weight, first row)
  prepare(x2.data_ptr<float>(), m_rows, k, nw.defined() ? nw.data_ptr<float>() : nullptr, eps, swiglu, isa >= kAvx2,
          xf);
  const int64_t nb = k / kBlock;
  // Groups of rows (each weight's kernel's group size, or a panel's) over all weights, split over the
  // threads.
  groups.clear();
  bool any_amx = false, any_bf16 = false;
  for (size_t i = 0; i < ws.size(); ++i) {
    Weight& w = ws[i];
#ifdef LLQ_X86
    // Q4_0, Q4_1 and Q8_0 on AVX-512: the lane kernels from 2 rows of x, the AMX tiles from
    // amx_min_rows(). The other types: the panels from 4 rows (AVX-512 and AVX2), the tiles from 16
    // (8 for calls of many weight rows). See amx_min_rows for the measurements.
    const bool has_lanes = dot_lanes_for(w.type, 1) != nullptr;
    w.amx = isa == kAmx && w.type != kQ6_K &&
            m_rows >= (has_lanes ? amx_min_rows() : n >= 1024 ? int64_t{8} : int64_t{16});
    w.lanes = !w.amx && isa >= kAvx512Vnni && m_rows >= lanes_min_rows() && has_lanes;
    w.panel = !w.amx && !w.lanes && (isa >= kAvx512Vnni ? m_rows >= (w.kernels.group_x[2] != nullptr ? 16 : 4)
                                            : isa == kAvx2 && w.type != kQ8_0 && m_rows >= kPanelMinRowsOfXAvx2);
    // The bf16 tiles by the tokens of one sequence (x's next-to-last dimension when it has three),
    // not by the rows of the call: their rounding differs from the int8 paths' (~2^-9 against
    // int8's), so a prompt prefilled in a batch of short prompts must take the path it takes alone
    // for its greedy answer to be the same (continuous batching promises it).
    w.bf16 = isa == kAmx && w.type != kQ6_K && seq_rows >= bf16_from && amx_bf16_usable();
    if (w.bf16) w.amx = true, w.lanes = false, w.panel = false;
    if (w.amx) any_amx = true;
    if (w.bf16) any_bf16 = true;
#endif
    for (int64_t r = 0; r < w.rows;
         r += w.bf16  ? 2 * kAmxRows
              : w.amx ? kAmxRows
              : w.panel ? kPanelRows
              : w.lanes && r + kLaneRows <= w.rows ? kLaneRows
                                                   : w.kernels.rows)
      groups.emplace_back(static_cast<int32_t>(i), r);
  }
  // x quantized to int8 for every path but the bf16 tiles (a prompt's products on them alone skip it)
  if (!std::all_of(ws.begin(), ws.end(), [](const Weight& w) { return w.bf16; }))
    quantize_x(xf.data(), m_rows, k, isa >= kAvx2, qx);
#ifdef LLQ_X86
  // x in the tiles' order, once per call (two variants of the offsets' factor: see Weight::s16)
  thread_local AmxX amx_x_scratch[2];
  AmxX* amx_x = amx_x_scratch;
  thread_local std::vector<c10::BFloat16> xb16_scratch;
  std::vector<c10::BFloat16>& xb16 = xb16_scratch;
  c10::BFloat16* xb16p = any_bf16 ? amx_bf16_x(xf.data(), m_rows, k, xb16) : nullptr;
  if (any_amx) {
    bool made[2] = {false, false};
    for (const Weight& w : ws)
      if (w.amx && !w.bf16 && !made[w.s16]) {
        amx_prepare_x(qx, w.s16, m_rows, nb, amx_x[w.s16]);
        made[w.s16] = true;
      }
  }
#endif
  float* yp = y.data_ptr<float>();
  const float* op = o.defined() ? o.data_ptr<float>() : nullptr;
  // ~16 KB of Q4 weights times rows of x per piece of work at the least: less is not worth a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (ws[0].kernels.rows * ws[0].row_bytes * m_rows));
  at::parallel_for(0, static_cast<int64_t>(groups.size()), grain, [&](int64_t g0, int64_t g1) {
    float sums[kMaxGroupRows];
#ifdef LLQ_X86
    int tiles = 0;  // configured in this thread: 1 int8, 2 bf16
#endif
    for (int64_t g = g0; g < g1; ++g) {
      const Weight& w = ws[groups[g].first];
#ifdef LLQ_X86
      if (w.bf16) {  // runs of 2 x 16 weight rows in bf16, then every 2 x 16 rows of x against them
        thread_local AmxPanel bpanel;  // each worker thread's own
        thread_local std::vector<c10::BFloat16> wb16;
        thread_local std::vector<float> sums16;
        if (tiles != 2) {
          amx_configure_bf16();
          tiles = 2;
        }
        // Up to kBf16Run of this thread's next groups of the same weight together, and K in slices
        // of at most kBf16Slice steps: each slice of a pair of x's chunks is then read from L2 once for
        // all the run's groups and stays in L1 meanwhile (a whole row of K = 1536 is 96 KB a pair).
        // (One pair of chunks, a short prompt: one group at a time, its 2 x nb KB staying in L1.)
        const int64_t chunks = (m_rows + 15) / 16;
        int64_t run = 1;
        while (chunks > 2 && run < kBf16Run && g + run < g1 && groups[g + run].first == groups[g].first) ++run;
        const int64_t wsize = 2 * nb * 512;
        // (64-byte aligned: each of a row's converted blocks is one whole cache line)
        wb16.resize(static_cast<size_t>(run * wsize + 32));
        c10::BFloat16* wbase = reinterpret_cast<c10::BFloat16*>((reinterpret_cast<uintptr_t>(wb16.data()) + 63) &
                                                                ~static_cast<uintptr_t>(63));
        sums16.resize(static_cast<size_t>(run * 1024));
        for (int64_t j = 0; j < run; ++j) {
          const int64_t r0 = groups[g + j].second, rows = std::min(2 * kAmxRows, w.rows - r0);
          for (int64_t h = 0; h < 2; ++h) {  // the two panels (the second all zero past the weight's end)
            c10::BFloat16* dst = wbase + j * wsize + h * nb * 512;
            const int64_t hr = std::min(kAmxRows, rows - h * kAmxRows);
            if (hr <= 0) {
              std::fill(dst, dst + nb * 512, c10::BFloat16(0.0f));
              continue;
            }
            const uint8_t* wr = w.data + (r0 + h * kAmxRows) * w.row_bytes;
            switch (w.type) {
              case kQ4_0: amx_bf16_weights_direct<kQ4_0>(wr, w.row_bytes, hr, nb, dst); break;
              case kQ4_1: amx_bf16_weights_direct<kQ4_1>(wr, w.row_bytes, hr, nb, dst); break;
              case kQ8_0: amx_bf16_weights_direct<kQ8_0>(wr, w.row_bytes, hr, nb, dst); break;
              default:
                amx_panel(w.type, wr, w.row_bytes, hr, nb, bpanel, r0 + h * kAmxRows + 2 * kAmxRows <= w.rows);
                amx_bf16_weights<false>(bpanel, nb, dst);
            }
          }
        }
        const int64_t slices = (nb + kBf16Slice - 1) / kBf16Slice, slice = (nb + slices - 1) / slices;
        for (int64_t c = 0; c < chunks; c += 2) {
          // (an odd last chunk against the zero rows after x's: see amx_bf16_x)
          const c10::BFloat16 *x0 = xb16p + c * nb * 512, *x1 = x0 + nb * 512;
          for (int64_t b0 = 0; b0 < nb; b0 += slice)
            for (int64_t j = 0; j < run; ++j) {
              const c10::BFloat16* wj = wbase + j * wsize + b0 * 512;
              amx_bf16_dot(wj, wj + nb * 512, x0 + b0 * 512, x1 + b0 * 512, std::min(slice, nb - b0),
                           sums16.data() + j * 1024, b0 > 0);
            }
          for (int64_t j = 0; j < run; ++j) {
            const int64_t r0 = groups[g + j].second, rows = std::min(2 * kAmxRows, w.rows - r0);
            for (int64_t hj = 0; hj < 4; ++hj) {
              const int64_t h = hj / 2, i = hj % 2;
              const int64_t mx = std::min<int64_t>(16, m_rows - (c + i) * 16);
              const int64_t hr = std::min(kAmxRows, rows - h * kAmxRows);
              if (mx <= 0 || hr <= 0) continue;
              const int64_t at = (c + i) * 16 * n + w.col + r0 + h * kAmxRows;
              store_tile_rows(sums16.data() + j * 1024 + 256 * hj, mx, hr, yp + at, op != nullptr ? op + at : nullptr,
                              n);
            }
          }
        }
        g += run - 1;
        continue;
      }
      if (w.amx) {  // 16 weight rows ready for the tiles, then every 16 rows of x against them
        thread_local AmxPanel apanel;  // each worker thread's own
        const AmxX& ax = amx_x[w.s16];
        const int64_t cols = ax.cols;
        if (tiles != 1) {
          amx_configure(static_cast<int>(cols));
          tiles = 1;
        }
        const int64_t r0 = groups[g].second, rows = std::min(kAmxRows, w.rows - r0);
        const AmxDot dot = amx_dot_for(w.type, cols);
        const int64_t chunks = (m_rows + cols - 1) / cols;
        thread_local std::vector<float> sums_scratch;
        std::vector<float>& acc = sums_scratch;
        acc.assign(static_cast<size_t>(chunks * 256), 0.0f);
        // A slice of blocks at a time (<= kAmxSlice, whole super-blocks), so that the slice's panel,
        // x's blocks and the weights read stay in L1: whole rows of K = 1536 did not.
        const int64_t slices = (nb + kAmxSlice - 1) / kAmxSlice;
        const int64_t slice = std::min(nb, ((nb + slices - 1) / slices + 7) / 8 * 8);
        for (int64_t b0 = 0; b0 < nb; b0 += slice) {
          const int64_t nbs = std::min(slice, nb - b0);
          const int64_t at = b0 * kBlock / block_weights(w.type) * block_bytes(w.type);
          // (the next group's same blocks asked for while these are unpacked: see amx_panel)
          amx_panel(w.type, w.data + r0 * w.row_bytes + at, w.row_bytes, rows, nbs, apanel,
                    r0 + 2 * kAmxRows <= w.rows);
          for (int64_t c = 0; c < chunks; ++c)
            dot(apanel, ax.q.data() + (c * nb + b0) * 32 * cols, ax.d.data() + (c * nb + b0) * 16,
                ax.ds.data() + (c * nb + b0) * 16, nbs, acc.data() + c * 256);
        }
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t mx = std::min(cols, m_rows - c * cols), at = c * cols * n + w.col + r0;
          store_tile_rows(acc.data() + c * 256, mx, rows, yp + at, op != nullptr ? op + at : nullptr, n);
        }
        continue;
      }
      if (w.lanes && w.rows - groups[g].second >= kLaneRows) {  // 16 rows, up to 8 rows of x at a time
        const int64_t r0 = groups[g].second;
        const uint8_t* wr = w.data + r0 * w.row_bytes;
        const float* ds = (w.s16 ? qx.ds : qx.dsum).data();
        for (int64_t m = 0; m < m_rows; m += kLaneRowsOfX) {
          const int64_t mx = std::min(kLaneRowsOfX, m_rows - m);
          alignas(64) float block[kLaneRowsOfX * kLaneRows];
          dot_lanes_for(w.type, mx)(wr, w.row_bytes, qx.q.data() + m * k, qx.d.data() + m * nb, ds + m * nb, nb,
                                    block);
          for (int64_t j = 0; j < mx; ++j) {
            float* ym = yp + (m + j) * n + w.col + r0;
            const float* om = op != nullptr ? op + (m + j) * n + w.col + r0 : nullptr;
            for (int64_t r = 0; r < kLaneRows; ++r)
              ym[r] = om != nullptr ? block[16 * j + r] + om[r] : block[16 * j + r];
          }
        }
        continue;
      }
      if (w.panel) {  // the group unpacked once into a panel, then every row of x against it
        thread_local Panel panel;  // each worker thread's own
        panel.resize(nb);
        const int64_t r0 = groups[g].second, rows = std::min(kPanelRows, w.rows - r0);
        for (int64_t r = 0; r < rows; ++r)
          unpack_row(w.type, w.data + (r0 + r) * w.row_bytes, nb, panel, static_cast<int>(r));
        if (rows < kPanelRows) clear_rows(panel, nb, rows);
        const uint8_t bias = panel_bias(w.type);
        const float* ds = (w.s16 ? qx.ds : qx.dsum).data();
        for (int64_t m = 0; m < m_rows; m += isa == kAvx2 ? 1 : kMaxRowsOfX) {
          const int64_t mx = isa == kAvx2 ? 1 : std::min(kMaxRowsOfX, m_rows - m);
          float block[kMaxRowsOfX * kPanelRows];
          (isa == kAvx2 ? panel_dot_avx2_for(w.type) : panel_dot_for(w.type, mx))(
              panel, nb, bias, qx.q.data() + m * k, qx.d.data() + m * nb, ds + m * nb, block);
          for (int64_t j = 0; j < mx; ++j) {
            float* ym = yp + (m + j) * n + w.col + r0;
            const float* om = op != nullptr ? op + (m + j) * n + w.col + r0 : nullptr;
            for (int64_t r = 0; r < rows; ++r) ym[r] = om != nullptr ? block[8 * j + r] + om[r] : block[8 * j + r];
          }
        }
        continue;
      }
#endif
      const int64_t r0 = groups[g].second, rows = std::min(w.kernels.rows, w.rows - r0);
      const uint8_t* wr = w.data + r0 * w.row_bytes;
      for (int64_t m = 0; m < m_rows;) {
        const int8_t* q = qx.q.data() + m * k;
        const float* d = qx.d.data() + m * nb;
        const float* ds = (w.s16 ? qx.ds : qx.dsum).data() + m * nb;
        const int64_t mx = std::min(kMaxRowsOfX, m_rows - m);
        if (rows == w.kernels.rows && mx > 1 && w.kernels.group_x[mx] != nullptr) {  // prefill: mx rows at once
          float block[kMaxRowsOfX * kMaxGroupRows];
          w.kernels.group_x[mx](wr, w.row_bytes, q, d, ds, nb, block);
          for (int64_t j = 0; j < mx; ++j) {
            float* ym = yp + (m + j) * n + w.col + r0;
            const float* om = op != nullptr ? op + (m + j) * n + w.col + r0 : nullptr;
            for (int64_t r = 0; r < rows; ++r) ym[r] = om != nullptr ? block[8 * j + r] + om[r] : block[8 * j + r];
          }
          m += mx;
          continue;
        }
        if (rows == w.kernels.rows) {
          w.kernels.group(wr, w.row_bytes, q, d, ds, nb, sums);
        } else {  // the weight's last rows: pairs, then one
          int64_t r = 0;
          for (; w.kernels.pair != nullptr && r + 2 <= rows; r += 2)
            w.kernels.pair(wr + r * w.row_bytes, w.row_bytes, q, d, ds, nb, sums + r);
          for (; r < rows; ++r) w.kernels.one(wr + r * w.row_bytes, w.row_bytes, q, d, ds, nb, sums + r);
        }
        float* ym = yp + m * n + w.col + r0;
        const float* om = op != nullptr ? op + m * n + w.col + r0 : nullptr;
        for (int64_t r = 0; r < rows; ++r) ym[r] = om != nullptr ? sums[r] + om[r] : sums[r];
        ++m;
      }
    }
#ifdef LLQ_X86
    if (tiles) amx_release();
#endif
  });
  return y.view(shape);
}

// Blocks -> floats (fp32, or bf16 rounded to nearest even), rows split over the threads: a quantized
// file dequantized at load (`--dtype float32|bfloat16`) in a fraction of the time torch's elementwise
// ops or gguf-py's numpy take. Plain scalar code, which the compiler vectorises.
at::Tensor dequantize(const at::Tensor& blocks, int64_t type, bool bf16) {
  const int64_t bb = type == kQ4_0 || type == kQ4_1 || type == kQ8_0 ? block_bytes(type) : 0;
  TORCH_CHECK(bb > 0, "dequantize: unsupported block type id ", type, " (expected Q4_0 = 2, Q4_1 = 3, Q8_0 = 8)");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.size(1) % bb == 0,
              "dequantize: expected contiguous uint8 (rows, whole ", type_name(type), " blocks), got ", blocks.sizes());
  const int64_t rows = blocks.size(0), nb = blocks.size(1) / bb, k = nb * kBlock;
  at::Tensor out = at::empty({rows, k}, blocks.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = src + r * blocks.size(1) + b * bb;
        uint16_t h;
        std::memcpy(&h, blk, 2);
        const float d = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
        float* o = row.data() + b * kBlock;
        if (type == kQ8_0) {
          for (int64_t i = 0; i < kBlock; ++i) o[i] = d * static_cast<float>(static_cast<int8_t>(blk[2 + i]));
        } else {
          float m = -8.0f * d;
          const uint8_t* qs = blk + 2;
          if (type == kQ4_1) {
            std::memcpy(&h, blk + 2, 2);
            m = static_cast<float>(c10::Half(h, c10::Half::from_bits()));
            qs = blk + 4;
          }
          // Q4_0's d (q - 8) as d q - 8 d: the same fp32 value (each term and the result fit fp32's
          // mantissa: an fp16 d times a 4-bit q), so equal to gguf-py's bit for bit.
          for (int64_t i = 0; i < 16; ++i) {
            o[i] = d * static_cast<float>(qs[i] & 0x0F) + m;
            o[16 + i] = d * static_cast<float>(qs[i] >> 4) + m;
          }
        }
      }
      if (bf16) {
        c10::BFloat16* o = out.data_ptr<c10::BFloat16>() + r * k;
        for (int64_t c = 0; c < k; ++c) o[c] = c10::BFloat16(row[c]);
      } else {
        std::memcpy(out.data_ptr<float>() + r * k, row.data(), static_cast<size_t>(k) * sizeof(float));
      }
    }
  });
  return out;
}

// x quantized as the kernel quantizes it (int8 values, block scales d, d * sum(values)), for tests.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) % kBlock == 0,
              "quantize_activations: expected a 2-D fp32 tensor of whole blocks of 32 columns");
  const at::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1);
  QuantizedX qx;
  quantize_x(xc.data_ptr<float>(), m_rows, k, current_isa() >= kAvx2, qx);
  at::Tensor q = at::empty({m_rows, k}, xc.options().dtype(at::kChar));
  at::Tensor d = at::empty({m_rows, k / kBlock}, xc.options());
  at::Tensor ds = at::empty({m_rows, k / kBlock}, xc.options());
  std::memcpy(q.data_ptr(), qx.q.data(), qx.q.size());
  std::memcpy(d.data_ptr(), qx.d.data(), qx.d.size() * sizeof(float));
  std::memcpy(ds.data_ptr(), qx.ds.data(), qx.ds.size() * sizeof(float));
  return {q, d, ds};  // dsum is d * q.sum(-1), computable from the first two
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (int i = kAvx2; i <= cpu_best(); ++i) out.emplace_back(kIsaNames[i]);
  return out;
}

std::string get_isa() { return kIsaNames[current_isa()]; }

std::string set_isa(const std::string& name) {
  const std::string previous = get_isa();
  if (name == "auto") {
    g_isa.store(cpu_best());
    return previous;
  }
  for (int i = kAvx2; i <= kAmx; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= cpu_best(), "qmatmul: the ", name, " path needs instructions this CPU lacks (its best is ",
                  kIsaNames[cpu_best()], ")");
      g_isa.store(i);
      return previous;
    }
  }
  TORCH_CHECK(false, "qmatmul: unknown path '", name, "': expected auto, avx2, avx512vnni or amx");
}

}  // namespace

// The prompt length (tokens of one sequence) from which the current path takes the bf16 tiles; 0
// where it never does (no AMX-BF16, or another path forced). For the batcher, which keeps a shorter
// prompt from being padded to it (see amx_bf16_min_tokens).
int64_t bf16_min_tokens() {
#ifdef LLQ_X86
  return current_isa() == kAmx && amx_bf16_usable() ? amx_bf16_min_tokens() : 0;
#else
  return 0;
#endif
}

TORCH_LIBRARY(llamalab_quant, m) {
  m.def("isas() -> str[]", &isas);
  m.def("bf16_min_tokens() -> int", &bf16_min_tokens);
  m.def("isa() -> str", &get_isa);
  m.def("set_isa(str name) -> str", &set_isa);
  m.def("quantize_activations(Tensor x) -> Tensor[]", &quantize_activations);
  m.def("dequantize(Tensor blocks, int type, bool bf16=False) -> Tensor");  // CPU below; shape rule in kernels.py
  m.def("qmatmul(Tensor x, Tensor[] weights, int[] types, Tensor? other=None, Tensor? norm=None, "
        "float eps=1e-5, bool swiglu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab_quant, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("dequantize", &dequantize);
}
