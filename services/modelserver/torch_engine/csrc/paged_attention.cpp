// Paged attention of one engine step over the KV cache, read in place: decode tokens and prefill
// chunks together, grouped-query heads sharing every page read, no padding and no mask tensors.
//
// Portable source (plain loops and GCC/Clang vector extensions; one AVX2 intrinsic where GCC's
// portable int8 widening is scalar) built with -march=native, so one source is both the fast and
// the portable build. All math is float32; bf16 and int8 are widened on load.
//
// Cache layout, per layer (head-major pages, so one page of one KV head is contiguous):
//   k_cache [num_blocks, kv_heads, head_dim, block]   K transposed inside a page: the Q.K loop runs
//                                                     over tokens with unit stride
//   v_cache [num_blocks, kv_heads, block, head_dim]   V rows: the P.V loop runs over head_dim
//
// 8-bit cache (optional): k_cache / v_cache int8 with a float32 scale per token and KV head,
// k_scale / v_scale [num_blocks, kv_heads, block]. A token's score is (q . k_int8) * k_scale and its
// value weight p * v_scale, on the decode walk (int8 read in place, a quarter of float32's bytes)
// and the prefill blocks (pages widened once, unscaled) alike, so both paths give the same sums.
//
// Determinism: every query row (one token, one head) is computed by the same loop over its own
// context in block order, whatever the batch, the chunking or the tile it shares, so the result of
// a row depends only on its inputs (what the engine's batch-invariant mode relies on).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "cpu_vec.h"

namespace {

using namespace meshserve;

struct WorkItem {
  int32_t seq, kv_head, q_begin, q_end;  // query tokens [q_begin, q_end) of the step (global rows)
};

// Rows of one work item are processed in groups of up to kRowBlock: each K and V vector loaded from
// a page then feeds kRowBlock FMAs held in registers, where one row at a time spent two loads and a
// store per FMA. Written with GCC/Clang vector extensions (8 floats; AVX2 registers, split in two on
// NEON, half an AVX-512 register), not intrinsics: plain loops left the accumulators on the stack.
// Per row the sums run in the same order whatever its group (lanes are independent), so a row's
// result still depends only on its own inputs.
constexpr int kRowBlock = 4;
constexpr int kLanes = 16;  // columns per register block: two 8-float vectors


// s[r][t] = q_r . k_t for every token t of the page (K stored [D][B] inside a page).
template <int RB, int B>
inline void page_scores(const float* q, const float* kpage, int D, float* s) {
  for (int t0 = 0; t0 < B; t0 += kLanes) {
    vf8 a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) a0[r] = a1[r] = vf8{};
    for (int d = 0; d < D; ++d) {
      const vf8 k0 = load8(kpage + d * B + t0), k1 = load8(kpage + d * B + t0 + 8);
      for (int r = 0; r < RB; ++r) {
        const float qd = q[r * D + d];
        a0[r] += qd * k0;
        a1[r] += qd * k1;
      }
    }
    for (int r = 0; r < RB; ++r) {
      store8(s + r * B + t0, a0[r]);
      store8(s + r * B + t0 + 8, a1[r]);
    }
  }
}

// acc[r] += sum over t < nt of p[r][t] * v_t (V stored [B][D] inside a page; p is 0 past a row's tokens).
template <int RB, int B, typename C = float>
inline void page_values(const float* p, const C* vpage, int D, int nt, float* acc) {
  for (int d0 = 0; d0 < D; d0 += kLanes) {
    vf8 a0[RB], a1[RB];
    for (int r = 0; r < RB; ++r) {
      a0[r] = load8(acc + r * D + d0);
      a1[r] = load8(acc + r * D + d0 + 8);
    }
    for (int t = 0; t < nt; ++t) {
      const vf8 v0 = load8(vpage + t * D + d0), v1 = load8(vpage + t * D + d0 + 8);
      for (int r = 0; r < RB; ++r) {
        const float pt = p[r * B + t];
        a0[r] += pt * v0;
        a1[r] += pt * v1;
      }
    }
    for (int r = 0; r < RB; ++r) {
      store8(acc + r * D + d0, a0[r]);
      store8(acc + r * D + d0 + 8, a1[r]);
    }
  }
}

// One group of RB consecutive rows (row r is token r0 + r / G) against one page: scores, online
// softmax update per row, then the weighted values.
// ks / vs: the page's int8 scales per token, or null for a float page.
template <int RB, int B>
inline void attend_page(int r0, int G, int first_pos, int base, const float* qf, const float* kpage,
                        const float* vpage, const float* ks, const float* vs, int D, float* m, float* l,
                        float* acc, float* s) {
  page_scores<RB, B>(qf + r0 * D, kpage, D, s);
  const int nt = std::min(B, first_pos + (r0 + RB - 1) / G - base + 1);  // the last row sees most
  for (int r = 0; r < RB; ++r) {
    const int row = r0 + r;
    const int nv = std::min(B, first_pos + row / G - base + 1);
    float* sr = s + r * B;
    if (nv <= 0) {  // the page starts after this row's position
      for (int t = 0; t < nt; ++t) sr[t] = 0.0f;
      continue;
    }
    if (ks) {
      for (int t = 0; t < nv; ++t) sr[t] *= ks[t];
    }
    float mx = m[row];
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < nv; ++t) mx = std::max(mx, sr[t]);
    const float corr = fast_exp(m[row] - mx);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < nv; ++t) {
      sr[t] = fast_exp(sr[t] - mx);
      sum += sr[t];
    }
    for (int t = nv; t < nt; ++t) sr[t] = 0.0f;
    l[row] = l[row] * corr + sum;
    m[row] = mx;
    float* ar = acc + row * D;
    for (int d = 0; d < D; ++d) ar[d] *= corr;
    if (vs) {
      for (int t = 0; t < nv; ++t) sr[t] *= vs[t];
    }
  }
  page_values<RB, B>(s, vpage, D, nt, acc + r0 * D);
}

// The G rows of one decode token against one page, a row at a time: the score loop holds the row's
// B scores in registers and walks the K page in address order, which the hardware prefetcher
// follows (at batch 64, memory-bound, that beat the row-blocked walk, which reads K column-wise, by
// ~20%). C is float, or int8_t read in place with its per-token scales ks / vs (null for float).
// Same sums in the same order as attend_page.
template <typename C, int B>
inline void attend_page_rows(int G, int pos, int base, const float* qf, const C* kpage, const C* vpage,
                             const float* ks, const float* vs, int D, float* m, float* l, float* acc) {
  constexpr int NV = B / 8;
  const int nv = std::min(B, pos - base + 1);
  alignas(64) float s[B];
  for (int r = 0; r < G; ++r) {
    const float* qr = qf + r * D;
    vf8 a[NV];
    for (int j = 0; j < NV; ++j) a[j] = vf8{};
    for (int d = 0; d < D; ++d) {
      const float qd = qr[d];
      const C* kr = kpage + d * B;
      for (int j = 0; j < NV; ++j) a[j] += qd * load8(kr + 8 * j);
    }
    for (int j = 0; j < NV; ++j) store8(s + 8 * j, a[j]);
    if constexpr (std::is_same_v<C, int8_t>) {
      for (int t = 0; t < nv; ++t) s[t] *= ks[t];
    }
    float mx = m[r];
#pragma omp simd reduction(max : mx)
    for (int t = 0; t < nv; ++t) mx = std::max(mx, s[t]);
    const float corr = fast_exp(m[r] - mx);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < nv; ++t) {
      s[t] = fast_exp(s[t] - mx);
      sum += s[t];
    }
    l[r] = l[r] * corr + sum;
    m[r] = mx;
    float* ar = acc + r * D;
    for (int d = 0; d < D; ++d) ar[d] *= corr;
    if constexpr (std::is_same_v<C, int8_t>) {
      for (int t = 0; t < nv; ++t) s[t] *= vs[t];
    }
    page_values<1, B, C>(s, vpage, D, nv, ar);
  }
}

// One work item: rows = (query token, query head of this KV head). Online softmax over pages.
// T: the type of q and out; C: the cache's (T, or int8_t with scales ks_all / vs_all).
template <typename T, typename C, int B>
void attend(const WorkItem& w, const T* q, int64_t q_row_stride, T* out, const C* k_cache, const C* v_cache,
            const float* ks_all, const float* vs_all, const int32_t* table, int32_t first_pos, int H, int KV,
            int D, float scale) {
  constexpr bool kInt8 = std::is_same_v<C, int8_t>;
  const int G = H / KV;
  const int ntok = w.q_end - w.q_begin;
  const int R = ntok * G;
  // Scratch reused across work items of a thread: no allocation per item in the hot loop.
  thread_local std::vector<float> qf, acc, m, l, kf, vf;
  qf.resize(static_cast<size_t>(R) * D);
  acc.assign(static_cast<size_t>(R) * D, 0.0f);
  m.assign(R, -std::numeric_limits<float>::infinity());
  l.assign(R, 0.0f);
  kf.resize(static_cast<size_t>(D) * B);
  vf.resize(static_cast<size_t>(B) * D);
  for (int i = 0; i < ntok; ++i) {
    for (int g = 0; g < G; ++g) {
      const T* src = q + (w.q_begin + i) * q_row_stride + (w.kv_head * G + g) * D;
      float* dst = qf.data() + (i * G + g) * D;
      for (int d = 0; d < D; ++d) dst[d] = to_f(src[d]) * scale;
    }
  }
  const int32_t last_pos = first_pos + ntok - 1;
  const int nblocks = last_pos / B + 1;
  const size_t page = static_cast<size_t>(D) * B;
  alignas(64) float s[kRowBlock * B];
  for (int blk = 0; blk < nblocks; ++blk) {
    const size_t head_page = static_cast<size_t>(table[blk]) * KV + w.kv_head;
    const size_t off = head_page * page;
    const float* ks = kInt8 ? ks_all + head_page * B : nullptr;
    const float* vs = kInt8 ? vs_all + head_page * B : nullptr;
    const int base = blk * B;
    if constexpr (kInt8) {
      if (ntok == 1) {  // a decode token reads the int8 page in place
        attend_page_rows<int8_t, B>(G, first_pos, base, qf.data(), k_cache + off, v_cache + off, ks, vs, D,
                                    m.data(), l.data(), acc.data());
        continue;
      }
    }
    const float* kpage;
    const float* vpage;
    if constexpr (std::is_same_v<C, float>) {  // already float: read the page in place
      kpage = k_cache + off;
      vpage = v_cache + off;
    } else {  // widen once per page (int8 unscaled); every row of the item then reads float from L1
      const C* kp = k_cache + off;
      const C* vp = v_cache + off;
      for (size_t e = 0; e < page; ++e) kf[e] = to_f(kp[e]);
      for (size_t e = 0; e < page; ++e) vf[e] = to_f(vp[e]);
      kpage = kf.data();
      vpage = vf.data();
    }
    if (ntok == 1) {  // a decode token
      attend_page_rows<float, B>(G, first_pos, base, qf.data(), kpage, vpage, ks, vs, D, m.data(), l.data(),
                                 acc.data());
      continue;
    }
    const int first_row = std::max(0, (base - first_pos) * G);  // rows before it do not see this page
    int r0 = first_row;
    float* mp = m.data();
    float* lp = l.data();
    float* ap = acc.data();
    const float* qd = qf.data();
    for (; r0 + kRowBlock <= R; r0 += kRowBlock) {
      attend_page<kRowBlock, B>(r0, G, first_pos, base, qd, kpage, vpage, ks, vs, D, mp, lp, ap, s);
    }
    switch (R - r0) {
      case 3: attend_page<3, B>(r0, G, first_pos, base, qd, kpage, vpage, ks, vs, D, mp, lp, ap, s); break;
      case 2: attend_page<2, B>(r0, G, first_pos, base, qd, kpage, vpage, ks, vs, D, mp, lp, ap, s); break;
      case 1: attend_page<1, B>(r0, G, first_pos, base, qd, kpage, vpage, ks, vs, D, mp, lp, ap, s); break;
      default: break;
    }
  }
  for (int i = 0; i < ntok; ++i) {
    for (int g = 0; g < G; ++g) {
      const int r = i * G + g;
      const float inv = 1.0f / l[r];
      T* dst = out + static_cast<int64_t>(w.q_begin + i) * H * D + (w.kv_head * G + g) * D;
      const float* ar = acc.data() + r * D;
      for (int d = 0; d < D; ++d) from_f(ar[d] * inv, dst + d);
    }
  }
}

template <typename T, typename C, int B>
void run_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, KvScales scales, const torch::Tensor& block_tables,
                   const torch::Tensor& seq_starts, const torch::Tensor& context_lens, double scale,
                   int64_t max_tile_rows) {
  const int H = q.size(1), D = q.size(2), KV = k_cache.size(1);
  const int G = H / KV;
  const int S = context_lens.size(0);
  const int32_t* starts = seq_starts.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  const int tile = std::max<int>(1, static_cast<int>(max_tile_rows) / G);
  std::vector<WorkItem> items;
  for (int s = 0; s < S; ++s) {
    for (int32_t b = starts[s]; b < starts[s + 1]; b += tile) {
      const int32_t e = std::min<int32_t>(b + tile, starts[s + 1]);
      for (int h = 0; h < KV; ++h) items.push_back({s, h, b, e});
    }
  }
  // Longest contexts first so the dynamic schedule does not end on one long item.
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    return ctx[a.seq] - (starts[a.seq + 1] - a.q_end) > ctx[b.seq] - (starts[b.seq + 1] - b.q_end);
  });
  const T* qp = q.data_ptr<T>();
  const int64_t q_stride = q.stride(0);
  T* op = out.data_ptr<T>();
  const C* kc = k_cache.data_ptr<C>();
  const C* vc = v_cache.data_ptr<C>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t n = static_cast<int64_t>(items.size());
  int64_t work = 0;
  for (int s = 0; s < S; ++s) work += static_cast<int64_t>(ctx[s]) * (starts[s + 1] - starts[s]) * H * D;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (n > 1 && work > kParallelWork)
  for (int64_t i = 0; i < n; ++i) {
    const WorkItem& w = items[i];
    const int32_t nq = starts[w.seq + 1] - starts[w.seq];
    const int32_t first_pos = ctx[w.seq] - nq + (w.q_begin - starts[w.seq]);
    attend<T, C, B>(w, qp, q_stride, op, kc, vc, scales.k, scales.v, tables + w.seq * table_stride, first_pos, H,
                    KV, D, static_cast<float>(scale));
  }
}

// The caches checked against q; for an int8 cache, its scales.
KvScales check_caches(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                      const std::optional<torch::Tensor>& k_scale, const std::optional<torch::Tensor>& v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, H, D], rows strided");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches must share a dtype");
  TORCH_CHECK(k_cache.scalar_type() == torch::kChar || k_cache.scalar_type() == q.scalar_type(),
              "a float cache must have q's dtype");
  return int8_cache_scales(k_cache, k_scale, v_scale);
}

}  // namespace

// out[T, H, D] = softmax(q K^T * scale) V per query row, causal within each sequence's context.
// Rows [seq_starts[s], seq_starts[s+1]) belong to sequence s, whose cache holds context_lens[s]
// tokens (this step's included); its last query is at position context_lens[s] - 1.
// An int8 cache comes with its scales k_scale / v_scale [num_blocks, kv_heads, block] (float32).
void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor seq_starts, torch::Tensor context_lens, double scale,
                     int64_t max_tile_rows, std::optional<torch::Tensor> k_scale,
                     std::optional<torch::Tensor> v_scale) {
  const KvScales scales = check_caches(q, k_cache, v_cache, k_scale, v_scale);
  const bool int8 = scales.k != nullptr;
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "bad out");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_starts.scalar_type() == torch::kInt32 &&
                  context_lens.scalar_type() == torch::kInt32 && seq_starts.is_contiguous() &&
                  context_lens.is_contiguous() && block_tables.stride(1) == 1,
              "tables and lengths must be int32");
  const int64_t B = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.size(2) == B && v_cache.size(3) == q.size(2), "bad cache shape");
  TORCH_CHECK(q.size(2) % kLanes == 0, "head_dim must be a multiple of ", kLanes);
#define MS_RUN(T, C, BS)                                                                                 \
  run_attention<T, C, BS>(out, q, k_cache, v_cache, scales, block_tables, seq_starts, context_lens, scale, \
                          max_tile_rows)
#define MS_DISPATCH_B(T, C)                                       \
  switch (B) {                                                    \
    case 16: MS_RUN(T, C, 16); break;                             \
    case 32: MS_RUN(T, C, 32); break;                             \
    case 64: MS_RUN(T, C, 64); break;                             \
    case 128: MS_RUN(T, C, 128); break;                           \
    default: TORCH_CHECK(false, "block size must be 16, 32, 64 or 128, got ", B); \
  }
  if (q.scalar_type() == torch::kBFloat16) {
    if (int8) {
      MS_DISPATCH_B(bf16, int8_t)
    } else {
      MS_DISPATCH_B(bf16, bf16)
    }
  } else if (q.scalar_type() == torch::kFloat32) {
    if (int8) {
      MS_DISPATCH_B(float, int8_t)
    } else {
      MS_DISPATCH_B(float, float)
    }
  } else {
    TORCH_CHECK(false, "paged_attention supports float32 and bfloat16");
  }
#undef MS_DISPATCH_B
#undef MS_RUN
}
