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

// Whether launches are programmatic dependent launches (set_programmatic_launch, ops.h; on sm_90 and later): a
// kernel may then be scheduled while the previous kernel of its stream still runs, once every CTA of that one
// has started, and waits in prior_grids_done() (each kernel's first statement) for it to finish.
bool programmatic_launch();

// Every kernel's first statement: lets the next kernel of the stream be scheduled, then waits until the previous
// one has finished and its writes are visible. Before it a kernel may touch only what no kernel writes (weights).
// Where the launch was not programmatic, or before sm_90, there is nothing to wait for.
__device__ __forceinline__ void prior_grids_done() {
#if defined(GEMFORGE_EMULATED)
  emu::prior_grids_done();  // (checks that each thread calls it before any barrier, collective or exit)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), programmatic where programmatic_launch() says so.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
#ifdef GEMFORGE_EMULATED
  (void)stream;
  emu::run_grid(grid, block, smem, [&] { kernel(args...); });
#else
  if (!programmatic_launch()) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // (an error is read by check_launch)
#endif
}

}  // namespace gf
