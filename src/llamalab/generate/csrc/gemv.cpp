// Matrix-vector products for decoding on x86-64 CPUs with AVX-512: bf16 (AVX512-BF16) and fp32.
//
// Decoding one token reads every weight once, so its speed is the rate at which the weights
// stream from memory. On the 2-core reference CPU oneDNN's kernels read the model's small
// matrices (576 x 576 ... 3072 x 576) at ~22-38 GB/s where a plain read reaches ~47 GB/s: a
// fixed set-up per call, and blocked layouts made for matrix-matrix products. This kernel reads
// the weight as it is, row-major (N, K), no copy: each thread takes a range of rows and walks
// 8 rows at a time across the columns, one 64-byte load per row and step, so its reads form
// one contiguous region in 8 interleaved streams, which the hardware prefetchers follow.
//
// Per step of 64 bytes: bf16 VDPBF16PS (32 products, summed in pairs into 16 fp32 lanes; the
// products of two bf16 values are exact in fp32), fp32 one FMA (16 lanes). Each row ends in one
// register of partial sums, added across lanes once. The residual (`other`) is added in fp32
// and the sum rounded once to the output dtype (bf16: round to nearest even, as oneDNN's
// post-op), or with float_out stored in fp32 (the output head: bf16 logits 0.125 apart at ~25
// would tie, and greedy decoding would pick by index).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLAMALAB_X86 1
#define LLAMALAB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

namespace {

constexpr int64_t kRowsAtOnce = 8;  // rows of W walked together: 8 accumulators, 8 load streams
constexpr int64_t kMaxRowsOfX = 4;  // rows of x (sequences of a batched step) the op accepts

bool cpu_supports(bool bf16) {
#ifdef LLAMALAB_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 && (!bf16 || __builtin_cpu_supports("avx512bf16"));
#else
  (void)bf16;
  return false;
#endif
}

#ifdef LLAMALAB_X86
// acc += w[k : k + 64 bytes] . x[k : ...]; `mask` selects the elements of a last partial step.
template <bool kBF16>
LLAMALAB_TARGET inline __m512 step(__m512 acc, const void* w, __m512i xv, __mmask32 mask, bool partial) {
  if constexpr (kBF16) {
    const __m512i wv = partial ? _mm512_maskz_loadu_epi16(mask, w) : _mm512_loadu_si512(w);
    return _mm512_dpbf16_ps(acc, (__m512bh)wv, (__m512bh)xv);
  } else {
    const __m512 wv = partial ? _mm512_maskz_loadu_ps(__mmask16(mask), w) : _mm512_loadu_ps(w);
    return _mm512_fmadd_ps(wv, _mm512_castsi512_ps(xv), acc);
  }
}

// sums[r] = W[row0 + r, :] . x for r < R: R rows walked together across the columns.
template <bool kBF16, int R>
LLAMALAB_TARGET void dot_rows(const char* w, const char* x, int64_t k, float* sums) {
  constexpr int64_t kElem = kBF16 ? 2 : 4, kPerStep = 64 / kElem;
  const int64_t row_bytes = k * kElem, full = k / kPerStep * kPerStep;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; c += kPerStep) {
    const __m512i xv = _mm512_loadu_si512(x + c * kElem);
    for (int r = 0; r < R; ++r) acc[r] = step<kBF16>(acc[r], w + r * row_bytes + c * kElem, xv, 0, false);
  }
  if (full < k) {
    const int64_t left = k - full;
    const __mmask32 mask = __mmask32((uint64_t(1) << left) - 1);
    const __m512i xv = kBF16 ? _mm512_maskz_loadu_epi16(mask, x + full * kElem)
                             : _mm512_castps_si512(_mm512_maskz_loadu_ps(__mmask16(mask), x + full * kElem));
    for (int r = 0; r < R; ++r) acc[r] = step<kBF16>(acc[r], w + r * row_bytes + full * kElem, xv, mask, true);
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

// Rows [n0, n1) of W against every row of x: y[m, n] = W[n] . x[m] (+ other[m, n]).
template <bool kBF16>
LLAMALAB_TARGET void gemv_rows(const void* weight, const void* x, const void* other, void* y, bool float_out,
                               int64_t m_rows, int64_t n, int64_t k, int64_t n0, int64_t n1) {
  using T = std::conditional_t<kBF16, c10::BFloat16, float>;
  const char* w = static_cast<const char*>(weight);
  const int64_t row_bytes = k * sizeof(T);
  float sums[kRowsAtOnce];
  for (int64_t r0 = n0; r0 < n1; r0 += kRowsAtOnce) {
    const int64_t rows = std::min(kRowsAtOnce, n1 - r0);
    // The first row of x pulls these rows of W from memory; further rows find them in L1/L2.
    for (int64_t m = 0; m < m_rows; ++m) {
      const char* xm = static_cast<const char*>(x) + m * row_bytes;
      if (rows == kRowsAtOnce) {
        dot_rows<kBF16, kRowsAtOnce>(w + r0 * row_bytes, xm, k, sums);
      } else {
        for (int64_t r = 0; r < rows; ++r) dot_rows<kBF16, 1>(w + (r0 + r) * row_bytes, xm, k, sums + r);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = m * n + r0 + r;
        float v = sums[r];
        if (other != nullptr) v += static_cast<float>(static_cast<const T*>(other)[at]);
        if (kBF16 && !float_out)
          static_cast<c10::BFloat16*>(y)[at] = c10::BFloat16(v);  // round to nearest even
        else
          static_cast<float*>(y)[at] = v;
      }
    }
  }
}
#endif

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& other,
                bool float_out) {
#ifdef LLAMALAB_X86
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.dim() == 2 && (bf16 || weight.scalar_type() == at::kFloat) && weight.device().is_cpu() &&
                  weight.is_contiguous(),
              "gemv: expected a contiguous 2-D bf16 or fp32 CPU weight, got ", weight.sizes(), " ",
              weight.scalar_type(), " on ", weight.device());
  TORCH_CHECK(cpu_supports(bf16), "gemv: this CPU lacks ", bf16 ? "AVX512-BF16" : "AVX-512");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.device().is_cpu() && x.dim() >= 1,
              "gemv: expected ", weight.scalar_type(), " CPU input, got ", x.scalar_type(), " on ", x.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.size(-1) == k, "gemv: input of ", x.size(-1), " features for a weight of ", k, " columns");
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t m_rows = x2.size(0);
  TORCH_CHECK(m_rows <= kMaxRowsOfX, "gemv: ", m_rows, " rows of input; the kernel takes up to ", kMaxRowsOfX,
              " (a decode step), larger products belong to a GEMM");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor o;
  if (other.has_value()) {
    TORCH_CHECK(other->scalar_type() == x.scalar_type() && other->numel() == m_rows * n,
                "gemv: `other` must be ", x.scalar_type(), " with the output's ", m_rows * n, " elements");
    o = other->reshape({m_rows, n}).contiguous();
  }
  at::Tensor y = at::empty({m_rows, n}, x2.options().dtype(bf16 && !float_out ? at::kBFloat16 : at::kFloat));
  if (m_rows > 0 && n > 0) {
    const void* w = weight.data_ptr();
    const void* xp = x2.data_ptr();
    const void* op = o.defined() ? o.data_ptr() : nullptr;
    void* yp = y.data_ptr();
    // Groups of 8 rows; 16 groups (~74 KB of bf16 weights at K = 576) are the least worth a thread.
    const int64_t groups = (n + kRowsAtOnce - 1) / kRowsAtOnce;
    at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
      const int64_t n0 = g0 * kRowsAtOnce, n1 = std::min(n, g1 * kRowsAtOnce);
      if (bf16)
        gemv_rows<true>(w, xp, op, yp, float_out, m_rows, n, k, n0, n1);
      else
        gemv_rows<false>(w, xp, op, yp, float_out, m_rows, n, k, n0, n1);
    });
  }
  return y.view(shape);
#else
  TORCH_CHECK(false, "gemv: built for x86-64 only");
#endif
}

bool supported(bool bf16) { return cpu_supports(bf16); }

}  // namespace

TORCH_LIBRARY(llamalab, m) {
  m.def("gemv_supported(bool bf16) -> bool", &supported);
  m.def("gemv(Tensor x, Tensor weight, Tensor? other=None, bool float_out=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) { m.impl("gemv", &gemv); }
