// Kernel launches and dynamic shared memory, written once for both builds: the device one (nvcc) and
// the emulated one (GEMFORGE_EMULATED: csrc/emu/, every .cu compiled as host C++ and run thread by thread).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#ifdef GEMFORGE_EMULATED
#include "emu/simt.h"
#endif

// Declares `name`, the launch's dynamic shared memory, as an array of T. (A macro: nvcc reads the extern
// __shared__ array itself better than a pointer a function returns, which cost the decode attention kernel's
// loops 1-8 instructions each in sm_90a SASS.)
#ifdef GEMFORGE_EMULATED
#define GF_DYNAMIC_SMEM(T, name) T* const name = static_cast<T*>(::gf::emu::dynamic_smem())
#else
#define GF_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace gf {

// kernel<<<grid, block, smem, stream>>>(args...).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
#ifdef GEMFORGE_EMULATED
  (void)stream;
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

}  // namespace gf
