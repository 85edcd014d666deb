// Weight-only quantized linear on the CPU, over the layouts of docs/QUANT_FORMAT.md as they are
// stored (no repacking): y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for bf16 x, with
//   int8: W = q * s[n]                            y = s[n] * sum_k x q
//   int4: W = (q - z) * s per group of g along K  y = sum_groups s (sum_k x (128 + q) - (128 + z) sum_k x)
// Each row of W becomes bf16 32 elements at a time in registers, exactly (an int8 through fp32; an
// int4 nibble pair as the bf16 pair of 128 + q, bits 0x4300 | q, which makes the group's zero point
// one scalar correction per row of x), and meets the rows of x in VDPBF16PS dot products, fp32
// sums rounded once to bf16. Each converted weight vector serves up to kRows rows of x (int4: half,
// as it keeps twice the accumulators), each row of x two weight rows (four when x has at most two
// rows: independent accumulators for the dot products' latency); blocks of kBlockN rows of W stay
// in L2 while all of x passes over them; threads split W's rows. The loop requests the next weight
// rows' cache lines as it reads the current ones: the hardware prefetchers stop at 4 KB pages, which
// rows of 1-2 KB cross every few rows (one-row CodeGemma-2B gate_up, int4: 2.16 -> 0.84 ms).
// From Fmt::kPackedRows rows of x on (prefill; int8 32, int4 12), converting each weight vector once
// per pass of R rows costs more than the dot products it serves, so the weight is converted instead,
// one slice of K for 4 blocks of 16 rows at a time, into the packed bf16 layout of the dense linear
// (a 16 x 16 transpose of the converted k-pairs), and the dense linear's tiles (packed_tile.h) run
// every row of x over it: each weight element is converted once per call. int8 applies its per-row scales in the tiles'
// epilogue; int4 keeps the codes 128 + q and applies each group's scale and zero-point correction
// after the group's dot products (tile_grouped): both exact, as above. Built where the compiler
// targets AVX512-BF16 (kHasBf16Dot); elsewhere the op stays with torch.
#include "common.h"
#include "ops.h"

#include <vector>

#if defined(__AVX512BF16__)
#include "packed_tile.h"
#endif

namespace gf::cpu {

#if defined(__AVX512BF16__)
namespace {

constexpr int kRows = 8;          // rows of x per pass over a block of W
constexpr int64_t kBlockN = 32;   // rows of W per block

inline __m512bh x_at(const bf16* x, int64_t k) { return (__m512bh)_mm512_loadu_si512(x + k); }

// 32 int8 codes -> 32 bf16, in order (|q| <= 128 is exact in bf16).
inline __m512bh int8_codes(const int8_t* q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);  // (lower half from the second operand)
}

// 16 bytes of nibble pairs (k = 2j low, 2j + 1 high) -> the 32 bf16 values 128 + q, in order: byte j
// becomes the bf16 pair (0x4300 | low nibble, 0x4300 | high nibble), lane j.
inline __m512bh int4_codes(const uint8_t* q) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
#if defined(__AVX512VBMI__)
  // Three instructions: bytes 2i, 2i + 1 to the bottom of qword i (VPERMB); each output byte taken
  // from bit offset 0, 4, 8 or 12 of its qword (VPMULTISHIFTQB); then (x & 0x000F000F) | 0x43004300
  // (VPTERNLOGD) keeps the nibbles and sets the exponent bytes. Was six (widen, mask, shifts, ors).
  const __m512i spread = _mm512_permutexvar_epi8(
      _mm512_set_epi64(0x0F0E, 0x0D0C, 0x0B0A, 0x0908, 0x0706, 0x0504, 0x0302, 0x0100), _mm512_castsi128_si512(bytes));
  const __m512i nibbles = _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x000C000800040000LL), spread);
  return (__m512bh)_mm512_ternarylogic_epi32(nibbles, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300),
                                             0xEA);  // (a & b) | c
#else
  const __m512i b = _mm512_cvtepu8_epi32(bytes);
  const __m512i pair = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0xF)),
                                       _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16));
  return (__m512bh)_mm512_or_si512(pair, _mm512_set1_epi32(0x43004300));
#endif
}

struct Args {
  bf16* y;
  const bf16* x;
  const void* q;
  const bf16* scales;
  const bf16* zeros;  // int4 asymmetric; nullptr: z = 8
  const bf16* bias;
  int64_t M, N, K, group;
  const float* xsum;  // int4: [M, K / group] sums of x over each group
};

// Rows m0 .. m0 + R of y, columns n .. n + C: each converted weight vector meets R rows of x, each
// row of x C weight vectors.
template <int R, int C>
void int8_rows(const Args& a, int64_t m0, int64_t n) {
  const auto* q = static_cast<const int8_t*>(a.q) + n * a.K;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < a.K; k += 32) {
    __m512bh w[C];
    if ((k & 63) == 0)
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(q + (C + c) * a.K + k), _MM_HINT_T0);
    for (int c = 0; c < C; ++c) w[c] = int8_codes(q + c * a.K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = x_at(a.x + (m0 + r) * a.K, k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, w[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const float s = to_float(a.scales[n + c]), b = a.bias ? to_float(a.bias[n + c]) : 0.0f;
    for (int r = 0; r < R; ++r)
      a.y[(m0 + r) * a.N + n + c] = from_float<bf16>(_mm512_reduce_add_ps(acc[r][c]) * s + b);
  }
}

template <int R, int C>
void int4_rows(const Args& a, int64_t m0, int64_t n) {
  const int64_t groups = a.K / a.group, row_bytes = a.K / 2;
  const auto* q = static_cast<const uint8_t*>(a.q) + n * row_bytes;
  __m512 acc[R][C];
  float corr[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps(), corr[r][c] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dot[r][c] = _mm512_setzero_ps();
    for (int64_t k = g * a.group, end = k + a.group; k < end; k += 32) {
      __m512bh w[C];
      if ((k & 127) == 0)  // request the next weight rows' line at this offset (see the header)
        for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(q + (C + c) * row_bytes + k / 2), _MM_HINT_T0);
      for (int c = 0; c < C; ++c) w[c] = int4_codes(q + c * row_bytes + k / 2);
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = x_at(a.x + (m0 + r) * a.K, k);
        for (int c = 0; c < C; ++c) dot[r][c] = _mm512_dpbf16_ps(dot[r][c], xv, w[c]);
      }
    }
    for (int c = 0; c < C; ++c) {
      const int64_t at = (n + c) * groups + g;
      const float s = to_float(a.scales[at]);
      const float zs = s * (128.0f + (a.zeros ? to_float(a.zeros[at]) : 8.0f));
      const __m512 sv = _mm512_set1_ps(s);
      for (int r = 0; r < R; ++r) {
        acc[r][c] = _mm512_fmadd_ps(dot[r][c], sv, acc[r][c]);
        corr[r][c] += zs * a.xsum[(m0 + r) * groups + g];
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    const float b = a.bias ? to_float(a.bias[n + c]) : 0.0f;
    for (int r = 0; r < R; ++r)
      a.y[(m0 + r) * a.N + n + c] = from_float<bf16>(_mm512_reduce_add_ps(acc[r][c]) - corr[r][c] + b);
  }
}

// Rows of x kRows at a time (int8) or kRows / 2 (int4, which holds twice the accumulators), W's rows
// two at a time (one for an odd last one), in blocks of kBlockN that the threads split.
template <int R, class Fmt>
void rows_of_x(const Args& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int C = R <= 2 ? 4 : 2;  // few rows of x: more weight rows, for independent accumulators
  int64_t n = n0;
  for (; n + C <= n1; n += C) Fmt::template call<R, C>(a, m0, n);
  for (; n + 1 < n1; n += 2) Fmt::template call<R, 2>(a, m0, n);
  if (n < n1) Fmt::template call<R, 1>(a, m0, n);
}

template <class Fmt>
void run(const Args& a) {
  constexpr int kMax = Fmt::kMaxRows;
  const int64_t blocks = (a.N + kBlockN - 1) / kBlockN;
  const bool parallel = a.M * a.N * a.K >= kParallelGrain && blocks > 1;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n0 = blk * kBlockN, n1 = std::min(a.N, n0 + kBlockN);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMax) {
      switch (std::min<int64_t>(kMax, a.M - m0)) {
        case 1: rows_of_x<1, Fmt>(a, m0, n0, n1); break;
        case 2: rows_of_x<2, Fmt>(a, m0, n0, n1); break;
        case 3: rows_of_x<3, Fmt>(a, m0, n0, n1); break;
        case 4: rows_of_x<4, Fmt>(a, m0, n0, n1); break;
        case 5: rows_of_x<std::min(5, kMax), Fmt>(a, m0, n0, n1); break;
        case 6: rows_of_x<std::min(6, kMax), Fmt>(a, m0, n0, n1); break;
        case 7: rows_of_x<std::min(7, kMax), Fmt>(a, m0, n0, n1); break;
        default: rows_of_x<kMax, Fmt>(a, m0, n0, n1); break;
      }
    }
  }
}

// ------------------------------------------------------------------- many rows: the packed tiles
constexpr int kNB = 4;               // blocks of 16 weight rows per conversion (one tile's width)
constexpr int kTileRows = 6;

// r[i] lane j -> r[j] lane i, for 16 vectors of 16 32-bit lanes.
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Block b of W (rows 16 b .. 16 b + 15; zero past N) over elements [k0, k1) of K, in the packed
// layout: out[(k - k0) / 2 * 16 + c] = the bf16 pair (codes of W[16 b + c][k], [k + 1]).
template <class Fmt>
void convert_block(uint32_t* out, const Args& a, int64_t b, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; k += 32) {
    __m512i r[16];
    for (int c = 0; c < 16; ++c)
      r[c] = 16 * b + c < a.N ? (__m512i)Fmt::codes(a, 16 * b + c, k) : _mm512_setzero_si512();
    transpose16(r);  // r[c] held column c's pairs p = 0..15; now r[p] holds pair p of the 16 columns
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + ((k - k0) / 2 + p) * 16, r[p]);
  }
}

// kPackedRows: rows of x from which the weight is converted to the packed layout (where the two paths
// cross on CodeGemma-2B's gate_up and down, this CPU; results/2026-12-07-cpu-quant-prefill).
struct Int8 {
  static constexpr int kMaxRows = kRows;
  static constexpr int64_t kPackedRows = 32;
  template <int R, int C>
  static void call(const Args& a, int64_t m0, int64_t n) { int8_rows<R, C>(a, m0, n); }
  static int64_t slice(const Args&) { return kSliceK; }
  static __m512bh codes(const Args& a, int64_t n, int64_t k) {
    return int8_codes(static_cast<const int8_t*>(a.q) + n * a.K + k);
  }
  // Columns n0 .. n0 + 16 nb: per-column scales (0 past N).
  static void scales(const Args& a, float* sc, float*, int64_t n0, int nb, int64_t, int64_t) {
    for (int64_t c = 0; c < 16 * nb; ++c) sc[c] = n0 + c < a.N ? to_float(a.scales[n0 + c]) : 0.0f;
  }
  template <int MR, int NB>
  static void tile(const Args& a, const uint32_t* wp, float* part, int64_t m, int64_t n0, int64_t panel, Slice s,
                   const float* sc, const float*) {
    gf::cpu::tile<MR, NB, false>(a.y + m * a.N, a.x + m * a.K, wp, a.bias, part, n0, a.N, a.K, panel, 0, s, sc);
  }
};
struct Int4 {
  static constexpr int kMaxRows = kRows / 2;
  static constexpr int64_t kPackedRows = 12;
  template <int R, int C>
  static void call(const Args& a, int64_t m0, int64_t n) { int4_rows<R, C>(a, m0, n); }
  static int64_t slice(const Args& a) { return std::max<int64_t>(1, kSliceK / a.group) * a.group; }
  static __m512bh codes(const Args& a, int64_t n, int64_t k) {
    return int4_codes(static_cast<const uint8_t*>(a.q) + n * (a.K / 2) + k / 2);
  }
  // Groups of [k0, k1), columns n0 .. n0 + 16 nb: scale s and shift s (128 + z) (0 past N), a row of
  // 16 nb per group (the tile's width).
  static void scales(const Args& a, float* sc, float* sh, int64_t n0, int nb, int64_t k0, int64_t k1) {
    const int64_t groups = a.K / a.group, width = 16 * nb;
    for (int64_t gi = 0, g = k0 / a.group; g < k1 / a.group; ++gi, ++g)
      for (int64_t c = 0; c < 16 * nb; ++c) {
        const int64_t n = n0 + c, at = n * groups + g;
        const bool real = n < a.N;
        sc[gi * width + c] = real ? to_float(a.scales[at]) : 0.0f;
        sh[gi * width + c] = real ? sc[gi * width + c] * (128.0f + (a.zeros ? to_float(a.zeros[at]) : 8.0f)) : 0.0f;
      }
  }
  template <int MR, int NB>
  static void tile(const Args& a, const uint32_t* wp, float* part, int64_t m, int64_t n0, int64_t panel, Slice s,
                   const float* sc, const float* sh) {
    tile_grouped<MR, NB>(a.y + m * a.N, a.x + m * a.K, wp, a.bias, part, n0, a.N, a.K, panel, s, a.group, sc, sh,
                         a.xsum + m * (a.K / a.group), a.K / a.group);
  }
};

// Threads take groups of kNB weight blocks; per K slice a thread converts its group's slice once and
// runs every row of x over it, the fp32 sums of all rows waiting between slices.
template <class Fmt>
void run_packed(const Args& a) {
  const int64_t blocks = (a.N + 15) / 16, nblk = (blocks + kNB - 1) / kNB, slice = Fmt::slice(a);
  const int64_t panel = slice / 2 * 16, width = 16 * kNB;
  const int64_t slice_groups = a.group ? slice / a.group : 1;
#pragma omp parallel
  {
    std::vector<uint32_t> wbuf(kNB * panel);
    std::vector<float> part(a.M * width), sc(slice_groups * width), sh(slice_groups * width);
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < nblk; ++gb) {
      const int64_t b0 = gb * kNB;
      const int nb = static_cast<int>(std::min<int64_t>(kNB, blocks - b0));
      for (int64_t k0 = 0; k0 < a.K; k0 += slice) {
        const int64_t k1 = std::min(a.K, k0 + slice);
        for (int bb = 0; bb < nb; ++bb) convert_block<Fmt>(wbuf.data() + bb * panel, a, b0 + bb, k0, k1);
        Fmt::scales(a, sc.data(), sh.data(), 16 * b0, nb, k0, k1);
        const Slice s{k0, k1, k0 == 0, k1 >= a.K, k0};
        for (int64_t m = 0; m < a.M; m += kTileRows)
          with_int(std::min<int64_t>(kTileRows, a.M - m), [&](auto mr) {
            constexpr int MR = decltype(mr)::value;
            with_int(nb, [&](auto nbc) {
              constexpr int NB = decltype(nbc)::value;
              if constexpr (NB <= kNB)
                Fmt::template tile<MR, NB>(a, wbuf.data(), part.data() + m * width, m, 16 * b0, panel, s, sc.data(),
                                           sh.data());
            });
          });
      }
    }
  }
}

}  // namespace

void linear_int8_bf16(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N,
                      int64_t K) {
  require(K % 32 == 0, "linear_int8", "K must be a multiple of 32, got " + std::to_string(K));
  const Args a{as_ptr<bf16>(y), as_ptr<const bf16>(x), as_ptr<const void>(qweight), as_ptr<const bf16>(scales),
               nullptr, bias ? as_ptr<const bf16>(bias) : nullptr, M, N, K, 0, nullptr};
  if (M >= Int8::kPackedRows) run_packed<Int8>(a);
  else run<Int8>(a);
}

void linear_int4_bf16(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
                      int64_t N, int64_t K, int64_t group) {
  require(group % 32 == 0 && group > 0 && K % group == 0, "linear_int4",
          "the group must be a positive multiple of 32 dividing K, got group " + std::to_string(group) + ", K " +
              std::to_string(K));
  const int64_t groups = K / group;
  std::vector<float> xsum(M * groups);  // sum of each row of x over each group, in fp32
  const bf16* xs = as_ptr<const bf16>(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += to_float(xs[m * K + k]);
      xsum[m * groups + g] = s;
    }
  const Args a{as_ptr<bf16>(y), xs, as_ptr<const void>(qweight), as_ptr<const bf16>(scales),
               zeros ? as_ptr<const bf16>(zeros) : nullptr, bias ? as_ptr<const bf16>(bias) : nullptr, M, N, K, group,
               xsum.data()};
  if (M >= Int4::kPackedRows) run_packed<Int4>(a);
  else run<Int4>(a);
}

#else

void linear_int8_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::invalid_argument("linear_int8: gemforge._C was built without AVX512-BF16");
}
void linear_int4_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::invalid_argument("linear_int4: gemforge._C was built without AVX512-BF16");
}

#endif

}  // namespace gf::cpu
