// qvlm CPU kernels (AVX2 + FMA + F16C): int4 / int8 weight GEMMs for decode and prefill.
//
// Built on first use by kernels/cpu_ext.py (torch.utils.cpp_extension.load) and exposed as
// torch.ops.qvlm_cpu.*. Weights are repacked once by backends.py into "supertiles" of 16
// output columns so that every kernel streams one contiguous run of memory per tile:
//
//   int4  : int32 [N/16][K/8][16]      word = 8 consecutive K rows of one column (row 8i+j in nibble j)
//   scales: fp16  [N/16][G][16]        zeros (asymmetric only): uint8 [N/16][G][16]
//   int8  : int8  [N/16][K/2][2][8][2] (supertile, k pair, half, column, k within pair), signed
//
// One K row of an int4 supertile is exactly one 64-byte cache line. Groups run along K with
// the format's rules: group g covers rows [g*gs, min(K, (g+1)*gs)), the last one may be partial.
// Threads split the output columns (supertiles) with at::parallel_for, so torch's thread
// setting applies. Accumulation is fp32 (w4a16) or exact int32 (w4a8, w8a8).

// Narrow ATen includes (not <ATen/ATen.h>) keep the first-use compile short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <string>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "qvlm_cpu.h"

namespace {

using qvlm::RB;
using qvlm::ST;
using qvlm::W4Layout;

// ---- instruction set, chosen at run time ---------------------------------------------------
// Levels: 0 = AVX2 (+FMA, F16C), 1 = AVX-512 (F/BW/VL/DQ + VNNI + BF16, qvlm_cpu_avx512.cpp),
// 2 = AVX-512 + AMX tiles (AMX-TILE, AMX-BF16, and Linux granting the tile state). The best
// level the processor has is used; qvlm_cpu::isa("avx2"|"avx512") caps it (tests, benchmarks).
constexpr const char* kIsaNames[] = {"avx2", "avx512", "amx"};

int best_isa() {
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
    if (!avx512) return 0;
    const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16");
    return amx && qvlm::avx512::amx_enable() ? 2 : 1;
  }();
  return best;
}

std::atomic<int>& isa_level() {
  static std::atomic<int> level{best_isa()};
  return level;
}

// want: "" (query), "auto" (the best this processor has) or a level name; returns the active one.
std::string isa(const std::string& want) {
  if (want == "auto") {
    isa_level() = best_isa();
  } else if (!want.empty()) {
    int level = -1;
    for (int i = 0; i < 3; ++i)
      if (want == kIsaNames[i]) level = i;
    TORCH_CHECK(level >= 0, "qvlm_cpu: unknown instruction set '", want, "' (auto, avx2, avx512, amx)");
    TORCH_CHECK(level <= best_isa(), "qvlm_cpu: this processor (or OS) does not support ", want);
    isa_level() = level;
  }
  return kIsaNames[isa_level().load()];
}

bool use_avx512() { return isa_level().load(std::memory_order_relaxed) >= 1; }
bool use_amx() { return isa_level().load(std::memory_order_relaxed) >= 2; }

inline __m256 load_h8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_z8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// ---------------------------------------------------------------------------------------------
// w4a16: fp32 FMA on decoded nibbles.
//
// Decoding trick: nibble j of a word is isolated with an AND (no shift), which leaves
// code * 16^j; the activation of row 8i+j was pre-multiplied by 16^-j (exact, a power of two),
// so the product is exactly code * x. The top nibble uses a logical shift instead (its masked
// value would be negative as int32). Per 8 codes: and + cvt + fma. The zero point is applied at
// the group end as  -z * s * sum_k(x_k)  with per-row group sums computed beforehand.
// ---------------------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, i>) for i = 0..N-1: loops whose indices are constants
// at compile time, so arrays of vectors indexed by them become registers.
template <int N, typename F>
__attribute__((always_inline)) inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// The 7 nibble masks as memory operands: held in registers they would push the accumulators
// out to the stack (GCC spills accumulators rather than rematerialize constants).
alignas(32) const uint32_t kNibbleMaskBits[7][8] = {
#define QVLM_M(J) {0xFu << (4 * J), 0xFu << (4 * J), 0xFu << (4 * J), 0xFu << (4 * J), \
                   0xFu << (4 * J), 0xFu << (4 * J), 0xFu << (4 * J), 0xFu << (4 * J)}
    QVLM_M(0), QVLM_M(1), QVLM_M(2), QVLM_M(3), QVLM_M(4), QVLM_M(5), QVLM_M(6)};
#undef QVLM_M
const __m256i* const kNibbleMask = reinterpret_cast<const __m256i*>(kNibbleMaskBits);

inline __m256i and_mem(__m256i a, const __m256i* mask) {
  __m256i r;
  __asm__("vpand %2, %1, %0" : "=x"(r) : "x"(a), "m"(*mask));
  return r;
}

// Constants of the w4a8 kernel, also as memory operands (registers go to 8 accumulators).
alignas(32) const uint32_t kLowNibblesBits[8] = {0x0F0F0F0Fu, 0x0F0F0F0Fu, 0x0F0F0F0Fu, 0x0F0F0F0Fu,
                                                 0x0F0F0F0Fu, 0x0F0F0F0Fu, 0x0F0F0F0Fu, 0x0F0F0F0Fu};
alignas(32) const uint32_t kOnes16Bits[8] = {0x00010001u, 0x00010001u, 0x00010001u, 0x00010001u,
                                             0x00010001u, 0x00010001u, 0x00010001u, 0x00010001u};
const __m256i& kLowNibbles = *reinterpret_cast<const __m256i*>(kLowNibblesBits);
const __m256i& kOnes16 = *reinterpret_cast<const __m256i*>(kOnes16Bits);

inline __m256i madd_mem(__m256i a, const __m256i* b) {
  __m256i r;
  __asm__("vpmaddwd %2, %1, %0" : "=x"(r) : "x"(a), "m"(*b));
  return r;
}

// Activations are laid out per block of RB rows, interleaved along K ([block][K][RB] for
// fp32), so that every broadcast in a kernel is at a constant offset from one pointer.
// Row stride of that layout: 1 for a single token (decode), which keeps its activations
// 4x smaller in cache.
inline int64_t row_stride(int64_t M) { return M == 1 ? 1 : RB; }

// out[g * stride] += sum of x over group g: one pass per group, no division per element
// (a 64-bit `k / gs` costs more than the add it indexes).
inline void add_group_sums(const float* x, int64_t K, int64_t gs, float* out, int64_t stride) {
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += gs) {
    float s = 0.f;
    for (int64_t k = k0, k1 = std::min(K, k0 + gs); k < k1; ++k) s += x[k];
    out[g * stride] += s;
  }
}
// Rows whose activations stay in L2 while a thread streams its weight tiles (large M).
constexpr int64_t ROW_CHUNK = 16;

// Runs kern(supertile, row_block, rows) over all (supertile, block) pairs, threads split over
// supertiles (output columns); rows are taken ROW_CHUNK at a time. Threads claim small runs of
// supertiles from a shared counter rather than a fixed half each, so a thread that is slowed
// down (a core shared with another process) does not leave the other one waiting.
// kern(s0, s1) over runs of supertiles [s0, s1) covering [0, NS), claimed by the threads;
// runs are a multiple of `unit` long (but the last).
template <typename Kern>
void run_supertiles(int64_t NS, const Kern& kern, int64_t unit = 1) {
  const int64_t nthr = std::min<int64_t>(at::get_num_threads(), NS);
  const int64_t grain = (std::max<int64_t>(1, std::min<int64_t>(8, NS / (8 * nthr))) + unit - 1) / unit * unit;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t s0 = next.fetch_add(grain, std::memory_order_relaxed);
      if (s0 >= NS) break;
      kern(s0, std::min(NS, s0 + grain));
    }
  });
}

template <typename Kern>
void run_tiles(int64_t NS, int64_t M, const Kern& kern) {
  const int64_t nblk = (M + RB - 1) / RB, chunk = ROW_CHUNK / RB;
  for (int64_t b0 = 0; b0 < nblk; b0 += chunk) {
    const int64_t b1 = std::min(nblk, b0 + chunk);
    run_supertiles(NS, [&](int64_t s0, int64_t s1) {
      for (int64_t st = s0; st < s1; ++st)
        for (int64_t b = b0; b < b1; ++b) kern(st, b, static_cast<int>(std::min<int64_t>(RB, M - b * RB)));
    });
  }
}

// Tile [RB][16] (+ bias, times a per-row scale) -> out columns [n0, n0 + ncols) of rows m0...
inline void store_tile(const float* tile, int rows, float* out, int64_t N, int64_t m0, int64_t n0,
                       const float* row_scale, const float* col_scale, const float* bias) {
  const int64_t ncols = std::min<int64_t>(ST, N - n0);
  for (int r = 0; r < rows; ++r) {
    const float rs = row_scale ? row_scale[m0 + r] : 1.f;
    float* o = out + (m0 + r) * N + n0;
    for (int64_t c = 0; c < ncols; ++c) {
      float v = tile[r * ST + c] * rs;
      if (col_scale) v *= col_scale[n0 + c];
      o[c] = bias ? v + bias[n0 + c] : v;
    }
  }
}

// One token row with the AVX-512 kernels: kern(st, tile, several) fills kRowSupertiles tiles
// from st when `several`, else one; tiles [n][RB][16] are stored (times row_scale, + bias).
template <typename Kern>
void run_row(int64_t NS, float* out, int64_t N, const float* row_scale, const float* bias, const Kern& kern) {
  constexpr int nt = qvlm::avx512::kRowSupertiles;
  run_supertiles(NS, [&](int64_t s0, int64_t s1) {
    alignas(64) float tile[nt * RB * ST];
    for (int64_t st = s0; st < s1;) {
      const int n = st + nt <= s1 ? nt : 1;
      kern(st, tile, n == nt);
      for (int i = 0; i < n; ++i) store_tile(tile + i * RB * ST, 1, out, N, 0, (st + i) * ST, row_scale, nullptr, bias);
      st += n;
    }
  }, nt);
}

// ---------------------------------------------------------------------------------------------
// w4a16 decode kernel: MR rows x one supertile (2 vectors of 8 columns), SPLIT accumulators per
// (row, vector) to break FMA latency chains when MR is small. xs: [K][RB] scaled activations
// of this row block, gsum: [G][RB] group sums; out: [RB][16] fp32 tile (group totals).
// ---------------------------------------------------------------------------------------------
template <int MR, int SPLIT, int XS>
__attribute__((flatten)) void w4a16_tile(const W4Layout& L, int64_t st, const float* xs, const float* gsum,
                                         float* out) {
  constexpr int NT = 2;
  // Flat arrays indexed only by compile-time constants (unroll<>), so GCC keeps them in registers.
  // Group totals live in `out` (touched once per group) to leave the registers to the accumulators.
  unroll<MR * NT>([&](auto i) { _mm256_storeu_ps(out + (i / NT) * ST + (i % NT) * 8, _mm256_setzero_ps()); });
  const int32_t* wp = L.w + st * L.K8 * ST;
  const uint16_t* sp = L.s + st * L.G * ST;
  const uint8_t* zp = L.z ? L.z + st * L.G * ST : nullptr;

  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = std::min(L.K8, kb + L.gw);
    __m256 acc[MR * NT * SPLIT];
    unroll<MR * NT * SPLIT>([&](auto i) { acc[i] = _mm256_setzero_ps(); });
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      const int32_t* wk = wp + k8 * ST;
      __m256i q[NT];
      unroll<NT>([&](auto t) { q[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + t * 8)); });
      _mm_prefetch(reinterpret_cast<const char*>(wk + 8 * ST), _MM_HINT_T0);
      const float* xk = xs + k8 * 8 * XS;
      unroll<8>([&](auto j) {
        __m256 c[NT];
        unroll<NT>([&](auto t) {
          if constexpr (j == 7)
            c[t] = _mm256_cvtepi32_ps(_mm256_srli_epi32(q[t], 28));
          else
            c[t] = _mm256_cvtepi32_ps(and_mem(q[t], &kNibbleMask[j]));
        });
        unroll<MR>([&](auto m) {
          const __m256 xb = _mm256_broadcast_ss(xk + j * XS + m);
          unroll<NT>([&](auto t) {
            constexpr int i = (m * NT + t) * SPLIT + j % SPLIT;
            acc[i] = _mm256_fmadd_ps(c[t], xb, acc[i]);
          });
        });
      });
    }
    unroll<NT>([&](auto t) {
      const __m256 s = load_h8(sp + g * ST + t * 8);
      const __m256 zs = _mm256_mul_ps(s, zp ? load_z8(zp + g * ST + t * 8) : _mm256_set1_ps(8.0f));
      unroll<MR>([&](auto m) {
        constexpr int i0 = (m * NT + t) * SPLIT;
        __m256 a = acc[i0];
        unroll<SPLIT - 1>([&](auto k) { a = _mm256_add_ps(a, acc[i0 + k + 1]); });
        float* o = out + m * ST + t * 8;
        const __m256 tot = _mm256_fmadd_ps(a, s, _mm256_loadu_ps(o));
        _mm256_storeu_ps(o, _mm256_fnmadd_ps(zs, _mm256_broadcast_ss(gsum + g * XS + m), tot));
      });
    });
  }
}

using W4A16Fn = void (*)(const W4Layout&, int64_t, const float*, const float*, float*);
W4A16Fn w4a16_fn(int rows, int xs) {
  switch (rows) {
    case 1: return xs == 1 ? w4a16_tile<1, 4, 1> : w4a16_tile<1, 4, RB>;
    case 2: return w4a16_tile<2, 2, RB>;
    case 3: return w4a16_tile<3, 1, RB>;
    default: return w4a16_tile<4, 1, RB>;
  }
}

// Dequantize supertiles [st_begin, st_end) to fp32 W^T rows [n, K] (for the prefill GEMM).
void w4_dequant_rows(const W4Layout& L, int64_t K, int64_t st_begin, int64_t st_end, float* dst) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i m0 = _mm256_set1_epi32(0xF);
  at::parallel_for(st_begin, st_end, 1, [&](int64_t b, int64_t e) {
    for (int64_t st = b; st < e; ++st) {
      const int32_t* w = L.w + st * L.K8 * ST;
      for (int c = 0; c < ST; ++c) {
        float* row = dst + ((st - st_begin) * ST + c) * K;
        for (int64_t g = 0; g < L.G; ++g) {
          const int64_t off = st * L.G * ST + g * ST + c;
          const float s = static_cast<float>(c10::Half(L.s[off], c10::Half::from_bits()));
          const float zs = s * (L.z ? static_cast<float>(L.z[off]) : 8.0f);
          const __m256 sv = _mm256_set1_ps(s), zsv = _mm256_set1_ps(zs);
          const int64_t kb = g * L.gw, ke = std::min(L.K8, kb + L.gw);
          for (int64_t k8 = kb; k8 < ke; ++k8) {
            const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w[k8 * ST + c]), shifts), m0);
            _mm256_storeu_ps(row + k8 * 8, _mm256_fmsub_ps(_mm256_cvtepi32_ps(q), sv, zsv));
          }
        }
      }
    }
  });
}

W4Layout w4_layout(const at::Tensor& w, const at::Tensor& s, const c10::optional<at::Tensor>& z, int64_t K,
                   int64_t group_size) {
  TORCH_CHECK(w.dim() == 3 && w.size(2) == ST && w.scalar_type() == at::kInt && w.is_contiguous(),
              "qvlm_cpu: packed int4 weight must be contiguous int32 [N/16, K/8, 16]");
  TORCH_CHECK(K % 8 == 0 && w.size(1) == K / 8, "qvlm_cpu: K mismatch");
  const int64_t gs = group_size == -1 ? K : group_size;
  TORCH_CHECK(gs % 8 == 0 && gs > 0, "qvlm_cpu: group size must be a multiple of 8");
  const int64_t G = (K + gs - 1) / gs;
  TORCH_CHECK(s.scalar_type() == at::kHalf && s.is_contiguous() && s.size(0) == w.size(0) && s.size(1) == G,
              "qvlm_cpu: scales must be contiguous fp16 [N/16, G, 16]");
  const uint8_t* zp = nullptr;
  if (z.has_value()) {
    TORCH_CHECK(z->scalar_type() == at::kByte && z->is_contiguous() && z->sizes() == s.sizes(),
                "qvlm_cpu: zeros must be contiguous uint8 [N/16, G, 16]");
    zp = z->data_ptr<uint8_t>();
  }
  return W4Layout{w.data_ptr<int32_t>(), reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()), zp, K / 8, G,
                  gs / 8};
}

// Prefill where the processor has AVX512-BF16: W dequantized to bf16 in column chunks (about
// 2 MiB, so the GEMM reads them from L2), then torch's bf16 GEMM (oneDNN; AMX tiles where present) on xb [M, K] bf16, several
// times faster there than the fp32 GEMM. Columns of out (fp32) get * row_scale [M, 1] (if
// defined) + bias. The only rounding besides fp32 sums: each dequantized weight to bf16.
void w4_gemm_bf16(const W4Layout& L, int64_t NS, int64_t N, const at::Tensor& xb, const at::Tensor& row_scale,
                  const at::Tensor& bias, at::Tensor& out) {
  const int64_t K = L.K8 * 8;
  const int64_t chunk_st = std::max<int64_t>(1, (int64_t{2} << 20) / (K * 2 * ST));  // L2-sized chunks
  const int64_t ldd = std::min(NS, chunk_st) * ST;
  at::Tensor buf = at::empty({K, ldd}, xb.options());  // [K, chunk columns]
  uint16_t* bp = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
  for (int64_t st = 0; st < NS; st += chunk_st) {
    const int64_t se = std::min(NS, st + chunk_st), n0 = st * ST, n1 = std::min(N, se * ST);
    at::parallel_for(st, se, 1, [&](int64_t b, int64_t e) {
      qvlm::avx512::w4_dequant_bf16(L, b, e, bp + (b - st) * ST, ldd);
    });
    at::Tensor y = at::mm(xb, buf.narrow(1, 0, n1 - n0)).to(at::kFloat);
    if (row_scale.defined()) y.mul_(row_scale);
    if (bias.defined()) y.add_(bias.narrow(0, n0, n1 - n0));
    out.narrow(1, n0, n1 - n0).copy_(y);
  }
}

// Row-major bf16 pairs (x[8i+j], x[8i+j+4]) of bf16-exact values, the activation layout of
// the AMX kernels, zero padded by one tile row: [M][lda], lda = K/2 + 16.
std::vector<uint32_t> amx_pairs(const float* x, int64_t M, int64_t K, int64_t lda) {
  std::vector<uint32_t> xa(M * lda, 0);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + m * K);
      for (int64_t k8 = 0; k8 < K / 8; ++k8)
        for (int j = 0; j < 4; ++j)
          xa[m * lda + k8 * 4 + j] = (xr[k8 * 8 + j] >> 16) | (xr[k8 * 8 + j + 4] & 0xFFFF0000u);
    }
  });
  return xa;
}

// A per-thread buffer reused across calls: a prefill GEMM's megabytes of scratch would
// otherwise be fresh pages on every call (measured: page faults took up to 3 ms of a 25 ms
// 588 x 4096 x 4096 call). Buffers above kScratchKeep are freed when the Scratch goes.
class Scratch {
 public:
  static constexpr size_t kScratchKeep = size_t{64} << 20;
  Scratch(int slot, size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes > kScratchKeep) {
      p_ = own_ = std::aligned_alloc(64, bytes);
    } else {
      thread_local Buf bufs[2];
      Buf& b = bufs[slot];
      if (b.n < bytes) {
        std::free(b.p);
        b.p = std::aligned_alloc(64, bytes);
        b.n = b.p ? bytes : 0;
      }
      p_ = b.p;
    }
    TORCH_CHECK(p_, "qvlm_cpu: out of memory for ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(own_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename T>
  T* get() const { return static_cast<T*>(p_); }

 private:
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  void* p_ = nullptr;
  void* own_ = nullptr;
};

// Prefill on AMX: x bf16 [M, K] times bf16-dequantized weights, * row_scale (if any) + bias
// -> out bf16 [M, N]. Threads take panels of 16 supertiles; each panel's weights are decoded
// once per call and reused by all M rows.
void w4_gemm_amx(const W4Layout& L, int64_t NS, int64_t N, const uint16_t* x, int64_t M, const float* row_scale,
                 const float* bias, uint16_t* out) {
  const int64_t K = L.K8 * 8, blocks = (M + 15) / 16, ksteps = (L.K8 + 3) / 4;
  const Scratch xa(0, blocks * ksteps * 16 * ST * sizeof(uint32_t));
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    qvlm::avx512::amx_pack_a(x, M, K, b, e, xa.get<uint32_t>());
  });
  run_supertiles(NS, [&](int64_t s0, int64_t s1) {
    const int64_t ldo = (s1 - s0) * ST, n0 = s0 * ST;
    const Scratch tiles(1, blocks * 16 * ldo * sizeof(float));
    qvlm::avx512::w4_gemm_amx(L, s0, s1, blocks * 16, xa.get<uint32_t>(), tiles.get<float>(), ldo);
    qvlm::avx512::gemm_store_bf16(tiles.get<float>(), ldo, M, std::min(N, s1 * ST) - n0, row_scale,
                                  bias ? bias + n0 : nullptr, out + n0, N);
  }, qvlm::avx512::kGemmPanel);
}

at::Tensor finish(at::Tensor out32, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

struct Inputs {
  at::Tensor x, bias;  // fp32 contiguous
  int64_t M, K;
  const float* bp;
};

Inputs inputs(const at::Tensor& x_in, const c10::optional<at::Tensor>& bias_in, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2, "qvlm_cpu: x must be 2-D");
  TORCH_CHECK(x_in.device().is_cpu(), "qvlm_cpu: x must be on the CPU");
  Inputs in;
  in.x = x_in.to(at::kFloat).contiguous();
  in.M = in.x.size(0);
  in.K = in.x.size(1);
  in.bp = nullptr;
  if (bias_in.has_value()) {
    in.bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(in.bias.numel() == N, "qvlm_cpu: bias size");
    in.bp = in.bias.data_ptr<float>();
  }
  return in;
}

// Token rows from which the AMX w4a16 kernel beats the AVX-512 int16 one (measured on a Sapphire
// Rapids core, 4096 x 11008, ms: 3 rows 4.04 vs 3.24, 4 rows 3.98 vs 3.51, 8 rows 4.22 vs 6.08).
constexpr int64_t kAmxMinRows = 5;
// Default token rows from which a w4 layer runs as a GEMM on dequantized weights (op argument
// gemm_min_rows = -1). Measured on a Sapphire Rapids core at 4096 x 11008: the AMX GEMM costs
// at least one pass of decoding the weights (~5 ms) and beats the per-group AMX w4a16 kernel
// from 17 rows, the VNNI w4a8 kernel from 25 (equal at 24); elsewhere torch's GEMM pays off for
// prompts.
constexpr int64_t kAmxGemmMinRowsW4A16 = 17, kAmxGemmMinRowsW4A8 = 25, kGemmMinRows = 256;

int64_t gemm_rows(int64_t requested, const at::Tensor& x, bool w4a8 = false) {
  if (requested >= 0) return requested;
  if (x.scalar_type() != at::kBFloat16 || !use_amx()) return kGemmMinRows;
  return w4a8 ? kAmxGemmMinRowsW4A8 : kAmxGemmMinRowsW4A16;
}

// Whether a w4 layer's call runs as the AMX prefill GEMM: bf16 activations, AMX, enough rows.
bool amx_prefill(const at::Tensor& x, int64_t gemm_min_rows, bool w4a8) {
  return x.dim() == 2 && x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && use_amx() && x.size(0) > 0 &&
         x.size(0) >= gemm_rows(gemm_min_rows, x, w4a8);
}

// The AMX prefill GEMM on bf16 rows x [M, K] (the activations, or w4a8's per-token codes with
// their scales in row_scale): bf16 [M, N].
at::Tensor w4_gemm_amx(const W4Layout& L, int64_t NS, int64_t N, const at::Tensor& x, const float* row_scale,
                       const c10::optional<at::Tensor>& bias_in) {
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == N, "qvlm_cpu: bias size");
  }
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  w4_gemm_amx(L, NS, N, reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), row_scale,
              bias.defined() ? bias.data_ptr<float>() : nullptr,
              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  return out;
}

// x [M, K] (any float dtype) -> y [M, N] in x's dtype.
at::Tensor w4a16_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s,
                        const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias_in, int64_t N,
                        int64_t group_size, int64_t gemm_min_rows) {
  if (amx_prefill(x_in, gemm_min_rows, false)) {
    const at::Tensor x = x_in.contiguous();
    const W4Layout L = w4_layout(w, s, z, x.size(1), group_size);
    TORCH_CHECK(w.size(0) * ST >= N, "qvlm_cpu: N larger than the packed weight");
    return w4_gemm_amx(L, w.size(0), N, x, nullptr, bias_in);
  }
  const Inputs in = inputs(x_in, bias_in, N);
  const int64_t M = in.M, K = in.K;
  const W4Layout L = w4_layout(w, s, z, K, group_size);
  const int64_t NS = w.size(0), G = L.G;
  TORCH_CHECK(NS * ST >= N, "qvlm_cpu: N larger than the packed weight");
  at::Tensor out = at::empty({M, N}, in.x.options());
  if (M == 0) return finish(out, x_in);
  gemm_min_rows = gemm_rows(gemm_min_rows, x_in);
  if (M >= gemm_min_rows && x_in.scalar_type() == at::kBFloat16 && use_avx512()) {
    w4_gemm_bf16(L, NS, N, x_in.contiguous(), at::Tensor(), in.bias, out);
    return finish(out, x_in);
  }
  if (M >= gemm_min_rows) {
    // Prefill: dequantize column chunks (about 16 MiB of fp32) and use torch's fp32 GEMM,
    // much faster than bf16 GEMM on CPUs without AVX512-BF16/AMX.
    const int64_t chunk_st = std::max<int64_t>(1, (int64_t{16} << 20) / (K * 4 * ST));
    at::Tensor buf = at::empty({std::min(NS, chunk_st) * ST, K}, in.x.options());
    for (int64_t st = 0; st < NS; st += chunk_st) {
      const int64_t se = std::min(NS, st + chunk_st);
      const int64_t n0 = st * ST, n1 = std::min(N, se * ST);
      w4_dequant_rows(L, K, st, se, buf.data_ptr<float>());
      at::Tensor wc = buf.narrow(0, 0, n1 - n0);
      if (in.bp)
        out.narrow(1, n0, n1 - n0).copy_(at::addmm(in.bias.narrow(0, n0, n1 - n0), in.x, wc.t()));
      else
        out.narrow(1, n0, n1 - n0).copy_(at::mm(in.x, wc.t()));
    }
    return finish(out, x_in);
  }

  const int64_t nblk = (M + RB - 1) / RB, gs = L.gw * 8, XS = row_stride(M);
  const float* xp = in.x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool half = x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf;
  if (half && use_avx512() && L.gw <= qvlm::avx512::kI16MaxGroupWords &&
      !(x_in.scalar_type() == at::kBFloat16 && use_amx() && M >= kAmxMinRows)) {
    // 16-bit activations as codes per (row, group) with power-of-two scales, split into int8
    // halves for vpdpbusd: [block][K8][RB][16 bytes] and [block][G][RB].
    const int64_t K8 = K / 8;
    std::vector<uint32_t> xb(nblk * K8 * 4 * XS, 0);
    std::vector<float> qsum(nblk * G * XS, 0.f), ascale(nblk * G * XS, 0.f);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const int64_t xo = (m / RB) * K8 * 4 * XS + (m % RB) * 4, go = (m / RB) * G * XS + m % RB;
        qvlm::avx512::quant_row_i16(xp + m * K, K, gs, XS, xb.data() + xo, qsum.data() + go, ascale.data() + go);
      }
    });
    if (M == 1) {
      run_row(NS, op, N, nullptr, in.bp, [&](int64_t st, float* tile, bool several) {
        if (several)
          qvlm::avx512::w4a16_i16_row(L, st, xb.data(), qsum.data(), ascale.data(), tile);
        else
          qvlm::avx512::w4a16_i16_tile(L, st, 1, 1, xb.data(), qsum.data(), ascale.data(), tile);
      });
      return finish(out, x_in);
    }
    run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
      alignas(64) float tile[RB * ST];
      qvlm::avx512::w4a16_i16_tile(L, st, rows, static_cast<int>(XS), xb.data() + b * K8 * 4 * XS,
                                   qsum.data() + b * G * XS, ascale.data() + b * G * XS, tile);
      store_tile(tile, rows, op, N, b * RB, st * ST, nullptr, nullptr, in.bp);
    });
    return finish(out, x_in);
  }
  if (x_in.scalar_type() == at::kBFloat16 && use_amx() && M >= kAmxMinRows) {
    // Row-major bf16 pairs (x[8i+j], x[8i+j+4]) padded by one tile row, and fp32 group sums
    // [M][G]; 16 token rows per tile pass.
    const int64_t lda = K / 2 + 16;
    const std::vector<uint32_t> xa = amx_pairs(xp, M, K, lda);
    std::vector<float> gsum(M * G, 0.f);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        add_group_sums(xp + m * K, K, gs, gsum.data() + m * G, 1);
    });
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
      run_supertiles(NS, [&](int64_t s0, int64_t s1) {
        std::vector<float> tiles((s1 - s0) * 16 * ST);
        qvlm::avx512::w4a16_amx(L, s0, s1, rows, xa.data() + m0 * lda, lda, gsum.data() + m0 * G, tiles.data());
        for (int64_t st = s0; st < s1; ++st)
          for (int r0 = 0; r0 < rows; r0 += RB)
            store_tile(tiles.data() + ((st - s0) * 16 + r0) * ST, std::min(RB, rows - r0), op, N, m0 + r0, st * ST,
                       nullptr, nullptr, in.bp);
      });
    }
    return finish(out, x_in);
  }
  if (x_in.scalar_type() == at::kBFloat16 && use_avx512()) {
    // bf16 pairs (x[8i+j], x[8i+j+4]) ([block][K8][4][RB]; the bf16 -> fp32 -> bf16 round
    // trip is exact) and fp32 group sums ([block][G][RB]).
    const int64_t K8 = K / 8;
    std::vector<uint32_t> xb(nblk * K8 * 4 * XS, 0);
    std::vector<float> gsum(nblk * G * XS, 0.f);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const uint32_t* xr = reinterpret_cast<const uint32_t*>(xp + m * K);
        uint32_t* xo = xb.data() + (m / RB) * K8 * 4 * XS + m % RB;
        float* go = gsum.data() + (m / RB) * G * XS + m % RB;
        for (int64_t k8 = 0; k8 < K8; ++k8)
          for (int j = 0; j < 4; ++j)
            xo[(k8 * 4 + j) * XS] = (xr[k8 * 8 + j] >> 16) | (xr[k8 * 8 + j + 4] & 0xFFFF0000u);
        add_group_sums(xp + m * K, K, gs, go, XS);
      }
    });
    if (M == 1) {
      run_row(NS, op, N, nullptr, in.bp, [&](int64_t st, float* tile, bool several) {
        if (several)
          qvlm::avx512::w4a16_bf16_row(L, st, xb.data(), gsum.data(), tile);
        else
          qvlm::avx512::w4a16_bf16_tile(L, st, 1, 1, xb.data(), gsum.data(), tile);
      });
      return finish(out, x_in);
    }
    run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
      alignas(64) float tile[RB * ST];
      qvlm::avx512::w4a16_bf16_tile(L, st, rows, static_cast<int>(XS), xb.data() + b * K8 * 4 * XS,
                                    gsum.data() + b * G * XS, tile);
      store_tile(tile, rows, op, N, b * RB, st * ST, nullptr, nullptr, in.bp);
    });
    return finish(out, x_in);
  }

  // Scaled activations for the nibble trick ([block][K][RB]) and group sums ([block][G][RB]).
  std::vector<float> xs(nblk * K * XS, 0.f), gsum(nblk * G * XS, 0.f);
  static const float mul[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576,
                               1.f / 16777216, 1.f};
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = xp + m * K;
      float* xo = xs.data() + (m / RB) * K * XS + m % RB;
      float* go = gsum.data() + (m / RB) * G * XS + m % RB;
      for (int64_t k = 0; k < K; ++k) xo[k * XS] = xr[k] * mul[k & 7];
      add_group_sums(xr, K, gs, go, XS);
    }
  });
  run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
    alignas(32) float tile[RB * ST];
    w4a16_fn(rows, XS)(L, st, xs.data() + b * K * XS, gsum.data() + b * G * XS, tile);
    store_tile(tile, rows, op, N, b * RB, st * ST, nullptr, nullptr, in.bp);
  });
  return finish(out, x_in);
}

// ---------------------------------------------------------------------------------------------
// Per-token dynamic int8 quantization, same arithmetic as reference.quantize_per_token:
// scale = max(amax, 1e-10) / 127 and q = round_half_even(x / scale) (a true division, as torch).
// emit(k0, q[8]) receives 8 consecutive codes (K is padded with zeros to a multiple of 8).
// ---------------------------------------------------------------------------------------------
template <typename Emit>
float quantize_row(const float* x, int64_t K, const Emit& emit) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  alignas(32) float t[8];
  _mm256_store_ps(t, mx);
  float amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, t[i]);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float scale = std::max(amax, 1e-10f) / 127.0f;
  const __m256 sv = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  alignas(32) int32_t q[8];
  for (k = 0; k < K; k += 8) {
    __m256 v;
    if (k + 8 <= K) {
      v = _mm256_loadu_ps(x + k);
    } else {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = k; i < K; ++i) tmp[i - k] = x[i];
      v = _mm256_load_ps(tmp);
    }
    v = _mm256_round_ps(_mm256_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi)));
    emit(k, q);
  }
  return scale;
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------------------------------------
// w4a8: u4 weights x s8 activations with maddubs (|15*127*2| < 32767: never saturates), exact
// int32 per group; zero point as -z * sum(q over group); scaled per group by w_scale in fp32,
// by the token's scale at the end. Activations: [block][K/8][RB][8 bytes], the 8 bytes of a row
// ordered [x0 x2 x4 x6 x1 x3 x5 x7] to match (word & 0x0F0F0F0F) and ((word >> 4) & 0x0F0F0F0F).
// qsum: [block][G][RB] int32.
// ---------------------------------------------------------------------------------------------
template <int MR, int XS>
__attribute__((flatten)) void w4a8_tile(const W4Layout& L, int64_t st, const int8_t* xq, const int32_t* qsum,
                                        float* out) {
  constexpr int NT = 2;
  unroll<MR * NT>([&](auto i) { _mm256_storeu_ps(out + (i / NT) * ST + (i % NT) * 8, _mm256_setzero_ps()); });
  const int32_t* wp = L.w + st * L.K8 * ST;
  const uint16_t* sp = L.s + st * L.G * ST;
  const uint8_t* zp = L.z ? L.z + st * L.G * ST : nullptr;

  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = std::min(L.K8, kb + L.gw);
    __m256i acc[MR * NT];
    unroll<MR * NT>([&](auto i) { acc[i] = _mm256_setzero_si256(); });
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      const int32_t* wk = wp + k8 * ST;
      __m256i lo[NT], hi[NT];
      unroll<NT>([&](auto t) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + t * 8));
        lo[t] = and_mem(q, &kLowNibbles);
        hi[t] = and_mem(_mm256_srli_epi32(q, 4), &kLowNibbles);
      });
      _mm_prefetch(reinterpret_cast<const char*>(wk + 8 * ST), _MM_HINT_T0);
      const int8_t* xk = xq + k8 * XS * 8;
      unroll<MR>([&](auto m) {
        const __m256i xa = _mm256_set1_epi32(load_i32(xk + m * 8)), xb = _mm256_set1_epi32(load_i32(xk + m * 8 + 4));
        unroll<NT>([&](auto t) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[t], xa), _mm256_maddubs_epi16(hi[t], xb));
          acc[m * NT + t] = _mm256_add_epi32(acc[m * NT + t], madd_mem(p, &kOnes16));
        });
      });
    }
    unroll<NT>([&](auto t) {
      const __m256 s = load_h8(sp + g * ST + t * 8);
      const __m256i zv = zp ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + g * ST + t * 8)))
                            : _mm256_set1_epi32(8);
      unroll<MR>([&](auto m) {
        const __m256i a =
            _mm256_sub_epi32(acc[m * NT + t], _mm256_mullo_epi32(zv, _mm256_set1_epi32(qsum[g * XS + m])));
        float* o = out + m * ST + t * 8;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, _mm256_loadu_ps(o)));
      });
    });
  }
}

using W4A8Fn = void (*)(const W4Layout&, int64_t, const int8_t*, const int32_t*, float*);
W4A8Fn w4a8_fn(int rows, int xs) {
  switch (rows) {
    case 1: return xs == 1 ? w4a8_tile<1, 1> : w4a8_tile<1, RB>;
    case 2: return w4a8_tile<2, RB>;
    case 3: return w4a8_tile<3, RB>;
    default: return w4a8_tile<4, RB>;
  }
}

at::Tensor w4a8_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s,
                       const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias_in, int64_t N,
                       int64_t group_size, int64_t gemm_min_rows) {
  if (amx_prefill(x_in, gemm_min_rows, true)) {
    // Prefill: the per-token codes (exact in bf16) times bf16-dequantized weights, then the
    // token scales.
    const at::Tensor x = x_in.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    const W4Layout L = w4_layout(w, s, z, K, group_size);
    TORCH_CHECK(w.size(0) * ST >= N, "qvlm_cpu: N larger than the packed weight");
    at::Tensor q = at::empty({M, K}, x.options());
    std::vector<float> xs(M);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    uint16_t* qp = reinterpret_cast<uint16_t*>(q.data_ptr<at::BFloat16>());
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) xs[m] = qvlm::avx512::quant_row_bf16(xp + m * K, K, qp + m * K);
    });
    return w4_gemm_amx(L, w.size(0), N, q, xs.data(), bias_in);
  }
  const Inputs in = inputs(x_in, bias_in, N);
  const int64_t M = in.M, K = in.K;
  const W4Layout L = w4_layout(w, s, z, K, group_size);
  const int64_t NS = w.size(0), G = L.G, gs = L.gw * 8, K8 = K / 8;
  TORCH_CHECK(NS * ST >= N, "qvlm_cpu: N larger than the packed weight");
  at::Tensor out = at::empty({M, N}, in.x.options());
  if (M == 0) return finish(out, x_in);
  gemm_min_rows = gemm_rows(gemm_min_rows, x_in, true);

  if (M >= gemm_min_rows && x_in.scalar_type() == at::kBFloat16 && use_avx512()) {
    // Prefill without AMX: as above, with torch's bf16 GEMM.
    at::Tensor xqb = at::empty({M, K}, x_in.options());
    at::Tensor xs = at::empty({M, 1}, in.x.options());
    uint16_t* qp = reinterpret_cast<uint16_t*>(xqb.data_ptr<at::BFloat16>());
    const float* xp = in.x.data_ptr<float>();
    float* sp = xs.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        sp[m] = quantize_row(xp + m * K, K, [&](int64_t k0, const int32_t* q) {
          for (int64_t j = 0; j < 8 && k0 + j < K; ++j) {
            const float f = static_cast<float>(q[j]);
            uint32_t bits;
            std::memcpy(&bits, &f, 4);
            qp[m * K + k0 + j] = static_cast<uint16_t>(bits >> 16);  // |q| <= 128: exact
          }
        });
    });
    w4_gemm_bf16(L, NS, N, xqb, xs, in.bias, out);
    return finish(out, x_in);
  }

  const int64_t nblk = (M + RB - 1) / RB, XS = row_stride(M);
  std::vector<int8_t> xq(nblk * K8 * XS * 8, 0);
  std::vector<int32_t> qsum(nblk * G * XS, 0);
  std::vector<float> xscale(M);
  const float* xp = in.x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int8_t* xo = xq.data() + (m / RB) * K8 * XS * 8 + (m % RB) * 8;
      int32_t* qs = qsum.data() + (m / RB) * G * XS + m % RB;
      xscale[m] = quantize_row(xp + m * K, K, [&](int64_t k0, const int32_t* q) {
        int8_t* d = xo + (k0 / 8) * XS * 8;
        for (int j = 0; j < 8; ++j) d[(j >> 1) + (j & 1) * 4] = static_cast<int8_t>(q[j]);
        qs[(k0 / gs) * XS] += q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
      });
    }
  });
  float* op = out.data_ptr<float>();
  const bool avx512 = use_avx512();
  if (avx512 && M == 1) {
    run_row(NS, op, N, xscale.data(), in.bp, [&](int64_t st, float* tile, bool several) {
      if (several)
        qvlm::avx512::w4a8_row(L, st, xq.data(), qsum.data(), tile);
      else
        qvlm::avx512::w4a8_tile(L, st, 1, 1, xq.data(), qsum.data(), tile);
    });
    return finish(out, x_in);
  }
  run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
    alignas(64) float tile[RB * ST];
    if (avx512)
      qvlm::avx512::w4a8_tile(L, st, rows, static_cast<int>(XS), xq.data() + b * K8 * XS * 8,
                              qsum.data() + b * G * XS, tile);
    else
      w4a8_fn(rows, XS)(L, st, xq.data() + b * K8 * XS * 8, qsum.data() + b * G * XS, tile);
    store_tile(tile, rows, op, N, b * RB, st * ST, xscale.data(), nullptr, in.bp);
  });
  return finish(out, x_in);
}

// ---------------------------------------------------------------------------------------------
// w8a8: s8 weights x s8 activations, both sign-extended to int16, _mm256_madd_epi16 on
// (k, k+1) pairs: exact int32 (no saturation, unlike u8 x s8 maddubs). Activations are int16
// pairs [block][K/2][RB][2] so one 32-bit broadcast feeds 8 columns.
// ---------------------------------------------------------------------------------------------
template <int MR, int XS>
__attribute__((flatten)) void w8a8_tile(const int8_t* w, int64_t KP, const int16_t* xq, float* out) {
  // w: one supertile, [KP][2 halves][8 cols][2] bytes
  __m256i acc[MR * 2];
  unroll<MR * 2>([&](auto i) { acc[i] = _mm256_setzero_si256(); });
  for (int64_t kp = 0; kp < KP; ++kp) {
    const int8_t* wk = w + kp * 32;
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + 16)));
    if ((kp & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wk + 32 * 16), _MM_HINT_T0);
    const int16_t* xk = xq + kp * XS * 2;
    unroll<MR>([&](auto m) {
      const __m256i xb = _mm256_set1_epi32(load_i32(xk + m * 2));
      acc[m * 2] = _mm256_add_epi32(acc[m * 2], _mm256_madd_epi16(w0, xb));
      acc[m * 2 + 1] = _mm256_add_epi32(acc[m * 2 + 1], _mm256_madd_epi16(w1, xb));
    });
  }
  unroll<MR * 2>([&](auto i) { _mm256_storeu_ps(out + (i / 2) * ST + (i % 2) * 8, _mm256_cvtepi32_ps(acc[i])); });
}

using W8A8Fn = void (*)(const int8_t*, int64_t, const int16_t*, float*);
W8A8Fn w8a8_fn(int rows, int xs) {
  switch (rows) {
    case 1: return xs == 1 ? w8a8_tile<1, 1> : w8a8_tile<1, RB>;
    case 2: return w8a8_tile<2, RB>;
    case 3: return w8a8_tile<3, RB>;
    default: return w8a8_tile<4, RB>;
  }
}

// w: int8 [N/16, KP, 32], w_scale fp32 [N/16*16]; x [M, K] with K <= 2*KP (zero padded; the
// AVX-512 kernel takes k-pairs two at a time and needs KP even).
at::Tensor w8a8_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias_in, int64_t N) {
  const Inputs in = inputs(x_in, bias_in, N);
  const int64_t M = in.M, K = in.K;
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 32 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "qvlm_cpu: packed int8 weight must be contiguous int8 [N/16, K/2, 32]");
  const int64_t NS = w.size(0), KP = w.size(1);
  TORCH_CHECK(2 * KP >= K && 2 * KP - K < 4, "qvlm_cpu: K mismatch");
  TORCH_CHECK(NS * ST >= N && w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
                  w_scale.numel() == NS * ST,
              "qvlm_cpu: bad w_scale");
  at::Tensor out = at::empty({M, N}, in.x.options());
  if (M == 0) return finish(out, x_in);

  const int64_t nblk = (M + RB - 1) / RB, XS = row_stride(M);
  std::vector<float> xscale(M);
  const float* xp = in.x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* wsp = w_scale.data_ptr<float>();
  if (use_avx512() && KP % 2 == 0) {
    // Codes + 128 as uint8, 4 consecutive k per row: [block][KP/2][RB][4].
    std::vector<uint8_t> xu(nblk * KP * 2 * XS, 128);
    at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        uint8_t* xo = xu.data() + (m / RB) * KP * 2 * XS + (m % RB) * 4;
        xscale[m] = quantize_row(xp + m * K, K, [&](int64_t k0, const int32_t* q) {
          for (int j = 0; j < 8 && k0 + j < 2 * KP; ++j)
            xo[((k0 + j) / 4) * XS * 4 + (j & 3)] = static_cast<uint8_t>(q[j] + 128);
        });
      }
    });
    run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
      alignas(64) float tile[RB * ST];
      qvlm::avx512::w8a8_tile(wp + st * KP * 32, KP, rows, static_cast<int>(XS), xu.data() + b * KP * 2 * XS, tile);
      store_tile(tile, rows, op, N, b * RB, st * ST, xscale.data(), wsp, in.bp);
    });
    return finish(out, x_in);
  }
  std::vector<int16_t> xq(nblk * KP * XS * 2 + 8, 0);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int16_t* xo = xq.data() + (m / RB) * KP * XS * 2 + (m % RB) * 2;
      xscale[m] = quantize_row(xp + m * K, K, [&](int64_t k0, const int32_t* q) {
        for (int j = 0; j < 8 && k0 + j < 2 * KP; ++j)
          xo[((k0 + j) / 2) * XS * 2 + (j & 1)] = static_cast<int16_t>(q[j]);
      });
    }
  });
  run_tiles(NS, M, [&](int64_t st, int64_t b, int rows) {
    alignas(32) float tile[RB * ST];
    w8a8_fn(rows, XS)(wp + st * KP * 32, KP, xq.data() + b * KP * XS * 2, tile);
    store_tile(tile, rows, op, N, b * RB, st * ST, xscale.data(), wsp, in.bp);
  });
  return finish(out, x_in);
}

// Per-token int8 quantization alone (tests compare it with reference.quantize_per_token).
std::tuple<at::Tensor, at::Tensor> quant_per_token(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "qvlm_cpu: x must be 2-D");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sc = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    sp[m] = quantize_row(xp + m * K, K, [&](int64_t k0, const int32_t* v) {
      for (int64_t j = 0; j < 8 && k0 + j < K; ++j) qp[m * K + k0 + j] = static_cast<int8_t>(v[j]);
    });
  }
  return {q, sc};
}

}  // namespace

TORCH_LIBRARY(qvlm_cpu, m) {
  m.def("w4a16_linear(Tensor x, Tensor w, Tensor s, Tensor? z, Tensor? bias, int n, int group_size, int gemm_min_rows) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor w, Tensor s, Tensor? z, Tensor? bias, int n, int group_size, int gemm_min_rows) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int n) -> Tensor");
  m.def("quant_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("isa(str want) -> str", &isa);  // no tensor arguments: one implementation for every key
}

TORCH_LIBRARY_IMPL(qvlm_cpu, CPU, m) {
  m.impl("w4a16_linear", &w4a16_linear);
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("quant_per_token", &quant_per_token);
}
