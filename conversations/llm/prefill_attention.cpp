// Attention of a short run of new tokens over a long row of cached keys and values: a follow-up
// message's first pass, for CPUs with AVX-512 BF16 (built and loaded by native.py with the AVX-512
// kernels; elsewhere, and for long runs, the decoder uses torch's scaled_dot_product_attention).
//
// Why: a follow-up's ~25 new tokens attend over the whole history in every layer, and torch's
// CPU flash-attention kernel, made for long blocks of queries, took them at ~50 G multiply-adds a
// second on two cores (8,000 positions: 4.6 ms a layer, ~140 ms of the first token). Here the
// queries of a key-value head (its query heads times the new tokens) are the lanes of the
// registers, so that a key's dot products with sixteen queries are one bf16 dot-product
// instruction per pair of its dimensions, and the softmax's largest scores and sums run down
// the positions in those same lanes.
//
// The computation is the flash kernel's: scores q.k / sqrt(D) in fp32, a new token t (at
// position start + t) seeing positions 0..start + t, softmax in fp32, the probabilities rounded to
// bf16 for their product with the values, accumulated in fp32, divided by the fp32 sum, rounded to
// bf16. The positions are cut into runs attended to apart and combined at the end, each with its
// own largest score (as decode_attention.cpp does).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "softmax_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)

namespace {

constexpr int kLanes = 16;         // queries to a register
constexpr int kMaxBlocks = 8;      // registers of queries: 128 queries of a key-value head at most
constexpr int64_t kRun = 512;      // positions to a work item
constexpr int kPositions = 4;      // keys a pass of the scores' loop takes

// A key-value head's queries, laid out for the dot products: `pairs[(b * D / 2 + i) * 16 + l]`
// holds dimensions 2i and 2i + 1 of the query in lane l of block b (bf16, as one 32-bit word);
// `last[b * 16 + l]`, the last position it sees (-1 for the lanes past the queries).
template <int D>
struct Queries {
  int blocks;
  std::vector<uint32_t> pairs;
  std::vector<int32_t> last;
};

// What a run of positions gives each query lane: its largest score, the sum of exp(score -
// largest), and the values weighted by those (acc[d * lanes + lane]), unnormalized.
struct Partial {
  std::vector<float> top, total, acc;
};

// Scratch of a thread: the run's scores (then probabilities), as bf16 pairs of positions, and
// its values as pairs of positions.
struct Scratch {
  std::vector<float> scores;
  std::vector<uint32_t> probability_pairs, value_pairs;
};

// The loops below keep B blocks of queries' sums for kPositions keys (or kDims dimensions) in
// registers: B * 4 of the 32, and per step B loads of queries (or probabilities) for 4 broadcast
// pairs of key (or value) dimensions. (Two blocks for eight keys, sixteen sums of 32: 124 G
// multiply-adds a second at 8,000 positions; five blocks for four keys: see docs/engine.md.)
constexpr int kPass = 6;
constexpr int kDims = 4;
static_assert(kPositions == 4 && kPass * kPositions <= 24, "sums for the registers");

// Calls f(std::integral_constant<int, B>) for B = n (1..kPass).
template <typename F>
void by_blocks(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    default: f(std::integral_constant<int, 6>()); break;
  }
}

// sum[b][i] = the scores (unscaled) of block b of `pairs` (laid out as Queries::pairs) with key i.
template <int D, int B>
inline void scores_pass(const uint32_t* pairs, const uint32_t* const* key, __m512 (*sum)[kPositions]) {
  __m512 acc[B][kPositions];
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm512_setzero_ps();
  for (int d = 0; d < D / 2; ++d) {
    __m512bh dims[kPositions];
    for (int i = 0; i < kPositions; ++i) dims[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(key[i][d]));
    for (int b = 0; b < B; ++b) {
      const __m512bh query = (__m512bh)_mm512_loadu_si512(pairs + (b * D / 2 + d) * kLanes);
      for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm512_dpbf16_ps(acc[b][i], query, dims[i]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) sum[b][i] = acc[b][i];
}

// sum[b][j] = the probabilities of block b (pairs of positions, `lanes` to a pair) times
// dimension j of the values (pairs of positions, D to a pair), over `pairs` pairs.
template <int D, int B>
inline void values_pass(const uint32_t* probabilities, int lanes, const uint32_t* values, int64_t pairs,
                        __m512 (*sum)[kDims]) {
  __m512 acc[B][kDims];
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < kDims; ++j) acc[b][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh dims[kDims];
    for (int j = 0; j < kDims; ++j) dims[j] = (__m512bh)_mm512_set1_epi32(static_cast<int>(values[i * D + j]));
    for (int b = 0; b < B; ++b) {
      const __m512bh weights = (__m512bh)_mm512_loadu_si512(probabilities + i * lanes + b * kLanes);
      for (int j = 0; j < kDims; ++j) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], weights, dims[j]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < kDims; ++j) sum[b][j] = acc[b][j];
}

// The queries' attention over positions first..first + count - 1 of one key-value head (keys
// at k + p * stride, values at v + p * stride, position p from the head's start).
template <int D>
void attend_run(const Queries<D>& q, const uint16_t* k, const uint16_t* v, int64_t stride,
                int64_t first, int64_t count, Scratch& scratch, Partial& part) {
  const int blocks = q.blocks, lanes = blocks * kLanes;
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(D)));
  const __m512 minus_infinity = _mm512_set1_ps(-INFINITY);
  scratch.scores.resize(count * lanes);
  float* scores = scratch.scores.data();
  __m512 peak[kMaxBlocks];
  __m512i last[kMaxBlocks];
  for (int b = 0; b < blocks; ++b) {
    peak[b] = minus_infinity;
    last[b] = _mm512_loadu_si512(q.last.data() + b * kLanes);
  }

  // Scores, kPositions keys at a time (the padding repeats the last key), up to kPass blocks of
  // queries at a time (see scores_pass).
  for (int64_t p0 = 0; p0 < count; p0 += kPositions) {
    const uint32_t* key[kPositions];
    for (int i = 0; i < kPositions; ++i)
      key[i] = reinterpret_cast<const uint32_t*>(k + (first + std::min<int64_t>(p0 + i, count - 1)) * stride);
    for (int b0 = 0; b0 < blocks; b0 += kPass) {
      __m512 sum[kPass][kPositions];
      by_blocks(std::min(kPass, blocks - b0), [&](auto pass) {
        scores_pass<D, decltype(pass)::value>(q.pairs.data() + b0 * D / 2 * kLanes, key, sum);
      });
      for (int b = 0; b < std::min(kPass, blocks - b0); ++b) {
        for (int i = 0; i < kPositions && p0 + i < count; ++i) {
          // Positions past a query's own are hidden from it.
          const __mmask16 hidden = _mm512_cmpgt_epi32_mask(
              _mm512_set1_epi32(static_cast<int>(first + p0 + i)), last[b0 + b]);
          const __m512 s = _mm512_mask_mov_ps(_mm512_mul_ps(sum[b][i], scale), hidden, minus_infinity);
          _mm512_storeu_ps(scores + (p0 + i) * lanes + (b0 + b) * kLanes, s);
          peak[b0 + b] = _mm512_max_ps(peak[b0 + b], s);
        }
      }
    }
  }

  // Softmax's numerators (0 where hidden) and their sums, then the numerators as bf16 pairs of
  // positions (a lone last position paired with 0).
  const int64_t pairs = (count + 1) / 2;
  scratch.probability_pairs.resize(pairs * lanes);
  uint32_t* probabilities = scratch.probability_pairs.data();
  part.top.resize(lanes);
  part.total.resize(lanes);
  for (int b = 0; b < blocks; ++b) {
    // A lane that sees none of the run keeps -inf as its largest: its numerators are all 0.
    const __mmask16 seen = _mm512_cmp_ps_mask(peak[b], minus_infinity, _CMP_NEQ_OQ);
    const __m512 top = _mm512_maskz_mov_ps(seen, peak[b]);
    _mm512_storeu_ps(part.top.data() + b * kLanes, _mm512_mask_mov_ps(minus_infinity, seen, peak[b]));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < pairs; ++i) {
      __m512i words[2];
      for (int j = 0; j < 2; ++j) {
        const int64_t p = 2 * i + j;
        __m512 e = _mm512_setzero_ps();
        if (p < count) {
          const __m512 s = _mm512_loadu_ps(scores + p * lanes + b * kLanes);
          e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, minus_infinity, _CMP_NEQ_OQ),
                                  exp16(_mm512_sub_ps(s, top)));
        }
        total = _mm512_add_ps(total, e);
        words[j] = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
      }
      _mm512_storeu_si512(probabilities + i * lanes + b * kLanes,
                          _mm512_or_si512(words[0], _mm512_slli_epi32(words[1], 16)));
    }
    _mm512_storeu_ps(part.total.data() + b * kLanes, total);
  }

  // The values as bf16 pairs of positions: word d of pair i is dimension d of positions 2i
  // and 2i + 1.
  scratch.value_pairs.resize(pairs * D);
  uint32_t* values = scratch.value_pairs.data();
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < pairs; ++i) {
    const uint16_t* a = v + (first + 2 * i) * stride;
    const bool both = 2 * i + 1 < count;
    for (int c = 0; c < D / 32; ++c) {
      const __m512i x = _mm512_loadu_si512(a + 32 * c);
      const __m512i y = both ? _mm512_loadu_si512(a + stride + 32 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(values + i * D + 32 * c, _mm512_permutex2var_epi16(x, low, y));
      _mm512_storeu_si512(values + i * D + 32 * c + 16, _mm512_permutex2var_epi16(x, high, y));
    }
  }

  // The weighted values, kDims dimensions and up to kPass blocks of queries at a time (see
  // values_pass).
  part.acc.resize(D * lanes);
  for (int b0 = 0; b0 < blocks; b0 += kPass) {
    const int pass = std::min(kPass, blocks - b0);
    for (int d0 = 0; d0 < D; d0 += kDims) {
      __m512 sum[kPass][kDims];
      by_blocks(pass, [&](auto n) {
        values_pass<D, decltype(n)::value>(probabilities + b0 * kLanes, lanes, values + d0, pairs, sum);
      });
      for (int b = 0; b < pass; ++b)
        for (int j = 0; j < kDims; ++j)
          _mm512_storeu_ps(part.acc.data() + (d0 + j) * lanes + (b0 + b) * kLanes, sum[b][j]);
    }
  }
}

// q: (tokens, heads, D), the run's new tokens; keys, values: (slot rows, key-value heads,
// positions, D), whose row `row` holds the tokens' own keys and values at start..start + tokens
// - 1 and the history before. All bf16 with the last dimension contiguous. Returns (tokens,
// heads * D).
template <int D>
at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t row,
                  int64_t start) {
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = keys.size(1);
  const int64_t group = heads / kv_heads, queries = group * tokens;
  const int blocks = static_cast<int>((queries + kLanes - 1) / kLanes);
  const int64_t end = start + tokens, runs = (end + kRun - 1) / kRun;
  const auto* q_data = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* k_data = reinterpret_cast<const uint16_t*>(keys.data_ptr()) + row * keys.stride(0);
  const auto* v_data = reinterpret_cast<const uint16_t*>(values.data_ptr()) + row * values.stride(0);

  // Lane t * group + j: token t, query head j of the key-value head's group.
  std::vector<Queries<D>> laid(kv_heads);
  for (int64_t h = 0; h < kv_heads; ++h) {
    Queries<D>& x = laid[h];
    x.blocks = blocks;
    x.pairs.assign(blocks * kLanes * D / 2, 0);
    x.last.assign(blocks * kLanes, -1);
    for (int64_t lane = 0; lane < queries; ++lane) {
      const int64_t t = lane / group, head = h * group + lane % group;
      const auto* query = reinterpret_cast<const uint32_t*>(q_data + t * q.stride(0) + head * q.stride(1));
      const int64_t b = lane / kLanes, l = lane % kLanes;
      for (int d = 0; d < D / 2; ++d) x.pairs[(b * D / 2 + d) * kLanes + l] = query[d];
      x.last[lane] = static_cast<int32_t>(start + t);
    }
  }

  std::vector<Partial> parts(kv_heads * runs);
  at::parallel_for(0, kv_heads * runs, 1, [&](int64_t begin, int64_t finish) {
    Scratch scratch;
    for (int64_t item = begin; item < finish; ++item) {
      const int64_t h = item / runs, first = (item % runs) * kRun;
      attend_run<D>(laid[h], k_data + h * keys.stride(1), v_data + h * values.stride(1), keys.stride(2),
                    first, std::min(kRun, end - first), scratch, parts[item]);
    }
  });

  // Each lane's runs rescaled to its largest score of all, added, divided by the total.
  auto out = at::empty({tokens, heads * D}, q.options());
  auto* result = reinterpret_cast<at::BFloat16*>(out.data_ptr());
  const int64_t lanes = blocks * kLanes;
  at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t finish) {
    std::vector<float> acc(D);
    for (int64_t h = begin; h < finish; ++h) {
      for (int64_t lane = 0; lane < queries; ++lane) {
        float top = -INFINITY;
        for (int64_t n = 0; n < runs; ++n) top = std::max(top, parts[h * runs + n].top[lane]);
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t n = 0; n < runs; ++n) {
          const Partial& part = parts[h * runs + n];
          if (part.top[lane] == -INFINITY) continue;  // (the lane sees none of this run)
          const float rescale = std::exp(part.top[lane] - top);
          total += rescale * part.total[lane];
          for (int d = 0; d < D; ++d) acc[d] += rescale * part.acc[d * lanes + lane];
        }
        const int64_t t = lane / group, head = h * group + lane % group;
        for (int d = 0; d < D; ++d) result[t * heads * D + head * D + d] = at::BFloat16(acc[d] / total);
      }
    }
  });
  return out;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                             int64_t row, int64_t start) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "prefill_attention: q (tokens, heads, D), keys and values (rows, kv heads, positions, D)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16,
              "prefill_attention: bf16 only");
  TORCH_CHECK(q.stride(2) == 1 && keys.stride(3) == 1 && values.stride(3) == 1 &&
                  keys.strides() == values.strides(),
              "prefill_attention: the last dimension must be contiguous, keys laid out as values");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0,
              "prefill_attention: shapes do not match");
  TORCH_CHECK(tokens >= 1 && heads / kv_heads * tokens <= kLanes * kMaxBlocks,
              "prefill_attention: at most ", kLanes * kMaxBlocks, " queries to a key-value head");
  TORCH_CHECK(row >= 0 && row < keys.size(0) && start >= 0 && start + tokens <= keys.size(2),
              "prefill_attention: row or positions out of range");
  if (dim == 64) return attend<64>(q, keys, values, row, start);
  TORCH_CHECK(dim == 128, "prefill_attention: head size 64 or 128");
  return attend<128>(q, keys, values, row, start);
}

}  // namespace

// The schema is defined by native.py (see decode_attention.cpp).
TORCH_LIBRARY_IMPL(chat, CPU, m) { m.impl("prefill_attention", &prefill_attention); }

#endif
