// bf16 matrix-vector products for batch-1 decoding on CPUs with AVX512-BF16.
//
// Decoding one token reads every weight once, so its speed is the rate at which the weights
// stream from memory. oneDNN's bf16 kernels reach ~22-37 GB/s on the model's small matrices
// (576 x 576 ... 3072 x 576) on the 2-core reference CPU, where a plain read reaches ~47 GB/s:
// per-call set-up and a layout made for matrix-matrix products. This kernel reads one packed
// copy of the weight front to back per thread, with one VDPBF16PS per 64 bytes.
//
// Packed layout ("pairs of columns, 16 rows at a time"), (ceil(N/16), ceil(K/2), 16, 2):
//   packed[b][p][r][j] = W[16 b + r][2 p + j]   (zero where out of range)
// so one 64-byte load holds two columns of 16 output rows, exactly the operand of
// _mm512_dpbf16_ps, whose other operand is the pair (x[2p], x[2p+1]) broadcast. Each 16-row
// block ends in one 16-lane fp32 accumulator: no horizontal sums.
//
// Products of two bf16 values are exact in fp32 and accumulate in fp32, as in oneDNN; the
// residual (`other`) is added in fp32 and the sum rounded once to bf16 (round to nearest even),
// or, with float_out, stored in fp32 (the output head: logits one bf16 step apart at ~25 would
// tie, and greedy decoding would pick by index).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLAMALAB_X86 1
#endif

namespace {

constexpr int64_t kRows = 16;         // output rows per block: one zmm of fp32
constexpr int64_t kPrefetchPairs = 64;  // prefetch 64 pairs (4 KiB) ahead of the loads
constexpr int64_t kMaxRowsOfX = 4;    // rows of x sharing one pass over a block

bool cpu_supported() {
#ifdef LLAMALAB_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

#ifdef LLAMALAB_X86
// One 16-row block against `m` (<= 4) rows of x: acc[i] = W[block] x[i] in fp32.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void block_dot(
    const uint32_t* w, const uint32_t* const* xs, int64_t m, int64_t pairs, __m512* acc) {
  if (m == 1) {
    // Four independent accumulators hide VDPBF16PS's latency; one stream of loads.
    const uint32_t* x = xs[0];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + 4 <= pairs; p += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (p + kPrefetchPairs) * kRows), _MM_HINT_T0);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + p * kRows),
                            (__m512bh)_mm512_set1_epi32(x[p]));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + (p + 1) * kRows),
                            (__m512bh)_mm512_set1_epi32(x[p + 1]));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + (p + 2) * kRows),
                            (__m512bh)_mm512_set1_epi32(x[p + 2]));
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + (p + 3) * kRows),
                            (__m512bh)_mm512_set1_epi32(x[p + 3]));
    }
    for (; p < pairs; ++p)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + p * kRows),
                            (__m512bh)_mm512_set1_epi32(x[p]));
    acc[0] = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    return;
  }
  // Several rows of x: each 64-byte load of weights serves all of them.
  __m512 a[kMaxRowsOfX];
  for (int64_t i = 0; i < kMaxRowsOfX; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + kPrefetchPairs) * kRows), _MM_HINT_T0);
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + p * kRows);
    for (int64_t i = 0; i < m; ++i)
      a[i] = _mm512_dpbf16_ps(a[i], wv, (__m512bh)_mm512_set1_epi32(xs[i][p]));
  }
  for (int64_t i = 0; i < m; ++i) acc[i] = a[i];
}

// Rows [n0, n0 + nn) of one output row: y = acc (+ other), rounded to bf16 or stored as fp32.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void store_rows(
    __m512 acc, const at::BFloat16* other, void* y, bool float_out, int64_t nn) {
  const __mmask16 mask = nn >= kRows ? __mmask16(0xFFFF) : __mmask16((1u << nn) - 1);
  if (other != nullptr) {
    const __m256i o = _mm256_maskz_loadu_epi16(mask, other);
    // bf16 -> fp32 is a 16-bit left shift of the bits.
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(o), 16)));
  }
  if (float_out)
    _mm512_mask_storeu_ps(y, mask, acc);
  else
    _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(acc));
}

// Output rows of blocks [b0, b1), every row of x. One function with the target attribute, so
// that no AVX-512 value crosses a call from code compiled without it (a different ABI).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv_blocks(
    const at::BFloat16* packed, const at::BFloat16* x, const at::BFloat16* other, void* y, bool float_out,
    int64_t m_rows, int64_t n, int64_t pairs, int64_t ldx, int64_t b0, int64_t b1) {
  const int64_t y_size = float_out ? 4 : 2;
  __m512 acc[kMaxRowsOfX];
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(packed) + b * pairs * kRows;
    const int64_t n0 = b * kRows, nn = std::min(kRows, n - n0);
    for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxRowsOfX) {
      const int64_t mm = std::min(kMaxRowsOfX, m_rows - m0);
      const uint32_t* xs[kMaxRowsOfX];
      for (int64_t i = 0; i < mm; ++i) xs[i] = reinterpret_cast<const uint32_t*>(x + (m0 + i) * ldx);
      block_dot(w, xs, mm, pairs, acc);
      for (int64_t i = 0; i < mm; ++i)
        store_rows(acc[i], other ? other + (m0 + i) * n + n0 : nullptr,
                   static_cast<char*>(y) + ((m0 + i) * n + n0) * y_size, float_out, nn);
    }
  }
}

void gemv_kernel(const at::BFloat16* packed, const at::BFloat16* x, const at::BFloat16* other,
                 void* y, bool float_out, int64_t m_rows, int64_t n, int64_t pairs, int64_t ldx) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  // 8 blocks (~74 KB of weights at K = 576) is the least worth a thread of its own.
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    gemv_blocks(packed, x, other, y, float_out, m_rows, n, pairs, ldx, b0, b1);
  });
}
#endif

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "gemv_bf16_pack: expected a 2-D bf16 CPU weight, got ", weight.sizes(), " ",
              weight.scalar_type(), " on ", weight.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t blocks = (n + kRows - 1) / kRows, pairs = (k + 1) / 2;
  at::Tensor padded = at::zeros({blocks * kRows, pairs * 2}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return padded.view({blocks, kRows, pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                const std::optional<at::Tensor>& other, bool float_out) {
#ifdef LLAMALAB_X86
  TORCH_CHECK(cpu_supported(), "gemv_bf16: this CPU lacks AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.dim() >= 1,
              "gemv_bf16: expected bf16 CPU input, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "gemv_bf16: the weight is not one that gemv_bf16_pack returned");
  const int64_t k = x.size(-1), pairs = packed.size(1);
  TORCH_CHECK((k + 1) / 2 == pairs && n > 0 && n <= packed.size(0) * kRows && n > (packed.size(0) - 1) * kRows,
              "gemv_bf16: input of ", k, " features and ", n, " outputs do not match the packed weight ",
              packed.sizes());
  at::Tensor x2 = x.reshape({-1, k});
  const int64_t m_rows = x2.size(0);
  if (k % 2 != 0) {  // the last pair reads one column past the end: give it a zero
    at::Tensor padded = at::zeros({m_rows, k + 1}, x2.options());
    padded.narrow(1, 0, k).copy_(x2);
    x2 = padded;
  } else {
    x2 = x2.contiguous();
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor o;
  if (other.has_value()) {
    TORCH_CHECK(other->scalar_type() == at::kBFloat16 && other->numel() == m_rows * n,
                "gemv_bf16: `other` must be bf16 with the output's ", m_rows * n, " elements");
    o = other->reshape({m_rows, n}).contiguous();
  }
  at::Tensor y = at::empty({m_rows, n}, x2.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  if (m_rows > 0)
    gemv_kernel(packed.data_ptr<at::BFloat16>(), x2.data_ptr<at::BFloat16>(),
                o.defined() ? o.data_ptr<at::BFloat16>() : nullptr, y.data_ptr(), float_out, m_rows, n,
                pairs, x2.size(1));
  return y.view(shape);
#else
  TORCH_CHECK(false, "gemv_bf16: built for x86-64 only");
#endif
}

bool supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY(llamalab, m) {
  m.def("gemv_bf16_supported() -> bool", &supported);
  m.def("gemv_bf16_pack(Tensor weight) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor packed, int n, Tensor? other=None, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) {
  m.impl("gemv_bf16_pack", &pack);
  m.impl("gemv_bf16", &gemv);
}
