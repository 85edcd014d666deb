// Host-side argument checks and launch-error reporting shared by every op.
// std::invalid_argument surfaces in Python as ValueError, std::runtime_error as RuntimeError.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gf {

// Raises ValueError("<op>: <msg>") when `cond` is false.
inline void require(bool cond, const char* op, const std::string& msg) {
  if (!cond) throw std::invalid_argument(std::string(op) + ": " + msg);
}

// Raises RuntimeError naming the op and the CUDA error if the last launch failed.
inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gemforge._C.") + op + ": CUDA error: " + cudaGetErrorString(err));
}

// Raw addresses and streams cross the Python boundary as integers.
template <typename T>
inline T* as_ptr(int64_t addr) { return reinterpret_cast<T*>(static_cast<uintptr_t>(addr)); }
inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }
inline bool aligned16(int64_t addr) { return (addr & 15) == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gf
