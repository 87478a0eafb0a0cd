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

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>

#include <c10/util/Exception.h>

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

// ---- w4a16, 16-bit activations as two int8 halves per group (vpdpbusd) ----------------------
// MR token rows x NT supertiles (NT > 1 only for one row). Each activation code c (|c| < 2^14,
// one power-of-two scale per group) is split as c = 256 h + l with h, l in int8, and the u4
// weights meet both halves through w4a8's vpdpbusd step (lo / hi nibbles x 4 K rows per lane):
// 4 vpdpbusd + 3 logic ops per weight vector where int16 pairs and vpdpwssd took 4 + 7 (one
// token row at 2 threads: 4-11% less time per layer on a Sapphire Rapids guest). xp: per word and row 16 bytes, [K8][XS][16]:
// h of rows 0 2 4 6, h of 1 3 5 7, l of 0 2 4 6, l of 1 3 5 7. qsum / ascale: the group's code
// sum and scale, [G][XS]. Each int32 sum holds 4 gw products of |code| <= 15 and |half| <= 128
// (the caller keeps gw <= kI16MaxGroupWords); the halves are combined in int32 where the group
// sum sum(w c) cannot overflow (8 gw products of 15 x 2^14, up to 1024 words), else in fp32.
constexpr int64_t kI16IntGroupWords = 1024;
template <int MR, int XS, int NT = 1>
__attribute__((flatten)) void w4a16_i16(const W4Layout& L, int64_t st, const uint32_t* xp, const float* qsum,
                                        const float* ascale, float* out) {
  static_assert(NT == 1 || MR == 1);
  unroll<NT>([&](auto n) { zero_tile<MR>(out + n * RB * ST); });
  Tile4 t[NT];
  for (int n = 0; n < NT; ++n) t[n] = Tile4(L, st + n);
  const __m512i lowmask = _mm512_set1_epi32(0x0F0F0F0F);
  const bool exact_int = L.gw <= kI16IntGroupWords;
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = min64(L.K8, kb + L.gw);
    __m512i acc[NT * MR * 4];
    unroll<NT * MR * 4>([&](auto i) { acc[i] = _mm512_setzero_si512(); });
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      const uint32_t* xk = xp + k8 * 4 * XS;
      unroll<NT>([&](auto n) {
        const __m512i q = _mm512_loadu_si512(t[n].w + k8 * ST);
        _mm_prefetch(reinterpret_cast<const char*>(t[n].w + (k8 + kPrefetchLines) * ST), _MM_HINT_T0);
        const __m512i lo = _mm512_and_si512(q, lowmask), hi = _mm512_and_si512(_mm512_srli_epi32(q, 4), lowmask);
        unroll<MR>([&](auto m) {
          constexpr int i = (n * MR + m) * 4;
          const uint32_t* xm = xk + m * 4;
          acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(static_cast<int>(xm[0])));
          acc[i + 1] = _mm512_dpbusd_epi32(acc[i + 1], hi, _mm512_set1_epi32(static_cast<int>(xm[1])));
          acc[i + 2] = _mm512_dpbusd_epi32(acc[i + 2], lo, _mm512_set1_epi32(static_cast<int>(xm[2])));
          acc[i + 3] = _mm512_dpbusd_epi32(acc[i + 3], hi, _mm512_set1_epi32(static_cast<int>(xm[3])));
        });
      });
    }
    unroll<NT>([&](auto n) {
      const __m512 s = load_h16(t[n].s + g * ST);
      const __m512 z = t[n].z ? load_z16(t[n].z + g * ST) : _mm512_set1_ps(8.f);
      unroll<MR>([&](auto m) {
        constexpr int i = (n * MR + m) * 4;
        const __m512i h = _mm512_add_epi32(acc[i], acc[i + 1]), l = _mm512_add_epi32(acc[i + 2], acc[i + 3]);
        const __m512 a = exact_int ? _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), l))
                                   : _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(l));
        const __m512 d = _mm512_fnmadd_ps(z, _mm512_set1_ps(qsum[g * XS + m]), a);
        float* o = out + n * RB * ST + m * ST;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(d, _mm512_mul_ps(s, _mm512_set1_ps(ascale[g * XS + m])), _mm512_loadu_ps(o)));
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


// ---- prefill GEMM on AMX tiles ---------------------------------------------------------------
// Tile steps (32 K rows each) per weight chunk: a 16-supertile panel's decoded chunk is 128 KiB
// (L2) and a supertile pair's 16 KiB (L1); the fp32 sums are reloaded once per chunk, 8 tile
// products later. (Measured on a Sapphire Rapids core at 588 x 4096 x 4096: 8 to 16 steps,
// 8 to 32 supertiles, either loop order and row groups of 96 to 608 are all within 10%.)
constexpr int64_t kGemmChunkSteps = 8;

// One K chunk of a panel's decoded weights, [kGemmPanel][kGemmChunkSteps][16 rows][16]: one
// buffer per thread for the process's life (128 KiB; allocated per call it would be fresh pages).
uint32_t* chunk_buffer() {
  struct Buf {
    uint32_t* p = static_cast<uint32_t*>(std::aligned_alloc(64, qvlm::avx512::kGemmPanel * kGemmChunkSteps * 1024));
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  TORCH_CHECK(buf.p, "qvlm_cpu: out of memory for the prefill GEMM's weight buffer");
  return buf.p;
}

// Tiles: 0-3 = fp32 sums C[m][n] (tile 2m + n), 4-5 = activations of row blocks m, 6-7 = weights
// of supertiles n; all 16 rows x 64 bytes (the activation rows are zero padded to 16).
void load_gemm_tiles() {
  alignas(64) TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// C (MB x NB tiles of 16 x 16 fp32 at c, row stride ldc floats) (+)= A (MB row blocks, row
// stride lda words) x B (NB supertiles, `steps` tiles each, 1 KiB apart). Tile numbers must be
// literals: the branches fold at compile time.
template <int MB, int NB>
__attribute__((always_inline)) inline void amx_block(const uint32_t* a0, const uint32_t* a1, const uint32_t* b0,
                                                     const uint32_t* b1, int64_t steps, float* c, int64_t ldc,
                                                     bool load) {
  const int64_t sc = ldc * 4;
  if (load) {
    _tile_loadd(0, c, sc);
    if constexpr (NB == 2) _tile_loadd(1, c + ST, sc);
    if constexpr (MB == 2) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MB == 2 && NB == 2) _tile_loadd(3, c + 16 * ldc + ST, sc);
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (MB == 2) _tile_zero(2);
    if constexpr (MB == 2 && NB == 2) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a0 + s * 16 * ST, 64);
    _tile_loadd(6, b0 + s * 16 * ST, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) {
      _tile_loadd(7, b1 + s * 16 * ST, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MB == 2) {
      _tile_loadd(5, a1 + s * 16 * ST, 64);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NB == 2) _tile_stored(1, c + ST, sc);
  if constexpr (MB == 2) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MB == 2 && NB == 2) _tile_stored(3, c + 16 * ldc + ST, sc);
}

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

void amx_pack_a(const uint16_t* x, int64_t M, int64_t K, int64_t blk0, int64_t blk1, uint32_t* xa) {
  // Output bf16 slot 2p / 2p + 1 of pair p = 4l + j holds x[8l + j] / x[8l + j + 4].
  alignas(64) uint16_t perm[32];
  for (int l = 0; l < 4; ++l)
    for (int j = 0; j < 4; ++j) {
      perm[2 * (4 * l + j)] = static_cast<uint16_t>(8 * l + j);
      perm[2 * (4 * l + j) + 1] = static_cast<uint16_t>(8 * l + j + 4);
    }
  const __m512i idx = _mm512_load_si512(perm);
  const int64_t ksteps = (K + 31) / 32;
  for (int64_t blk = blk0; blk < blk1; ++blk)
    for (int r = 0; r < 16; ++r) {
      const int64_t m = blk * 16 + r;
      uint32_t* dst = xa + blk * ksteps * 16 * ST + r * ST;
      if (m >= M) {
        for (int64_t s = 0; s < ksteps; ++s) _mm512_storeu_si512(dst + s * 16 * ST, _mm512_setzero_si512());
        continue;
      }
      const uint16_t* row = x + m * K;
      for (int64_t s = 0; s < ksteps; ++s) {
        const int64_t left = K - s * 32;
        const __mmask32 mk = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
        const __m512i v = _mm512_maskz_loadu_epi16(mk, row + s * 32);
        _mm512_storeu_si512(dst + s * 16 * ST, _mm512_permutexvar_epi16(idx, v));
      }
    }
}

void w4_gemm_amx(const W4Layout& L, int64_t st0, int64_t st1, int64_t rows, const uint32_t* xa, float* out,
                 int64_t ldo) {
  const int64_t nst = st1 - st0, ksteps = (L.K8 + 3) / 4;
  TORCH_CHECK(nst <= kGemmPanel, "qvlm_cpu: prefill GEMM panel wider than kGemmPanel");
  uint32_t* const bbuf = chunk_buffer();
  load_gemm_tiles();
  for (int64_t kc = 0; kc < ksteps; kc += kGemmChunkSteps) {
    const int64_t steps = min64(kGemmChunkSteps, ksteps - kc);
    for (int64_t i = 0; i < nst; ++i) {
      const Tile4 t(L, st0 + i);
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t k8 = 4 * (kc + s);
        uint32_t* b = bbuf + (i * steps + s) * 16 * ST;
        for (int64_t l = 0; l < 4; ++l) {
          if (k8 + l >= L.K8) {
            unroll<4>([&](auto j) { _mm512_store_si512(b + (l * 4 + j) * ST, _mm512_setzero_si512()); });
            continue;
          }
          const int64_t g = (k8 + l) / L.gw;
          const __m512 sc = load_h16(t.s + g * ST);
          const __m512 zs = _mm512_mul_ps(sc, t.z ? load_z16(t.z + g * ST) : _mm512_set1_ps(8.f));
          decode_b_dequant(_mm512_loadu_si512(t.w + (k8 + l) * ST), sc, zs, b + l * 4 * ST);
        }
      }
    }
    // Supertile pairs outside, 32-row blocks inside: the pair's weight tiles (16 KiB) stay in
    // L1 while the activations stream from L2.
    for (int64_t i = 0; i < nst; i += 2) {
      const uint32_t* b0 = bbuf + i * steps * 16 * ST;
      const uint32_t* b1 = b0 + steps * 16 * ST;
      const bool two_n = nst - i >= 2, acc = kc > 0;
      for (int64_t m0 = 0; m0 < rows; m0 += 32) {
        const uint32_t* a0 = xa + ((m0 / 16) * ksteps + kc) * 16 * ST;
        const uint32_t* a1 = a0 + ksteps * 16 * ST;
        float* c = out + m0 * ldo + i * ST;
        if (rows - m0 >= 32) {
          if (two_n) amx_block<2, 2>(a0, a1, b0, b1, steps, c, ldo, acc);
          else amx_block<2, 1>(a0, a1, b0, b0, steps, c, ldo, acc);
        } else {
          if (two_n) amx_block<1, 2>(a0, a1, b0, b1, steps, c, ldo, acc);
          else amx_block<1, 1>(a0, a1, b0, b0, steps, c, ldo, acc);
        }
      }
    }
  }
  _tile_release();
}

float quant_row_bf16(const uint16_t* x, int64_t K, uint16_t* q) {
  auto load = [&](int64_t k) {
    const __mmask16 mk = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(mk, x + k);
    return std::make_pair(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), mk);
  };
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load(k).first));
  // Same arithmetic as the AVX2 quantize_row: scale = max(amax, 1e-10) / 127, q = clamp(rint(x / scale)).
  const float scale = std::max(_mm512_reduce_max_ps(mx), 1e-10f) / 127.0f;
  const __m512 sv = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const auto [v, mk] = load(k);
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(q + k, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_min_ps(_mm512_max_ps(r, lo), hi)));
  }
  return scale;
}

void gemm_store_bf16(const float* tiles, int64_t ldo, int64_t M, int64_t nc, const float* row_scale,
                     const float* bias, uint16_t* out, int64_t ldout) {
  for (int64_t r = 0; r < M; ++r) {
    const __m512 rs = _mm512_set1_ps(row_scale ? row_scale[r] : 1.f);
    for (int64_t c = 0; c < nc; c += ST) {
      const __mmask16 mk = nc - c >= ST ? __mmask16(0xFFFF) : __mmask16((1u << (nc - c)) - 1);
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(tiles + r * ldo + c), rs);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + c));
      _mm256_mask_storeu_epi16(out + r * ldout + c, mk, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
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

void w4a16_i16_tile(const W4Layout& L, int64_t st, int rows, int xs, const uint32_t* xp, const float* qsum,
                    const float* ascale, float* out) {
  switch (rows) {
    case 1:
      return xs == 1 ? w4a16_i16<1, 1>(L, st, xp, qsum, ascale, out) : w4a16_i16<1, RB>(L, st, xp, qsum, ascale, out);
    case 2: return w4a16_i16<2, RB>(L, st, xp, qsum, ascale, out);
    case 3: return w4a16_i16<3, RB>(L, st, xp, qsum, ascale, out);
    default: return w4a16_i16<4, RB>(L, st, xp, qsum, ascale, out);
  }
}

void w4a16_i16_row(const W4Layout& L, int64_t st, const uint32_t* xp, const float* qsum, const float* ascale,
                   float* out) {
  w4a16_i16<1, 1, kRowSupertiles>(L, st, xp, qsum, ascale, out);
}

void quant_row_i16(const float* x, int64_t K, int64_t gs, int64_t xs, uint32_t* xo, float* qsum, float* ascale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // Lane i of hl holds h_i in byte 0 and l_i in byte 1; this shuffle puts lanes 0..3's bytes
  // and lanes 4..7's in disjoint positions of their 128-bit halves, which OR into the 16 output
  // bytes: h of rows 0 2 4 6, h of 1 3 5 7, l of 0 2 4 6, l of 1 3 5 7.
  const __m256i order = _mm256_setr_epi8(0, 8, -1, -1, 4, 12, -1, -1, 1, 9, -1, -1, 5, 13, -1, -1,
                                         -1, -1, 0, 8, -1, -1, 4, 12, -1, -1, 1, 9, -1, -1, 5, 13);
  const __m256i byte = _mm256_set1_epi32(0xFF), half = _mm256_set1_epi32(128);
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += gs) {
    const int64_t k1 = min64(K, k0 + gs);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
    const float amax = _mm512_reduce_max_ps(_mm512_zextps256_ps512(mx));
    // Scale 2^(e - 14) for amax in [2^(e-1), 2^e): every bf16 value within 2^6 (fp16: 2^3) of
    // the group's largest is an exact code, and |code| < 2^14, so h = (c + 128) >> 8 is in
    // [-64, 64] and l = c - 256 h in [-128, 127].
    int e = 0;
    std::frexp(amax, &e);
    const bool ok = amax > 0.f && std::isfinite(amax);
    const float inv = ok ? std::ldexp(1.f, 14 - e) : 0.f;
    ascale[g * xs] = ok ? std::ldexp(1.f, e - 14) : 0.f;
    const __m256 iv = _mm256_set1_ps(inv);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 8) {
      const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iv));  // round to nearest even
      sum = _mm256_add_epi32(sum, c);
      const __m256i h = _mm256_srai_epi32(_mm256_add_epi32(c, half), 8);
      const __m256i l = _mm256_sub_epi32(c, _mm256_slli_epi32(h, 8));
      const __m256i hl = _mm256_or_si256(_mm256_and_si256(h, byte), _mm256_slli_epi32(_mm256_and_si256(l, byte), 8));
      const __m256i sh = _mm256_shuffle_epi8(hl, order);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xo + (k / 8) * 4 * xs),
                       _mm_or_si128(_mm256_castsi256_si128(sh), _mm256_extracti128_si256(sh, 1)));
    }
    qsum[g * xs] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_zextsi256_si512(sum)));
  }
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
