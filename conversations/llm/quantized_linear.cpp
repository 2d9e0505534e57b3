// y = x @ W.T for decode steps and short prompts (a few rows of input), W quantized in groups of
// 32 inputs with a scale and a minimum each (w = level * scale + minimum): `int4_linear` for the
// layers' matrices (levels 0..15, as decoder._Linear quantizes them; bf16 results) and
// `int8_linear` for the output head (levels 0..255; fp32 scores). Built by native.py for one
// instruction set at a time: AVX-512 VNNI, or AVX2 with FMA and F16C (the same products in
// 256-bit registers, below); the decoder multiplies with torch's int4 kernel and FBGEMM's int8
// one where neither can be built.
//
// Why: torch's int4 kernel turns the weights into floats and multiplies in floats, and reads
// them again for every four rows of input: eight rows cost three times one. FBGEMM's int8
// kernel, which eight-reply steps used instead, reads twice the bytes. Here each row of x is
// quantized to int8 on the fly, one scale per group of 32 inputs (a few large inputs leave the
// rest of their row its levels), and the products are taken in integer dot-product instructions
// straight from the levels, for up to eight rows per read of the weights, asking for the weights
// ahead of use: a layer stack's query-key-value and gate-up products for eight rows in ~2.5 ms
// where FBGEMM took ~4.5, and for one row in ~1.2 ms where torch's int4 kernel took ~2.5.
//
// Per group g of 32 inputs, output o, row r: with w = level * scale + minimum and x ~= xq * step,
//   sum_k x[k] w[o, k] ~= scale[o, g] * step[r, g] * sum_k xq[k] level[o, k]
//                          + minimum[o, g] * step[r, g] * sum_k xq[k],
// the integer sums exact (levels 0..255 times -127..127 over 32 inputs), the rest in fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;    // inputs sharing a scale and minimum (and a step of x)
constexpr int64_t kOutputs = 16;  // outputs to a block: one register of fp32 sums
// A block's group, as native.pack lays it out: Bits runs of 64 bytes, then 16 fp16 scales and 16
// fp16 minimums. 4 bits: byte 4i + t of run c holds output i's levels of inputs 4c + t (low
// half) and 16 + 4c + t (high half); 8 bits: byte 4i + t of run c, output i's level of input
// 4c + t.
template <int Bits>
constexpr int64_t kRecord = Bits * 64 + 2 * 32;
// How far ahead (bytes) the loop asks for the weights: they come from memory, a layer's
// matrices at a time, and the hardware's prefetching alone waits for each.
constexpr int64_t kAhead = 1024;

// One row's inputs for the products: per group, 32 int8 levels (eight words of four), the step
// between two levels and the sum of the 32 levels times the step.
struct Quantized {
  const int32_t* levels;
  const float* steps;
  const float* sums;
};

#if CHAT_AVX512
constexpr int kRowsAPass = 8;

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// A row of x (groups * 32 inputs) as the products take it (see Quantized), each group's largest
// magnitude at 127.
template <typename T>
void quantize_row(const T* x, int64_t groups, int32_t* levels, float* steps, float* sums) {
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 a = load16(x + g * kGroup), b = load16(x + g * kGroup + 16);
    const float peak = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inverse = _mm512_set1_ps(peak > 0.f ? 127.f / peak : 0.f);
    // (Rounded to nearest, ties to even: the default rounding mode.)
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(levels + g * 8), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(levels + g * 8 + 4), _mm512_cvtsepi32_epi8(qb));
    steps[g] = peak / 127.f;
    // The sum of the quantized inputs, not of x: each input's rounding then meets its weight
    // w, not w - minimum (up to 2^Bits scales larger).
    sums[g] = steps[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

inline void store16(float* out, __m512 y) { _mm512_storeu_ps(out, y); }
inline void store16(at::BFloat16* out, __m512 y) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(y));
}

// Outputs o0..o0+15 (their block of `packed`, at w) for R rows of x: writes 16 results to each
// row of out (row r at out + r * out_stride).
template <int Bits, int R, typename Out>
void block(const uint8_t* w, int64_t groups, const Quantized* x, Out* out, int64_t out_stride) {
  constexpr int64_t record = kRecord<Bits>;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += record) {
    for (int64_t offset = 0; offset < record; offset += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w) + kAhead + offset, _MM_HINT_T0);
    __m512i dots[R];
    for (int r = 0; r < R; ++r) dots[r] = _mm512_setzero_si512();
    if constexpr (Bits == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i both = _mm512_loadu_si512(w + 64 * c);
        const __m512i low = _mm512_and_si512(both, nibble);
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(both, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const int32_t* levels = x[r].levels + g * 8;
          dots[r] = _mm512_dpbusd_epi32(dots[r], low, _mm512_set1_epi32(levels[c]));
          dots[r] = _mm512_dpbusd_epi32(dots[r], high, _mm512_set1_epi32(levels[c + 4]));
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        const __m512i run = _mm512_loadu_si512(w + 64 * c);
        for (int r = 0; r < R; ++r)
          dots[r] = _mm512_dpbusd_epi32(dots[r], run, _mm512_set1_epi32(x[r].levels[g * 8 + c]));
      }
    }
    const auto* halves = reinterpret_cast<const __m256i*>(w + Bits * 64);
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(halves));
    const __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256(halves + 1));
    for (int r = 0; r < R; ++r) {
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(x[r].steps[g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), step, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r].sums[g]), minimum, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) store16(out + r * out_stride, acc[r]);
}

#else
// AVX2: sixteen registers of 256 bits, so a block's 16 outputs are taken as two halves of 8, for
// up to 4 rows a pass, and the integer dot products are `maddubs` (unsigned bytes times signed
// bytes, pairs summed to 16 bits) then `madd` (pairs summed to 32 bits), as llama.cpp's Q4_1 x
// Q8_1 does. 4 bits: a group's eight 16-bit pair sums stay within 8 * 2 * 15 * 127 < 2^15, so
// they are added before widening. 8 bits: levels 0..255 times -127..127 would overflow a pair
// sum, so the levels are taken less 128 (-128..127, their magnitude the unsigned side) and
// the 128 * sum of the inputs goes back in with the minimum. Where the CPU has VNNI's dot
// products on 256-bit registers (AVX-VNNI; or AVX-512 VNNI with VL, the same instruction), one
// `dpbusd` takes and adds what those three instructions do, straight from the unsigned levels.
constexpr int kRowsAPass = 4;

#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
constexpr bool kVnni = true;
// acc + the sums of four products of unsigned bytes of u and signed bytes of s, per 32 bits.
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_dpbusd_epi32(acc, u, s);
#endif
}
#else
constexpr bool kVnni = false;
inline __m256i dot_add(__m256i acc, __m256i, __m256i) { return acc; }  // (never called)
#endif

inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  return widen8(reinterpret_cast<const uint16_t*>(x));
}

template <typename T>
void quantize_row(const T* x, int64_t groups, int32_t* levels, float* steps, float* sums) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // packs_epi32 then packs_epi16 leave the four words of each register in lanes: back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < groups; ++g) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(x + g * kGroup + 8 * i);
    const __m256 peaks = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(v[0], magnitude), _mm256_and_ps(v[1], magnitude)),
        _mm256_max_ps(_mm256_and_ps(v[2], magnitude), _mm256_and_ps(v[3], magnitude)));
    const float peak = max8(peaks);
    const __m256 inverse = _mm256_set1_ps(peak > 0.f ? 127.f / peak : 0.f);
    __m256i q[4];
    // (Rounded to nearest, ties to even: the default rounding mode.)
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                             _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + g * 8),
                        _mm256_permutevar8x32_epi32(bytes, order));
    steps[g] = peak / 127.f;
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    sums[g] = steps[g] * static_cast<float>(sum8(total));
  }
}

inline void store8(float* out, __m256 y) { _mm256_storeu_ps(out, y); }
inline void store8(at::BFloat16* out, __m256 y) {
  // fp32 -> bf16 rounded to nearest, ties to even (the results are finite).
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded),
                                          _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

// Outputs o0..o0+15 (their block of `packed`, at w) for R rows of x, as two halves of eight:
// writes 16 results to each row of out (row r at out + r * out_stride).
template <int Bits, int R, typename Out>
void block(const uint8_t* w, int64_t groups, const Quantized* x, Out* out, int64_t out_stride) {
  constexpr int64_t record = kRecord<Bits>;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int half = 0; half < 2; ++half) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const uint8_t* at = w;
    for (int64_t g = 0; g < groups; ++g, at += record) {
      if (half == 0)  // (the second half finds the group in the cache)
        for (int64_t offset = 0; offset < record; offset += 64)
          _mm_prefetch(reinterpret_cast<const char*>(at) + kAhead + offset, _MM_HINT_T0);
      __m256i dots[R];
      if constexpr (kVnni) {
        for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
        for (int c = 0; c < Bits; ++c) {
          const __m256i run =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 64 * c + 32 * half));
          const __m256i low = Bits == 4 ? _mm256_and_si256(run, nibble) : run;
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(run, 4), nibble);
          for (int r = 0; r < R; ++r) {
            const int32_t* levels = x[r].levels + g * 8;
            dots[r] = dot_add(dots[r], low, _mm256_set1_epi32(levels[c]));
            if constexpr (Bits == 4)
              dots[r] = dot_add(dots[r], high, _mm256_set1_epi32(levels[c + 4]));
          }
        }
      } else if constexpr (Bits == 4) {
        __m256i pairs[R];
        for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          const __m256i both =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 64 * c + 32 * half));
          const __m256i low = _mm256_and_si256(both, nibble);
          const __m256i high = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
          for (int r = 0; r < R; ++r) {
            const int32_t* levels = x[r].levels + g * 8;
            pairs[r] = _mm256_add_epi16(
                pairs[r], _mm256_maddubs_epi16(low, _mm256_set1_epi32(levels[c])));
            pairs[r] = _mm256_add_epi16(
                pairs[r], _mm256_maddubs_epi16(high, _mm256_set1_epi32(levels[c + 4])));
          }
        }
        for (int r = 0; r < R; ++r) dots[r] = _mm256_madd_epi16(pairs[r], ones);
      } else {
        for (int r = 0; r < R; ++r) dots[r] = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i centred = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 64 * c + 32 * half)), bias);
          const __m256i size = _mm256_abs_epi8(centred);
          for (int r = 0; r < R; ++r) {
            const __m256i signed_x =
                _mm256_sign_epi8(_mm256_set1_epi32(x[r].levels[g * 8 + c]), centred);
            dots[r] = _mm256_add_epi32(
                dots[r], _mm256_madd_epi16(_mm256_maddubs_epi16(size, signed_x), ones));
          }
        }
      }
      const auto* halves = reinterpret_cast<const __m128i*>(at + Bits * 64);
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(halves + half));
      __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128(halves + 2 + half));
      if constexpr (Bits == 8 && !kVnni) minimum = _mm256_fmadd_ps(scale, _mm256_set1_ps(128.f), minimum);
      for (int r = 0; r < R; ++r) {
        const __m256 step = _mm256_mul_ps(scale, _mm256_set1_ps(x[r].steps[g]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), step, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r].sums[g]), minimum, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) store8(out + r * out_stride + 8 * half, acc[r]);
  }
}
#endif

template <int Bits, typename Out>
using Block = void (*)(const uint8_t*, int64_t, const Quantized*, Out*, int64_t);

template <int Bits, typename Out, int... R>
constexpr std::array<Block<Bits, Out>, sizeof...(R)> blocks(std::integer_sequence<int, R...>) {
  return {block<Bits, R + 1, Out>...};
}

// x: (rows, inputs), fp32 or bf16; packed: (outputs / 16, inputs / 32, kRecord<Bits>) uint8 (see
// native.pack). Returns (rows, outputs) of Out (bf16 or fp32).
template <int Bits, typename Out>
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const char* name) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": x must be (rows, inputs), fp32 or bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kRecord<Bits> &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous(),
              name, ": weights must be packed by native.pack with ", Bits, " bits");
  const int64_t rows = x.size(0), groups = packed.size(1), outputs = packed.size(0) * kOutputs;
  TORCH_CHECK(x.size(1) == groups * kGroup, name, ": x has ", x.size(1), " inputs, the weights ",
              groups * kGroup);
  const auto input = x.contiguous();
  auto levels = at::empty({rows, groups * 8}, at::kInt);
  auto steps = at::empty({rows, groups}, at::kFloat);
  auto sums = at::empty({rows, groups}, at::kFloat);
  int32_t* level = levels.data_ptr<int32_t>();
  float *step = steps.data_ptr<float>(), *sum = sums.data_ptr<float>();
  std::vector<Quantized> quantized(rows);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* l = level + r * groups * 8;
    float *s = step + r * groups, *t = sum + r * groups;
    if (input.scalar_type() == at::kFloat)
      quantize_row(input.data_ptr<float>() + r * groups * kGroup, groups, l, s, t);
    else
      quantize_row(input.data_ptr<at::BFloat16>() + r * groups * kGroup, groups, l, s, t);
    quantized[r] = {l, s, t};
  }

  constexpr auto kernels = blocks<Bits, Out>(std::make_integer_sequence<int, kRowsAPass>());
  auto out = at::empty({rows, outputs}, x.options().dtype(c10::CppTypeToScalarType<Out>::value));
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  Out* result = out.template data_ptr<Out>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // (Past kRowsAPass rows, the block's weights are read again: from the cache by then.)
      for (int64_t first = 0; first < rows; first += kRowsAPass) {
        const int64_t count = std::min<int64_t>(kRowsAPass, rows - first);
        kernels[count - 1](weights + b * groups * kRecord<Bits>, groups, quantized.data() + first,
                           result + first * outputs + b * kOutputs, outputs);
      }
    }
  });
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed) {
  return linear<4, at::BFloat16>(x, packed, "int4_linear");
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed) {
  return linear<8, float>(x, packed, "int8_linear");
}

}  // namespace

TORCH_LIBRARY_IMPL(chat, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
