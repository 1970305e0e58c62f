// Ragged paged attention for CPUs, as an XLA FFI custom call (built and loaded by
// cpu_paged_attention.py; the pure-jnp reference is paged_attention.py).
//
// Same contract as `ragged_paged_attention`: q [T, heads, d]; caches [layers, blocks, block_size,
// kv_heads, d]; row i brings query_lens[i] tokens from flat token query_start[i] and attends
// causally to context_lens[i] cached tokens (its new ones included), or, where key_ends is given, new
// token t up to key position key_ends[t] (exclusive; an image read bidirectionally sees its own later
// tokens, Gemma 3's), never past the row's context. Keys are read in place from
// the blocks the row's block table names, only up to what its last query can see: no gather, no
// padded table width. Padding tokens get zeros.
//
// A quantized cache (quantized_kv.py) holds int8 values, or the bits of float8_e4m3fn values as
// uint8, with one float32 scale per token and KV head [layers, blocks, block_size, kv_heads]: a key
// is values * scale. Its blocks are widened unscaled, and the scales are applied to what each key
// or value contributes: a score is (q . k_values) * k_scale, a value's weight p * v_scale.
//
// Each build holds one pair of types, named by the compiler definitions JPAGED_QUERY (the
// query's and result's element: float, _Float16, or uint16_t for bfloat16 bits) and JPAGED_CACHE
// (float, _Float16, uint16_t for bfloat16 bits, int8_t, or uint8_t for float8_e4m3fn bits), so that
// a process compiles only the pair its model reads.
//
// Work is split into (row, tile of up to kQueryTile queries) items, shared by the calling thread
// and the kernels' helper threads (cpu_ffi.h). Each item reads its row's blocks (every KV head at
// once) in three passes: scores, an exact softmax in float32, weighted values. A query's result
// depends only on its own row, never on what else is in the batch.

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_ffi.h"

#if !defined(JPAGED_QUERY) || !defined(JPAGED_CACHE)
#error "build with -DJPAGED_QUERY=<type> -DJPAGED_CACHE=<type>"
#endif

namespace {

using namespace jpaged_cpu;

constexpr int64_t kQueryTile = 16;  // queries of one row that share a pass over its keys
constexpr int64_t kLanes = 16;  // keys scored together; also the head_dim chunk of the fast path

// e^x lane by lane for x <= 0, to about 2 float32 ulps: Cody-Waite reduction to r in
// [-ln2/2, ln2/2], a degree-6 Taylor polynomial, and 2^n built in the exponent bits.
inline V16 ExpNonPositive(V16 x) {
  const V16 lowest = V16{} - 87.0f;
  x = x < lowest ? lowest : x;
  const V16 round = V16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V16 n = (x * 1.44269504f + round) - round;
  const V16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  const V16 poly =
      1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f + r * (8.33333333e-3f + r * 1.38888889e-3f)))));
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  return poly * reinterpret_cast<const V16&>(bits);
}

inline float Bf16ToFloat(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline uint16_t FloatToBf16(float value) {  // round to nearest even, as XLA converts
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if (std::isnan(value)) return static_cast<uint16_t>((word >> 16) | 0x40);
  word += 0x7fff + ((word >> 16) & 1);
  return static_cast<uint16_t>(word >> 16);
}

template <typename T>
inline float Load(const T* p, int64_t i);
template <>
inline float Load<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float Load<uint16_t>(const uint16_t* p, int64_t i) { return Bf16ToFloat(p[i]); }
template <>
inline float Load<_Float16>(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); }

// n cache values from src as float32 into dst: bfloat16 and float16 exactly; int8 and float8 e4m3
// bits exactly and unscaled, 16 at a time.
inline void Widen(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
}

inline void Widen(const _Float16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline V16 Widen16(const int8_t* p) { return Int8x16ToFloat(p); }
inline V16 Widen16(const uint8_t* p) { return E4M3x16ToFloat(p); }

template <typename C>
inline void Widen(const C* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) StoreV(dst + i, Widen16(src + i));
  if (i == n) return;
  C tail[kLanes] = {};  // the last values, without reading past the cache
  std::memcpy(tail, src + i, (n - i) * sizeof(C));
  const V16 widened = Widen16(tail);
  for (int64_t x = 0; i < n; ++i, ++x) dst[i] = widened[x];
}

template <typename C>
constexpr bool kQuantized = std::is_same_v<C, int8_t> || std::is_same_v<C, uint8_t>;

template <typename T>
inline void Store(T* p, int64_t i, float value);
template <>
inline void Store<float>(float* p, int64_t i, float value) { p[i] = value; }
template <>
inline void Store<uint16_t>(uint16_t* p, int64_t i, float value) { p[i] = FloatToBf16(value); }
template <>  // round to nearest even, as XLA converts
inline void Store<_Float16>(_Float16* p, int64_t i, float value) { p[i] = static_cast<_Float16>(value); }

struct Shapes {
  int64_t num_tokens, num_heads, head_dim;
  int64_t num_blocks, block_size, num_kv_heads;
  int64_t num_rows, table_width;
};

struct WorkItem {
  int32_t row, first_query, num_queries;
};

// out[g * out_stride + t] = q[g] . k[t] for g < G query vectors (`d` floats apart, all of one KV
// head) and the t < n (at most 16) keys `stride` floats apart: each key is loaded once for the G
// queries; each dot is lane-wise partial sums over head_dim, added across lanes at the end. D is
// head_dim where known at compile time (the common sizes, with all 16 keys present), else 0.
template <int D, int G>
inline void ScoreKeys(const float* q, const float* k, int64_t stride, int64_t n, int64_t d, float* out,
                      int64_t out_stride) {
  const int64_t dim = D ? D : d;
  V16 partial[G][kLanes];
  for (int64_t t = 0; t < kLanes; ++t) {
    V16 sum[G] = {};
    if (D || t < n)
      for (int64_t x = 0; x < dim; x += kLanes) {
        const V16 key = LoadV(k + t * stride + x);
        for (int g = 0; g < G; ++g) sum[g] += LoadV(q + g * dim + x) * key;
      }
    for (int g = 0; g < G; ++g) partial[g][t] = sum[g];
  }
  for (int g = 0; g < G; ++g) StoreV(out + g * out_stride, SumEachOf16(partial[g]));
}

// acc[k * acc_stride + 0..16C) += sum over t < count of w[k * w_stride + t] * v[t * v_stride + 0..16C),
// for k < N: N queries' slices of C x 16 floats of one KV head's values, accumulated in registers
// (N x C independent sums, so that consecutive tokens' products do not wait on one another).
template <int N, int C>
inline void AddWeighted(float* acc, int64_t acc_stride, const float* v, int64_t v_stride, int64_t count,
                        const float* w, int64_t w_stride) {
  V16 a[N][C];
  for (int k = 0; k < N; ++k)
    for (int c = 0; c < C; ++c) a[k][c] = LoadV(acc + k * acc_stride + c * kLanes);
  for (int64_t t = 0; t < count; ++t) {
    V16 value[C];
    for (int c = 0; c < C; ++c) value[c] = LoadV(v + t * v_stride + c * kLanes);
    for (int k = 0; k < N; ++k) {
      const float weight = w[k * w_stride + t];
      for (int c = 0; c < C; ++c) a[k][c] += weight * value[c];
    }
  }
  for (int k = 0; k < N; ++k)
    for (int c = 0; c < C; ++c) StoreV(acc + k * acc_stride + c * kLanes, a[k][c]);
}

// Offsets of block `b` of the row's table in this layer (of its values, and of its scales in a
// quantized cache), and the block's tokens the item reads.
struct BlockRef {
  int64_t base, scale_base, count;
};

// One work item: `num_queries` consecutive queries of a row, every head. Exact softmax in three
// passes over the visible keys (scores, exponentials, weighted values); each pass reads a block's
// tokens (all KV heads, contiguous) once and asks for the next block ahead of time. `k_scales` and
// `v_scales` are read only for a quantized cache (C int8, or uint8 float8 bits).
template <typename Q, typename C>
void AttendItem(const WorkItem& item, const Q* q, const C* k_cache, const C* v_cache, const float* k_scales,
                const float* v_scales, int64_t layer, int64_t span, const int32_t* block_tables,
                const int32_t* context_lens, const int32_t* query_start, const int32_t* query_lens,
                const int32_t* key_ends, float scale, float softcap, const float* sinks, const Shapes& s, Q* out) {
  const int64_t d = s.head_dim, heads = s.num_heads;
  const int64_t group = heads / s.num_kv_heads;
  const int64_t nq = item.num_queries * heads;  // query vectors: query-major, then head
  const int64_t first_pos = context_lens[item.row] - query_lens[item.row] + item.first_query;
  const int64_t first_token = query_start[item.row] + item.first_query;
  // One past the last key query i (of the item) sees: itself, or (key_ends) a later token of its row.
  auto key_end = [&](int64_t i) {
    const int64_t pos = first_pos + i;
    return key_ends ? std::clamp<int64_t>(key_ends[first_token + i], pos + 1, context_lens[item.row]) : pos + 1;
  };
  int64_t num_keys = 0;  // keys the item reads
  for (int64_t i = 0; i < item.num_queries; ++i) num_keys = std::max(num_keys, key_end(i));
  const int64_t first_key = std::max<int64_t>(0, first_pos - span + 1);  // the first key the first query sees
  const int64_t token_elems = s.num_kv_heads * d;
  const int64_t block_elems = s.block_size * token_elems;
  const int64_t num_blocks = (num_keys + s.block_size - 1) / s.block_size;
  const int64_t first_block = first_key / s.block_size;  // the blocks before it are wholly out of every window

  // Score slots per query: rounded up, plus one group of lanes that a last partial group may write.
  const int64_t slots = (num_keys + kLanes - 1) / kLanes * kLanes + kLanes;
  thread_local std::vector<float> qv, acc, scores, inv_sum, widened;
  qv.resize(nq * d);
  acc.assign(nq * d, 0.0f);
  scores.resize(nq * slots);
  inv_sum.resize(nq);
  widened.resize(block_elems);
  for (int64_t j = 0; j < nq; ++j) {
    const Q* src = q + (first_token * heads + j) * d;
    for (int64_t x = 0; x < d; ++x) qv[j * d + x] = Load(src, x) * scale;
  }
  auto block_ref = [&](int64_t b) {
    const int64_t block = layer * s.num_blocks + block_tables[item.row * s.table_width + b];
    return BlockRef{block * block_elems, block * s.block_size * s.num_kv_heads,
                    std::min(s.block_size, num_keys - b * s.block_size)};
  };
  auto prefetch_bytes = [](const void* first, int64_t bytes) {
    const char* bytes_at = static_cast<const char*>(first);
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(bytes_at + offset);
  };
  auto prefetch = [&](const C* cache, const float* scales, int64_t b) {
    if (b >= num_blocks) return;
    const BlockRef next = block_ref(b);
    prefetch_bytes(cache + next.base, next.count * token_elems * static_cast<int64_t>(sizeof(C)));
    if constexpr (kQuantized<C>)
      prefetch_bytes(scales + next.scale_base, next.count * s.num_kv_heads * static_cast<int64_t>(sizeof(float)));
  };
  // Tokens of a block as float32 rows of `token_elems` (other dtypes widened into a scratch block,
  // a quantized cache's without its scales).
  auto tokens = [&](const C* cache, const BlockRef& ref) -> const float* {
    if constexpr (std::is_same_v<C, float>) {
      return cache + ref.base;
    } else {
      Widen(cache + ref.base, ref.count * token_elems, widened.data());
      return widened.data();
    }
  };
  // Query vector j sees keys [window_start[j], visible[j]); its KV head.
  thread_local std::vector<int64_t> visible, window_start, head_offset, kv_head;
  visible.resize(nq);
  window_start.resize(nq);
  head_offset.resize(nq);
  kv_head.resize(nq);
  for (int64_t j = 0; j < nq; ++j) {
    visible[j] = key_end(j / heads);
    window_start[j] = std::max<int64_t>(0, first_pos + j / heads + 1 - span);
    kv_head[j] = (j % heads) / group;
    head_offset[j] = kv_head[j] * d;
  }
  // A quantized cache: multiplies each query vector's scores (or weights) of block b's tokens by
  // the tokens' scales of its KV head (gathered per KV head first, so that the products vectorise).
  thread_local std::vector<float> head_scales;
  head_scales.resize(s.num_kv_heads * s.block_size);
  auto apply_scales = [&](const float* scales, const BlockRef& ref, int64_t b) {
    if constexpr (kQuantized<C>) {
      const float* block_scales = scales + ref.scale_base;
      for (int64_t t = 0; t < ref.count; ++t)
        for (int64_t h = 0; h < s.num_kv_heads; ++h)
          head_scales[h * s.block_size + t] = block_scales[t * s.num_kv_heads + h];
      for (int64_t j = 0; j < nq; ++j) {
        float* __restrict sj = scores.data() + j * slots + b * s.block_size;
        const float* __restrict hs = head_scales.data() + kv_head[j] * s.block_size;
        for (int64_t t = 0; t < ref.count; ++t) sj[t] *= hs[t];
      }
    }
  };

  // The query vectors of one KV head go through the scores a few at a time (sharing each key's
  // loads: 4, or 2 for head_dim above 64) and through the weighted values up to 4 at a time, 64
  // floats of head_dim at a time (16 where head_dim is not a multiple of 64).
  const int64_t score_pass = d > 64 ? 2 : 4;
  const int64_t value_slice = d % (4 * kLanes) ? kLanes : 4 * kLanes;

  // Scores: 16 keys at a time, each dot as lane-wise partial sums added across lanes at the end.
  prefetch(k_cache, k_scales, first_block);
  for (int64_t b = first_block; b < num_blocks; ++b) {
    prefetch(k_cache, k_scales, b + 1);
    const BlockRef ref = block_ref(b);
    const float* keys = tokens(k_cache, ref);
    for (int64_t t0 = 0; t0 < ref.count; t0 += kLanes) {
      const int64_t n = std::min(kLanes, ref.count - t0);
      if (d % kLanes) {
        for (int64_t j = 0; j < nq; ++j) {
          const float* qj = qv.data() + j * d;
          const float* k0 = keys + t0 * token_elems + head_offset[j];
          float* out_scores = scores.data() + j * slots + b * s.block_size + t0;
          for (int64_t t = 0; t < n; ++t) {
            float dot = 0.0f;
            for (int64_t x = 0; x < d; ++x) dot += qj[x] * k0[t * token_elems + x];
            out_scores[t] = dot;
          }
        }
        continue;
      }
      for (int64_t i = 0; i < item.num_queries; ++i)
        for (int64_t h = 0; h < s.num_kv_heads; ++h)
          for (int64_t g0 = 0; g0 < group; g0 += score_pass) {
            const int64_t first_j = i * heads + h * group + g0;
            const float* qj = qv.data() + first_j * d;
            const float* k0 = keys + t0 * token_elems + h * d;
            float* out_scores = scores.data() + first_j * slots + b * s.block_size + t0;
            WithCount(std::min(score_pass, group - g0), [&](auto g) {
              if (d == 64 && n == kLanes)
                ScoreKeys<64, g>(qj, k0, token_elems, n, d, out_scores, slots);
              else if (d == 128 && n == kLanes)
                ScoreKeys<128, g>(qj, k0, token_elems, n, d, out_scores, slots);
              else
                ScoreKeys<0, g>(qj, k0, token_elems, n, d, out_scores, slots);
            });
          }
    }
    apply_scales(k_scales, ref, b);
  }

  // Exponentials (unnormalised) and their sums.
  prefetch(v_cache, v_scales, first_block);
  I16 lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int64_t j = 0; j < nq; ++j) {
    float* sj = scores.data() + j * slots;
    const int64_t n = visible[j], lo = window_start[j], first_t0 = lo / kLanes * kLanes;
    if (softcap > 0.0f)  // Gemma 2's soft-capped scores
      for (int64_t t = lo; t < n; ++t) sj[t] = softcap * std::tanh(sj[t] / softcap);
    // Score slots before the first block read hold no scores: only lanes in [lo, n) are read.
    auto in_window = [&](int64_t t0) { return (lane < static_cast<int32_t>(n - t0)) & (lane >= static_cast<int32_t>(lo - t0)); };
    V16 lane_max = V16{} - INFINITY;
    for (int64_t t0 = first_t0; t0 < n; t0 += kLanes) {
      const V16 x = LoadV(sj + t0);
      lane_max = in_window(t0) & (x > lane_max) ? x : lane_max;
    }
    float max_score = -INFINITY;
    for (int i = 0; i < kLanes; ++i) max_score = std::max(max_score, lane_max[i]);
    const float sink = sinks ? sinks[j % heads] : -INFINITY;  // gpt-oss: one more logit, without a value
    max_score = std::max(max_score, sink);
    V16 sum = {};
    for (int64_t t0 = first_t0; t0 < n; t0 += kLanes) {
      V16 e = ExpNonPositive(LoadV(sj + t0) - max_score);
      e = in_window(t0) ? e : V16{};
      StoreV(sj + t0, e);
      sum += e;
    }
    float total = sinks ? std::exp(sink - max_score) : 0.0f;
    for (int i = 0; i < kLanes; ++i) total += sum[i];
    inv_sum[j] = 1.0f / total;
    for (int64_t t = (n + kLanes - 1) / kLanes * kLanes; t < num_keys; ++t) sj[t] = 0.0f;  // keys it cannot see
    for (int64_t t = first_block * s.block_size; t < first_t0; ++t) sj[t] = 0.0f;  // and those before its window
  }

  // Weighted values (the weights of keys a query cannot see are 0), per block and KV head, with
  // the query vectors' accumulators in registers.
  for (int64_t b = first_block; b < num_blocks; ++b) {
    prefetch(v_cache, v_scales, b + 1);
    const BlockRef ref = block_ref(b);
    const float* values = tokens(v_cache, ref);
    apply_scales(v_scales, ref, b);
    const float* weights = scores.data() + b * s.block_size;
    if (d % kLanes) {
      for (int64_t t = 0; t < ref.count; ++t)
        for (int64_t j = 0; j < nq; ++j) {
          const float p = weights[j * slots + t];
          const float* vt = values + t * token_elems + head_offset[j];
          for (int64_t x = 0; x < d; ++x) acc[j * d + x] += p * vt[x];
        }
      continue;
    }
    for (int64_t h = 0; h < s.num_kv_heads; ++h)
      for (int64_t i = 0; i < item.num_queries; ++i)
        for (int64_t g0 = 0; g0 < group; g0 += 4) {
          const int64_t first_j = i * heads + h * group + g0;
          const float* w = weights + first_j * slots;
          WithCount(std::min<int64_t>(4, group - g0), [&](auto count) {
            for (int64_t x = 0; x < d; x += value_slice) {
              const float* v0 = values + h * d + x;
              float* a = acc.data() + first_j * d + x;
              if (value_slice == kLanes)
                AddWeighted<count, 1>(a, d, v0, token_elems, ref.count, w, slots);
              else
                AddWeighted<count, 4>(a, d, v0, token_elems, ref.count, w, slots);
            }
          });
        }
  }

  for (int64_t j = 0; j < nq; ++j) {
    Q* dst = out + (first_token * heads + j) * d;
    for (int64_t x = 0; x < d; ++x) Store(dst, x, acc[j * d + x] * inv_sum[j]);
  }
}

template <typename Q, typename C>
void Attend(const Shapes& s, const Q* q, const C* k_cache, const C* v_cache, const float* k_scales,
            const float* v_scales, int64_t layer, int64_t span, const int32_t* block_tables,
            const int32_t* context_lens, const int32_t* query_start, const int32_t* query_lens,
            const int32_t* key_ends, float scale, float softcap, const float* sinks, Q* out) {
  std::memset(out, 0, sizeof(Q) * s.num_tokens * s.num_heads * s.head_dim);
  std::vector<WorkItem> items;
  for (int32_t row = 0; row < s.num_rows; ++row)
    for (int32_t first = 0; first < query_lens[row]; first += kQueryTile)
      items.push_back({row, first, static_cast<int32_t>(std::min<int64_t>(kQueryTile, query_lens[row] - first))});
  // Longest work first, so the threads finish together.
  auto work = [&](const WorkItem& item) {
    return int64_t(item.num_queries) * std::min<int64_t>(context_lens[item.row], span + item.num_queries);
  };
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) { return work(a) > work(b); });
  // The layer's products follow (XLA's own, for float weights), which a spinning helper would slow.
  ParallelFor(static_cast<int64_t>(items.size()), kNoSpin, [&](int64_t i) {
    AttendItem(items[i], q, k_cache, v_cache, k_scales, v_scales, layer, span, block_tables, context_lens,
               query_start, query_lens, key_ends, scale, softcap, sinks, s, out);
  });
}

// Why the metadata cannot be read safely, or nullptr.
const char* Check(const Shapes& s, int64_t layer, int64_t num_layers, const int32_t* block_tables,
                  const int32_t* context_lens, const int32_t* query_start, const int32_t* query_lens) {
  if (s.num_kv_heads < 1 || s.num_heads % s.num_kv_heads) return "heads not a multiple of kv heads";
  if (layer < 0 || layer >= num_layers) return "layer out of range";
  for (int64_t row = 0; row < s.num_rows; ++row) {
    const int64_t n = query_lens[row], ctx = context_lens[row], start = query_start[row];
    if (n == 0) continue;
    if (n < 0 || n > ctx || start < 0 || start + n > s.num_tokens || ctx > s.table_width * s.block_size)
      return "row's query or context out of range";
    for (int64_t b = 0; b < (ctx + s.block_size - 1) / s.block_size; ++b) {
      const int64_t block = block_tables[row * s.table_width + b];
      if (block < 0 || block >= s.num_blocks) return "block id out of range";
    }
  }
  return nullptr;
}

using Query = JPAGED_QUERY;
using Cache = JPAGED_CACHE;

template <typename T>
constexpr XLA_FFI_DataType kDtype = std::is_same_v<T, float>      ? XLA_FFI_DataType_F32
                                    : std::is_same_v<T, _Float16> ? XLA_FFI_DataType_F16
                                    : std::is_same_v<T, int8_t>   ? XLA_FFI_DataType_S8
                                    : std::is_same_v<T, uint8_t>  ? XLA_FFI_DataType_U8
                                                                  : XLA_FFI_DataType_BF16;

// Whether a buffer of `dtype` holds elements of type T (bfloat16 may come as its bits, uint16).
template <typename T>
bool Holds(XLA_FFI_DataType dtype) {
  return dtype == kDtype<T> || (std::is_same_v<T, uint16_t> && dtype == XLA_FFI_DataType_U16);
}

}  // namespace

// Arguments: q, k_cache, v_cache, k_scales, v_scales, layer [2] (the layer, and the keys a query
// sees back from itself, itself included: its sliding window, or more than any context), block_tables,
// context_lens, query_start, query_lens (int32), sinks (float32 [heads]: each head's sink logit, which joins its
// softmax's denominator; or [0]: none), key_ends (int32 [T]: one past the last key each new token sees; or
// [0]: causal); attributes: scale and softcap (float32; a softcap > 0
// turns each score s into softcap * tanh(s / softcap)); result: [T, heads, head_dim] in q's
// dtype. q and the result hold Query, the caches Cache; a quantized cache (int8, or uint8 float8
// bits) comes with float32 scales [layers, blocks, block_size, kv_heads], else the scales are
// ignored (pass any float32 arrays).
extern "C" XLA_FFI_Error* JpagedRaggedPagedAttention(XLA_FFI_CallFrame* frame) {
  const XLA_FFI_Api* api = frame->api;
  if (IsMetadataQuery(frame)) return DescribeHandler(frame);
  if (const char* problem = FrameProblem(frame, 12, 2)) return Fail(api, problem);
  const XLA_FFI_Scalar *scale = ScalarAttr(frame, "scale"), *softcap = ScalarAttr(frame, "softcap");
  if (!scale || !softcap || scale->dtype != XLA_FFI_DataType_F32 || softcap->dtype != XLA_FFI_DataType_F32)
    return Fail(api, "scale and softcap must be float32 attributes");
  const XLA_FFI_Buffer *q = Buffer(frame->args.args[0]), *k = Buffer(frame->args.args[1]),
                       *v = Buffer(frame->args.args[2]), *k_scales = Buffer(frame->args.args[3]),
                       *v_scales = Buffer(frame->args.args[4]), *out = Buffer(frame->rets.rets[0]);
  const XLA_FFI_Buffer* ints[5];
  for (int i = 0; i < 5; ++i) {
    ints[i] = Buffer(frame->args.args[5 + i]);
    if (ints[i]->dtype != XLA_FFI_DataType_S32) return Fail(api, "layer and metadata must be int32");
  }
  if (q->rank != 3 || k->rank != 5 || v->rank != 5 || ints[1]->rank != 2 || out->rank != 3)
    return Fail(api, "q, caches or block tables of the wrong rank");
  for (int i = 0; i < 5; ++i)
    if (k->dims[i] != v->dims[i]) return Fail(api, "k and v caches differ in shape");
  const Shapes s{q->dims[0], q->dims[1], q->dims[2], k->dims[1], k->dims[2], k->dims[3], ints[1]->dims[0],
                 ints[1]->dims[1]};
  if (k->dims[4] != s.head_dim) return Fail(api, "cache head_dim differs from q's");
  if (ints[0]->rank != 1 || ints[0]->dims[0] != 2) return Fail(api, "layer must be [layer, span]");
  const int64_t layer = Int32s(ints[0])[0], span = Int32s(ints[0])[1];
  if (span < 1) return Fail(api, "span must be >= 1");
  const int32_t *tables = Int32s(ints[1]), *context_lens = Int32s(ints[2]), *query_start = Int32s(ints[3]),
                *query_lens = Int32s(ints[4]);
  for (const XLA_FFI_Buffer* meta : {ints[2], ints[3], ints[4]})
    if (meta->rank != 1 || meta->dims[0] != s.num_rows) return Fail(api, "metadata of the wrong length");
  if (const char* problem = Check(s, layer, k->dims[0], tables, context_lens, query_start, query_lens))
    return Fail(api, problem);
  const XLA_FFI_Buffer* sinks = Buffer(frame->args.args[10]);
  if (sinks->dtype != XLA_FFI_DataType_F32 || sinks->rank != 1 || (sinks->dims[0] != 0 && sinks->dims[0] != s.num_heads))
    return Fail(api, "sinks must be float32 [heads], or [0] for none");
  const XLA_FFI_Buffer* key_ends = Buffer(frame->args.args[11]);
  if (key_ends->dtype != XLA_FFI_DataType_S32 || key_ends->rank != 1 ||
      (key_ends->dims[0] != 0 && key_ends->dims[0] != s.num_tokens))
    return Fail(api, "key_ends must be int32 [tokens], or [0] for causal attention");
  if (q->dtype != kDtype<Query> || out->dtype != q->dtype || !Holds<Cache>(k->dtype) || !Holds<Cache>(v->dtype))
    return Fail(api, "q, result or caches of a dtype this build does not read (it is built for one pair)");
  if constexpr (kQuantized<Cache>) {
    for (const XLA_FFI_Buffer* scales : {k_scales, v_scales}) {
      if (scales->dtype != XLA_FFI_DataType_F32) return Fail(api, "cache scales must be float32");
      if (scales->rank != 4 || !std::equal(scales->dims, scales->dims + 4, k->dims))
        return Fail(api, "cache scales must have the caches' shape without head_dim");
    }
  }
  Attend(s, static_cast<const Query*>(q->data), static_cast<const Cache*>(k->data),
         static_cast<const Cache*>(v->data), static_cast<const float*>(k_scales->data),
         static_cast<const float*>(v_scales->data), layer, span, tables, context_lens, query_start, query_lens,
         key_ends->dims[0] ? Int32s(key_ends) : nullptr,
         *static_cast<const float*>(scale->value), *static_cast<const float*>(softcap->value),
         sinks->dims[0] ? static_cast<const float*>(sinks->data) : nullptr, static_cast<Query*>(out->data));
  return nullptr;
}
