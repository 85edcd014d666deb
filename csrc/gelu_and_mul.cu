// GeGLU: out[r, i] = gelu_tanh(g) * u with g = in[r, i], u = in[r, n + i], in fp32, one rounding
// (gelu_tanh: common/activation.cuh).
// Grid (rows, column blocks); each thread handles V consecutive columns (16 bytes when aligned).
#include "common/activation.cuh"
#include "common/check.h"
#include "common/launch.cuh"
#include "common/vec.cuh"
#include "ops.h"

namespace gf {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void gelu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t n) {
  prior_grids_done();
  const int64_t i = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * V;
  if (i >= n) return;
  const T* row = in + blockIdx.x * 2 * n;
  float g[V], u[V];
  load_float(row + i, g);
  load_float(row + n + i, u);
#pragma unroll
  for (int j = 0; j < V; ++j) g[j] = gelu_tanh(g[j]) * u[j];
  store_float(out + blockIdx.x * n + i, g);
}

}  // namespace

void gelu_and_mul(int64_t out, int64_t in, int64_t rows, int64_t n, int dtype, int64_t stream) {
  require(rows <= 0x7fffffff, "gelu_and_mul", "too many rows");
  if (rows == 0 || n == 0) return;
  dispatch_float(dtype, "gelu_and_mul", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    const bool vec = n % kV == 0 && aligned16(in) && aligned16(out);
    const int v = vec ? kV : 1;
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(ceil_div(n, int64_t{kThreads} * v)));
    const auto kernel = vec ? gelu_and_mul_kernel<T, kV> : gelu_and_mul_kernel<T, 1>;
    launch_kernel(kernel, grid, kThreads, 0, as_stream(stream), as_ptr<T>(out), as_ptr<const T>(in), n);
  });
  check_launch("gelu_and_mul");
}

}  // namespace gf
