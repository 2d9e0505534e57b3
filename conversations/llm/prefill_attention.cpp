// Attention of a short run of new tokens over a long row of cached keys and values: a follow-up
// message's first pass. Built by native.py for one instruction set at a time: AVX-512 with its
// bf16 dot products, or AVX2 with FMA (below: fp32 products of the widened keys and values); for
// long runs the decoder uses torch's scaled_dot_product_attention.
//
// Why: a follow-up's ~25 new tokens attend over the whole history in every layer, and torch's
// CPU flash-attention kernel, made for long blocks of queries, took them at ~50 G multiply-adds a
// second on two cores (8,000 positions: 4.6 ms a layer, ~140 ms of the first token). Here the
// queries of a key-value head (its query heads times the new tokens) are the lanes of the
// registers, so that a key's dot products with sixteen queries are one bf16 dot-product
// instruction per pair of its dimensions (AVX2: eight queries, one FMA per dimension), and the
// softmax's largest scores and sums run down the positions in those same lanes.
//
// The computation is the flash kernel's: scores q.k / sqrt(D) in fp32, a new token t (at
// position start + t) seeing positions 0..start + t, softmax in fp32, the probabilities rounded to
// bf16 for their product with the values (AVX-512; AVX2 keeps them in fp32), accumulated in fp32,
// divided by the fp32 sum, rounded to bf16. The positions are cut into runs attended to apart
// and combined at the end, each with its own largest score (as decode_attention.cpp does).
//
// Each instruction set gives the same few pieces (Queries, keys_at, scores_pass, hide,
// probabilities, lay_values, values_pass); attend_run, after them, is the run's loops.

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
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxQueries = 128;  // queries of a key-value head the kernel takes
constexpr int64_t kRun = 512;     // positions to a work item
constexpr int kPositions = 4;     // keys a step of the scores' loop takes
constexpr int kDims = 4;          // dimensions a step of the values' loop takes

// What a run of positions gives each query lane: its largest score, the sum of exp(score -
// largest), and the values weighted by those (acc[d * lanes + lane]), unnormalized.
struct Partial {
  std::vector<float> top, total, acc;
};

// Calls f(std::integral_constant<int, n>) (1 <= n <= Most): the loops' sums stay in registers
// only with their count known when compiled.
template <int Most, int N = 1, typename F>
void by_blocks(int n, F&& f) {
  if constexpr (N < Most) {
    if (n != N) return by_blocks<Most, N + 1>(n, f);
  }
  f(std::integral_constant<int, N>());
}

#if CHAT_AVX512

constexpr int kLanes = 16;  // queries to a register
using Vec = __m512;
using Lanes = __m512i;
using Word = uint32_t;  // what the queries, keys and values are read as: pairs of bf16
// The loops keep B blocks of queries' sums for kPositions keys (or kDims dimensions) in
// registers: B * 4 of the 32, and per step B loads of queries (or probabilities) for 4 broadcast
// pairs of key (or value) dimensions. (Two blocks for eight keys, sixteen sums of 32: 124 G
// multiply-adds a second at 8,000 positions; five blocks for four keys: see docs/engine.md.)
constexpr int kPass = 6;
static_assert(kPass * kPositions <= 24, "sums for the registers");

inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
inline Vec larger(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Lanes load_lanes(const int32_t* p) { return _mm512_loadu_si512(p); }

// s, with -inf in the lanes whose query's last position is before `position`.
inline Vec hide(Vec s, int64_t position, Lanes last) {
  const __mmask16 hidden = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(static_cast<int>(position)), last);
  return _mm512_mask_mov_ps(s, hidden, _mm512_set1_ps(-INFINITY));
}

// A key-value head's queries, laid out for the dot products: `data[(b * D / 2 + i) * 16 + l]`
// holds dimensions 2i and 2i + 1 of the query in lane l of block b (bf16, as one 32-bit word);
// `last[b * 16 + l]`, the last position it sees (-1 for the lanes past the queries).
template <int D>
struct Queries {
  explicit Queries(int blocks) : blocks(blocks), data(blocks * kLanes * D / 2), last(blocks * kLanes, -1) {}
  void lay(int64_t lane, const uint16_t* query, int32_t position) {
    const int64_t b = lane / kLanes, l = lane % kLanes;
    const auto* words = reinterpret_cast<const uint32_t*>(query);
    for (int d = 0; d < D / 2; ++d) data[(b * D / 2 + d) * kLanes + l] = words[d];
    last[lane] = position;
  }
  const uint32_t* block(int b) const { return data.data() + b * D / 2 * kLanes; }
  int blocks;
  std::vector<uint32_t> data;
  std::vector<int32_t> last;
};

// Scratch of a thread: the run's scores, its probabilities and values as bf16 pairs of positions.
struct Scratch {
  std::vector<float> scores;
  std::vector<uint32_t> probabilities, values;
};

// The keys at `rows` as scores_pass reads them: bf16 pairs, as they are.
template <int D>
inline void keys_at(const uint16_t* const* rows, Scratch&, const uint32_t** key) {
  for (int i = 0; i < kPositions; ++i) key[i] = reinterpret_cast<const uint32_t*>(rows[i]);
}

// sum[b][i] = the scores (unscaled) of query block b (from `queries`) with key i.
template <int D, int B>
inline void scores_pass(const uint32_t* queries, const uint32_t* const* key, Vec (*sum)[kPositions]) {
  Vec acc[B][kPositions];
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm512_setzero_ps();
  for (int d = 0; d < D / 2; ++d) {
    __m512bh dims[kPositions];
    for (int i = 0; i < kPositions; ++i) dims[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(key[i][d]));
    for (int b = 0; b < B; ++b) {
      const __m512bh query = (__m512bh)_mm512_loadu_si512(queries + (b * D / 2 + d) * kLanes);
      for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm512_dpbf16_ps(acc[b][i], query, dims[i]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) sum[b][i] = acc[b][i];
}

// Softmax's numerators of block b's `count` scores (0 where hidden) less `top`, as bf16 pairs
// of positions (a lone last position paired with 0) into scratch.probabilities; returns their
// sums (fp32, before rounding).
inline Vec probabilities(Scratch& scratch, int lanes, int b, int64_t count, Vec top) {
  const int64_t pairs = (count + 1) / 2;
  scratch.probabilities.resize(pairs * lanes);
  const float* scores = scratch.scores.data();
  Vec total = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512i words[2];
    for (int j = 0; j < 2; ++j) {
      const int64_t p = 2 * i + j;
      Vec e = _mm512_setzero_ps();
      if (p < count) {
        const Vec s = _mm512_loadu_ps(scores + p * lanes + b * kLanes);
        e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, splat(-INFINITY), _CMP_NEQ_OQ),
                                exp16(_mm512_sub_ps(s, top)));
      }
      total = _mm512_add_ps(total, e);
      words[j] = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
    }
    _mm512_storeu_si512(scratch.probabilities.data() + i * lanes + b * kLanes,
                        _mm512_or_si512(words[0], _mm512_slli_epi32(words[1], 16)));
  }
  return total;
}

// The run's `count` values (at v, `stride` apart) as bf16 pairs of positions: word d of pair i
// is dimension d of positions 2i and 2i + 1. Returns how many steps values_pass takes (pairs).
template <int D>
inline int64_t lay_values(const uint16_t* v, int64_t stride, int64_t count, Scratch& scratch) {
  const int64_t pairs = (count + 1) / 2;
  scratch.values.resize(pairs * D);
  uint32_t* values = scratch.values.data();
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                       39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t i = 0; i < pairs; ++i) {
    const uint16_t* a = v + 2 * i * stride;
    const bool both = 2 * i + 1 < count;
    for (int c = 0; c < D / 32; ++c) {
      const __m512i x = _mm512_loadu_si512(a + 32 * c);
      const __m512i y = both ? _mm512_loadu_si512(a + stride + 32 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(values + i * D + 32 * c, _mm512_permutex2var_epi16(x, low, y));
      _mm512_storeu_si512(values + i * D + 32 * c + 16, _mm512_permutex2var_epi16(x, high, y));
    }
  }
  return pairs;
}

// sum[b][j] = the probabilities of block b (`lanes` to a step) times dimension j of the values
// (D to a step), over `steps` pairs of positions.
template <int D, int B>
inline void values_pass(const uint32_t* probabilities, int lanes, const uint32_t* values, int64_t steps,
                        Vec (*sum)[kDims]) {
  Vec acc[B][kDims];
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < kDims; ++j) acc[b][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
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

#else

// AVX2: sixteen registers of eight floats. The queries, keys and values are widened to fp32 (a
// bf16 is the top half of its fp32) and multiplied with FMAs; the probabilities stay in fp32.
constexpr int kLanes = 8;  // queries to a register
using Vec = __m256;
using Lanes = __m256i;
using Word = float;
// Sums in registers: two blocks of queries for kPositions keys (or kDims dimensions), with two
// loads of queries (or probabilities) and four broadcasts a step: 14 of the 16.
constexpr int kPass = 2;

inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
inline Vec larger(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Lanes load_lanes(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline Vec hide(Vec s, int64_t position, Lanes last) {
  const __m256i hidden = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(position)), last);
  return _mm256_blendv_ps(s, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(hidden));
}

// A key-value head's queries in fp32: `data[(b * D + d) * 8 + l]` is dimension d of the query in
// lane l of block b; `last` as for AVX-512.
template <int D>
struct Queries {
  explicit Queries(int blocks) : blocks(blocks), data(blocks * kLanes * D), last(blocks * kLanes, -1) {}
  void lay(int64_t lane, const uint16_t* query, int32_t position) {
    const int64_t b = lane / kLanes, l = lane % kLanes;
    for (int d = 0; d < D; ++d) {
      const uint32_t bits = static_cast<uint32_t>(query[d]) << 16;
      std::memcpy(&data[(b * D + d) * kLanes + l], &bits, sizeof bits);
    }
    last[lane] = position;
  }
  const float* block(int b) const { return data.data() + b * D * kLanes; }
  int blocks;
  std::vector<float> data;
  std::vector<int32_t> last;
};

// Scratch of a thread: the run's scores (then probabilities), kPositions keys and its values in
// fp32.
struct Scratch {
  std::vector<float> scores, probabilities, keys, values;
};

// The keys at `rows`, widened into the scratch.
template <int D>
inline void keys_at(const uint16_t* const* rows, Scratch& scratch, const float** key) {
  scratch.keys.resize(kPositions * D);
  for (int i = 0; i < kPositions; ++i) {
    float* widened = scratch.keys.data() + i * D;
    for (int d = 0; d < D; d += 8) store(widened + d, widen8(rows[i] + d));
    key[i] = widened;
  }
}

template <int D, int B>
inline void scores_pass(const float* queries, const float* const* key, Vec (*sum)[kPositions]) {
  Vec acc[B][kPositions];
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    Vec dims[kPositions];
    for (int i = 0; i < kPositions; ++i) dims[i] = _mm256_broadcast_ss(key[i] + d);
    for (int b = 0; b < B; ++b) {
      const Vec query = _mm256_loadu_ps(queries + (b * D + d) * kLanes);
      for (int i = 0; i < kPositions; ++i) acc[b][i] = _mm256_fmadd_ps(query, dims[i], acc[b][i]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < kPositions; ++i) sum[b][i] = acc[b][i];
}

// Softmax's numerators of block b (fp32, 0 where hidden) into scratch.probabilities; their sums.
inline Vec probabilities(Scratch& scratch, int lanes, int b, int64_t count, Vec top) {
  scratch.probabilities.resize(count * lanes);
  Vec total = _mm256_setzero_ps();
  for (int64_t p = 0; p < count; ++p) {
    const Vec s = _mm256_loadu_ps(scratch.scores.data() + p * lanes + b * kLanes);
    const Vec e = _mm256_and_ps(_mm256_cmp_ps(s, splat(-INFINITY), _CMP_NEQ_OQ),
                                exp8(_mm256_sub_ps(s, top)));
    _mm256_storeu_ps(scratch.probabilities.data() + p * lanes + b * kLanes, e);
    total = _mm256_add_ps(total, e);
  }
  return total;
}

// The run's `count` values, widened; one step of values_pass a position.
template <int D>
inline int64_t lay_values(const uint16_t* v, int64_t stride, int64_t count, Scratch& scratch) {
  scratch.values.resize(count * D);
  for (int64_t p = 0; p < count; ++p)
    for (int d = 0; d < D; d += 8) store(scratch.values.data() + p * D + d, widen8(v + p * stride + d));
  return count;
}

template <int D, int B>
inline void values_pass(const float* probabilities, int lanes, const float* values, int64_t steps,
                        Vec (*sum)[kDims]) {
  Vec acc[B][kDims];
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < kDims; ++j) acc[b][j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    Vec dims[kDims];
    for (int j = 0; j < kDims; ++j) dims[j] = _mm256_broadcast_ss(values + i * D + j);
    for (int b = 0; b < B; ++b) {
      const Vec weights = _mm256_loadu_ps(probabilities + i * lanes + b * kLanes);
      for (int j = 0; j < kDims; ++j) acc[b][j] = _mm256_fmadd_ps(weights, dims[j], acc[b][j]);
    }
  }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < kDims; ++j) sum[b][j] = acc[b][j];
}

#endif

// The queries' attention over positions first..first + count - 1 of one key-value head (keys
// at k + p * stride, values at v + p * stride, position p from the head's start).
template <int D>
void attend_run(const Queries<D>& q, const uint16_t* k, const uint16_t* v, int64_t stride,
                int64_t first, int64_t count, Scratch& scratch, Partial& part) {
  const int blocks = q.blocks, lanes = blocks * kLanes;
  const Vec scale = splat(1.0f / std::sqrt(static_cast<float>(D)));
  scratch.scores.resize(count * lanes);
  float* scores = scratch.scores.data();
  Vec peak[kMaxQueries / kLanes];
  Lanes last[kMaxQueries / kLanes];
  for (int b = 0; b < blocks; ++b) {
    peak[b] = splat(-INFINITY);
    last[b] = load_lanes(q.last.data() + b * kLanes);
  }

  // Scores, kPositions keys at a time (the padding repeats the last key), up to kPass blocks of
  // queries at a time.
  for (int64_t p0 = 0; p0 < count; p0 += kPositions) {
    const uint16_t* rows[kPositions];
    for (int i = 0; i < kPositions; ++i) rows[i] = k + (first + std::min<int64_t>(p0 + i, count - 1)) * stride;
    const Word* key[kPositions];
    keys_at<D>(rows, scratch, key);
    for (int b0 = 0; b0 < blocks; b0 += kPass) {
      const int pass = std::min(kPass, blocks - b0);
      Vec sum[kPass][kPositions];
      by_blocks<kPass>(pass, [&](auto n) { scores_pass<D, decltype(n)::value>(q.block(b0), key, sum); });
      for (int b = 0; b < pass; ++b) {
        for (int i = 0; i < kPositions && p0 + i < count; ++i) {
          // Positions past a query's own are hidden from it.
          const Vec s = hide(sum[b][i] * scale, first + p0 + i, last[b0 + b]);
          store(scores + (p0 + i) * lanes + (b0 + b) * kLanes, s);
          peak[b0 + b] = larger(peak[b0 + b], s);
        }
      }
    }
  }

  // Softmax: a lane that sees none of the run keeps -inf as its largest score, and its
  // numerators are all 0 (taken less 0 instead).
  part.top.resize(lanes);
  part.total.resize(lanes);
  for (int b = 0; b < blocks; ++b) {
    float top[kLanes];
    store(top, peak[b]);
    store(part.top.data() + b * kLanes, peak[b]);
    for (float& t : top) t = t == -INFINITY ? 0.f : t;
    store(part.total.data() + b * kLanes, probabilities(scratch, lanes, b, count, load(top)));
  }

  // The weighted values, kDims dimensions and up to kPass blocks of queries at a time.
  const int64_t steps = lay_values<D>(v + first * stride, stride, count, scratch);
  part.acc.resize(D * lanes);
  for (int b0 = 0; b0 < blocks; b0 += kPass) {
    const int pass = std::min(kPass, blocks - b0);
    for (int d0 = 0; d0 < D; d0 += kDims) {
      Vec sum[kPass][kDims];
      by_blocks<kPass>(pass, [&](auto n) {
        values_pass<D, decltype(n)::value>(scratch.probabilities.data() + b0 * kLanes, lanes,
                                            scratch.values.data() + d0, steps, sum);
      });
      for (int b = 0; b < pass; ++b)
        for (int j = 0; j < kDims; ++j) store(part.acc.data() + (d0 + j) * lanes + (b0 + b) * kLanes, sum[b][j]);
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
  std::vector<Queries<D>> laid(kv_heads, Queries<D>(blocks));
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t lane = 0; lane < queries; ++lane) {
      const int64_t t = lane / group, head = h * group + lane % group;
      laid[h].lay(lane, q_data + t * q.stride(0) + head * q.stride(1), static_cast<int32_t>(start + t));
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
  TORCH_CHECK(tokens >= 1 && heads / kv_heads * tokens <= kMaxQueries,
              "prefill_attention: at most ", kMaxQueries, " queries to a key-value head");
  TORCH_CHECK(row >= 0 && row < keys.size(0) && start >= 0 && start + tokens <= keys.size(2),
              "prefill_attention: row or positions out of range");
  if (dim == 64) return attend<64>(q, keys, values, row, start);
  TORCH_CHECK(dim == 128, "prefill_attention: head size 64 or 128");
  return attend<128>(q, keys, values, row, start);
}

}  // namespace

// The schema is defined by native.py (see decode_attention.cpp).
TORCH_LIBRARY_IMPL(chat, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
