// forward_cpu against nn.ConvTranspose2d by its definition (the scatter, summed in double) followed by the
// epilogue in long double: output and grad_factor, in float, double, float16 and bfloat16, on hand-picked
// edge cases and random problems; plus the argument checks of the entry point.
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fused_convt/api.h"
#include "test_util.h"

using fused_convt::ConvTransposeParams;
using fused_convt::Epilogue;
using fused_convt::ForwardArgs;

namespace {

Epilogue random_epilogue(test::Rng& rng) {
  Epilogue epi;
  epi.enabled = rng.integer(0, 4) != 0;
  epi.add_value = rng.uniform(-1.5, 0.5);
  epi.multiply_value = rng.uniform(-2.0, 2.0);
  return epi;
}

// Runs forward_cpu three ways (both results, output only, grad_factor only) and checks them against the
// reference; the partial runs must reproduce the full run bit for bit.
template <typename T>
void check_forward(const ConvTransposeParams& p, const Epilogue& epi, test::Rng& rng, const std::string& label,
                   double input_scale = 1.0) {
  std::vector<double> x_exact, w_exact, b_exact;
  const auto x = test::random_tensor<T>(rng, p.input_numel(), -input_scale, input_scale, &x_exact);
  const auto w = test::random_tensor<T>(rng, p.weight_numel(), -1, 1, &w_exact);
  const auto b = p.has_bias ? test::random_tensor<T>(rng, p.out_channels, -1, 1, &b_exact) : std::vector<T>{};
  const void* bias = p.has_bias ? b.data() : nullptr;
  const auto dtype = test::Storage<T>::dtype;
  const std::string what = label + " " + fused_convt::dtype_name(dtype) + " " + test::describe(p) +
                           (epi.enabled ? " add=" + test::fmt(epi.add_value) + " mul=" + test::fmt(epi.multiply_value)
                                        : " identity");

  auto out = test::poisoned<T>(p.output_numel()), factor = test::poisoned<T>(p.output_numel());
  fused_convt::forward_cpu(p, epi, dtype, ForwardArgs{x.data(), w.data(), bias, out.data(), factor.data()});
  const test::ForwardExpectation e =
      test::expected_forward<T>(test::reference_preactivation(p, x_exact, w_exact, b_exact), epi);
  test::check_close(out, e.output, e.output_tol, 1.0, what + ": output");
  test::check_close(factor, e.factor, e.factor_tol, 1.0, what + ": grad_factor");

  auto out_only = test::poisoned<T>(p.output_numel()), factor_only = test::poisoned<T>(p.output_numel());
  fused_convt::forward_cpu(p, epi, dtype, ForwardArgs{x.data(), w.data(), bias, out_only.data(), nullptr});
  fused_convt::forward_cpu(p, epi, dtype, ForwardArgs{x.data(), w.data(), bias, nullptr, factor_only.data()});
  CHECK_MSG(test::bitwise_equal(out_only, out), what + ": output without grad_factor differs");
  CHECK_MSG(test::bitwise_equal(factor_only, factor), what + ": grad_factor without output differs");

  // NHWC (channels_last) output: the same values, permuted; grad_factor stays NCHW, the same bits.
  auto out_cl = test::poisoned<T>(p.output_numel()), factor_cl = test::poisoned<T>(p.output_numel());
  ForwardArgs nhwc{x.data(), w.data(), bias, out_cl.data(), factor_cl.data()};
  nhwc.output_channels_last = true;
  fused_convt::forward_cpu(p, epi, dtype, nhwc);
  const int64_t channels = p.out_channels, plane = p.out_h() * p.out_w();
  bool same = true;
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t i = 0; i < plane; ++i) {
        const size_t nchw_at = size_t((n * channels + c) * plane + i), nhwc_at = size_t((n * plane + i) * channels + c);
        same = same && std::memcmp(&out_cl[nhwc_at], &out[nchw_at], sizeof(T)) == 0;
      }
  CHECK_MSG(same, what + ": channels_last output differs from the NCHW one");
  CHECK_MSG(test::bitwise_equal(factor_cl, factor), what + ": grad_factor beside a channels_last output differs");
}

// Problems that reach the corners of the index math, named by what they exercise.
std::vector<std::pair<std::string, ConvTransposeParams>> edge_cases() {
  std::vector<std::pair<std::string, ConvTransposeParams>> cases;
  const auto make = test::make_params;
  ConvTransposeParams p = make(2, 4, 4, 5, 6, 4);
  p.kernel_h = p.kernel_w = 3, p.stride_h = p.stride_w = 2, p.pad_h = p.pad_w = 1, p.out_pad_h = p.out_pad_w = 1;
  cases.push_back({"depthwise", p});
  p = make(1, 3, 2, 4, 5, 1);
  p.kernel_h = p.kernel_w = 3, p.dil_h = p.dil_w = 3, p.out_pad_h = 2, p.out_pad_w = 1;
  cases.push_back({"output_padding >= stride (dilation 3)", p});
  p = make(2, 2, 3, 3, 4, 1);
  p.kernel_h = p.kernel_w = 2, p.stride_h = p.stride_w = 2, p.dil_h = p.dil_w = 2, p.out_pad_h = p.out_pad_w = 1;
  cases.push_back({"phases without taps (gcd(d, s) = 2)", p});
  p = make(1, 2, 3, 1, 1, 1);
  p.kernel_h = 4, p.kernel_w = 3, p.stride_h = p.stride_w = 3;
  cases.push_back({"1x1 input", p});
  p = make(1, 3, 3, 4, 3, 3);
  p.stride_h = 3, p.stride_w = 2, p.out_pad_h = 2, p.out_pad_w = 1;
  cases.push_back({"1x1 kernel, bias-only outputs", p});
  p = make(1, 2, 4, 5, 5, 2);
  p.kernel_h = p.kernel_w = 4, p.dil_h = 3, p.dil_w = 2, p.pad_h = 3, p.pad_w = 2, p.stride_h = 2;
  cases.push_back({"padding larger than stride", p});
  p = make(2, 6, 4, 3, 7, 2);
  p.kernel_h = 2, p.kernel_w = 5, p.stride_h = 3, p.stride_w = 1, p.pad_h = 1, p.pad_w = 2, p.dil_w = 2;
  p.out_pad_h = 2, p.out_pad_w = 1;
  p.has_bias = false;
  cases.push_back({"non-square, no bias", p});
  return cases;
}

template <typename T>
void forward_matches_reference(test::Rng& rng, int random_cases) {
  for (const auto& [name, p] : edge_cases()) check_forward<T>(p, random_epilogue(rng), rng, name);
  for (int i = 0; i < random_cases; ++i) {
    check_forward<T>(test::random_params(rng), random_epilogue(rng), rng, "random #" + std::to_string(i));
  }
}

// Zero input and zero bias with add_value 0 put every u exactly at 0: value 0, derivative multiply_value / 4, so
// the saved factor (the derivative / multiply_value) 1/4.
void preactivation_exactly_zero() {
  ConvTransposeParams p;
  p.batch = 1, p.in_channels = 2, p.out_channels = 2, p.in_h = 3, p.in_w = 3, p.kernel_h = p.kernel_w = 2;
  std::vector<float> x(size_t(p.input_numel()), 0.0f), w(size_t(p.weight_numel()), 0.5f), b(2, 0.0f);
  std::vector<float> out(size_t(p.output_numel()), 1.0f), factor(size_t(p.output_numel()), 1.0f);
  Epilogue epi;
  epi.add_value = 0.0;
  epi.multiply_value = -3.0;
  fused_convt::forward_cpu(p, epi, fused_convt::DType::Float32,
                           ForwardArgs{x.data(), w.data(), b.data(), out.data(), factor.data()});
  for (size_t i = 0; i < out.size(); ++i) {
    CHECK_MSG(out[i] == 0.0f && factor[i] == 0.25f, "u == 0 at " + std::to_string(i));
  }
}

template <typename Fn>
void throws_invalid(const std::string& what, Fn&& fn) {
  try {
    fn();
    CHECK_MSG(false, what + ": no exception");
  } catch (const std::invalid_argument&) {
    CHECK(true);
  } catch (...) {
    CHECK_MSG(false, what + ": wrong exception type");
  }
}

void argument_checks() {
  ConvTransposeParams p;
  p.batch = 1, p.in_channels = 2, p.out_channels = 2, p.in_h = 3, p.in_w = 3, p.kernel_h = p.kernel_w = 2;
  std::vector<float> x(size_t(p.input_numel()), 1.0f), w(size_t(p.weight_numel()), 1.0f), b(2, 0.0f);
  std::vector<float> out(size_t(p.output_numel()));
  const Epilogue epi;
  using fused_convt::DType;
  throws_invalid("bias missing", [&] {
    fused_convt::forward_cpu(p, epi, DType::Float32, ForwardArgs{x.data(), w.data(), nullptr, out.data(), nullptr});
  });
  ConvTransposeParams no_bias = p;
  no_bias.has_bias = false;
  throws_invalid("bias given without has_bias", [&] {
    fused_convt::forward_cpu(no_bias, epi, DType::Float32,
                             ForwardArgs{x.data(), w.data(), b.data(), out.data(), nullptr});
  });
  ConvTransposeParams bad = p;
  bad.stride_h = 0;
  throws_invalid("invalid params", [&] {
    fused_convt::forward_cpu(bad, epi, DType::Float32, ForwardArgs{x.data(), w.data(), b.data(), out.data(), nullptr});
  });
  throws_invalid("unknown dtype", [&] {
    fused_convt::forward_cpu(p, epi, static_cast<DType>(42),
                             ForwardArgs{x.data(), w.data(), b.data(), out.data(), nullptr});
  });
  // An empty batch is valid and writes nothing (a sentinel behind the output pointer stays as it was).
  ConvTransposeParams empty = p;
  empty.batch = 0;
  std::vector<float> sentinel(2, 7.0f);
  fused_convt::forward_cpu(empty, epi, DType::Float32,
                           ForwardArgs{nullptr, w.data(), b.data(), sentinel.data(), sentinel.data() + 1});
  CHECK_MSG(sentinel[0] == 7.0f && sentinel[1] == 7.0f, "an empty batch writes no output or factor");
}

}  // namespace

int main() {
  test::Rng rng(1234);
  forward_matches_reference<float>(rng, 40);
  forward_matches_reference<double>(rng, 40);
  forward_matches_reference<fused_convt::HalfBits>(rng, 30);
  forward_matches_reference<fused_convt::BFloat16Bits>(rng, 30);
  preactivation_exactly_zero();
  argument_checks();
  return test::summary("test_cpu_forward");
}
