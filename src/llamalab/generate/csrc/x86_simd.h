// Helpers shared by the kernels (generate/csrc: gemv.cpp, attention.cpp; quant/csrc/qmatmul.cpp). Each function is compiled for
// its instruction set with a `target` attribute, so one build holds every path and the caller
// picks one at run time by what the CPU reports.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLAMALAB_X86 1
#define LLAMALAB_AVX2 __attribute__((target("avx2,fma")))
#define LLAMALAB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define LLAMALAB_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace llamalab_simd {

// The sum of a register's 8 fp32 lanes.
LLAMALAB_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (scores minus their maximum), 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by
// its Taylor polynomial to degree 7 (relative error < 2e-8 there), 2^n put into the exponent
// bits. Below -87 the result is flushed to 0 (e^-87 ~ 1.6e-38, under fp32's normal range).
LLAMALAB_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that n * ln2 is subtracted without losing r's low bits
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

// silu(x) = x / (1 + e^-x), 8 lanes, from e^-|x| (in exp_avx2's domain): x / (1 + e) for x >= 0,
// x e / (1 + e) below.
LLAMALAB_AVX2 inline __m256 silu_avx2(__m256 x) {
  const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)));
  const __m256 num = _mm256_blendv_ps(_mm256_set1_ps(1.0f), e, x);  // (sign bit set: x < 0)
  return _mm256_mul_ps(x, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

}  // namespace llamalab_simd
#endif
