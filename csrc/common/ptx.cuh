// The inline PTX of the kernels, each beside its host equivalent for the emulated build (GEMFORGE_EMULATED).
#pragma once
#include <cstdint>
#include <type_traits>

#include "dtype.h"
#ifdef GEMFORGE_EMULATED
#include "emu/simt.h"
#endif

namespace gf {

// d += A (16 x 16, row-major fragment a) * B (16 x 8, column-major fragment b0, b1), mma.sync m16n8k16 with
// T operands (__nv_bfloat16 or __half) and fp32 accumulation; layouts in mma.cuh.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#ifdef GEMFORGE_EMULATED
  emu::mma_16816(std::is_same_v<T, __nv_bfloat16>, d, a0, a1, a2, a3, b0, b1);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// (a & b) | c in one LOP3 (written out, the compiler splits it in two).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef GEMFORGE_EMULATED
  return (a & b) | c;
#else
  uint32_t p;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(p) : "r"(a), "r"(b), "r"(c));
  return p;
#endif
}

// Asks for the 128-byte line at p in L2 (a hint; nothing in the emulated build).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef GEMFORGE_EMULATED
  (void)p;
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

}  // namespace gf
