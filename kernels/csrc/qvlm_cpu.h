// Shared between the qvlm CPU kernel translation units: plain data and entry points only, so
// that no inline function compiled for one instruction set can be picked up by the other.
#pragma once

#include <cstdint>

namespace qvlm {

constexpr int ST = 16;  // output columns per supertile
constexpr int RB = 4;   // token rows per activation block

struct W4Layout {
  const int32_t* w;   // [NS][K8][16]
  const uint16_t* s;  // fp16 bits, [NS][G][16]
  const uint8_t* z;   // [NS][G][16] or nullptr (implicit zero 8)
  int64_t K8, G, gw;  // K/8, groups, words (8 rows) per full group
};

// AVX-512 kernels (qvlm_cpu_avx512.cpp; call only where avx512_supported() is true).
// Each computes one supertile (16 output columns) for `rows` (1..RB) token rows into
// out [RB][16] fp32; xs is the row stride of the activation layout (1 or RB).
namespace avx512 {
// bf16 activations as pairs (x[8i+j], x[8i+j+4]), j = 0..3: uint32 [K8][4][xs]; gsum [G][xs].
void w4a16_bf16_tile(const W4Layout& L, int64_t st, int rows, int xs, const uint32_t* xp, const float* gsum,
                     float* out);
// One token row (xs = 1), supertiles [st, st + kRowSupertiles) at once; out: [kRowSupertiles][RB][16].
// (Measured on a Sapphire Rapids core, one thread, 4096 x 11008: 4 streams 0.68x the time of one.)
constexpr int kRowSupertiles = 4;
void w4a16_bf16_row(const W4Layout& L, int64_t st, const uint32_t* xp, const float* gsum, float* out);
// int8 activations as in the AVX2 kernel: [K8][xs][8 bytes ordered x0 x2 x4 x6 x1 x3 x5 x7]; qsum [G][xs].
void w4a8_tile(const W4Layout& L, int64_t st, int rows, int xs, const int8_t* xq, const int32_t* qsum,
               float* out);
// One token row (xs = 1), supertiles [st, st + kRowSupertiles); out: [kRowSupertiles][RB][16].
void w4a8_row(const W4Layout& L, int64_t st, const int8_t* xq, const int32_t* qsum, float* out);
// w: one int8 supertile [KP][32] (KP even); xq: activations + 128 as uint8, [KP/2][xs][4 bytes].
void w8a8_tile(const int8_t* w, int64_t KP, int rows, int xs, const uint8_t* xq, float* out);

// Dequantize supertiles [st0, st1) to bf16 W columns: dst [K][ldd] (bf16 bits), supertile st in
// columns [(st - st0) * 16, +16).
void w4_dequant_bf16(const W4Layout& L, int64_t st0, int64_t st1, uint16_t* dst, int64_t ldd);

// AMX (AMX-TILE + AMX-BF16): whether this process may use the tile registers (asks Linux once).
bool amx_enable();
// w4a16 with bf16 activations on AMX tiles, supertiles [st0, st1) x up to 16 rows:
// xa: bf16 pairs as in w4a16_bf16_tile but row-major, [rows][lda] uint32 with lda >= 4*K8 + 16
// (zero padded); gsum [rows][G]; out: [st1 - st0][16 rows][16] fp32.
void w4a16_amx(const W4Layout& L, int64_t st0, int64_t st1, int rows, const uint32_t* xa, int64_t lda,
               const float* gsum, float* out);
// Prefill GEMM on AMX tiles with the weights dequantized to bf16 ((code - zero) * scale,
// rounded), summed in fp32 over all of K: supertiles [st0, st1) x 1..80 token rows.
// xa as for w4a16_amx; out [rows][ldo] fp32, supertile st in columns [(st - st0) * 16, +16).
void w4_gemm_amx(const W4Layout& L, int64_t st0, int64_t st1, int rows, const uint32_t* xa, int64_t lda,
                 float* out, int64_t ldo);
}  // namespace avx512

}  // namespace qvlm
