// The emulated device of GEMFORGE_EMULATED builds: the CUDA kernels compiled as host C++ (cuda_emu.h) and a grid
// run on the host, one block after another, each CUDA thread a fiber that runs until it waits at a barrier
// (__syncthreads) or a warp collective (shuffles, mma.sync), which completes when every thread it concerns
// has arrived. Warps run one at a time, each to its next __syncthreads (simt.cpp), so that a missing
// barrier shows. A block whose threads wait on each other in a way no arrival can complete (a collective some
// of a warp's lanes skip, collectives that diverge) raises RuntimeError instead of hanging.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

namespace gf::emu {

constexpr size_t kSlotBytes = 64;  // what one lane may contribute to a warp collective

// Runs body (the kernel call) as every thread of every block of the grid; returns when all have finished.
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
void* dynamic_smem();  // the running block's dynamic shared memory
// gf::prior_grids_done (launch.cuh): a thread that reaches __syncthreads, a warp collective or its end without
// having called it first makes the launch raise RuntimeError.
void prior_grids_done();
void syncthreads();
int lane_id();
// Each lane of the calling warp contributes `bytes` from `mine`; once all 32 have, returns lane l's
// contribution at offset l * kSlotBytes (valid until the warp's next collective but one).
const unsigned char* warp_gather(const void* mine, size_t bytes);

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= kSlotBytes, "shuffled value too large");
  const unsigned char* all = warp_gather(&v, sizeof v);
  T out;
  memcpy(&out, all + size_t(lane_id() ^ lane_mask) * kSlotBytes, sizeof out);
  return out;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} (fragment layout in common/mma.cuh): d += A B, the 16
// (exact) products of each output summed in fp64 and added to d, rounded once to fp32 (the hardware's order
// and rounding of the sum differ, within fp32's).
void mma_16816(bool bf16, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
               uint32_t b1);

// The CUDA runtime calls of the launch code: an emulated H100 (132 SMs).
cudaError_t get_last_error();
const char* error_string(cudaError_t err);
cudaError_t get_device(int* dev);
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int dev);
template <typename F>
cudaError_t func_attributes(cudaFuncAttributes* attr, F) {  // (a host build's __shared__ arrays: none to report)
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}
template <typename F>
cudaError_t occupancy(int* blocks, F, int block_size, size_t smem) {
  constexpr size_t kSmemPerSm = 228 * 1024;
  const int by_threads = 2048 / block_size, by_smem = int(kSmemPerSm / (smem + 1024));
  *blocks = by_threads < by_smem ? by_threads : by_smem;
  return cudaSuccess;
}

}  // namespace gf::emu
