// Weight-only quantized matmul for CPUs, as an XLA FFI custom call (built and loaded by
// cpu_kernels.py; the pure-jnp reference is quantized_matmul.py).
//
// out [M, N] float32 = (x [M, K] float32 @ w.T) * scale [N], with w [N, K] (one row of K weights
// per output column, as checkpoints store them) int8 or float8_e4m3fn and one scale per output
// column. The weights are read once, at their own width, and widened to float32 in registers: a
// decode step then moves a quarter of float32's bytes.
//
// Work items are blocks of 16 output columns (16 contiguous weight rows), shared by the calling
// thread and XLA's intra-op pool. For each row of x, the 16 dot products are summed lane-wise over
// K in chunks of 16, then across lanes (SumEachOf16), then the K % 16 tail one by one. With few
// rows of x each weight is widened as it is used; with more, the block is widened once into a
// scratch buffer that stays in cache while every row passes over it. Either way each output is
// the same sequence of float32 operations, so a row's result does not depend on the other rows.

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_ffi.h"

namespace {

using namespace jpaged_cpu;

constexpr int64_t kLanes = 16;
constexpr int64_t kRowGroup = 4;  // rows whose accumulators share a pass over the tile
constexpr int64_t kDirectRows = 4;
constexpr int64_t kPrefetchRows = 16;
constexpr int kWideVectors = 4;

// 16 bytes from p, sign- or zero-extended to 32 bits (compilers scalarise the generic form).
template <bool kSigned>
inline I16 Extend(const void* p) {
  I16 out;
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m512i wide = kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  std::memcpy(&out, &wide, sizeof(out));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m256i low = kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
  const __m256i high = kSigned ? _mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)) : _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  std::memcpy(&out, &low, sizeof(low));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(low), &high, sizeof(high));
#else
  for (int i = 0; i < kLanes; ++i)
    out[i] = kSigned ? static_cast<const int8_t*>(p)[i] : static_cast<const uint8_t*>(p)[i];
#endif
  return out;
}

struct Int8 {
  typedef int8_t Stored;
  static V16 Widen(const int8_t* p) { return __builtin_convertvector(Extend<true>(p), V16); }
  static float WidenOne(int8_t v) { return static_cast<float>(v); }
};

// float8_e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities. A normal value's
// exponent and mantissa bits shifted into float32's positions, with 127 - 7 added to the
// exponent, are the same number; subnormals (exponent 0) are mantissa * 2^-9. NaN (0x7f / 0xff)
// does not occur in weights quantized by jpaged (they are clipped to +-448).
struct Fp8E4M3 {
  typedef uint8_t Stored;
  static V16 Widen(const uint8_t* p) {
    const I16 x = Extend<false>(p);
    const I16 magnitude = x & 0x7f;
    const I16 normal = (magnitude << 20) + (120 << 23);
    const V16 subnormal_value = __builtin_convertvector(magnitude, V16) * (1.0f / 512.0f);
    I16 subnormal;
    std::memcpy(&subnormal, &subnormal_value, sizeof(subnormal));
    const I16 bits = (magnitude < 8 ? subnormal : normal) | ((x & 0x80) << 24);
    V16 out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static float WidenOne(uint8_t v) {
    const uint8_t lanes[kLanes] = {v};
    return Widen(lanes)[0];
  }
};

struct Shapes {
  int64_t m, k, n;
};

// out[r, j0 + t] for t < count (at most 16) and every row r of x; `weights(t, k)` gives 16
// widened weights of column j0 + t from k (a multiple of 16 below K rounded down to 16).
template <bool kFull, typename Format, typename Weights>
void MultiplyColumns(const float* x, const typename Format::Stored* w, const float* scale, const Shapes& s,
                     int64_t j0, int64_t count, Weights weights, float* out) {
  const int64_t vector_k = s.k / kLanes * kLanes;
  for (int64_t r = 0; r < s.m; ++r) {
    const float* xr = x + r * s.k;
    V16 partial[kLanes] = {};
    for (int64_t k = 0; k < vector_k; k += kLanes) {
      const V16 xv = LoadV(xr + k);
      for (int64_t t = 0; t < kLanes; ++t)
        if (kFull || t < count) partial[t] += xv * weights(t, k);
    }
    const V16 sums = SumEachOf16(partial);
    for (int64_t t = 0; t < count; ++t) {
      float sum = sums[t];
      for (int64_t k = vector_k; k < s.k; ++k) sum += xr[k] * Format::WidenOne(w[(j0 + t) * s.k + k]);
      out[r * s.n + j0 + t] = sum * scale[j0 + t];
    }
  }
}

template <typename Format>
void MultiplyBlock(const float* x, const typename Format::Stored* w, const float* scale, const Shapes& s, int64_t j0,
                   float* out) {
  const int64_t count = std::min<int64_t>(kLanes, s.n - j0);
  const int64_t vector_k = s.k / kLanes * kLanes;
  auto run = [&](auto weights) {
    if (count == kLanes)
      MultiplyColumns<true, Format>(x, w, scale, s, j0, count, weights, out);
    else
      MultiplyColumns<false, Format>(x, w, scale, s, j0, count, weights, out);
  };
  if (s.m <= kDirectRows) {
    run([&](int64_t t, int64_t k) { return Format::Widen(w + (j0 + t) * s.k + k); });
    return;
  }
  thread_local std::vector<float> scratch;
  scratch.resize(kLanes * vector_k);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t k = 0; k < vector_k; k += kLanes) StoreV(&scratch[t * vector_k + k], Format::Widen(w + (j0 + t) * s.k + k));
  const float* widened = scratch.data();
  run([&](int64_t t, int64_t k) { return LoadV(widened + t * vector_k + k); });
}

template <typename Format>
void Multiply(ThreadPool& pool, const float* x, const typename Format::Stored* w, const float* scale, const Shapes& s,
              float* out) {
  // Work items of several blocks where there are enough to keep every thread busy.
  const int64_t blocks = (s.n + kLanes - 1) / kLanes;
  const int64_t per_item = blocks >= 32 ? 4 : 1;
  ParallelFor(pool, (blocks + per_item - 1) / per_item, [&](int64_t i) {
    for (int64_t b = i * per_item; b < std::min(blocks, (i + 1) * per_item); ++b)
      MultiplyBlock<Format>(x, w, scale, s, b * kLanes, out);
  });
}

}  // namespace

// Arguments: x [M, K] float32, w [N, K] int8 or float8_e4m3fn, scale [N] float32; result [M, N]
// float32.
extern "C" XLA_FFI_Error* JpagedQuantizedMatmul(XLA_FFI_CallFrame* frame) {
  const XLA_FFI_Api* api = frame->api;
  if (frame->extension_start != nullptr && frame->extension_start->type == XLA_FFI_Extension_Metadata)
    return DescribeHandler(reinterpret_cast<XLA_FFI_Metadata_Extension*>(frame->extension_start));
  if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return Fail(api, "called outside the execute stage");
  if (frame->args.size != 3 || frame->rets.size != 1) return Fail(api, "expects 3 arguments and 1 result");
  for (int64_t i = 0; i < 3; ++i)
    if (frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return Fail(api, "arguments must be arrays");
  if (frame->rets.types[0] != XLA_FFI_RetType_BUFFER) return Fail(api, "result must be an array");
  const XLA_FFI_Buffer *x = Buffer(frame->args.args[0]), *w = Buffer(frame->args.args[1]),
                       *scale = Buffer(frame->args.args[2]), *out = Buffer(frame->rets.rets[0]);
  if (x->rank != 2 || w->rank != 2 || scale->rank != 1 || out->rank != 2)
    return Fail(api, "x, w, scale or the result of the wrong rank");
  const Shapes s{x->dims[0], x->dims[1], w->dims[0]};
  if (w->dims[1] != s.k || scale->dims[0] != s.n || out->dims[0] != s.m || out->dims[1] != s.n)
    return Fail(api, "x, w, scale and the result do not agree in shape");
  if (x->dtype != XLA_FFI_DataType_F32 || scale->dtype != XLA_FFI_DataType_F32 || out->dtype != XLA_FFI_DataType_F32)
    return Fail(api, "x, scale and the result must be float32");
  ThreadPool pool(api, frame->ctx);
  const float* xs = static_cast<const float*>(x->data);
  const float* scales = static_cast<const float*>(scale->data);
  float* result = static_cast<float*>(out->data);
  if (w->dtype == XLA_FFI_DataType_S8)
    Multiply<Int8>(pool, xs, static_cast<const int8_t*>(w->data), scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_F8E4M3FN)
    Multiply<Fp8E4M3>(pool, xs, static_cast<const uint8_t*>(w->data), scales, s, result);
  else
    return Fail(api, "w must be int8 or float8_e4m3fn");
  return nullptr;
}
