// CPU kernels of the torch engine besides attention (paged_attention.cpp), sampling (sampling.cpp)
// and the int8 matmul (int8_linear.cpp): the fused RoPE + KV-cache write, the residual add +
// RMSNorm, SiLU x mul, and the module's bindings. Plain loops the compiler vectorises for the build
// machine (-march=native).
//
// Cache layout, per layer (see paged_attention.cpp): k_cache [num_blocks, kv_heads, head_dim, block]
// (K transposed inside a page), v_cache [num_blocks, kv_heads, block, head_dim].
#include <torch/extension.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "cpu_math.h"

using namespace meshserve;

// The int8 form of one row of a cache: scale = max |x| / 127, q = round-half-even(x / scale) (what
// kv_cache.quantize_rows computes, so kernel and plain-torch path store the same bytes).
inline float quantize_row(const float* x, int n, int8_t* q, int64_t q_stride) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.0f;
  const float div = scale > 0.0f ? scale : 1.0f;
  for (int i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[i] / div);
    q[i * q_stride] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
  return scale;
}

template <typename T, typename C>
void rope_cache_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                     const torch::Tensor& positions, const torch::Tensor& slots, torch::Tensor& q_out,
                     torch::Tensor& k_cache, torch::Tensor& v_cache, float* k_scale, float* v_scale, int H) {
  constexpr bool kInt8 = std::is_same_v<C, int8_t>;
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
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (T_ * (H + 2 * KV) * D > kParallelWork)
  for (int64_t t = 0; t < T_; ++t) {
    const T* row = x + t * xs;
    const T* ct = c + pos[t] * D;
    const T* st = sn + pos[t] * D;
    const int64_t blk = slot[t] / B, off = slot[t] % B;
    float kf[kMaxHeadDim];  // one rotated K row in the model's dtype, widened (int8 caches)
    for (int h = 0; h < H + KV; ++h) {
      const T* src = row + h * D;
      for (int d = 0; d < D; ++d) {
        const float rot = to_f(src[d < half ? d + half : d - half]);
        const float v = to_f(src[d]) * to_f(ct[d]) + rot * to_f(st[d]);
        if (h < H) {
          from_f(v, qo + (t * H + h) * D + d);
        } else if constexpr (kInt8) {
          T rounded;  // the model's dtype first, as the plain-torch path computes it
          from_f(v, &rounded);
          kf[d] = to_f(rounded);
        } else {
          from_f(v, kc + ((blk * KV + (h - H)) * D + d) * B + off);
        }
      }
      if constexpr (kInt8) {
        if (h >= H) {
          const int64_t page = blk * KV + (h - H);
          k_scale[page * B + off] = quantize_row(kf, D, kc + page * D * B + off, B);
        }
      }
    }
    for (int h = 0; h < KV; ++h) {
      const T* src = row + (H + KV + h) * D;
      C* dst = vc + ((blk * KV + h) * B + off) * D;
      if constexpr (kInt8) {
        for (int d = 0; d < D; ++d) kf[d] = to_f(src[d]);
        v_scale[(blk * KV + h) * B + off] = quantize_row(kf, D, dst, 1);
      } else {
        std::memcpy(dst, src, sizeof(T) * D);
      }
    }
  }
}

// Rotate q and k of every token (rotate-half RoPE with sign-folded sin tables [positions, D]),
// write q to q_out [T, H, D] and k, v into their cache slots (slot = block * B + offset). An int8
// cache comes with k_scale / v_scale [num_blocks, kv_heads, block]: each row is quantized on write.
void rope_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                    torch::Tensor slots, torch::Tensor q_out, torch::Tensor k_cache, torch::Tensor v_cache,
                    std::optional<torch::Tensor> k_scale, std::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, (H + 2 KV) * D] with unit last stride");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && q_out.is_contiguous(), "tables and q_out contiguous");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                  positions.is_contiguous() && slots.is_contiguous(), "positions and slots must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && sin.scalar_type() == dt && q_out.scalar_type() == dt,
              "qkv, tables and q_out must share a dtype");
  const bool int8 = k_cache.scalar_type() == torch::kChar;
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && (int8 || k_cache.scalar_type() == dt),
              "caches must be int8 or have qkv's dtype");
  const int KV = k_cache.size(1), D = k_cache.size(2);
  const int H = q_out.size(1);
  TORCH_CHECK(qkv.size(1) == (H + 2 * KV) * D && q_out.size(2) == D && q_out.size(0) == qkv.size(0), "bad shapes");
  const KvScales scales = int8_cache_scales(k_cache, k_scale, v_scale);
  TORCH_CHECK(!int8 || D <= kMaxHeadDim, "head_dim above ", kMaxHeadDim, " with an int8 cache");
  float* ks = scales.k;
  float* vs = scales.v;
  if (dt == torch::kBFloat16) {
    if (int8) {
      rope_cache_impl<bf16, int8_t>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, ks, vs, H);
    } else {
      rope_cache_impl<bf16, bf16>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, ks, vs, H);
    }
  } else if (dt == torch::kFloat32) {
    if (int8) {
      rope_cache_impl<float, int8_t>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, ks, vs, H);
    } else {
      rope_cache_impl<float, float>(qkv, cos, sin, positions, slots, q_out, k_cache, v_cache, ks, vs, H);
    }
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

// paged_attention.cpp
void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor seq_starts, torch::Tensor context_lens, double scale,
                     int64_t max_tile_rows, std::optional<torch::Tensor> k_scale,
                     std::optional<torch::Tensor> v_scale);

// int8_linear.cpp
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, std::optional<torch::Tensor> bias);

// sampling.cpp
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor rows, torch::Tensor temperatures,
                          torch::Tensor top_k, torch::Tensor top_p, torch::Tensor u);

int64_t openmp_threads() { return omp_get_max_threads(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("paged_attention", &paged_attention, "paged attention over head-major KV pages (decode + prefill)",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_starts"), py::arg("context_lens"), py::arg("scale"), py::arg("max_tile_rows"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("rope_and_cache", &rope_and_cache, "RoPE on q and k, k and v written to their cache slots",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("slots"), py::arg("q_out"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("add_rms_norm", &add_rms_norm, "x += delta; out = rms_norm(x) * w");
  m.def("int8_linear", &int8_linear, "x @ (q * group scales)^T + bias with int8 weights (few-row steps)",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("sample_rows", &sample_rows, "temperature/top-k/top-p sampling of rows without a vocabulary sort");
  m.def("openmp_threads", &openmp_threads, "OpenMP threads the calling thread would use");
}
