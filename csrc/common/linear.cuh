// What the linears of quant_gemv.cu (CUDA cores) and mma_gemv.cu (tensor cores) share: their launch's
// checks and, for every format and kernel, the two ops they make besides y = x W^T (+ bias) (ops.h):
// - geglu: y [M, N/2] = gelu_and_mul(x W^T), W's rows [gate; up]: the rows that one warp (CUDA cores) or
//   lane (tensor cores) computes together are a gate row i and its up row N/2 + i, so the activation is
//   applied where the dot products are summed and GeGLU costs no launch of its own;
// - a norm (NormArgs, up to kFusedMaxRows rows of x): x is replaced by rms_norm(x (+ residual)): each CTA
//   first sums the squares of its rows (x is K values a row, read from L2; norm_prologue), CTA 0 writes
//   the new residual stream x + residual, and the kernel takes x normalised (input_at) as it stages it;
//   the model's RMSNorm costs no launch of its own either.
#pragma once
#include "common/check.h"
#include "common/dtype.h"
#include "common/reduce.cuh"
#include "common/rms.cuh"

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

// What a launch makes besides x W^T (ops.h): geglu, and the input's norm (norm_weight nonzero).
struct Fusion {
  bool geglu;
  int64_t norm_weight, residual, r_out;
  double eps;
  bool norm() const { return norm_weight != 0; }
  template <typename T>
  NormArgs<T> args() const {
    return {as_ptr<const T>(residual), as_ptr<T>(r_out), as_ptr<const T>(norm_weight), static_cast<float>(eps)};
  }
};

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
