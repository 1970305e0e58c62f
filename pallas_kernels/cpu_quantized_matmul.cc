// Weight-only quantized matmul for CPUs, as an XLA FFI custom call (built and loaded by
// cpu_kernels.py; the pure-jnp reference is quantized_matmul.py).
//
// out [M, N] float32 = x [M, K] float32 @ (w * scale).T, with w [N, K] (one row of K weights per
// output column, as checkpoints store them) int8 or float8_e4m3fn and scale [N, G] float32, one
// per output column and group of 32 inputs (G = K / 32), or per output column (G = 1). The
// weights are read once, at their own width, and widened to float32 in registers: a decode step
// then moves about a quarter of float32's bytes.
//
// Work items are blocks of 16 output columns (16 contiguous weight rows), shared by the calling
// thread and the kernels' helper threads (cpu_ffi.h). With few rows of x, each row's 16 dot
// products are summed lane-wise over K in chunks of 16 with the weights widened as they are read
// (and asked for ahead of use with prefetches; each chunk widened once for all the rows), then
// across lanes (SumEachOf16), then the K % 16 tail one by one. With more rows, a work item's
// blocks are widened once into a lane-major scratch buffer and groups of 12 rows pass over it,
// each row value broadcast against 16 columns at a time: the same lane-wise partial sums,
// transposed, added across lanes in the same order (SumOf16Transposed). Either way each output is
// the same sequence of float32 operations, so a row's result does not depend on the other rows.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_ffi.h"

namespace {

using namespace jpaged_cpu;

constexpr int64_t kLanes = 16;
constexpr int64_t kDirectRows = 6;  // up to this many rows of x, weights are widened as they are used

inline float HalfToFloat(const uint8_t* p) {  // IEEE half, little-endian, exact
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    const uint32_t bits = exponent == 31 ? 0x7f800000 | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13);
    std::memcpy(&magnitude, &bits, sizeof(magnitude));
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof(bits));
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Weight formats. Each widens the kVectors * 16 weights from k of one output channel's row of
// `RowBytes(K)` bytes; K must be a multiple of kBlock. Formats with separate scales (kScaled)
// multiply by the given scale of the weights' group (GroupScale); block formats carry their scales
// inside the row and ignore it.
struct Int8 {
  static constexpr int64_t kBlock = 1;
  static constexpr int kVectors = 1;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = 1.0f;  // Widen's bytes are the stored values over this
  static int64_t RowBytes(int64_t k) { return k; }
  static void Widen(const uint8_t* row, int64_t k, float scale, V16* out) {
    out[0] = Int8x16ToFloat(reinterpret_cast<const int8_t*>(row + k)) * scale;
  }
  static float WidenOne(const uint8_t* row, int64_t k) { return static_cast<float>(static_cast<int8_t>(row[k])); }
};

// float8_e4m3fn, widened to its value over 256 (cpu_ffi.h's E4M3x16ToFloatOver256, a conversion
// step fewer) and the scale taken 256 times: the same float32 result, as both factors are powers
// of two. NaN (0x7f / 0xff) does not occur in weights quantized by jpaged (they are clipped to +-448).
struct Fp8E4M3 {
  static constexpr int64_t kBlock = 1;
  static constexpr int kVectors = 1;
  static constexpr bool kScaled = true;
  static constexpr float kUnit = 256.0f;
  static int64_t RowBytes(int64_t k) { return k; }
  static void Widen(const uint8_t* row, int64_t k, float scale, V16* out) { out[0] = WidenBytes(row + k) * scale; }
  static V16 WidenBytes(const uint8_t* p) { return E4M3x16ToFloatOver256(p); }
  static float WidenOne(const uint8_t* row, int64_t k) {
    uint8_t lanes[kLanes] = {row[k]};
    return WidenBytes(lanes)[0];
  }
};

// GGML's 32-weight blocks (llama.cpp's ggml-quants): Q8_0 = half d, 32 int8 q, w = d * q;
// Q4_0 = half d, 16 bytes of nibbles, w = d * (q - 8); Q4_1 = half d, half m, nibbles,
// w = d * q + m. In a nibble block, weight j < 16 is byte j's low nibble, weight j + 16 its high one.
struct Q8_0 {
  static constexpr int64_t kBlock = 32;
  static constexpr int kVectors = 2;
  static constexpr bool kScaled = false;
  static int64_t RowBytes(int64_t k) { return k / kBlock * 34; }
  static void Widen(const uint8_t* row, int64_t k, float, V16* out) {
    const uint8_t* block = row + k / kBlock * 34;
    const float d = HalfToFloat(block);
    out[0] = __builtin_convertvector(ExtendBytes<true>(block + 2), V16) * d;
    out[1] = __builtin_convertvector(ExtendBytes<true>(block + 18), V16) * d;
  }
  static float WidenOne(const uint8_t*, int64_t) { return 0.0f; }  // K is a multiple of the block
};

template <int kHeader, int kOffset>
struct Nibbles {
  static constexpr int64_t kBlock = 32;
  static constexpr int kVectors = 2;
  static constexpr bool kScaled = false;
  static constexpr int64_t kBytes = kHeader + 16;
  static int64_t RowBytes(int64_t k) { return k / kBlock * kBytes; }
  static void Widen(const uint8_t* row, int64_t k, float, V16* out) {
    const uint8_t* block = row + k / kBlock * kBytes;
    const I16 bytes = ExtendBytes<false>(block + kHeader);
    const float d = HalfToFloat(block);
    out[0] = __builtin_convertvector((bytes & 0xf) - kOffset, V16) * d;
    out[1] = __builtin_convertvector((bytes >> 4) - kOffset, V16) * d;
    if (kHeader == 4) {
      const float m = HalfToFloat(block + 2);
      out[0] += m;
      out[1] += m;
    }
  }
  static float WidenOne(const uint8_t*, int64_t) { return 0.0f; }
};
using Q4_0 = Nibbles<2, 8>;
using Q4_1 = Nibbles<4, 0>;

// GGML's K-quants: super-blocks of 256 weights with a float16 d (and dmin) and integer scales for
// their sub-blocks. Each Widen covers 32 weights at k (a multiple of 32) of one super-block.
//
// Q4_K (144 bytes) = half d, half dmin, 12 bytes of 6-bit scales and minimums for 8 sub-blocks of
// 32, 128 bytes of nibbles; w = d * scale * q - dmin * min. Bytes 32 g .. 32 g + 31 of the
// nibbles hold sub-block 2 g in their low nibbles and 2 g + 1 in their high ones. Q5_K (176
// bytes) puts 32 bytes qh before the nibbles: bit j of qh byte l is the fifth bit (16) of weight
// l of sub-block j. Of the 12 bytes of scales, sub-block j < 4 has the low 6 bits of byte j
// (scale) and j + 4 (minimum); j >= 4 has byte j + 4's low (scale) and high (minimum) nibble, with
// the top two bits of bytes j - 4 and j above them.
inline void ScaleAndMin(const uint8_t* packed, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = (packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4);
    *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

template <bool kHighBits>
struct KQuant {
  static constexpr int64_t kBlock = 256;
  static constexpr int kVectors = 2;
  static constexpr bool kScaled = false;
  static constexpr int64_t kBytes = kHighBits ? 176 : 144;
  static int64_t RowBytes(int64_t k) { return k / kBlock * kBytes; }
  static void Widen(const uint8_t* row, int64_t k, float, V16* out) {
    const uint8_t* block = row + k / kBlock * kBytes;
    const int j = k % kBlock / 32;
    int scale, min;
    ScaleAndMin(block + 4, j, &scale, &min);
    const float d = HalfToFloat(block) * scale, m = HalfToFloat(block + 2) * min;
    const uint8_t* nibbles = block + (kHighBits ? 48 : 16) + j / 2 * 32;
    const int shift = j % 2 * 4;
    for (int v = 0; v < 2; ++v) {
      I16 q = (ExtendBytes<false>(nibbles + v * kLanes) >> shift) & 0xf;
      if (kHighBits) q |= ((ExtendBytes<false>(block + 16 + v * kLanes) >> j) & 1) << 4;
      out[v] = __builtin_convertvector(q, V16) * d - m;
    }
  }
  static float WidenOne(const uint8_t*, int64_t) { return 0.0f; }
};
using Q4_K = KQuant<false>;
using Q5_K = KQuant<true>;

// Q6_K (210 bytes) = 128 bytes ql, 64 bytes qh, 16 int8 scales (one per 16 weights), half d;
// w = d * scale * (q - 32) with q of 6 bits. In half h of the super-block, weight 32 i + l (i < 4,
// l < 32) has the low (i < 2) or high nibble of ql byte 64 h + 32 (i % 2) + l and, as bits 4-5,
// bits 2 i and 2 i + 1 of qh byte 32 h + l.
struct Q6_K {
  static constexpr int64_t kBlock = 256;
  static constexpr int kVectors = 2;
  static constexpr bool kScaled = false;
  static int64_t RowBytes(int64_t k) { return k / kBlock * 210; }
  static void Widen(const uint8_t* row, int64_t k, float, V16* out) {
    const uint8_t* block = row + k / kBlock * 210;
    const int c = k % kBlock / 32, h = c / 4, i = c % 4;
    const float d = HalfToFloat(block + 208);
    const uint8_t* ql = block + 64 * h + 32 * (i % 2);
    const uint8_t* qh = block + 128 + 32 * h;
    for (int v = 0; v < 2; ++v) {
      const I16 low = (ExtendBytes<false>(ql + v * kLanes) >> (i / 2 * 4)) & 0xf;
      const I16 high = (ExtendBytes<false>(qh + v * kLanes) >> (2 * i)) & 3;
      const float scale = d * static_cast<int8_t>(block[192 + 2 * c + v]);
      out[v] = __builtin_convertvector((low | (high << 4)) - 32, V16) * scale;
    }
  }
  static float WidenOne(const uint8_t*, int64_t) { return 0.0f; }
};

struct Shapes {
  int64_t m, k, n;
  int64_t groups;  // scales per output column of a kScaled format: 1, or K / kGroupSize
};

constexpr int64_t kGroupSize = 32;

// The factor Widen applies to the 16 weights at k of column j: its group's scale (times the
// format's unit), or 1 for a block format.
template <typename Format>
inline float GroupScale(const float* scale, const Shapes& s, int64_t j, int64_t k) {
  if constexpr (Format::kScaled) return scale[j * s.groups + (s.groups == 1 ? 0 : k / kGroupSize)] * Format::kUnit;
  return 1.0f;
}

// out[r, j0 + t] = sum[t] + the K % 16 tail of column j0 + t (only where K is not a multiple of a
// group: then the column has one scale).
template <typename Format>
void Finish(const float* xr, const uint8_t* w, const float* scale, const Shapes& s, int64_t j0, int64_t count,
            const V16& sums, float* out_row) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t vector_k = s.k / kChunk * kChunk, row_bytes = Format::RowBytes(s.k);
  for (int64_t t = 0; t < count; ++t) {
    float sum = sums[t];
    for (int64_t k = vector_k; k < s.k; ++k)
      sum += xr[k] * (Format::WidenOne(w + (j0 + t) * row_bytes, k) * GroupScale<Format>(scale, s, j0 + t, k));
    out_row[j0 + t] = sum;
  }
}

// How far ahead of its reads the few-rows path asks for weights (prefetcht2), in bytes. A
// decode step reads each weight once, from memory: without the prefetches one thread streamed
// int8 weights at about 8 GB/s, with them at about 23 (two threads: 15 and 30, near what this
// VM's memory gives to two threads reading one array).
constexpr int64_t kPrefetchBytes = 64 << 10;

// How many of x's rows a few-rows pass of at most kRows takes: all of them (kRows == 1 lets the
// compiler know there is one).
template <int kRows>
inline int64_t DirectRows(const Shapes& s) {
  return kRows == 1 ? 1 : std::min<int64_t>(s.m, kRows);
}

// The 16 lane-wise partial sums of each of x's rows (at most kRows) over k0 .. k1 (whole groups
// of kChunks chunks) with columns j0.. (count of them), the weights widened as they are read, a
// column's chunks one after another (about a cache line of its weights) and used for every row
// before the next; the weights kPrefetchBytes on are asked for meanwhile.
template <bool kFull, typename Format, int kChunks, int kRows>
void DirectSums(const float* x, const uint8_t* w, const float* scale, const Shapes& s, int64_t j0, int64_t count,
                int64_t k0, int64_t k1, V16 (&partial)[kRows][kLanes]) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t row_bytes = Format::RowBytes(s.k), rows = DirectRows<kRows>(s);
  for (int64_t k = k0; k < k1; k += kChunks * kChunk) {
    V16 xv[kRows][kChunks][Format::kVectors];
    for (int64_t r = 0; r < rows; ++r)
      for (int c = 0; c < kChunks; ++c)
        for (int v = 0; v < Format::kVectors; ++v) xv[r][c][v] = LoadV(x + r * s.k + k + c * kChunk + v * kLanes);
    for (int64_t t = 0; t < kLanes; ++t) {
      if (!kFull && t >= count) continue;
      const uint8_t* row = w + (j0 + t) * row_bytes;
      __builtin_prefetch(row + Format::RowBytes(k) + kPrefetchBytes, 0, 1);
      V16 wv[kChunks][Format::kVectors];
      for (int c = 0; c < kChunks; ++c) {
        Format::Widen(row, k + c * kChunk, GroupScale<Format>(scale, s, j0 + t, k + c * kChunk), wv[c]);
        if constexpr (kRows == 1)  // each chunk's products as soon as it is widened: faster for one row
          for (int v = 0; v < Format::kVectors; ++v) partial[0][t] += xv[0][c][v] * wv[c][v];
      }
      if constexpr (kRows > 1)  // a row's sum kept in a register over the chunks
        for (int64_t r = 0; r < rows; ++r) {
          V16 sum = partial[r][t];
          for (int c = 0; c < kChunks; ++c)
            for (int v = 0; v < Format::kVectors; ++v) sum += xv[r][c][v] * wv[c][v];
          partial[r][t] = sum;
        }
    }
  }
}

// Few rows (at most kRows): each row's 16 dot products with columns j0.. (count of them) as 16
// lane-wise partial sums over K. Per-channel weights go 4 chunks (64 bytes) a column at a time,
// 32-weight blocks 2.
template <bool kFull, typename Format, int kRows>
void MultiplyDirect(const float* x, const uint8_t* w, const float* scale, const Shapes& s, int64_t j0, int64_t count,
                    float* out) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  constexpr int kGroup = Format::kBlock == 1 ? 4 : Format::kBlock == 32 ? 2 : 1;
  const int64_t vector_k = s.k / kChunk * kChunk, grouped_k = s.k / (kGroup * kChunk) * (kGroup * kChunk);
  V16 partial[kRows][kLanes] = {};
  DirectSums<kFull, Format, kGroup, kRows>(x, w, scale, s, j0, count, 0, grouped_k, partial);
  DirectSums<kFull, Format, 1, kRows>(x, w, scale, s, j0, count, grouped_k, vector_k, partial);
  for (int64_t r = 0; r < DirectRows<kRows>(s); ++r)
    Finish<Format>(x + r * s.k, w, scale, s, j0, count, SumEachOf16(partial[r]), out + r * s.n);
}

// p[i][j] becomes p[j][i]: for each bit of the index, the bit of the row and of the column
// swap places (rows a and b differ in that bit only; 16 + j is lane j of b).
inline void Transpose16(V16 (&p)[kLanes]) {
  for (int a = 0; a < 16; a += 2) {
    const V16 x = p[a], y = p[a + 1];
    p[a] = __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    p[a + 1] = __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  }
  for (int a : {0, 1, 4, 5, 8, 9, 12, 13}) {
    const V16 x = p[a], y = p[a + 2];
    p[a] = __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
    p[a + 2] = __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  for (int a : {0, 1, 2, 3, 8, 9, 10, 11}) {
    const V16 x = p[a], y = p[a + 4];
    p[a] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    p[a + 4] = __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  for (int a = 0; a < 8; ++a) {
    const V16 x = p[a], y = p[a + 8];
    p[a] = __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    p[a + 8] = __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
}

// The block of 16 columns from j0 widened once into `widened` lane-major: the weights at k = l +
// 16 i of its columns are the 16 floats at (l * vector_k / 16 + i) * 16 (columns past count are
// zero), so that a lane's pass over K reads them in order.
template <typename Format>
void WidenLaneMajor(const uint8_t* w, const float* scale, const Shapes& s, int64_t j0, int64_t count,
                    float* widened) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t vector_k = s.k / kChunk * kChunk, steps = vector_k / kLanes, row_bytes = Format::RowBytes(s.k);
  for (int64_t k = 0; k < vector_k; k += kChunk) {
    V16 columns[Format::kVectors][kLanes] = {};
    for (int64_t t = 0; t < count; ++t) {
      V16 wv[Format::kVectors];
      Format::Widen(w + (j0 + t) * row_bytes, k, GroupScale<Format>(scale, s, j0 + t, k), wv);
      for (int v = 0; v < Format::kVectors; ++v) columns[v][t] = wv[v];
    }
    for (int v = 0; v < Format::kVectors; ++v) {
      Transpose16(columns[v]);
      const int64_t i = (k + v * kLanes) / kLanes;
      for (int64_t l = 0; l < kLanes; ++l) StoreV(widened + (l * steps + i) * kLanes, columns[v][l]);
    }
  }
}

// The vector part of x's K, lane-major in the same way: x[r, l + 16 i] at (l * vector_k / 16 + i)
// * M + r, so that a group of rows finds its values at one k side by side.
void PackLaneMajor(const float* x, const Shapes& s, int64_t vector_k, float* packed) {
  const int64_t steps = vector_k / kLanes;
  for (int64_t r = 0; r < s.m; ++r)
    for (int64_t k = 0; k < vector_k; ++k) packed[(k % kLanes * steps + k / kLanes) * s.m + r] = x[r * s.k + k];
}

// kRows rows of x from r0 against kBlocks widened blocks: lane sums lanes[r][b][l][t] over k = l,
// l + 16, ... of x[r0 + r, k] * the weight k of block b's column t, each broadcast row value
// times 16 columns at a time. These are MultiplyDirect's partial sums, transposed, added in the
// same order. Each lane's pass reads the packed rows and the widened weights in memory order.
template <int kRows, int kBlocks>
void LaneSums(const float* packed, const float* widened, const Shapes& s, int64_t vector_k, int64_t r0,
              V16 (&lanes)[kRows][kBlocks][kLanes]) {
  const int64_t steps = vector_k / kLanes;
  for (int64_t l = 0; l < kLanes; ++l) {
    V16 acc[kRows][kBlocks] = {};
    const float* xl = packed + l * steps * s.m + r0;
    const float* wl = widened + l * steps * kLanes;
    for (int64_t i = 0; i < steps; ++i) {
      V16 wv[kBlocks];
      for (int b = 0; b < kBlocks; ++b) wv[b] = LoadV(wl + b * vector_k * kLanes + i * kLanes);
      for (int r = 0; r < kRows; ++r) {
        const float xk = xl[i * s.m + r];
        for (int b = 0; b < kBlocks; ++b) acc[r][b] += xk * wv[b];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int b = 0; b < kBlocks; ++b) lanes[r][b][l] = acc[r][b];
  }
}

// Many rows: rows r0 .. r0 + kRows - 1 against blocks b0 .. b0 + kBlocks - 1, widened once into
// `widened` (block after block).
template <typename Format, int kRows, int kBlocks>
void MultiplyWidened(const float* x, const float* packed, const uint8_t* w, const float* scale, const Shapes& s,
                     int64_t b0, const float* widened, int64_t r0, float* out) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t vector_k = s.k / kChunk * kChunk;
  V16 lanes[kRows][kBlocks][kLanes];
  LaneSums<kRows, kBlocks>(packed, widened, s, vector_k, r0, lanes);
  for (int b = 0; b < kBlocks; ++b) {
    const int64_t count = std::min<int64_t>(kLanes, s.n - (b0 + b) * kLanes);
    for (int r = 0; r < kRows; ++r)
      Finish<Format>(x + (r0 + r) * s.k, w, scale, s, (b0 + b) * kLanes, count, SumOf16Transposed(lanes[r][b]),
                     out + (r0 + r) * s.n);
  }
}

// Rows in groups of 12, then 4, then one by one, against blocks in pairs, then one.
template <typename Format, int kBlocks>
void MultiplyRows(const float* x, const float* packed, const uint8_t* w, const float* scale, const Shapes& s,
                  int64_t b0, const float* widened, float* out) {
  int64_t r0 = 0;
  for (; r0 + 12 <= s.m; r0 += 12)
    MultiplyWidened<Format, 12, kBlocks>(x, packed, w, scale, s, b0, widened, r0, out);
  for (; r0 + 4 <= s.m; r0 += 4) MultiplyWidened<Format, 4, kBlocks>(x, packed, w, scale, s, b0, widened, r0, out);
  for (; r0 < s.m; ++r0) MultiplyWidened<Format, 1, kBlocks>(x, packed, w, scale, s, b0, widened, r0, out);
}

// Blocks b0 .. b1 - 1 of 16 output columns for every row of x (`packed`: x by PackLaneMajor
// where there are more than kDirectRows rows).
template <typename Format>
void MultiplyBlocks(const float* x, const float* packed, const uint8_t* w, const float* scale, const Shapes& s,
                    int64_t b0, int64_t b1, float* out) {
  if (s.m <= kDirectRows) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t count = std::min<int64_t>(kLanes, s.n - b * kLanes);
      if (s.m == 1)
        count == kLanes ? MultiplyDirect<true, Format, 1>(x, w, scale, s, b * kLanes, count, out)
                        : MultiplyDirect<false, Format, 1>(x, w, scale, s, b * kLanes, count, out);
      else
        count == kLanes ? MultiplyDirect<true, Format, kDirectRows>(x, w, scale, s, b * kLanes, count, out)
                        : MultiplyDirect<false, Format, kDirectRows>(x, w, scale, s, b * kLanes, count, out);
    }
    return;
  }
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t vector_k = s.k / kChunk * kChunk;
  thread_local std::vector<float> scratch;
  scratch.resize((b1 - b0) * vector_k * kLanes);
  for (int64_t b = b0; b < b1; ++b)
    WidenLaneMajor<Format>(w, scale, s, b * kLanes, std::min<int64_t>(kLanes, s.n - b * kLanes),
                           scratch.data() + (b - b0) * vector_k * kLanes);
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2)
    MultiplyRows<Format, 2>(x, packed, w, scale, s, b, scratch.data() + (b - b0) * vector_k * kLanes, out);
  if (b < b1) MultiplyRows<Format, 1>(x, packed, w, scale, s, b, scratch.data() + (b - b0) * vector_k * kLanes, out);
}

// Work items of 4 blocks of 16 output columns where there are enough of them, else of one.
template <typename Format>
void Multiply(const float* x, const uint8_t* w, const float* scale, const Shapes& s, float* out) {
  constexpr int64_t kChunk = Format::kVectors * kLanes;
  const int64_t vector_k = s.k / kChunk * kChunk;
  thread_local std::vector<float> packed;
  if (s.m > kDirectRows) {
    packed.resize(s.m * vector_k);
    PackLaneMajor(x, s, vector_k, packed.data());
  }
  const float* x_packed = packed.data();  // the helpers' own thread_local `packed` is another vector
  const int64_t blocks = (s.n + kLanes - 1) / kLanes;
  const int64_t per_item = blocks >= 32 ? 4 : 1;
  ParallelFor((blocks + per_item - 1) / per_item, kSpinToNextProduct, [&](int64_t i) {
    MultiplyBlocks<Format>(x, x_packed, w, scale, s, i * per_item, std::min(blocks, (i + 1) * per_item), out);
  });
}

// Runs `Multiply<Format>` after checking that w's row width fits the format; else an error.
template <typename Format>
const char* Run(const float* x, const XLA_FFI_Buffer* w, const float* scale, const Shapes& s,
                float* out) {
  if (s.k % Format::kBlock || w->dims[1] != Format::RowBytes(s.k))
    return "w's row width does not hold K weights of its format";
  Multiply<Format>(x, static_cast<const uint8_t*>(w->data), scale, s, out);
  return nullptr;
}

}  // namespace

// Arguments: x [M, K] float32; w [N, K] int8 or float8_e4m3fn with scale [N, G] float32, or w [N,
// row bytes] uint8 of GGML blocks (then scale is ignored); attribute block_format (int32: 0 for
// int8 / fp8, else GGML's type id: 2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K). Result
// [M, N] float32.
extern "C" XLA_FFI_Error* JpagedQuantizedMatmul(XLA_FFI_CallFrame* frame) {
  const XLA_FFI_Api* api = frame->api;
  if (IsMetadataQuery(frame)) return DescribeHandler(frame);
  if (const char* problem = FrameProblem(frame, 3, 1)) return Fail(api, problem);
  const auto* attr = static_cast<const XLA_FFI_Scalar*>(frame->attrs.attrs[0]);
  if (attr->dtype != XLA_FFI_DataType_S32) return Fail(api, "block_format must be int32");
  const int32_t block_format = *static_cast<const int32_t*>(attr->value);
  const XLA_FFI_Buffer *x = Buffer(frame->args.args[0]), *w = Buffer(frame->args.args[1]),
                       *scale = Buffer(frame->args.args[2]), *out = Buffer(frame->rets.rets[0]);
  if (x->rank != 2 || w->rank != 2 || scale->rank != 2 || out->rank != 2)
    return Fail(api, "x, w, scale or the result of the wrong rank");
  const Shapes s{x->dims[0], x->dims[1], w->dims[0], scale->dims[1]};
  if (out->dims[0] != s.m || out->dims[1] != s.n) return Fail(api, "x, w and the result do not agree in shape");
  if (x->dtype != XLA_FFI_DataType_F32 || scale->dtype != XLA_FFI_DataType_F32 || out->dtype != XLA_FFI_DataType_F32)
    return Fail(api, "x, scale and the result must be float32");
  const bool scaled = w->dtype == XLA_FFI_DataType_S8 || w->dtype == XLA_FFI_DataType_F8E4M3FN;
  if (scaled && (block_format != 0 || scale->dims[0] != s.n || (s.groups != 1 && s.groups * kGroupSize != s.k)))
    return Fail(api, "scale must be [N, K / 32] or [N, 1] for w [N, K]");
  const float* xs = static_cast<const float*>(x->data);
  const float* scales = static_cast<const float*>(scale->data);
  float* result = static_cast<float*>(out->data);
  const char* problem = "w must be int8, float8_e4m3fn, or uint8 GGML blocks of Q4_0, Q4_1, Q8_0, Q4_K, Q5_K or Q6_K";
  if (w->dtype == XLA_FFI_DataType_S8)
    problem = Run<Int8>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_F8E4M3FN)
    problem = Run<Fp8E4M3>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 2)
    problem = Run<Q4_0>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 3)
    problem = Run<Q4_1>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 8)
    problem = Run<Q8_0>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 12)
    problem = Run<Q4_K>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 13)
    problem = Run<Q5_K>(xs, w, scales, s, result);
  else if (w->dtype == XLA_FFI_DataType_U8 && block_format == 14)
    problem = Run<Q6_K>(xs, w, scales, s, result);
  return problem ? Fail(api, problem) : nullptr;
}
