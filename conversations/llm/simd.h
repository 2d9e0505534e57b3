// Which registers the kernels are built for, and the 256-bit helpers their AVX2 code shares
// (quantized_linear.cpp, decode_attention.cpp, prefill_attention.cpp, softmax_exp.h).

#pragma once

#include <immintrin.h>

#include <cstdint>

// CHAT_KERNELS_256 (native.py's 256-bit targets) keeps a build to the AVX2 code even where the
// compiler is allowed AVX-512 instructions: the AVX2 products with VNNI's dot products, built
// on a CPU that has those only as AVX-512 VL, run the same 256-bit code an AVX-VNNI CPU does.
#if defined(__AVX512F__) && !defined(CHAT_KERNELS_256)
#define CHAT_AVX512 1
#else
#define CHAT_AVX512 0

// 8 bf16 at p as fp32 (a bf16 is the top half of its fp32).
inline __m256 widen8(const uint16_t* p) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}

inline float max8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

inline float sum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

#endif
