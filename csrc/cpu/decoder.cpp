// The Gemma decoder layers on the CPU in one call: the same kernels, in the same order and on the
// same buffers' values, as GemmaModel.layers (engine/model.py) makes them from Python (so the result is
// bit-identical to it), minus ~70 Python calls, output allocations and argument checks per step.
// bf16 only, every linear packed (linear.cpp). Per layer, with r the residual stream:
//   x = rms_norm(h) and r = h (layer 0), else x, r = rms_norm(h + r)
//   qkv = x Wqkv^T;  rotary(q, k);  write_kv(k, v);  a = attention(q, cache)
//   h = a Wo^T;  x, r = rms_norm(h + r);  h = gelu_and_mul(x Wgu^T) Wd^T
// (the GeGLU fused into the gate_up linear where the MLP width is a multiple of 16: the same values).
#include <cstring>
#include <string>

#include "common.h"
#include "ops.h"

namespace gf::cpu {

void decoder_layers(int64_t h, int64_t residual, int64_t scratch, int64_t tokens, const std::vector<int64_t>& weights,
                    const std::vector<int64_t>& k_caches, const std::vector<int64_t>& v_caches, int64_t positions,
                    int64_t inv_freq, int64_t slots, int64_t cu_seqlens_q, int64_t context_lens, int64_t block_tables,
                    int64_t num_seqs, int64_t bt_stride, int64_t bt_width, int64_t num_blocks, int64_t block_size,
                    int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
                    double scale) {
  const char* op = "decoder_layers";
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  require(static_cast<int64_t>(weights.size()) == 6 * layers && static_cast<int64_t>(v_caches.size()) == layers, op,
          "need 6 weights and a k and a v cache per layer");
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
    const int64_t* w = weights.data() + 6 * l;  // input_norm, qkv, o, post_norm, gate_up, down
    if (l == 0) rms_norm(x, 0, h, 0, w[0], T, hidden, hidden, 0, eps, kBFloat16);
    else rms_norm(x, residual, h, residual, w[0], T, hidden, hidden, hidden, eps, kBFloat16);
    linear_packed_bf16(qkv, x, w[1], 0, T, width, hidden);
    rotary(qkv, k, positions, inv_freq, T, heads, kv_heads, head_dim, width, width, kBFloat16);
    write_kv(k, v, k_caches[l], v_caches[l], slots, T, kv_size, width, width, bf, num_blocks * block_size);
    paged_attention(attn, qkv, T, k_caches[l], v_caches[l], cu_seqlens_q, context_lens, block_tables, num_seqs, width,
                    bt_stride, bt_width, heads, kv_heads, head_dim, block_size, num_blocks, scale, kBFloat16);
    linear_packed_bf16(h, attn, w[2], 0, T, hidden, q_size);
    rms_norm(x, residual, h, residual, w[3], T, hidden, hidden, hidden, eps, kBFloat16);
    if (inter % 16 == 0) {
      linear_packed_geglu_bf16(act, x, w[4], T, inter, hidden);
    } else {
      linear_packed_bf16(gate_up, x, w[4], 0, T, 2 * inter, hidden);
      gelu_and_mul(act, gate_up, T, inter, kBFloat16);
    }
    linear_packed_bf16(h, act, w[5], 0, T, hidden, inter);
  }
}

void decoder_logits(int64_t logits, int64_t h, int64_t residual, int64_t tokens, int64_t rows, int64_t n_rows,
                    int64_t norm, int64_t table, int64_t scratch, int64_t hidden, int64_t vocab, double eps) {
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
  linear_packed_bf16(y, x, table, 0, n_rows, vocab, hidden);
  const auto* yb = as_ptr<const bf16>(y);
  auto* out = as_ptr<float>(logits);
#pragma omp parallel for schedule(static) if (n_rows * vocab >= kParallelGrain)
  for (int64_t i = 0; i < n_rows * vocab; ++i) out[i] = to_float(yb[i]);
}

}  // namespace gf::cpu
