// Force-included before each .cu of the emulated build (GEMFORGE_EMULATED; see simt.h): the CUDA headers for
// their types and host-capable conversions, then the device built-ins the kernels use, on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu/simt.h"

// Execution spaces mean nothing here; a __shared__ variable is one per block, and one block runs at a time.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

inline void __syncthreads() { gf::emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) { return gf::emu::shfl_xor(v, lane_mask); }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }  // (on the GPU within 2 ulp of this)
inline float __sinf(float x) { return std::sin(x); }  // (on the GPU the SFU's: ~4e-7 off for |x| <= pi)
inline float __cosf(float x) { return std::cos(x); }
// Byte i of the result is byte s_i of the 8 bytes (y:x), s_i the i-th nibble of s (its low 3 bits).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = uint64_t{y} << 32 | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return out;
}
using std::max;
using std::min;

#define cudaGetLastError gf::emu::get_last_error
#define cudaGetErrorString gf::emu::error_string
#define cudaGetDevice gf::emu::get_device
#define cudaDeviceGetAttribute gf::emu::device_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor gf::emu::occupancy
#define cudaFuncGetAttributes gf::emu::func_attributes
