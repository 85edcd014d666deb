// Shared by the CPU kernels: storage <-> fp32 conversions (round to nearest even, as torch rounds),
// dtype dispatch, argument checks and the OpenMP work split. No CUDA, no torch.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gf::cpu {

// Must match _DTYPE_CODES in kernels/_native.py (and csrc/common/dtype.h).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Storage types as bit patterns: no compiler half-precision type is needed (GCC before 12 has
// none on x86), so the CPU kernels build wherever the CUDA ones do.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(f16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu, u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;  // +-0
  } else {  // subnormal man * 2^-24: normalise into an fp32 normal
    uint32_t e = 113;
    while (!(man & 0x400u)) man <<= 1, --e;
    u = sign | (e << 23) | ((man & 0x3ffu) << 13);
  }
  return __builtin_bit_cast(float, u);
}
inline float to_float(bf16 x) { return __builtin_bit_cast(float, static_cast<uint32_t>(x.bits) << 16); }

template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline f16 from_float<f16>(float x) {  // round to nearest even, as torch rounds
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16{static_cast<uint16_t>(sign | 0x7e00u)};   // nan
  if (u >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (u < 0x38800000u) {  // below 2^-14: a subnormal (or 0, or 2^-14 itself), in units of 2^-24
    const float units = std::nearbyint(__builtin_bit_cast(float, u) * 16777216.0f);  // exact scaling
    return f16{static_cast<uint16_t>(sign | static_cast<uint32_t>(units))};
  }
  const uint32_t r = u - 0x38000000u;  // exponent 127 -> 15 bias; then 23 -> 10 mantissa bits
  return f16{static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13))};
}
template <> inline bf16 from_float<bf16>(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};  // NaN stays NaN
  return bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

#if defined(__AVX512F__)
// from_float<bf16> on 16 lanes: fp32 -> bf16 bits, rounding to nearest even; NaN stays NaN.
inline __m256i to_bf16_rne(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
#endif

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the storage type named by `dtype`.
template <typename F> void dispatch(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kFloat32: f(TypeTag<float>{}); break;
    case kFloat16: f(TypeTag<f16>{}); break;
    case kBFloat16: f(TypeTag<bf16>{}); break;
    default: throw std::invalid_argument(std::string(op) + ": dtype code " + std::to_string(dtype) +
                                         " unsupported (expected float32, float16 or bfloat16)");
  }
}

// Raises ValueError("<op>: <msg>") when `cond` is false.
inline void require(bool cond, const char* op, const std::string& msg) {
  if (!cond) throw std::invalid_argument(std::string(op) + ": " + msg);
}

template <typename T> inline T* as_ptr(int64_t addr) { return reinterpret_cast<T*>(static_cast<uintptr_t>(addr)); }

// exp(x) in fp32 to within ~2 ulp, written so that a loop over it vectorises (glibc's expf does
// not without -ffast-math, which this project does not use). Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2 / 2, and the Cephes minimax polynomial for exp(r). Results stay in
// fp32's normal range: x > 88 gives exp(88), x < -87 gives 0 (denormal products are slow, and a
// softmax weight that small is 0 to fp32 anyway); NaN propagates.
inline float exp_vec(float x) {
  const bool underflow = x < -87.0f;
  x = x > 88.0f ? 88.0f : x;
  x = underflow ? -87.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float whole = n == n ? n : 0.0f;  // (NaN: p is NaN already; converting NaN to an int is undefined)
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(whole) + 127) << 23;  // 2^n
  return underflow ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// GeGLU of one element in fp32: gelu_tanh(g) * u with z = sqrt(2/pi)(g + 0.044715 g^3) and
// gelu_tanh(g) = g (1 + tanh z) / 2 = g / (1 + exp(-2z)). One definition for gelu_and_mul and the
// linear that fuses it, so that both round the same value.
inline float gelu_mul(float g, float u) {
  constexpr float kTwoBeta = 2.0f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  return g / (1.0f + exp_vec(-kTwoBeta * (g + kKappa * g * g * g))) * u;
}

// Below this many elements of work a loop runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelGrain = 1 << 15;

}  // namespace gf::cpu
