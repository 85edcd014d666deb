// Host launch functions exported by bindings.cpp. Every pointer is a raw device address, every
// stream a cudaStream_t, both passed as integers; `dtype` is a gf::DType code; strides count
// elements. Each function validates its arguments (ValueError) and checks the launch
// (RuntimeError naming the op and the CUDA error).
#pragma once
#include <array>
#include <cstdint>

namespace gf {

// Every later launch of this module programmatic (on: programmatic dependent launch, common/launch.cuh, where
// the current device is sm_90 or later; before it they stay plain) or plain (off, the default).
void set_programmatic_launch(bool on);
bool programmatic_launch();  // on, and the current device sm_90 or later

// y = rms_norm(r) * (1 + w), r = x (+ residual, rounded, also written to r_out). x/residual rows
// are strided, y/r_out/w contiguous. residual == r_out == 0 selects the plain variant.
void rms_norm(int64_t y, int64_t r_out, int64_t x, int64_t residual, int64_t weight, int64_t rows,
              int64_t hidden, int64_t x_stride, int64_t res_stride, double eps, int dtype, int64_t stream);

// out[r, i] = gelu_tanh(in[r, i]) * in[r, n + i]; in [rows, 2n], out [rows, n], both contiguous.
void gelu_and_mul(int64_t out, int64_t in, int64_t rows, int64_t n, int dtype, int64_t stream);

// In-place rotate-half RoPE of q [T, hq, D] and k [T, hk, D] (token strides given, heads dense).
void rotary(int64_t q, int64_t k, int64_t positions, int64_t inv_freq, int64_t tokens, int64_t hq,
            int64_t hk, int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype, int64_t stream);

// Copies token t's row of row_elems elements of k and v into cache slot slots[t] (skip if < 0).
void write_kv(int64_t k, int64_t v, int64_t k_cache, int64_t v_cache, int64_t slots, int64_t tokens,
              int64_t row_elems, int64_t k_stride, int64_t v_stride, int64_t elem_size, int64_t stream);

// Tokens per split-K partition the decode kernel uses for this shape (sizes the workspace).
int64_t decode_partition_size(int64_t hq, int64_t hk, int64_t head_dim);

// Paged decode attention, one query token per sequence (see attention.cu); tensor_cores: the mma kernel
// where it applies (at most 8 query heads per kv head, q rows 16-byte aligned).
void decode_attention(int64_t out, int64_t part_acc, int64_t part_max, int64_t part_sum, int64_t q,
                      int64_t k_cache, int64_t v_cache, int64_t cu_seqlens_q, int64_t context_lens,
                      int64_t block_tables, int64_t num_seqs, int64_t q_stride, int64_t bt_stride,
                      int64_t hq, int64_t hk, int64_t head_dim, int64_t block_size, int64_t max_parts,
                      double scale, bool tensor_cores, int dtype, int64_t stream);

// y [M, N] = x [M, K] @ dequant(W)^T (+ bias), M <= 16 (see quant_gemv.cu, mma_gemv.cu and
// docs/QUANT_FORMAT.md).
// max_ctas: 0 picks the grid; n > 0 caps it at n CTAs (for tests and benchmarks). prefetch: each
// warp requests its next rows into L2 ahead (a variant the benchmarks time). Every linear here also takes
// (geglu, norm_weight, residual, r_out, eps, rope):
//   geglu: y [M, N/2] = gelu_and_mul(x @ W^T (+ bias)) instead, W's rows [gate; up] (the CUDA-core GEMVs:
//   up to 4 rows of x);
//   norm_weight (nonzero): x is first rms_norm(x (+ residual), norm_weight, eps), and r_out [M, K] gets
//   x + residual (residual and r_out: both or neither; r_out must not alias x or residual, which other CTAs
//   read while the first writes it); up to 4 rows of x, on the tensor cores with M * K * 2 <= 40 KiB;
//   rope (RopeParams, not with geglu; the CUDA-core GEMVs: up to 4 rows of x): y is the QKV projection
//   [M, (q_heads + 2 kv_heads) * head_dim] with its q and k heads rotated as rotary() does (row m at
//   positions[m]), its k and v heads also written to cache slot slots[m] as write_kv() does.
// RopeParams: (positions int64 [M], inv_freq fp32 [head_dim / 2], slots int64 [M] (negative: none),
// k_cache, v_cache [slots, kv_heads, head_dim] in x's dtype, q_heads, kv_heads, head_dim); positions 0: none.
using RopeParams = std::array<int64_t, 8>;
void w8a16_gemm(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N, int64_t K,
                int64_t max_ctas, bool prefetch, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out,
                double eps, const RopeParams& rope, int dtype, int64_t stream);
void w4a16_gemm(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
                int64_t N, int64_t K, int64_t group_size, int64_t max_ctas, bool prefetch, bool geglu,
                int64_t norm_weight, int64_t residual, int64_t r_out, double eps, const RopeParams& rope, int dtype,
                int64_t stream);
// int4 on the tensor cores (sm_80+), M <= 16, x 16-byte aligned; k_split: warps that share a tile's K
// (0: chosen for the device, see mma_k_split; else a power of two up to 8, for tests).
void w4a16_mma(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t zeros, int64_t bias, int64_t M,
               int64_t N, int64_t K, int64_t group_size, int64_t k_split, bool geglu, int64_t norm_weight,
               int64_t residual, int64_t r_out, double eps, const RopeParams& rope, int dtype, int64_t stream);
// int8 on the tensor cores, M <= 16, K % 64 == 0 (k_split as for w4a16_mma).
void w8a16_mma(int64_t y, int64_t x, int64_t qweight, int64_t scales, int64_t bias, int64_t M, int64_t N, int64_t K,
               int64_t k_split, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps,
               const RopeParams& rope, int dtype, int64_t stream);
// The tensor-core kernel over a plain 16-bit weight [N, K] (K % 32 == 0) in x's dtype, M <= 16.
void dense_mma(int64_t y, int64_t x, int64_t weight, int64_t bias, int64_t M, int64_t N, int64_t K, int64_t k_split,
               bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps, const RopeParams& rope,
               int dtype, int64_t stream);
// The CUDA-core GEMV (w8a16_gemm's kernel) over a plain 16-bit weight [N, K] (K % 8 == 0) in x's dtype.
void dense_gemv(int64_t y, int64_t x, int64_t weight, int64_t bias, int64_t M, int64_t N, int64_t K, int64_t max_ctas,
                bool prefetch, bool geglu, int64_t norm_weight, int64_t residual, int64_t r_out, double eps,
                const RopeParams& rope, int dtype, int64_t stream);

}  // namespace gf
