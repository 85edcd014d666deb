// GeGLU on the CPU: out = gelu_tanh(gate) * up, in fp32, rounded once. With z = sqrt(2/pi)(x + 0.044715 x^3),
// gelu_tanh(x) = x (1 + tanh z) / 2 = x / (1 + exp(-2z)).
#include "common.h"
#include "ops.h"

namespace gf::cpu {

template <typename T>
static void gelu_and_mul_rows(T* out, const T* in, int64_t rows, int64_t n) {
  constexpr float kTwoBeta = 2.0f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
#pragma omp parallel for schedule(static) if (rows * n >= kParallelGrain)
  for (int64_t row = 0; row < rows; ++row) {
    const T* g = in + row * 2 * n;
    const T* u = g + n;
    T* o = out + row * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = to_float(g[i]);
      const float gelu = x / (1.0f + exp_vec(-kTwoBeta * (x + kKappa * x * x * x)));
      o[i] = from_float<T>(gelu * to_float(u[i]));
    }
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
