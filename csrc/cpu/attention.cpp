// The paged KV cache on the CPU: write_kv, and causal attention of a flat varlen batch over it.
//
// Work is split into tasks (sequence, tile of up to kTileTokens query tokens, range of kv heads);
// a task holds the rows (query token i, query head j) of its tile and heads, and walks the
// sequence's keys once: each cache row is read once for all of them (under multi-query attention,
// once for all query heads) and a block's heads are contiguous in memory. Per task, exactly:
//   s[r, t] = scale * q_r . k_t  for the keys t < lim(r) = (position of row r's token) + 1,
//   p = exp(s - max_t s) / sum_t exp(s - max_t s),  out_r = sum_t p[r, t] v_t
// in fp32 (no online rescaling is needed: a task keeps its rows' scores, at most
// kTileTokens * hq * context floats), rounded once to the storage type (the bf16 kernel below
// rounds p to bf16 for its p . V products).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "common.h"
#include "ops.h"

namespace gf::cpu {

constexpr int64_t kTileTokens = 16;

struct PagedBatch {
  const int32_t* cu;      // [num_seqs + 1]
  const int32_t* ctx;     // [num_seqs]
  const int32_t* tables;  // [num_seqs, bt_stride]
  int64_t bt_stride, hq, hk, d, bs;
  int64_t q_stride;
  float scale;
};

struct Task {
  int64_t seq, first, len;  // the tile: tokens first .. first + len of the sequence's new ones
  int64_t h0, h1;           // kv heads [h0, h1)
};

// Where a task's rows and keys are. Rows are token-major: row r is query token r / heads of the
// tile and query head j0 + r % heads; the token at position p0 + r / heads sees keys [0, that + 1).
struct TaskView {
  int64_t d, group, heads, j0, rows, p0, keys, tok0;
  const int32_t* table;
  TaskView(const PagedBatch& pb, const Task& task)
      : d(pb.d), group(pb.hq / pb.hk), heads((task.h1 - task.h0) * group), j0(task.h0 * group),
        rows(task.len * heads), p0(pb.ctx[task.seq] - (pb.cu[task.seq + 1] - pb.cu[task.seq]) + task.first),
        keys(p0 + task.len), tok0(pb.cu[task.seq] + task.first), table(pb.tables + task.seq * pb.bt_stride) {}
  int64_t first_row(int64_t t) const { return std::max<int64_t>(0, t - p0) * heads; }  // first row seeing key t
  int64_t seen(int64_t r) const { return p0 + r / heads + 1; }  // keys row r sees
  int64_t head_offset(int64_t r) const { return (r % heads) / group * d; }  // its kv head in a task's cache row
};

template <typename T>
static void load_row(float* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Row r of the scores s [rows, keys], over the keys its token sees, becomes exp(s - max);
// inv_sum[r] = 1 / its sum.
static void softmax_rows(float* s, float* inv_sum, const TaskView& v) {
  for (int64_t r = 0; r < v.rows; ++r) {
    float* sr = s + r * v.keys;
    const int64_t n = v.seen(r);
    float m = sr[0];
    for (int64_t t = 1; t < n; ++t) m = sr[t] > m ? sr[t] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sr[t] = exp_vec(sr[t] - m);
      sum += sr[t];
    }
    inv_sum[r] = 1.0f / sum;
  }
}

// out (token-major [T, hq, d]) of each row = acc[r] * inv_sum[r], rounded once.
template <typename T>
static void write_rows(T* out, const float* acc, const float* inv_sum, const TaskView& v, int64_t hq) {
  for (int64_t r = 0; r < v.rows; ++r) {
    T* o = out + (v.tok0 + r / v.heads) * hq * v.d + (v.j0 + r % v.heads) * v.d;
    for (int64_t c = 0; c < v.d; ++c) o[c] = from_float<T>(acc[r * v.d + c] * inv_sum[r]);
  }
}

template <typename T>
static void attend(const PagedBatch& pb, const Task& task, T* out, const T* q, const T* k_cache, const T* v_cache) {
  const TaskView v(pb, task);
  const int64_t d = v.d, heads = v.heads, rows = v.rows, keys = v.keys;
  const int64_t width = (task.h1 - task.h0) * d;  // one cache row of the task's heads

  std::vector<float> qf(rows * d), s(rows * keys), acc(rows * d, 0.0f), kv(width), inv_sum(rows);
  for (int64_t i = 0; i < task.len; ++i) {
    float* dst = &qf[i * heads * d];
    load_row(dst, q + (v.tok0 + i) * pb.q_stride + v.j0 * d, heads * d);
    for (int64_t c = 0; c < heads * d; ++c) dst[c] *= pb.scale;
  }
  std::vector<int64_t> kv_offset(rows);  // where row r's kv head sits in kv
  for (int64_t r = 0; r < rows; ++r) kv_offset[r] = v.head_offset(r);
  auto kv_of_row = [&](int64_t r) { return kv.data() + kv_offset[r]; };
  auto for_each_key = [&](const T* cache, auto&& fn) {  // fn(t) with row t of the task's heads in kv
    for (int64_t t0 = 0, blk = 0; t0 < keys; t0 += pb.bs, ++blk) {
      const T* base = cache + (static_cast<int64_t>(v.table[blk]) * pb.bs * pb.hk + task.h0) * d;
      for (int64_t t = t0, end = std::min(keys, t0 + pb.bs); t < end; ++t) {
        load_row(kv.data(), base + (t - t0) * pb.hk * d, width);
        fn(t);
      }
    }
  };
  for_each_key(k_cache, [&](int64_t t) {
    for (int64_t r = v.first_row(t); r < rows; ++r) {
      const float* qr = &qf[r * d];
      const float* kr = kv_of_row(r);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += qr[c] * kr[c];
      s[r * keys + t] = dot;
    }
  });
  softmax_rows(s.data(), inv_sum.data(), v);
  for_each_key(v_cache, [&](int64_t t) {
    for (int64_t r = v.first_row(t); r < rows; ++r) {
      const float p = s[r * keys + t];
      const float* vr = kv_of_row(r);
      float* ar = &acc[r * d];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) ar[c] += p * vr[c];
    }
  });
  write_rows(out, acc.data(), inv_sum.data(), v, pb.hq);
}

#if defined(__AVX512BF16__)
// bf16 with a head_dim of 32..256 in steps of 32, where the compiler targets AVX512-BF16. Rows go
// in groups whose output accumulators fit 16 registers (4 rows at head_dim 64, 1 at 256). Scores,
// 16 keys at a time, row by row (the 16 cache rows stay in L1), q in registers: q . k by VDPBF16PS
// straight from the cache row (no fp32 copy of K), the 16 dot-product vectors summed into one
// vector of 16 scores by a transposing add tree (not 16 horizontal sums). Then p . V, two keys per
// VDPBF16PS lane (the two V rows interleaved by two unpacks), per key pair every row of the group,
// into the registers. p is rounded to bf16 for that product, as torch's own CPU flash attention
// does (the one step of this kernel that is not fp32 until the final rounding; the softmax sum is
// the fp32 one). The first group requests each cache row kPrefetchRows keys ahead (blocks sit at
// random places, where the hardware prefetchers do not follow); later groups find the rows in
// cache. Against the previous bf16 kernel (one row at a time per key, a horizontal sum per score,
// fp32 p . V; ad-hoc A/B on the CI CPU): 2.4x faster on 2B-shaped prefill (4 x 120 tokens, context
// 500), 1.7-2.0x on 2B-shaped decode (16 sequences, context 1000), 1.7-1.8x on nano prefill (64 x
// 96), 2.1x on a 2000-token nano prompt, 1.5x on cache-resident nano decode, the same on a nano
// decode that waits for memory (64 sequences, scattered blocks, 6 layers' caches).
constexpr int64_t kPrefetchRows = 8;

// Lane i of the result = the sum of the 16 lanes of a[i].
static inline __m512 sum_each(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a2j: 0+2, a2j+1: 0+2, a2j: 1+3, a2j+1: 1+3]
    b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane sums of a4j .. a4j+3
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
    c[j] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  // add the four 128-bit lanes of each c[j]; c[j]'s total lands in 128-bit lane j
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xdd));
}

template <int D>
static void attend_bf16(const PagedBatch& pb, const Task& task, bf16* out, const bf16* q, const bf16* k_cache,
                        const bf16* v_cache) {
  constexpr int kDotChunks = D / 32, kOutChunks = D / 16;
  constexpr int kGroup = kOutChunks >= 16 ? 1 : 16 / kOutChunks;  // rows whose accumulators fit 16 registers
  const TaskView v(pb, task);
  const int64_t heads = v.heads, rows = v.rows, keys = v.keys;
  const int64_t row_bytes = (task.h1 - task.h0) * D * static_cast<int64_t>(sizeof(bf16));
  std::vector<float> s(rows * keys), inv_sum(rows);
  std::vector<int64_t> slot(keys);  // key t's row (of the task's heads) in either cache, in elements
  for (int64_t t0 = 0, blk = 0; t0 < keys; t0 += pb.bs, ++blk)
    for (int64_t t = t0, end = std::min(keys, t0 + pb.bs); t < end; ++t)
      slot[t] = ((static_cast<int64_t>(v.table[blk]) * pb.bs + t - t0) * pb.hk + task.h0) * D;
  // While the task's first rows read key t, the cache row kPrefetchRows keys ahead is requested (past
  // the last K row: the first V rows).
  auto prefetch_ahead = [&](bool k_phase, int64_t t) {
    int64_t ahead = t + kPrefetchRows;
    const bf16* cache = k_phase && ahead < keys ? k_cache : v_cache;
    if (k_phase && ahead >= keys) ahead -= keys;
    if (ahead >= keys) return;
    const char* p = reinterpret_cast<const char*>(cache + slot[ahead]);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b);
  };
  const __m512 scale = _mm512_set1_ps(pb.scale);
  struct Row {
    const bf16* q;
    int64_t head, seen;  // kv head offset in a cache row; keys seen
  };
  auto row = [&](int64_t r) {
    return Row{q + (v.tok0 + r / heads) * pb.q_stride + (v.j0 + r % heads) * D, v.head_offset(r), v.seen(r)};
  };
  // Scores: rows in groups of kGroup (the group's first requests the cache rows ahead), keys in chunks
  // of 16, each row of the group in turn over the chunk; a row's 16 dot-product vectors become 16
  // scores at once.
  for (int64_t g0 = 0; g0 < rows; g0 += kGroup) {
    const int g_rows = static_cast<int>(std::min<int64_t>(kGroup, rows - g0));
    Row rg[kGroup];
    for (int g = 0; g < g_rows; ++g) rg[g] = row(g0 + g);
    const int64_t seen_max = rg[g_rows - 1].seen;
    for (int64_t t0 = 0; t0 < seen_max; t0 += 16) {
      const int64_t n = std::min<int64_t>(16, seen_max - t0);
      if (g0 == 0)
        for (int64_t i = 0; i < 16; ++i) prefetch_ahead(true, t0 + i);
      for (int g = 0; g < g_rows; ++g) {  // the chunk's cache rows stay in L1 for every row
        const int64_t m = std::min<int64_t>(n, rg[g].seen - t0);
        if (m <= 0) continue;
        __m512bh qv[kDotChunks];
        for (int c = 0; c < kDotChunks; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(rg[g].q + 32 * c);
        __m512 dots[16];
        for (int64_t i = 0; i < 16; ++i) {
          __m512 d = _mm512_setzero_ps();
          if (i < m) {
            const bf16* kr = k_cache + slot[t0 + i] + rg[g].head;
            for (int c = 0; c < kDotChunks; ++c) d = _mm512_dpbf16_ps(d, qv[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
          }
          dots[i] = d;
        }
        _mm512_mask_storeu_ps(s.data() + (g0 + g) * keys + t0, static_cast<__mmask16>((1u << m) - 1),
                              _mm512_mul_ps(sum_each(dots), scale));
      }
    }
  }
  softmax_rows(s.data(), inv_sum.data(), v);
  // p in bf16 (as torch's own CPU flash attention rounds it for its p . V product), zero past the
  // keys a row sees, an even count per row: the p . V sums take two keys per VDPBF16PS lane.
  const int64_t keys2 = keys + keys % 2;
  std::vector<uint16_t> p16(rows * keys2, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = v.seen(r);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - t)) - 1);
      _mm256_mask_storeu_epi16(p16.data() + r * keys2 + t, m,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s.data() + r * keys + t)));
    }
  }
  for (int64_t g0 = 0; g0 < rows; g0 += kGroup) {
    const int g_rows = static_cast<int>(std::min<int64_t>(kGroup, rows - g0));
    Row rg[kGroup];
    for (int g = 0; g < g_rows; ++g) rg[g] = row(g0 + g);
    __m512 o[kGroup][kOutChunks];
    for (int g = 0; g < kGroup; ++g)
      for (int c = 0; c < kOutChunks; ++c) o[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < rg[g_rows - 1].seen; t += 2) {
      if (g0 == 0) prefetch_ahead(false, t), prefetch_ahead(false, t + 1);
      const bf16* v0 = v_cache + slot[t];
      const bf16* v1 = t + 1 < keys ? v_cache + slot[t + 1] : nullptr;  // none: p is 0 there
      for (int g = 0; g < g_rows; ++g) {
        if (t >= rg[g].seen) continue;
        int32_t pair;
        std::memcpy(&pair, p16.data() + (g0 + g) * keys2 + t, sizeof pair);
        const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);  // (p_t, p_t+1) in every lane
        for (int c = 0; c < kOutChunks; c += 2) {  // 32 elements: (v_t[e], v_t+1[e]) pairs by two unpacks
          const __m512i a = _mm512_loadu_si512(v0 + rg[g].head + 16 * c);
          const __m512i b = v1 ? _mm512_loadu_si512(v1 + rg[g].head + 16 * c) : _mm512_setzero_si512();
          o[g][c] = _mm512_dpbf16_ps(o[g][c], p, (__m512bh)_mm512_unpacklo_epi16(a, b));
          o[g][c + 1] = _mm512_dpbf16_ps(o[g][c + 1], p, (__m512bh)_mm512_unpackhi_epi16(a, b));
        }
      }
    }
    // o[c], o[c + 1] hold elements 8L + (0..3) and 8L + (4..7) of the 32 at lanes 4L..4L + 3 (L = the
    // 128-bit lane): put them back in order
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < g_rows; ++g) {
      const int64_t r = g0 + g;
      bf16* dst = out + (v.tok0 + r / heads) * pb.hq * D + (v.j0 + r % heads) * D;
      const __m512 inv = _mm512_set1_ps(inv_sum[r]);
      for (int c = 0; c < kOutChunks; c += 2) {
        const __m512 lo = _mm512_permutex2var_ps(o[g][c], first, o[g][c + 1]);
        const __m512 hi = _mm512_permutex2var_ps(o[g][c], second, o[g][c + 1]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), to_bf16_rne(_mm512_mul_ps(lo, inv)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c + 16), to_bf16_rne(_mm512_mul_ps(hi, inv)));
      }
    }
  }
}

// The bf16 kernel for this head_dim, or nullptr (then the generic kernel runs).
using Bf16Kernel = void (*)(const PagedBatch&, const Task&, bf16*, const bf16*, const bf16*, const bf16*);
static Bf16Kernel bf16_kernel(int64_t d) {
  switch (d) {
    case 32: return attend_bf16<32>;
    case 64: return attend_bf16<64>;
    case 96: return attend_bf16<96>;
    case 128: return attend_bf16<128>;
    case 160: return attend_bf16<160>;
    case 192: return attend_bf16<192>;
    case 224: return attend_bf16<224>;
    case 256: return attend_bf16<256>;
    default: return nullptr;
  }
}
#else
using Bf16Kernel = void (*)(const PagedBatch&, const Task&, bf16*, const bf16*, const bf16*, const bf16*);
static Bf16Kernel bf16_kernel(int64_t) { return nullptr; }
#endif

void paged_attention(int64_t out, int64_t q, int64_t tokens, int64_t k_cache, int64_t v_cache, int64_t cu_seqlens_q,
                     int64_t context_lens, int64_t block_tables, int64_t num_seqs, int64_t q_stride,
                     int64_t bt_stride, int64_t bt_width, int64_t hq, int64_t hk, int64_t head_dim,
                     int64_t block_size, int64_t num_blocks, double scale, int dtype) {
  const char* op = "attention";
  require(hk > 0 && hq % hk == 0, op, "query heads must be a multiple of kv heads");
  const int32_t* cu = as_ptr<const int32_t>(cu_seqlens_q);
  require(num_seqs >= 0 && cu[0] == 0 && cu[num_seqs] <= tokens, op,
          "cu_seqlens_q must run from 0 to at most the " + std::to_string(tokens) + " query tokens, got " +
              std::to_string(cu[0]) + " .. " + std::to_string(cu[num_seqs]));
  require(head_dim > 0 && block_size > 0, op, "head_dim and block_size must be > 0");
  PagedBatch pb{cu, as_ptr<const int32_t>(context_lens),
                as_ptr<const int32_t>(block_tables), bt_stride, hq, hk, head_dim, block_size, q_stride,
                static_cast<float>(scale)};
  std::vector<Task> tiles;
  int64_t work = 0;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t n = pb.cu[b + 1] - pb.cu[b], c = pb.ctx[b];
    require(n >= 0, op, "cu_seqlens_q must not decrease (sequence " + std::to_string(b) + ")");
    if (n == 0) continue;
    require(c >= n, op, "sequence " + std::to_string(b) + " has " + std::to_string(n) +
                            " new tokens but context length " + std::to_string(c));
    require(c <= bt_width * block_size, op, "sequence " + std::to_string(b) + ": context length " +
                                                std::to_string(c) + " exceeds its block table");
    const int32_t* table = pb.tables + b * bt_stride;
    for (int64_t j = 0; j < (c + block_size - 1) / block_size; ++j)
      require(table[j] >= 0 && table[j] < num_blocks, op, "sequence " + std::to_string(b) + ": block " +
                  std::to_string(table[j]) + " outside the cache's " + std::to_string(num_blocks) + " blocks");
    for (int64_t first = 0; first < n; first += kTileTokens)
      tiles.push_back({b, first, std::min(kTileTokens, n - first), 0, hk});
    work += n * c * hq * head_dim;
  }
  // Enough tasks for every thread: split the kv heads of each tile when tiles are few.
#ifdef _OPENMP
  const int64_t threads = work >= kParallelGrain ? omp_get_max_threads() : 1;
#else
  const int64_t threads = 1;
#endif
  const int64_t tiles_n = static_cast<int64_t>(tiles.size());
  const int64_t splits = std::min<int64_t>(hk, (2 * threads + tiles_n - 1) / std::max<int64_t>(tiles_n, 1));
  std::vector<Task> tasks;
  for (const Task& t : tiles)
    for (int64_t i = 0; i < splits; ++i) tasks.push_back({t.seq, t.first, t.len, hk * i / splits, hk * (i + 1) / splits});
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const Bf16Kernel fast = dtype == kBFloat16 ? bf16_kernel(head_dim) : nullptr;
  dispatch(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel for schedule(dynamic, 1) if (num_tasks > 1 && threads > 1)
    for (int64_t i = 0; i < num_tasks; ++i) {
      if constexpr (std::is_same_v<T, bf16>) {
        if (fast) {
          fast(pb, tasks[i], as_ptr<bf16>(out), as_ptr<const bf16>(q), as_ptr<const bf16>(k_cache),
               as_ptr<const bf16>(v_cache));
          continue;
        }
      }
      attend<T>(pb, tasks[i], as_ptr<T>(out), as_ptr<const T>(q), as_ptr<const T>(k_cache), as_ptr<const T>(v_cache));
    }
  });
}

void write_kv(int64_t k, int64_t v, int64_t k_cache, int64_t v_cache, int64_t slots, int64_t tokens,
              int64_t row_elems, int64_t k_stride, int64_t v_stride, int64_t elem_size, int64_t num_slots) {
  const int64_t* slot = as_ptr<const int64_t>(slots);
  for (int64_t t = 0; t < tokens; ++t)
    require(slot[t] < num_slots, "write_kv", "slot " + std::to_string(slot[t]) + " of token " + std::to_string(t) +
                                                 " is outside the cache's " + std::to_string(num_slots) + " slots");
  const auto* ks = as_ptr<const char>(k);
  const auto* vs = as_ptr<const char>(v);
  auto* kc = as_ptr<char>(k_cache);
  auto* vc = as_ptr<char>(v_cache);
  const int64_t row = row_elems * elem_size;
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot[t] < 0) continue;
    std::memcpy(kc + slot[t] * row, ks + t * k_stride * elem_size, row);
    std::memcpy(vc + slot[t] * row, vs + t * v_stride * elem_size, row);
  }
}

}  // namespace gf::cpu
