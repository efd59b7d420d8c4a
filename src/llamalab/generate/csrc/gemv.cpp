// Matrix-vector products for decoding on x86-64 CPUs: fp32 and bf16 weights, one path per
// instruction set, chosen at run time by what the CPU reports.
//
// Decoding one token reads every weight once, so its speed is the rate at which the weights
// stream from memory. On the 2-core reference CPUs oneDNN's and MKL's kernels read the model's
// small matrices (576 x 576 ... 3072 x 576) well below what a plain read reaches: a fixed set-up
// per call, and blocked layouts made for matrix-matrix products. This kernel reads the weight as
// it is, row-major (N, K), no copy: each thread takes a range of rows and walks 8 rows at a time
// across the columns, one vector load per row and step, so its reads form one contiguous region
// in 8 interleaved streams, which the hardware prefetchers follow.
//
// The paths (the names are what `gemv_isa` reports and `gemv_set_isa` / LLAMALAB_GEMV_ISA take):
//   avx512bf16  AVX-512 + AVX512-BF16: bf16 weights by VDPBF16PS (32 products a step, summed in
//               pairs into 16 fp32 lanes); fp32 weights by one 16-lane FMA a step.
//   avx512      AVX-512F/BW/VL: fp32 as above; bf16 weights widened to fp32 in registers.
//   avx2        AVX2 + FMA: 8-lane FMAs; bf16 weights widened to fp32 in registers.
// Widening bf16 costs no shuffle: a bf16 value is the top half of an fp32, so of each 32-bit lane
// holding two neighbouring weights, a left shift by 16 gives the even one and a mask the odd one,
// as fp32. The input vector is laid out once per call to match (per block of lanes, its even
// elements then its odd ones), so each step is a load, a shift, an and and two FMAs.
// Products of bf16 values are exact in fp32 on every path; the sums are fp32 (their order differs
// between paths, within the usual bound of an fp32 sum). Columns past the last full vector step
// are summed in scalar code. The residual (`other`) is added in fp32 and the sum rounded once to
// the output dtype (bf16: round to nearest even, as oneDNN's post-op), or with float_out stored
// in fp32 (the output head: bf16 logits 0.125 apart at ~25 would tie, and greedy decoding would
// pick by index).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "x86_simd.h"

namespace {

constexpr int64_t kRowsAtOnce = 8;  // rows of W walked together: 8 accumulators, 8 load streams
constexpr int64_t kMaxRowsOfX = 4;  // rows of x (sequences of a batched step) the op accepts
// The widening paths issue ~5 instructions per 32 bytes of weights where fp32 issues one, so far
// fewer loads fit in the out-of-order window and the reads no longer keep enough cache lines in
// flight: on the AVX2 EPYC (2 threads) they streamed 10-12 GB/s where fp32 reaches 16-18. A
// software prefetch 8 KB ahead in each row stream (it retires at once, not waiting for the data)
// brings them to ~15 GB/s (measured, interleaved; 2-32 KB tried).
constexpr int64_t kPrefetchBytes = 8192;

enum Isa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* const kIsaNames[] = {"none", "avx2", "avx512", "avx512bf16"};

// The best path this CPU runs.
Isa cpu_best() {
#ifdef LLAMALAB_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kNone;
}

std::atomic<int> g_isa{-1};  // the path in use; -1 until first asked: the CPU's best

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = cpu_best();
    g_isa.store(isa);
  }
  return static_cast<Isa>(isa);
}

// How a path wants x: as it is, or widened to fp32 with each block of `block` elements laid out
// as its even elements then its odd ones (the order the widened weights come out of a register).
struct XLayout {
  bool widen;
  int64_t block;
};

#ifdef LLAMALAB_X86
// ---- AVX2 + FMA --------------------------------------------------------------------------
using llamalab_simd::hsum256;

// fp32: sums[r] = W[r, :full] . x[:full], 8 columns a step.
template <int R>
LLAMALAB_AVX2 void dot_f32_avx2(const float* w, const float* x, int64_t k, int64_t full, float* sums) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + c), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(acc[r]);
}

// bf16 weights widened in registers, 16 columns a step; `xp` is x in the even/odd layout. Even and
// odd halves go to separate accumulators (two FMA chains per row, not one twice as long); 4 rows a
// pass, so that 8 accumulators, 2 x vectors and the mask fit the 16 registers. Walking 8 rows as
// two passes of 4 measured 5-10% faster than 8 rows at once with one chain each (AVX2 EPYC).
template <int R>
LLAMALAB_AVX2 void dot_bf16_avx2_pass(const c10::BFloat16* w, const float* xp, int64_t k, int64_t full, float* sums) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 even_acc[R], odd_acc[R];
  for (int r = 0; r < R; ++r) even_acc[r] = odd_acc[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < full; c += 16) {
    const __m256 xe = _mm256_loadu_ps(xp + c), xo = _mm256_loadu_ps(xp + c + 8);
    for (int r = 0; r < R; ++r) {
      if ((c & 31) == 0)  // once per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(w + r * k + c) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + c));
      even_acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), xe, even_acc[r]);
      odd_acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, odd)), xo, odd_acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = hsum256(_mm256_add_ps(even_acc[r], odd_acc[r]));
}

template <int R>
LLAMALAB_AVX2 void dot_bf16_avx2(const c10::BFloat16* w, const float* xp, int64_t k, int64_t full, float* sums) {
  if constexpr (R > 4) {
    dot_bf16_avx2_pass<4>(w, xp, k, full, sums);
    dot_bf16_avx2<R - 4>(w + 4 * k, xp, k, full, sums + 4);
  } else {
    dot_bf16_avx2_pass<R>(w, xp, k, full, sums);
  }
}

// ---- AVX-512 -----------------------------------------------------------------------------
template <int R>
LLAMALAB_AVX512 void dot_f32_avx512(const float* w, const float* x, int64_t k, int64_t full, float* sums) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; c += 16) {
    const __m512 xv = _mm512_loadu_ps(x + c);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + r * k + c), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int R>
LLAMALAB_AVX512 void dot_bf16_avx512(const c10::BFloat16* w, const float* xp, int64_t k, int64_t full, float* sums) {
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; c += 32) {
    const __m512 xe = _mm512_loadu_ps(xp + c), xo = _mm512_loadu_ps(xp + c + 16);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k + c) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w + r * k + c);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)), xe, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wv, odd)), xo, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

// AVX512-BF16: x as it is (bf16 pairs), 32 columns a step.
template <int R>
LLAMALAB_AVX512BF16 void dot_bf16_dp(const c10::BFloat16* w, const c10::BFloat16* x, int64_t k, int64_t full,
                                     float* sums) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; c += 32) {
    const __m512i xv = _mm512_loadu_si512(x + c);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * k + c), (__m512bh)xv);
  }
  for (int r = 0; r < R; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

// One path's kernels for one weight dtype: `dot8` / `dot1` sum 8 rows / 1 row over the first
// `full` columns (a multiple of `step`); x as `layout` says.
template <typename T>
struct Path {
  using Dot = void (*)(const T*, const void*, int64_t, int64_t, float*);
  Dot dot8 = nullptr, dot1 = nullptr;
  int64_t step = 1;
  XLayout layout{false, 1};
};

#ifdef LLAMALAB_X86
template <typename T, typename X, void (*F)(const T*, const X*, int64_t, int64_t, float*)>
void call(const T* w, const void* x, int64_t k, int64_t full, float* sums) {
  F(w, static_cast<const X*>(x), k, full, sums);
}
#endif

Path<float> f32_path(Isa isa) {
  Path<float> p;
#ifdef LLAMALAB_X86
  if (isa >= kAvx512) {
    p = {&call<float, float, dot_f32_avx512<8>>, &call<float, float, dot_f32_avx512<1>>, 16, {false, 1}};
  } else if (isa == kAvx2) {
    p = {&call<float, float, dot_f32_avx2<8>>, &call<float, float, dot_f32_avx2<1>>, 8, {false, 1}};
  }
#else
  (void)isa;
#endif
  return p;
}

Path<c10::BFloat16> bf16_path(Isa isa) {
  using B = c10::BFloat16;
  Path<B> p;
#ifdef LLAMALAB_X86
  if (isa == kAvx512Bf16) {
    p = {&call<B, B, dot_bf16_dp<8>>, &call<B, B, dot_bf16_dp<1>>, 32, {false, 1}};
  } else if (isa == kAvx512) {
    p = {&call<B, float, dot_bf16_avx512<8>>, &call<B, float, dot_bf16_avx512<1>>, 32, {true, 32}};
  } else if (isa == kAvx2) {
    p = {&call<B, float, dot_bf16_avx2<8>>, &call<B, float, dot_bf16_avx2<1>>, 16, {true, 16}};
  }
#else
  (void)isa;
#endif
  return p;
}

// The rows of x as the product reads them, in fp32 (m_rows, k): x itself, or SwiGLU of x's two
// halves (silu(x[:k]) * x[k:], the feed-forward's gate and up projections), or RMSNorm of x times
// `norm` (the pre-normalisation before a layer's products). Done here, once per call, it spares
// the decode step ~10 small tensor ops per layer and rounding between them: what it feeds the
// products is the fp32 value, which the unfused path rounds to the model's dtype first.
template <typename T>
std::vector<float> prepare(const T* x, int64_t m_rows, int64_t k, const float* norm, double eps, bool swiglu) {
  std::vector<float> out(static_cast<size_t>(m_rows * k));
  for (int64_t m = 0; m < m_rows; ++m) {
    float* om = out.data() + m * k;
    if (swiglu) {
      const T* gate = x + m * 2 * k;
      const T* up = gate + k;
      for (int64_t c = 0; c < k; ++c) {
        const float g = static_cast<float>(gate[c]);
        om[c] = g / (1.0f + std::exp(-g)) * static_cast<float>(up[c]);
      }
      continue;
    }
    const T* xm = x + m * k;
    for (int64_t c = 0; c < k; ++c) om[c] = static_cast<float>(xm[c]);
    if (norm != nullptr) {
      float squares = 0.0f;
      for (int64_t c = 0; c < k; ++c) squares += om[c] * om[c];
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(k) + static_cast<float>(eps));
      for (int64_t c = 0; c < k; ++c) om[c] = om[c] * scale * norm[c];
    }
  }
  return out;
}

// `xf` (m_rows, k) as the widening paths read it: per block of `block` columns of the vector loop,
// the block's even elements then its odd ones (the scalar tail reads `xf` itself).
std::vector<float> even_odd(const std::vector<float>& xf, int64_t m_rows, int64_t k, int64_t full, int64_t block) {
  std::vector<float> out(xf.size());
  const int64_t half = block / 2;
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xm = xf.data() + m * k;
    float* om = out.data() + m * k;
    for (int64_t c = 0; c < full; c += block)
      for (int64_t i = 0; i < half; ++i) {
        om[c + i] = xm[c + 2 * i];
        om[c + half + i] = xm[c + 2 * i + 1];
      }
  }
  return out;
}

// Rows [n0, n1) of W against every row of x: y[m, n] = W[n] . x[m] (+ other[m, n]); `xk` is x in
// the layout the path reads, `xf` in fp32 (for the scalar tail).
template <typename T>
void gemv_rows(const Path<T>& path, const T* w, const float* xf, const void* xk, const T* other, void* y,
               bool float_out, int64_t m_rows, int64_t n, int64_t k, int64_t n0, int64_t n1) {
  const int64_t full = k / path.step * path.step;
  const int64_t x_elem = (path.layout.widen || std::is_same_v<T, float>) ? int64_t(sizeof(float)) : int64_t(sizeof(T));
  float sums[kRowsAtOnce];
  for (int64_t r0 = n0; r0 < n1; r0 += kRowsAtOnce) {
    const int64_t rows = std::min(kRowsAtOnce, n1 - r0);
    // The first row of x pulls these rows of W from memory; further rows find them in L1/L2.
    for (int64_t m = 0; m < m_rows; ++m) {
      const void* xm = static_cast<const char*>(xk) + m * k * x_elem;
      if (rows == kRowsAtOnce) {
        path.dot8(w + r0 * k, xm, k, full, sums);
      } else {
        for (int64_t r = 0; r < rows; ++r) path.dot1(w + (r0 + r) * k, xm, k, full, sums + r);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* wr = w + (r0 + r) * k;
        const float* xr = xf + m * k;
        float v = sums[r];
        for (int64_t c = full; c < k; ++c) v += static_cast<float>(wr[c]) * xr[c];
        const int64_t at = m * n + r0 + r;
        if (other != nullptr) v += static_cast<float>(other[at]);
        if (std::is_same_v<T, c10::BFloat16> && !float_out)
          static_cast<c10::BFloat16*>(y)[at] = c10::BFloat16(v);  // round to nearest even
        else
          static_cast<float*>(y)[at] = v;
      }
    }
  }
}

template <typename T>
void run(const Path<T>& path, const at::Tensor& weight, const at::Tensor& x2, const at::Tensor& o,
         const float* norm, double eps, bool swiglu, at::Tensor& y, bool float_out) {
  const int64_t n = weight.size(0), k = weight.size(1), m_rows = x2.size(0);
  const T* w = static_cast<const T*>(weight.data_ptr());
  const T* op = o.defined() ? static_cast<const T*>(o.data_ptr()) : nullptr;
  void* yp = y.data_ptr();
  const std::vector<float> xf = prepare(static_cast<const T*>(x2.data_ptr()), m_rows, k, norm, eps, swiglu);
  const int64_t full = k / path.step * path.step;
  std::vector<float> widened;
  std::vector<c10::BFloat16> rounded;
  const void* xk = xf.data();
  if (path.layout.widen) {
    widened = even_odd(xf, m_rows, k, full, path.layout.block);
    xk = widened.data();
  } else if (std::is_same_v<T, c10::BFloat16>) {  // VDPBF16PS takes bf16 pairs
    rounded.assign(xf.begin(), xf.end());
    xk = rounded.data();
  }
  // Groups of 8 rows; 16 groups (~74 KB of bf16 weights at K = 576) are the least worth a thread.
  const int64_t groups = (n + kRowsAtOnce - 1) / kRowsAtOnce;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    gemv_rows<T>(path, w, xf.data(), xk, op, yp, float_out, m_rows, n, k, g0 * kRowsAtOnce,
                 std::min(n, g1 * kRowsAtOnce));
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& other,
                bool float_out, const std::optional<at::Tensor>& norm, double eps, bool swiglu) {
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(weight.dim() == 2 && (bf16 || weight.scalar_type() == at::kFloat) && weight.device().is_cpu() &&
                  weight.is_contiguous(),
              "gemv: expected a contiguous 2-D bf16 or fp32 CPU weight, got ", weight.sizes(), " ",
              weight.scalar_type(), " on ", weight.device());
  const Isa isa = current_isa();
  TORCH_CHECK(isa != kNone, "gemv: this CPU has neither AVX2+FMA nor AVX-512 (or the build is not for x86-64)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.device().is_cpu() && x.dim() >= 1,
              "gemv: expected ", weight.scalar_type(), " CPU input, got ", x.scalar_type(), " on ", x.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(!(swiglu && norm.has_value()), "gemv: swiglu and norm do not go together");
  const int64_t kx = swiglu ? 2 * k : k;
  TORCH_CHECK(x.size(-1) == kx, "gemv: input of ", x.size(-1), " features for a weight of ", k, " columns",
              swiglu ? " (swiglu: twice the columns, gate then up)" : "");
  const at::Tensor x2 = x.reshape({-1, kx}).contiguous();
  const int64_t m_rows = x2.size(0);
  TORCH_CHECK(m_rows <= kMaxRowsOfX, "gemv: ", m_rows, " rows of input; the kernel takes up to ", kMaxRowsOfX,
              " (a decode step), larger products belong to a GEMM");
  at::Tensor nw;
  if (norm.has_value()) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == k && norm->device().is_cpu(),
                "gemv: `norm` must be a CPU vector of ", k, " weights, got ", norm->sizes());
    nw = norm->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor o;
  if (other.has_value()) {
    TORCH_CHECK(other->scalar_type() == x.scalar_type() && other->numel() == m_rows * n,
                "gemv: `other` must be ", x.scalar_type(), " with the output's ", m_rows * n, " elements");
    o = other->reshape({m_rows, n}).contiguous();
  }
  at::Tensor y = at::empty({m_rows, n}, x2.options().dtype(bf16 && !float_out ? at::kBFloat16 : at::kFloat));
  const float* np = nw.defined() ? nw.data_ptr<float>() : nullptr;
  if (m_rows > 0 && n > 0) {
    if (bf16)
      run<c10::BFloat16>(bf16_path(isa), weight, x2, o, np, eps, swiglu, y, float_out);
    else
      run<float>(f32_path(isa), weight, x2, o, np, eps, swiglu, y, float_out);
  }
  return y.view(shape);
}

// The paths this CPU can run, best last.
std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (int i = kAvx2; i <= cpu_best(); ++i) out.emplace_back(kIsaNames[i]);
  return out;
}

std::string get_isa() { return kIsaNames[current_isa()]; }

// Force a path (tests, benchmarks): "auto" = the CPU's best; returns the previous one.
std::string set_isa(const std::string& name) {
  const std::string previous = get_isa();
  if (name == "auto") {
    g_isa.store(cpu_best());
    return previous;
  }
  for (int i = kAvx2; i <= kAvx512Bf16; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= cpu_best(), "gemv: the ", name, " path needs instructions this CPU lacks (its best is ",
                  kIsaNames[cpu_best()], ")");
      g_isa.store(i);
      return previous;
    }
  }
  TORCH_CHECK(false, "gemv: unknown path '", name, "': expected auto, avx2, avx512 or avx512bf16");
}

}  // namespace

// The path in use (0 none, 1 avx2, 2 avx512, 3 avx512bf16), for the decode attention in the same
// library (attention.cpp): forcing a path (gemv_set_isa) forces its attention kernel too.
int llamalab_gemv_isa_level() { return static_cast<int>(current_isa()); }

TORCH_LIBRARY(llamalab, m) {
  m.def("gemv_isas() -> str[]", &isas);
  m.def("gemv_isa() -> str", &get_isa);
  m.def("gemv_set_isa(str name) -> str", &set_isa);
  m.def("gemv(Tensor x, Tensor weight, Tensor? other=None, bool float_out=False, Tensor? norm=None, "
        "float eps=1e-5, bool swiglu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(llamalab, CPU, m) { m.impl("gemv", &gemv); }
