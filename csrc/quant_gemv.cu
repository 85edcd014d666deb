// Weight-only quantized GEMV / skinny GEMM: y [M, N] = x [M, K] @ dequant(W [N, K])^T (+ bias),
// M <= 16, formats of docs/QUANT_FORMAT.md, fp32 accumulation:
//   int8: W[n, k] = q[n, k] * s[n]                   (s applied once per row at the end)
//   int4: W[n, k] = (q[n, k] - z[n, k/g]) * s[n, k/g]  (z = 8 when symmetric; s applied per chunk)
//   dense: W[n, k] as stored, in x's dtype (the same kernel over plain weights: cuBLAS's peer)
// CTA = 8 warps looping over groups of 16 rows (grid-stride; see quant_gemv_kernel); in a group
// warp w owns kRowsPerWarp rows and splits K across its lanes in 16-byte weight
// chunks (16 int8 or 32 int4 weights; a 32-wide int4 chunk never straddles a group, g >= 32), so
// each warp load is 512 contiguous bytes per row; partial dots are warp-reduced at the end.
// x is staged in shared memory as fp32 (in K tiles when it does not fit), padded by 4 floats per
// chunk so the lanes' float4 reads are bank-conflict free. Dequantisation is exact in fp32: a byte
// b is placed in the mantissa of 2^23 (one PRMT) and 2^23 + zero subtracted (one FADD).
// geglu, rope and the input's norm: common/linear.cuh. The same linears on the tensor cores: mma_gemv.cu.
#include "common/launch.cuh"
#include "common/linear.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "ops.h"

#include <cstring>

namespace gf {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 2;
constexpr int kXPad = 4;                       // floats of padding after each chunk of x
constexpr float kMagic = 8388608.f;            // 2^23
constexpr int kPrefetchBytes = 16 * 1024;      // per warp and row group (`prefetch`), per row (programmatic)

// out[i] = (byte i of v) - zero, exactly: float(0x4B0000bb) = 2^23 + b, minus biased_zero = 2^23 + zero.
__device__ __forceinline__ void bytes_minus(uint32_t v, float biased_zero, float (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7650u + i)) - biased_zero;
}

// Per-chunk quantization parameters, loaded together with the chunk's weights.
struct ChunkMeta {
  float scale = 1.f, biased_zero = 0.f;
};

// Per-chunk dequant-and-dot of a format. `xs` points at the chunk's x values (row m at m * ldx).
template <typename T>
struct Int8Format {
  static constexpr int kPerChunk = 16;
  static constexpr int kMaxRows = 16;
  static constexpr int kUnrollSmallM = 4;  // chunks in flight per lane and row for M <= 4 (measured)
  const T* scales;
  __device__ Int8Format(const T* s, const T*, int, int) : scales(s) {}

  __device__ __forceinline__ ChunkMeta meta(int64_t, int) const { return {}; }
  template <int MT>
  __device__ __forceinline__ void accumulate(float (&acc)[MT], uint4 w, ChunkMeta, const float* xs, int ldx) const {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float qv[4];
      bytes_minus(words[i] ^ 0x80808080u, kMagic + 128.f, qv);  // int8 -> biased uint8 -> int8 value
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 a = *reinterpret_cast<const float4*>(xs + m * ldx + 4 * i);
        acc[m] += a.x * qv[0] + a.y * qv[1] + a.z * qv[2] + a.w * qv[3];
      }
    }
  }
  __device__ __forceinline__ float row_scale(int64_t row) const { return to_float(scales[row]); }
};

template <typename T>
struct Int4Format {
  static constexpr int kPerChunk = 32;
  static constexpr int kMaxRows = 16;
  static constexpr int kUnrollSmallM = 2;  // more costs occupancy (registers), measured slower
  const T* scales;
  const T* zeros;  // nullptr: symmetric, zero point 8
  int groups, chunk_shift;  // group of chunk c: c >> chunk_shift (g = 32 << chunk_shift)
  __device__ Int4Format(const T* s, const T* z, int K, int g)
      : scales(s), zeros(z), groups(K / g), chunk_shift(g == 32 ? 0 : g == 64 ? 1 : 2) {}

  __device__ __forceinline__ ChunkMeta meta(int64_t row, int chunk) const {
    const int64_t gi = row * groups + (chunk >> chunk_shift);
    return {to_float(scales[gi]), kMagic + (zeros ? to_float(zeros[gi]) : 8.f)};
  }
  template <int MT>
  __device__ __forceinline__ void accumulate(float (&acc)[MT], uint4 w, ChunkMeta md, const float* xs, int ldx) const {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    float part[MT] = {};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i holds k = 8i .. 8i+7: low nibbles even k, high odd k
      float lo[4], hi[4];
      bytes_minus(words[i] & 0x0F0F0F0Fu, md.biased_zero, lo);
      bytes_minus((words[i] >> 4) & 0x0F0F0F0Fu, md.biased_zero, hi);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float4 a = *reinterpret_cast<const float4*>(xs + m * ldx + 8 * i);
        const float4 b = *reinterpret_cast<const float4*>(xs + m * ldx + 8 * i + 4);
        part[m] += a.x * lo[0] + a.y * hi[0] + a.z * lo[1] + a.w * hi[1] + b.x * lo[2] + b.y * hi[2] +
                   b.z * lo[3] + b.w * hi[3];
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] += md.scale * part[m];
  }
  __device__ __forceinline__ float row_scale(int64_t) const { return 1.f; }
};

template <typename T>
struct DenseFormat {
  static constexpr int kPerChunk = 8;
  static constexpr int kUnrollSmallM = 4;
  static constexpr int kMaxRows = 4;  // (serves one row; 16 would spill with the L2 prefetch)
  __device__ DenseFormat(const T*, const T*, int, int) {}

  __device__ __forceinline__ ChunkMeta meta(int64_t, int) const { return {}; }
  template <int MT>
  __device__ __forceinline__ void accumulate(float (&acc)[MT], uint4 w, ChunkMeta, const float* xs, int ldx) const {
    Pack<T, 8> pk;
    memcpy(&pk, &w, sizeof pk);
    float wf[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) wf[i] = to_float(pk.v[i]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float4 a = *reinterpret_cast<const float4*>(xs + m * ldx);
      const float4 b = *reinterpret_cast<const float4*>(xs + m * ldx + 4);
      acc[m] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] + b.z * wf[6] +
                b.w * wf[7];
    }
  }
  __device__ __forceinline__ float row_scale(int64_t) const { return 1.f; }
};

// Chunks of x (per row) that one shared-memory tile of `floats` holds.
template <class Fmt>
int tile_chunks(int MT, int64_t K, size_t floats) {
  return static_cast<int>(std::min<int64_t>(K / Fmt::kPerChunk, int64_t(floats) / (MT * (Fmt::kPerChunk + kXPad))));
}

// Stages chunks [c0, c0 + nc) of x's M rows into shared memory as fp32 (zero rows past M).
template <typename T, int MT, int P, bool Norm>
__device__ __forceinline__ void stage_x(float* xs, const T* __restrict__ x, NormArgs<T> norm, const float* inv,
                                        int M, int K, int c0, int nc, int ldx) {
  constexpr int PS = P + kXPad;
  for (int i = threadIdx.x; i < MT * nc * P; i += kThreads) {
    const int m = i / (nc * P), kk = i - m * nc * P;
    xs[m * ldx + kk / P * PS + kk % P] = m < M ? input_at<T, Norm>(x, norm, inv, m, K, int64_t{c0} * P + kk) : 0.f;
  }
}

// Grid-stride over groups of kWarps * kRowsPerWarp rows: when x fits one shared-memory tile it is
// staged once per CTA and the launch keeps only as many CTAs as are resident (one CTA per row group
// would restage x for every 16 rows: with K = 3072 that is as much work as the rows' weights).
// Geglu and rope (the paired epilogues): warp w of group g owns pair p = g * kWarps + w, rows pair_row(p)
// and pair_row(p) + span.
// (The explicit minimum of one CTA an SM: without it ptxas held the Norm kernels to 64 registers and spilled
// the row-group loop's counters; the others compile to the same code either way.)
template <typename T, int MT, class Fmt, Epilogue E, bool Norm>
__global__ void __launch_bounds__(kThreads, 1)
quant_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const uint8_t* __restrict__ qweight,
                  const T* __restrict__ scales, const T* __restrict__ zeros, const T* __restrict__ bias, int M,
                  int N, int K, int group_size, int tile, bool prefetch, bool programmatic, NormArgs<T> norm,
                  RopeArgs<T> rope) {
  constexpr bool kPaired = E != Epilogue::kPlain;
  static_assert(!kPaired || kRowsPerWarp == 2, "a paired epilogue's warp owns the two rows of one pair");
  constexpr int P = Fmt::kPerChunk, PS = P + kXPad;
  constexpr int kUnroll = MT <= 4 ? Fmt::kUnrollSmallM : 2;  // chunks per lane and row loaded before use
  GF_DYNAMIC_SMEM(float, xs);  // [MT][tile * PS]
  const Fmt fmt(scales, zeros, K, group_size);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row_bytes = int64_t{K} / P * 16;  // K (int8) or K / 2 (int4)
  const int ldx = tile * PS, chunks = K / P;
  const bool one_tile = tile >= chunks;
  const int pairs = N / 2;  // (the paired epilogues)
  const int64_t span = kPaired ? pair_span<E>(N, rope) : 0;
  constexpr int kRowsPerGroup = kWarps * kRowsPerWarp;
  const int64_t groups =
      kPaired ? (int64_t{pairs} + kWarps - 1) / kWarps : (int64_t{N} + kRowsPerGroup - 1) / kRowsPerGroup;
  if (programmatic && blockIdx.x < groups) {  // the warp's first rows into L2 while the previous kernel finishes
    const int64_t p = int64_t{blockIdx.x} * kWarps + warp;
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t row = kPaired ? (p < pairs ? pair_row<E>(p, span) + r * span : N) : p * kRowsPerWarp + r;
      for (int64_t i = int64_t{lane} * 128; row < N && i < min(row_bytes, int64_t{kPrefetchBytes}); i += 32 * 128)
        prefetch_l2(qweight + row * row_bytes + i);
    }
  }
  prior_grids_done();
  const float* inv = nullptr;  // (Norm: 1 / rms of each row of x)
  if constexpr (Norm) inv = norm_prologue<T, MT>(x, norm, M, K);
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // uniform across the CTA
    const int64_t row0 = (g * kWarps + warp) * kRowsPerWarp, p = g * kWarps + warp;
    const int64_t first = kPaired && p < pairs ? pair_row<E>(p, span) : N;  // (the pair's first row)
    auto row_of = [&](int r) -> int64_t {  // the warp's rows of W; N where it has none
      if constexpr (kPaired) {
        return first < N ? first + r * span : N;
      } else {
        return row0 + r;
      }
    };
    if (!kPaired && prefetch) {  // the warp's rows of its next group into L2 (up to kPrefetchBytes) as it works
      const int64_t next0 = row0 + int64_t{gridDim.x} * kWarps * kRowsPerWarp;
      const int64_t bytes = min(int64_t{kPrefetchBytes}, min(int64_t{kRowsPerWarp}, N - next0) * row_bytes);
      for (int64_t i = int64_t{lane} * 128; i < bytes; i += 32 * 128)
        prefetch_l2(qweight + next0 * row_bytes + i);
    }
    float acc[kRowsPerWarp][MT] = {};
    for (int c0 = 0; c0 < chunks; c0 += tile) {
      const int nc = min(tile, chunks - c0);
      if (!one_tile || g == blockIdx.x) {  // (one tile: staged once, by the first row group)
        __syncthreads();  // the previous tile is consumed
        stage_x<T, MT, P, Norm>(xs, x, norm, inv, M, K, c0, nc, ldx);
        __syncthreads();
      }
      for (int c = lane; c < nc; c += 32 * kUnroll) {
        uint4 w[kUnroll][kRowsPerWarp];
        ChunkMeta md[kUnroll][kRowsPerWarp];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            if (c + 32 * u < nc && row_of(r) < N) {
              w[u][r] = __ldcs(reinterpret_cast<const uint4*>(qweight + row_of(r) * row_bytes) + c0 + c + 32 * u);
              md[u][r] = fmt.meta(row_of(r), c0 + c + 32 * u);
            }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            if (c + 32 * u < nc && row_of(r) < N)
              fmt.accumulate(acc[r], w[u][r], md[u][r], xs + (c + 32 * u) * PS, ldx);
      }
    }
    auto result = [&](int r, float sum) {  // (lane 0, row_of(r) < N)
      return sum * fmt.row_scale(row_of(r)) + (bias ? to_float(bias[row_of(r)]) : 0.f);
    };
    if constexpr (kPaired) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float a = warp_sum(acc[0][m]), b = warp_sum(acc[1][m]);
        if (lane == 0 && m < M && first < N) store_pair<E>(y, rope, N, m, first, result(0, a), result(1, b));
      }
    } else {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float v = warp_sum(acc[r][m]);
          if (lane == 0 && m < M && row_of(r) < N) y[int64_t{m} * N + row_of(r)] = from_float<T>(result(r, v));
        }
    }
  }
}

// max_ctas: 0 keeps the CTAs the device holds at once when x fits one tile (else one per row
// group); n > 0 caps the grid at n (tests force few CTAs, benchmarks one per row group).
// prefetch: each warp requests its next row group's weights into L2 as it starts a group (a variant
// the benchmarks time: with short rows, e.g. 7B gate_up int4 = 1.5 KB, a warp has little in flight).
template <template <typename> class Format>
void launch_gemv(const char* op, int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros,
                 int64_t bias, int64_t M, int64_t N, int64_t K, int64_t group_size, int64_t max_ctas, bool prefetch,
                 const Fusion& fusion, int dtype, int64_t stream) {
  check_shape(op, M, N, K, fusion, true);
  require(max_ctas >= 0, op, "max_ctas must be >= 0, got " + std::to_string(max_ctas));
  require(!((fusion.geglu || fusion.rope()) && prefetch), op, "prefetch is not available with geglu or rope");
  require(aligned16(qweight), op, "qweight must be 16-byte aligned");
  dispatch_half(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Fmt = Format<T>;
    require(K % Fmt::kPerChunk == 0, op, "K must be a multiple of " + std::to_string(Fmt::kPerChunk));
    require(M <= Fmt::kMaxRows, op, "M (rows of x) must be at most " + std::to_string(Fmt::kMaxRows));
    auto run = [&](auto mt, auto epi, auto nn) {
      constexpr int MT = decltype(mt)::value;
      const auto kernel = quant_gemv_kernel<T, MT, Fmt, decltype(epi)::value, decltype(nn)::value>;
      static const size_t static_bytes = static_smem(kernel);  // (a property of the compiled kernel)
      const int tile = tile_chunks<Fmt>(MT, K, (kSmemPerCta - static_bytes) / sizeof(float));
      const size_t smem = size_t(MT) * tile * (Fmt::kPerChunk + kXPad) * sizeof(float);
      int64_t grid = ceil_div(N, kWarps * kRowsPerWarp);  // (paired: N / 2 pairs, kWarps a group: the same)
      if (max_ctas > 0) grid = std::min(grid, max_ctas);
      else if (tile >= K / Fmt::kPerChunk) grid = std::min(grid, resident_ctas(kernel, smem));
      launch_kernel(kernel, static_cast<unsigned>(grid), kThreads, smem, as_stream(stream),
          as_ptr<T>(y), as_ptr<const T>(x), as_ptr<const uint8_t>(qweight), as_ptr<const T>(scales),
          as_ptr<const T>(zeros), as_ptr<const T>(bias), int(M), int(N), int(K), int(group_size), tile, prefetch,
          programmatic_launch(), fusion.args<T>(), fusion.rope_args<T>());
    };
    auto go = [&](auto mt) {  // (the fused kernels: up to kFusedMaxRows rows)
      if constexpr (decltype(mt)::value <= kFusedMaxRows) {
        if (fusion.epilogue() != Epilogue::kPlain || fusion.norm())
          return dispatch_epilogue(fusion.epilogue(), [&](auto epi) { dispatch_bool(fusion.norm(), [&](auto nn) {
            run(mt, epi, nn); }); });
      }
      run(mt, std::integral_constant<Epilogue, Epilogue::kPlain>{}, std::false_type{});
    };
    if (M == 1) go(std::integral_constant<int, 1>{});
    else if (M == 2) go(std::integral_constant<int, 2>{});
    else if (M <= 4) go(std::integral_constant<int, 4>{});
    else if constexpr (Fmt::kMaxRows > 4) {
      if (M <= 8) go(std::integral_constant<int, 8>{});
      else go(std::integral_constant<int, 16>{});
    }
  });
  check_launch(op);
}

}  // namespace

void w8a16_gemm(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N, int64_t K,
                int64_t max_ctas, bool prefetch, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out,
                double eps, const RopeParams& rope, int dtype, int64_t stream) {
  launch_gemv<Int8Format>("w8a16_gemm", y, x, qweight, scales, 0, bias, M, N, K, 0, max_ctas, prefetch,
                          Fusion{geglu, norm_weight, residual, r_out, eps, rope}, dtype, stream);
}

void w4a16_gemm(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
                int64_t N, int64_t K, int64_t group_size, int64_t max_ctas, bool prefetch, bool geglu,
                int64_t norm_weight, int64_t residual, int64_t r_out, double eps, const RopeParams& rope, int dtype,
                int64_t stream) {
  check_group("w4a16_gemm", K, group_size);
  launch_gemv<Int4Format>("w4a16_gemm", y, x, qweight, scales, zeros, bias, M, N, K, group_size, max_ctas, prefetch,
                          Fusion{geglu, norm_weight, residual, r_out, eps, rope}, dtype, stream);
}

void dense_gemv(int64_t y, int64_t x, int64_t weight, int64_t bias, int64_t M, int64_t N, int64_t K, int64_t max_ctas,
                bool prefetch, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps,
                const RopeParams& rope, int dtype, int64_t stream) {
  launch_gemv<DenseFormat>("dense_gemv", y, x, weight, 0, 0, bias, M, N, K, 0, max_ctas, prefetch,
                           Fusion{geglu, norm_weight, residual, r_out, eps, rope}, dtype, stream);
}

}  // namespace gf
