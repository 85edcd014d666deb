// The CPU kernels exported by bindings.cpp as gemforge.kernels._C.cpu. Pointers are host addresses
// passed as integers, `dtype` a gf::cpu::DType code, strides count elements. Each kernel computes
// in fp32 and rounds once to the storage type, as the op's torch reference defines (one exception:
// bf16 attention rounds its softmax weights to bf16 for p . V, as torch's CPU flash attention does,
// see attention.cpp); loops run on
// the OpenMP pool that torch itself uses (same libgomp), sized by torch.set_num_threads.
#pragma once
#include <cstdint>
#include <vector>

namespace gf::cpu {

// y = r * rsqrt(mean(r^2) + eps) * (1 + w), r = x (+ residual, rounded, written to r_out when
// residual != 0). x/residual rows strided, y/r_out/w contiguous.
void rms_norm(int64_t y, int64_t r_out, int64_t x, int64_t residual, int64_t weight, int64_t rows,
              int64_t hidden, int64_t x_stride, int64_t res_stride, double eps, int dtype);

// out[r, i] = gelu_tanh(in[r, i]) * in[r, n + i]; in [rows, 2n], out [rows, n], both contiguous.
void gelu_and_mul(int64_t out, int64_t in, int64_t rows, int64_t n, int dtype);

// In place, rotate-half RoPE of q [T, hq, D] and k [T, hk, D] (token strides given, heads dense)
// at int64 positions with fp32 inv_freq [D / 2].
void rotary(int64_t q, int64_t k, int64_t positions, int64_t inv_freq, int64_t tokens, int64_t hq,
            int64_t hk, int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype);

// Copies token t's k and v rows (row_elems contiguous elements, token strides given) into cache
// slot slots[t] (int64) of the [num_slots, row_elems] caches; slots[t] < 0 skips the token.
void write_kv(int64_t k, int64_t v, int64_t k_cache, int64_t v_cache, int64_t slots, int64_t tokens,
              int64_t row_elems, int64_t k_stride, int64_t v_stride, int64_t elem_size, int64_t num_slots);

// Causal attention of q [T = tokens, hq, D] (token stride q_stride, heads dense) over the paged caches
// [blocks, block_size, hk, D] for the flat varlen batch: sequence b owns query tokens
// cu_seqlens_q[b] .. cu_seqlens_q[b + 1] (int32), which are the last ones of its context_lens[b]
// (int32) cache slots, found through block_tables (int32 [num_seqs, bt_width], row stride bt_stride). out [T, hq, D]
// contiguous. Prefill chunks, decode tokens and verify windows mix freely. Block ids are checked
// against num_blocks and context lengths against the table width (ValueError, nothing read).
void paged_attention(int64_t out, int64_t q, int64_t tokens, int64_t k_cache, int64_t v_cache, int64_t cu_seqlens_q,
                     int64_t context_lens, int64_t block_tables, int64_t num_seqs, int64_t q_stride,
                     int64_t bt_stride, int64_t bt_width, int64_t hq, int64_t hk, int64_t head_dim, int64_t block_size,
                     int64_t num_blocks, double scale, int dtype);

// out[r] (int64) = the index of the maximum of fp32 row r of x [rows, n] (row stride `stride`):
// the first on ties; a NaN counts as the maximum (its first index), as with torch.max.
void argmax(int64_t out, int64_t x, int64_t rows, int64_t n, int64_t stride);

// y [M, N] = x [M, K] @ w^T (+ bias [N]); bf16, fp32 accumulation. wp is w [N, K] packed as
// [ceil(N / 16)][ceil(K / 2)][16][2], element (b, p, c, j) = w[16 b + c][2 p + j] (zero outside w).
void linear_packed_bf16(int64_t y, int64_t x, int64_t wp, int64_t bias, int64_t M, int64_t N, int64_t K);

// y [M, N] = gelu_and_mul(x [M, K] @ w^T) for w [2N, K] = [gate; up] packed as for linear_packed_bf16,
// N a multiple of 16: bit-identical to linear_packed_bf16 then gelu_and_mul, without the [M, 2N]
// intermediate.
void linear_packed_geglu_bf16(int64_t y, int64_t x, int64_t wp, int64_t M, int64_t N, int64_t K);

// out [tokens, K] bf16 = table[ids] * scale (fp32 product, rounded once), table packed as for
// linear_packed_bf16; ids int64, each checked against N (ValueError).
void embed_packed_bf16(int64_t out, int64_t table, int64_t ids, int64_t tokens, int64_t N, int64_t K, double scale);

// Every Gemma decoder layer over the flat batch (decoder.cpp), bf16: h [T, hidden] holds the
// embeddings and receives the last layer's output, residual [T, hidden] the residual stream; scratch
// holds T * (hidden + (heads + 2 kv_heads) head_dim + heads head_dim + 3 inter) bf16. weights: per
// layer input_norm, post_norm, then for qkv, o, gate_up and down a descriptor {format (0 packed bf16,
// 1 int8, 2 int4), data, scales, zeros, group} as linear_packed_bf16 / linear_int8_bf16 /
// linear_int4_bf16 take them; the rest as paged_attention, rotary and write_kv take them.
void decoder_layers(int64_t h, int64_t residual, int64_t scratch, int64_t tokens, const std::vector<int64_t>& weights,
                    const std::vector<int64_t>& k_caches, const std::vector<int64_t>& v_caches, int64_t positions,
                    int64_t inv_freq, int64_t slots, int64_t cu_seqlens_q, int64_t context_lens, int64_t block_tables,
                    int64_t num_seqs, int64_t bt_stride, int64_t bt_width, int64_t num_blocks, int64_t block_size,
                    int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
                    double scale);

// fp32 logits [n_rows, vocab] of rows `rows` (int64, each < tokens: ValueError) of the decoder
// output: rms_norm(h + residual) with `norm`, then the tied table (LM head; a linear descriptor as
// decoder_layers takes them), rounded to bf16 and widened, as the op-by-op forward computes them.
// scratch: (n_rows + 1) * hidden + n_rows * vocab bf16.
void decoder_logits(int64_t logits, int64_t h, int64_t residual, int64_t tokens, int64_t rows, int64_t n_rows,
                    int64_t norm, const std::vector<int64_t>& table, int64_t scratch, int64_t hidden, int64_t vocab,
                    double eps);

// y [M, N] bf16 = x [M, K] bf16 @ W^T (+ bias [N]) for the weight-only quantized formats of
// docs/QUANT_FORMAT.md, read as stored (quant_linear.cpp): int8 qweight [N, K] with scales [N];
// int4 qweight uint8 [N, K / 2] with scales and zeros (0: symmetric, z = 8) [N, K / group]. Scales,
// zeros and bias bf16; all contiguous. K a multiple of 32 (int4: of the group, itself one of 32).
void linear_int8_bf16(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N,
                      int64_t K);
void linear_int4_bf16(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
                      int64_t N, int64_t K, int64_t group);

// Whether the packed bf16 linear was built (the compiler targeted AVX512-BF16).
bool has_bf16_dot();

}  // namespace gf::cpu
