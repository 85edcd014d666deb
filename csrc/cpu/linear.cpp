// Few-row bf16 linear on the CPU: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]), x and w bf16,
// accumulated in fp32 by AVX512-BF16 dot products (VDPBF16PS: pairs of bf16 products added into
// fp32 lanes), rounded once to bf16. Decode multiplies one to a few rows by every weight matrix;
// this streams each weight row once for all rows of x, with none of the per-call set-up of a
// general GEMM. Built only where the compiler targets AVX512-BF16 (kHasBf16Dot); elsewhere the
// "cpu" linear hands every call to torch.
#include "common.h"
#include "ops.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace gf::cpu {

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;

// Rows n of w against all M rows of x; NR weight rows at a time so that NR * M dot products
// (independent FMA chains, at most 16 accumulators: the rest of the 32 registers hold x) are in flight.
template <int M>
static void gemv_rows(bf16* y, const bf16* x, const bf16* w, const bf16* bias, int64_t n0, int64_t n1,
                      int64_t N, int64_t K) {
  constexpr int NR = M <= 4 ? 4 : 2;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K % 32)) - 1);
  const int64_t k_full = K - K % 32;
  auto finish = [&](int64_t n, int m, __m512 acc) {
    float v = _mm512_reduce_add_ps(acc);
    if (bias) v += to_float(bias[n]);
    y[m * N + n] = from_float<bf16>(v);
  };
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    __m512 acc[NR][M];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = k < k_full ? static_cast<__mmask32>(~0u) : tail;
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < NR; ++r) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n + r) * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv[m], wv);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < M; ++m) finish(n + r, m, acc[r][m]);
  }
  for (; n < n1; ++n) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = k < k_full ? static_cast<__mmask32>(~0u) : tail;
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * K + k);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k), wv);
    }
    for (int m = 0; m < M; ++m) finish(n, m, acc[m]);
  }
}

void linear_bf16(int64_t y, int64_t x, int64_t w, int64_t bias, int64_t rows, int64_t N, int64_t K) {
  require(rows >= 1 && rows <= kMaxLinearRows, "linear", "rows must be 1.." + std::to_string(kMaxLinearRows));
  require(N >= 0 && K > 0, "linear", "need N >= 0 and K > 0");
  auto* yp = as_ptr<bf16>(y);
  const auto* xp = as_ptr<const bf16>(x);
  const auto* wp = as_ptr<const bf16>(w);
  const auto* bp = as_ptr<const bf16>(bias);
  constexpr int64_t kChunk = 64;  // weight rows per scheduling unit
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (N * K >= 4 * kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kChunk, n1 = std::min(N, n0 + kChunk);
    switch (rows) {
      case 1: gemv_rows<1>(yp, xp, wp, bp, n0, n1, N, K); break;
      case 2: gemv_rows<2>(yp, xp, wp, bp, n0, n1, N, K); break;
      case 3: gemv_rows<3>(yp, xp, wp, bp, n0, n1, N, K); break;
      case 4: gemv_rows<4>(yp, xp, wp, bp, n0, n1, N, K); break;
      case 5: gemv_rows<5>(yp, xp, wp, bp, n0, n1, N, K); break;
      default: gemv_rows<6>(yp, xp, wp, bp, n0, n1, N, K); break;
    }
  }
}
#else
constexpr bool kHasBf16Dot = false;

void linear_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("linear: gemforge._C was built without AVX512-BF16; use the torch backend");
}
#endif

bool has_bf16_dot() { return kHasBf16Dot; }

}  // namespace gf::cpu
