// Vectorized global loads/stores: N elements of T as one access (16 bytes when N = 16/sizeof(T)),
// converted to/from fp32 registers. N = 1 gives the scalar path for unaligned or odd sizes.
#pragma once
#include "dtype.h"

namespace gf {

template <typename T> constexpr int kVec16 = 16 / sizeof(T);  // elements per 16-byte access

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

}  // namespace gf
