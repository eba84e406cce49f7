// Scalar helpers shared by the engine's CPU kernels: bf16 widening/rounding, a vectorisable exp,
// and the int8 KV cache's scale check.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

namespace meshserve {

using bf16 = c10::BFloat16;

inline float to_f(float x) { return x; }
inline float to_f(int8_t x) { return static_cast<float>(x); }
inline float to_f(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void from_f(float x, float* out) { *out = x; }
inline void from_f(float x, bf16* out) {  // round to nearest even, like torch
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) {
    out->x = 0x7fc0;
    return;
  }
  u += 0x7fff + ((u >> 16) & 1);
  out->x = static_cast<uint16_t>(u >> 16);
}

// exp for the softmax: 2^(x log2 e) split into the nearest integer and a fraction in [-0.5, 0.5],
// whose 2^f is a degree-6 Taylor polynomial (rel. error ~2e-7). Inlined and vectorisable; libm's
// expf is neither without -ffast-math, which would also let the compiler reorder our reductions.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.4426950408889634f;
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.6931471805599453f;  // 2^(t-n) = e^f, |f| <= 0.347
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// Below this many multiply-adds a kernel runs on the calling thread: waking OpenMP threads costs
// more than it saves for a few rows, and on a busy machine a descheduled thread stalls the region.
constexpr int64_t kParallelWork = 1 << 16;

// Largest head_dim a kernel holds on the stack (Llama-family models use 64-256).
constexpr int kMaxHeadDim = 512;

// The per-token scales of an int8 KV cache [num_blocks, kv_heads, block] (float32), checked against
// the cache; null pointers for a float cache, which must come without scales.
struct KvScales {
  float* k = nullptr;
  float* v = nullptr;
};

inline KvScales int8_cache_scales(const torch::Tensor& k_cache, const std::optional<torch::Tensor>& k_scale,
                                  const std::optional<torch::Tensor>& v_scale) {
  if (k_cache.scalar_type() != torch::kChar) {
    TORCH_CHECK(!k_scale && !v_scale, "scales are for an int8 cache only");
    return {};
  }
  TORCH_CHECK(k_scale && v_scale, "an int8 cache needs k_scale and v_scale");
  for (const torch::Tensor* t : {&*k_scale, &*v_scale}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == k_cache.size(0) && t->size(1) == k_cache.size(1) && t->size(2) == k_cache.size(3),
                "scales must be float32 [num_blocks, kv_heads, block]");
  }
  return {k_scale->data_ptr<float>(), v_scale->data_ptr<float>()};
}

}  // namespace meshserve
