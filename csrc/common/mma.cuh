// Warp-level tensor-core helpers (sm_80+): the fragments of mma.sync m16n8k16 (mma_16816, ptx.cuh) with
// 16-bit operands and fp32 accumulation, and the 16-bit pair packing they use. Fragment layout (lane = 4 r + c):
//   A (16 x 16, row-major): {(r, 2c..2c+1), (r + 8, 2c..), (r, 2c+8..2c+9), (r + 8, 2c+8..)}
//   B (16 x 8, column-major): {(2c..2c+1, r), (2c+8..2c+9, r)}
//   C/D (16 x 8, fp32): {(r, 2c), (r, 2c+1), (r + 8, 2c), (r + 8, 2c+1)}
// each A/B register holding a 16-bit pair (the lower index in the low half).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "ptx.cuh"

namespace gf {

// (lo, hi) rounded to T, as a 16-bit pair.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return uint32_t{a} | uint32_t{b} << 16;
}

template <typename T>
__device__ __forceinline__ uint32_t pair_of(float v) { return pack_pair<T>(v, v); }

template <int Bytes> struct VecLoad;  // Bytes (16, 8 or 4) of global memory in one load, as 32-bit words
template <> struct VecLoad<16> { using type = uint4; };
template <> struct VecLoad<8> { using type = uint2; };
template <> struct VecLoad<4> { using type = uint32_t; };

}  // namespace gf
