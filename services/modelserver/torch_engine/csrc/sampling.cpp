// Temperature, top-k and top-p sampling of many rows without sorting the vocabulary.
//
// Per row (rows run in parallel, each on one thread, so a row's result depends only on its own
// inputs): weights w = exp((x - max) / temperature); the kept set is what a full descending sort
// would keep (at most top_k tokens, and of those the shortest prefix whose mass reaches top_p);
// one uniform number u picks the token whose running kept mass, in vocabulary order, first passes
// u * kept mass. Any fixed order draws from the same distribution; vocabulary order needs no sort.
//
// The kept set is found with a histogram instead of a sort: a positive float's bits order like its
// value, so buckets keyed by the top bits (exponent + 4 mantissa bits, 1/16 relative width) are
// scanned from the largest down, summing mass and counts, until the bucket where top_k or top_p is
// crossed; only that bucket's members are sorted. Ties break by lower token id, like a stable sort.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_math.h"

namespace {

using meshserve::fast_exp;

constexpr int kShift = 19;                                // key = float bits >> kShift
constexpr int kBuckets = (0x3F800000 >> kShift) + 1;      // weights are in [0, 1]

inline uint32_t key_of(float w) {
  uint32_t bits;
  std::memcpy(&bits, &w, 4);
  return bits >> kShift;
}

struct Kept {  // tokens kept: key > bucket, or key == bucket and (w, -id) >= (w_last, -id_last)
  int64_t bucket = -1;  // -1: every token is kept
  float w_last = 0.0f;
  int64_t id_last = 0;
};

// Finds the kept set of one row of weights (their sum is `total`).
Kept find_kept(const float* w, int64_t V, double total, int64_t top_k, double top_p) {
  Kept kept;
  const bool by_k = top_k > 0 && top_k < V;
  if (!by_k && top_p >= 1.0) return kept;
  thread_local std::vector<double> mass;
  thread_local std::vector<int64_t> count;
  mass.assign(kBuckets, 0.0);
  count.assign(kBuckets, 0);
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = key_of(w[i]);
    mass[k] += w[i];
    count[k] += 1;
  }
  const double target = top_p * total;
  const int64_t k_max = by_k ? top_k : V;
  double mass_above = 0.0;
  int64_t count_above = 0;
  int64_t b = kBuckets - 1;
  for (; b >= 0; --b) {  // the bucket where the k-th token or the top_p mass is reached
    if (count_above + count[b] >= k_max || mass_above + mass[b] >= target) break;
    mass_above += mass[b];
    count_above += count[b];
  }
  if (b < 0) return kept;  // rounding: the whole vocabulary fell short of top_p * total
  thread_local std::vector<std::pair<float, int64_t>> members;
  members.clear();
  for (int64_t j = 0; j < V; ++j) {
    if (key_of(w[j]) == static_cast<uint32_t>(b)) members.emplace_back(w[j], j);
  }
  std::sort(members.begin(), members.end(), [](const auto& a, const auto& c) {
    return a.first > c.first || (a.first == c.first && a.second < c.second);
  });
  kept.bucket = b;
  for (const auto& [wi, id] : members) {  // a token is kept while the mass before it is short of p
    if (count_above >= k_max || mass_above >= target) break;
    kept.w_last = wi;
    kept.id_last = id;
    mass_above += wi;
    count_above += 1;
  }
  return kept;
}

// Zeroes the weights outside the kept set (branch-free, so it vectorises) and returns the kept mass.
double keep_only(float* w, int64_t V, const Kept& kept) {
  if (kept.bucket < 0) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < V; ++i) sum += w[i];
    return sum;
  }
  const uint32_t b = static_cast<uint32_t>(kept.bucket);
  const float wl = kept.w_last;
  const int64_t il = kept.id_last;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t k = key_of(w[i]);
    const bool keep = (k > b) | ((k == b) & ((w[i] > wl) | ((w[i] == wl) & (i <= il))));
    w[i] = keep ? w[i] : 0.0f;
    sum += w[i];
  }
  return sum;
}

// The first token whose running weight passes `target`: whole blocks are summed (vectorised) until
// the one that holds it, which is then walked token by token.
int64_t invert(const float* w, int64_t V, double target) {
  constexpr int64_t kBlock = 256;
  double run = 0.0;
  int64_t last = -1;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t end = std::min(V, start + kBlock);
    double block = 0.0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = start; i < end; ++i) block += w[i];
    if (run + block <= target) {
      run += block;
      if (block > 0.0) last = start;  // a block with weight: remember it for the round-up case
      continue;
    }
    for (int64_t i = start; i < end; ++i) {
      run += w[i];
      if (w[i] > 0.0f && run > target) return i;
    }
  }
  if (last < 0) return -1;
  for (int64_t i = std::min(V, last + kBlock) - 1; i >= last; --i) {  // target rounded past the sum
    if (w[i] > 0.0f) return i;
  }
  return -1;
}

int64_t sample_row(const float* x, int64_t V, float temperature, int64_t top_k, double top_p, double u,
                   std::vector<float>& w) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < V; ++i) mx = std::max(mx, x[i]);
  const float inv_t = 1.0f / temperature;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < V; ++i) {
    const float z = (x[i] - mx) * inv_t;
    w[i] = z < -87.0f ? 0.0f : fast_exp(z);  // also maps -inf (banned tokens) to exactly 0
    total += w[i];
  }
  int64_t tok = -1;
  if (total > 0.0f && std::isfinite(total)) {
    const double kept_mass = keep_only(w.data(), V, find_kept(w.data(), V, total, top_k, top_p));
    tok = invert(w.data(), V, u * kept_mass);
  }
  if (tok >= 0) return tok;
  // NaN logits (a broken forward): no distribution to draw from; the first maximal (or first) token
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] == mx) return i;
  }
  return 0;
}

}  // namespace

// tokens[j] for row rows[j] of logits [N, V] (float32), with temperatures[j] > 0, top_k[j] (0 =
// off), top_p[j] in (0, 1] and u[j] in [0, 1).
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor rows, torch::Tensor temperatures,
                          torch::Tensor top_k, torch::Tensor top_p, torch::Tensor u) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1,
              "logits must be float32 [N, V] with unit last stride");
  const int64_t n = rows.numel();
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && top_k.scalar_type() == torch::kInt64 &&
                  temperatures.scalar_type() == torch::kFloat32 && top_p.scalar_type() == torch::kFloat32 &&
                  u.scalar_type() == torch::kFloat64,
              "rows/top_k int64, temperatures/top_p float32, u float64");
  TORCH_CHECK(rows.is_contiguous() && temperatures.is_contiguous() && top_k.is_contiguous() &&
                  top_p.is_contiguous() && u.is_contiguous() && temperatures.numel() == n &&
                  top_k.numel() == n && top_p.numel() == n && u.numel() == n,
              "one contiguous parameter per row");
  const int64_t V = logits.size(1), N = logits.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(rp[j] >= 0 && rp[j] < N, "row index out of range");
  const float* tp = temperatures.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  const float* pp = top_p.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  const float* x = logits.data_ptr<float>();
  const int64_t stride = logits.stride(0);
  auto out = torch::empty({n}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (n > 1)
  for (int64_t j = 0; j < n; ++j) {
    thread_local std::vector<float> w;
    w.resize(V);
    op[j] = sample_row(x + rp[j] * stride, V, tp[j], kp[j], pp[j], up[j], w);
  }
  return out;
}
