// Ragged paged attention on the CPU, as an XLA FFI custom call; and the in-place K/V write that feeds it
// (write_kv, at the end).
//
// Why: through XLA:CPU, paged attention gathers every KV chunk into fresh buffers, transposes them for its einsums
// and pads queries into blocks of 16 (a decode row of a mixed step costs a 16-query block); it was 40-70% of a
// batched step (docs/performance.md). Here each work item reads its row's pages in place, once, for all the query
// heads that share a KV head, and a row costs what its own queries see.
//
// Layout (pallas_kernels/kv_cache.py, jaxserve/model/step_inputs.py):
//   q             float32 [T, N, H]           N = K * G, query head n reads KV head n / G
//   kv            f32/bf16/f16 [L, P, S, 2K, H]  K of head k at 2k, its V at 2k + 1
//   layer         int32 []
//   positions     int32 [T]                   each token's position in its sequence
//   page_tables   int32 [R, P_max]
//   kv_lens       int32 [R]                   KV tokens of each row, this step's included
//   query_starts  int32 [R + 1]               row r's tokens are [query_starts[r], query_starts[r + 1])
//   out           float32 [T, N, H]           zero for padding tokens (past query_starts[R])
//
// A query at position p sees KV positions [0, min(p + 1, kv_len)): nothing past a row's length is ever read, so
// whatever a page holds beyond it (another user's data, NaN) cannot reach the output.
//
// Work items: (row, KV head, up to kQueryTile consecutive query tokens), largest first, shared out on XLA's
// intra-op pool. An item walks its KV in blocks of 16 tokens with an online softmax per query vector:
// 16 scores come out of one register (hsum16), exp is vectorised, and the accumulator stays in registers while a
// block's V rows stream through.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 16;       // KV tokens per block: one zmm of scores
constexpr int kQueryTile = 16;   // query tokens of one row per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for float32 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial, 2^n by scalef), about
// 1 ulp; lanes below -87.3 give ~1e-38, not 0 (callers zero masked lanes themselves).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of v[i]'s 16 lanes: pairwise unpacks within 128-bit lanes, then across them.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

enum class KVType { kF32, kBF16, kF16 };

// Up to 16 stored values → float32 (lanes outside `mask` read nothing and are zero).
template <KVType KT>
inline __m512 load16(const void* p, __mmask16 mask) {
  if constexpr (KT == KVType::kF32) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (KT == KVType::kF16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  } else {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
}

// Lanes of vector v of a head of H values: all 16, or H % 16 for the last one (H = 8).
template <int H>
constexpr __mmask16 lanes(int v) {
  return (H % 16 != 0 && v == (H + 15) / 16 - 1) ? static_cast<__mmask16>((1u << (H % 16)) - 1) : 0xFFFF;
}

struct Problem {
  const float* q;            // [T, N, H]
  const char* kv;            // this layer's pages [P, S, 2K, H]
  const int32_t* positions;  // [T]
  const int32_t* tables;     // [R, P_max]
  const int32_t* kv_lens;    // [R]
  float* out;                // [T, N, H]
  int64_t N, K, G, H, S, P_max, elem;
  float scale;
};

struct Item {
  int32_t row, head, t0, nt, stop;  // stop: the most KV tokens any of its queries sees
  int64_t cost;
};

// Scratch of one thread: accumulators, running max and sum per query vector, a block of converted K / V rows.
struct Scratch {
  std::vector<float> acc, m, l, kbuf, vbuf;
};

// One work item: G * nt query vectors against KV [0, stop) of one row and one KV head.
template <KVType KT, int H>
void run_item(const Problem& p, const Item& it, Scratch& s) {
  constexpr int NV = (H + 15) / 16;  // zmm registers per head vector
  constexpr int HP = 16 * NV;  // H padded to whole registers (scratch rows)
  const int64_t nq = it.nt * p.G, row_stride = 2 * p.K * H;
  s.acc.assign(nq * HP, 0.0f);
  s.m.assign(nq, kNegInf);
  s.l.assign(nq, 0.0f);
  s.kbuf.resize(kBlock * HP);
  s.vbuf.resize(kBlock * HP);
  const int32_t* table = p.tables + static_cast<int64_t>(it.row) * p.P_max;
  const int32_t kv_len = p.kv_lens[it.row];
  alignas(64) float probs[kBlock];
  const float* krow[kBlock];
  const float* vrow[kBlock];
  for (int32_t b0 = 0; b0 < it.stop; b0 += kBlock) {
    const int nb = std::min<int32_t>(kBlock, it.stop - b0);
    for (int t = 0; t < nb; ++t) {
      const int32_t pos = b0 + t;
      const char* base = p.kv + ((static_cast<int64_t>(table[pos / p.S]) * p.S + pos % p.S) * row_stride +
                                 2 * it.head * H) * p.elem;
      if constexpr (KT == KVType::kF32 && H % 16 == 0) {
        krow[t] = reinterpret_cast<const float*>(base);
        vrow[t] = reinterpret_cast<const float*>(base) + H;
      } else {  // widened (and for H = 8, padded with zeros) into scratch rows of HP
        for (int v = 0; v < NV; ++v) {
          _mm512_storeu_ps(&s.kbuf[t * HP + 16 * v], load16<KT>(base + 16 * v * p.elem, lanes<H>(v)));
          _mm512_storeu_ps(&s.vbuf[t * HP + 16 * v], load16<KT>(base + (H + 16 * v) * p.elem, lanes<H>(v)));
        }
        krow[t] = &s.kbuf[t * HP];
        vrow[t] = &s.vbuf[t * HP];
      }
    }
    for (int64_t j = 0; j < nq; ++j) {
      const int64_t tok = it.t0 + j / p.G, head = it.head * p.G + j % p.G;
      const int32_t limit = std::min<int32_t>(kv_len, p.positions[tok] + 1);  // KV this query sees
      const int valid = std::min<int32_t>(nb, limit - b0);
      if (valid <= 0) continue;
      const float* qrow = p.q + (tok * p.N + head) * H;
      __m512 qv[NV];
      for (int v = 0; v < NV; ++v) {
        qv[v] = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes<H>(v), qrow + 16 * v), _mm512_set1_ps(p.scale));
      }
      __m512 part[kBlock];
      for (int t = 0; t < kBlock; ++t) {
        if (t >= valid) {
          part[t] = _mm512_setzero_ps();
          continue;
        }
        __m512 d = _mm512_mul_ps(qv[0], _mm512_loadu_ps(krow[t]));
        for (int v = 1; v < NV; ++v) d = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(krow[t] + 16 * v), d);
        part[t] = d;
      }
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      const __m512 scores = hsum16(part);
      const float m_old = s.m[j];
      const float m_new = std::max(m_old, _mm512_mask_reduce_max_ps(mask, scores));
      const __m512 pr = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(scores, _mm512_set1_ps(m_new))));
      const float alpha = m_old == kNegInf ? 0.0f : std::exp(m_old - m_new);
      s.m[j] = m_new;
      s.l[j] = s.l[j] * alpha + _mm512_reduce_add_ps(pr);
      _mm512_store_ps(probs, pr);
      float* acc = &s.acc[j * HP];
      __m512 a[NV];
      const __m512 al = _mm512_set1_ps(alpha);
      for (int v = 0; v < NV; ++v) a[v] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * v), al);
      for (int t = 0; t < valid; ++t) {
        const __m512 pt = _mm512_set1_ps(probs[t]);
        for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vrow[t] + 16 * v), a[v]);
      }
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + 16 * v, a[v]);
    }
  }
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t tok = it.t0 + j / p.G, head = it.head * p.G + j % p.G;
    float* dst = p.out + (tok * p.N + head) * H;
    const __m512 inv = _mm512_set1_ps(s.l[j] > 0 ? 1.0f / s.l[j] : 0.0f);
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(dst + 16 * v, lanes<H>(v), _mm512_mul_ps(_mm512_loadu_ps(&s.acc[j * HP + 16 * v]), inv));
    }
  }
}

template <KVType KT, int H>
void run_all(ffi::ThreadPool& pool, const Problem& p, const std::vector<Item>& items) {
  jaxserve::parallel_for(pool, static_cast<int64_t>(items.size()), [&](int64_t i) {
    thread_local Scratch scratch;
    run_item<KT, H>(p, items[i], scratch);
  });
}

template <KVType KT>
ffi::Error dispatch_h(ffi::ThreadPool& pool, const Problem& p, const std::vector<Item>& items) {
  switch (p.H) {
    case 8: run_all<KT, 8>(pool, p, items); break;
    case 16: run_all<KT, 16>(pool, p, items); break;
    case 32: run_all<KT, 32>(pool, p, items); break;
    case 64: run_all<KT, 64>(pool, p, items); break;
    case 128: run_all<KT, 128>(pool, p, items); break;
    case 256: run_all<KT, 256>(pool, p, items); break;
    default: return ffi::Error::InvalidArgument("cpu_attention: head_dim must be 8, 16, 32, 64, 128 or 256");
  }
  return ffi::Error::Success();
}

ffi::Error attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv, ffi::Buffer<ffi::S32> layer,
                     ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> page_tables,
                     ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> query_starts,
                     ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = kv.dimensions(), td = page_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2 || kd[3] % 2 != 0 || kd[4] != qd[2]) {
    return ffi::Error::InvalidArgument("cpu_attention: want q [T, N, H], kv [L, P, S, 2K, H], tables [R, P_max]");
  }
  Problem p{};
  const int64_t T = qd[0], L = kd[0], P = kd[1], R = td[0];
  p.N = qd[1];
  p.H = qd[2];
  p.S = kd[2];
  p.K = kd[3] / 2;
  p.G = p.N / p.K;
  p.P_max = td[1];
  p.elem = ffi::ByteWidth(kv.element_type());
  p.scale = scale;
  if (p.G * p.K != p.N || positions.dimensions()[0] != T || kv_lens.dimensions()[0] != R ||
      query_starts.dimensions()[0] != R + 1) {
    return ffi::Error::InvalidArgument("cpu_attention: heads, positions, kv_lens or query_starts disagree");
  }
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("cpu_attention: layer index out of range");
  p.q = q.typed_data();
  p.kv = static_cast<const char*>(kv.untyped_data()) + static_cast<int64_t>(l) * P * p.S * 2 * p.K * p.H * p.elem;
  p.positions = positions.typed_data();
  p.tables = page_tables.typed_data();
  p.kv_lens = kv_lens.typed_data();
  p.out = out->typed_data();
  const int32_t* qs = query_starts.typed_data();

  // Work items, checked against the buffers first: a bad page id or length must be an error, not a wild read.
  std::vector<Item> items;
  for (int64_t r = 0; r < R; ++r) {
    const int32_t begin = qs[r], end = qs[r + 1], kv_len = p.kv_lens[r];
    if (begin < 0 || end < begin || end > T) return ffi::Error::InvalidArgument("cpu_attention: bad query_starts");
    if (end == begin) continue;
    if (kv_len < 0 || kv_len > p.P_max * p.S) return ffi::Error::InvalidArgument("cpu_attention: bad kv_lens");
    for (int32_t i = 0; i < (kv_len + p.S - 1) / p.S; ++i) {
      const int32_t page = p.tables[r * p.P_max + i];
      if (page < 0 || page >= P) return ffi::Error::InvalidArgument("cpu_attention: page id out of range");
    }
    for (int32_t t0 = begin; t0 < end; t0 += kQueryTile) {
      const int32_t nt = std::min(kQueryTile, end - t0);
      int32_t last = 0;
      for (int32_t t = t0; t < t0 + nt; ++t) last = std::max(last, p.positions[t] + 1);
      const int32_t stop = std::min(kv_len, last);
      for (int32_t k = 0; k < p.K; ++k) {
        items.push_back({static_cast<int32_t>(r), k, t0, nt, stop, static_cast<int64_t>(nt) * stop});
      }
    }
  }
  // Padding tokens (and any token no item covers) read as zeros.
  const int32_t covered = R > 0 ? qs[R] : 0;
  if (covered < T) std::memset(p.out + covered * p.N * p.H, 0, (T - covered) * p.N * p.H * sizeof(float));
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  switch (kv.element_type()) {
    case ffi::F32: return dispatch_h<KVType::kF32>(pool, p, items);
    case ffi::BF16: return dispatch_h<KVType::kBF16>(pool, p, items);
    case ffi::F16: return dispatch_h<KVType::kF16>(pool, p, items);
    default: return ffi::Error::InvalidArgument("cpu_attention: KV pages must be float32, bfloat16 or float16");
  }
}

// ------------------------------------------------------------------------------------ the KV write

// float32 -> bfloat16 bits, rounding to nearest even as XLA's convert does (NaN stays a quiet NaN).
inline uint16_t to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Writes this step's K/V [T, 2K, H] (float32) into their slots of one layer, rounded to the pages' dtype.
// The pages operand is aliased to the result, so the write is in place. NOTE(why): through XLA:CPU a bfloat16 or
// float16 cache cannot be scattered in place (a 16-bit float scatter is upcast, and the uint16 bitcast around it
// is materialised): every layer copied the whole cache, seconds a step.
ffi::Error write_kv(ffi::AnyBuffer pages, ffi::Buffer<ffi::F32> kv, ffi::Buffer<ffi::S32> layer,
                    ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> out) {
  auto pd = pages.dimensions(), kd = kv.dimensions();
  if (pd.size() != 5 || kd.size() != 3 || kd[1] != pd[3] || kd[2] != pd[4] || slots.dimensions()[0] != kd[0]) {
    return ffi::Error::InvalidArgument("cpu_write_kv: want pages [L, P, S, 2K, H], kv [T, 2K, H], slots [T]");
  }
  const int64_t L = pd[0], slots_per_layer = pd[1] * pd[2], row = kd[1] * kd[2], T = kd[0];
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("cpu_write_kv: layer index out of range");
  const int64_t elem = ffi::ByteWidth(pages.element_type());
  if (out->untyped_data() != pages.untyped_data()) {  // not aliased after all: start from a copy
    std::memcpy(out->untyped_data(), pages.untyped_data(), L * slots_per_layer * row * elem);
  }
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0 || slot[t] >= slots_per_layer) return ffi::Error::InvalidArgument("cpu_write_kv: slot out of range");
  }
  char* base = static_cast<char*>(out->untyped_data()) + static_cast<int64_t>(l) * slots_per_layer * row * elem;
  const float* src = kv.typed_data();
  for (int64_t t = 0; t < T; ++t, src += row) {
    char* dst = base + static_cast<int64_t>(slot[t]) * row * elem;
    switch (pages.element_type()) {
      case ffi::F32:
        std::memcpy(dst, src, row * sizeof(float));
        break;
      case ffi::BF16:
        for (int64_t i = 0; i < row; ++i) reinterpret_cast<uint16_t*>(dst)[i] = to_bf16(src[i]);
        break;
      case ffi::F16:
        for (int64_t i = 0; i < row; ++i) {
          reinterpret_cast<uint16_t*>(dst)[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        break;
      default:
        return ffi::Error::InvalidArgument("cpu_write_kv: KV pages must be float32, bfloat16 or float16");
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveAttention, attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::AnyBuffer>()          // kv pages
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_tables
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()   // query_starts
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveWriteKV, write_kv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // pages (aliased to the result)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv [T, 2K, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots [T]
                                  .Ret<ffi::AnyBuffer>());        // pages
