// GeGLU's activation, shared by gelu_and_mul.cu and the linears that fuse it (quant_gemv.cu):
//   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))   (as torch's approximate="tanh")
//   geglu<T>(g, u) = gelu_tanh(g) * u over g and u rounded to T first: the value gelu_and_mul computes from a
//   T tensor holding the gate and up projections (fused, the projections never leave fp32 registers).
#pragma once
#include "dtype.h"

namespace gf {

__device__ __forceinline__ float gelu_tanh(float g) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  return 0.5f * g * (1.f + tanhf(kBeta * (g + kKappa * g * g * g)));
}

template <typename T>
__device__ __forceinline__ float geglu(float gate, float up) {
  return gelu_tanh(round_to<T>(gate)) * round_to<T>(up);
}

}  // namespace gf
