// epilogue.h and the host conversions of dtype.h.
//
// The epilogue value and derivative (float and double) are compared with a long double reference over a
// grid of u that reaches deep into the tail, where 1 + erf would have cancelled; the special points
// (u == 0, u > 0, NaN, +inf) are checked exactly. The float16 / bfloat16 conversions are compared with an
// independent decoder (ldexp) on every bit pattern and with round-to-nearest-even chosen by brute force
// among the representable neighbours.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "fused_convt/dtype.h"
#include "fused_convt/epilogue.h"
#include "test_util.h"

using fused_convt::BFloat16Bits;
using fused_convt::Epilogue;
using fused_convt::HalfBits;

namespace {

template <typename Acc>
bool same_bits(Acc a, Acc b) {
  return std::memcmp(&a, &b, sizeof(Acc)) == 0;
}

template <typename Acc>
std::vector<Acc> u_grid(test::Rng& rng) {
  std::vector<Acc> grid = {Acc(-5), Acc(-10), Acc(-20), Acc(-30), Acc(-38), Acc(-40), Acc(-0.7518),
                           Acc(-1e-30), Acc(-1e-8), Acc(-std::numeric_limits<Acc>::denorm_min()),
                           -std::numeric_limits<Acc>::min(), Acc(-3.5e-3)};
  for (int i = 0; i <= 4500; ++i) grid.push_back(Acc(-40.0 + 0.01 * i));  // -40 .. 5, both signs of u
  for (int i = 0; i < 2000; ++i) grid.push_back(Acc(rng.uniform(-12.0, 1.0)));
  return grid;
}

template <typename Acc>
void epilogue_matches_long_double(test::Rng& rng, const char* type_name) {
  const double unit = test::Precision<Acc>::unit_roundoff, denorm = test::Precision<Acc>::denorm_min;
  const Acc multipliers[] = {Acc(1), Acc(-0.75), Acc(2.5), Acc(0.3)};
  for (const Acc m : multipliers) {
    for (const Acc u : u_grid<Acc>(rng)) {
      const std::string at = std::string(type_name) + " u=" + test::fmt(double(u)) + " m=" + test::fmt(double(m));
      const Acc value = fused_convt::epilogue_from_preactivation(u, m);
      const Acc derivative = fused_convt::epilogue_derivative(u, m);
      const long double ref_value = test::ref_epilogue(u, m);
      const long double ref_derivative = test::ref_epilogue_derivative(u, m);
      const double tol = test::epilogue_tolerance(double(u), double(m), unit, denorm);
      CHECK_MSG(std::fabs((long double)value - ref_value) <= tol,
                at + ": value " + test::fmt(double(value)) + " vs " + test::fmt(double(ref_value)));
      CHECK_MSG(std::fabs((long double)derivative - ref_derivative) <= tol,
                at + ": derivative " + test::fmt(double(derivative)) + " vs " + test::fmt(double(ref_derivative)));
    }
  }
}

// Relative error where the result is a normal number, the quantity the tolerance is derived from.
template <typename Acc>
void tail_is_relatively_accurate(const char* type_name) {
  const double unit = test::Precision<Acc>::unit_roundoff;
  // Deepest u whose value is still normal in Acc: about -13 for float, -37 for double.
  const double deepest = std::is_same<Acc, float>::value ? -12.0 : -37.0;
  for (double u = -0.25; u >= deepest; u -= 0.25) {
    const Acc value = fused_convt::epilogue_from_preactivation(Acc(u), Acc(1));
    const long double ref = test::ref_epilogue(u, 1.0L);
    const double relative = double(std::fabs(((long double)value - ref) / ref));
    CHECK_MSG(relative <= unit * (16 + 2 * u * u),
              std::string(type_name) + " u=" + test::fmt(u) + ": relative error " + test::fmt(relative));
  }
}

// The form for outputs rounded to 16 bits (normal_cdf_nonpositive_16bit): relative error within 2.5e-5 down
// to u = -13 (a tenth of float16's half-ulp), and the special points as the float form gives them.
void sixteen_bit_form() {
  for (double u = -0.005; u >= -13.0; u -= 0.005) {
    for (const float m : {1.0f, -0.75f}) {
      const float value = fused_convt::epilogue_from_preactivation<float, true>(float(u), m);
      const long double ref = test::ref_epilogue(float(u), (long double)m);
      const double relative = double(std::fabs(((long double)value - ref) / ref));
      CHECK_MSG(relative <= 2.5e-5, "16-bit form u=" + test::fmt(u) + ": relative error " + test::fmt(relative));
    }
  }
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (const float u : {0.0f, -0.0f, 1e-20f, 0.5f, 1e30f, inf, nan, -inf, -1e6f, -40.0f}) {
    const float coarse = fused_convt::epilogue_from_preactivation<float, true>(u, 2.0f);
    const float fine = fused_convt::epilogue_from_preactivation(u, 2.0f);
    CHECK_MSG(same_bits(coarse, fine) || (std::isnan(coarse) && std::isnan(fine)) || (coarse == 0 && fine == 0),
              "16-bit form at u=" + test::fmt(u) + ": " + test::fmt(coarse) + " where the float form gives " +
                  test::fmt(fine));
    const auto both = fused_convt::epilogue_value_and_derivative<float, true>(u, 2.0f);
    const auto fine_both = fused_convt::epilogue_value_and_derivative(u, 2.0f);
    auto agree = [](float a, float b) {
      return same_bits(a, b) || (std::isnan(a) && std::isnan(b)) || (a == 0 && b == 0);
    };
    CHECK_MSG(agree(both.value, fine_both.value) && agree(both.factor, fine_both.factor),
              "16-bit value and factor at u=" + test::fmt(u));
  }
  // The training forward's value and factor in the same form (epilogue_value_and_derivative<float, true>): the
  // value within 2.5e-5 relative, the factor Phi + u phi within 2e-5 of the larger of its two terms (it crosses
  // zero at u = -0.7518, GELU's minimum: a relative bound would not hold there), both far below a float16 factor's
  // half-ulp (4.9e-4).
  for (double u = -0.005; u >= -13.0; u -= 0.005) {
    const auto both = fused_convt::epilogue_value_and_derivative<float, true>(float(u), 1.0f);
    const long double z = float(u), ref_value = test::ref_epilogue(z, 1.0L);
    const long double cdf = test::ref_normal_cdf(z), density_term = -z * test::ref_normal_pdf(z);
    const double value_error = double(std::fabs(((long double)both.value - ref_value) / ref_value));
    const double factor_error = double(std::fabs((long double)both.factor - (cdf - density_term)) /
                                       std::max(cdf, density_term));
    CHECK_MSG(value_error <= 2.5e-5 && factor_error <= 2e-5,
              "16-bit value and factor u=" + test::fmt(u) + ": relative errors " + test::fmt(value_error) + ", " +
                  test::fmt(factor_error));
  }
}

template <typename Acc>
void special_points(const char* type_name) {
  const std::string t = type_name;
  const Acc m = Acc(-1.5), nan = std::numeric_limits<Acc>::quiet_NaN(), inf = std::numeric_limits<Acc>::infinity();
  // u == 0: value exactly 0, derivative m / 4 (a tie of the binary minimum times GELU'(0) = 1/2).
  CHECK_MSG(fused_convt::epilogue_from_preactivation(Acc(0), m) == Acc(0), t + " value at 0");
  CHECK_MSG(fused_convt::epilogue_derivative(Acc(0), m) == m / 4, t + " derivative at 0");
  CHECK_MSG(fused_convt::epilogue_derivative(Acc(-0.0), m) == m / 4, t + " derivative at -0");
  CHECK_MSG(fused_convt::epilogue_value_and_derivative(Acc(0), m).factor == Acc(0.25), t + " saved factor at 0");
  // u > 0: min(u, 0) == 0, so value and derivative are exactly 0, infinity included.
  for (const Acc u : {std::numeric_limits<Acc>::denorm_min(), Acc(1e-20), Acc(0.5), Acc(3), Acc(1e30), inf}) {
    CHECK_MSG(same_bits(fused_convt::epilogue_from_preactivation(u, m), Acc(0)), t + " value at u > 0");
    CHECK_MSG(same_bits(fused_convt::epilogue_value_and_derivative(u, m).factor, Acc(0)) &&
                  fused_convt::epilogue_derivative(u, m) == Acc(0),
              t + " factor and derivative at u > 0");
  }
  CHECK_MSG(std::isnan(fused_convt::epilogue_from_preactivation(nan, m)), t + " NaN value");
  CHECK_MSG(std::isnan(fused_convt::epilogue_derivative(nan, m)), t + " NaN derivative");
  // u = -inf: -inf * Phi(-inf) = -inf * 0, NaN in the PyTorch composite as well.
  CHECK_MSG(std::isnan(fused_convt::epilogue_from_preactivation(-inf, m)), t + " value at -inf");
  CHECK_MSG(std::isnan(fused_convt::epilogue_derivative(-inf, m)), t + " derivative at -inf");
  // Far in the tail the result is 0 of the sign of -m*u*Phi, never NaN.
  CHECK_MSG(fused_convt::epilogue_from_preactivation(Acc(-1e6), m) == Acc(0), t + " value at -1e6");
  CHECK_MSG(fused_convt::epilogue_derivative(Acc(-1e6), m) == Acc(0), t + " derivative at -1e6");
}

template <typename Acc>
void apply_epilogue_composes(test::Rng& rng, const char* type_name) {
  const std::string t = type_name;
  Epilogue identity_args;
  identity_args.enabled = false;
  identity_args.add_value = 3.25;
  identity_args.multiply_value = -2;
  Epilogue fused_args;
  fused_args.add_value = 0.3;
  fused_args.multiply_value = -1.7;
  const fused_convt::EpilogueConstants<Acc> identity(identity_args), fused(fused_args);
  CHECK_MSG(fused.add_value == Acc(0.3) && fused.multiply_value == Acc(-1.7) && fused.enabled && !identity.enabled,
            t + " EpilogueConstants rounds each scalar once");
  const Acc specials[] = {Acc(0), Acc(-0.0), std::numeric_limits<Acc>::infinity(),
                          -std::numeric_limits<Acc>::infinity(), std::numeric_limits<Acc>::quiet_NaN()};
  std::vector<Acc> values(std::begin(specials), std::end(specials));
  for (int i = 0; i < 1000; ++i) values.push_back(Acc(rng.uniform(-8, 8)));
  for (const Acc a : values) {
    CHECK_MSG(same_bits(fused_convt::apply_epilogue(identity, a), a), t + " disabled epilogue is the identity");
    const auto identity_both = fused_convt::apply_epilogue_with_factor(identity, a);
    CHECK_MSG(same_bits(identity_both.value, a) && identity_both.factor == Acc(1),
              t + " disabled epilogue: identity with factor 1");
    const Acc u = a + fused.add_value;
    const Acc value = fused_convt::epilogue_from_preactivation(u, fused.multiply_value);
    const Acc derivative = fused_convt::epilogue_derivative(u, fused.multiply_value);
    CHECK_MSG(same_bits(fused_convt::apply_epilogue(fused, a), value), t + " apply_epilogue adds add_value");
    // The training forward's one evaluation of Phi for both is bitwise the separate ones.
    const auto both = fused_convt::apply_epilogue_with_factor(fused, a);
    // The factor is the derivative divided by multiply_value, bounded by 1/2 whatever multiply_value is (so a
    // float16 factor neither overflows nor loses precision to the scale).
    CHECK_MSG(same_bits(both.value, value) && same_bits(fused.multiply_value * both.factor, derivative),
              t + " apply_epilogue_with_factor equals value and derivative / m at u = " + test::fmt(double(u)));
    CHECK_MSG(!(std::fabs(both.factor) > Acc(0.5) * (1 + 8 * std::numeric_limits<Acc>::epsilon())),
              t + " saved factor within [-1/2, 1/2] at u = " + test::fmt(double(u)));
  }
}

// ---- float16 / bfloat16 ------------------------------------------------------------------------------

// IEEE decoding by the definition, sharing nothing with dtype.h, for a 16-bit format with kMantissa
// mantissa bits (float16: 10, bfloat16: 7) and 15 - kMantissa exponent bits. NaN patterns decode to NaN.
template <int kMantissa>
double decode_ieee16(uint16_t bits) {
  constexpr int kExponentMask = (1 << (15 - kMantissa)) - 1, kBias = kExponentMask / 2;
  const int exponent = (bits >> kMantissa) & kExponentMask, mantissa = bits & ((1 << kMantissa) - 1);
  double magnitude;
  if (exponent == kExponentMask) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (exponent == 0) {
    magnitude = std::ldexp(double(mantissa), 1 - kBias - kMantissa);
  } else {
    magnitude = std::ldexp(double((1 << kMantissa) + mantissa), exponent - kBias - kMantissa);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
}
constexpr auto decode_half = decode_ieee16<10>;
constexpr auto decode_bfloat16 = decode_ieee16<7>;

// Round to nearest, ties to even, by brute force: the non-negative values of the format in bit order
// (`ladder[b]` is the value of bits b, with one extra rung for the first value past the largest finite,
// whose bits are those of infinity), the neighbours of |f| found by search.
struct RoundingReference {
  std::vector<double> ladder;
  uint16_t infinity_bits;

  template <typename Decode>
  RoundingReference(Decode decode, uint16_t inf_bits, double first_past_max) : infinity_bits(inf_bits) {
    for (uint32_t bits = 0; bits < inf_bits; ++bits) ladder.push_back(decode(uint16_t(bits)));
    ladder.push_back(first_past_max);
  }

  uint16_t round(float f) const {
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    const double a = std::fabs(double(f));
    if (a >= ladder.back()) return uint16_t(sign | infinity_bits);
    const size_t hi = size_t(std::upper_bound(ladder.begin(), ladder.end(), a) - ladder.begin());
    const size_t lo = hi - 1;
    if (ladder[lo] == a) return uint16_t(sign | lo);
    const double below = a - ladder[lo], above = ladder[hi] - a;
    const size_t nearest = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
    return uint16_t(sign | nearest);
  }
};

// Floats worth converting: every midpoint between neighbours of the 16-bit format and the floats on either
// side of it (ties and near-ties, subnormals and overflow included), float subnormals, extremes, and random
// patterns (NaNs among them).
std::vector<float> conversion_samples(const RoundingReference& ref, test::Rng& rng) {
  std::vector<float> samples = {0.0f, 1.0f, 65504.0f, 65519.996f, 65520.0f, 65536.0f, 1e10f, 1e-10f, 1e-40f,
                                std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                                std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i + 1 < ref.ladder.size(); ++i) {
    const float mid = float((ref.ladder[i] + ref.ladder[i + 1]) / 2);  // exact: one more bit than the format
    const float inf = std::numeric_limits<float>::infinity();
    for (const float f : {float(ref.ladder[i]), mid, std::nextafter(mid, 0.0f), std::nextafter(mid, inf)}) {
      samples.push_back(f);
    }
  }
  for (int i = 0; i < 400000; ++i) {
    uint32_t bits = uint32_t(rng.next());
    if (i % 2) bits = (bits & 0x807fffffu) | (uint32_t(rng.integer(127 - 30, 127 + 17)) << 23);  // near half range
    samples.push_back(fused_convt::bits_float(bits));
  }
  const size_t positive = samples.size();
  for (size_t i = 0; i < positive; ++i) samples.push_back(-samples[i]);
  return samples;
}

// The two 16-bit formats under one test: the library's conversions, the decoder, the infinity pattern and
// the first value past the largest finite one (where rounding goes to infinity).
struct HalfFormat {
  using Bits = HalfBits;
  static constexpr const char* kName = "half";
  static constexpr uint16_t kInfinity = 0x7c00;
  static double decode(uint16_t bits) { return decode_half(bits); }
  static double first_past_max() { return 65536.0; }
  static uint16_t from_float(float f) { return fused_convt::to_half(f).bits; }
};
struct BFloat16Format {
  using Bits = BFloat16Bits;
  static constexpr const char* kName = "bfloat16";
  static constexpr uint16_t kInfinity = 0x7f80;
  static double decode(uint16_t bits) { return decode_bfloat16(bits); }
  static double first_past_max() { return std::ldexp(1.0, 128); }
  static uint16_t from_float(float f) { return fused_convt::to_bfloat16(f).bits; }
};

template <typename Format>
bool is_nan_bits(uint16_t bits) {
  return (bits & Format::kInfinity) == Format::kInfinity && (bits & (0x7fff & ~Format::kInfinity)) != 0;
}

template <typename Format>
void conversions(test::Rng& rng) {
  const std::string name = Format::kName;
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t h = uint16_t(bits);
    const float f = fused_convt::to_float(typename Format::Bits{h});
    const double expected = Format::decode(h);
    if (std::isnan(expected)) {
      CHECK_MSG(std::isnan(f), name + " NaN pattern " + std::to_string(bits) + " decodes to a number");
      CHECK_MSG(is_nan_bits<Format>(Format::from_float(f)), name + " NaN does not round-trip to a NaN");
      continue;
    }
    CHECK_MSG(double(f) == expected && std::signbit(f) == std::signbit(expected),
              "to_float(" + name + " " + std::to_string(bits) + ") = " + test::fmt(f) + ", expected " +
                  test::fmt(expected));
    CHECK_MSG(Format::from_float(f) == h, name + " " + std::to_string(bits) + " does not round-trip");
  }
  const RoundingReference ref(Format::decode, Format::kInfinity, Format::first_past_max());
  for (const float f : conversion_samples(ref, rng)) {
    const uint16_t got = Format::from_float(f);
    if (std::isnan(f)) {
      CHECK_MSG(is_nan_bits<Format>(got), "to_" + name + "(NaN) = " + std::to_string(got));
      continue;
    }
    CHECK_MSG(got == ref.round(f), "to_" + name + "(" + test::fmt(f) + ") = " + std::to_string(got) +
                                       ", nearest even is " + std::to_string(ref.round(f)));
  }
  // Signalling NaNs whose payload sits in the low half must stay NaN (a plain truncation gives infinity).
  for (const uint32_t nan_bits : {0x7fc00000u, 0x7f800001u, 0xffc00000u, 0xff800001u, 0x7fffffffu}) {
    CHECK_MSG(is_nan_bits<Format>(Format::from_float(fused_convt::bits_float(nan_bits))),
              "to_" + name + "(NaN) is not NaN");
  }
}

}  // namespace

int main() {
  test::Rng rng(7);
  epilogue_matches_long_double<float>(rng, "float");
  epilogue_matches_long_double<double>(rng, "double");
  tail_is_relatively_accurate<float>("float");
  tail_is_relatively_accurate<double>("double");
  sixteen_bit_form();
  special_points<float>("float");
  special_points<double>("double");
  apply_epilogue_composes<float>(rng, "float");
  apply_epilogue_composes<double>(rng, "double");
  conversions<HalfFormat>(rng);
  conversions<BFloat16Format>(rng);
  return test::summary("test_epilogue");
}
