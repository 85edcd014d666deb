// The tied embedding's lookup from its packed table (the layout of linear.cpp: w [N, K] as
// [ceil(N / 16)][ceil(K / 2)][16][2]): out[t, k] = w[ids[t], k] * scale, the product in fp32 and
// rounded once to bf16, as torch multiplies two bf16 tensors.
#include <string>

#include "common.h"
#include "ops.h"

namespace gf::cpu {

void embed_packed_bf16(int64_t out, int64_t table, int64_t ids, int64_t tokens, int64_t N, int64_t K, double scale) {
  const auto* id = as_ptr<const int64_t>(ids);
  for (int64_t t = 0; t < tokens; ++t)
    require(id[t] >= 0 && id[t] < N, "embedding", "token id " + std::to_string(id[t]) + " at position " +
                                                      std::to_string(t) + " is outside the vocabulary of " +
                                                      std::to_string(N));
  auto* o = as_ptr<bf16>(out);
  const auto* w = as_ptr<const bf16>(table);
  const float s = static_cast<float>(scale);
  const int64_t pairs = (K + 1) / 2;
#pragma omp parallel for schedule(static) if (tokens * K >= kParallelGrain)
  for (int64_t t = 0; t < tokens; ++t) {
    const bf16* block = w + id[t] / 16 * pairs * 32 + id[t] % 16 * 2;  // element (p, j) at 32 p + j
    bf16* row = o + t * K;
    for (int64_t k = 0; k < K; ++k) row[k] = from_float<bf16>(to_float(block[k / 2 * 32 + k % 2]) * s);
  }
}

}  // namespace gf::cpu
