// Rotate-half RoPE on the CPU, in place: angle = pos * inv_freq (fp32),
// x[i] <- x[i] cos - x[i + D/2] sin,  x[i + D/2] <- x[i + D/2] cos + x[i] sin, rounded once.
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace gf::cpu {

template <typename T>
static void rotate_heads(T* x, int64_t heads, int64_t half, const float* cos, const float* sin) {
  for (int64_t h = 0; h < heads; ++h) {
    T* a = x + h * 2 * half;
    T* b = a + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = to_float(a[i]), x2 = to_float(b[i]);
      a[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      b[i] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

template <typename T>
static void rotary_tokens(T* q, T* k, const int64_t* pos, const float* inv_freq, int64_t tokens, int64_t hq,
                          int64_t hk, int64_t half, int64_t q_stride, int64_t k_stride) {
#pragma omp parallel for schedule(static) if (tokens * (hq + hk) * half >= kParallelGrain)
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<float> cs(2 * half);
    const float p = static_cast<float>(pos[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = p * inv_freq[i];
      cs[i] = std::cos(angle);
      cs[half + i] = std::sin(angle);
    }
    rotate_heads(q + t * q_stride, hq, half, cs.data(), cs.data() + half);
    rotate_heads(k + t * k_stride, hk, half, cs.data(), cs.data() + half);
  }
}

void rotary(int64_t q, int64_t k, int64_t positions, int64_t inv_freq, int64_t tokens, int64_t hq,
            int64_t hk, int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype) {
  require(head_dim > 0 && head_dim % 2 == 0, "rotary", "head_dim must be even and > 0");
  dispatch(dtype, "rotary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rotary_tokens<T>(as_ptr<T>(q), as_ptr<T>(k), as_ptr<const int64_t>(positions), as_ptr<const float>(inv_freq),
                     tokens, hq, hk, head_dim / 2, q_stride, k_stride);
  });
}

}  // namespace gf::cpu
