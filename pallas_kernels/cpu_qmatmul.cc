// A CPU matmul of float32 activations by int4 / int8 group-quantized weights, as an XLA FFI custom call.
//
// Why: XLA:CPU does not fuse int4 dequantization into its dot, so every step writes every projection's
// float32 weights before multiplying (docs/performance.md). Here the weights are dequantized in registers,
// 16 outputs at a time, and never written: a one-row step reads the int4 bytes once (memory-bound).
//
// Layout (pallas_kernels/quantized_weights.py), with the layer axis kept so that a `lax.scan` over layers
// passes the whole stack and a layer index instead of slicing (a custom call's operand slice is a copy):
//   x       float32 [M, I]              I = G * g
//   w       uint8   [L, G, R, O]        int4: R = g / 2, byte b of group G holds inputs b (low nibble) and
//                                       b + g/2 (high); int8: R = g, int8 values
//   scales  f32/f16/bf16 [L, G, O]      w = q * scale + min (int4), q * scale (int8)
//   mins    like scales                 (int4 only; int8 passes scales again)
//   layer   int32 []                    which of the L layers
//   rows    int32 []                    rows of x that are real; y is zero past them (a step's padding tokens
//                                       cost nothing)
//   y       float32 [M, O]
// or, with the attribute tiled (the layer stacks as the engine loads them, `cpu_qmatmul.tile_columns`):
//   w       [L, T, G, R, 32], scales and mins [L, T, G, 32]: the same values in tiles of 32 output columns
//           (T = ceil(O / 32), zero past O), so each work item reads one contiguous run instead of 32 bytes of
//           every weight row O bytes apart: 2x faster at one row on 66 MB of SmolLM2 weights (the hardware
//           prefetcher follows a stream; strided 32-byte reads ran at 9-13 GB/s, a stream at 25-48).
//
// Two modes:
//   exact: float32 FMA. Up to 16 rows each weight row is dequantized in registers (q * scale + min) and
//          multiplied by 8-row blocks; more rows unpack a tile of columns once into L1/L2; wide heads at few
//          rows sum per group, y += part * scale + sum_b x[m, b] * min. Matches the dequantize-then-dot
//          reference to float32 rounding.
//   q8:    (int4 weights only, g = 32k) activations quantized per block of 32 inputs to int8 (symmetric, one
//          float scale a block: llama.cpp's Q8_1), then per block an integer dot of the 4-bit weights
//          (unsigned) by the int8 activations on AVX512-VNNI (vpdpbusd), scaled once:
//          y += scale * (dx * isum) + min * (dx * sum_b xq[b]).
//
// Threads: output tiles of 32 columns are handed out through an atomic counter to the caller and to tasks
// scheduled on XLA's intra-op pool; the caller waits only for tiles a running task has claimed, so a busy pool
// never deadlocks the call.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 32;  // output columns per work item: two zmm registers
constexpr int kTileRows = 8;  // rows per register block of the direct path (16 accumulators)
constexpr int kMaxDirectRows = 16;  // above, a work item unpacks its columns once (see f32_columns)
constexpr int kPrefetchRows = 8;  // weight rows to prefetch ahead

// ------------------------------------------------------------------------------------ scale loading

enum class ScaleType { kF32, kF16, kBF16 };

template <ScaleType S>
inline __m512 load_scales(const void* base, int64_t idx, __mmask16 mask) {
  if constexpr (S == ScaleType::kF32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + idx);
  } else if constexpr (S == ScaleType::kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + idx));
  } else {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + idx));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
}

// Weight bytes [16 outputs] of one row b as 16 int32 lanes (zero-extended int4 pairs, or sign-extended int8).
template <bool kInt4>
inline __m512i load_bytes(const uint8_t* p, __mmask16 mask) {
  __m128i b = _mm_maskz_loadu_epi8(mask, p);
  return kInt4 ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepi8_epi32(b);
}

// The first `left` of 16 lanes (none for left <= 0, all for left >= 16): a register's share of a row's tail.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
}

struct Problem {
  const float* x;        // [M, I]
  const uint8_t* w;      // [G, R, O] of the chosen layer
  const void* scales;    // [G, O]
  const void* mins;      // [G, O]
  float* y;              // [M, O]
  int64_t M, I, G, R, O;
  // q8 mode: the activations quantized per 32 inputs.
  const int8_t* xq = nullptr;  // [M, I]
  const float* dx = nullptr;   // [M, I / 32] block scales
  const float* sx = nullptr;   // [M, I / 32] dx * sum of the block's int8 values
  const float* xsum = nullptr; // wide path: [M, G] sums of each group's inputs
  bool tiled = false;          // w [T, G, R, 32], scales [T, G, 32]: each 32-column tile's bytes contiguous

  // Weight row b of group gi at column o0 (a multiple of 32 when tiled); the next row is `row_stride` on.
  const uint8_t* wrow(int64_t gi, int64_t b, int64_t o0) const {
    return tiled ? w + ((o0 / kTile * G + gi) * R + b) * kTile + o0 % kTile : w + (gi * R + b) * O + o0;
  }
  int64_t row_stride() const { return tiled ? kTile : O; }
  // Index of group gi's scale (and min) at column o0 (a multiple of 32 when tiled).
  int64_t scale_at(int64_t gi, int64_t o0) const {
    return tiled ? (o0 / kTile * G + gi) * kTile + o0 % kTile : gi * O + o0;
  }
};

// ------------------------------------------------------------------------------------ exact mode

// One tile: rows [m0, m0 + MR), outputs [o0, o0 + 32) masked at the edge. Each weight row is dequantized in
// registers (q * scale + min: one FMA per 16 weights, shared by the MR rows) and never stored.
template <int MR, bool kInt4, ScaleType S>
void exact_tile(const Problem& p, int64_t m0, int64_t o0) {
  const int64_t rem = p.O - o0;
  const __mmask16 k0 = lanes(rem), k1 = lanes(rem - 16);
  const int64_t g = kInt4 ? 2 * p.R : p.R;
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi32(0xF);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    const int64_t si = p.scale_at(gi, o0);
    const __m512 s0 = load_scales<S>(p.scales, si, k0);
    const __m512 s1 = load_scales<S>(p.scales, si + 16, k1);
    const __m512 n0 = kInt4 ? load_scales<S>(p.mins, si, k0) : _mm512_setzero_ps();
    const __m512 n1 = kInt4 ? load_scales<S>(p.mins, si + 16, k1) : _mm512_setzero_ps();
    const int64_t stride = p.row_stride();
    const uint8_t* wrow = p.wrow(gi, 0, o0);
    const float* xg = p.x + m0 * p.I + gi * g;
    for (int64_t b = 0; b < p.R; ++b, wrow += stride) {
      // NOTE: untiled, rows are O bytes apart (often another page): prefetch ahead, the hardware prefetcher may
      // not. Tiled, they are contiguous (harmless).
      _mm_prefetch(reinterpret_cast<const char*>(wrow + kPrefetchRows * stride), _MM_HINT_T0);
      const __m512i q0 = load_bytes<kInt4>(wrow, k0);
      const __m512i q1 = load_bytes<kInt4>(wrow + 16, k1);
      if constexpr (kInt4) {
        const __m512 lo0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q0, nib)), s0, n0);
        const __m512 lo1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q1, nib)), s1, n1);
        const __m512 hi0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q0, 4)), s0, n0);
        const __m512 hi1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q1, 4)), s1, n1);
        for (int m = 0; m < MR; ++m) {
          const __m512 xl = _mm512_set1_ps(xg[m * p.I + b]);
          const __m512 xh = _mm512_set1_ps(xg[m * p.I + b + p.R]);
          acc[m][0] = _mm512_fmadd_ps(hi0, xh, _mm512_fmadd_ps(lo0, xl, acc[m][0]));
          acc[m][1] = _mm512_fmadd_ps(hi1, xh, _mm512_fmadd_ps(lo1, xl, acc[m][1]));
        }
      } else {
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), s0);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), s1);
        for (int m = 0; m < MR; ++m) {
          const __m512 xb = _mm512_set1_ps(xg[m * p.I + b]);
          acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0, k0, acc[m][0]);
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0 + 16, k1, acc[m][1]);
  }
}

// The last, partial block of row_blocks: fn(R, m) for the R in [1, kRows) that is left.
template <int R, typename Fn>
void row_remainder(int64_t left, int64_t m, Fn& fn) {
  if constexpr (R > 0) {
    if (left == R) fn(std::integral_constant<int, R>{}, m);
    else row_remainder<R - 1>(left, m, fn);
  }
}

// Runs fn(rows, m) over M rows in blocks of kRows, then one block of the remainder; `rows` is a compile-time
// std::integral_constant, so each block size instantiates its own register-blocked kernel.
template <int kRows, typename Fn>
void row_blocks(int64_t M, Fn&& fn) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) fn(std::integral_constant<int, kRows>{}, m);
  row_remainder<kRows - 1>(M - m, m, fn);
}

template <bool kInt4, ScaleType S>
void exact_columns(const Problem& p, int64_t o0) {
  row_blocks<kTileRows>(p.M, [&](auto mr, int64_t m) { exact_tile<decltype(mr)::value, kInt4, S>(p, m, o0); });
}

// Few rows, wide weights (the LM head): a work item is kWide columns, so each weight row is read as one
// contiguous run of kWide (or kWide / 2) bytes the hardware prefetcher follows, not 576 rows 49 KB apart, one
// cache line each. Partial sums live in L1 instead of registers.
constexpr int64_t kWide = 512;
constexpr int64_t kWideMinColumns = 4096;  // below this a row stride is short enough for the stride prefetcher
constexpr int64_t kMaxWideRows = 4;  // above, the unpacked tile (f32_columns) is cheaper

template <int MR, bool kInt4, ScaleType S>
void exact_wide(const Problem& p, int64_t m0, int64_t o0) {
  const int64_t width = std::min(kWide, p.O - o0), nvec = (width + 15) / 16;
  const __mmask16 last = lanes(width - 16 * (nvec - 1));
  const int64_t g = kInt4 ? 2 * p.R : p.R;
  alignas(64) float part[MR][kWide];
  float* y[MR];
  for (int m = 0; m < MR; ++m) {
    y[m] = p.y + (m0 + m) * p.O + o0;
    std::memset(y[m], 0, width * sizeof(float));
  }
  const __m512i nib = _mm512_set1_epi32(0xF);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    std::memset(part, 0, sizeof(part));
    for (int64_t b = 0; b < p.R; ++b) {
      const uint8_t* wrow = p.w + (gi * p.R + b) * p.O + o0;
      __m512 xl[MR], xh[MR];
      for (int m = 0; m < MR; ++m) {
        xl[m] = _mm512_set1_ps(p.x[(m0 + m) * p.I + gi * g + b]);
        xh[m] = kInt4 ? _mm512_set1_ps(p.x[(m0 + m) * p.I + gi * g + p.R + b]) : xl[m];
      }
      for (int64_t v = 0; v < nvec; ++v) {
        const __mmask16 k = v == nvec - 1 ? last : __mmask16(0xFFFF);
        const __m512i q = load_bytes<kInt4>(wrow + 16 * v, k);
        if constexpr (kInt4) {
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, nib));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
          for (int m = 0; m < MR; ++m) {
            __m512 a = _mm512_load_ps(part[m] + 16 * v);
            a = _mm512_fmadd_ps(hi, xh[m], _mm512_fmadd_ps(lo, xl[m], a));
            _mm512_store_ps(part[m] + 16 * v, a);
          }
        } else {
          const __m512 wv = _mm512_cvtepi32_ps(q);
          for (int m = 0; m < MR; ++m) {
            _mm512_store_ps(part[m] + 16 * v, _mm512_fmadd_ps(wv, xl[m], _mm512_load_ps(part[m] + 16 * v)));
          }
        }
      }
    }
    for (int64_t v = 0; v < nvec; ++v) {
      const __mmask16 k = v == nvec - 1 ? last : __mmask16(0xFFFF);
      const __m512 sc = load_scales<S>(p.scales, gi * p.O + o0 + 16 * v, k);
      const __m512 mn = kInt4 ? load_scales<S>(p.mins, gi * p.O + o0 + 16 * v, k) : _mm512_setzero_ps();
      for (int m = 0; m < MR; ++m) {
        __m512 acc = _mm512_maskz_loadu_ps(k, y[m] + 16 * v);
        if constexpr (kInt4) acc = _mm512_fmadd_ps(_mm512_set1_ps(p.xsum[(m0 + m) * p.G + gi]), mn, acc);
        _mm512_mask_storeu_ps(y[m] + 16 * v, k, _mm512_fmadd_ps(_mm512_load_ps(part[m] + 16 * v), sc, acc));
      }
    }
  }
}

template <bool kInt4, ScaleType S>
void exact_wide_columns(const Problem& p, int64_t o0) {
  row_blocks<kTileRows>(p.M, [&](auto mr, int64_t m) { exact_wide<decltype(mr)::value, kInt4, S>(p, m, o0); });
}

// ------------------------------------------------------------------------------------ many rows: a packed tile

// NOTE: at many rows, unpacking the same weights once per register block of rows costs as much as the dots.
// So a work item first unpacks its 32 columns of the layer into a per-thread buffer (L1 / L2 sized: I * 128
// bytes exact, I * 32 bytes q8) and then runs every row block over it.

// Exact: buf [I, 32] float32, the dequantized weights of columns o0..o0+31 (zero past O).
template <bool kInt4, ScaleType S>
void unpack_f32(const Problem& p, int64_t o0, float* buf) {
  const int64_t rem = p.O - o0;
  const __mmask16 k[2] = {lanes(rem), lanes(rem - 16)};
  const int64_t g = kInt4 ? 2 * p.R : p.R;
  const __m512i nib = _mm512_set1_epi32(0xF);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    for (int j = 0; j < 2; ++j) {
      const int64_t si = p.scale_at(gi, o0) + 16 * j;
      const __m512 s = load_scales<S>(p.scales, si, k[j]);
      const __m512 mn = kInt4 ? load_scales<S>(p.mins, si, k[j]) : _mm512_setzero_ps();
      const int64_t stride = p.row_stride();
      const uint8_t* wrow = p.wrow(gi, 0, o0) + 16 * j;
      for (int64_t b = 0; b < p.R; ++b, wrow += stride) {
        __m512i q = load_bytes<kInt4>(wrow, k[j]);
        float* row = buf + (gi * g + b) * kTile + 16 * j;
        if constexpr (kInt4) {
          _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, nib)), s, mn));
          _mm512_storeu_ps(row + p.R * kTile, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s, mn));
        } else {
          _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
        }
      }
    }
  }
}

// Rows m0..m0+MR, inputs [i0, i1) of the unpacked tile, added to y unless i0 == 0.
template <int MR>
void f32_block(const Problem& p, const float* buf, int64_t m0, int64_t o0, int64_t i0, int64_t i1) {
  const int64_t rem = p.O - o0;
  const __mmask16 k0 = lanes(rem), k1 = lanes(rem - 16);
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) {
    float* y = p.y + (m0 + m) * p.O + o0;
    acc[m][0] = i0 ? _mm512_maskz_loadu_ps(k0, y) : _mm512_setzero_ps();
    acc[m][1] = i0 ? _mm512_maskz_loadu_ps(k1, y + 16) : _mm512_setzero_ps();
  }
  const float* x = p.x + m0 * p.I;
  buf += i0 * kTile;
  for (int64_t i = i0; i < i1; ++i, buf += kTile) {
    const __m512 w0 = _mm512_loadu_ps(buf), w1 = _mm512_loadu_ps(buf + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * p.I + i]);
      acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0, k0, acc[m][0]);
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0 + 16, k1, acc[m][1]);
  }
}

// q8: buf [I / 4, 32] of 32-bit lanes, lane j of quad i holding the 4-bit weights of inputs 4i..4i+3 of column
// o0 + j (vpdpbusd's unsigned operand).
void unpack_vnni(const Problem& p, int64_t o0, uint32_t* buf) {
  const int64_t rem = p.O - o0;
  const __mmask16 k[2] = {lanes(rem), lanes(rem - 16)};
  const int64_t g = 2 * p.R;
  const __m512i nib = _mm512_set1_epi8(0xF);
  for (int64_t gi = 0; gi < p.G; ++gi) {
    for (int64_t b = 0; b < p.R; b += 4) {
      const uint8_t* w = p.wrow(gi, b, o0);
      const int64_t rs = p.row_stride();
      for (int j = 0; j < 2; ++j, w += 16) {
        // zero-extend row r's bytes to 32-bit lanes, shift them into byte r, or the 4 rows together.
        __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k[j], w));
        v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k[j], w + rs)), 8));
        v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k[j], w + 2 * rs)), 16));
        v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k[j], w + 3 * rs)), 24));
        _mm512_storeu_si512(buf + ((gi * g + b) / 4) * kTile + 16 * j, _mm512_and_si512(v, nib));
        _mm512_storeu_si512(buf + ((gi * g + p.R + b) / 4) * kTile + 16 * j,
                            _mm512_and_si512(_mm512_srli_epi32(v, 4), nib));
      }
    }
  }
}

// Rows m0..m0+MR over the packed tile: per 32-input block an int32 dot, then (the block lies in one group)
// acc += scale * (dx * isum) + min * (dx * sum q).
template <int MR, ScaleType S>
void q8_block(const Problem& p, const uint32_t* buf, int64_t m0, int64_t o0) {
  const int64_t rem = p.O - o0;
  const __mmask16 k0 = lanes(rem), k1 = lanes(rem - 16);
  const int64_t nb = p.I / 32, g = 2 * p.R;
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t bk = 0; bk < nb; ++bk) {
    __m512i isum[MR][2];
    for (int m = 0; m < MR; ++m) isum[m][0] = isum[m][1] = _mm512_setzero_si512();
    const uint32_t* wq = buf + bk * 8 * kTile;
    for (int quad = 0; quad < 8; ++quad, wq += kTile) {
      const __m512i w0 = _mm512_loadu_si512(wq), w1 = _mm512_loadu_si512(wq + 16);
      for (int m = 0; m < MR; ++m) {
        int32_t a;
        std::memcpy(&a, p.xq + (m0 + m) * p.I + bk * 32 + quad * 4, 4);
        const __m512i xb = _mm512_set1_epi32(a);
        isum[m][0] = _mm512_dpbusd_epi32(isum[m][0], w0, xb);
        isum[m][1] = _mm512_dpbusd_epi32(isum[m][1], w1, xb);
      }
    }
    const int64_t gi = bk * 32 / g;
    const int64_t si = p.scale_at(gi, o0);
    const __m512 s0 = load_scales<S>(p.scales, si, k0);
    const __m512 s1 = load_scales<S>(p.scales, si + 16, k1);
    const __m512 n0 = load_scales<S>(p.mins, si, k0);
    const __m512 n1 = load_scales<S>(p.mins, si + 16, k1);
    for (int m = 0; m < MR; ++m) {
      const __m512 d = _mm512_set1_ps(p.dx[(m0 + m) * nb + bk]);
      const __m512 sq = _mm512_set1_ps(p.sx[(m0 + m) * nb + bk]);
      acc[m][0] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[m][0]), d), s0,
                                  _mm512_fmadd_ps(sq, n0, acc[m][0]));
      acc[m][1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[m][1]), d), s1,
                                  _mm512_fmadd_ps(sq, n1, acc[m][1]));
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0, k0, acc[m][0]);
    _mm512_mask_storeu_ps(p.y + (m0 + m) * p.O + o0 + 16, k1, acc[m][1]);
  }
}

constexpr int kBlockRows = 6;  // rows per register block over a packed tile (12 accumulators)
// f32_block: 12 rows x 32 columns (24 accumulators) over 256 inputs of the unpacked tile at a time (32 KB, stays
// in L1 while every row block reads it). Against 6 rows over all inputs, at 512 rows: 576 x 1536 204 -> 216
// GFLOP/s, 576 x 576 203 -> 227, 576 x 192 249 -> 282 (1536 x 576 unchanged); the same sums in the same order.
constexpr int kF32Rows = 12;
constexpr int64_t kF32Inputs = 256;


template <ScaleType S>
void q8_columns(const Problem& p, int64_t o0) {
  thread_local std::vector<uint32_t> buf;
  buf.resize(p.I / 4 * kTile);
  unpack_vnni(p, o0, buf.data());
  row_blocks<kBlockRows>(p.M, [&](auto mr, int64_t m) { q8_block<decltype(mr)::value, S>(p, buf.data(), m, o0); });
}

template <bool kInt4, ScaleType S>
void f32_columns(const Problem& p, int64_t o0) {
  thread_local std::vector<float> buf;
  buf.resize(p.I * kTile);
  unpack_f32<kInt4, S>(p, o0, buf.data());
  for (int64_t i0 = 0; i0 < p.I; i0 += kF32Inputs) {
    const int64_t i1 = std::min(p.I, i0 + kF32Inputs);
    row_blocks<kF32Rows>(p.M,
                         [&](auto mr, int64_t m) { f32_block<decltype(mr)::value>(p, buf.data(), m, o0, i0, i1); });
  }
}

// Per 32-block symmetric int8 quantization of x (llama.cpp's Q8_1: d = absmax / 127, q = round(x / d)).
void quantize_rows(const float* x, int64_t M, int64_t I, int8_t* xq, float* dx, float* sx) {
  const int64_t nb = I / 32;
  for (int64_t r = 0; r < M * nb; ++r) {
    const float* v = x + r * 32;
    __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    float d = amax / 127.0f;
    float inv = d > 0 ? 1.0f / d : 0.0f;
    __m512 iv = _mm512_set1_ps(inv);
    __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, iv), _MM_FROUND_TO_NEAREST_INT));
    __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, iv), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + r * 32), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + r * 32 + 16), _mm512_cvtsepi32_epi8(qb));
    dx[r] = d;
    sx[r] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

// int8 weights, 1 to kMaxHeadRows rows, wide O (the lossless int8 LM head; a decode step asks for 1-16 rows of
// logits, a speculative verify for 5 a request). A work item is kWide columns. Per group, the item's slab of g rows x
// kWide bytes (16 KB at g = 32) is prefetched while the previous group computes, then walked in sub-tiles of 64
// columns with MR x 4 accumulators in registers (the wide path above keeps its partial sums in memory: 3 memory
// operations per FMA, which made 5 rows cost twice one).
constexpr int kHeadRows = 6;  // MR: 6 x 4 accumulators + 4 weight registers fit the 32 zmm
// Measured on the 576 x 49152 head: from about 12 rows converting the weights once for all rows (f32_columns)
// wins (16 rows: 6.8 against 8.4 ms). At 1 row the wide path was faster with the head in cache (1.48 against
// 1.63 ms), but in a decode step the layers' weights have evicted it and the prefetched slabs win: the whole
// one-row step 8.9 -> 8.0 ms (three alternating runs).
constexpr int kMaxHeadRows = 10;

template <int MR, ScaleType S>
void int8_head_block(const Problem& p, int64_t m0, int64_t o0) {
  const int64_t width = std::min(kWide, p.O - o0), g = p.R;
  const int8_t* w = reinterpret_cast<const int8_t*>(p.w);
  for (int m = 0; m < MR; ++m) std::memset(p.y + (m0 + m) * p.O + o0, 0, width * sizeof(float));
  for (int64_t gi = 0; gi < p.G; ++gi) {
    if (gi + 1 < p.G) {
      for (int64_t b = 0; b < g; ++b) {
        const int8_t* row = w + ((gi + 1) * g + b) * p.O + o0;
        for (int64_t off = 0; off < width; off += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(row + off), _MM_HINT_T0);
        }
      }
    }
    for (int64_t c0 = 0; c0 < width; c0 += 64) {
      __mmask16 mask[4];
      for (int v = 0; v < 4; ++v) mask[v] = lanes(width - c0 - 16 * v);
      __m512 acc[MR][4];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_setzero_ps();
      for (int64_t b = 0; b < g; ++b) {
        const int8_t* row = w + (gi * g + b) * p.O + o0 + c0;
        __m512 wv[4];
        for (int v = 0; v < 4; ++v) {
          wv[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask[v], row + 16 * v)));
        }
        for (int m = 0; m < MR; ++m) {
          const __m512 xb = _mm512_set1_ps(p.x[(m0 + m) * p.I + gi * g + b]);
          for (int v = 0; v < 4; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], xb, acc[m][v]);
        }
      }
      for (int v = 0; v < 4; ++v) {
        if (!mask[v]) continue;
        const __m512 sc = load_scales<S>(p.scales, gi * p.O + o0 + c0 + 16 * v, mask[v]);
        for (int m = 0; m < MR; ++m) {
          float* y = p.y + (m0 + m) * p.O + o0 + c0 + 16 * v;
          _mm512_mask_storeu_ps(y, mask[v], _mm512_fmadd_ps(acc[m][v], sc, _mm512_maskz_loadu_ps(mask[v], y)));
        }
      }
    }
  }
}

template <ScaleType S>
void int8_head_columns(const Problem& p, int64_t o0) {
  row_blocks<kHeadRows>(p.M, [&](auto mr, int64_t m) { int8_head_block<decltype(mr)::value, S>(p, m, o0); });
}

// ------------------------------------------------------------------------------------ threading

using jaxserve::parallel_for;

// ------------------------------------------------------------------------------------ the handler

// Runs fn(o0) for every 32-column tile, in work items of up to 4 neighbouring tiles (untiled) or one (tiled).
// NOTE: untiled, neighbouring tiles share the cache lines of each weight row (a tile reads 16 or 32 bytes of a
// row of O); run by one thread one after another they hit L1 / L2, run by two threads both fetch the lines from
// memory. Tiled, a tile's bytes are its own.
template <typename Fn>
void for_tiles(ffi::ThreadPool& pool, const Problem& p, Fn&& fn) {
  const int64_t tiles = (p.O + kTile - 1) / kTile;
  const int64_t per_item = p.tiled ? 1 : std::clamp<int64_t>(tiles / 16, 1, 4);
  const int64_t items = (tiles + per_item - 1) / per_item;
  parallel_for(pool, items, [&](int64_t it) {
    for (int64_t t = it * per_item; t < std::min(tiles, (it + 1) * per_item); ++t) fn(t * kTile);
  });
}

template <bool kInt4, ScaleType S>
void run(ffi::ThreadPool& pool, Problem& p, bool q8) {
  std::vector<float> xsum, dx, sx;
  std::vector<int8_t> xq;
  if (q8) {
    const int64_t nb = p.I / 32;
    xq.resize(p.M * p.I);
    dx.resize(p.M * nb);
    sx.resize(p.M * nb);
    quantize_rows(p.x, p.M, p.I, xq.data(), dx.data(), sx.data());
    p.xq = xq.data();
    p.dx = dx.data();
    p.sx = sx.data();
    for_tiles(pool, p, [&p](int64_t o0) { q8_columns<S>(p, o0); });
    return;
  }
  // The wide paths read runs of a weight row across many tiles: only for the untiled layout (the LM head).
  const bool wide = !p.tiled && p.O >= kWideMinColumns;
  if (!kInt4 && wide && p.M >= 1 && p.M <= kMaxHeadRows) {
    parallel_for(pool, (p.O + kWide - 1) / kWide, [&p](int64_t i) { int8_head_columns<S>(p, i * kWide); });
    return;
  }
  if (wide && p.M <= kMaxWideRows) {
    if (kInt4) {  // the wide path scales per group: y += part * scale + sum(x) * min
      const int64_t g = p.I / p.G;
      xsum.resize(p.M * p.G);
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t gi = 0; gi < p.G; ++gi) {
          float s = 0;
          for (int64_t i = 0; i < g; ++i) s += p.x[m * p.I + gi * g + i];
          xsum[m * p.G + gi] = s;
        }
      p.xsum = xsum.data();
    }
    parallel_for(pool, (p.O + kWide - 1) / kWide, [&p](int64_t i) { exact_wide_columns<kInt4, S>(p, i * kWide); });
    return;
  }
  if (p.M > kMaxDirectRows || wide) {
    for_tiles(pool, p, [&p](int64_t o0) { f32_columns<kInt4, S>(p, o0); });
    return;
  }
  for_tiles(pool, p, [&p](int64_t o0) { exact_columns<kInt4, S>(p, o0); });
}

ffi::Error qmatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer scales,
                   ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                   ffi::ResultBuffer<ffi::F32> y, bool int4, bool q8, bool tiled) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = scales.dimensions(), md = mins.dimensions();
  auto yd = y->dimensions();
  // Untiled: w [L, G, R, O], scales [L, G, O]. Tiled: w [L, T, G, R, 32], scales [L, T, G, 32], T = ceil(O / 32).
  const size_t wrank = tiled ? 5 : 4, srank = tiled ? 4 : 3;
  if (xd.size() != 2 || yd.size() != 2 || wd.size() != wrank || sd.size() != srank || md.size() != srank) {
    return ffi::Error::InvalidArgument(tiled ? "qmatmul: want x [M, I], w [L, T, G, R, 32], scales [L, T, G, 32]"
                                             : "qmatmul: want x [M, I], w [L, G, R, O], scales [L, G, O]");
  }
  Problem p{};
  p.M = xd[0];
  p.I = xd[1];
  p.tiled = tiled;
  const int64_t L = wd[0];
  p.G = wd[tiled ? 2 : 1];
  p.R = wd[tiled ? 3 : 2];
  p.O = yd[1];
  const int64_t g = int4 ? 2 * p.R : p.R;
  const bool shapes_agree =
      tiled ? (wd[1] == (p.O + kTile - 1) / kTile && wd[4] == kTile && sd[0] == L && sd[1] == wd[1] &&
               sd[2] == p.G && sd[3] == kTile)
            : (wd[3] == p.O && sd[0] == L && sd[1] == p.G && sd[2] == p.O);
  bool mins_agree = true;
  for (size_t i = 0; i < srank; ++i) mins_agree &= md[i] == sd[i];
  if (p.G * g != p.I || yd[0] != p.M || !shapes_agree || !mins_agree ||
      mins.element_type() != scales.element_type()) {
    return ffi::Error::InvalidArgument("qmatmul: x, w, scales and mins disagree on I, G or O");
  }
  if (ffi::ByteWidth(w.element_type()) != 1) return ffi::Error::InvalidArgument("qmatmul: w must be 8-bit");
  if (q8 && (!int4 || g % 32 != 0)) {
    return ffi::Error::InvalidArgument("qmatmul: q8 mode needs int4 weights in groups of a multiple of 32");
  }
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("qmatmul: layer index out of range");
  const int64_t ssize = ffi::ByteWidth(scales.element_type());
  p.x = x.typed_data();
  const int64_t columns = tiled ? wd[1] * kTile : p.O;  // stored columns (tiled: padded to whole tiles)
  p.w = static_cast<const uint8_t*>(w.untyped_data()) + static_cast<int64_t>(l) * p.G * p.R * columns;
  p.scales = static_cast<const char*>(scales.untyped_data()) + static_cast<int64_t>(l) * p.G * columns * ssize;
  p.mins = static_cast<const char*>(mins.untyped_data()) + static_cast<int64_t>(l) * p.G * columns * ssize;
  p.y = y->typed_data();
  // Rows past `rows` are a step's padding: computed as zeros, never multiplied.
  const int64_t valid = std::clamp<int64_t>(*rows.typed_data(), 0, p.M);
  if (valid < p.M) std::memset(p.y + valid * p.O, 0, (p.M - valid) * p.O * sizeof(float));
  p.M = valid;
  if (p.M == 0 || p.O == 0) return ffi::Error::Success();
  switch (scales.element_type()) {
    case ffi::F32:
      int4 ? run<true, ScaleType::kF32>(pool, p, q8) : run<false, ScaleType::kF32>(pool, p, q8);
      break;
    case ffi::F16:
      int4 ? run<true, ScaleType::kF16>(pool, p, q8) : run<false, ScaleType::kF16>(pool, p, q8);
      break;
    case ffi::BF16:
      int4 ? run<true, ScaleType::kBF16>(pool, p, q8) : run<false, ScaleType::kBF16>(pool, p, q8);
      break;
    default:
      return ffi::Error::InvalidArgument("qmatmul: scales must be float32, float16 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveQMatmul, qmatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::AnyBuffer>()          // w: uint8 (int4 pairs) or int8
                                  .Arg<ffi::AnyBuffer>()          // scales
                                  .Arg<ffi::AnyBuffer>()          // mins
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows: x's rows past it are padding
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Attr<bool>("int4")
                                  .Attr<bool>("q8")
                                  .Attr<bool>("tiled"));
