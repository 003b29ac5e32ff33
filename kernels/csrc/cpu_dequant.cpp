// Dequantize GPTQ weights to a transient W^T tile for one dense GEMM (kernels/cpu_ext.py loads this).
//
// Plain loops written so that gcc -O3 -march=native vectorizes them: the weights are read once and
// each output element costs one int->float, one fma and one round to the output dtype. Threads
// split the K rows (at::parallel_for), so every thread writes its own contiguous rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GPTQ_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define GPTQ_AVX512_BF16 1
#endif

namespace {

inline uint16_t to_bf16_bits(float f) {  // round to nearest even, as torch does (no NaNs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename T> struct Store;
template <> struct Store<float> {
  using raw = float;
  static raw cvt(float f) { return f; }
};
template <> struct Store<at::BFloat16> {
  using raw = uint16_t;
  static raw cvt(float f) { return to_bf16_bits(f); }
};
template <> struct Store<at::Half> {
  using raw = _Float16;
  static raw cvt(float f) { return static_cast<_Float16>(f); }
};

// packed  uint8 [N, K/2]  torch._convert_weight_to_int4pack_for_cpu's layout: B-channel blocks (B = 64
//                          under AVX-512, 32 under AVX2: cpu.int4pack_block_n); byte k*B/2 + c of block
//                          b holds channel b*B+c (low nibble), b*B+B/2+c (high)
// scale, offset  fp32 [K/gs, N]   W[n, k] = q * scale[k/gs, n] + offset[k/gs, n]
// out     T [K, n1 - n0]   W^T for output channels [n0, n1), n0 and n1 multiples of 64
// One B-channel block of one K row: B/2 bytes (`half`) -> B outputs.
template <typename T>
inline void int4pack_block(const uint8_t* __restrict__ src, const float* __restrict__ s,
                           const float* __restrict__ o, typename Store<T>::raw* __restrict__ d, int half) {
  for (int c = 0; c < half; ++c) {
    d[c] = Store<T>::cvt(static_cast<float>(src[c] & 15) * s[c] + o[c]);
    d[c + half] = Store<T>::cvt(static_cast<float>(src[c] >> 4) * s[half + c] + o[half + c]);
  }
}

#ifdef GPTQ_AVX2
// fp32 tiles (fp32 serving, and every x86 CPU): gcc left the loop above scalar (0.9 G weights/s on one
// AVX2 core); 8 outputs per fma here. `half` is 16 or 32.
template <>
inline void int4pack_block<float>(const uint8_t* __restrict__ src, const float* __restrict__ s,
                                  const float* __restrict__ o, float* __restrict__ d, int half) {
  const __m256i nibble = _mm256_set1_epi32(15);
  for (int c = 0; c < half; c += 8) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + c)));
    __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nibble)), _mm256_loadu_ps(s + c),
                                _mm256_loadu_ps(o + c));
    __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(s + half + c),
                                _mm256_loadu_ps(o + half + c));
    _mm256_storeu_ps(d + c, lo);
    _mm256_storeu_ps(d + half + c, hi);
  }
}
#endif

#ifdef GPTQ_AVX512_BF16
// The hot case (bf16 serving): widen 16 bytes at a time, one fma per 16 outputs, and round with the
// AVX512-BF16 convert instead of the integer rounding trick the auto-vectorizer gets.
template <>
inline void int4pack_block<at::BFloat16>(const uint8_t* __restrict__ src, const float* __restrict__ s,
                                         const float* __restrict__ o, uint16_t* __restrict__ d, int half) {
  const __m512i nibble = _mm512_set1_epi32(15);
  for (int c = 0; c < half; c += 16) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
    __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, nibble)), _mm512_loadu_ps(s + c),
                                _mm512_loadu_ps(o + c));
    __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(s + half + c),
                                _mm512_loadu_ps(o + half + c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)_mm512_cvtneps_pbh(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + half + c), (__m256i)_mm512_cvtneps_pbh(hi));
  }
}
#endif

template <typename T>
void int4pack_to_wt(const uint8_t* packed, const float* scale, const float* offset,
                    typename Store<T>::raw* out, int64_t K, int64_t N, int64_t gs, int64_t n0, int64_t n1,
                    int64_t B) {
  const int64_t width = n1 - n0, half = B / 2;
  at::parallel_for(0, K, 16, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      const float* s = scale + (k / gs) * N;
      const float* o = offset + (k / gs) * N;
      auto* dst = out + k * width;
      for (int64_t b = n0 / B; b < n1 / B; ++b) {
        int4pack_block<T>(packed + b * K * half + k * half, s + b * B, o + b * B, dst + (b * B - n0), half);
      }
    }
  });
}

// q uint8 [K, N], g_idx int64 [K], scale/offset fp32 [G, N] -> out T [K, n1 - n0]
template <typename T>
void rows_to_wt(const uint8_t* q, const int64_t* g_idx, const float* scale, const float* offset,
                typename Store<T>::raw* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t width = n1 - n0;
  at::parallel_for(0, K, 16, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      const float* __restrict__ s = scale + g_idx[k] * N + n0;
      const float* __restrict__ o = offset + g_idx[k] * N + n0;
      const uint8_t* __restrict__ src = q + k * N + n0;
      auto* __restrict__ d = out + k * width;
      for (int64_t j = 0; j < width; ++j) d[j] = Store<T>::cvt(static_cast<float>(src[j]) * s[j] + o[j]);
    }
  });
}

void check_common(const torch::Tensor& scale, const torch::Tensor& offset) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat, "scale/offset fp32");
  TORCH_CHECK(scale.is_contiguous() && offset.is_contiguous() && scale.sizes() == offset.sizes(),
              "scale/offset contiguous, same shape");
}

}  // namespace

void check_out(const torch::Tensor& out, int64_t K, int64_t width) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == K && out.size(1) == width,
              "out must be a contiguous [K, n1 - n0] tile");
}

// Writes into `out` (reused across tiles and calls by the caller: no page faults per tile).
void dequant_int4pack(torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                      int64_t group_size, int64_t n0, int64_t n1, torch::Tensor out, int64_t block_n) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2, "packed");
  check_common(scale, offset);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(block_n == 64 || block_n == 32, "int4pack block of 64 or 32 channels");
  TORCH_CHECK(N % 64 == 0 && n0 % 64 == 0 && n1 % 64 == 0 && 0 <= n0 && n0 < n1 && n1 <= N, "n range");
  TORCH_CHECK(K % group_size == 0 && scale.size(0) == K / group_size && scale.size(1) == N, "groups");
  check_out(out, K, n1 - n0);
  const auto dtype = out.scalar_type();
  const auto* p = packed.data_ptr<uint8_t>();
  if (dtype == at::kFloat)
    int4pack_to_wt<float>(p, scale.data_ptr<float>(), offset.data_ptr<float>(),
                          out.data_ptr<float>(), K, N, group_size, n0, n1, block_n);
  else if (dtype == at::kBFloat16)
    int4pack_to_wt<at::BFloat16>(p, scale.data_ptr<float>(), offset.data_ptr<float>(),
                                 reinterpret_cast<uint16_t*>(out.data_ptr()), K, N, group_size, n0, n1, block_n);
  else if (dtype == at::kHalf)
    int4pack_to_wt<at::Half>(p, scale.data_ptr<float>(), offset.data_ptr<float>(),
                             reinterpret_cast<_Float16*>(out.data_ptr()), K, N, group_size, n0, n1, block_n);
  else
    TORCH_CHECK(false, "dtype must be fp32, bf16 or fp16");
}

void dequant_rows(torch::Tensor q, torch::Tensor g_idx, torch::Tensor scale, torch::Tensor offset,
                  int64_t n0, int64_t n1, torch::Tensor out) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2, "q uint8 [K, N]");
  TORCH_CHECK(g_idx.scalar_type() == at::kLong && g_idx.is_contiguous() && g_idx.size(0) == q.size(0), "g_idx");
  check_common(scale, offset);
  const int64_t K = q.size(0), N = q.size(1);
  TORCH_CHECK(0 <= n0 && n0 < n1 && n1 <= N && scale.size(1) == N, "n range");
  check_out(out, K, n1 - n0);
  const auto dtype = out.scalar_type();
  const auto* p = q.data_ptr<uint8_t>();
  const auto* g = g_idx.data_ptr<int64_t>();
  if (dtype == at::kFloat)
    rows_to_wt<float>(p, g, scale.data_ptr<float>(), offset.data_ptr<float>(), out.data_ptr<float>(), K, N, n0, n1);
  else if (dtype == at::kBFloat16)
    rows_to_wt<at::BFloat16>(p, g, scale.data_ptr<float>(), offset.data_ptr<float>(),
                             reinterpret_cast<uint16_t*>(out.data_ptr()), K, N, n0, n1);
  else if (dtype == at::kHalf)
    rows_to_wt<at::Half>(p, g, scale.data_ptr<float>(), offset.data_ptr<float>(),
                         reinterpret_cast<_Float16*>(out.data_ptr()), K, N, n0, n1);
  else
    TORCH_CHECK(false, "dtype must be fp32, bf16 or fp16");
}

// cpu_gemm_bf16.cpp
bool has_gemm_bf16();
void gemm_int4pack_bf16(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, torch::Tensor segs,
                        torch::Tensor y);
void gemm_blocked8_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                     torch::Tensor segs, torch::Tensor y);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequant_int4pack", &dequant_int4pack, "int4pack layout -> out = W^T [K, n1-n0]");
  m.def("dequant_rows", &dequant_rows, "uint8 [K, N] rows -> out = W^T [K, n1-n0]");
  m.def("has_gemm_bf16", &has_gemm_bf16, "whether the fused bf16 dequant-GEMM was compiled (AVX512-BF16)");
  m.def("gemm_int4pack_bf16", &gemm_int4pack_bf16, "y = x @ W^T, W in int4pack layout");
  m.def("gemm_blocked8_bf16", &gemm_blocked8_bf16, "y = x @ W^T, W as uint8 [N/64, K, 64]");
}
