// Element types the library accepts, tagged at run time so that one C++ ABI serves every caller
// (the Python binding passes torch's dtype as a DType). The CPU path stores float16 / bfloat16 as raw
// 16-bit patterns and converts them with the portable functions below; CUDA code uses __half and
// __nv_bfloat16 for the same bits.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fused_convt {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  throw std::invalid_argument("fused_convt: unknown dtype tag " + std::to_string(static_cast<int>(t)));
}

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Float64: return 8;
  }
  throw std::invalid_argument("fused_convt: unknown dtype tag " + std::to_string(static_cast<int>(t)));
}

struct HalfBits { uint16_t bits; };
struct BFloat16Bits { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// bfloat16 is the top half of a float; round to nearest even, keep NaN a (quiet) NaN.
inline float to_float(BFloat16Bits v) { return bits_float(uint32_t(v.bits) << 16); }
inline BFloat16Bits to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16Bits{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16Bits{uint16_t(u >> 16)};
}

// IEEE binary16 <-> binary32, round to nearest even, subnormals, infinities and NaN handled.
inline float to_float(HalfBits v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal half: value = mant * 2^-24, exactly representable as a float.
  const float mag = float(mant) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}
inline HalfBits to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return HalfBits{uint16_t(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return HalfBits{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: scale so that one half ulp (2^-24) is one unit and round
    // to nearest even with the float unit's own rounding.
    const float mag = bits_float(abs) * 16777216.0f;
    const float rounded = mag + 8388608.0f - 8388608.0f;  // round-to-nearest-even to an integer
    return HalfBits{uint16_t(sign | uint16_t(rounded))};
  }
  uint32_t mant = abs & 0x7fffffu;
  uint32_t exp = (abs >> 23) - 112u;
  uint32_t half = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1u;
  return HalfBits{uint16_t(sign | half)};
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

template <typename T> struct HostStorage;
template <> struct HostStorage<float> { static float from(float v) { return v; } };
template <> struct HostStorage<double> { static double from(double v) { return v; } };
template <> struct HostStorage<HalfBits> { static HalfBits from(float v) { return to_half(v); } };
template <> struct HostStorage<BFloat16Bits> { static BFloat16Bits from(float v) { return to_bfloat16(v); } };

// The accumulation type: float for every 16/32-bit storage type, double for double.
template <typename T> struct AccumulatorOf { using type = float; };
template <> struct AccumulatorOf<double> { using type = double; };

}  // namespace fused_convt
