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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int ST = 16;  // output columns per supertile

inline __m256 load_h8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256 load_z8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

struct W4Layout {
  const int32_t* w;      // [NS][K8][16]
  const at::Half* s;     // [NS][G][16]
  const uint8_t* z;      // [NS][G][16] or nullptr (implicit zero 8)
  int64_t K8, G, gw;     // K/8, groups, words (8 rows) per full group
};

// ---------------------------------------------------------------------------------------------
// w4a16: fp32 FMA on decoded nibbles.
//
// Decoding trick: nibble j of a word is isolated with an AND (no shift), which leaves
// code * 16^j; the activation of row 8i+j was pre-multiplied by 16^-j (exact, a power of two),
// so the product is exactly code * x. The top nibble uses a logical shift instead (its masked
// value would be negative as int32). Per 8 codes: and + cvt + fma. The zero point is applied at
// the group end as  -z * s * sum_k(x_k)  with per-row group sums computed beforehand.
// ---------------------------------------------------------------------------------------------

// MR rows x NT vectors of 8 columns (NT = 2: one supertile, 4: two), SPLIT accumulators per
// (row, vector) to break FMA latency chains when MR is small.
template <int MR, int NT, int SPLIT>
void w4a16_tile(const W4Layout& L, int64_t st0, const float* xs, const float* gsum, int64_t ldx,
                float* out, int64_t ldo) {
  static_assert(NT % 2 == 0, "NT covers whole supertiles");
  const int64_t st_words = L.K8 * ST;
  __m256 tot[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) tot[m][t] = _mm256_setzero_ps();

  const __m256i m0 = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = std::min(L.K8, kb + L.gw);
    __m256 acc[MR][NT][SPLIT];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t)
        for (int s = 0; s < SPLIT; ++s) acc[m][t][s] = _mm256_setzero_ps();

    const int32_t* wp[NT];
    for (int t = 0; t < NT; ++t) wp[t] = L.w + (st0 + t / 2) * st_words + (t % 2) * 8;

    for (int64_t k8 = kb; k8 < ke; ++k8) {
      __m256i q[NT];
      for (int t = 0; t < NT; ++t) q[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[t] + k8 * ST));
      if (k8 + 8 < ke)
        for (int t = 0; t < NT; t += 2) _mm_prefetch(reinterpret_cast<const char*>(wp[t] + (k8 + 8) * ST), _MM_HINT_T0);
      const float* xk = xs + k8 * 8;
#define QVLM_STEP(J, DECODE)                                                     \
  {                                                                              \
    __m256 c[NT];                                                                \
    for (int t = 0; t < NT; ++t) c[t] = _mm256_cvtepi32_ps(DECODE);              \
    for (int m = 0; m < MR; ++m) {                                               \
      const __m256 xb = _mm256_broadcast_ss(xk + m * ldx + J);                   \
      for (int t = 0; t < NT; ++t)                                               \
        acc[m][t][J % SPLIT] = _mm256_fmadd_ps(c[t], xb, acc[m][t][J % SPLIT]);  \
    }                                                                            \
  }
      QVLM_STEP(0, _mm256_and_si256(q[t], m0))
      QVLM_STEP(1, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 4)))
      QVLM_STEP(2, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 8)))
      QVLM_STEP(3, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 12)))
      QVLM_STEP(4, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 16)))
      QVLM_STEP(5, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 20)))
      QVLM_STEP(6, _mm256_and_si256(q[t], _mm256_slli_epi32(m0, 24)))
      QVLM_STEP(7, _mm256_srli_epi32(q[t], 28))
#undef QVLM_STEP
    }
    for (int t = 0; t < NT; ++t) {
      const int64_t off = (st0 + t / 2) * L.G * ST + g * ST + (t % 2) * 8;
      const __m256 s = load_h8(L.s + off);
      const __m256 zs = _mm256_mul_ps(s, L.z ? load_z8(L.z + off) : _mm256_set1_ps(8.0f));
      for (int m = 0; m < MR; ++m) {
        __m256 a = acc[m][t][0];
        for (int sp = 1; sp < SPLIT; ++sp) a = _mm256_add_ps(a, acc[m][t][sp]);
        tot[m][t] = _mm256_fmadd_ps(a, s, tot[m][t]);
        tot[m][t] = _mm256_fnmadd_ps(zs, _mm256_broadcast_ss(gsum + m * L.G + g), tot[m][t]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + m * ldo + t * 8, tot[m][t]);
}

using W4A16Fn = void (*)(const W4Layout&, int64_t, const float*, const float*, int64_t, float*, int64_t);

// Row-block kernels: index r = rows in the block (1..8). Two supertiles at once for few rows.
W4A16Fn w4a16_fn(int rows, bool two_tiles) {
  if (two_tiles) {
    switch (rows) {
      case 1: return w4a16_tile<1, 4, 2>;
      case 2: return w4a16_tile<2, 4, 1>;
      default: break;
    }
  }
  switch (rows) {
    case 1: return w4a16_tile<1, 2, 4>;
    case 2: return w4a16_tile<2, 2, 2>;
    case 3: return w4a16_tile<3, 2, 1>;
    case 4: return w4a16_tile<4, 2, 1>;
    case 5: return w4a16_tile<5, 2, 1>;
    default: return w4a16_tile<6, 2, 1>;
  }
}
constexpr int W4A16_MAX_ROWS = 6;

// Scaled activations for the nibble trick, and per-(row, group) sums of x.
void prep_w4a16_acts(const float* x, int64_t M, int64_t K, int64_t gs, int64_t G, float* xs, float* gsum) {
  static const float mul[8] = {1.f, 1.f / 16, 1.f / 256, 1.f / 4096, 1.f / 65536, 1.f / 1048576,
                               1.f / 16777216, 1.f};
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* xo = xs + m * K;
    for (int64_t k = 0; k < K; ++k) xo[k] = xr[k] * mul[k & 7];
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) s += xr[k];
      gsum[m * G + g] = s;
    }
  }
}

void store_cols(const float* tile, int64_t rows, int64_t ldt, float* out, int64_t ldo, int64_t n0, int64_t ncols,
                const float* bias) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < ncols; ++c) out[m * ldo + n0 + c] = tile[m * ldt + c] + (bias ? bias[n0 + c] : 0.f);
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
          const float s = static_cast<float>(L.s[off]);
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
  return W4Layout{w.data_ptr<int32_t>(), s.data_ptr<at::Half>(), zp, K / 8, G, gs / 8};
}

at::Tensor finish(at::Tensor out32, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? out32 : out32.to(x.scalar_type());
}

// x [M, K] (any float dtype) -> y [M, N] in x's dtype.
at::Tensor w4a16_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s,
                        const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias_in, int64_t N,
                        int64_t group_size, int64_t gemm_min_rows) {
  TORCH_CHECK(x_in.dim() == 2, "qvlm_cpu: x must be 2-D");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const W4Layout L = w4_layout(w, s, z, K, group_size);
  const int64_t NS = w.size(0);
  TORCH_CHECK(NS * ST >= N, "qvlm_cpu: N larger than the packed weight");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;

  if (M >= gemm_min_rows) {
    // Prefill: dequantize column chunks (about 16 MiB of fp32) and use torch's fp32 GEMM.
    at::Tensor out = at::empty({M, N}, x.options());
    const int64_t chunk_st = std::max<int64_t>(1, (int64_t{16} << 20) / (K * 4 * ST));
    at::Tensor buf = at::empty({std::min(NS, chunk_st) * ST, K}, x.options());
    for (int64_t st = 0; st < NS; st += chunk_st) {
      const int64_t se = std::min(NS, st + chunk_st);
      const int64_t n0 = st * ST, n1 = std::min(N, se * ST);
      w4_dequant_rows(L, K, st, se, buf.data_ptr<float>());
      at::Tensor wc = buf.narrow(0, 0, n1 - n0);
      if (bias.defined())
        out.narrow(1, n0, n1 - n0).copy_(at::addmm(bias.narrow(0, n0, n1 - n0), x, wc.t()));
      else
        out.narrow(1, n0, n1 - n0).copy_(at::mm(x, wc.t()));
    }
    return finish(out, x_in);
  }

  const int64_t G = L.G;
  std::vector<float> xs(M * K), gsum(M * G);
  prep_w4a16_acts(x.data_ptr<float>(), M, K, L.gw * 8, G, xs.data(), gsum.data());
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const bool two = M <= 2 && NS % 2 == 0;
  const int64_t unit = two ? 2 : 1;  // supertiles per work item
  at::parallel_for(0, NS / unit, 1, [&](int64_t b, int64_t e) {
    alignas(32) float tile[W4A16_MAX_ROWS * 32];
    for (int64_t u = b; u < e; ++u) {
      const int64_t st0 = u * unit, n0 = st0 * ST;
      const int64_t ncols = std::min<int64_t>(unit * ST, N - n0);
      if (ncols <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += W4A16_MAX_ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(W4A16_MAX_ROWS, M - m0));
        w4a16_fn(rows, two)(L, st0, xs.data() + m0 * K, gsum.data() + m0 * G, K, tile, unit * ST);
        store_cols(tile, rows, unit * ST, op + m0 * N, N, n0, ncols, bp);
      }
    }
  });
  return finish(out, x_in);
}

// ---------------------------------------------------------------------------------------------
// Per-token dynamic int8 quantization (same arithmetic as reference.quantize_per_token:
// scale = max(amax, 1e-10) / 127, q = round_half_even(x / scale)).
// ---------------------------------------------------------------------------------------------
inline float quant_row_scale(const float* x, int64_t K) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  alignas(32) float t[8];
  _mm256_store_ps(t, mx);
  float amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, t[i]);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return std::max(amax, 1e-10f) / 127.0f;
}

inline int32_t quant_one(float v, float scale) {
  float q = std::nearbyint(v / scale);  // default rounding mode: half to even, like torch.round
  return static_cast<int32_t>(std::min(127.f, std::max(-128.f, q)));
}

// ---------------------------------------------------------------------------------------------
// w4a8: u4 weights x s8 activations with maddubs (|15*127*2| < 32767: never saturates), exact
// int32 per group; zero point as -z * sum(q over group); scaled per group by w_scale in fp32,
// by the token's scale at the end. Activations are stored per 8-row block as the bytes
// [x0 x2 x4 x6 x1 x3 x5 x7] to match (word & 0x0F0F0F0F) and ((word >> 4) & 0x0F0F0F0F).
// ---------------------------------------------------------------------------------------------
template <int MR, int NT>
void w4a8_tile(const W4Layout& L, int64_t st0, const int8_t* xq, const int32_t* qsum, int64_t ldx, float* out,
               int64_t ldo) {
  const int64_t st_words = L.K8 * ST;
  __m256 tot[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) tot[m][t] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* wp[NT];
  for (int t = 0; t < NT; ++t) wp[t] = L.w + (st0 + t / 2) * st_words + (t % 2) * 8;

  for (int64_t g = 0; g < L.G; ++g) {
    const int64_t kb = g * L.gw, ke = std::min(L.K8, kb + L.gw);
    __m256i acc[MR][NT];
    for (int m = 0; m < MR; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_setzero_si256();
    for (int64_t k8 = kb; k8 < ke; ++k8) {
      __m256i lo[NT], hi[NT];
      for (int t = 0; t < NT; ++t) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[t] + k8 * ST));
        lo[t] = _mm256_and_si256(q, lo4);
        hi[t] = _mm256_and_si256(_mm256_srli_epi32(q, 4), lo4);
      }
      if (k8 + 8 < ke)
        for (int t = 0; t < NT; t += 2) _mm_prefetch(reinterpret_cast<const char*>(wp[t] + (k8 + 8) * ST), _MM_HINT_T0);
      for (int m = 0; m < MR; ++m) {
        const int32_t* xp = reinterpret_cast<const int32_t*>(xq + m * ldx + k8 * 8);
        const __m256i xa = _mm256_set1_epi32(xp[0]), xb = _mm256_set1_epi32(xp[1]);
        for (int t = 0; t < NT; ++t) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[t], xa), _mm256_maddubs_epi16(hi[t], xb));
          acc[m][t] = _mm256_add_epi32(acc[m][t], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const int64_t off = (st0 + t / 2) * L.G * ST + g * ST + (t % 2) * 8;
      const __m256 s = load_h8(L.s + off);
      __m256i zv = L.z ? _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(L.z + off)))
                       : _mm256_set1_epi32(8);
      for (int m = 0; m < MR; ++m) {
        const __m256i a = _mm256_sub_epi32(acc[m][t], _mm256_mullo_epi32(zv, _mm256_set1_epi32(qsum[m * L.G + g])));
        tot[m][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, tot[m][t]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + m * ldo + t * 8, tot[m][t]);
}

using W4A8Fn = void (*)(const W4Layout&, int64_t, const int8_t*, const int32_t*, int64_t, float*, int64_t);
W4A8Fn w4a8_fn(int rows) {
  switch (rows) {
    case 1: return w4a8_tile<1, 4>;
    case 2: return w4a8_tile<2, 4>;
    case 3: return w4a8_tile<3, 2>;
    default: return w4a8_tile<4, 2>;
  }
}
constexpr int W4A8_MAX_ROWS = 4;

at::Tensor w4a8_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s,
                       const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& bias_in, int64_t N,
                       int64_t group_size) {
  TORCH_CHECK(x_in.dim() == 2, "qvlm_cpu: x must be 2-D");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const W4Layout L = w4_layout(w, s, z, K, group_size);
  const int64_t NS = w.size(0), G = L.G, gs = L.gw * 8;
  TORCH_CHECK(NS * ST >= N, "qvlm_cpu: N larger than the packed weight");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;

  std::vector<int8_t> xq(M * K);
  std::vector<int32_t> qsum(M * G);
  std::vector<float> xscale(M);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = xp + m * K;
      const float sc = quant_row_scale(xr, K);
      xscale[m] = sc;
      int8_t* qo = xq.data() + m * K;
      for (int64_t g = 0; g < G; ++g) qsum[m * G + g] = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t q = quant_one(xr[k], sc);
        const int j = static_cast<int>(k & 7);
        qo[(k & ~int64_t{7}) + (j >> 1) + (j & 1) * 4] = static_cast<int8_t>(q);
        qsum[m * G + k / gs] += q;
      }
    }
  });

  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const int64_t unit = (M <= 2 && NS % 2 == 0) ? 2 : 1;
  at::parallel_for(0, NS / unit, 1, [&](int64_t b, int64_t e) {
    alignas(32) float tile[W4A8_MAX_ROWS * 32];
    for (int64_t u = b; u < e; ++u) {
      const int64_t st0 = u * unit, n0 = st0 * ST;
      const int64_t ncols = std::min<int64_t>(unit * ST, N - n0);
      if (ncols <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += W4A8_MAX_ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(W4A8_MAX_ROWS, M - m0));
        W4A8Fn fn = unit == 2 ? (rows == 1 ? w4a8_tile<1, 4> : w4a8_tile<2, 4>) : w4a8_fn(rows);
        fn(L, st0, xq.data() + m0 * K, qsum.data() + m0 * G, K, tile, unit * ST);
        for (int r = 0; r < rows; ++r)
          for (int64_t c = 0; c < ncols; ++c)
            op[(m0 + r) * N + n0 + c] = tile[r * unit * ST + c] * xscale[m0 + r] + (bp ? bp[n0 + c] : 0.f);
      }
    }
  });
  return finish(out, x_in);
}

// ---------------------------------------------------------------------------------------------
// w8a8: s8 weights x s8 activations, both sign-extended to int16, _mm256_madd_epi16 on
// (k, k+1) pairs: exact int32 (no saturation). Activations are kept as int16 pairs so one
// 32-bit broadcast feeds 8 columns.
// ---------------------------------------------------------------------------------------------
template <int MR>
void w8a8_tile(const int8_t* w, int64_t KP, const int16_t* xq, int64_t ldx, int32_t* out, int64_t ldo) {
  // w: one supertile, [KP][2 halves][8 cols][2] bytes; xq: [MR][2*KP] int16
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t kp = 0; kp < KP; ++kp) {
    const int8_t* wk = w + kp * 32;
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wk + 16)));
    if ((kp & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wk + 32 * 16), _MM_HINT_T0);
    for (int m = 0; m < MR; ++m) {
      const __m256i xb = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xq + m * ldx + 2 * kp));
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, xb));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, xb));
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo), acc[m][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo + 8), acc[m][1]);
  }
}

using W8A8Fn = void (*)(const int8_t*, int64_t, const int16_t*, int64_t, int32_t*, int64_t);
W8A8Fn w8a8_fn(int rows) {
  switch (rows) {
    case 1: return w8a8_tile<1>;
    case 2: return w8a8_tile<2>;
    case 3: return w8a8_tile<3>;
    case 4: return w8a8_tile<4>;
    case 5: return w8a8_tile<5>;
    default: return w8a8_tile<6>;
  }
}
constexpr int W8A8_MAX_ROWS = 6;

// w: int8 [N/16, KP, 32], w_scale fp32 [N/16*16]; x [M, K] with K <= 2*KP (zero padded).
at::Tensor w8a8_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias_in, int64_t N) {
  TORCH_CHECK(x_in.dim() == 2, "qvlm_cpu: x must be 2-D");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 32 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "qvlm_cpu: packed int8 weight must be contiguous int8 [N/16, K/2, 32]");
  const int64_t M = x_in.size(0), K = x_in.size(1), NS = w.size(0), KP = w.size(1);
  TORCH_CHECK(2 * KP >= K && 2 * KP - K < 2, "qvlm_cpu: K mismatch");
  TORCH_CHECK(NS * ST >= N && w_scale.scalar_type() == at::kFloat && w_scale.numel() == NS * ST,
              "qvlm_cpu: bad w_scale");
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* wsp = w_scale.data_ptr<float>();

  const int64_t ldx = 2 * KP;
  std::vector<int16_t> xq(M * ldx, 0);
  std::vector<float> xscale(M);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float sc = quant_row_scale(xp + m * K, K);
      xscale[m] = sc;
      for (int64_t k = 0; k < K; ++k) xq[m * ldx + k] = static_cast<int16_t>(quant_one(xp[m * K + k], sc));
    }
  });

  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  at::parallel_for(0, NS, 1, [&](int64_t b, int64_t e) {
    alignas(32) int32_t tile[W8A8_MAX_ROWS * ST];
    for (int64_t st = b; st < e; ++st) {
      const int64_t n0 = st * ST, ncols = std::min<int64_t>(ST, N - n0);
      if (ncols <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += W8A8_MAX_ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(W8A8_MAX_ROWS, M - m0));
        w8a8_fn(rows)(wp + st * KP * 32, KP, xq.data() + m0 * ldx, ldx, tile, ST);
        for (int r = 0; r < rows; ++r)
          for (int64_t c = 0; c < ncols; ++c)
            op[(m0 + r) * N + n0 + c] =
                static_cast<float>(tile[r * ST + c]) * xscale[m0 + r] * wsp[n0 + c] + (bp ? bp[n0 + c] : 0.f);
      }
    }
  });
  return finish(out, x_in);
}

// Per-token int8 quantization alone (tests compare it with reference.quantize_per_token).
std::tuple<at::Tensor, at::Tensor> quant_per_token(const at::Tensor& x_in) {
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sc = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    sp[m] = quant_row_scale(xp + m * K, K);
    for (int64_t k = 0; k < K; ++k) qp[m * K + k] = static_cast<int8_t>(quant_one(xp[m * K + k], sp[m]));
  }
  return {q, sc};
}

}  // namespace

TORCH_LIBRARY(qvlm_cpu, m) {
  m.def("w4a16_linear(Tensor x, Tensor w, Tensor s, Tensor? z, Tensor? bias, int n, int group_size, int gemm_min_rows) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor w, Tensor s, Tensor? z, Tensor? bias, int n, int group_size) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, int n) -> Tensor");
  m.def("quant_per_token(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qvlm_cpu, CPU, m) {
  m.impl("w4a16_linear", &w4a16_linear);
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("quant_per_token", &quant_per_token);
}
