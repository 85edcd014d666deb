// Paged-KV-cache kernels: write_kv (scatter new K/V into cache slots) and decode attention.
//
// Decode attention (one query token per sequence), cache [num_blocks, block_size, hk, D]:
//   out[b, h] = softmax(scale * q[b, h] . K_b[0..ctx)) @ V_b[0..ctx),   K/V head g = h / G, G = hq / hk
// Split-K, FlashDecoding style. Kernel 1 has grid (partition, kv head, sequence): one CTA owns
// all G query heads of a KV group over `part` consecutive tokens, so every K/V row is read from
// global memory once per group (MQA/GQA). It keeps scores in shared memory and produces, per head,
// m = max score, l = sum 2^(s - m), acc = sum 2^(s - m) V (fp32; scores are pre-multiplied by
// log2 e so exp2f is exact softmax). A sequence with one partition writes out = acc / l directly;
// otherwise kernel 2 (grid (hq, sequence)) merges the partitions:
//   out = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p,  M = max_p m_p.
// K/V rows are read with 16-byte loads: in QK, 8 lanes share a key row (D/64 chunks each, 3
// shuffles per head); in PV, D/8 lanes cover a value row and accumulate 8 heads at a time.
#include "common/check.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "ops.h"

#include <type_traits>

namespace gf {
namespace {

// ---------------------------------------------------------------------------------- write_kv
template <typename U>
__global__ void write_kv_kernel(const U* __restrict__ k, const U* __restrict__ v, U* __restrict__ k_cache,
                                U* __restrict__ v_cache, const int64_t* __restrict__ slots, int row_units,
                                int64_t k_stride, int64_t v_stride) {
  const int64_t t = blockIdx.x, slot = slots[t];
  if (slot < 0) return;
  for (int i = threadIdx.x; i < row_units; i += blockDim.x) {
    k_cache[slot * row_units + i] = k[t * k_stride + i];
    v_cache[slot * row_units + i] = v[t * v_stride + i];
  }
}

// ------------------------------------------------------------------------- decode attention
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;        // fp16/bf16 elements per 16-byte load
constexpr int kQKLanes = 8;      // lanes sharing one key row in QK
constexpr int kHeadTile = 8;     // query heads accumulated together in PV
constexpr int kMaxPart = 512;    // tokens per partition, reduced until shared memory fits
constexpr size_t kSmemBudget = 48 * 1024;

// Shared memory (floats): [max(G*D, reduction)] q then PV reduction | [G*part] scores | [2G] m, l.
size_t decode_smem_floats(int G, int D, int part) {
  const int groups = kWarps * (32 / (D / kChunk));  // value-row groups in PV
  return std::max<size_t>(size_t(G) * D, size_t(groups) * kHeadTile * D) + size_t(G) * part + 2 * G;
}

struct PagedSeq {
  const int* table;  // this sequence's block table row
  int block_size, hk, g;
  template <int D, typename T>
  __device__ __forceinline__ const T* row(const T* cache, int pos) const {
    const int64_t blk = table[pos / block_size];
    return cache + ((blk * block_size + pos % block_size) * hk + g) * D;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4)  // <= 128 registers: the default heuristic spilled at 96
decode_partition_kernel(T* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_max,
                        float* __restrict__ part_sum, const T* __restrict__ q, const T* __restrict__ k_cache,
                        const T* __restrict__ v_cache, const int* __restrict__ cu_seqlens_q,
                        const int* __restrict__ context_lens, const int* __restrict__ block_tables,
                        int64_t q_stride, int64_t bt_stride, int hq, int hk, int block_size, int part,
                        int max_parts, float scale_log2) {
  const int p = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int token = cu_seqlens_q[b];
  if (cu_seqlens_q[b + 1] == token) return;  // no query token for this sequence in the batch
  const int ctx = context_lens[b], start = p * part;
  if (start >= ctx) return;
  const int n = min(ctx - start, part), nparts = (ctx + part - 1) / part;
  const int G = hq / hk, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const PagedSeq seq{block_tables + b * bt_stride, block_size, hk, g};

  extern __shared__ float smem[];
  const int groups = kWarps * (32 / (D / kChunk));
  float* qs = smem;                                                  // [G][D]   (QK phase)
  float* red = smem;                                                 // [groups][kHeadTile][D] (PV)
  float* ps = smem + max(G * D, groups * kHeadTile * D);             // [G][part]
  float* m_s = ps + G * part;                                        // [G]
  float* l_s = m_s + G;                                              // [G]

  const T* qb = q + token * q_stride + int64_t{g} * G * D;
  for (int i = tid; i < G * D; i += kThreads) qs[i] = to_float(qb[i]) * scale_log2;
  __syncthreads();

  // QK: 8 lanes per key row, lane j holds chunks j, j + 8, ... of the row.
  {
    constexpr int kCPL = D / (kChunk * kQKLanes);
    constexpr int kKeysPerStep = kThreads / kQKLanes;
    const int j = lane % kQKLanes, sub = tid / kQKLanes;
    for (int t0 = 0; t0 < n; t0 += kKeysPerStep) {
      const int t = t0 + sub;
      float kf[kCPL][kChunk];
      if (t < n) {
        const T* kr = seq.row<D>(k_cache, start + t);
#pragma unroll
        for (int c = 0; c < kCPL; ++c) load_float(kr + (c * kQKLanes + j) * kChunk, kf[c]);
      } else {
#pragma unroll
        for (int c = 0; c < kCPL; ++c)
#pragma unroll
          for (int e = 0; e < kChunk; ++e) kf[c][e] = 0.f;
      }
      for (int h = 0; h < G; ++h) {
        const float* qh = qs + h * D;
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < kCPL; ++c)
#pragma unroll
          for (int e = 0; e < kChunk; ++e) dot += kf[c][e] * qh[(c * kQKLanes + j) * kChunk + e];
        dot = warp_reduce<SumOp, kQKLanes>(dot);
        if (j == 0 && t < n) ps[h * part + t] = dot;
      }
    }
  }
  __syncthreads();

  // Softmax statistics per head; scores become unnormalised probabilities 2^(s - m).
  for (int h = warp; h < G; h += kWarps) {
    float* s = ps + h * part;
    float m = MaxOp::identity();
    for (int t = lane; t < n; t += 32) m = fmaxf(m, s[t]);
    m = warp_max(m);
    float l = 0.f;
    for (int t = lane; t < n; t += 32) {
      const float e = exp2f(s[t] - m);
      s[t] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      m_s[h] = m;
      l_s[h] = l;
    }
  }
  __syncthreads();

  // PV: D/8 lanes per value row, `groups` rows in flight; partial sums reduced through `red`.
  constexpr int kVLanes = D / kChunk;
  const int vg = tid / kVLanes, c = tid % kVLanes;
  for (int h0 = 0; h0 < G; h0 += kHeadTile) {
    float acc[kHeadTile][kChunk] = {};
    for (int t = vg; t < n; t += groups) {
      float vf[kChunk];
      load_float(seq.row<D>(v_cache, start + t) + c * kChunk, vf);
#pragma unroll
      for (int hh = 0; hh < kHeadTile; ++hh) {
        if (h0 + hh < G) {
          const float pr = ps[(h0 + hh) * part + t];
#pragma unroll
          for (int e = 0; e < kChunk; ++e) acc[hh][e] += pr * vf[e];
        }
      }
    }
#pragma unroll
    for (int hh = 0; hh < kHeadTile; ++hh)
#pragma unroll
      for (int e = 0; e < kChunk; ++e) red[(vg * kHeadTile + hh) * D + c * kChunk + e] = acc[hh][e];
    __syncthreads();
    for (int i = tid; i < kHeadTile * D; i += kThreads) {
      const int h = h0 + i / D, d = i % D;
      if (h >= G) break;
      float s = 0.f;
      for (int v = 0; v < groups; ++v) s += red[v * kHeadTile * D + i];
      const int qh = g * G + h;
      if (nparts == 1) {
        out[(int64_t{token} * hq + qh) * D + d] = from_float<T>(s / l_s[h]);
      } else {
        const int64_t slot = (int64_t{b} * hq + qh) * max_parts + p;
        part_acc[slot * D + d] = s;
        if (d == 0) {
          part_max[slot] = m_s[h];
          part_sum[slot] = l_s[h];
        }
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void decode_reduce_kernel(T* __restrict__ out, const float* __restrict__ part_acc,
                                     const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                     const int* __restrict__ cu_seqlens_q, const int* __restrict__ context_lens,
                                     int hq, int D, int part, int max_parts) {
  const int h = blockIdx.x, b = blockIdx.y;
  const int token = cu_seqlens_q[b];
  if (cu_seqlens_q[b + 1] == token) return;
  const int nparts = (context_lens[b] + part - 1) / part;
  if (nparts <= 1) return;  // written by the partition kernel
  extern __shared__ float weight[];  // [nparts] 2^(m_p - M)
  const int64_t base = (int64_t{b} * hq + h) * max_parts;

  float m = MaxOp::identity();
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) m = fmaxf(m, part_max[base + p]);
  m = block_reduce<MaxOp>(m);
  float l = 0.f;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) {
    const float w = exp2f(part_max[base + p] - m);
    weight[p] = w;
    l += w * part_sum[base + p];
  }
  const float inv_l = 1.f / block_reduce<SumOp>(l);  // its barriers also publish `weight`
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0.f;
    for (int p = 0; p < nparts; ++p) s += weight[p] * part_acc[(base + p) * D + d];
    out[(int64_t{token} * hq + h) * D + d] = from_float<T>(s * inv_l);
  }
}

template <typename T, int D>
void launch_decode(int64_t out, int64_t part_acc, int64_t part_max, int64_t part_sum, int64_t q,
                   int64_t k_cache, int64_t v_cache, int64_t cu, int64_t ctx, int64_t bt, int64_t B,
                   int64_t q_stride, int64_t bt_stride, int hq, int hk, int block_size, int part,
                   int64_t max_parts, float scale_log2, cudaStream_t stream) {
  const int G = hq / hk;
  const size_t smem = decode_smem_floats(G, D, part) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(max_parts), hk, static_cast<unsigned>(B));
  decode_partition_kernel<T, D><<<grid, kThreads, smem, stream>>>(
      as_ptr<T>(out), as_ptr<float>(part_acc), as_ptr<float>(part_max), as_ptr<float>(part_sum),
      as_ptr<const T>(q), as_ptr<const T>(k_cache), as_ptr<const T>(v_cache), as_ptr<const int>(cu),
      as_ptr<const int>(ctx), as_ptr<const int>(bt), q_stride, bt_stride, hq, hk, block_size, part,
      static_cast<int>(max_parts), scale_log2);
  check_launch("decode_attention");
  if (max_parts > 1) {
    decode_reduce_kernel<T><<<dim3(hq, static_cast<unsigned>(B)), kThreads, max_parts * sizeof(float), stream>>>(
        as_ptr<T>(out), as_ptr<const float>(part_acc), as_ptr<const float>(part_max),
        as_ptr<const float>(part_sum), as_ptr<const int>(cu), as_ptr<const int>(ctx), hq, D, part,
        static_cast<int>(max_parts));
    check_launch("decode_attention(reduce)");
  }
}

}  // namespace

void write_kv(int64_t k, int64_t v, int64_t k_cache, int64_t v_cache, int64_t slots, int64_t tokens,
              int64_t row_elems, int64_t k_stride, int64_t v_stride, int64_t elem_size, int64_t stream) {
  require(elem_size == 2 || elem_size == 4, "write_kv", "element size must be 2 or 4 bytes");
  require(tokens <= 0x7fffffff, "write_kv", "too many tokens");
  if (tokens == 0) return;
  const int64_t row_bytes = row_elems * elem_size;
  const bool vec = row_bytes % 16 == 0 && (k_stride * elem_size) % 16 == 0 && (v_stride * elem_size) % 16 == 0 &&
                   aligned16(k) && aligned16(v) && aligned16(k_cache) && aligned16(v_cache);
  auto launch = [&](auto unit_tag) {
    using U = typename decltype(unit_tag)::type;
    const int64_t per = sizeof(U) / elem_size;  // elements per copy unit
    const int units = static_cast<int>(row_bytes / sizeof(U));
    const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(units, 32) * 32));
    write_kv_kernel<U><<<static_cast<unsigned>(tokens), threads, 0, as_stream(stream)>>>(
        as_ptr<const U>(k), as_ptr<const U>(v), as_ptr<U>(k_cache), as_ptr<U>(v_cache),
        as_ptr<const int64_t>(slots), units, k_stride / per, v_stride / per);
  };
  if (vec) launch(TypeTag<uint4>{});
  else if (elem_size == 2) launch(TypeTag<uint16_t>{});
  else launch(TypeTag<uint32_t>{});
  check_launch("write_kv");
}

int64_t decode_partition_size(int64_t hq, int64_t hk, int64_t head_dim) {
  require(hk > 0 && hq % hk == 0, "decode_attention", "query heads must be a multiple of kv heads");
  require(head_dim == 64 || head_dim == 128 || head_dim == 256, "decode_attention",
          "head_dim must be 64, 128 or 256, got " + std::to_string(head_dim));
  int part = kMaxPart;
  while (part > 32 && decode_smem_floats(int(hq / hk), int(head_dim), part) * sizeof(float) > kSmemBudget) part /= 2;
  require(decode_smem_floats(int(hq / hk), int(head_dim), part) * sizeof(float) <= kSmemBudget, "decode_attention",
          "too many query heads per kv head (" + std::to_string(hq / hk) + ") for shared memory");
  return part;
}

void decode_attention(int64_t out, int64_t part_acc, int64_t part_max, int64_t part_sum, int64_t q,
                      int64_t k_cache, int64_t v_cache, int64_t cu_seqlens_q, int64_t context_lens,
                      int64_t block_tables, int64_t num_seqs, int64_t q_stride, int64_t bt_stride,
                      int64_t hq, int64_t hk, int64_t head_dim, int64_t block_size, int64_t max_parts,
                      double scale, int dtype, int64_t stream) {
  const int part = static_cast<int>(decode_partition_size(hq, hk, head_dim));
  require(block_size > 0, "decode_attention", "block_size must be positive");
  require(max_parts >= 1 && max_parts <= 65535, "decode_attention", "max_parts must be in [1, 65535]");
  require(hk <= 65535 && num_seqs <= 65535, "decode_attention", "too many kv heads or sequences");
  require(aligned16(k_cache) && aligned16(v_cache), "decode_attention", "caches must be 16-byte aligned");
  if (num_seqs == 0) return;
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  dispatch_half(dtype, "decode_attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto go = [&](auto kernel_d) {
      constexpr int D = decltype(kernel_d)::value;
      launch_decode<T, D>(out, part_acc, part_max, part_sum, q, k_cache, v_cache, cu_seqlens_q, context_lens,
                          block_tables, num_seqs, q_stride, bt_stride, int(hq), int(hk), int(block_size), part,
                          max_parts, scale_log2, as_stream(stream));
    };
    if (head_dim == 64) go(std::integral_constant<int, 64>{});
    else if (head_dim == 128) go(std::integral_constant<int, 128>{});
    else go(std::integral_constant<int, 256>{});
  });
}

}  // namespace gf
