// Fused dequant-GEMM for bf16 activations on AVX512-BF16 CPUs: kernels/cpu.py's `fused` path, every M.
//
// y[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] * q[k, n]) + o[g, n] * (sum_{k in g} x[m, k])
//
// The integer q (0..255) is exact in bf16, so the inner loop is a plain bf16 GEMM (vdpbf16ps, fp32
// accumulation) on q unpacked into a small L1 panel, and the group scale/offset is applied once per
// group to the fp32 accumulators. No [K, N] bf16 copy of W is ever written: the panel is 64 channels x
// one K segment (<= 256) and is reused by every row of x (for M <= 4 the weights go straight to
// registers instead). Threads split the 64-channel blocks.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

namespace {

constexpr int64_t NB = 64;   // output channels per block (int4pack's block)
constexpr int64_t MR = 6;    // rows of x per micro-kernel: 6 x 4 zmm accumulators
constexpr int64_t kDirectMaxM = 4;  // up to this M, weights are unpacked into registers, not a panel

inline __m512 bf16_lo(__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
inline __m512 bf16_hi(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
}

// A weight layout gives, per (64-channel block b, row pair k, k+1): `pair`, the 4 zmm of bf16
// (q[k, c], q[k+1, c]) for c = 0..63 (16 channels each) from `at(b, k)`, kPairBytes further per pair;
// and `group`, the fp32 scale and offset (W = q * s + o) of 16 channels of one group.

// int4pack layout (torch._convert_weight_to_int4pack_for_cpu): packed uint8 [N, K/2], byte k*32 + c of
// 64-channel block b holds channel b*64+c (low nibble) and b*64+32+c (high nibble) of row k.
// sz bf16 [K/gs, N, 2]: W = (q - 8) * s + zf.
struct Int4Pack {
  static constexpr int64_t kPairBytes = 64;
  const uint8_t* packed;
  const uint16_t* sz;
  int64_t K, N;
  __m512i lut, pick_lo, pick_hi;

  Int4Pack(const uint8_t* p, const uint16_t* sz_, int64_t K_, int64_t N_) : packed(p), sz(sz_), K(K_), N(N_) {
    alignas(64) uint16_t table[32], lo[32], hi[32];
    for (int i = 0; i < 32; ++i) {
      float f = static_cast<float>(i & 15);  // vpermw reads 5 index bits: bit 4 is the other nibble's
      uint32_t u;
      std::memcpy(&u, &f, 4);
      table[i] = static_cast<uint16_t>(u >> 16);
      lo[i] = (i & 1) ? 32 + i / 2 : i / 2;  // (row k, row k+1) of byte column i/2
      hi[i] = (i & 1) ? 32 + 16 + i / 2 : 16 + i / 2;
    }
    lut = _mm512_load_si512(table);
    pick_lo = _mm512_load_si512(lo);
    pick_hi = _mm512_load_si512(hi);
  }

  const uint8_t* at(int64_t b, int64_t k) const { return packed + b * K * 32 + k * 32; }

  // vpermw as a 16-entry lookup: nibble -> its bf16, no int->float convert.
  void pair(const uint8_t* src, __m512i out[4]) const {
    __m512i r0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    __m512i r1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32)));
    __m512i v0 = _mm512_permutex2var_epi16(r0, pick_lo, r1);  // bytes of channels 0..15 | 32..47
    __m512i v1 = _mm512_permutex2var_epi16(r0, pick_hi, r1);  // channels 16..31 | 48..63
    out[0] = _mm512_permutexvar_epi16(v0, lut);
    out[1] = _mm512_permutexvar_epi16(v1, lut);
    out[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v0, 4), lut);
    out[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v1, 4), lut);
  }

  void group(int64_t g, int64_t n, __m512& s, __m512& o) const {
    __m512i pairs = _mm512_loadu_si512(sz + (g * N + n) * 2);
    s = bf16_lo(pairs);
    o = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.f), bf16_hi(pairs));
  }
};

// 8-bit: q uint8 [N/64, K, 64] (each block's rows contiguous); scales, zeros bf16 [G, N]: W = (q - z) * s.
struct Blocked8 {
  static constexpr int64_t kPairBytes = 128;
  const uint8_t* q;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t K, N;

  const uint8_t* at(int64_t b, int64_t k) const { return q + (b * K + k) * NB; }

  // q <= 255 has at most 8 significant bits: its fp32's low 16 bits are zero and its top half is its
  // bf16, so each 32-bit lane is fp32(q[k+1]) | fp32(q[k]) >> 16.
  void pair(const uint8_t* src, __m512i out[4]) const {
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i r0 = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * j)))));
      __m512i r1 = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + NB + 16 * j)))));
      out[j] = _mm512_or_si512(r1, _mm512_srli_epi32(r0, 16));
    }
  }

  void group(int64_t g, int64_t n, __m512& s, __m512& o) const {
    auto widen = [](const uint16_t* p) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    };
    s = widen(scales + g * N + n);
    o = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), widen(zeros + g * N + n)), s);
  }
};

// Where the micro-kernel reads its bf16 weights from: the unpacked L1 panel (many rows of x share it)...
struct Panel {
  const uint16_t* panel;
  void pair(int64_t p, __m512i out[4]) const {
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) out[j] = _mm512_load_si512(panel + p * 128 + 32 * j);
  }
};
// ... or, for a few rows, straight from the packed weights (no panel round trip).
template <class W>
struct Direct {
  const W& w;
  const uint8_t* src;
  void pair(int64_t p, __m512i out[4]) const {
    for (int64_t l = 0; l < W::kPairBytes; l += 64)  // ~2 KiB ahead: DRAM latency at these few FLOPs
      _mm_prefetch(reinterpret_cast<const char*>(src + (p + 2048 / W::kPairBytes) * W::kPairBytes + l), _MM_HINT_T0);
    w.pair(src + p * W::kPairBytes, out);
  }
};

template <class W>
void unpack(const W& w, int64_t b, int64_t k0, int64_t npairs, uint16_t* panel) {
  const uint8_t* src = w.at(b, k0);
  __m512i v[4];
  const int64_t ahead = npairs * W::kPairBytes;  // the next segment: in L2 before its turn comes
  for (int64_t p = 0; p < npairs; ++p, src += W::kPairBytes, panel += 128) {
    for (int64_t l = 0; l < W::kPairBytes; l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(src + ahead + l), _MM_HINT_T1);
    w.pair(src, v);
    #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_si512(panel + 32 * j, v[j]);
  }
}

// c[R][64] += s * (x[R, seg] . W[seg, 64]): the offset term was added when c was initialized.
// (#pragma unroll: without it gcc keeps acc[][] in memory around the loop.)
template <int R, class Src>
inline void micro(const uint16_t* x, int64_t ldx, const Src& src, int64_t npairs, float* c, const float* s) {
  __m512 acc[R][4];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    __m512i b[4];
    src.pair(p, b);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * p, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      #pragma GCC unroll 8
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, (__m512bh)b[j]);
    }
  }
  __m512 sv[4];
  #pragma GCC unroll 8
  for (int j = 0; j < 4; ++j) sv[j] = _mm512_load_ps(s + 16 * j);
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int j = 0; j < 4; ++j)
      _mm512_store_ps(c + r * NB + 16 * j, _mm512_fmadd_ps(acc[r][j], sv[j], _mm512_load_ps(c + r * NB + 16 * j)));
}

template <class Src>
void run_rows(int64_t rows, const uint16_t* x, int64_t K, const Src& src, int64_t npairs, float* c,
              const float* s) {
  switch (rows) {
#define CASE(R) case R: micro<R>(x, K, src, npairs, c, s); break;
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
#undef CASE
  }
}

// segs int64 [S, 3]: (k0, k1, group) with even k0/k1, k1 - k0 <= kMaxSeg, covering K in order.
constexpr int64_t kMaxSeg = 256;

template <typename T>
std::unique_ptr<T[], decltype(&std::free)> aligned(int64_t n) {
  return {static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)), &std::free};
}

template <class W>
void gemm(const W& w, const uint16_t* x, int64_t M, int64_t K, int64_t N, const int64_t* segs, int64_t S,
          uint16_t* y) {
  // Sum of x over each segment (multiplies the group offsets). Serial: ~1% of the GEMM's reads, and
  // one parallel region per call instead of two.
  std::vector<float> xsum(M * S);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t m = 0; m < M; ++m)
    for (int64_t si = 0; si < S; ++si) {
      __m512 t = _mm512_setzero_ps();
      for (int64_t k = segs[3 * si]; k < segs[3 * si + 1]; k += 32) {
        const __mmask32 live = _cvtu32_mask32(~0u >> (32 - std::min<int64_t>(32, segs[3 * si + 1] - k)));
        t = _mm512_dpbf16_ps(t, (__m512bh)_mm512_maskz_loadu_epi16(live, x + m * K + k), ones);
      }
      xsum[m * S + si] = _mm512_reduce_add_ps(t);
    }
  // Threads take 64-channel blocks from a shared counter rather than a fixed half each: on a busy
  // machine a thread that was descheduled no longer holds up the whole call.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    auto panel = aligned<uint16_t>(kMaxSeg / 2 * 128);
    auto scale = aligned<float>(S * NB), offset = aligned<float>(S * NB), c = aligned<float>(M * NB);
    for (int64_t b; (b = next_block.fetch_add(1)) < N / NB;) {
      for (int64_t si = 0; si < S; ++si)
        for (int j = 0; j < 4; ++j) {
          __m512 sv, ov;
          w.group(segs[3 * si + 2], b * NB + 16 * j, sv, ov);
          _mm512_store_ps(scale.get() + si * NB + 16 * j, sv);
          _mm512_store_ps(offset.get() + si * NB + 16 * j, ov);
        }
      for (int64_t m = 0; m < M; ++m)  // c = sum over segments of offset * xsum
        for (int j = 0; j < 4; ++j) {
          __m512 v = _mm512_setzero_ps();
          for (int64_t si = 0; si < S; ++si)
            v = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * S + si]), _mm512_load_ps(offset.get() + si * NB + 16 * j), v);
          _mm512_store_ps(c.get() + m * NB + 16 * j, v);
        }
      for (int64_t si = 0; si < S; ++si) {
        const int64_t k0 = segs[3 * si], npairs = (segs[3 * si + 1] - k0) / 2;
        const float* s = scale.get() + si * NB;
        if (M <= kDirectMaxM) {
          run_rows(M, x + k0, K, Direct<W>{w, w.at(b, k0)}, npairs, c.get(), s);
          continue;
        }
        unpack(w, b, k0, npairs, panel.get());
        for (int64_t m = 0; m < M; m += MR)
          run_rows(std::min(MR, M - m), x + m * K + k0, K, Panel{panel.get()}, npairs, c.get() + m * NB, s);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + b * NB + 16 * j),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c.get() + m * NB + 16 * j)));
    }
  });
}

void check_args(const torch::Tensor& x, const torch::Tensor& segs, const torch::Tensor& y, int64_t K,
                int64_t N, int64_t G) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x bf16 [M, K] contiguous");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.is_contiguous() && y.size(0) == x.size(0) &&
              y.size(1) == N, "y bf16 [M, N] contiguous");
  TORCH_CHECK(segs.scalar_type() == at::kLong && segs.is_contiguous() && segs.dim() == 2 && segs.size(1) == 3,
              "segs int64 [S, 3]");
  TORCH_CHECK(N % NB == 0 && K % 2 == 0, "N % 64 == 0 and K even");
  const auto* s = segs.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t i = 0; i < segs.size(0); ++i) {
    TORCH_CHECK(s[3 * i] == k && s[3 * i + 1] > k && s[3 * i + 1] - k <= kMaxSeg && s[3 * i + 1] % 2 == 0,
                "segs must cover K in order with even bounds, <= 256 per segment");
    TORCH_CHECK(0 <= s[3 * i + 2] && s[3 * i + 2] < G, "segment group out of range");
    k = s[3 * i + 1];
  }
  TORCH_CHECK(k == K, "segs must cover K");
}

}  // namespace

bool has_gemm_bf16() { return true; }

void gemm_int4pack_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, torch::Tensor segs,
                        torch::Tensor y) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed uint8 [N, K/2]");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(1) == N &&
              sz.size(2) == 2, "scales_and_zeros bf16 [G, N, 2]");
  check_args(x, segs, y, K, N, sz.size(0));
  Int4Pack w(packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sz.data_ptr()), K, N);
  gemm(w, reinterpret_cast<const uint16_t*>(x.data_ptr()), x.size(0), K, N, segs.data_ptr<int64_t>(),
       segs.size(0), reinterpret_cast<uint16_t*>(y.data_ptr()));
}

void gemm_blocked8_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                        torch::Tensor segs, torch::Tensor y) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 3 && q.size(2) == NB,
              "q uint8 [N/64, K, 64]");
  const int64_t K = q.size(1), N = q.size(0) * NB;
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
              scales.is_contiguous() && zeros.is_contiguous() && scales.dim() == 2 && scales.size(1) == N &&
              zeros.sizes() == scales.sizes(), "scales, zeros bf16 [G, N]");
  check_args(x, segs, y, K, N, scales.size(0));
  Blocked8 w{q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
             reinterpret_cast<const uint16_t*>(zeros.data_ptr()), K, N};
  gemm(w, reinterpret_cast<const uint16_t*>(x.data_ptr()), x.size(0), K, N, segs.data_ptr<int64_t>(),
       segs.size(0), reinterpret_cast<uint16_t*>(y.data_ptr()));
}

#else  // no AVX512-BF16: kernels/cpu.py uses the dequantized tiles + GEMM instead

bool has_gemm_bf16() { return false; }
void gemm_int4pack_bf16(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}
void gemm_blocked8_bf16(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}

#endif
