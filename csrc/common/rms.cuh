// Gemma's RMSNorm element by element, shared by rms_norm.cu and the linears that normalise their input on
// the way in (quant_gemv.cu), so that both compute the same values:
//   r = round_T(x + residual)                           (residual_sum; the new residual stream)
//   y = r * inv_rms * (1 + w),  inv_rms = rsqrt(sum(r^2) / n + eps)   (fp32; rounded to T once, by the caller)
#pragma once
#include "dtype.h"

namespace gf {

template <typename T>
__device__ __forceinline__ float residual_sum(float x, float residual) { return round_to<T>(x + residual); }

// (__fdividef: an IEEE division's slow-path call made the GEMVs that normalise their input spill around it)
__device__ __forceinline__ float inv_rms(float sum_squares, int n, float eps) {
  return rsqrtf(__fdividef(sum_squares, float(n)) + eps);
}

__device__ __forceinline__ float rms_scaled(float r, float inv, float w) { return r * inv * (1.f + w); }

}  // namespace gf
