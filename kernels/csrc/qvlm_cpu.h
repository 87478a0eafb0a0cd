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
// 16-bit (bf16/fp16) activations as codes |c| < 2^14 per group with a power-of-two scale (exact
// for bf16 values within 2^6 of the group's largest magnitude), each split c = 256 h + l into
// int8 halves for vpdpbusd: 16 bytes per word and row, uint32 [K8][xs][4] (h of rows 0 2 4 6,
// h of 1 3 5 7, l of 0 2 4 6, l of 1 3 5 7); code sums qsum and scales ascale [G][xs]
// (quant_row_i16 fills one row's: xo at the row's first uint32, stride xs). Groups of at most
// kI16MaxGroupWords * 8 rows (int32 sums cannot overflow).
constexpr int64_t kI16MaxGroupWords = int64_t{1} << 18;
void quant_row_i16(const float* x, int64_t K, int64_t gs, int64_t xs, uint32_t* xo, float* qsum, float* ascale);
void w4a16_i16_tile(const W4Layout& L, int64_t st, int rows, int xs, const uint32_t* xp, const float* qsum,
                    const float* ascale, float* out);
// One token row, supertiles [st, st + kRowSupertiles); out: [kRowSupertiles][RB][16].
void w4a16_i16_row(const W4Layout& L, int64_t st, const uint32_t* xp, const float* qsum, const float* ascale,
                   float* out);
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
// rounded), summed in fp32 over all of K. Activations: bf16 rows x [M][K] as whole tiles of
// the pairs of w4a16_amx, xa [rows/16][ceil(K/32)][16 rows][16] uint32, zero padded (amx_pack_a
// fills 16-row blocks [blk0, blk1)). w4_gemm_amx: supertiles [st0, st1) (at most kGemmPanel,
// whose decoded weights every token row reuses) x `rows` (a multiple of 16) -> out [rows][ldo]
// fp32, supertile st in columns [(st - st0) * 16, +16). gemm_store_bf16: those sums (* the
// row's scale, + bias) -> bf16 out [M][ldout], nc columns.
void amx_pack_a(const uint16_t* x, int64_t M, int64_t K, int64_t blk0, int64_t blk1, uint32_t* xa);
void w4_gemm_amx(const W4Layout& L, int64_t st0, int64_t st1, int64_t rows, const uint32_t* xa, float* out,
                 int64_t ldo);
void gemm_store_bf16(const float* tiles, int64_t ldo, int64_t M, int64_t nc, const float* row_scale,
                     const float* bias, uint16_t* out, int64_t ldout);
constexpr int64_t kGemmPanel = 16;
// Per-token int8 quantization of a bf16 row (the AVX2 quantize_row's arithmetic), the codes
// written as bf16 (exact): returns the row's scale.
float quant_row_bf16(const uint16_t* x, int64_t K, uint16_t* q);
}  // namespace avx512

}  // namespace qvlm
