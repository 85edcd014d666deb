// The Gemma decoder layers on the CPU in one call: the same kernels, in the same order and on the
// same buffers' values, as GemmaModel.layers (engine/model.py) makes them from Python (so the result is
// bit-identical to it), minus ~70 Python calls, output allocations and argument checks per step.
// bf16 only; each linear packed (linear.cpp) or weight-only int8 / int4 (quant_linear.cpp), as its
// descriptor says. Per layer, with r the residual stream:
//   x = rms_norm(h) and r = h (layer 0), else x, r = rms_norm(h + r)
//   qkv = x Wqkv^T;  rotary(q, k);  write_kv(k, v);  a = attention(q, cache)
//   h = a Wo^T;  x, r = rms_norm(h + r);  h = gelu_and_mul(x Wgu^T) Wd^T
// (the GeGLU fused into a packed gate_up linear where the MLP width is a multiple of 16: the same values).
#include <cstring>
#include <string>

#include "common.h"
#include "ops.h"

namespace gf::cpu {

constexpr int64_t kLayerWords = 2 + 4 * 5;  // per layer in `weights`: two norms, four linear descriptors

namespace {
// A linear's descriptor: {format, data, scales, zeros, group} (the last three for quantized ones).
enum LinearFormat : int64_t { kPackedBf16 = 0, kInt8 = 1, kInt4 = 2 };

void linear(const int64_t* w, int64_t y, int64_t x, int64_t T, int64_t N, int64_t K) {
  switch (w[0]) {
    case kPackedBf16: return linear_packed_bf16(y, x, w[1], 0, T, N, K);
    case kInt8: return linear_int8_bf16(y, x, w[1], w[2], 0, T, N, K);
    case kInt4: return linear_int4_bf16(y, x, w[1], w[2], w[3], 0, T, N, K, w[4]);
  }
  throw std::invalid_argument("decoder_layers: unknown linear format " + std::to_string(w[0]));
}
}  // namespace

void decoder_layers(int64_t h, int64_t residual, int64_t scratch, int64_t tokens, const std::vector<int64_t>& weights,
                    const std::vector<int64_t>& k_caches, const std::vector<int64_t>& v_caches, int64_t positions,
                    int64_t inv_freq, int64_t slots, int64_t cu_seqlens_q, int64_t context_lens, int64_t block_tables,
                    int64_t num_seqs, int64_t bt_stride, int64_t bt_width, int64_t num_blocks, int64_t block_size,
                    int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
                    double scale) {
  const char* op = "decoder_layers";
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  require(static_cast<int64_t>(weights.size()) == kLayerWords * layers &&
              static_cast<int64_t>(v_caches.size()) == layers, op,
          "need 2 norms, 4 linear descriptors and a k and a v cache per layer");
  require(tokens >= 0 && hidden > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && inter > 0, op, "bad sizes");
  if (tokens == 0) return;
  const int64_t T = tokens, q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  const int64_t width = q_size + 2 * kv_size;  // one row of qkv
  const int64_t bf = static_cast<int64_t>(sizeof(bf16));
  // scratch [T, hidden + width + q_size + 3 inter] bf16: x | qkv | attention output | gate_up | act
  const int64_t x = scratch, qkv = x + T * hidden * bf, attn = qkv + T * width * bf, gate_up = attn + T * q_size * bf,
                act = gate_up + T * 2 * inter * bf;
  const int64_t k = qkv + q_size * bf, v = k + kv_size * bf;
  std::memcpy(as_ptr<void>(residual), as_ptr<const void>(h), static_cast<size_t>(T * hidden * bf));
  for (int64_t l = 0; l < layers; ++l) {
    // input_norm, post_norm, then the qkv, o, gate_up and down descriptors
    const int64_t* w = weights.data() + kLayerWords * l;
    const int64_t *w_qkv = w + 2, *w_o = w_qkv + 5, *w_gate_up = w_o + 5, *w_down = w_gate_up + 5;
    if (l == 0) rms_norm(x, 0, h, 0, w[0], T, hidden, hidden, 0, eps, kBFloat16);
    else rms_norm(x, residual, h, residual, w[0], T, hidden, hidden, hidden, eps, kBFloat16);
    linear(w_qkv, qkv, x, T, width, hidden);
    rotary(qkv, k, positions, inv_freq, T, heads, kv_heads, head_dim, width, width, kBFloat16);
    write_kv(k, v, k_caches[l], v_caches[l], slots, T, kv_size, width, width, bf, num_blocks * block_size);
    paged_attention(attn, qkv, T, k_caches[l], v_caches[l], cu_seqlens_q, context_lens, block_tables, num_seqs, width,
                    bt_stride, bt_width, heads, kv_heads, head_dim, block_size, num_blocks, scale, kBFloat16);
    linear(w_o, h, attn, T, hidden, q_size);
    rms_norm(x, residual, h, residual, w[1], T, hidden, hidden, hidden, eps, kBFloat16);
    if (w_gate_up[0] == kPackedBf16 && inter % 16 == 0) {
      linear_packed_geglu_bf16(act, x, w_gate_up[1], T, inter, hidden);
    } else {
      linear(w_gate_up, gate_up, x, T, 2 * inter, hidden);
      gelu_and_mul(act, gate_up, T, inter, kBFloat16);
    }
    linear(w_down, h, act, T, hidden, inter);
  }
}

void decoder_logits(int64_t logits, int64_t h, int64_t residual, int64_t tokens, int64_t rows, int64_t n_rows,
                    int64_t norm, const std::vector<int64_t>& table, int64_t scratch, int64_t hidden, int64_t vocab,
                    double eps) {
  require(table.size() == 5, "decoder_logits", "the table is one linear descriptor (5 values)");
  const auto* idx = as_ptr<const int64_t>(rows);
  const int64_t bf = static_cast<int64_t>(sizeof(bf16));
  // scratch: x [n_rows, hidden] | the summed residual row [hidden] (not needed after) | y [n_rows, vocab]
  const int64_t x = scratch, r = x + n_rows * hidden * bf, y = r + hidden * bf;
  for (int64_t i = 0; i < n_rows; ++i) {  // the final norm of the selected rows only: it is row-wise
    require(idx[i] >= 0 && idx[i] < tokens, "decoder_logits", "logits row " + std::to_string(idx[i]) +
                                                                 " outside the batch's " + std::to_string(tokens) + " tokens");
    const int64_t off = idx[i] * hidden * bf;
    rms_norm(x + i * hidden * bf, r, h + off, residual + off, norm, 1, hidden, hidden, hidden, eps, kBFloat16);
  }
  linear(table.data(), y, x, n_rows, vocab, hidden);
  const auto* yb = as_ptr<const bf16>(y);
  auto* out = as_ptr<float>(logits);
#pragma omp parallel for schedule(static) if (n_rows * vocab >= kParallelGrain)
  for (int64_t i = 0; i < n_rows * vocab; ++i) out[i] = to_float(yb[i]);
}

}  // namespace gf::cpu
