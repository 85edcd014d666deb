// The emulated device's scheduler (see simt.h): fibers, one per CUDA thread of the running block, switched by
// hand (x86-64: the callee-saved registers and the FP control words; glibc's swapcontext makes a system call
// per switch, and a warp collective takes 64 switches).
#include "emu/simt.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <stdexcept>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// gf_emu_switch(&save_sp, load_sp): saves this context's registers on its stack and its stack pointer in
// save_sp, then resumes the context whose stack pointer is load_sp.
extern "C" void gf_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl gf_emu_switch
  .type gf_emu_switch, @function
gf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gf_emu_switch, .-gf_emu_switch
)");

namespace gf::emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { Ready, AtBarrier, AtWarp, Done };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  State state = State::Ready;
  uint64_t collectives = 0;  // warp collectives this thread has completed
  bool waited = false;       // called prior_grids_done
};

// The running block; one launch at a time (callers hold the GIL).
struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<unsigned char> smem;
  std::vector<unsigned char> slots;  // [warp][2][lane][kSlotBytes]: collectives alternate halves
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // its bottom and size (for AddressSanitizer builds)
  size_t scheduler_stack_size = 0;
  const std::function<void()>* body = nullptr;
  int current = -1;
} blk;

// gf_emu_switch, told to AddressSanitizer where it builds with it (the stack it goes to, [bottom, bottom + size);
// `last`: the context left never resumes).
void switch_to(void** save_sp, void* load_sp, const void* bottom, size_t size, bool last = false) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(last ? nullptr : &fake_stack, bottom, size);
  gf_emu_switch(save_sp, load_sp);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)bottom, (void)size, (void)last;
  gf_emu_switch(save_sp, load_sp);
#endif
}

void yield(State s) {
  Fiber& f = blk.fibers[blk.current];
  f.state = s;
  switch_to(&f.sp, blk.scheduler_sp, blk.scheduler_stack, blk.scheduler_stack_size, s == State::Done);
}

[[noreturn]] void fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &blk.scheduler_stack, &blk.scheduler_stack_size);
#endif
  (*blk.body)();
  yield(State::Done);
  __builtin_unreachable();  // (a finished fiber is never resumed)
}

// A stack whose first switch into it "returns" into fiber_main with the ABI's alignment.
void* fresh_stack(std::vector<char>& stack) {
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(stack.data(), stack.size());  // (a finished fiber's frames never returned)
#endif
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack.data()) + stack.size()) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // the return address, 16-byte aligned
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  slot[1] = 0;
  uint64_t* sp = slot - 7;  // rbp, rbx, r12-r15 (zeros) and the FP control words, as gf_emu_switch pops them
  for (int i = 1; i < 7; ++i) sp[i] = 0;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0; fnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  memcpy(sp, &mxcsr, 4);
  memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  return sp;
}

std::string where(dim3 grid_pos) {
  return "block (" + std::to_string(grid_pos.x) + ", " + std::to_string(grid_pos.y) + ", " +
         std::to_string(grid_pos.z) + ")";
}

// Runs warp w's threads until each has finished or waits at __syncthreads; a warp collective completes as soon
// as all the warp's threads have arrived.
void run_warp(int w, int n) {
  const int l0 = 32 * w, l1 = std::min(n, l0 + 32);
  for (;;) {
    int at_warp = 0;
    for (int i = l0; i < l1; ++i) {
      Fiber& f = blk.fibers[i];
      if (f.state == State::Ready) {
        blk.current = i;
        threadIdx = uint3{unsigned(i % blockDim.x), unsigned(i / blockDim.x % blockDim.y),
                          unsigned(i / (blockDim.x * blockDim.y))};
        switch_to(&blk.scheduler_sp, f.sp, blk.stacks[i].data(), blk.stacks[i].size());
        if (!f.waited)
          throw std::runtime_error("thread " + std::to_string(i) + " reached " +
                                   (f.state == State::Done ? "its end" : f.state == State::AtBarrier ?
                                    "__syncthreads" : "a warp collective") +
                                   " without calling prior_grids_done() first (launch.cuh)");
      }
      at_warp += f.state == State::AtWarp;
    }
    if (at_warp == 0) return;
    if (at_warp != l1 - l0)
      throw std::runtime_error("warp " + std::to_string(w) + ": " + std::to_string(at_warp) + " of " +
                               std::to_string(l1 - l0) + " lanes wait at a warp collective that the others " +
                               "never reach (they wait at __syncthreads or have exited)");
    for (int i = l0; i < l1; ++i) {
      if (blk.fibers[i].collectives != blk.fibers[l0].collectives)
        throw std::runtime_error("warp " + std::to_string(w) + ": lanes at different warp collectives");
      blk.fibers[i].state = State::Ready;
    }
  }
}

// Warps run one at a time, each as far as it can go (to the next __syncthreads) before the next starts, in an
// order drawn anew at each barrier (a fixed pseudo-random sequence per block): the widest skew between warps a
// GPU allows, in many orders over a test's blocks, so that a missing __syncthreads shows in results.
void run_block(int n) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = blk.fibers[i];
    f.state = State::Ready;
    f.collectives = 0;
    f.waited = false;
    f.sp = fresh_stack(blk.stacks[i]);
  }
  const int warps = (n + 31) / 32;
  std::vector<int> order(warps);
  for (int w = 0; w < warps; ++w) order[w] = w;
  uint64_t draw = 0x9E3779B97F4A7C15ull * (1 + blockIdx.x + 65536ull * (blockIdx.y + 65536ull * blockIdx.z));
  for (;;) {
    for (int k = warps - 1; k > 0; --k) {  // Fisher-Yates with xorshift64
      draw ^= draw << 13, draw ^= draw >> 7, draw ^= draw << 17;
      std::swap(order[k], order[draw % (k + 1)]);
    }
    for (int w : order) run_warp(w, n);
    bool live = false;  // every live thread now waits at __syncthreads (exited ones count as arrived)
    for (Fiber& f : blk.fibers)
      if (f.state == State::AtBarrier) f.state = State::Ready, live = true;
    if (!live) return;
  }
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw std::runtime_error("emulated launch: " + std::to_string(n) + " threads per block");
  // (a GPU takes more only from a kernel that raised its cudaFuncAttributeMaxDynamicSharedMemorySize, which no
  // kernel here does; what its __shared__ arrays add, a host build cannot tell)
  if (smem_bytes > 48 * 1024) throw std::runtime_error("emulated launch: " + std::to_string(smem_bytes) +
                                                       " bytes of dynamic shared memory (over 48 KiB)");
  blk.fibers.resize(n);
  if (blk.stacks.size() < size_t(n)) blk.stacks.resize(n);
  for (auto& s : blk.stacks)
    if (s.size() < kStackBytes) s.resize(kStackBytes);
  blk.slots.assign(size_t((n + 31) / 32) * 2 * 32 * kSlotBytes, 0);
  blk.body = &body;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        blk.smem.assign(smem_bytes, 0xff);  // (uninitialised on a GPU: NaN-like bytes, never zeros)
        try {
          run_block(n);
        } catch (const std::runtime_error& e) {
          throw std::runtime_error(std::string("gemforge emulated kernel, ") + where(blockIdx) + ": " + e.what());
        }
      }
}

void* dynamic_smem() { return blk.smem.data(); }

void syncthreads() { yield(State::AtBarrier); }

void prior_grids_done() { blk.fibers[blk.current].waited = true; }

int lane_id() { return blk.current & 31; }

const unsigned char* warp_gather(const void* mine, size_t bytes) {
  Fiber& f = blk.fibers[blk.current];
  const int warp = blk.current >> 5;
  unsigned char* half = blk.slots.data() + (size_t(warp) * 2 + (f.collectives & 1)) * 32 * kSlotBytes;
  memcpy(half + size_t(lane_id()) * kSlotBytes, mine, bytes);
  yield(State::AtWarp);
  ++f.collectives;
  return half;
}

void mma_16816(bool bf16, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
               uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};  // a fragment: words 0-3, b: 4-5
  const unsigned char* all = warp_gather(mine, sizeof mine);
  auto element = [&](int lane, int word, int k) {  // the 16-bit value k % 2 of a lane's word, as a double
    uint32_t w;
    memcpy(&w, all + size_t(lane) * kSlotBytes + 4 * word, 4);
    const uint16_t h = uint16_t(w >> (16 * (k & 1)));
    if (bf16) {
      const uint32_t bits = uint32_t{h} << 16;
      float v;
      memcpy(&v, &bits, 4);
      return double(v);
    }
    __half_raw raw;
    raw.x = h;
    return double(__half2float(__half(raw)));
  };
  const int r = lane_id() >> 2, c = lane_id() & 3;
  double a[2][16], b[16][2];  // A's rows r, r + 8 and B's columns 2c, 2c + 1
  for (int k = 0; k < 16; ++k) {
    const int quad = (k % 8) / 2, hi = k >= 8;
    for (int i = 0; i < 2; ++i) {
      a[i][k] = element(4 * r + quad, i + 2 * hi, k);
      b[k][i] = element(4 * (2 * c + i) + quad, 4 + hi, k);
    }
  }
  for (int i = 0; i < 4; ++i) {
    double sum = 0;
    for (int k = 0; k < 16; ++k) sum += a[i >> 1][k] * b[k][i & 1];
    d[i] = float(double(d[i]) + sum);
  }
}

cudaError_t get_last_error() { return cudaSuccess; }
const char* error_string(cudaError_t) { return "no error (emulated device)"; }
cudaError_t get_device(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 132 : attr == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}

}  // namespace gf::emu
