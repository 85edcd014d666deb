// Greedy pick on the CPU: the index of each row's maximum of fp32 scores (the first on ties; a
// NaN counts as the maximum, its first index wins, as with torch.max). Two passes per row: the
// maximum and whether a NaN is present (vectorised), then a scan that stops at its first index.
#include "common.h"
#include "ops.h"

namespace gf::cpu {

static int64_t argmax_row(const float* x, int64_t n) {
  float m = x[0];
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  for (int64_t i = 0; i < n; ++i)
    if (nan ? x[i] != x[i] : x[i] == m) return i;
  return 0;  // unreachable for n > 0
}

void argmax(int64_t out, int64_t x, int64_t rows, int64_t n, int64_t stride) {
  require(rows >= 0 && n > 0 && stride >= n, "argmax", "need rows >= 0, n > 0 and a row stride >= n");
  auto* o = as_ptr<int64_t>(out);
  const auto* xp = as_ptr<const float>(x);
#pragma omp parallel for schedule(static) if (rows * n >= 4 * kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) o[r] = argmax_row(xp + r * stride, n);
}

}  // namespace gf::cpu
