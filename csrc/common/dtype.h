// Dtype codes shared with kernels/_native.py, fp32 <-> storage conversions and host dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

namespace gf {

// Must match _DTYPE_CODES in kernels/_native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T and back: the value a T tensor would hold.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the fp16/bf16 storage type named by `dtype`.
template <typename F> void dispatch_half(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat16: f(TypeTag<__half>{}); break;
    case kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: throw std::invalid_argument(std::string(op) + ": dtype code " + std::to_string(dtype) +
                                         " unsupported (expected float16 or bfloat16)");
  }
}

// As dispatch_half, also accepting fp32 (for the elementwise ops, where it is free).
template <typename F> void dispatch_float(int dtype, const char* op, F&& f) {
  if (dtype == kFloat32) f(TypeTag<float>{});
  else dispatch_half(dtype, op, f);
}

}  // namespace gf
