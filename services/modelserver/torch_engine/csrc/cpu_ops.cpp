// CPU kernels of the torch engine: paged attention that reads the KV cache in place, the fused
// RoPE + KV-cache write in front of it, the fused norm and activation, and the module's bindings
// (the sampler's kernel lives in sampling.cpp).
//
// Written as plain loops the compiler vectorises for the build machine (the op is built at install
// with -march=native, so AVX-512 where present, AVX2 or NEON elsewhere); no intrinsics, so one
// source is both the fast and the portable build. All math is float32; bf16 is widened on load.
//
// Cache layout, per layer (head-major pages, so one page of one KV head is contiguous):
//   k_cache [num_blocks, kv_heads, head_dim, block]   K transposed inside a page: the Q.K loop runs
//                                                     over tokens with unit stride
//   v_cache [num_blocks, kv_heads, block, head_dim]   V rows: the P.V loop runs over head_dim
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
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace {

using namespace meshserve;

struct WorkItem {
  int32_t seq, kv_head, q_begin, q_end;  // query tokens [q_begin, q_end) of the step (global rows)
};

// One work item: rows = (query token, query head of this KV head). Online softmax over pages.
template <typename T, int B>
void attend(const WorkItem& w, const T* q, int64_t q_row_stride, T* out, const T* k_cache, const T* v_cache,
            const int32_t* table, int32_t first_pos, int H, int KV, int D, float scale) {
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
  alignas(64) float s[B];
  for (int blk = 0; blk < nblocks; ++blk) {
    const size_t off = (static_cast<size_t>(table[blk]) * KV + w.kv_head) * page;
    const float* kpage;
    const float* vpage;
    if constexpr (std::is_same_v<T, float>) {  // already float: read the page in place
      kpage = k_cache + off;
      vpage = v_cache + off;
    } else {  // widen once per page; every row of the item then reads float from L1
      const T* kp = k_cache + off;
      const T* vp = v_cache + off;
      for (size_t e = 0; e < page; ++e) kf[e] = to_f(kp[e]);
      for (size_t e = 0; e < page; ++e) vf[e] = to_f(vp[e]);
      kpage = kf.data();
      vpage = vf.data();
    }
    const int base = blk * B;
    for (int i = 0; i < ntok; ++i) {
      const int pos = first_pos + i;
      if (base > pos) continue;
      const int nv = std::min(B, pos - base + 1);
      for (int g = 0; g < G; ++g) {
        const int r = i * G + g;
        const float* qr = qf.data() + r * D;
        for (int t = 0; t < B; ++t) s[t] = 0.0f;
        for (int d = 0; d < D; ++d) {
          const float qd = qr[d];
          const float* kr = kpage + d * B;
          for (int t = 0; t < B; ++t) s[t] += qd * kr[t];
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
        float* ar = acc.data() + r * D;
        for (int d = 0; d < D; ++d) ar[d] *= corr;
        for (int t = 0; t < nv; ++t) {
          const float p = s[t];
          const float* vr = vpage + t * D;
          for (int d = 0; d < D; ++d) ar[d] += p * vr[d];
        }
      }
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

template <typename T, int B>
void run_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& block_tables, const torch::Tensor& seq_starts,
                   const torch::Tensor& context_lens, double scale, int64_t max_tile_rows) {
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
  const T* kc = k_cache.data_ptr<T>();
  const T* vc = v_cache.data_ptr<T>();
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
    attend<T, B>(w, qp, q_stride, op, kc, vc, tables + w.seq * table_stride, first_pos, H, KV, D,
                 static_cast<float>(scale));
  }
}

void check_common(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, H, D], rows strided");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
}

}  // namespace

// out[T, H, D] = softmax(q K^T * scale) V per query row, causal within each sequence's context.
// Rows [seq_starts[s], seq_starts[s+1]) belong to sequence s, whose cache holds context_lens[s]
// tokens (this step's included); its last query is at position context_lens[s] - 1.
void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor seq_starts, torch::Tensor context_lens, double scale,
                     int64_t max_tile_rows) {
  check_common(q, k_cache, v_cache);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), "bad out");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && seq_starts.scalar_type() == torch::kInt32 &&
                  context_lens.scalar_type() == torch::kInt32 && seq_starts.is_contiguous() &&
                  context_lens.is_contiguous() && block_tables.stride(1) == 1,
              "tables and lengths must be int32");
  const int64_t B = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.size(2) == B && v_cache.size(3) == q.size(2), "bad cache shape");
#define MS_DISPATCH_B(T)                                                                                       \
  switch (B) {                                                                                                 \
    case 16: run_attention<T, 16>(out, q, k_cache, v_cache, block_tables, seq_starts, context_lens, scale,    \
                                  max_tile_rows); break;                                                       \
    case 32: run_attention<T, 32>(out, q, k_cache, v_cache, block_tables, seq_starts, context_lens, scale,    \
                                  max_tile_rows); break;                                                       \
    case 64: run_attention<T, 64>(out, q, k_cache, v_cache, block_tables, seq_starts, context_lens, scale,    \
                                  max_tile_rows); break;                                                       \
    case 128: run_attention<T, 128>(out, q, k_cache, v_cache, block_tables, seq_starts, context_lens, scale,  \
                                    max_tile_rows); break;                                                     \
    default: TORCH_CHECK(false, "block size must be 16, 32, 64 or 128, got ", B);                             \
  }
  if (q.scalar_type() == torch::kBFloat16) {
    MS_DISPATCH_B(bf16)
  } else if (q.scalar_type() == torch::kFloat32) {
    MS_DISPATCH_B(float)
  } else {
    TORCH_CHECK(false, "paged_attention supports float32 and bfloat16");
  }
#undef MS_DISPATCH_B
}

template <typename T>
void rope_cache_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, const torch::Tensor& slots, torch::Tensor& q_out,
                     torch::Tensor& k_cache, torch::Tensor& v_cache, int H) {
  const int64_t T_ = qkv.size(0);
  const int KV = k_cache.size(1), D = k_cache.size(2), B = k_cache.size(3);
  const int half = D / 2;
  const T* x = qkv.data_ptr<T>();
  const int64_t xs = qkv.stride(0);
  const T* c = cos.data_ptr<T>();
  const T* sn = sin.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* qo = q_out.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (T_ * (H + 2 * KV) * D > kParallelWork)
  for (int64_t t = 0; t < T_; ++t) {
    const T* row = x + t * xs;
    const T* ct = c + pos[t] * D;
    const T* st = sn + pos[t] * D;
    const int64_t blk = slot[t] / B, off = slot[t] % B;
    for (int h = 0; h < H + KV; ++h) {
      const T* src = row + h * D;
      for (int d = 0; d < D; ++d) {
        const float rot = to_f(src[d < half ? d + half : d - half]);
        const float v = to_f(src[d]) * to_f(ct[d]) + rot * to_f(st[d]);
        if (h < H) {
          from_f(v, qo + (t * H + h) * D + d);
        } else {
          from_f(v, kc + ((blk * KV + (h - H)) * D + d) * B + off);
        }
      }
    }
    for (int h = 0; h < KV; ++h) {
      const T* src = row + (H + KV + h) * D;
      T* dst = vc + ((blk * KV + h) * B + off) * D;
      std::memcpy(dst, src, sizeof(T) * D);
    }
  }
}

// Rotate q and k of every token (rotate-half RoPE with sign-folded sin tables [positions, D]),
// write q to q_out [T, H, D] and k, v into their cache slots (slot = block * B + offset).
void rope_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                    torch::Tensor slots, torch::Tensor q_out, torch::Tensor k_cache, torch::Tensor v_cache) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (H + 2 KV) * D] with unit last stride");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && q_out.is_contiguous(), "tables and q_out contiguous");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                  positions.is_contiguous() && slots.is_contiguous(), "positions and slots must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && sin.scalar_type() == dt && q_out.scalar_type() == dt &&
                  k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, "all tensors must share a dtype");
  const int KV = k_cache.size(1), D = k_cache.size(2);
  const int H = q_out.size(1);
  TORCH_CHECK(qkv.size(1) == (H + 2 * KV) * D && q_out.size(2) == D && q_out.size(0) == qkv.size(0), "bad shapes");
  if (dt == torch::kBFloat16) {
    rope_cache_impl<bf16>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, H);
  } else if (dt == torch::kFloat32) {
    rope_cache_impl<float>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, H);
  } else {
    TORCH_CHECK(false, "rope_and_cache supports float32 and bfloat16");
  }
}

template <typename T>
void silu_mul_impl(const torch::Tensor& gu, torch::Tensor& out) {
  const int64_t rows = gu.size(0), n = out.size(1);
  const T* x = gu.data_ptr<T>();
  T* o = out.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (rows * n > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * n;
    const T* u = g + n;
    T* dst = o + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float a = to_f(g[i]);
      from_f(a / (1.0f + fast_exp(-a)) * to_f(u[i]), dst + i);
    }
  }
}

// out[r] = silu(gu[r, :n]) * gu[r, n:]: the MLP's activation in one pass instead of three kernels.
void silu_and_mul(torch::Tensor gu, torch::Tensor out) {
  TORCH_CHECK(gu.is_contiguous() && out.is_contiguous() && gu.size(1) == 2 * out.size(1) &&
                  gu.size(0) == out.size(0) && gu.scalar_type() == out.scalar_type(), "bad silu_and_mul shapes");
  if (gu.scalar_type() == torch::kBFloat16) {
    silu_mul_impl<bf16>(gu, out);
  } else if (gu.scalar_type() == torch::kFloat32) {
    silu_mul_impl<float>(gu, out);
  } else {
    TORCH_CHECK(false, "silu_and_mul supports float32 and bfloat16");
  }
}

template <typename T>
void add_rms_norm_impl(torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& w, double eps,
                       torch::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (rows * n > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = xp + r * n;
    if (dp) {
      const T* dr = dp + r * n;
      for (int64_t i = 0; i < n; ++i) from_f(to_f(xr[i]) + to_f(dr[i]), xr + i);
    }
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += to_f(xr[i]) * to_f(xr[i]);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    T* orow = op + r * n;
    for (int64_t i = 0; i < n; ++i) from_f(to_f(xr[i]) * inv * to_f(wp[i]), orow + i);
  }
}

// x += delta (when given, in place, rounded to x's dtype like torch's add), then
// out = rms_norm(x) * w per row: the residual add and the next norm in one pass over x.
void add_rms_norm(torch::Tensor x, std::optional<torch::Tensor> delta, torch::Tensor w, double eps, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.is_contiguous() && out.sizes() == x.sizes() &&
                  w.is_contiguous() && w.numel() == x.size(1), "bad add_rms_norm shapes");
  TORCH_CHECK(!delta || (delta->is_contiguous() && delta->sizes() == x.sizes() &&
                         delta->scalar_type() == x.scalar_type()), "bad delta");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type(), "dtypes must match");
  const torch::Tensor* d = delta ? &*delta : nullptr;
  if (x.scalar_type() == torch::kBFloat16) {
    add_rms_norm_impl<bf16>(x, d, w, eps, out);
  } else if (x.scalar_type() == torch::kFloat32) {
    add_rms_norm_impl<float>(x, d, w, eps, out);
  } else {
    TORCH_CHECK(false, "add_rms_norm supports float32 and bfloat16");
  }
}

// csrc/sampling.cpp
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor rows, torch::Tensor temperatures,
                          torch::Tensor top_k, torch::Tensor top_p, torch::Tensor u);

int64_t openmp_threads() { return omp_get_max_threads(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over head-major KV pages (decode + prefill)");
  m.def("rope_and_cache", &rope_and_cache, "RoPE on q and k, k and v written to their cache slots");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("add_rms_norm", &add_rms_norm, "x += delta; out = rms_norm(x) * w");
  m.def("sample_rows", &sample_rows, "temperature/top-k/top-p sampling of rows without a vocabulary sort");
  m.def("openmp_threads", &openmp_threads, "OpenMP threads the calling thread would use");
}
