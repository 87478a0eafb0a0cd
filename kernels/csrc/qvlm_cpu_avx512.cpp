// qvlm CPU kernels, AVX-512 variants (AVX512F/BW/VL + VNNI + BF16: Intel Sapphire Rapids and
// later, AMD Zen 4 and later). Compiled for that instruction set by the pragma below and called
// from qvlm_cpu.cpp only after a runtime CPU-feature check; the AVX2 kernels stay in use
// elsewhere. Same packed weight layouts as the AVX2 kernels (see qvlm_cpu.cpp), so switching
// instruction sets needs no repacking. Headers are included before the target pragma and this
// file's helpers have internal linkage, so no AVX-512 code can be merged into functions that
// AVX2-only processors run.
//
// * w4a16 (bf16 activations): vdpbf16ps. A word holds 8 K rows of one column, nibble j at bits
//   [4j, 4j+4); (word >> 4j) & 0x000F000F puts rows j and j+4 in the two 16-bit halves, and
//   OR 0x4300 makes each the bf16 number 128 + code (exact). The activation pair
//   (x[j], x[j+4]) is bf16 already (nothing is rounded), the products are exact and summed in
//   fp32; the offset is removed per group as -(128 + zero) * sum(x over the group).
// * w4a16 on AMX (bf16 activations, 1..16 token rows): the same bf16 pairs (128 + code) are
//   written to a 16 x 32 B tile per 32 K rows, and TDPBF16PS multiplies all token rows at once,
//   so a batch costs about what one token does; fp32 tile sums are flushed per group.
// * w4a8: vpdpbusd, u4 weights (as u8) x s8 activations, exact int32 (as the AVX2 kernel).
// * w8a8: vpdpbusd on (activation + 128) as u8 x s8 weights, exact int32; the offset is
//   removed as -128 * sum(w over K), accumulated alongside. Two k-pairs of the AVX2 layout
//   (32 bytes each) are interleaved with one vpermw into 16 columns x 4 consecutive k.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <utility>

#include "qvlm_cpu.h"

// After the includes: only this file's own functions are compiled for AVX-512.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,amx-tile,amx-bf16")

namespace {

using qvlm::RB;
using qvlm::ST;
using qvlm::W4Layout;

template <int N, typename F>
__attribute__((always_inline)) inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Software prefetch distance in 64-byte weight lines (one supertile streams one line per 8 K
// rows); 16 measured faster than 8 on a Sapphire Rapids core at one thread.
constexpr int kPrefetchLines = 16;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m512 load_h16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load_z16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512i load_z16i(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

// One supertile's weight words, scales and zero points.
struct Tile4 {
  const int32_t* w;
  const uint16_t* s;
  const uint8_t* z;  // nullptr: implicit zero 8
  Tile4() = default;
  Tile4(const W4Layout& L, int64_t st)
      : w(L.w + st * L.K8 * ST), s(L.s + st * L.G * ST), z(L.z ? L.z + st * L.G * ST : nullptr) {}
};

template <int MR>
inline void zero_tile(float* out) {
  unroll<MR>([&](auto m) { _mm512_storeu_ps(out + m * ST, _mm512_setzero_ps()); });
}

// ---- w4a16, bf16 activations --------------------------------------------------------------
// MR token rows x NT supertiles side by side (NT > 1 only for one row: several weight streams in
// flight keep a single token's pass closer to the memory rate). out: [NT][RB][16].
template <int MR, int XS, int NT = 1>
__attribute__((flatten)) void w4a16_bf16(const W4Layout& L, int64_t st, const uint32_t* xp, const float* gsum,
                                         float* out) {
  static_assert(NT == 1 || MR == 1);
  unroll<NT>([&](auto n) { zero_tile<MR>(out + n * RB * ST); });
  Tile4 t[NT];
  for (int n = 0; n < NT; ++n) t[n] = Tile4(L, st + n);
  const __m512i mask = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = min64(L.K8, kb + L.gw);
    __m512 acc[NT * MR * 4];
    unroll<NT * MR * 4>([&](auto i) { acc[i] = _mm512_setzero_ps(); });
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      const uint32_t* xk = xp + k8 * 4 * XS;
      unroll<NT>([&](auto n) {
        const __m512i q = _mm512_loadu_si512(t[n].w + k8 * ST);
        _mm_prefetch(reinterpret_cast<const char*>(t[n].w + (k8 + kPrefetchLines) * ST), _MM_HINT_T0);
        unroll<4>([&](auto j) {
          const __m512i sh = j == 0 ? q : _mm512_srli_epi32(q, 4 * j);
          const __m512i b = _mm512_ternarylogic_epi32(sh, mask, bias, 0xEA);  // (sh & mask) | bias
          unroll<MR>([&](auto m) {
            const __m512i xb = _mm512_set1_epi32(static_cast<int>(xk[j * XS + m]));
            constexpr int i = (n * MR + m) * 4 + j;
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)b, (__m512bh)xb);
          });
        });
      });
    }
    unroll<NT>([&](auto n) {
      const __m512 s = load_h16(t[n].s + g * ST);
      const __m512 off =
          _mm512_add_ps(t[n].z ? load_z16(t[n].z + g * ST) : _mm512_set1_ps(8.f), _mm512_set1_ps(128.f));
      const __m512 zs = _mm512_mul_ps(s, off);
      unroll<MR>([&](auto m) {
        constexpr int i = (n * MR + m) * 4;
        const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[i], acc[i + 1]), _mm512_add_ps(acc[i + 2], acc[i + 3]));
        float* o = out + n * RB * ST + m * ST;
        const __m512 tot = _mm512_fmadd_ps(a, s, _mm512_loadu_ps(o));
        _mm512_storeu_ps(o, _mm512_fnmadd_ps(zs, _mm512_set1_ps(gsum[g * XS + m]), tot));
      });
    });
  }
}

// ---- w4a8 -----------------------------------------------------------------------------------
// MR token rows x NT supertiles (NT > 1 only for one row, as for w4a16). out: [NT][RB][16].
template <int MR, int XS, int NT = 1>
__attribute__((flatten)) void w4a8(const W4Layout& L, int64_t st, const int8_t* xq, const int32_t* qsum,
                                   float* out) {
  static_assert(NT == 1 || MR == 1);
  unroll<NT>([&](auto n) { zero_tile<MR>(out + n * RB * ST); });
  Tile4 t[NT];
  for (int n = 0; n < NT; ++n) t[n] = Tile4(L, st + n);
  const __m512i lowmask = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = min64(L.K8, kb + L.gw);
    __m512i acc[NT * MR * 2];
    unroll<NT * MR * 2>([&](auto i) { acc[i] = _mm512_setzero_si512(); });
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      const int8_t* xk = xq + k8 * XS * 8;
      unroll<NT>([&](auto n) {
        const __m512i q = _mm512_loadu_si512(t[n].w + k8 * ST);
        _mm_prefetch(reinterpret_cast<const char*>(t[n].w + (k8 + kPrefetchLines) * ST), _MM_HINT_T0);
        const __m512i lo = _mm512_and_si512(q, lowmask), hi = _mm512_and_si512(_mm512_srli_epi32(q, 4), lowmask);
        unroll<MR>([&](auto m) {
          constexpr int i = (n * MR + m) * 2;
          acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(load_i32(xk + m * 8)));
          acc[i + 1] = _mm512_dpbusd_epi32(acc[i + 1], hi, _mm512_set1_epi32(load_i32(xk + m * 8 + 4)));
        });
      });
    }
    unroll<NT>([&](auto n) {
      const __m512 s = load_h16(t[n].s + g * ST);
      const __m512i zv = t[n].z ? load_z16i(t[n].z + g * ST) : _mm512_set1_epi32(8);
      unroll<MR>([&](auto m) {
        constexpr int i = (n * MR + m) * 2;
        const __m512i a = _mm512_sub_epi32(_mm512_add_epi32(acc[i], acc[i + 1]),
                                           _mm512_mullo_epi32(zv, _mm512_set1_epi32(qsum[g * XS + m])));
        float* o = out + n * RB * ST + m * ST;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, _mm512_loadu_ps(o)));
      });
    });
  }
}

// ---- w8a8 -----------------------------------------------------------------------------------
template <int MR, int XS>
__attribute__((flatten)) void w8a8(const int8_t* w, int64_t KP, const uint8_t* xq, float* out) {
  // u16 c of k-pair 2i and u16 c of k-pair 2i+1 -> 32-bit lane c (4 consecutive k of column c).
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i u128 = _mm512_set1_epi32(static_cast<int>(0x80808080u));
  constexpr int SPLIT = MR == 1 ? 2 : 1;
  __m512i acc[MR * SPLIT], wsum = _mm512_setzero_si512();
  unroll<MR * SPLIT>([&](auto i) { acc[i] = _mm512_setzero_si512(); });
  for (int64_t kq = 0; kq < KP / 2; ++kq) {
    const __m512i wv = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(w + kq * 64));
    _mm_prefetch(reinterpret_cast<const char*>(w + (kq + kPrefetchLines) * 64), _MM_HINT_T0);
    wsum = _mm512_dpbusd_epi32(wsum, u128, wv);
    const uint8_t* xk = xq + kq * XS * 4;
    unroll<MR>([&](auto m) {
      auto& a = acc[m * SPLIT + (SPLIT == 2 ? (kq & 1) : 0)];
      a = _mm512_dpbusd_epi32(a, _mm512_set1_epi32(load_i32(xk + m * 4)), wv);
    });
  }
  unroll<MR>([&](auto m) {
    __m512i a = acc[m * SPLIT];
    if constexpr (SPLIT == 2) a = _mm512_add_epi32(a, acc[m * SPLIT + 1]);
    _mm512_storeu_ps(out + m * ST, _mm512_cvtepi32_ps(_mm512_sub_epi32(a, wsum)));
  });
}


// ---- w4a16 on AMX tiles ---------------------------------------------------------------------
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles: 0, 1 = fp32 sums (even / odd K steps), 2 = activations, 3 = weights.
void load_tiles(int rows) {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 4; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[1] = c.rows[2] = static_cast<uint8_t>(rows);
  c.rows[3] = 16;
  _tile_loadconfig(&c);
}

// 4 lines (32 K rows) of one supertile as 16 rows of bf16 pairs; lines past `nl` are zero.
inline void decode_b(const int32_t* wk, int64_t nl, uint32_t* b) {
  const __m512i mask = _mm512_set1_epi32(0x000F000F), bias = _mm512_set1_epi32(0x43004300);
  for (int64_t l = 0; l < 4; ++l) {
    if (l >= nl) {
      unroll<4>([&](auto j) { _mm512_store_si512(b + (l * 4 + j) * ST, _mm512_setzero_si512()); });
      continue;
    }
    const __m512i q = _mm512_loadu_si512(wk + l * ST);
    unroll<4>([&](auto j) {
      const __m512i sh = j == 0 ? q : _mm512_srli_epi32(q, 4 * j);
      _mm512_store_si512(b + (l * 4 + j) * ST, _mm512_ternarylogic_epi32(sh, mask, bias, 0xEA));
    });
  }
}


// GEMM tiles: 0-4 = fp32 sums of up to 5 blocks of 16 token rows (the last, nb - 1, may have
// fewer), 5 = activations of a full block, 6 = activations of the last block, 7 = weights.
void load_gemm_tiles(int nb, int last_rows) {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  c.rows[nb - 1] = c.rows[6] = static_cast<uint8_t>(last_rows);  // the last block's sums and activations
  _tile_loadconfig(&c);
}

// The tile intrinsics take literal tile numbers: C tile i (0..4) by a switch that folds away.
#define QVLM_TILE_CASES(STMT) \
  switch (i) {                \
    case 0: STMT(0); break;   \
    case 1: STMT(1); break;   \
    case 2: STMT(2); break;   \
    case 3: STMT(3); break;   \
    default: STMT(4); break;  \
  }
inline void c_zero(int i) {
#define QVLM_Z(T) _tile_zero(T)
  QVLM_TILE_CASES(QVLM_Z)
#undef QVLM_Z
}
inline void c_store(int i, float* p, int64_t stride) {
#define QVLM_S(T) _tile_stored(T, p, stride)
  QVLM_TILE_CASES(QVLM_S)
#undef QVLM_S
}
inline void c_dp_full(int i) {  // C_i += A(5) B(7)
#define QVLM_D(T) _tile_dpbf16ps(T, 5, 7)
  QVLM_TILE_CASES(QVLM_D)
#undef QVLM_D
}
inline void c_dp_last(int i) {  // C_i += A(6) B(7)
#define QVLM_D(T) _tile_dpbf16ps(T, 6, 7)
  QVLM_TILE_CASES(QVLM_D)
#undef QVLM_D
}
#undef QVLM_TILE_CASES

// One line of a supertile, dequantized ((code - zero) * scale, rounded to bf16), as 4 B-tile
// rows of pairs (w[8i+j], w[8i+j+4]).
inline void decode_b_dequant(__m512i q, __m512 s, __m512 zs, uint32_t* b) {
  const __m512i m4 = _mm512_set1_epi32(0xF);
  // cvtne2ps gives [16 x lo | 16 x hi]; interleave to (lo_c, hi_c) per column.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  unroll<4>([&](auto j) {
    const __m512i cl = _mm512_and_si512(j == 0 ? q : _mm512_srli_epi32(q, 4 * j), m4);
    const __m512i ch = _mm512_and_si512(_mm512_srli_epi32(q, 4 * j + 16), m4);
    const __m512 lo = _mm512_fmsub_ps(_mm512_cvtepi32_ps(cl), s, zs);
    const __m512 hi = _mm512_fmsub_ps(_mm512_cvtepi32_ps(ch), s, zs);
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    _mm512_store_si512(b + j * ST, _mm512_permutexvar_epi16(idx, both));
  });
}
}  // namespace

namespace qvlm::avx512 {

bool amx_enable() {
  // Linux >= 5.16: a process must ask before using the AMX tile data (ARCH_REQ_XCOMP_PERM,
  // XFEATURE_XTILEDATA); granting it twice is harmless.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

void w4_gemm_amx(const W4Layout& L, int64_t st0, int64_t st1, int rows, const uint32_t* xa, int64_t lda,
                 float* out, int64_t ldo) {
  const int nb = (rows + 15) / 16, last = rows - (nb - 1) * 16;
  alignas(64) uint32_t bbuf[2][16 * ST];
  load_gemm_tiles(nb, last);
  for (int64_t st = st0; st < st1; ++st) {
    const Tile4 t(L, st);
    // 4 lines (32 K rows) from k8 as one weight tile; lines past K are zero.
    auto decode = [&](int64_t k8, uint32_t* b) {
      for (int64_t l = 0; l < 4; ++l) {
        if (k8 + l >= L.K8) {
          unroll<4>([&](auto j) { _mm512_store_si512(b + (l * 4 + j) * ST, _mm512_setzero_si512()); });
          continue;
        }
        const int64_t g = (k8 + l) / L.gw;
        const __m512 s = load_h16(t.s + g * ST);
        const __m512 zs = _mm512_mul_ps(s, t.z ? load_z16(t.z + g * ST) : _mm512_set1_ps(8.f));
        decode_b_dequant(_mm512_loadu_si512(t.w + (k8 + l) * ST), s, zs, b + l * 4 * ST);
      }
      _mm_prefetch(reinterpret_cast<const char*>(t.w + (k8 + kPrefetchLines) * ST), _MM_HINT_T0);
    };
    for (int i = 0; i < nb; ++i) c_zero(i);
    // Software-pipelined: the weight tile of step n + 1 is written while step n's is multiplied,
    // so a tile load never waits on stores just issued.
    decode(0, bbuf[0]);
    int step = 0;
    for (int64_t k8 = 0; k8 < L.K8; k8 += 4, ++step) {
      if (k8 + 4 < L.K8) decode(k8 + 4, bbuf[(step + 1) & 1]);
      _tile_loadd(7, bbuf[step & 1], 64);
      for (int i = 0; i < nb; ++i) {
        const uint32_t* a = xa + i * 16 * lda + k8 * 4;
        if (i == nb - 1) {
          _tile_loadd(6, a, lda * 4);
          c_dp_last(i);
        } else {
          _tile_loadd(5, a, lda * 4);
          c_dp_full(i);
        }
      }
    }
    float* o = out + (st - st0) * ST;
    for (int i = 0; i < nb; ++i) c_store(i, o + i * 16 * ldo, ldo * 4);
  }
  _tile_release();
}

void w4a16_amx(const W4Layout& L, int64_t st0, int64_t st1, int rows, const uint32_t* xa, int64_t lda,
               const float* gsum, float* out) {
  alignas(64) uint32_t bbuf[2][16 * ST];
  alignas(64) float cbuf[2][16 * ST];
  load_tiles(rows);
  for (int64_t st = st0; st < st1; ++st) {
    float* o = out + (st - st0) * 16 * ST;
    for (int m = 0; m < rows; ++m) _mm512_storeu_ps(o + m * ST, _mm512_setzero_ps());
    const Tile4 t(L, st);
    for (int64_t g = 0; g < L.G; ++g) {
      const int64_t kb = g * L.gw, ke = min64(L.K8, kb + L.gw);
      _tile_zero(0);
      _tile_zero(1);
      int step = 0;
      for (int64_t k8 = kb; k8 < ke; k8 += 4, ++step) {
        uint32_t* b = bbuf[step & 1];
        decode_b(t.w + k8 * ST, ke - k8, b);
        _mm_prefetch(reinterpret_cast<const char*>(t.w + (k8 + kPrefetchLines) * ST), _MM_HINT_T0);
        _tile_loadd(3, b, 64);
        _tile_loadd(2, xa + k8 * 4, lda * 4);
        if (step & 1)
          _tile_dpbf16ps(1, 2, 3);
        else
          _tile_dpbf16ps(0, 2, 3);
      }
      _tile_stored(0, cbuf[0], 64);
      _tile_stored(1, cbuf[1], 64);
      const __m512 s = load_h16(t.s + g * ST);
      const __m512 zs =
          _mm512_mul_ps(s, _mm512_add_ps(t.z ? load_z16(t.z + g * ST) : _mm512_set1_ps(8.f), _mm512_set1_ps(128.f)));
      for (int m = 0; m < rows; ++m) {
        const __m512 a = _mm512_add_ps(_mm512_load_ps(cbuf[0] + m * ST), _mm512_load_ps(cbuf[1] + m * ST));
        const __m512 tot = _mm512_fmadd_ps(a, s, _mm512_loadu_ps(o + m * ST));
        _mm512_storeu_ps(o + m * ST, _mm512_fnmadd_ps(zs, _mm512_set1_ps(gsum[m * L.G + g]), tot));
      }
    }
  }
  _tile_release();
}

void w4a16_bf16_tile(const W4Layout& L, int64_t st, int rows, int xs, const uint32_t* xp, const float* gsum,
                     float* out) {
  switch (rows) {
    case 1: return xs == 1 ? w4a16_bf16<1, 1>(L, st, xp, gsum, out) : w4a16_bf16<1, RB>(L, st, xp, gsum, out);
    case 2: return w4a16_bf16<2, RB>(L, st, xp, gsum, out);
    case 3: return w4a16_bf16<3, RB>(L, st, xp, gsum, out);
    default: return w4a16_bf16<4, RB>(L, st, xp, gsum, out);
  }
}

void w4_dequant_bf16(const W4Layout& L, int64_t st0, int64_t st1, uint16_t* dst, int64_t ldd) {
  // Row-major order (8 K rows at a time across all the supertiles), so each output row is
  // written contiguously.
  const __m512i m4 = _mm512_set1_epi32(0xF);
  for (int64_t k8 = 0; k8 < L.K8; ++k8) {
    const int64_t g = k8 / L.gw;
    for (int64_t st = st0; st < st1; ++st) {
      const Tile4 t(L, st);
      const __m512 s = load_h16(t.s + g * ST);
      const __m512 zs = _mm512_mul_ps(s, t.z ? load_z16(t.z + g * ST) : _mm512_set1_ps(8.f));
      const __m512i q = _mm512_loadu_si512(t.w + k8 * ST);
      uint16_t* col = dst + (st - st0) * ST;
      unroll<8>([&](auto j) {
        const __m512i c = _mm512_and_si512(j == 0 ? q : _mm512_srli_epi32(q, 4 * j), m4);
        const __m256bh b = _mm512_cvtneps_pbh(_mm512_fmsub_ps(_mm512_cvtepi32_ps(c), s, zs));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(col + (k8 * 8 + j) * ldd), (__m256i)b);
      });
    }
  }
}

void w4a16_bf16_row(const W4Layout& L, int64_t st, const uint32_t* xp, const float* gsum, float* out) {
  w4a16_bf16<1, 1, kRowSupertiles>(L, st, xp, gsum, out);
}

void w4a8_row(const W4Layout& L, int64_t st, const int8_t* xq, const int32_t* qsum, float* out) {
  w4a8<1, 1, kRowSupertiles>(L, st, xq, qsum, out);
}

void w4a8_tile(const W4Layout& L, int64_t st, int rows, int xs, const int8_t* xq, const int32_t* qsum,
               float* out) {
  switch (rows) {
    case 1: return xs == 1 ? w4a8<1, 1>(L, st, xq, qsum, out) : w4a8<1, RB>(L, st, xq, qsum, out);
    case 2: return w4a8<2, RB>(L, st, xq, qsum, out);
    case 3: return w4a8<3, RB>(L, st, xq, qsum, out);
    default: return w4a8<4, RB>(L, st, xq, qsum, out);
  }
}

void w8a8_tile(const int8_t* w, int64_t KP, int rows, int xs, const uint8_t* xq, float* out) {
  switch (rows) {
    case 1: return xs == 1 ? w8a8<1, 1>(w, KP, xq, out) : w8a8<1, RB>(w, KP, xq, out);
    case 2: return w8a8<2, RB>(w, KP, xq, out);
    case 3: return w8a8<3, RB>(w, KP, xq, out);
    default: return w8a8<4, RB>(w, KP, xq, out);
  }
}

}  // namespace qvlm::avx512
