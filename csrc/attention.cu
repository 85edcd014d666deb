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
// shuffles per head); in PV, D/8 lanes cover a value row and accumulate 8 heads at a time. Kernel 1
// has a tensor-core form for up to 8 query heads per KV head (decode_partition_mma_kernel, opt-in).
#include "common/check.h"
#include "common/launch.cuh"
#include "common/mma.cuh"
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
  prior_grids_done();
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

// K/V row of position pos of a sequence; Pow2: block_size is a power of two (a shift and a mask, where a
// division costs tens of instructions a row).
template <bool Pow2 = false>
struct PagedSeq {
  const int* table;  // this sequence's block table row
  int block_size, hk, g;
  template <int D, typename T>
  __device__ __forceinline__ const T* row(const T* cache, int pos) const {
    const int blk_i = Pow2 ? pos >> (__ffs(block_size) - 1) : pos / block_size;
    const int in_blk = Pow2 ? pos & (block_size - 1) : pos % block_size;
    return cache + ((int64_t{table[blk_i]} * block_size + in_blk) * hk + g) * D;
  }
};

// Softmax statistics of each head's scores ps[h * ld + 0..n) (pre-multiplied by log2 e): m = max,
// l = sum 2^(s - m); the scores become 2^(s - m). One warp a head.
__device__ __forceinline__ void softmax_rows(float* ps, float* m_s, float* l_s, int G, int ld, int n) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int h = warp; h < G; h += kWarps) {
    float* s = ps + h * ld;
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
}

// Row stride of the tensor-core kernel's scores: 4 floats of padding a row, so that the 8 lanes that
// share a column (c) but not a row (r) hit 2 banks at most, not one.
__host__ __device__ constexpr int mma_score_stride(int part) { return part + 4; }

// Where a partition's sum for (query head qh, dim d) goes: out = acc / l when the sequence has one
// partition, else part_acc with the head's (m, l) beside it for the reduce kernel.
template <typename T>
struct PartitionOut {
  T* out;
  float *part_acc, *part_max, *part_sum;
  int64_t token, b;
  int hq, D, max_parts, p, nparts;
  __device__ __forceinline__ void store(int qh, int d, float acc, float m, float l) const {
    if (nparts == 1) {
      out[(token * hq + qh) * D + d] = from_float<T>(acc / l);
    } else {
      const int64_t slot = (b * hq + qh) * max_parts + p;
      part_acc[slot * D + d] = acc;
      if (d == 0) {
        part_max[slot] = m;
        part_sum[slot] = l;
      }
    }
  }
};

// What both partition kernels take; grid (partition, kv head, sequence).
template <typename T>
struct DecodeArgs {
  T* out;
  float *part_acc, *part_max, *part_sum;
  const T *q, *k_cache, *v_cache;
  const int *cu_seqlens_q, *context_lens, *block_tables;
  int64_t q_stride, bt_stride;
  int hq, hk, block_size, part, max_parts;
  float scale_log2;
};

// This CTA's share of a DecodeArgs: n keys from `start` of sequence b's context for its query token
// `token`, KV head g and its G query heads; `live` is false where there is none (no new token for the
// sequence, or a partition past its context), and nothing else is then meaningful.
template <typename T, bool Pow2>
struct Partition {
  int g, token, start, n, G;
  bool live;
  PagedSeq<Pow2> seq;
  __device__ explicit Partition(const DecodeArgs<T>& a) {
    const int b = blockIdx.z, ctx = a.context_lens[b];
    g = blockIdx.y;
    token = a.cu_seqlens_q[b];
    start = blockIdx.x * a.part;
    n = min(ctx - start, a.part);
    G = a.hq / a.hk;
    live = a.cu_seqlens_q[b + 1] != token && start < ctx;
    seq = {a.block_tables + b * a.bt_stride, a.block_size, a.hk, g};
  }
  // Where its results go (made when they are ready: fewer registers held across the kernel).
  __device__ PartitionOut<T> output(const DecodeArgs<T>& a, int D) const {
    const int b = blockIdx.z, parts = (a.context_lens[b] + a.part - 1) / a.part;
    return {a.out, a.part_acc, a.part_max, a.part_sum, token, b, a.hq, D, a.max_parts, int(blockIdx.x), parts};
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4)  // <= 128 registers: the default heuristic spilled at 96
decode_partition_kernel(const DecodeArgs<T> a) {
  prior_grids_done();
  const Partition<T, false> task(a);
  if (!task.live) return;
  const int g = task.g, start = task.start, n = task.n, G = task.G, part = a.part, tid = threadIdx.x, lane = tid & 31;

  GF_DYNAMIC_SMEM(float, smem);
  const int groups = kWarps * (32 / (D / kChunk));
  float* qs = smem;                                                  // [G][D]   (QK phase)
  float* red = smem;                                                 // [groups][kHeadTile][D] (PV)
  float* ps = smem + max(G * D, groups * kHeadTile * D);             // [G][part]
  float* m_s = ps + G * part;                                        // [G]
  float* l_s = m_s + G;                                              // [G]

  const T* qb = a.q + task.token * a.q_stride + int64_t{g} * G * D;
  for (int i = tid; i < G * D; i += kThreads) qs[i] = to_float(qb[i]) * a.scale_log2;
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
        const T* kr = task.seq.template row<D>(a.k_cache, start + t);
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

  softmax_rows(ps, m_s, l_s, G, part, n);  // scores become unnormalised probabilities 2^(s - m)
  __syncthreads();

  // PV: D/8 lanes per value row, `groups` rows in flight; partial sums reduced through `red`.
  const PartitionOut<T> dst = task.output(a, D);
  constexpr int kVLanes = D / kChunk;
  const int vg = tid / kVLanes, c = tid % kVLanes;
  for (int h0 = 0; h0 < G; h0 += kHeadTile) {
    float acc[kHeadTile][kChunk] = {};
    for (int t = vg; t < n; t += groups) {
      float vf[kChunk];
      load_float(task.seq.template row<D>(a.v_cache, start + t) + c * kChunk, vf);
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
      dst.store(g * G + h, d, s, m_s[h], l_s[h]);
    }
    __syncthreads();
  }
}

// The same partition on the tensor cores, for G <= 8 query heads per KV head (the 2B's MQA: G = 8),
// where the kernel above issues about 11 instructions per byte of K/V (each key row meets each head
// in fp32 FMAs, q re-read from shared memory per key) and is bound by them. mma m16n8k16:
//   QK: S (heads, zero-padded to 16 rows, x 8 keys) = Q . K^T. Lane (r, c) loads 16 bytes of key row
//       r at dims 8c + 32j and uses them as they lie as its B fragment (the order of the dims inside an
//       mma is free, Q's A fragment follows it); its D fragment holds head r's scores of keys 2c, 2c+1.
//   PV: O^T (16 dims x 8 heads) = V^T . P^T. Warp w owns D / 4 dims, lane (r, c) 2 kTW of them
//       (kTW = D / 64 tiles of 16 dims: tile t's rows r and r + 8 are dims d0 + 2t and d0 + 2t + 1, the
//       order of the rows free too); it loads its dims of keys 2c, 2c+1, 2c+8, 2c+9 of a 16-key block
//       in one access a key, pairs them by key (PRMT) into A, and takes head r's probabilities of those
//       keys, rounded to T as flash attention rounds them, as B.
// sm_90a SASS of the loops: 134 instructions per 128 bytes of K a lane (QK), 123 per 64 bytes of V (PV).
// Scores and probabilities live in shared memory as above.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4)  // <= 128 registers
decode_partition_mma_kernel(const DecodeArgs<T> a) {
  constexpr int kJ = D / 32;               // 16-byte chunks of a key row per lane in QK
  constexpr int kTW = D / kWarps / 16;     // 16-dim tiles per warp in PV
  using VRow = typename VecLoad<4 * kTW>::type;  // a lane's 2 kTW dims of one value row
  prior_grids_done();
  const Partition<T, true> task(a);
  if (!task.live) return;
  const int g = task.g, start = task.start, n = task.n, G = task.G, hk = a.hk;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, c = lane & 3;

  GF_DYNAMIC_SMEM(float, smem);
  const int ld = mma_score_stride(a.part);  // (rows padded: the 8 lanes of a column touch 8 rows of scores)
  float* ps = smem;          // [G][ld]
  float* m_s = ps + G * ld;  // [G]
  float* l_s = m_s + G;      // [G]

  {  // QK, 8 keys a warp at a time
    uint4 qf[kJ];  // head r (zero past G), dims 8c + 32j .. + 7
    const T* qh = a.q + task.token * a.q_stride + int64_t{g * G + min(r, G - 1)} * D + 8 * c;
#pragma unroll
    for (int j = 0; j < kJ; ++j) qf[j] = r < G ? *reinterpret_cast<const uint4*>(qh + 32 * j) : uint4{};
    for (int t0 = warp * 8; t0 < n; t0 += kWarps * 8) {
      const int t = t0 + r;
      const T* kr = task.seq.template row<D>(a.k_cache, start + min(t, n - 1)) + 8 * c;  // (past n: any row, never stored)
      float s[2][4] = {};  // even and odd chunks: two shorter mma chains
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        const uint4 kv = __ldcs(reinterpret_cast<const uint4*>(kr + 32 * j));
        mma_16816<T>(s[j & 1], qf[j].x, 0u, qf[j].y, 0u, kv.x, kv.y);
        mma_16816<T>(s[j & 1], qf[j].z, 0u, qf[j].w, 0u, kv.z, kv.w);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {  // s[.][i]: head r, key t0 + 2c + i
        const int key = t0 + 2 * c + i;
        if (r < G && key < n) ps[r * ld + key] = (s[0][i] + s[1][i]) * a.scale_log2;
      }
    }
  }
  __syncthreads();
  softmax_rows(ps, m_s, l_s, G, ld, n);
  __syncthreads();

  // PV over 16-key blocks: this warp's D / kWarps dims, lane dims d0 .. d0 + 2 kTW.
  const int d0 = warp * (D / kWarps) + 2 * kTW * r;
  float acc[kTW][4] = {};
  const float* pr = ps + min(r, G - 1) * ld;
  for (int t0 = 0; t0 < n; t0 += 16) {
    uint32_t w[4][kTW];  // keys t0 + 2c, + 1, + 8, + 9: their words of dims (d0 + 2t, d0 + 2t + 1)
#pragma unroll
    for (int i = 0; i < 4; i += 2) {  // (an even key and the next share a block: block_size is even)
      const int key = t0 + 2 * c + 8 * (i >> 1);
      const T* row = task.seq.template row<D>(a.v_cache, start + min(key, n - 1)) + d0;
      const VRow v0 = key < n ? __ldcs(reinterpret_cast<const VRow*>(row)) : VRow{};
      const VRow v1 = key + 1 < n ? __ldcs(reinterpret_cast<const VRow*>(row + hk * D)) : VRow{};
      memcpy(w[i], &v0, sizeof v0);
      memcpy(w[i + 1], &v1, sizeof v1);
    }
    float pk[4];  // head r's probabilities of those keys (0 past n, and for padding heads)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = t0 + 2 * c + (i & 1) + 8 * (i >> 1);
      pk[i] = r < G && key < n ? pr[key] : 0.f;
    }
    const uint32_t b0 = pack_pair<T>(pk[0], pk[1]), b1 = pack_pair<T>(pk[2], pk[3]);
#pragma unroll
    for (int t = 0; t < kTW; ++t)
      mma_16816<T>(acc[t], __byte_perm(w[0][t], w[1][t], 0x5410), __byte_perm(w[0][t], w[1][t], 0x7632),
                   __byte_perm(w[2][t], w[3][t], 0x5410), __byte_perm(w[2][t], w[3][t], 0x7632), b0, b1);
  }
  const PartitionOut<T> dst = task.output(a, D);
#pragma unroll
  for (int t = 0; t < kTW; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // acc[t][i]: dim d0 + 2t (+ 1 for i >= 2), head 2c + (i & 1)
      const int h = 2 * c + (i & 1);
      if (h < G) dst.store(g * G + h, d0 + 2 * t + (i >> 1), acc[t][i], m_s[h], l_s[h]);
    }
}

template <typename T>
__global__ void decode_reduce_kernel(T* __restrict__ out, const float* __restrict__ part_acc,
                                     const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                     const int* __restrict__ cu_seqlens_q, const int* __restrict__ context_lens,
                                     int hq, int D, int part, int max_parts) {
  prior_grids_done();
  const int h = blockIdx.x, b = blockIdx.y;
  const int token = cu_seqlens_q[b];
  if (cu_seqlens_q[b + 1] == token) return;
  const int nparts = (context_lens[b] + part - 1) / part;
  if (nparts <= 1) return;  // written by the partition kernel
  GF_DYNAMIC_SMEM(float, weight);  // [nparts] 2^(m_p - M)
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
                   int64_t max_parts, float scale_log2, bool tensor_cores, cudaStream_t stream) {
  const int G = hq / hk;
  const dim3 grid(static_cast<unsigned>(max_parts), hk, static_cast<unsigned>(B));
  // (the tensor-core kernel reads q rows in 16-byte loads and indexes blocks by shifts)
  const bool mma = tensor_cores && G <= 8 && aligned16(q) && q_stride % 8 == 0 && block_size >= 2 &&
                   (block_size & (block_size - 1)) == 0;
  const auto kernel = mma ? decode_partition_mma_kernel<T, D> : decode_partition_kernel<T, D>;
  const size_t floats = mma ? size_t(G) * mma_score_stride(part) + 2 * G : decode_smem_floats(G, D, part);
  const size_t smem = floats * sizeof(float);
  const DecodeArgs<T> args{as_ptr<T>(out), as_ptr<float>(part_acc), as_ptr<float>(part_max),
                           as_ptr<float>(part_sum), as_ptr<const T>(q), as_ptr<const T>(k_cache),
                           as_ptr<const T>(v_cache), as_ptr<const int>(cu), as_ptr<const int>(ctx),
                           as_ptr<const int>(bt), q_stride, bt_stride, hq, hk, block_size, part,
                           static_cast<int>(max_parts), scale_log2};
  launch_kernel(kernel, grid, kThreads, smem, stream, args);
  check_launch("decode_attention");
  if (max_parts > 1) {
    launch_kernel(decode_reduce_kernel<T>, dim3(hq, static_cast<unsigned>(B)), kThreads, max_parts * sizeof(float),
        stream, as_ptr<T>(out), as_ptr<const float>(part_acc), as_ptr<const float>(part_max),
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
    launch_kernel(write_kv_kernel<U>, static_cast<unsigned>(tokens), threads, 0, as_stream(stream),
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
                      double scale, bool tensor_cores, int dtype, int64_t stream) {
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
                          max_parts, scale_log2, tensor_cores, as_stream(stream));
    };
    if (head_dim == 64) go(std::integral_constant<int, 64>{});
    else if (head_dim == 128) go(std::integral_constant<int, 128>{});
    else go(std::integral_constant<int, 256>{});
  });
}

}  // namespace gf
