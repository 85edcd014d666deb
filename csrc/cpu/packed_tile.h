// The packed bf16 weight layout's tile kernels, shared by the dense packed linear (linear.cpp) and the
// quantized linear's many-row path (quant_linear.cpp, which converts weight slices into this layout).
// Layout (PackedWeight in kernels/linear.py): blocks of 16 output columns, wp[b][p][c][j] = w[16 b + c]
// [2 p + j], so one 64-byte vector holds the k-pair (2 p, 2 p + 1) of 16 columns; a block's K range is
// a `panel` of uint32 (a k-pair of one column each). Included only where AVX512-BF16 is targeted.
#pragma once
#include "common.h"

#include <cstring>
#include <immintrin.h>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace gf::cpu {

constexpr int64_t kSliceK = 1024;     // elements of K per slice (even)

// f(std::integral_constant<int, v>{}) for v = n in [1, 6]: a tile height (or width in blocks) as a
// compile-time constant.
template <class F>
void with_int(int64_t n, F&& f) {
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
  }
  throw std::logic_error("linear: no tile of " + std::to_string(n));
}

// x[k], x[k + 1] as one 32-bit lane pattern, broadcast; (x[k], 0) when k is the last element.
inline __m512bh pair_at(const bf16* x, int64_t k, bool half) {
  int32_t pair = x[k].bits;
  if (!half) std::memcpy(&pair, x + k, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(pair);
}

struct Slice {
  int64_t k0, k1;  // elements [k0, k1) of K; k0 even
  bool first, last;
  int64_t w0 = 0;  // the element of K at which the block pointers start (a converted slice: its k0)
};

// acc[i][j] += x row i . block j over elements [k0, k1) (x rows K apart; block j's k-pairs from w0).
template <int MR, int NB>
inline void dot_pairs(__m512 (&acc)[MR][NB], const bf16* x, int64_t K, const uint32_t* const (&block)[NB],
                      int64_t k0, int64_t k1, int64_t w0) {
  auto step = [&](int64_t k, bool half) {
    __m512bh w[NB];
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(block[j] + (k - w0) / 2 * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xb = pair_at(x + i * K, k, half);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, w[j]);
    }
  };
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) step(k, false);
  if (k < k1) step(k, true);
}

// The columns n .. n + 15 that exist (n < N).
inline __mmask16 columns(int64_t n, int64_t N) {
  return N - n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (N - n)) - 1);
}

// bias[n .. n + 15] in fp32 (0 where there is no bias or no column).
inline __m512 bias_at(const bf16* bias, int64_t n, __mmask16 mask) {
  if (!bias) return _mm512_setzero_ps();
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + n)), 16));
}

// VCVTNEPS2BF16 rounds to nearest even in one instruction (5-6% of a prefill-sized GEMM against
// to_bf16_rne, ad-hoc timing); unlike torch it flushes results below 2^-126 to zero
inline void store_bf16(bf16* y, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// One MR x (16 NB) tile over one K slice. x: the tile's first row (row stride K); wp: its first
// block, blocks `panel` uint32 apart; part: the tile's fp32 partial sums between slices. Plain: y
// [MR, 16 NB] at column n0 of y (row stride N) = the sums (times scale[c], the tile's per-column
// scales, where given) (+ bias). kGeglu: blocks j < NB/2 are gate blocks, j >= NB/2 the up blocks
// `up` uint32 after them, and y [MR, 8 NB] = gelu_mul of the sums, each rounded to bf16 first
// (exactly what the linear then gelu_and_mul give).
template <int MR, int NB, bool kGeglu>
inline void tile(bf16* y, const bf16* x, const uint32_t* wp, const bf16* bias, float* part, int64_t n0,
                 int64_t N, int64_t K, int64_t panel, int64_t up, Slice s, const float* scale = nullptr) {
  constexpr int64_t kPartRow = 16 * NB;
  const uint32_t* block[NB];
  for (int j = 0; j < NB; ++j) block[j] = kGeglu && j >= NB / 2 ? wp + up + (j - NB / 2) * panel : wp + j * panel;
  __m512 acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = s.first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + i * kPartRow + 16 * j);
  dot_pairs<MR, NB>(acc, x, K, block, s.k0, s.k1, s.w0);
  if (!s.last) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NB; ++j) _mm512_storeu_ps(part + i * kPartRow + 16 * j, acc[i][j]);
    return;
  }
  constexpr int kOut = kGeglu ? NB / 2 : NB;
  for (int j = 0; j < kOut; ++j) {
    const int64_t n = n0 + 16 * j;
    const __mmask16 mask = columns(n, N);
    if constexpr (kGeglu) {
      for (int i = 0; i < MR; ++i) {
        alignas(64) uint16_t g[16], u[16];
        alignas(64) float o[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(g), (__m256i)_mm512_cvtneps_pbh(acc[i][j]));  // as the
        _mm256_store_si256(reinterpret_cast<__m256i*>(u), (__m256i)_mm512_cvtneps_pbh(acc[i][j + NB / 2]));  // linear
#pragma omp simd
        for (int c = 0; c < 16; ++c) o[c] = gelu_mul(to_float(bf16{g[c]}), to_float(bf16{u[c]}));
        _mm256_mask_storeu_epi16(y + i * N + n, mask, to_bf16_rne(_mm512_load_ps(o)));
      }
    } else {
      const __m512 b = bias_at(bias, n, mask);
      for (int i = 0; i < MR; ++i)
        store_bf16(y + i * N + n, mask, scale ? _mm512_fmadd_ps(acc[i][j], _mm512_loadu_ps(scale + 16 * j), b)
                                              : _mm512_add_ps(acc[i][j], b));
    }
  }
}

// The group-scaled tile of the int4 linear (quant_linear.cpp): the block holds the codes 128 + q,
// and per group g of `group` elements of K (groups within the slice, in order)
//   sum += s[g, c] * (x . codes over g) - shift[g, c] * xsum[i, g],   shift = s (128 + z)
// with gscale / gshift [groups of the slice][16 NB] fp32 and xsum the rows' sums of x over each
// group (row i at xsum + i * groups). The sums wait in `part` between groups; after the slice's last
// group of the last slice y = sum (+ bias), rounded once.
template <int MR, int NB>
inline void tile_grouped(bf16* y, const bf16* x, const uint32_t* wp, const bf16* bias, float* part, int64_t n0,
                         int64_t N, int64_t K, int64_t panel, Slice s, int64_t group, const float* gscale,
                         const float* gshift, const float* xsum, int64_t groups) {
  constexpr int64_t kPartRow = 16 * NB;
  const uint32_t* block[NB];
  for (int j = 0; j < NB; ++j) block[j] = wp + j * panel;
  for (int64_t g0 = s.k0; g0 < s.k1; g0 += group) {
    __m512 acc[MR][NB];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    dot_pairs<MR, NB>(acc, x, K, block, g0, g0 + group, s.w0);
    const int64_t gi = (g0 - s.k0) / group, g = g0 / group;
    const bool fresh = s.first && g0 == s.k0, out = s.last && g0 + group >= s.k1;
    for (int j = 0; j < NB; ++j) {
      const __m512 sv = _mm512_loadu_ps(gscale + gi * kPartRow + 16 * j);
      const __m512 zv = _mm512_loadu_ps(gshift + gi * kPartRow + 16 * j);
      const int64_t n = n0 + 16 * j;
      const __mmask16 mask = columns(n, N);
      const __m512 b = out ? bias_at(bias, n, mask) : _mm512_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        __m512 p = fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(part + i * kPartRow + 16 * j);
        p = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsum[i * groups + g]), _mm512_fmadd_ps(acc[i][j], sv, p));
        if (out) store_bf16(y + i * N + n, mask, _mm512_add_ps(p, b));
        else _mm512_storeu_ps(part + i * kPartRow + 16 * j, p);
      }
    }
  }
}

}  // namespace gf::cpu
