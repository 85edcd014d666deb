// Rotate-half RoPE, in place on q [T, hq, D] and k [T, hk, D] (token strides arbitrary, heads and
// dims dense). For i < D/2: angle = float(pos) * inv_freq[i] (fp32, accurate sincosf) and
//   x'[i] = x[i] cos - x[i + D/2] sin,   x'[i + D/2] = x[i + D/2] cos + x[i] sin.
// One CTA per token: cos/sin of the token go to shared memory once, then threads sweep
// (head, V-element chunk of the first half) pairs of q and k.
#include "common/check.h"
#include "common/launch.cuh"
#include "common/vec.cuh"
#include "ops.h"

namespace gf {
namespace {

template <typename T, int V>
__global__ void rotary_kernel(T* q, T* k, const int64_t* __restrict__ positions,
                              const float* __restrict__ inv_freq, int hq, int hk, int half,
                              int64_t q_stride, int64_t k_stride) {
  GF_DYNAMIC_SMEM(float, cos_sin);  // [half] cos, then [half] sin
  prior_grids_done();
  const int64_t t = blockIdx.x;
  const float pos = static_cast<float>(positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) sincosf(pos * inv_freq[i], &cos_sin[half + i], &cos_sin[i]);
  __syncthreads();

  const int chunks = half / V;
  for (int idx = threadIdx.x; idx < (hq + hk) * chunks; idx += blockDim.x) {
    const int h = idx / chunks, c = (idx - h * chunks) * V;
    T* x = h < hq ? q + t * q_stride + int64_t{h} * 2 * half : k + t * k_stride + int64_t{h - hq} * 2 * half;
    float x1[V], x2[V], o1[V], o2[V];
    load_float(x + c, x1);
    load_float(x + half + c, x2);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float cs = cos_sin[c + j], sn = cos_sin[half + c + j];
      o1[j] = x1[j] * cs - x2[j] * sn;
      o2[j] = x2[j] * cs + x1[j] * sn;
    }
    store_float(x + c, o1);
    store_float(x + half + c, o2);
  }
}

}  // namespace

void rotary(int64_t q, int64_t k, int64_t positions, int64_t inv_freq, int64_t tokens, int64_t hq,
            int64_t hk, int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype, int64_t stream) {
  require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 4096, "rotary", "head_dim must be even and <= 4096");
  require(tokens <= 0x7fffffff, "rotary", "too many tokens");
  if (tokens == 0) return;
  const int half = static_cast<int>(head_dim / 2);
  dispatch_float(dtype, "rotary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    const int64_t es = sizeof(T);
    const bool vec = half % kV == 0 && aligned16(q) && aligned16(k) && (q_stride * es) % 16 == 0 &&
                     (k_stride * es) % 16 == 0;
    const int64_t work = (hq + hk) * (vec ? half / kV : half);
    const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, ceil_div(work, 32) * 32)));
    const size_t smem = 2 * half * sizeof(float);
    auto launch = [&](auto kernel) {
      launch_kernel(kernel, static_cast<unsigned>(tokens), threads, smem, as_stream(stream),
          as_ptr<T>(q), as_ptr<T>(k), as_ptr<const int64_t>(positions), as_ptr<const float>(inv_freq),
          static_cast<int>(hq), static_cast<int>(hk), half, q_stride, k_stride);
    };
    if (vec) launch(rotary_kernel<T, kV>);
    else launch(rotary_kernel<T, 1>);
  });
  check_launch("rotary");
}

}  // namespace gf
