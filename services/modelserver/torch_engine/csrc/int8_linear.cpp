// Weight-only int8 matmul for steps of few rows: out[M, N] = x[M, K] @ (q[N, K] * scale)^T (+ bias).
//
// Why: one sequence decoding reads every weight once per token, so its step is bound by weight
// bytes; int8 reads a quarter of float32's (plus 1/8 for the scales). Scales are per output row and
// group of kGroup input columns (like llama.cpp's Q8_0 blocks), which keeps the error well below
// per-row scales. Each group's partial dot product is scaled once, then added to the row's sum.
//
// Rows are taken kRows at a time, so each weight vector converted from int8 feeds up to kRows FMAs;
// output columns are split over the OpenMP threads, each streaming its own weight rows in address
// order. Vector helpers from cpu_vec.h (portable, plus the AVX2 int8 widening).
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_math.h"
#include "cpu_vec.h"

namespace {

using namespace meshserve;

constexpr int kGroup = 32;  // input columns per scale
constexpr int kRows = 4;    // activation rows per weight pass

inline float hsum(vf8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Dot products of RB activation rows with weight row w (K columns, K / kGroup scales).
template <int RB>
inline void dot_rows(const float* x, int64_t K, const int8_t* w, const float* sc, float* out) {
  vf8 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = vf8{};
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const int64_t k = g * kGroup;
    const vf8 w0 = load8(w + k), w1 = load8(w + k + 8), w2 = load8(w + k + 16), w3 = load8(w + k + 24);
    const float s = sc[g];
    for (int r = 0; r < RB; ++r) {
      const float* xr = x + r * K + k;
      vf8 part = w0 * load8(xr);
      part += w1 * load8(xr + 8);
      part += w2 * load8(xr + 16);
      part += w3 * load8(xr + 24);
      acc[r] += part * s;
    }
  }
  for (int r = 0; r < RB; ++r) out[r] = hsum(acc[r]);
}

template <typename T>
void int8_linear_impl(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                      const T* bias, torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  // float copy of the activations (bf16 widened once; a few rows x K, reused by every output column)
  std::vector<float> xf(static_cast<size_t>(M) * K);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = to_f(xp[i]);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const int64_t groups = K / kGroup;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (M * N * K > kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w = qp + n * K;
    const float* sc = sp + n * groups;
    const float b = bias ? to_f(bias[n]) : 0.0f;
    float dots[kRows];
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const float* xr = xf.data() + m0 * K;
      const int rb = static_cast<int>(std::min<int64_t>(kRows, M - m0));
      switch (rb) {
        case 4: dot_rows<4>(xr, K, w, sc, dots); break;
        case 3: dot_rows<3>(xr, K, w, sc, dots); break;
        case 2: dot_rows<2>(xr, K, w, sc, dots); break;
        default: dot_rows<1>(xr, K, w, sc, dots); break;
      }
      for (int r = 0; r < rb; ++r) from_f(dots[r] + b, op + (m0 + r) * N + n);
    }
  }
}

}  // namespace

// x [M, K] (float32 or bf16), q [N, K] int8, scale [N, K / 32] float32, bias [N] or None -> [M, N].
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kChar && q.size(1) == x.size(1),
              "q must be contiguous int8 [N, K] with x's K");
  TORCH_CHECK(x.size(1) % kGroup == 0, "K must be a multiple of ", kGroup);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == q.size(0) && scale.size(1) == q.size(1) / kGroup,
              "scale must be float32 [N, K / ", kGroup, "]");
  const auto dt = x.scalar_type();
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == q.size(0) && bias->scalar_type() == dt),
              "bias must be [N] in x's dtype");
  auto out = torch::empty({x.size(0), q.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  if (dt == torch::kFloat32) {
    int8_linear_impl<float>(x, q, scale, bias ? bias->data_ptr<float>() : nullptr, out);
  } else if (dt == torch::kBFloat16) {
    int8_linear_impl<bf16>(x, q, scale, bias ? bias->data_ptr<bf16>() : nullptr, out);
  } else {
    TORCH_CHECK(false, "int8_linear supports float32 and bfloat16 activations");
  }
  return out;
}
