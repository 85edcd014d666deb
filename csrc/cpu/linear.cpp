// bf16 linear on the CPU over a packed weight: y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]),
// accumulated in fp32 by AVX512-BF16 dot products (VDPBF16PS: a pair of bf16 products added into
// each fp32 lane), rounded once to bf16 (VCVTNEPS2BF16: to nearest even, results below 2^-126 to 0).
//
// The weight [N, K] is packed once, at load (PackedWeight in kernels/linear.py), into blocks of 16
// output columns:
// wp[b][p][c][j] = w[16 b + c][2 p + j] (zero outside w), so one 64-byte vector holds the k-pair
// (2 p, 2 p + 1) of 16 columns. A micro-kernel keeps an MR x NB grid of 16-column fp32
// accumulators; per k-pair it loads NB weight vectors, broadcasts each row's x pair and issues
// MR * NB dot products: no horizontal sums, and each weight vector serves MR rows. The same
// format serves decode (1-2 rows: the weight streams once, 8 blocks in flight to cover the dot
// product's latency) and prefill (6-row tiles over 120-row blocks of x, K in 1024-element slices
// whose fp32 partial sums wait in a per-thread buffer, so weight panels and x stay in L2). The
// GeGLU variant runs the same tiles over a [gate; up] weight with each tile's gate and up blocks
// side by side, and writes gelu_mul of the two (rounded first as the separate ops would) instead.
// Built only where the compiler targets AVX512-BF16 (kHasBf16Dot); elsewhere the engine keeps
// plain weights and torch's GEMM.
#include "common.h"
#include "ops.h"

#include <cstring>
#include <vector>

#if defined(__AVX512BF16__)
#include "packed_tile.h"
#endif

namespace gf::cpu {

#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;

constexpr int64_t kBlockRows = 120;   // rows of x per block (a multiple of both tile heights)

// Tile heights 1..6 for NB blocks (1..2 for 8); 24 accumulators + NB weights + 1 broadcast fit 32 registers.
template <int NB, bool kGeglu>
static void tile_rows(int rows, bf16* y, const bf16* x, const uint32_t* wp, const bf16* bias, float* part, int64_t n0,
                      int64_t N, int64_t K, int64_t panel, int64_t up, Slice s) {
  with_int(rows, [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    if constexpr (NB <= 4 || MR <= 2) tile<MR, NB, kGeglu>(y, x, wp, bias, part, n0, N, K, panel, up, s);
    else throw std::logic_error("linear: no tile of " + std::to_string(rows) + " rows");
  });
}

// Blocks of x rows; within one, each thread takes groups of NB weight blocks and, per K slice, runs
// every tile of the block over that group. y has N columns (kGeglu: N = the gate width, and the
// weight 2N rows: N / 16 gate blocks, then as many up blocks).
template <int NB, bool kGeglu>
static void packed_linear(bf16* y, const bf16* x, const uint32_t* wp, const bf16* bias, int64_t M, int64_t N,
                          int64_t K) {
  constexpr int kTileRows = NB <= 4 ? 6 : 2;
  constexpr int kStep = kGeglu ? NB / 2 : NB;  // output blocks per group
  constexpr int kTail = kGeglu ? 2 : 1;        // blocks of a one-output-block tile
  const int64_t panel = (K + 1) / 2 * 16, blocks = (N + 15) / 16, groups = (blocks + kStep - 1) / kStep;
  const int64_t up = kGeglu ? blocks * panel : 0;
#pragma omp parallel if (M * N * K >= 8 * kParallelGrain)
  {
    std::vector<float> part(K > kSliceK ? kBlockRows * 16 * NB : 0);
    for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
      const int64_t m1 = std::min(M, m0 + kBlockRows);
#pragma omp for schedule(static) nowait
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t b0 = g * kStep, nb = std::min<int64_t>(kStep, blocks - b0);
        for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
          const Slice s{k0, std::min(K, k0 + kSliceK), k0 == 0, k0 + kSliceK >= K};
          for (int64_t m = m0; m < m1; m += kTileRows) {
            const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
            if (nb == kStep) {
              tile_rows<NB, kGeglu>(rows, y + m * N, x + m * K, wp + b0 * panel, bias,
                                    part.data() + (m - m0) * 16 * NB, b0 * 16, N, K, panel, up, s);
            } else {  // the last, partial group: one output block at a time, each with its own partial sums
              for (int64_t b = b0; b < b0 + nb; ++b)
                tile_rows<kTail, kGeglu>(rows, y + m * N, x + m * K, wp + b * panel, bias,
                                         part.data() + ((b - b0) * kBlockRows + (m - m0)) * 16 * kTail, b * 16, N, K,
                                         panel, up, s);
            }
          }
        }
      }
    }
  }
}

void linear_packed_bf16(int64_t y, int64_t x, int64_t wp, int64_t bias, int64_t M, int64_t N, int64_t K) {
  require(M >= 0 && N >= 0 && K > 0, "linear", "need M >= 0, N >= 0 and K > 0");
  auto* yp = as_ptr<bf16>(y);
  const auto* xp = as_ptr<const bf16>(x);
  const auto* w = as_ptr<const uint32_t>(wp);
  const auto* bp = as_ptr<const bf16>(bias);
  if (M <= 2) packed_linear<8, false>(yp, xp, w, bp, M, N, K);
  else packed_linear<4, false>(yp, xp, w, bp, M, N, K);
}

void linear_packed_geglu_bf16(int64_t y, int64_t x, int64_t wp, int64_t M, int64_t N, int64_t K) {
  require(M >= 0 && N >= 0 && N % 16 == 0 && K > 0, "linear_geglu", "need M >= 0, N >= 0 a multiple of 16, K > 0");
  auto* yp = as_ptr<bf16>(y);
  const auto* xp = as_ptr<const bf16>(x);
  const auto* w = as_ptr<const uint32_t>(wp);
  if (M <= 2) packed_linear<8, true>(yp, xp, w, nullptr, M, N, K);
  else packed_linear<4, true>(yp, xp, w, nullptr, M, N, K);
}

#else
constexpr bool kHasBf16Dot = false;

void linear_packed_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("linear: gemforge._C was built without AVX512-BF16; use the torch backend");
}
void linear_packed_geglu_bf16(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  throw std::runtime_error("linear_geglu: gemforge._C was built without AVX512-BF16; use the torch backend");
}
#endif

bool has_bf16_dot() { return kHasBf16Dot; }

}  // namespace gf::cpu
