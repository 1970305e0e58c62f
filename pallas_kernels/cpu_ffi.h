// What the CPU kernels share: XLA's FFI C API (a fraction of ffi.h's compile time), XLA's
// intra-op thread pool, errors, and buffer access. Included by each kernel source; the kernels
// are built into one library by cpu_kernels.py.

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/c_api.h"

namespace jpaged_cpu {

// GCC/Clang vector extensions: one 16-float register on AVX-512, two on AVX2, four on NEON.
typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));

inline V16 LoadV(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreV(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }

// The 16 bytes at p as int32 lanes, sign-extended (kSigned) or zero-extended. GCC scalarises
// __builtin_convertvector from a vector of bytes, so AVX-512 and AVX2 widen with intrinsics.
template <bool kSigned>
inline I16 ExtendBytes(const void* p) {
  I16 out;
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m512i lanes = kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  std::memcpy(&out, &lanes, sizeof(out));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(p));
  const __m128i upper = _mm_srli_si128(bytes, 8);
  const __m256i halves[2] = {kSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes),
                             kSigned ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper)};
  std::memcpy(&out, halves, sizeof(out));
#else
  for (int i = 0; i < 16; ++i)
    out[i] = kSigned ? static_cast<const int8_t*>(p)[i] : static_cast<const uint8_t*>(p)[i];
#endif
  return out;
}

// 16 int8 values from p as float32 (exact).
inline V16 Int8x16ToFloat(const int8_t* p) { return __builtin_convertvector(ExtendBytes<true>(p), V16); }

// 16 float8_e4m3fn values, given as their bits, from p as float32 times 2^-8 (exact). e4m3 is a
// sign, 4 exponent bits (bias 7) and 3 mantissa bits. With AVX-512 the bytes are sign-extended to
// 16 bits and moved up 7 places: bit 15 is then the sign, bits 13-7 the exponent and mantissa,
// and with bit 14 (a copy of the sign) cleared they are the float16 of the value times 2^-8
// (5 exponent bits, bias 15), subnormals included, which the conversion to float32 keeps (it
// ignores denormal flushing). Otherwise: for a normal value, its exponent and mantissa bits moved
// up 20 places, with 127 - 7 - 8 added to the exponent, are the float32 of the same number times
// 2^-8; a subnormal one (exponent 0) is its mantissa times 2^-17, made without float32 subnormals
// (which a thread that flushes denormals would zero). The NaN bits (0x7f, 0xff), which no value
// quantized to +-448 has, read as +-480 (times 2^-8).
inline V16 E4M3x16ToFloatOver256(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i half = _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(static_cast<int16_t>(0xbf80)));
  const __m512 wide = _mm512_cvtph_ps(half);
  V16 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
#else
  const I16 bits = ExtendBytes<false>(p);
  const I16 magnitude = bits & 0x7f;
  const V16 subnormal = __builtin_convertvector(magnitude, V16) * (1.0f / 131072.0f);
  I16 subnormal_bits;
  std::memcpy(&subnormal_bits, &subnormal, sizeof(subnormal_bits));
  const I16 normal_bits = (magnitude << 20) + (112 << 23);
  const I16 word = (magnitude < 8 ? subnormal_bits : normal_bits) | ((bits & 0x80) << 24);
  V16 out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
#endif
}

// 16 float8_e4m3fn values from p as float32 (exact).
inline V16 E4M3x16ToFloat(const uint8_t* p) { return E4M3x16ToFloatOver256(p) * 256.0f; }

// Lane t of the result is the sum of the 16 lanes of p[t] (a transpose-and-add tree).
inline V16 SumEachOf16(const V16 (&p)[16]) {
  V16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const V16 d = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(d, d, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// SumEachOf16 of the transpose of p: lane t of the result is the sum over l of p[l][t], added in
// SumEachOf16's order, so that the two give the same float32 sums.
inline V16 SumOf16Transposed(const V16 (&p)[16]) {
  return (((p[0] + p[8]) + (p[4] + p[12])) + ((p[2] + p[10]) + (p[6] + p[14]))) +
         (((p[1] + p[9]) + (p[5] + p[13])) + ((p[3] + p[11]) + (p[7] + p[15])));
}

// XLA's intra-op thread pool for this call, through the C API.
class ThreadPool {
 public:
  ThreadPool(const XLA_FFI_Api* api, XLA_FFI_ExecutionContext* ctx) : api_(api), ctx_(ctx) {}

  int64_t num_threads() const {
    int64_t n = 0;
    XLA_FFI_ThreadPool_NumThreads_Args args{XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE, nullptr, ctx_, &n};
    if (XLA_FFI_Error* error = api_->XLA_FFI_ThreadPool_NumThreads(&args)) {
      Destroy(error);
      return 0;
    }
    return n;
  }

  // Runs `task` on a pool thread, or here when there is no pool.
  template <typename F>
  void Schedule(F task) {
    auto* data = new F(std::move(task));
    XLA_FFI_Task* run = +[](void* p) {
      auto* f = static_cast<F*>(p);
      (*f)();
      delete f;
    };
    XLA_FFI_ThreadPool_Schedule_Args args{XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE, nullptr, ctx_, run, data};
    if (XLA_FFI_Error* error = api_->XLA_FFI_ThreadPool_Schedule(&args)) {
      Destroy(error);
      run(data);
    }
  }

 private:
  void Destroy(XLA_FFI_Error* error) const {
    XLA_FFI_Error_Destroy_Args args{XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, nullptr, error};
    api_->XLA_FFI_Error_Destroy(&args);
  }

  const XLA_FFI_Api* api_;
  XLA_FFI_ExecutionContext* ctx_;
};

// Runs `work(i)` for i in [0, count) on the calling thread and up to `pool.num_threads()` pool
// threads. Helpers that start after every item is taken do nothing, so the call never waits on a
// thread that is busy elsewhere (or is the caller itself).
template <typename F>
void ParallelFor(ThreadPool& pool, int64_t count, F work) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto run = [state, count, work]() {
    int64_t finished_here = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < count; ++finished_here) work(i);
    if (finished_here && state->done.fetch_add(finished_here) + finished_here == count) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(run);
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == count; });
}

inline XLA_FFI_Error* Fail(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args{XLA_FFI_Error_Create_Args_STRUCT_SIZE, nullptr, message,
                                 XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return api->XLA_FFI_Error_Create(&args);
}

// Tells XLA which FFI version the handler was built against (asked once, at registration).
inline XLA_FFI_Error* DescribeHandler(XLA_FFI_Metadata_Extension* extension) {
  XLA_FFI_Metadata* metadata = extension->metadata;
  metadata->api_version = XLA_FFI_Api_Version{XLA_FFI_Api_Version_STRUCT_SIZE, nullptr, XLA_FFI_API_MAJOR,
                                              XLA_FFI_API_MINOR};
  metadata->traits = 0;
  metadata->state_type_id = XLA_FFI_UNKNOWN_TYPE_ID;
  return nullptr;
}

inline const XLA_FFI_Buffer* Buffer(void* p) { return static_cast<const XLA_FFI_Buffer*>(p); }

inline const int32_t* Int32s(const XLA_FFI_Buffer* b) { return static_cast<const int32_t*>(b->data); }

}  // namespace jpaged_cpu
