// Weight-only quantized (and dense 16-bit) linears of 1-16 rows of x on the tensor cores: y [M, N] =
// x [M, K] @ W^T (+ bias) by mma.sync m16n8k16, the formats of quant_gemv.cu (docs/QUANT_FORMAT.md), fp32
// accumulation; geglu, rope and the input's norm: common/linear.cuh. mma_gemv_kernel below takes a lane
// type per format: int4, int8 and dense 16-bit weights; the int4 lane first, as the others follow it.
// y = x dequant(W)^T for int4 W (every group size of the format), M <= 16, by mma.sync m16n8k16
// (16-bit operands in x's dtype, fp32 accumulation). A warp multiplies 16 rows of W (A) by 8 or 16
// rows of x (B). Lane (r = lane / 4, c = lane % 4) holds W's rows r and r + 8 and, of each
// quantization group, the c-th quarter of their codes: g / 8 bytes, one load. The k order inside an
// mma is free as long as A and B share it: each 32-bit word of codes (k .. k + 7) gives the lane's
// A registers the code pairs (k, k + 1) .. (k + 6, k + 7) and its B registers x at those k, read as
// they lie. A code pair becomes the 16-bit pair (B + q0, B + q1) exactly (one PRMT, one LOP3; B =
// 128 in bf16, 1024 in fp16, where the ulp is 1). The zero point: in bf16 one more mma per step with
// A = -(B + z) in every column adds -(B + z) sum_k x to a second accumulator (the two sums are some 30x
// a group's result; fp32 rounding of them stays orders below bf16's 2^-9); in fp16 (B = 1024: 8x more
// cancellation) each pair is reduced to q - z exactly by a 16-bit subtraction instead. A group's dot
// products are scaled by s in fp32 and summed, as in quant_gemv.cu's. Issued per 64 bytes of codes a
// lane (sm_90a SASS of the main loop, g = 128): 247 instructions (bf16; fp16 286), where the CUDA-core
// kernel issues 641 at one row of x and 1214 at four; 16 rows of x take 165 per 32 bytes.
// Warps of a CTA may split K (k_split, chosen to fill the last round of CTAs), their sums added in shared
// memory.
#include "common/activation.cuh"
#include "common/launch.cuh"
#include "common/linear.cuh"
#include "common/mma.cuh"
#include "ops.h"

#include <cstring>

namespace gf {
namespace {

// Bytes of normalised x the kernel stages: with its partial sums (4-8 KiB of __shared__) within kSmemPerCta.
constexpr size_t kMmaNormSmem = 40 * 1024;

constexpr int kMmaWarps = kThreads / 32;

template <typename T> struct MmaOperand;
template <> struct MmaOperand<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kBias = 0x43004300u;  // the pair (128, 128)
  static constexpr float kBiasValue = 128.f;
  static constexpr bool kZeroByMma = true;  // the zero point by an mma (see above)
};
template <> struct MmaOperand<__half> {
  using Pair = __half2;
  static constexpr uint32_t kBias = 0x64006400u;  // the pair (1024, 1024)
  static constexpr float kBiasValue = 1024.f;
  static constexpr bool kZeroByMma = false;  // q - z by a 16-bit subtraction
};

template <typename T>
__device__ __forceinline__ uint32_t sub_pairs(uint32_t a, uint32_t b) {
  using P = typename MmaOperand<T>::Pair;
  P pa, pb;
  memcpy(&pa, &a, 4);
  memcpy(&pb, &b, 4);
  const P d = __hsub2(pa, pb);
  uint32_t out;
  memcpy(&out, &d, 4);
  return out;
}

// The 16-bit pair (B + n0, B + n1) from t holding nibble n0 in bits 0..3 and n1 in bits 16..19:
// (t & 0x000F000F) | bits of (B, B) in one LOP3.
template <typename T>
__device__ __forceinline__ uint32_t biased_nibbles(uint32_t t) {
  return and_or(t, 0x000F000Fu, MmaOperand<T>::kBias);
}

// Word v holds codes q0..q7 (q_i in bits 4i..4i+3); p[j] = (B + q_2j, B + q_2j+1) as 16-bit values:
// byte j of v (q_2j low) and byte j of v >> 4 (q_2j+1 low) become the pair's low bytes (PRMT), then
// biased_nibbles. Without kZeroByMma, minus zero_pair = (B + z, B + z): (q - z) pairs.
template <typename T>
__device__ __forceinline__ void code_pairs(uint32_t v, uint32_t zero_pair, uint32_t (&p)[4]) {
  const uint32_t v4 = v >> 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t t = biased_nibbles<T>(__byte_perm(v, v4, 0x0400 + 0x0101 * j));
    p[j] = MmaOperand<T>::kZeroByMma ? t : sub_pairs<T>(t, zero_pair);
  }
}

// What every lane type of mma_gemv_kernel has: its x rows (nt * 8 + r, at the lane's k of the next chunk,
// set by the kernel) and its D fragments (row r / r + 8 of W, rows 2c, 2c + 1 of x, per tile of 8 rows of
// x). A lane type adds kChunk (k per chunk), kUnroll (chunks loaded before use), init() and groups<U>().
template <typename T, int NT>
struct MmaLane {
  using Dtype = T;
  static constexpr int kRowTiles = NT;
  const T* xs[NT];
  float acc[NT][4] = {};
};

// A lane of mma_gemv_kernel over int4 weights: a chunk of K is a quantization group.
template <typename T, int G, int NT, bool Asym>
struct W4MmaLane : MmaLane<T, NT> {
  using MmaLane<T, NT>::xs, MmaLane<T, NT>::acc;
  static constexpr int kChunk = G;
  // groups loaded before use: 64 bytes of codes a lane (32 with 16 rows of x), at most 4 groups (registers)
  static constexpr int kUnroll = 256 / G / NT < 4 ? 256 / G / NT : 4;
  static constexpr int kBytes = G / 8, kWords = kBytes / 4;  // a lane's codes of one group and row
  using Code = typename VecLoad<kBytes>::type;
  const uint8_t* codes[2];  // rows r and r + 8, at the lane's quarter of the next group
  const T* scale_rows[2];
  const T* zero_rows[2];    // Asym only (else z = 8)

  // rows: W's rows r and r + 8 (clamped to N), c: the lane's quarter, g0: the first group
  __device__ __forceinline__ void init(const void* w, const T* scales, const T* zeros, const int64_t (&rows)[2],
                                       int c, int K, int g0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      codes[h] = static_cast<const uint8_t*>(w) + rows[h] * (K / 2) + int64_t{g0} * (G / 2) + c * (G / 8);
      scale_rows[h] = scales + rows[h] * (K / G) + g0;
      zero_rows[h] = Asym ? zeros + rows[h] * (K / G) + g0 : nullptr;
    }
  }

  // The next U groups (loads first, then the mma's); the pointers move past them.
  template <int U>
  __device__ __forceinline__ void groups() {
    uint32_t q[U][2][kWords], zero_pair[U][2];
    uint4 xw[U][NT][kWords];  // x at the lane's codes' k, as 16-bit pairs
    float s[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const Code code = __ldcs(reinterpret_cast<const Code*>(codes[h] + u * (G / 2)));
        memcpy(q[u][h], &code, kBytes);
        s[u][h] = to_float(scale_rows[h][u]);
        const float biased_zero = MmaOperand<T>::kBiasValue + (Asym ? to_float(zero_rows[h][u]) : 8.f);
        zero_pair[u][h] = pair_of<T>(MmaOperand<T>::kZeroByMma ? -biased_zero : biased_zero);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int w = 0; w < kWords; ++w) xw[u][nt][w] = *reinterpret_cast<const uint4*>(xs[nt] + u * G + 8 * w);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      codes[h] += U * (G / 2);
      scale_rows[h] += U;
      if (Asym) zero_rows[h] += U;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xs[nt] += U * G;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float d[NT][4] = {}, dz[NT][4] = {};  // codes' and zero points' sums: two shorter mma chains
      const uint32_t z0 = zero_pair[u][0], z1 = zero_pair[u][1];
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        uint32_t lo[4], hi[4];  // rows r and r + 8
        code_pairs<T>(q[u][0][w], z0, lo);
        code_pairs<T>(q[u][1][w], z1, hi);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xv = xw[u][nt][w];
          mma_16816<T>(d[nt], lo[0], hi[0], lo[1], hi[1], xv.x, xv.y);
          mma_16816<T>(d[nt], lo[2], hi[2], lo[3], hi[3], xv.z, xv.w);
          if constexpr (MmaOperand<T>::kZeroByMma) {
            mma_16816<T>(dz[nt], z0, z1, z0, z1, xv.x, xv.y);
            mma_16816<T>(dz[nt], z0, z1, z0, z1, xv.z, xv.w);
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] += s[u][i >> 1] * (d[nt][i] + dz[nt][i]);
    }
  }
};

// A lane of mma_gemv_kernel over int8 weights (per-row scales s): a chunk is 64 k, 16 bytes of a row a
// lane. A code is made unsigned, u = q + 128 = 16 h + l, and each nibble becomes a 16-bit B + nibble as in
// the int4 lane (l of k and k + 1 by one PRMT and one LOP3, h likewise from u >> 4); then
// x . q = 16 x . (B + h) + x . (B + l) - (17 B + 128) sum x, the last by an mma with that constant as A
// (2304 in bf16, 17536 in fp16: exact), so per word of 4 codes and row: 10 instructions and 3 mmas.
template <typename T, int NT>
struct Int8MmaLane : MmaLane<T, NT> {
  using MmaLane<T, NT>::xs, MmaLane<T, NT>::acc;
  static constexpr int kChunk = 64, kUnroll = 2 / NT;
  const uint8_t* codes[2];  // rows r and r + 8, at the lane's 16 bytes of the next chunk
  float scale[2];

  __device__ __forceinline__ void init(const void* w, const T* scales, const T*, const int64_t (&rows)[2], int c,
                                       int K, int g0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      codes[h] = static_cast<const uint8_t*>(w) + rows[h] * K + int64_t{g0} * kChunk + 16 * c;
      scale[h] = to_float(scales[rows[h]]);
    }
  }

  // (B + nibble) pairs of codes (k, k + 1) and (k + 2, k + 3) of a word of unsigned codes, low nibbles
  // (shift 0) or high (4).
  template <int Shift>
  static __device__ __forceinline__ void nibble_pairs(uint32_t u, uint32_t& p01, uint32_t& p23) {
    const uint32_t v = u >> Shift;
    p01 = biased_nibbles<T>(__byte_perm(v, v, 0x0100));
    p23 = biased_nibbles<T>(__byte_perm(v, v, 0x0302));
  }

  template <int U>
  __device__ __forceinline__ void groups() {
    constexpr float kZero = 17.f * MmaOperand<T>::kBiasValue + 128.f;
    const uint32_t z = pair_of<T>(-kZero);
    uint4 q[U][2], xv[U][NT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) q[u][h] = __ldcs(reinterpret_cast<const uint4*>(codes[h] + u * kChunk));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) xv[u][nt][i] = *reinterpret_cast<const uint4*>(xs[nt] + u * kChunk + 8 * i);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) codes[h] += U * kChunk;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xs[nt] += U * kChunk;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float dh[NT][4] = {}, dl[NT][4] = {};  // x . (B + h); x . (B + l) - (17 B + 128) sum x
      const uint32_t w0[4] = {q[u][0].x, q[u][0].y, q[u][0].z, q[u][0].w};
      const uint32_t w1[4] = {q[u][1].x, q[u][1].y, q[u][1].z, q[u][1].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {  // codes 4w .. 4w + 3 of the lane's 16
        uint32_t l0[2], l1[2], h0[2], h1[2];
        nibble_pairs<0>(w0[w] ^ 0x80808080u, l0[0], l0[1]);
        nibble_pairs<0>(w1[w] ^ 0x80808080u, l1[0], l1[1]);
        nibble_pairs<4>(w0[w] ^ 0x80808080u, h0[0], h0[1]);
        nibble_pairs<4>(w1[w] ^ 0x80808080u, h1[0], h1[1]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xq = xv[u][nt][w >> 1];
          const uint32_t b0 = w & 1 ? xq.z : xq.x, b1 = w & 1 ? xq.w : xq.y;
          mma_16816<T>(dl[nt], l0[0], l1[0], l0[1], l1[1], b0, b1);
          mma_16816<T>(dh[nt], h0[0], h1[0], h0[1], h1[1], b0, b1);
          mma_16816<T>(dl[nt], z, z, z, z, b0, b1);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] += scale[i >> 1] * (16.f * dh[nt][i] + dl[nt][i]);
    }
  }
};

// A lane of mma_gemv_kernel over a plain 16-bit weight [N, K]: a chunk is 32 k, 16 bytes of a row a lane,
// whose 4 pairs are already the A fragments' (the k order as in the int4 lane).
template <typename T, int NT>
struct DenseMmaLane : MmaLane<T, NT> {
  using MmaLane<T, NT>::xs, MmaLane<T, NT>::acc;
  static constexpr int kChunk = 32, kUnroll = 4 / NT;
  const T* w_rows[2];  // rows r and r + 8, at the lane's 8 k of the next chunk

  __device__ __forceinline__ void init(const void* w, const T*, const T*, const int64_t (&rows)[2], int c, int K,
                                       int g0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) w_rows[h] = static_cast<const T*>(w) + rows[h] * K + int64_t{g0} * kChunk + 8 * c;
  }

  template <int U>
  __device__ __forceinline__ void groups() {
    uint4 wv[U][2], xv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[u][h] = __ldcs(reinterpret_cast<const uint4*>(w_rows[h] + u * kChunk));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xv[u][nt] = *reinterpret_cast<const uint4*>(xs[nt] + u * kChunk);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) w_rows[h] += U * kChunk;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xs[nt] += U * kChunk;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 lo = wv[u][0], hi = wv[u][1], xq = xv[u][nt];
        mma_16816<T>(acc[nt], lo.x, hi.x, lo.y, hi.y, xq.x, xq.y);
        mma_16816<T>(acc[nt], lo.z, hi.z, lo.w, hi.w, xq.z, xq.w);
      }
  }
};

// y [M, N] = x [M, K] W^T (+ bias) for M <= 8 * Lane::kRowTiles on the tensor cores. CTA: kMmaWarps warps,
// kMmaWarps / k_split tiles of 16 rows of W, each tile's chunks of K split among k_split warps. Rows of W
// past N and of x past M are read as row N - 1 and M - 1 (no predicates in the loop): what they yield is
// never written. Geglu and rope (the paired epilogues): a tile is 8 pairs p0 .. p0 + 7, their first rows A's
// rows 0-7 and their second rows A's rows 8-15 (geglu: gate rows p0 .. and up rows N/2 + p0 ..), so a lane
// holds both sums of pair p0 + r. Norm: the CTA
// first stages x normalised in shared memory (M x K values of T), which the lanes then read instead.
template <class Lane, Epilogue E, bool Norm>
__global__ void __launch_bounds__(kThreads, 2)  // two CTAs an SM: at most 128 registers
mma_gemv_kernel(typename Lane::Dtype* __restrict__ y, const typename Lane::Dtype* __restrict__ x,
                const void* __restrict__ w, const typename Lane::Dtype* __restrict__ scales,
                const typename Lane::Dtype* __restrict__ zeros, const typename Lane::Dtype* __restrict__ bias, int M,
                int N, int K, int k_split, NormArgs<typename Lane::Dtype> norm,
                RopeArgs<typename Lane::Dtype> rope) {
  using T = typename Lane::Dtype;
  constexpr bool kPaired = E != Epilogue::kPlain;
  constexpr int NT = Lane::kRowTiles, kUnroll = Lane::kUnroll;
  __shared__ float partial[kMmaWarps][NT][4][32];
  prior_grids_done();
  const T* xin = x;
  if constexpr (Norm) {
    const float* inv = norm_prologue<T, kFusedMaxRows>(x, norm, M, K);
    GF_DYNAMIC_SMEM(float, x_smem);
    T* normed = reinterpret_cast<T*>(x_smem);  // [M][K]
    for (int i = threadIdx.x; i < M * K; i += kThreads)
      normed[i] = from_float<T>(input_at<T, true>(x, norm, inv, i / K, K, i % K));
    __syncthreads();
    xin = normed;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, c = lane & 3;
  const int64_t tile = int64_t{blockIdx.x} * (kMmaWarps / k_split) + warp / k_split;
  const int split = warp % k_split, chunks = K / Lane::kChunk;
  const int g0 = split * chunks / k_split, g1 = (split + 1) * chunks / k_split;
  // (paired: the lane's pair, clamped, and its first row; rows of a pair past N / 2 are N)
  const int64_t pairs = N / 2, p = min(tile * 8 + r, pairs - 1), span = kPaired ? pair_span<E>(N, rope) : 0;
  const int64_t first = kPaired ? pair_row<E>(p, span) : 0;
  const bool valid = tile * 8 + r < pairs;
  const int64_t rows[2] = {kPaired ? (valid ? first : N) : tile * 16 + r,
                           kPaired ? (valid ? first + span : N) : tile * 16 + r + 8};
  const int64_t clamped[2] = {kPaired ? first : min(rows[0], int64_t{N} - 1),
                              kPaired ? first + span : min(rows[1], int64_t{N} - 1)};
  Lane lane_state;
  lane_state.init(w, scales, zeros, clamped, c, K, g0);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    lane_state.xs[nt] = xin + int64_t{min(nt * 8 + r, M - 1)} * K + int64_t{g0} * Lane::kChunk + c * (Lane::kChunk / 4);
  int g = g0;
  for (; g + kUnroll <= g1; g += kUnroll) lane_state.template groups<kUnroll>();
  for (; g < g1; ++g) lane_state.template groups<1>();
  auto& acc = lane_state.acc;
  if (k_split > 1) {  // the tile's first warp sums the others' parts
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][nt][i][lane] = acc[nt][i];
    __syncthreads();
    if (split != 0) return;
    for (int j = 1; j < k_split; ++j)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] += partial[warp + j][nt][i][lane];
  }
  auto biased = [&](float v, int64_t row) { return v + (bias ? to_float(bias[row]) : 0.f); };
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // d[i]: row r (+ 8 for i >= 2), row of x nt * 8 + 2c + (i & 1)
      const int64_t row = rows[i >> 1];
      const int m = nt * 8 + 2 * c + (i & 1);
      if (!kPaired && row < N && m < M) y[int64_t{m} * N + row] = from_float<T>(biased(acc[nt][i], row));
      if (kPaired && i < 2 && rows[0] < N && m < M)  // (the pair's first row i, its second i + 2)
        store_pair<E>(y, rope, N, m, rows[0], biased(acc[nt][i], rows[0]), biased(acc[nt][i + 2], rows[1]));
    }
}

// Warps sharing a tile's K (1, 2, 4 or 8; each with a group at least): the split whose grid of CTAs
// fills its last round of `slots` resident CTAs best (a CTA streams a fixed share of W, so a last round
// a third full leaves two thirds of the device idle for a round), the smallest among equals.
int mma_k_split(int64_t tiles, int64_t groups, int64_t slots) {
  int best = 1;
  double best_fill = 0;
  for (int split = 1; split <= kMmaWarps && split <= groups; split *= 2) {
    const int64_t ctas = ceil_div(tiles, kMmaWarps / split);
    const double fill = double(ctas) / double(ceil_div(ctas, slots) * slots);
    if (fill > best_fill + 1e-9) best = split, best_fill = fill;
  }
  return best;
}

// Launches mma_gemv_kernel<Lane, epilogue, norm>; k_split 0 picks it (mma_k_split).
template <class Lane>
void launch_mma(const char* op, int64_t y, int64_t x, int64_t w, int64_t scales, int64_t zeros, int64_t bias,
                int64_t M, int64_t N, int64_t K, int64_t k_split, const Fusion& fusion, int64_t stream) {
  using T = typename Lane::Dtype;
  const size_t smem = fusion.norm() ? size_t(M) * K * sizeof(T) : 0;  // (Norm: x normalised)
  require(smem <= kMmaNormSmem, op, "the norm takes M * K * 2 <= " + std::to_string(kMmaNormSmem) + " bytes of x");
  auto run = [&](auto epi, auto nn) {
    const auto kernel = mma_gemv_kernel<Lane, decltype(epi)::value, decltype(nn)::value>;
    static const size_t static_bytes = static_smem(kernel);
    require(smem + static_bytes <= kSmemPerCta, op, "shared memory over " + std::to_string(kSmemPerCta) + " bytes");
    const int64_t tiles = fusion.epilogue() != Epilogue::kPlain ? ceil_div(N / 2, 8) : ceil_div(N, 16);
    const int split = k_split ? int(k_split) : mma_k_split(tiles, K / Lane::kChunk, resident_ctas(kernel, smem));
    const int64_t grid = ceil_div(tiles, kMmaWarps / split);
    require(grid < (int64_t{1} << 31), op, "too many rows");
    launch_kernel(kernel, static_cast<unsigned>(grid), kThreads, smem, as_stream(stream),
        as_ptr<T>(y), as_ptr<const T>(x), as_ptr<const void>(w), as_ptr<const T>(scales), as_ptr<const T>(zeros),
        as_ptr<const T>(bias), int(M), int(N), int(K), split, fusion.args<T>(), fusion.rope_args<T>());
  };
  dispatch_epilogue(fusion.epilogue(), [&](auto epi) {
    if constexpr (Lane::kRowTiles == 1) {  // (the norm: up to kFusedMaxRows rows of x, one tile)
      if (fusion.norm()) return run(epi, std::true_type{});
    }
    run(epi, std::false_type{});
  });
}

void check_mma_args(const char* op, int64_t x, int64_t w, int64_t M, int64_t N, int64_t K, int64_t k_split,
                    const Fusion& fusion) {
  check_shape(op, M, N, K, fusion, false);
  require(aligned16(w) && aligned16(x), op, "the weight and x must be 16-byte aligned");
  require(k_split >= 0 && k_split <= kMmaWarps && (k_split & (k_split - 1)) == 0, op,
          "k_split must be 0 (chosen here) or a power of two up to " + std::to_string(kMmaWarps) + ", got " +
              std::to_string(k_split));
}

// The formats whose lane type takes (T, row tiles) alone (int8, dense): K a multiple of `chunk`, one or two
// tiles of 8 rows of x.
template <template <typename, int> class Lane>
void launch_one_scale_mma(const char* op, int64_t chunk, int64_t y, int64_t x, int64_t w, int64_t scales,
                          int64_t bias, int64_t M, int64_t N, int64_t K, int64_t k_split, const Fusion& fusion,
                          int dtype, int64_t stream) {
  check_mma_args(op, x, w, M, N, K, k_split, fusion);
  require(K % chunk == 0, op, "K must be a multiple of " + std::to_string(chunk) + ", got " + std::to_string(K));
  dispatch_half(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (M <= 8) launch_mma<Lane<T, 1>>(op, y, x, w, scales, 0, bias, M, N, K, k_split, fusion, stream);
    else launch_mma<Lane<T, 2>>(op, y, x, w, scales, 0, bias, M, N, K, k_split, fusion, stream);
  });
  check_launch(op);
}

}  // namespace

void w4a16_mma(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
               int64_t N, int64_t K, int64_t group_size, int64_t k_split, bool geglu, int64_t norm_weight,
               int64_t residual, int64_t r_out, double eps, const RopeParams& rope, int dtype, int64_t stream) {
  const char* op = "w4a16_mma";
  const Fusion fusion{geglu, norm_weight, residual, r_out, eps, rope};
  check_mma_args(op, x, qweight, M, N, K, k_split, fusion);
  check_group(op, K, group_size);
  dispatch_half(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto go = [&](auto g, auto nt, auto asym) {
      launch_mma<W4MmaLane<T, decltype(g)::value, decltype(nt)::value, decltype(asym)::value>>(
          op, y, x, qweight, scales, zeros, bias, M, N, K, k_split, fusion, stream);
    };
    auto by_zeros = [&](auto g, auto nt) {
      if (zeros) go(g, nt, std::true_type{});
      else go(g, nt, std::false_type{});
    };
    auto by_rows = [&](auto g) {
      if (M <= 8) by_zeros(g, std::integral_constant<int, 1>{});
      else by_zeros(g, std::integral_constant<int, 2>{});
    };
    if (group_size == 32) by_rows(std::integral_constant<int, 32>{});
    else if (group_size == 64) by_rows(std::integral_constant<int, 64>{});
    else by_rows(std::integral_constant<int, 128>{});
  });
  check_launch(op);
}

void w8a16_mma(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N, int64_t K,
               int64_t k_split, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps,
               const RopeParams& rope, int dtype, int64_t stream) {
  launch_one_scale_mma<Int8MmaLane>("w8a16_mma", 64, y, x, qweight, scales, bias, M, N, K, k_split,
                                    Fusion{geglu, norm_weight, residual, r_out, eps, rope}, dtype, stream);
}

void dense_mma(int64_t y, int64_t x, int64_t weight, int64_t bias, int64_t M, int64_t N, int64_t K, int64_t k_split,
               bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps, const RopeParams& rope,
               int dtype, int64_t stream) {
  launch_one_scale_mma<DenseMmaLane>("dense_mma", 32, y, x, weight, 0, bias, M, N, K, k_split,
                                     Fusion{geglu, norm_weight, residual, r_out, eps, rope}, dtype, stream);
}

}  // namespace gf
