// Float32 matmul for few rows on CPUs, as an XLA FFI custom call (built and loaded by
// cpu_float_matmul.py; the reference is XLA's own `x @ w`).
//
// y [M, N] = x [M, K] @ w [K, N], w row-major in the model's `x @ W` layout. A decode step with a
// row or two reads every weight once for a few multiplies, so the product is bound by how fast
// the weights stream from memory. The work is split along K into chunks of kChunkRows contiguous
// weight rows (a plain sequential read each, which the hardware prefetchers follow), shared by
// the calling thread and the kernels' helper threads (cpu_ffi.h); each chunk's partial sums over
// its rows go to a scratch row, and the chunks' partials are then added in chunk order. Every
// output is thus summed in one fixed order (k in order within a chunk, chunks in order),
// whatever M, the other rows or the threads.
//
// The transposed product (JpagedFloatMatmulTransposed) takes w [N, K] instead, an embedding table
// used as the LM head: each work item reads 64 contiguous rows of w once for all (up to 4) rows
// of x, each output a whole dot product summed in 16 lanes, then across them.

#include <cstring>
#include <vector>

#include "cpu_ffi.h"

namespace {

using namespace jpaged_cpu;

constexpr int64_t kChunkRows = 64;  // weight rows per work item
constexpr int64_t kRowGroup = 4;    // rows of x that share each load of a weight vector

// part[r * n + j] += x[r * K + k + i] * w[(k + i) * n + j] for i < U, one after another, for the R
// rows of x at `x` (K apart) and all n columns, `row` pointing at weight row k: each partial sum
// is loaded and stored once for its U multiply-adds.
template <int R, int U>
inline void AddRows(const float* x, int64_t K, const float* row, int64_t n, int64_t k, float* part) {
  float xs[R][U];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < U; ++i) xs[r][i] = x[r * K + k + i];
  const int64_t vector_end = n / 16 * 16;
  for (int64_t j = 0; j < vector_end; j += 16) {
    V16 wv[U];
    for (int i = 0; i < U; ++i) wv[i] = LoadV(row + i * n + j);
    for (int r = 0; r < R; ++r) {
      V16 sum = LoadV(part + r * n + j);
      for (int i = 0; i < U; ++i) sum += xs[r][i] * wv[i];
      StoreV(part + r * n + j, sum);
    }
  }
  for (int64_t j = vector_end; j < n; ++j)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < U; ++i) part[r * n + j] += xs[r][i] * row[i * n + j];
}

// part[r * n + j] = sum over k in [k0, k1) of x[r * K + k] * w[k * n + j], k in order: four
// weight rows at a time, then one at a time.
template <int R>
void ChunkSums(const float* x, int64_t K, const float* w, int64_t n, int64_t k0, int64_t k1, float* part) {
  std::memset(part, 0, sizeof(float) * R * n);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) AddRows<R, 4>(x, K, w + k * n, n, k, part);
  for (; k < k1; ++k) AddRows<R, 1>(x, K, w + k * n, n, k, part);
}

void Matmul(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t chunks = (K + kChunkRows - 1) / kChunkRows;
  thread_local std::vector<float> parts;
  for (int64_t r0 = 0; r0 < M; r0 += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, M - r0);
    parts.resize(chunks * rows * N);
    float* scratch = parts.data();
    WithCount(rows, [&](auto r) {
      ParallelFor(chunks, kSpinToNextProduct, [&](int64_t c) {
        ChunkSums<r>(x + r0 * K, K, w, N, c * kChunkRows, std::min(K, (c + 1) * kChunkRows), scratch + c * r * N);
      });
    });
    for (int64_t i = 0; i < rows * N; ++i) {
      float sum = scratch[i];
      for (int64_t c = 1; c < chunks; ++c) sum += scratch[c * rows * N + i];
      y[r0 * N + i] = sum;
    }
  }
}

// y[r, n0 + c] = sum over k of x[r, k] * w[n0 + c, k] for R rows of x and C rows of w from n0:
// each sum kept in 16 lanes over k in order, 16 at a time (a tail past the last 16 added to lane
// 0), then the lanes added by SumEachOf16's tree. One fixed order whatever M, the other rows or
// the threads.
template <int R, int C>
void DotGroup(const float* x, const float* w, int64_t K, int64_t N, int64_t n0, float* y) {
  V16 sums[16] = {};
  const int64_t vector_end = K / 16 * 16;
  for (int64_t k = 0; k < vector_end; k += 16) {
    V16 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = LoadV(w + (n0 + c) * K + k);
    for (int r = 0; r < R; ++r) {
      const V16 xv = LoadV(x + r * K + k);
      for (int c = 0; c < C; ++c) sums[r * 4 + c] += xv * wv[c];
    }
  }
  for (int64_t k = vector_end; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) sums[r * 4 + c][0] += x[r * K + k] * w[(n0 + c) * K + k];
  const V16 total = SumEachOf16(sums);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * N + n0 + c] = total[r * 4 + c];
}

constexpr int64_t kColumnsPerItem = 64;  // rows of w (output columns) per work item of MatmulTransposed

// y [M, N] = x [M, K] @ w.T for w [N, K] with M <= 4 (an embedding table used as the LM head: each
// output column's weights one contiguous row). Work items of kColumnsPerItem rows of w, shared
// with the helper threads; each group of 4 rows of w is read once for all M rows of x.
void MatmulTransposed(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y) {
  const int64_t items = (N + kColumnsPerItem - 1) / kColumnsPerItem;
  ParallelFor(items, kNoSpin, [&](int64_t item) {
    const int64_t end = std::min(N, (item + 1) * kColumnsPerItem);
    for (int64_t n0 = item * kColumnsPerItem; n0 < end; n0 += 4) {
      WithCount(M, [&](auto r) {
        WithCount(std::min<int64_t>(4, end - n0), [&](auto c) { DotGroup<r, c>(x, w, K, N, n0, y); });
      });
    }
  });
}

// Arguments: x [M, K] and w, float32: [K, N], or [N, K] with kTransposed (then 1 <= M <= 4);
// result: [M, N] float32, x @ w (or x @ w.T).
template <bool kTransposed>
XLA_FFI_Error* Handle(XLA_FFI_CallFrame* frame) {
  const XLA_FFI_Api* api = frame->api;
  if (IsMetadataQuery(frame)) return DescribeHandler(frame);
  if (const char* problem = FrameProblem(frame, 2, 0)) return Fail(api, problem);
  const XLA_FFI_Buffer *x = Buffer(frame->args.args[0]), *w = Buffer(frame->args.args[1]),
                       *y = Buffer(frame->rets.rets[0]);
  if (x->rank != 2 || w->rank != 2 || y->rank != 2) return Fail(api, "x, w and the result must be matrices");
  if (x->dtype != XLA_FFI_DataType_F32 || w->dtype != XLA_FFI_DataType_F32 || y->dtype != XLA_FFI_DataType_F32)
    return Fail(api, "x, w and the result must be float32");
  const int64_t M = x->dims[0], K = x->dims[1], N = w->dims[kTransposed ? 0 : 1];
  if (w->dims[kTransposed ? 1 : 0] != K || y->dims[0] != M || y->dims[1] != N)
    return Fail(api, kTransposed ? "shapes must be [M, K] @ [N, K].T -> [M, N]" : "shapes must be [M, K] @ [K, N] -> [M, N]");
  const float *xs = static_cast<const float*>(x->data), *ws = static_cast<const float*>(w->data);
  if (!kTransposed) {
    Matmul(xs, ws, M, K, N, static_cast<float*>(y->data));
  } else if (M >= 1 && M <= 4) {
    MatmulTransposed(xs, ws, M, K, N, static_cast<float*>(y->data));
  } else {
    return Fail(api, "x must have 1 to 4 rows");
  }
  return nullptr;
}

}  // namespace

extern "C" XLA_FFI_Error* JpagedFloatMatmul(XLA_FFI_CallFrame* frame) { return Handle<false>(frame); }

extern "C" XLA_FFI_Error* JpagedFloatMatmulTransposed(XLA_FFI_CallFrame* frame) { return Handle<true>(frame); }
