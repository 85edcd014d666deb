// GeGLU on the CPU: out = gelu_tanh(gate) * up (gelu_mul, common.h), in fp32, rounded once.
#include "common.h"
#include "ops.h"

namespace gf::cpu {

template <typename T>
static void gelu_and_mul_rows(T* out, const T* in, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n >= kParallelGrain)
  for (int64_t row = 0; row < rows; ++row) {
    const T* g = in + row * 2 * n;
    const T* u = g + n;
    T* o = out + row * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = from_float<T>(gelu_mul(to_float(g[i]), to_float(u[i])));
  }
}

void gelu_and_mul(int64_t out, int64_t in, int64_t rows, int64_t n, int dtype) {
  require(rows >= 0 && n > 0, "gelu_and_mul", "need rows >= 0 and n > 0");
  dispatch(dtype, "gelu_and_mul", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gelu_and_mul_rows<T>(as_ptr<T>(out), as_ptr<const T>(in), rows, n);
  });
}

}  // namespace gf::cpu
