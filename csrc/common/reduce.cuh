// Warp and block reductions over fp32 (butterfly shuffles; every participating lane gets the result).
#pragma once
#include <cuda_runtime.h>

namespace gf {

struct SumOp {
  __device__ static float identity() { return 0.f; }
  __device__ static float apply(float a, float b) { return a + b; }
};
struct MaxOp {
  __device__ static float identity() { return -__int_as_float(0x7f800000); }  // -inf
  __device__ static float apply(float a, float b) { return fmaxf(a, b); }
};

// Reduces over aligned groups of `Width` lanes (a power of two <= 32); all 32 lanes must call it.
template <typename Op, int Width = 32>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
  for (int off = Width / 2; off > 0; off >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<MaxOp>(v); }

// Reduces over the whole block (blockDim.x a multiple of 32); every thread gets the result.
// Safe to call repeatedly: the leading barrier protects the scratch from the previous call.
template <typename Op>
__device__ float block_reduce(float v) {
  __shared__ float scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_reduce<Op>(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_reduce<Op>(lane < nwarps ? scratch[lane] : Op::identity());
}

}  // namespace gf
