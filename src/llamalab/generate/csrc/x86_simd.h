// Helpers shared by the decode kernels (gemv.cpp, attention.cpp). Each function is compiled for
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

}  // namespace llamalab_simd
#endif
