// The fused epilogue and its derivative, written once for the CPU path, the CUDA kernels and the tests.
//
//   u = acc + bias + add_value;   z = min(u, 0);   out = multiply_value * z * Phi(z)
//
// with Phi the standard normal CDF, i.e. out = multiply_value * GELU(min(u, 0)) with exact (erf) GELU.
// Because z <= 0, Phi(z) = 0.5 * erfc(-z / sqrt(2)): erfc of a positive argument has no cancellation,
// whereas 0.5 * (1 + erf(z / sqrt(2))) loses every digit for very negative z. Where u >= 0, z = 0 and the
// result is exactly 0 (the CUDA epilogue skips evaluating Phi for a group of outputs where a whole warp has
// u >= 0).
// The identity epilogue (enabled == false) is a plain transposed convolution: out = acc + bias.
#pragma once

#include <math.h>

#include <cmath>
#include <type_traits>

#include "fused_convt/macros.h"

namespace fused_convt {

struct Epilogue {
  double add_value = 0.0;  // double so float64 calls see the exact value; kernels round once to Acc
  double multiply_value = 1.0;
  bool enabled = true;
};

// Phi(z) and phi(z) for z <= 0 in double: the library functions.
FCT_HD double normal_cdf_nonpositive(double z) { return 0.5 * erfc(-z * 0.70710678118654752440); }
FCT_HD double normal_density(double z) { return 0.39894228040143267794 * exp(-0.5 * z * z); }

// In float the same functions come from a short closed form instead of erfcf and expf, because the CUDA
// epilogue evaluates one per output and is bound by issued instructions (erfcf alone was ~45 SASS
// instructions with two reciprocals; this is ~20, with one reciprocal and one exp2 per function):
//   erfc(x) = t * exp(-x^2 + P(t)),  t = 1 / (1 + x/2),  x = -z/sqrt(2) >= 0,
// with P the degree-9 Chebyshev fit of Numerical Recipes (2nd ed., section 6.2, erfcc), whose fractional
// error is below 1.2e-7 for every x >= 0. Evaluated in base 2 (the coefficients carry log2(e)), with the
// rounding error of z*z carried by an fma, so that the large exponent -z^2/2 loses nothing beyond the
// rounding of z itself: the error stays below the float tolerance of tests/cpp/test_epilogue.cpp (relative
// unit_roundoff * (16 + 2 z^2), the conditioning of the problem) down to the underflow near z = -13.
// Host and device differ only in exp2 and the reciprocal (library calls here, 2-ulp hardware ones there).
FCT_HD float exp2_of(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}
FCT_HD float reciprocal_of(float x) {
#if defined(__CUDA_ARCH__)
  // The hardware reciprocal alone (1 ulp): x >= 1 here, so neither its input nor its result is subnormal,
  // and the range fix-ups of 1.0f / x or __fdividef would be dead instructions.
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return 1.0f / x;
#endif
}

// -z^2/2 * log2(e) as fma(square, c, square_error * c): z*z and its exact rounding error.
struct HalfSquareLog2 {
  float square, error;
  static constexpr float kScale = -0.72134752044448170368f;  // -log2(e) / 2
  FCT_HD explicit HalfSquareLog2(float z) : square(z * z), error(fmaf(z, z, -z * z)) {}
  FCT_HD float plus(float extra) const { return fmaf(square, kScale, fmaf(error, kScale, extra)); }
};

// What both forms of Phi share: t = 1 / (1 + x/2) with x = -z/sqrt(2), and P(t) by Horner's rule from its
// coefficients (highest power first, already times log2(e)).
struct ErfcFit {
  float t, poly;
};
template <int kTerms>
FCT_HD ErfcFit erfc_fit(float z, const float (&p)[kTerms]) {
  const float t = reciprocal_of(fmaf(z, -0.35355339059327376220f, 1.0f));
  float poly = p[0];
  for (int i = 1; i < kTerms; ++i) poly = fmaf(poly, t, p[i]);
  return {t, poly};
}
constexpr double kLog2e = 1.44269504088896340736;

FCT_HD float normal_cdf_nonpositive(float z) {
  // P(t) as published, highest power first, times log2(e) (rounded to float at compile time).
  constexpr float p[10] = {
      float(0.17087277 * kLog2e),  float(-0.82215223 * kLog2e), float(1.48851587 * kLog2e),
      float(-1.13520398 * kLog2e), float(0.27886807 * kLog2e),  float(-0.18628806 * kLog2e),
      float(0.09678418 * kLog2e),  float(0.37409196 * kLog2e),  float(1.00002368 * kLog2e),
      float(-1.26551223 * kLog2e)};
  const ErfcFit fit = erfc_fit(z, p);
  return 0.5f * fit.t * exp2_of(HalfSquareLog2(z).plus(fit.poly));
}

FCT_HD float normal_density(float z) { return 0.39894228040143267794f * exp2_of(HalfSquareLog2(z).plus(0.0f)); }

// Phi(z) for z <= 0 to ~2e-5 relative, for outputs rounded to a 16-bit type (float16's half-ulp is 4.9e-4
// relative, bfloat16's 2e-3) or computed from TF32 products (whose own error is ~1e-3): the same closed form
// with P of degree 5 instead of 9, fitted here (weighted least squares to near minimax on t in [0.17, 1], i.e.
// x <= 9.6 and z >= -13.6, below which Phi underflows) to an error of 7.6e-6 in the exponent, and -z^2/2
// without the correction of z*z's rounding (at most z^2 2^-25, 5e-6 at z = -13). tests/cpp/test_epilogue.cpp
// bounds the value it gives at 2.5e-5 relative on [-13, 0]. Four fused multiply-adds and two more instructions
// fewer per output than the float form: the 16-bit forward's epilogue is bound by issue.
FCT_HD float normal_cdf_nonpositive_16bit(float z) {
  constexpr float p[6] = {float(0.22878565146046806 * kLog2e), float(-0.7091774344967959 * kLog2e),
                          float(0.4744784738228818 * kLog2e),  float(0.25445078806697896 * kLog2e),
                          float(1.0180117177744228 * kLog2e),  float(-1.2665415958477675 * kLog2e)};
  const ErfcFit fit = erfc_fit(z, p);
  return 0.5f * fit.t * exp2_of(fmaf(z * z, HalfSquareLog2::kScale, fit.poly));
}
// phi(z) likewise, without the correction of z*z's rounding (5e-6 relative at z = -13).
FCT_HD float normal_density_16bit(float z) {
  return 0.39894228040143267794f * exp2_of(z * z * HalfSquareLog2::kScale);
}

// The saved factor is d out / d u divided by multiply_value (the backward multiplies it back, factor_scale):
// GELU'(z) times min's derivative, between -0.17 and 1/2 whatever multiply_value is, so that a float16 factor
// (grad_factor_dtype in api.h) can neither overflow nor depend on the scale for its precision.
template <typename Acc>
struct EpilogueOutputs {
  Acc value, factor;  // out, and d out / d u / multiply_value
};

// The value where u >= 0 or u is NaN: 0, or NaN. On the GPU (float) one NaN-propagating minimum, min(u, 0),
// instead of a compare and a select: most outputs of most data take this form, in every epilogue.
template <typename Acc>
FCT_HD Acc value_at_nonnegative(Acc u) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<Acc, float>::value) {
    float value;
    asm("min.NaN.f32 %0, %1, 0f00000000;" : "=f"(value) : "f"(u));
    return value;
  }
#endif
  return u != u ? u : Acc(0);
}

// The epilogue where u >= 0 (z = min(u, 0) = 0) or u is NaN: value exactly 0 and derivative 0, except at
// u == 0, where PyTorch's binary minimum splits the gradient of the tie in half and GELU'(0) = 1/2, so the
// composite gives m / 4 (a factor of 1/4). NaN propagates as in the PyTorch composite (the binary minimum keeps
// NaN).
template <typename Acc>
FCT_HD EpilogueOutputs<Acc> epilogue_at_nonnegative(Acc u) {
  const Acc value = value_at_nonnegative(u);
  return {value, u == Acc(0) ? Acc(0.25) : value};
}

// The functions below are written without branches: Phi is evaluated at z = min(u, 0) (NaN -> 0) on every
// lane and the u >= 0 result selected afterwards, so that a GPU warp runs them as straight-line code whose
// independent evaluations interleave. For u < 0 the value is m * u * Phi(u) and the derivative
// m * (Phi(u) + u * phi(u)); for u >= 0, epilogue_at_nonnegative.

// Phi(z) and phi(z) for z <= 0 in the form an output needs. kShortForm: the value is rounded to float16 or
// bfloat16 afterwards, or comes from TF32 products, and a factor is stored in 16 bits (FactorType), so float's may be
// the shorter normal_cdf_nonpositive_16bit and normal_density_16bit.
template <bool kShortForm, typename Acc>
FCT_HD Acc output_normal_cdf(Acc z) {
  if constexpr (kShortForm && std::is_same<Acc, float>::value) return normal_cdf_nonpositive_16bit(z);
  else return normal_cdf_nonpositive(z);
}
template <bool kShortForm, typename Acc>
FCT_HD Acc output_normal_density(Acc z) {
  if constexpr (kShortForm && std::is_same<Acc, float>::value) return normal_density_16bit(z);
  else return normal_density(z);
}

// Value of the epilogue at the pre-activation u (bias and add_value already included); kShortForm as for
// output_normal_cdf.
template <typename Acc, bool kShortForm = false>
FCT_HD Acc epilogue_from_preactivation(Acc u, Acc multiply_value) {
  const bool tail = u < Acc(0);
  const Acc z = tail ? u : Acc(0);
  const Acc value = multiply_value * z * output_normal_cdf<kShortForm>(z);
  return tail ? value : value_at_nonnegative(u);
}

// The value and the saved factor at once, with Phi evaluated once: the training forward stores both.
template <typename Acc, bool kShortForm = false>
FCT_HD EpilogueOutputs<Acc> epilogue_value_and_derivative(Acc u, Acc multiply_value) {
  const bool tail = u < Acc(0);
  const Acc z = tail ? u : Acc(0);
  const Acc cdf = output_normal_cdf<kShortForm>(z), density = output_normal_density<kShortForm>(z);
  const EpilogueOutputs<Acc> at_tail{multiply_value * z * cdf, cdf + z * density};
  return tail ? at_tail : epilogue_at_nonnegative(u);
}

// d out / d u alone (the factor times multiply_value).
template <typename Acc>
FCT_HD Acc epilogue_derivative(Acc u, Acc multiply_value) {
  return multiply_value * epilogue_value_and_derivative(u, multiply_value).factor;
}

// The epilogue's scalars in the accumulation type, converted once per kernel rather than per element.
template <typename Acc>
struct EpilogueConstants {
  Acc add_value, multiply_value;
  bool enabled;
  FCT_HD explicit EpilogueConstants(const Epilogue& epi)
      : add_value(Acc(epi.add_value)), multiply_value(Acc(epi.multiply_value)), enabled(epi.enabled) {}
};

// The whole epilogue from the accumulator: adds bias and add_value when enabled, nothing else otherwise.
template <typename Acc>
FCT_HD Acc apply_epilogue(const EpilogueConstants<Acc>& epi, Acc acc_plus_bias) {
  if (!epi.enabled) return acc_plus_bias;
  return epilogue_from_preactivation(acc_plus_bias + epi.add_value, epi.multiply_value);
}

// The epilogue and its saved factor from the accumulator (the identity's derivative is 1).
template <typename Acc>
FCT_HD EpilogueOutputs<Acc> apply_epilogue_with_factor(const EpilogueConstants<Acc>& epi, Acc acc_plus_bias) {
  if (!epi.enabled) return {acc_plus_bias, Acc(1)};
  return epilogue_value_and_derivative(acc_plus_bias + epi.add_value, epi.multiply_value);
}

// What the backward multiplies a saved factor by to get d out / d u: multiply_value, or 1 for the identity.
FCT_HD double factor_scale(const Epilogue& epi) { return epi.enabled ? epi.multiply_value : 1.0; }

}  // namespace fused_convt
