// Attention of a decode step, one new query per row over that row's cached keys and values.
// Built by native.py for one instruction set at a time: AVX-512 with its bf16 dot products, or
// AVX2 with FMA (below: the keys and values widened to fp32); the decoder falls back to torch's
// scaled_dot_product_attention where neither can be built.
//
// Why: torch's CPU flash-attention kernel is made for blocks of queries. With one query per row
// it spent ~270 us on the eight rows of a step's layer at ~300 positions (~7 GB/s over their
// keys and values, over a quarter of an eight-reply step); this reads them once per key-value
// head, for all the query heads that share it, asking for them ahead of use: the same eight
// rows in ~110-130 us.
//
// The computation is the flash kernel's: scores q.k / sqrt(D) in fp32, softmax in fp32, the
// values weighted by the probabilities and accumulated in fp32 (AVX-512 rounds the
// probabilities to bf16 first, as the flash kernel does for bf16, to use its dot products),
// divided by the fp32 sum, rounded to bf16. A row's positions may be cut into runs, each with
// its own largest score, combined at the end as the flash kernel combines its blocks (see
// attend_all).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"
#include "softmax_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// How far ahead the loops ask for keys and values (positions): the rows come from memory, and
// the hardware's own prefetching alone left an eight-row layer's attention ~20% slower.
constexpr int64_t kKeysAhead = 32;
constexpr int64_t kValuesAhead = 16;

// Ask for the `bytes` at `p` to be brought into the cache (never faults, even past the end).
inline void prefetch(const uint16_t* p, int bytes) {
  for (int offset = 0; offset < bytes; offset += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + offset, _MM_HINT_T0);
}

#if CHAT_AVX512

constexpr int64_t kLanes = 16;  // floats to a register

// r[i] = the sum of the 16 floats of v[i]: 16 horizontal sums in 15 shuffles and adds.
inline __m512 sums16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // quads[i], 128-bit lane l: lane l of v[4i..4i+3], summed. Add up the four lanes.
  __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                             _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                              _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88),
                       _mm512_shuffle_f32x4(low, high, 0xDD));
}

// What a run of positions gives the G query heads of a key-value head: per head, the largest
// score, the sum of exp(score - largest) and the values weighted by those, unnormalized (in the
// order the dot products leave them: see `finish`). Runs of one row and head combine into its
// attention.
template <int G, int D>
struct Partial {
  static constexpr int kChunks = D / 32;  // 32 bf16 to a register
  alignas(64) float acc[G][2 * kChunks][16];
  float top[G];
  float total[G];
};

// The G query heads of one row and key-value head (D values each, bf16, query j at
// q + j * q_stride) over `length` positions of its keys and values (position p at
// k + p * k_stride, v + p * v_stride). `scores` holds G * (length rounded up to 16) floats.
template <int G, int D>
void attend(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
            const uint16_t* v, int64_t v_stride, int64_t length, float* scores,
            Partial<G, D>& part) {
  constexpr int kChunks = Partial<G, D>::kChunks;
  const int64_t padded = (length + 15) / 16 * 16;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));

  // Scores, 16 positions at a time (the padding repeats the last position).
  __m512bh query[G][kChunks];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < kChunks; ++c)
      query[j][c] = (__m512bh)_mm512_loadu_si512(q + j * q_stride + 32 * c);
  __m512 peak[G];
  for (int j = 0; j < G; ++j) peak[j] = _mm512_set1_ps(-INFINITY);
  for (int64_t first = 0; first < padded; first += 16) {
    __m512 products[G][16];
    for (int i = 0; i < 16; ++i) {
      const uint16_t* key = k + std::min<int64_t>(first + i, length - 1) * k_stride;
      prefetch(key + kKeysAhead * k_stride, 2 * D);
      for (int j = 0; j < G; ++j) products[j][i] = _mm512_setzero_ps();
      for (int c = 0; c < kChunks; ++c) {
        const __m512bh part = (__m512bh)_mm512_loadu_si512(key + 32 * c);
        for (int j = 0; j < G; ++j)
          products[j][i] = _mm512_dpbf16_ps(products[j][i], query[j][c], part);
      }
    }
    for (int j = 0; j < G; ++j) {
      const __m512 s = _mm512_mul_ps(sums16(products[j]), scale);
      _mm512_storeu_ps(scores + j * padded + first, s);
      peak[j] = _mm512_max_ps(peak[j], s);
    }
  }

  // Softmax's numerators (0 past the end) and their sums.
  for (int j = 0; j < G; ++j) {
    part.top[j] = _mm512_reduce_max_ps(peak[j]);
    const __m512 top = _mm512_set1_ps(part.top[j]);
    float* s = scores + j * padded;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t first = 0; first < padded; first += 16) {
      const int64_t left = length - first;
      const __mmask16 inside = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      const __m512 e = _mm512_maskz_mov_ps(inside, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + first), top)));
      _mm512_storeu_ps(s + first, e);
      sum = _mm512_add_ps(sum, e);
    }
    part.total[j] = _mm512_reduce_add_ps(sum);
  }

  // Values, two positions at a time: their rows interleaved (bf16 pairs), so that one
  // dot-product instruction takes both positions' probabilities.
  __m512 acc[G][2 * kChunks];
  for (int j = 0; j < G; ++j)
    for (int h = 0; h < 2 * kChunks; ++h) acc[j][h] = _mm512_setzero_ps();
  for (int64_t p = 0; p < length; p += 2) {
    const uint16_t* a = v + p * v_stride;
    prefetch(a + kValuesAhead * v_stride, 2 * D);
    prefetch(a + (kValuesAhead + 1) * v_stride, 2 * D);
    const bool pair = p + 1 < length;
    __m512bh rows[2 * kChunks];
    for (int c = 0; c < kChunks; ++c) {
      const __m512i x = _mm512_loadu_si512(a + 32 * c);
      const __m512i y = pair ? _mm512_loadu_si512(a + v_stride + 32 * c) : _mm512_setzero_si512();
      rows[2 * c] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      rows[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    for (int j = 0; j < G; ++j) {
      // (A last, lone position's pair reads one score past the end: padding, whose numerator
      // is 0. An odd length always has padding.)
      const float* s = scores + j * padded + p;
      const __m128bh both = _mm_cvtneps_pbh(_mm_setr_ps(s[0], s[1], 0.f, 0.f));
      const __m512bh weights = (__m512bh)_mm512_set1_epi32(_mm_cvtsi128_si32((__m128i)both));
      for (int h = 0; h < 2 * kChunks; ++h) acc[j][h] = _mm512_dpbf16_ps(acc[j][h], rows[h], weights);
    }
  }

  for (int j = 0; j < G; ++j)
    for (int h = 0; h < 2 * kChunks; ++h) _mm512_store_ps(part.acc[j][h], acc[j][h]);
}

// The attention of G query heads from the runs of positions they were split into: each run's
// sums rescaled to the largest score of all, added, divided by the total. Writes G * D bf16 to
// out.
template <int G, int D>
void finish(const Partial<G, D>* parts, int count, uint16_t* out) {
  constexpr int kChunks = Partial<G, D>::kChunks;
  for (int j = 0; j < G; ++j) {
    float top = parts[0].top[j];
    for (int n = 1; n < count; ++n) top = std::max(top, parts[n].top[j]);
    __m512 acc[2 * kChunks];
    for (int h = 0; h < 2 * kChunks; ++h) acc[h] = _mm512_setzero_ps();
    float total = 0.f;
    for (int n = 0; n < count; ++n) {
      const float rescale = count == 1 ? 1.f : std::exp(parts[n].top[j] - top);
      total += rescale * parts[n].total[j];
      for (int h = 0; h < 2 * kChunks; ++h)
        acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(rescale), _mm512_load_ps(parts[n].acc[j][h]), acc[h]);
    }
    // acc[2c + s], element 4 * lane + i, holds dimension 32c + 8 * lane + 4s + i.
    alignas(64) float unordered[2 * kChunks][16];
    alignas(64) float ordered[D];
    for (int h = 0; h < 2 * kChunks; ++h) _mm512_store_ps(unordered[h], acc[h]);
    for (int h = 0; h < 2 * kChunks; ++h)
      for (int lane = 0; lane < 4; ++lane)
        for (int i = 0; i < 4; ++i)
          ordered[32 * (h / 2) + 8 * lane + 4 * (h % 2) + i] = unordered[h][4 * lane + i];
    const __m512 inverse = _mm512_set1_ps(1.0f / total);
    for (int d = 0; d < D; d += 16) {
      const __m256bh result = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(ordered + d), inverse));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * D + d), (__m256i)result);
    }
  }
}

#else

// r[i] = the sum of the 8 floats of v[i].
inline __m256 sums8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a, 128-bit lane l: lane l of v[0..3], summed; b, of v[4..7]. Add up the two lanes.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The nearest bf16 to x (ties to even; no NaNs here).
inline uint16_t round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

constexpr int64_t kLanes = 8;  // floats to a register

// What a run of positions gives the G query heads of a key-value head: per head, the largest
// score, the sum of exp(score - largest) and the values weighted by those, unnormalized. Runs
// of one row and head combine into its attention.
template <int G, int D>
struct Partial {
  static constexpr int kChunks = D / 8;  // 8 floats to a register
  alignas(32) float acc[G][D];
  float top[G];
  float total[G];
};

// As the AVX-512 `attend`: the G query heads of one row and key-value head over `length`
// positions. `scores` holds G * (length rounded up to 8) floats.
template <int G, int D>
void attend(const uint16_t* q, int64_t q_stride, const uint16_t* k, int64_t k_stride,
            const uint16_t* v, int64_t v_stride, int64_t length, float* scores,
            Partial<G, D>& part) {
  constexpr int kChunks = Partial<G, D>::kChunks;
  const int64_t padded = (length + 7) / 8 * 8;
  const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));

  // Scores, 8 positions at a time (the padding repeats the last position). The queries, G * D
  // floats, are more than the registers hold: they are read from the cache, the keys once.
  alignas(32) float query[G][D];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < kChunks; ++c) _mm256_store_ps(query[j] + 8 * c, widen8(q + j * q_stride + 8 * c));
  __m256 peak[G];
  for (int j = 0; j < G; ++j) peak[j] = _mm256_set1_ps(-INFINITY);
  for (int64_t first = 0; first < padded; first += 8) {
    __m256 products[G][8];
    for (int i = 0; i < 8; ++i) {
      const uint16_t* key = k + std::min<int64_t>(first + i, length - 1) * k_stride;
      prefetch(key + kKeysAhead * k_stride, 2 * D);
      __m256 sum[G];
      for (int j = 0; j < G; ++j) sum[j] = _mm256_setzero_ps();
      for (int c = 0; c < kChunks; ++c) {
        const __m256 part = widen8(key + 8 * c);
        for (int j = 0; j < G; ++j) sum[j] = _mm256_fmadd_ps(_mm256_load_ps(query[j] + 8 * c), part, sum[j]);
      }
      for (int j = 0; j < G; ++j) products[j][i] = sum[j];
    }
    for (int j = 0; j < G; ++j) {
      const __m256 s = _mm256_mul_ps(sums8(products[j]), scale);
      _mm256_storeu_ps(scores + j * padded + first, s);
      peak[j] = _mm256_max_ps(peak[j], s);
    }
  }

  // Softmax's numerators (0 past the end) and their sums.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int j = 0; j < G; ++j) {
    part.top[j] = max8(peak[j]);
    const __m256 top = _mm256_set1_ps(part.top[j]);
    float* s = scores + j * padded;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t first = 0; first < padded; first += 8) {
      const __m256 inside = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(length - first, 8))), lane));
      const __m256 e = _mm256_and_ps(inside, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + first), top)));
      _mm256_storeu_ps(s + first, e);
      sum = _mm256_add_ps(sum, e);
    }
    part.total[j] = sum8(sum);
  }

  // Values, in halves of a row (G heads' sums of a whole row are more than the registers hold):
  // a head of 64 bf16 is two cache lines, so each half of a pass reads one line per position.
  constexpr int kHalf = kChunks >= 2 ? kChunks / 2 : 1;
  for (int from = 0; from < kChunks; from += kHalf) {
    __m256 acc[G][kHalf];
    for (int j = 0; j < G; ++j)
      for (int c = 0; c < kHalf; ++c) acc[j][c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < length; ++p) {
      const uint16_t* row = v + p * v_stride + 8 * from;
      prefetch(row + kValuesAhead * v_stride, 16 * kHalf);
      __m256 weight[G];
      for (int j = 0; j < G; ++j) weight[j] = _mm256_broadcast_ss(scores + j * padded + p);
      for (int c = 0; c < kHalf; ++c) {
        const __m256 x = widen8(row + 8 * c);
        for (int j = 0; j < G; ++j) acc[j][c] = _mm256_fmadd_ps(weight[j], x, acc[j][c]);
      }
    }
    for (int j = 0; j < G; ++j)
      for (int c = 0; c < kHalf; ++c) _mm256_store_ps(part.acc[j] + 8 * (from + c), acc[j][c]);
  }
}

// As the AVX-512 `finish`: each run's sums rescaled to the largest score of all, added,
// divided by the total. Writes G * D bf16 to out.
template <int G, int D>
void finish(const Partial<G, D>* parts, int count, uint16_t* out) {
  for (int j = 0; j < G; ++j) {
    float top = parts[0].top[j];
    for (int n = 1; n < count; ++n) top = std::max(top, parts[n].top[j]);
    float total = 0.f;
    alignas(32) float acc[D] = {};
    for (int n = 0; n < count; ++n) {
      const float rescale = count == 1 ? 1.f : std::exp(parts[n].top[j] - top);
      total += rescale * parts[n].total[j];
      for (int d = 0; d < D; ++d) acc[d] += rescale * parts[n].acc[j][d];
    }
    for (int d = 0; d < D; ++d) out[j * D + d] = round_bf16(acc[d] / total);
  }
}

#endif

// Where the work is cut: by row and key-value head, and when there are fewer of those pairs
// than twice the threads, each row's positions into runs of at least kRunPositions (one
// conversation's three key-value heads on two cores left one core idle a third of the time).
constexpr int64_t kRunPositions = 256;

struct Layout {
  const uint16_t *q, *k, *v;
  int64_t q_row, q_head, k_row, k_head, k_position, v_row, v_head, v_position;
  int64_t rows, kv_heads;
  const int64_t* lengths;
  uint16_t* out;
};

template <int G, int D>
void attend_all(const Layout& x) {
  const int64_t pairs = x.rows * x.kv_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t split = pairs < 2 * threads ? (2 * threads + pairs - 1) / pairs : 1;
  auto run_length = [&](int64_t r) {
    return std::max(kRunPositions, (x.lengths[r] + split - 1) / split);
  };
  auto runs = [&](int64_t r) { return (x.lengths[r] + run_length(r) - 1) / run_length(r); };
  std::vector<Partial<G, D>> parts(pairs * split);
  at::parallel_for(0, pairs * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / split, n = item % split;
      const int64_t r = pair / x.kv_heads, h = pair % x.kv_heads;
      const int64_t first = n * run_length(r);
      if (first >= x.lengths[r]) continue;
      const int64_t count = std::min(run_length(r), x.lengths[r] - first);
      scores.resize(G * ((count + kLanes - 1) / kLanes * kLanes));  // (padded, as `attend` reads)
      attend<G, D>(x.q + r * x.q_row + h * G * x.q_head, x.q_head,
                   x.k + r * x.k_row + h * x.k_head + first * x.k_position, x.k_position,
                   x.v + r * x.v_row + h * x.v_head + first * x.v_position, x.v_position, count,
                   scores.data(), parts[item]);
      if (split == 1) finish<G, D>(&parts[item], 1, x.out + (r * x.kv_heads + h) * G * D);
    }
  });
  if (split == 1) return;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t r = pair / x.kv_heads;
      finish<G, D>(&parts[pair * split], runs(r), x.out + pair * G * D);
    }
  });
}

using Attend = void (*)(const Layout&);

template <int D>
Attend pick(int64_t group) {
  switch (group) {
    case 1: return attend_all<1, D>;
    case 2: return attend_all<2, D>;
    case 3: return attend_all<3, D>;
    case 4: return attend_all<4, D>;
    default: return nullptr;
  }
}

// q: (rows, heads, D); keys, values: (slot rows, key-value heads, positions, D), row i of q
// attending over positions 0..lengths[i]-1 of row i. All bf16 with the last dimension
// contiguous. Returns (rows, heads * D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "decode_attention: q (rows, heads, D), keys and values (rows, kv heads, positions, D)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16,
              "decode_attention: bf16 only");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: the last dimension must be contiguous");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0 && rows <= keys.size(0),
              "decode_attention: shapes do not match");
  const int64_t group = heads / kv_heads;
  const Attend kernel = dim == 64 ? pick<64>(group) : dim == 128 ? pick<128>(group) : nullptr;
  TORCH_CHECK(kernel != nullptr, "decode_attention: head size 64 or 128, 1-4 heads a group");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == rows,
              "decode_attention: one int64 length per row");
  const auto counts = lengths.contiguous();
  const int64_t* length = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(length[r] >= 1 && length[r] <= keys.size(2), "decode_attention: length out of range");

  auto out = at::empty({rows, heads * dim}, q.options());
  const Layout layout{reinterpret_cast<const uint16_t*>(q.data_ptr()),
                      reinterpret_cast<const uint16_t*>(keys.data_ptr()),
                      reinterpret_cast<const uint16_t*>(values.data_ptr()),
                      q.stride(0), q.stride(1),
                      keys.stride(0), keys.stride(1), keys.stride(2),
                      values.stride(0), values.stride(1), values.stride(2),
                      rows, kv_heads, length,
                      reinterpret_cast<uint16_t*>(out.data_ptr())};
  kernel(layout);
  return out;
}

}  // namespace

// The schema is defined by native.py, so that scripted code that names the operation compiles
// where this file is not built.
TORCH_LIBRARY_IMPL(chat, CPU, m) { m.impl("decode_attention", &decode_attention); }
