// The fused epilogue and its derivative, written once for the CPU path, the CUDA kernels and the tests.
//
//   u = acc + bias + add_value;   z = min(u, 0);   out = multiply_value * z * Phi(z)
//
// with Phi the standard normal CDF, i.e. out = multiply_value * GELU(min(u, 0)) with exact (erf) GELU.
// Because z <= 0, Phi(z) = 0.5 * erfc(-z / sqrt(2)): erfc of a positive argument has no cancellation,
// whereas 0.5 * (1 + erf(z / sqrt(2))) loses every digit for very negative z. Where u >= 0, z = 0 and the
// result is exactly 0: no transcendental call is made.
// The identity epilogue (enabled == false) is a plain transposed convolution: out = acc + bias.
#pragma once

#include <math.h>

#include "fused_convt/macros.h"

namespace fused_convt {

struct Epilogue {
  double add_value = 0.0;  // double so float64 calls see the exact value; kernels round once to Acc
  double multiply_value = 1.0;
  bool enabled = true;
};

FCT_HD float erfc_of(float x) { return erfcf(x); }
FCT_HD double erfc_of(double x) { return erfc(x); }
FCT_HD float exp_of(float x) { return expf(x); }
FCT_HD double exp_of(double x) { return exp(x); }

// Phi(z) for z <= 0 through erfc (see the header comment).
template <typename Acc>
FCT_HD Acc normal_cdf_nonpositive(Acc z) {
  const Acc inv_sqrt2 = Acc(0.70710678118654752440);
  return Acc(0.5) * erfc_of(-z * inv_sqrt2);
}

// Value of the epilogue at the pre-activation u (bias and add_value already included).
// NaN propagates as in the PyTorch composite (the binary minimum keeps NaN).
template <typename Acc>
FCT_HD Acc epilogue_from_preactivation(Acc u, Acc multiply_value) {
  if (u < Acc(0)) return multiply_value * u * normal_cdf_nonpositive(u);
  if (u != u) return u;
  return Acc(0);
}

template <typename Acc>
FCT_HD Acc normal_density(Acc z) {
  const Acc inv_sqrt_2pi = Acc(0.39894228040143267794);
  return inv_sqrt_2pi * exp_of(Acc(-0.5) * z * z);
}

// d out / d u. For u < 0 it is m * (Phi(u) + u * phi(u)); for u > 0 it is 0. At u == 0 PyTorch's binary
// minimum splits the gradient of the tie in half and GELU'(0) = 1/2, so the composite gives m / 4.
template <typename Acc>
FCT_HD Acc epilogue_derivative(Acc u, Acc multiply_value) {
  if (u < Acc(0)) return multiply_value * (normal_cdf_nonpositive(u) + u * normal_density(u));
  if (u == Acc(0)) return Acc(0.25) * multiply_value;
  if (u != u) return u;
  return Acc(0);
}

template <typename Acc>
struct EpilogueOutputs {
  Acc value, factor;  // out, and d out / d u
};

// Both at once, with Phi(u) evaluated once: the training forward stores both. Bitwise the values of
// epilogue_from_preactivation and epilogue_derivative.
template <typename Acc>
FCT_HD EpilogueOutputs<Acc> epilogue_value_and_derivative(Acc u, Acc multiply_value) {
  if (u < Acc(0)) {
    const Acc cdf = normal_cdf_nonpositive(u);
    return {multiply_value * u * cdf, multiply_value * (cdf + u * normal_density(u))};
  }
  if (u != u) return {u, u};
  return {Acc(0), u == Acc(0) ? Acc(0.25) * multiply_value : Acc(0)};
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

// The epilogue and its derivative from the accumulator (the identity's derivative is 1).
template <typename Acc>
FCT_HD EpilogueOutputs<Acc> apply_epilogue_with_factor(const EpilogueConstants<Acc>& epi, Acc acc_plus_bias) {
  if (!epi.enabled) return {acc_plus_bias, Acc(1)};
  return epilogue_value_and_derivative(acc_plus_bias + epi.add_value, epi.multiply_value);
}

}  // namespace fused_convt
