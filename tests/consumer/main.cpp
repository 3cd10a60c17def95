// The consumer's whole program: one tiny forward_cpu call checked against values worked out by hand.
//
// x = [[1, 2], [3, 4]], weight = ones(2, 2), bias = 0.5, stride 1, no padding: the transposed convolution
// spreads each input over a 2x2 window of the 3x3 output, so the centre sums all four inputs (10) and the
// corner (0, 0) sees x[0][0] only (1). With add_value = -11 and multiply_value = 2 the centre's
// pre-activation is u = 10 + 0.5 - 11 = -0.5, its output 2 * u * Phi(u) and its grad_factor (the derivative
// divided by multiply_value) Phi(u) + u * phi(u), with Phi(-0.5) = 0.30853753872598688 and phi(-0.5) = 0.35206532676429952.
#include <cmath>
#include <cstdio>

#include "fused_convt/api.h"

int main() {
  using namespace fused_convt;
  ConvTransposeParams params;
  params.batch = 1, params.in_channels = 1, params.out_channels = 1, params.in_h = 2, params.in_w = 2;
  params.kernel_h = 2, params.kernel_w = 2;
  const float x[4] = {1, 2, 3, 4}, weight[4] = {1, 1, 1, 1}, bias[1] = {0.5f};
  float output[9] = {}, grad_factor[9] = {};

  Epilogue epilogue;
  epilogue.add_value = -11.0;
  epilogue.multiply_value = 2.0;
  forward_cpu(params, epilogue, DType::Float32, ForwardArgs{x, weight, bias, output, grad_factor});
  const double centre = 2 * -0.5 * 0.30853753872598688;
  const double centre_factor = 0.30853753872598688 - 0.5 * 0.35206532676429952;

  Epilogue identity;
  identity.enabled = false;
  float plain[9] = {};
  forward_cpu(params, identity, DType::Float32, ForwardArgs{x, weight, bias, plain, nullptr});

  int failures = 0;
  auto expect = [&failures](const char* what, double got, double expected) {
    const bool ok = std::fabs(got - expected) <= 1e-6 * std::fabs(expected) + 1e-30;
    std::printf("%-28s %.9g (expected %.9g) %s\n", what, got, expected, ok ? "ok" : "MISMATCH");
    failures += ok ? 0 : 1;
  };
  expect("output centre", output[4], centre);
  expect("grad_factor centre", grad_factor[4], centre_factor);
  expect("identity output corner", plain[0], 1.5);
  expect("identity output centre", plain[4], 10.5);
  if (cuda_compiled() != bool(EXPECT_CUDA)) {
    std::printf("cuda_compiled() = %d, but the package says CUDA kernels = %d\n", cuda_compiled(), EXPECT_CUDA);
    ++failures;
  }
  return failures == 0 ? 0 : 1;
}
