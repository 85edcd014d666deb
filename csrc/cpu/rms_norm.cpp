// Gemma RMSNorm on the CPU, optionally fused with the residual add: one pass over each row.
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace gf::cpu {

template <typename T>
static void rms_norm_rows(T* y, T* r_out, const T* x, const T* res, const T* w, int64_t rows, int64_t n,
                          int64_t x_stride, int64_t res_stride, float eps) {
  std::vector<float> one_plus_w(n);
  for (int64_t i = 0; i < n; ++i) one_plus_w[i] = 1.0f + to_float(w[i]);
  const float* w1 = one_plus_w.data();
#pragma omp parallel for schedule(static) if (rows * n >= kParallelGrain)
  for (int64_t row = 0; row < rows; ++row) {
    std::vector<float> buf(n);
    float* r = buf.data();
    const T* xr = x + row * x_stride;
    if (res) {
      const T* rr = res + row * res_stride;
      T* ro = r_out + row * n;
      for (int64_t i = 0; i < n; ++i) {
        const T s = from_float<T>(to_float(xr[i]) + to_float(rr[i]));  // r, rounded once
        ro[i] = s;
        r[i] = to_float(s);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) r[i] = to_float(xr[i]);
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += r[i] * r[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    T* yr = y + row * n;
    for (int64_t i = 0; i < n; ++i) yr[i] = from_float<T>(r[i] * inv * w1[i]);
  }
}

void rms_norm(int64_t y, int64_t r_out, int64_t x, int64_t residual, int64_t weight, int64_t rows,
              int64_t hidden, int64_t x_stride, int64_t res_stride, double eps, int dtype) {
  require(rows >= 0 && hidden > 0, "rms_norm", "rows must be >= 0 and hidden > 0");
  require((residual == 0) == (r_out == 0), "rms_norm", "residual and r_out go together");
  dispatch(dtype, "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rms_norm_rows<T>(as_ptr<T>(y), as_ptr<T>(r_out), as_ptr<const T>(x), as_ptr<const T>(residual),
                     as_ptr<const T>(weight), rows, hidden, x_stride, res_stride, static_cast<float>(eps));
  });
}

}  // namespace gf::cpu
