// Gemma RMSNorm, optionally fused with the residual add (common/rms.cuh):
//   r = round_T(x + residual)   (written to r_out)            [fused variant]
//   y = r * rsqrt(mean(r^2) + eps) * (1 + w)                  (fp32 math, one rounding to T)
// One CTA per row; V elements per access (16 bytes when hidden % V == 0 and rows are aligned,
// else scalar). Pass 2 re-reads the row, which the first pass left in L1.
#include "common/check.h"
#include "common/launch.cuh"
#include "common/reduce.cuh"
#include "common/rms.cuh"
#include "common/vec.cuh"
#include "ops.h"

namespace gf {
namespace {

template <typename T, int V>
__global__ void rms_norm_kernel(T* __restrict__ y, T* r_out, const T* __restrict__ x,
                                const T* __restrict__ residual, const T* __restrict__ weight,
                                int hidden, int64_t x_stride, int64_t res_stride, float eps) {
  prior_grids_done();
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  const T* rr = residual ? residual + row * res_stride : nullptr;
  T* ro = residual ? r_out + row * hidden : nullptr;
  const int step = blockDim.x * V;

  float sumsq = 0.f;
  for (int i = threadIdx.x * V; i < hidden; i += step) {
    float v[V];
    load_float(xr + i, v);
    if (rr) {
      float a[V];
      load_float(rr + i, a);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = residual_sum<T>(v[j], a[j]);
      store_float(ro + i, v);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) sumsq += v[j] * v[j];
  }
  const float inv = inv_rms(block_reduce<SumOp>(sumsq), hidden, eps);

  const T* src = rr ? ro : xr;  // the (rounded) r this thread wrote or read above
  T* yr = y + row * hidden;
  for (int i = threadIdx.x * V; i < hidden; i += step) {
    float v[V], w[V];
    load_float(src + i, v);
    load_float(weight + i, w);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = rms_scaled(v[j], inv, w[j]);
    store_float(yr + i, v);
  }
}

}  // namespace

void rms_norm(int64_t y, int64_t r_out, int64_t x, int64_t residual, int64_t weight, int64_t rows,
              int64_t hidden, int64_t x_stride, int64_t res_stride, double eps, int dtype, int64_t stream) {
  require(hidden > 0 && hidden <= (1 << 30), "rms_norm", "hidden size out of range");
  require((residual == 0) == (r_out == 0), "rms_norm", "residual and r_out must be given together");
  if (rows == 0) return;
  dispatch_float(dtype, "rms_norm", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    const int64_t es = sizeof(T);
    const bool vec = hidden % kV == 0 && (x_stride * es) % 16 == 0 && aligned16(x) && aligned16(y) &&
                     aligned16(weight) &&
                     (residual == 0 || ((res_stride * es) % 16 == 0 && aligned16(residual) && aligned16(r_out)));
    const int64_t per_thread = vec ? hidden / kV : hidden;
    const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, ceil_div(per_thread, 32) * 32)));
    auto launch = [&](auto kernel) {
      launch_kernel(kernel, static_cast<unsigned>(rows), threads, 0, as_stream(stream),
          as_ptr<T>(y), as_ptr<T>(r_out), as_ptr<const T>(x), as_ptr<const T>(residual),
          as_ptr<const T>(weight), static_cast<int>(hidden), x_stride, res_stride, static_cast<float>(eps));
    };
    if (vec) launch(rms_norm_kernel<T, kV>);
    else launch(rms_norm_kernel<T, 1>);
  });
  check_launch("rms_norm");
}

}  // namespace gf
