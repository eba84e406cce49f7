// 8-float vectors (GCC/Clang vector extensions) shared by the kernels that keep sums in registers:
// loads from any float address, int8 widened to float, stores.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace meshserve {

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4), may_alias));  // any float address
typedef int8_t vi8 __attribute__((vector_size(8), aligned(1), may_alias));  // 8 int8 at any address

inline vf8 load8(const float* p) { return *reinterpret_cast<const vf8u*>(p); }

// GCC 12 turns the portable conversion into eight scalar ones; AVX2 has it in two instructions.
inline vf8 load8(const int8_t* p) {
#if defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
#else
  return __builtin_convertvector(*reinterpret_cast<const vi8*>(p), vf8);
#endif
}

inline void store8(float* p, vf8 v) { *reinterpret_cast<vf8u*>(p) = v; }

}  // namespace meshserve
