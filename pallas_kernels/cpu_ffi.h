// What the CPU kernels share: XLA's FFI C API (a fraction of ffi.h's compile time), helper
// threads, errors, and buffer access. Included by each kernel source; the kernels
// are built into one library by cpu_kernels.py.

#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string_view>
#include <thread>
#include <type_traits>

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

// Helper threads of the kernels' own, one per processor the process may run on but one. A step
// calls the kernels hundreds of times, tens of microseconds apart; waking a sleeping thread for
// each call costs about as much as it saves (a one-row product with a 576 x 576 int8 weight took
// 19 us on one thread of XLA's intra-op pool, 27 on two). So a helper keeps spinning after a job
// for as long as its call asks (a kernel whose next call comes soon, with no XLA work between,
// asks for 100 us; one followed by XLA's own matmuls asks for none, as a spinning helper would
// hold a processor they want), and a call never waits for one to wake: it opens its work items
// to whichever helpers are awake, wakes the sleeping ones for the calls that follow, and works
// through the items itself. One call at a time has the helpers; a concurrent one (another
// emulated device, another replica) runs alone.
class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads outlive main's return
    return *helpers;
  }

  // Runs work(i) for every i in [0, count), here and on the helpers awake; returns when all are
  // done. The helpers then spin for spin_micros before they sleep.
  template <typename F>
  void Run(int64_t count, F& work, int64_t spin_micros) {
    if (count <= 1 || threads_ == 0 || owned_.exchange(true)) {
      for (int64_t i = 0; i < count; ++i) work(i);
      return;
    }
    spin_micros_.store(spin_micros);
    job_.run = +[](void* f, int64_t i) { (*static_cast<F*>(f))(i); };
    job_.work = &work;
    job_.count = count;
    job_.next.store(0);
    ticket_.fetch_add(1);  // odd: open
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    TakeItems();
    ticket_.fetch_add(1);  // even: closed; helpers inside finish the items they took
    while (inside_.load() > 0) Pause();
    owned_.store(false);
  }

 private:
  struct Job {
    void (*run)(void* work, int64_t i);
    void* work;
    int64_t count;
    std::atomic<int64_t> next;
  };

  Helpers() {
    cpu_set_t cpus;
    const int available = sched_getaffinity(0, sizeof(cpus), &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
    threads_ = std::max(0, available - 1);
    for (int t = 0; t < threads_; ++t) std::thread([this] { Loop(); }).detach();
  }

  static void Pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  void TakeItems() {
    for (int64_t i; (i = job_.next.fetch_add(1)) < job_.count;) job_.run(job_.work, i);
  }

  void Loop() {
    uint64_t seen = ticket_.load();
    for (;;) {
      auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_micros_.load());
      uint64_t ticket;
      while ((ticket = ticket_.load()) == seen || ticket % 2 == 0) {
        seen = ticket;  // a job that closed before this thread saw it open is not joined
        if (std::chrono::steady_clock::now() < deadline) {
          sched_yield();  // a thread of XLA's own pool that wants this processor gets it
          continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return ticket_.load() != seen && ticket_.load() % 2 == 1; });
        sleeping_.fetch_sub(1);
        deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_micros_.load());
      }
      inside_.fetch_add(1);
      if (ticket_.load() == ticket) TakeItems();  // else it closed meanwhile: job_ is not ours to read
      inside_.fetch_sub(1);
      seen = ticket;
    }
  }

  int threads_ = 0;
  std::atomic<bool> owned_{false};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> inside_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int64_t> spin_micros_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  Job job_;
};

// How long helpers wait for a next call after a kernel's (see Helpers): a quantized product is
// followed by the next one within tens of microseconds, attention by XLA's own matmuls.
constexpr int64_t kSpinToNextProduct = 100;
constexpr int64_t kNoSpin = 0;

// Runs `work(i)` for i in [0, count) on the calling thread and the helpers awake, which then
// spin for `spin_micros` waiting for the next call before they sleep.
template <typename F>
void ParallelFor(int64_t count, int64_t spin_micros, F work) {
  Helpers::Get().Run(count, work, spin_micros);
}

inline XLA_FFI_Error* Fail(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args{XLA_FFI_Error_Create_Args_STRUCT_SIZE, nullptr, message,
                                 XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return api->XLA_FFI_Error_Create(&args);
}

// Answers XLA's metadata query (`IsMetadataQuery(frame)`, asked once, at registration): which FFI
// version the handler was built against.
inline XLA_FFI_Error* DescribeHandler(XLA_FFI_CallFrame* frame) {
  XLA_FFI_Metadata* metadata = reinterpret_cast<XLA_FFI_Metadata_Extension*>(frame->extension_start)->metadata;
  metadata->api_version = XLA_FFI_Api_Version{XLA_FFI_Api_Version_STRUCT_SIZE, nullptr, XLA_FFI_API_MAJOR,
                                              XLA_FFI_API_MINOR};
  metadata->traits = 0;
  metadata->state_type_id = XLA_FFI_UNKNOWN_TYPE_ID;
  return nullptr;
}

// f(std::integral_constant<int, n>{}) for a run-time count n from 1 to 4, so that a kernel gets it
// as a template argument and keeps its per-count sums in registers.
template <typename F>
inline void WithCount(int64_t n, F f) {
  switch (n) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// Whether `frame` is XLA's query of the handler's metadata (answered by DescribeHandler) rather than a call.
inline bool IsMetadataQuery(const XLA_FFI_CallFrame* frame) {
  return frame->extension_start != nullptr && frame->extension_start->type == XLA_FFI_Extension_Metadata;
}

// Why `frame` is not an execution with `args` array arguments, one array result and `attrs`
// scalar attributes, or nullptr.
inline const char* FrameProblem(const XLA_FFI_CallFrame* frame, int64_t args, int64_t attrs) {
  if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return "called outside the execute stage";
  if (frame->args.size != args || frame->rets.size != 1 || frame->attrs.size != attrs)
    return "wrong number of arguments, results or attributes";
  for (int64_t i = 0; i < args; ++i)
    if (frame->args.types[i] != XLA_FFI_ArgType_BUFFER) return "arguments must be arrays";
  if (frame->rets.types[0] != XLA_FFI_RetType_BUFFER) return "the result must be an array";
  for (int64_t i = 0; i < attrs; ++i)
    if (frame->attrs.types[i] != XLA_FFI_AttrType_SCALAR) return "attributes must be scalars";
  return nullptr;
}

inline const XLA_FFI_Buffer* Buffer(void* p) { return static_cast<const XLA_FFI_Buffer*>(p); }

// The scalar attribute `name`, or nullptr.
inline const XLA_FFI_Scalar* ScalarAttr(const XLA_FFI_CallFrame* frame, std::string_view name) {
  for (int64_t i = 0; i < frame->attrs.size; ++i) {
    const XLA_FFI_ByteSpan* key = frame->attrs.names[i];
    if (std::string_view(key->ptr, key->len) == name) return static_cast<const XLA_FFI_Scalar*>(frame->attrs.attrs[i]);
  }
  return nullptr;
}

inline const int32_t* Int32s(const XLA_FFI_Buffer* b) { return static_cast<const int32_t*>(b->data); }

}  // namespace jpaged_cpu
