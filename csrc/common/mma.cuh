// Warp-level tensor-core helpers (sm_80+): mma.sync m16n8k16 with 16-bit operands and fp32 accumulation,
// and the 16-bit pair packing its fragments use. Fragment layout (lane = 4 r + c):
//   A (16 x 16, row-major): {(r, 2c..2c+1), (r + 8, 2c..), (r, 2c+8..2c+9), (r + 8, 2c+8..)}
//   B (16 x 8, column-major): {(2c..2c+1, r), (2c+8..2c+9, r)}
//   C/D (16 x 8, fp32): {(r, 2c), (r, 2c+1), (r + 8, 2c), (r + 8, 2c+1)}
// each A/B register holding a 16-bit pair (the lower index in the low half).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"

namespace gf {

// d += A (16 x 16, row-major fragment a) * B (16 x 8, column-major fragment b0, b1).
template <typename T>  // T: __nv_bfloat16 or __half
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

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
