// y = x @ W.T for decode steps and short prompts (a few rows of input), W int4 in groups of 32
// inputs with a scale and a minimum each (as decoder._Linear quantizes it), for CPUs with
// AVX-512 VNNI (built and loaded by native.py; the decoder multiplies with torch's int4 kernel
// and FBGEMM's int8 one elsewhere).
//
// Why: torch's int4 kernel turns the weights into floats and multiplies in floats, and reads
// them again for every four rows of input: eight rows cost three times one. FBGEMM's int8
// kernel, which eight-reply steps used instead, reads twice the bytes. Here each row of x is
// quantized to int8 on the fly, one scale per group of 32 inputs (a few large inputs leave the
// rest of their row its levels), and the products are taken in integer dot-product instructions
// straight from the 4-bit levels, for up to eight rows per read of the weights: a layer stack's
// query-key-value and gate-up products for eight rows in ~2.5 ms where FBGEMM took ~4.5, and for
// one row in ~1.2 ms where torch's int4 kernel took ~2.5.
//
// Per group g of 32 inputs, output o, row r: with w = level * scale + minimum and x ~= xq * step,
//   sum_k x[k] w[o, k] ~= scale[o, g] * step[r, g] * sum_k xq[k] level[o, k]
//                          + minimum[o, g] * step[r, g] * sum_k xq[k],
// the integer sums exact (levels 0..15 times -127..127), the rest in fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;    // inputs sharing a scale and minimum (and a step of x)
constexpr int64_t kOutputs = 16;  // outputs to a block: one register of fp32 sums
// A block's group, as native.pack_int4 lays it out: four runs of 64 bytes, byte 4i + t of run c
// holding output i's levels of inputs 4c + t (low half) and 16 + 4c + t (high half); then 16
// fp16 scales and 16 fp16 minimums.
constexpr int64_t kRecord = 4 * 64 + 2 * 32;
constexpr int kRowsAPass = 8;
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

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

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
    // w, not w - minimum (about 8 scales larger).
    sums[g] = steps[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// Outputs o0..o0+15 (their block of `packed`, at w) for R rows of x: writes 16 bf16 to each
// row of out (row r at out + r * out_stride).
template <int R>
void block(const uint8_t* w, int64_t groups, const Quantized* x, at::BFloat16* out,
           int64_t out_stride) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += kRecord) {
    for (int64_t offset = 0; offset < kRecord; offset += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w) + kAhead + offset, _MM_HINT_T0);
    __m512i dots[R];
    for (int r = 0; r < R; ++r) dots[r] = _mm512_setzero_si512();
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
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256)));
    const __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 288)));
    for (int r = 0; r < R; ++r) {
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(x[r].steps[g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), step, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r].sums[g]), minimum, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride),
                        (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

using Block = void (*)(const uint8_t*, int64_t, const Quantized*, at::BFloat16*, int64_t);
constexpr Block kBlocks[kRowsAPass] = {block<1>, block<2>, block<3>, block<4>,
                                       block<5>, block<6>, block<7>, block<8>};

// x: (rows, inputs), fp32 or bf16; packed: (outputs / 16, inputs / 32, kRecord) uint8 (see
// native.pack_int4). Returns (rows, outputs) bf16.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4_linear: x must be (rows, inputs), fp32 or bf16");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kRecord &&
                  packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_linear: weights must be packed by native.pack_int4");
  const int64_t rows = x.size(0), groups = packed.size(1), outputs = packed.size(0) * kOutputs;
  TORCH_CHECK(x.size(1) == groups * kGroup, "int4_linear: x has ", x.size(1),
              " inputs, the weights ", groups * kGroup);
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

  auto out = at::empty({rows, outputs}, x.options().dtype(at::kBFloat16));
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  at::BFloat16* result = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // (Past eight rows, the block's weights are read again: from the cache by then.)
      for (int64_t first = 0; first < rows; first += kRowsAPass) {
        const int64_t count = std::min<int64_t>(kRowsAPass, rows - first);
        kBlocks[count - 1](weights + b * groups * kRecord, groups, quantized.data() + first,
                           result + first * outputs + b * kOutputs, outputs);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(chat, CPU, m) { m.impl("int4_linear", &int4_linear); }
