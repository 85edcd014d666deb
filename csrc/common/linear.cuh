// What the linears of quant_gemv.cu (CUDA cores) and mma_gemv.cu (tensor cores) share: their launch's
// checks and, for every format and kernel, the two ops they make besides y = x W^T (+ bias) (ops.h):
// - geglu: y [M, N/2] = gelu_and_mul(x W^T), W's rows [gate; up]: the rows that one warp (CUDA cores) or
//   lane (tensor cores) computes together are a gate row i and its up row N/2 + i, so the activation is
//   applied where the dot products are summed and GeGLU costs no launch of its own;
// - a norm (NormArgs, up to kFusedMaxRows rows of x): x is replaced by rms_norm(x (+ residual)): each CTA
//   first sums the squares of its rows (x is K values a row, read from L2; norm_prologue), CTA 0 writes
//   the new residual stream x + residual, and the kernel takes x normalised (input_at) as it stages it;
//   the model's RMSNorm costs no launch of its own either;
// - rope (RopeArgs, the QKV projection): y [M, N] = x W^T with its q and k heads rotated (RoPE at each row's
//   position) and its k and v heads also written to the paged caches: the rows computed together are rows
//   d and d + D/2 of one head, the two that RoPE rotates into each other, so the attention layer's
//   rotary_write_kv costs no launch of its own.
// geglu and rope are the two paired epilogues (Epilogue): a warp or lane computes pair p's two rows and
// store_pair writes what they make.
#pragma once
#include "common/activation.cuh"
#include "common/check.h"
#include "common/dtype.h"
#include "common/reduce.cuh"
#include "common/rms.cuh"
#include "ops.h"

#include <algorithm>
#include <string>
#include <type_traits>

namespace gf {
namespace {

constexpr int kThreads = 256;
constexpr int kFusedMaxRows = 4;  // rows of x with a norm, or on the CUDA cores with geglu (the int4 GEMV
                                  // with geglu at 8 rows spilled 32 B on sm_80)

// The input's RMSNorm, made by the linear (Norm kernels): x [M, K] becomes
// rms_norm(x (+ residual), weight, eps) (common/rms.cuh), residual [M, K] may be null.
template <typename T>
struct NormArgs {
  const T* residual;
  T* r_out;  // x + residual [M, K], written by CTA 0 (with a residual)
  const T* weight;
  float eps;
};

// The Norm kernels' prologue, by every CTA (kThreads threads): 1 / rms of each of x's M <= MT rows, in
// shared memory; CTA 0 also writes r_out. A row of x is at most a few thousand values, read from L2.
template <typename T, int MT>
__device__ __forceinline__ const float* norm_prologue(const T* __restrict__ x, NormArgs<T> norm, int M, int K) {
  __shared__ float partial[kThreads / 32][MT], inv[MT];
  float squares[MT] = {};
  for (int k = threadIdx.x; k < K; k += kThreads)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      const int64_t i = int64_t{m} * K + k;
      float v = to_float(x[i]);
      if (norm.residual) {
        v = residual_sum<T>(v, to_float(norm.residual[i]));
        if (blockIdx.x == 0) norm.r_out[i] = from_float<T>(v);
      }
      squares[m] += v * v;
    }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float sum = warp_sum(squares[m]);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5][m] = sum;
  }
  __syncthreads();
  if (threadIdx.x < MT) {
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w][threadIdx.x];
    inv[threadIdx.x] = inv_rms(sum, K, norm.eps);
  }
  __syncthreads();
  return inv;
}

// x[m, k] as the linear takes it: as stored, or (Norm) normalised with the prologue's 1 / rms and rounded
// to T as the rms_norm op's output would be.
template <typename T, bool Norm>
__device__ __forceinline__ float input_at(const T* __restrict__ x, NormArgs<T> norm, const float* inv, int m,
                                          int K, int64_t k) {
  const int64_t i = int64_t{m} * K + k;
  if constexpr (!Norm) {
    return to_float(x[i]);
  } else {
    const float v = norm.residual ? residual_sum<T>(to_float(x[i]), to_float(norm.residual[i])) : to_float(x[i]);
    return round_to<T>(rms_scaled(v, inv[m], to_float(norm.weight[k])));
  }
}

// What a linear writes from its sums: y as computed (kPlain) or one of the paired epilogues.
enum class Epilogue { kPlain, kGeglu, kRope };

// RoPE and the cache write in the QKV projection's epilogue (Epilogue::kRope): W's rows are q_heads, then
// kv_heads k and kv_heads v heads of head_dim rows. Row m of x is the token at positions[m], written to cache
// slot slots[m] (none if negative) of k_cache / v_cache [slots, kv_heads, head_dim]; inv_freq [head_dim / 2].
template <typename T>
struct RopeArgs {
  const int64_t* positions;
  const float* inv_freq;
  const int64_t* slots;
  T* k_cache;
  T* v_cache;
  int q_heads, kv_heads, head_dim;
};

// The first of pair p's two rows of W; the second is `span` rows on. kGeglu: gate row p and up row N/2 + p
// (span N/2); kRope: rows d and d + D/2 of one head (span D/2).
template <Epilogue E>
__device__ __forceinline__ int64_t pair_row(int64_t p, int64_t span) {
  if constexpr (E == Epilogue::kGeglu) return p;
  else return p / span * (2 * span) + p % span;
}

template <Epilogue E, typename T>
__device__ __forceinline__ int64_t pair_span(int N, const RopeArgs<T>& rope) {
  return E == Epilogue::kGeglu ? N / 2 : rope.head_dim / 2;
}

// sin and cos of a RoPE angle x = position * inv_freq, |x| < 105615 (positions below 105615; Gemma's contexts
// end at 8192): x = q pi/2 + r by the three-step FMA reduction of CUDA's own sincosf, then the SFU's sin and cos
// of |r| <= pi/4 (absolute error ~4e-7, below a 16-bit output's rounding). sincosf itself carries a slow path
// for larger x whose local array gave every RoPE kernel a 32-byte stack frame.
__device__ __forceinline__ void rope_sincos(float x, float& sn, float& cs) {
  const float q = rintf(x * 0.636619747f);
  float r = fmaf(q, -1.57079601e+00f, x);
  r = fmaf(q, -3.13916473e-07f, r);
  r = fmaf(q, -5.39030253e-15f, r);
  const float s = __sinf(r), c = __cosf(r);
  const int quadrant = static_cast<int>(q) & 3;  // sin(r + q pi/2), cos(r + q pi/2)
  sn = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  cs = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

// What row m of x makes of pair (row, row + span)'s sums a and b (bias added), as the separate ops would from
// the rounded projection: kGeglu y[m, row] of y [M, N/2] = gelu_and_mul; kRope y[m, row] and y[m, row + D/2]
// of y [M, N], rotated in q and k heads (as csrc/rotary.cu, but for rope_sincos), and in k and v heads also in
// the caches.
template <Epilogue E, typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ y, const RopeArgs<T>& rope, int N, int m, int64_t row,
                                           float a, float b) {
  if constexpr (E == Epilogue::kGeglu) {
    y[int64_t{m} * (N / 2) + row] = from_float<T>(geglu<T>(a, b));
  } else {
    const int half = rope.head_dim / 2, head = static_cast<int>(row / rope.head_dim);
    const int d = static_cast<int>(row - int64_t{head} * rope.head_dim);
    float lo = round_to<T>(a), hi = round_to<T>(b);
    if (head < rope.q_heads + rope.kv_heads) {
      float sn, cs;
      rope_sincos(static_cast<float>(rope.positions[m]) * rope.inv_freq[d], sn, cs);
      const float x1 = lo;
      lo = x1 * cs - hi * sn;
      hi = hi * cs + x1 * sn;
    }
    const T out_lo = from_float<T>(lo), out_hi = from_float<T>(hi);
    y[int64_t{m} * N + row] = out_lo;
    y[int64_t{m} * N + row + half] = out_hi;
    const int64_t slot = rope.slots[m];
    if (head >= rope.q_heads && slot >= 0) {
      const bool key = head < rope.q_heads + rope.kv_heads;
      const int kv_head = head - rope.q_heads - (key ? 0 : rope.kv_heads);
      T* cache = (key ? rope.k_cache : rope.v_cache) + (slot * rope.kv_heads + kv_head) * rope.head_dim + d;
      cache[0] = out_lo;
      cache[half] = out_hi;
    }
  }
}

// Shared memory a CTA may use without opting in to more: its __shared__ arrays and the launch's dynamic
// share together.
constexpr size_t kSmemPerCta = 48 * 1024;

// Bytes of `kernel`'s __shared__ arrays (the norm's sums, the tensor-core kernel's partial sums): what the
// dynamic share of a launch must leave of kSmemPerCta.
template <class Kernel>
size_t static_smem(Kernel kernel) {
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, kernel);
  return attr.sharedSizeBytes;
}

// CTAs of `kernel` (kThreads threads, `smem` bytes) that the current device holds at once.
template <class Kernel>
int64_t resident_ctas(Kernel kernel, size_t smem) {
  int dev = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  return int64_t{std::max(per_sm, 1)} * std::max(sms, 1);
}

// What a launch makes besides x W^T (ops.h): geglu, the input's norm (norm_weight nonzero), and rope
// (rope[0], the positions, nonzero: RopeParams).
struct Fusion {
  bool geglu;
  int64_t norm_weight, residual, r_out;
  double eps;
  RopeParams rope_params;
  bool norm() const { return norm_weight != 0; }
  bool rope() const { return rope_params[0] != 0; }
  Epilogue epilogue() const { return geglu ? Epilogue::kGeglu : rope() ? Epilogue::kRope : Epilogue::kPlain; }
  template <typename T>
  NormArgs<T> args() const {
    return {as_ptr<const T>(residual), as_ptr<T>(r_out), as_ptr<const T>(norm_weight), static_cast<float>(eps)};
  }
  template <typename T>
  RopeArgs<T> rope_args() const {
    const auto& r = rope_params;
    return {as_ptr<const int64_t>(r[0]), as_ptr<const float>(r[1]), as_ptr<const int64_t>(r[2]), as_ptr<T>(r[3]),
            as_ptr<T>(r[4]), static_cast<int>(r[5]), static_cast<int>(r[6]), static_cast<int>(r[7])};
  }
};

// Calls f(std::integral_constant<Epilogue, e>{}).
template <typename F> void dispatch_epilogue(Epilogue e, F&& f) {
  if (e == Epilogue::kGeglu) f(std::integral_constant<Epilogue, Epilogue::kGeglu>{});
  else if (e == Epilogue::kRope) f(std::integral_constant<Epilogue, Epilogue::kRope>{});
  else f(std::integral_constant<Epilogue, Epilogue::kPlain>{});
}

// The checks every linear launch here shares: 1-16 rows of x, an N x K weight indexable in 32 bits;
// with geglu an even N (gate and up rows); the norm (and on the CUDA cores geglu) up to kFusedMaxRows rows.
void check_shape(const char* op, int64_t M, int64_t N, int64_t K, const Fusion& fusion, bool cuda_cores) {
  require(M >= 1 && M <= 16, op, "M (rows of x) must be in [1, 16], got " + std::to_string(M));
  require(N >= 1 && N < (int64_t{1} << 31) && K >= 1 && K < (int64_t{1} << 31), op, "N and K must be in [1, 2^31)");
  require(!fusion.geglu || N % 2 == 0, op, "geglu needs an even N (gate and up rows), got " + std::to_string(N));
  require(!(fusion.norm() || (cuda_cores && fusion.geglu)) || M <= kFusedMaxRows, op,
          std::string(fusion.norm() ? "the norm" : "geglu") + " takes at most " + std::to_string(kFusedMaxRows) +
              " rows of x");
  require(fusion.norm() || (fusion.residual == 0 && fusion.r_out == 0), op, "a residual needs the norm");
  require((fusion.residual == 0) == (fusion.r_out == 0), op, "residual and r_out must be given together");
  if (!fusion.rope()) return;
  const auto& r = fusion.rope_params;
  const int64_t hq = r[5], hk = r[6], d = r[7];
  require(!fusion.geglu, op, "geglu and rope cannot be asked together");
  require(!cuda_cores || M <= kFusedMaxRows, op, "rope takes at most " + std::to_string(kFusedMaxRows) + " rows of x");
  require(r[1] != 0 && r[2] != 0 && r[3] != 0 && r[4] != 0, op, "rope needs inv_freq, slots, k_cache and v_cache");
  require(hq >= 1 && hk >= 1 && d >= 2 && d % 2 == 0 && d <= 4096, op,
          "rope needs q_heads >= 1, kv_heads >= 1 and an even head_dim <= 4096, got " + std::to_string(hq) + ", " +
              std::to_string(hk) + ", " + std::to_string(d));
  require(N == (hq + 2 * hk) * d, op, "rope: N must be (q_heads + 2 kv_heads) * head_dim = " +
                                          std::to_string((hq + 2 * hk) * d) + ", got " + std::to_string(N));
}

// Calls f(std::bool_constant<b>{}).
template <typename F> void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// int4's group: 32, 64 or 128 inputs, dividing K.
void check_group(const char* op, int64_t K, int64_t group_size) {
  require(group_size == 32 || group_size == 64 || group_size == 128, op,
          "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  require(K % group_size == 0, op, "K must be a multiple of group_size");
}

}  // namespace
}  // namespace gf
