// Greedy pick on the CPU: the index of each row's maximum of fp32 scores (the first on ties; a
// NaN counts as the maximum, its first index wins, as with torch.max). With AVX-512 one pass per
// row: each of 16 lanes keeps its maximum and where it first occurred, and NaNs are noted; the
// lanes then give the first index of the overall maximum (a row with a NaN, rare, is scanned
// again for its first NaN). Otherwise, and for rows shorter than 16: the maximum and whether a NaN
// is present (vectorised), then a scan that stops at its first index.
#include "common.h"
#include "ops.h"

namespace gf::cpu {

static int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return i;
  return -1;
}

static int64_t argmax_two_pass(const float* x, int64_t n) {
  float m = x[0];
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  if (nan) return first_nan(x, n);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // unreachable for n > 0
}

#if defined(__AVX512F__)
static int64_t argmax_row(const float* x, int64_t n) {
  const int64_t full = n - n % 16;
  if (full == 0 || n > INT32_MAX) return argmax_two_pass(x, n);  // short rows; lane indices are int32
  __m512 m = _mm512_loadu_ps(x);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), idx = at;
  __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
  for (int64_t i = 16; i < full; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
    const __mmask16 gt = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ);  // strictly greater: the first stays
    m = _mm512_mask_mov_ps(m, gt, v);
    idx = _mm512_mask_mov_epi32(idx, gt, at);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  bool tail_nan = false;
  for (int64_t i = full; i < n; ++i) tail_nan |= x[i] != x[i];
  if (nan || tail_nan) return first_nan(x, n);
  const float top = _mm512_reduce_max_ps(m);
  int64_t best = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(m, _mm512_set1_ps(top), _CMP_EQ_OQ), idx);
  float best_v = top;
  for (int64_t i = full; i < n; ++i)  // the tail comes after every lane: only a greater value wins
    if (x[i] > best_v) best_v = x[i], best = i;
  return best;
}
#else
static int64_t argmax_row(const float* x, int64_t n) { return argmax_two_pass(x, n); }
#endif

void argmax(int64_t out, int64_t x, int64_t rows, int64_t n, int64_t stride) {
  require(rows >= 0 && n > 0 && stride >= n, "argmax", "need rows >= 0, n > 0 and a row stride >= n");
  auto* o = as_ptr<int64_t>(out);
  const auto* xp = as_ptr<const float>(x);
#pragma omp parallel for schedule(static) if (rows * n >= 4 * kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) o[r] = argmax_row(xp + r * stride, n);
}

}  // namespace gf::cpu
