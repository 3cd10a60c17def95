// backward_cpu against the gradients of the scatter definition, summed in double with
// g = grad_output * grad_factor * multiply_value: grad_input, grad_weight and grad_bias in float, double, float16 and
// bfloat16 on random problems (grad_factor absent, random, or saved by forward_cpu). Each gradient computed
// alone must equal the one computed with the others, and repeated runs must be bitwise equal.
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_convt/api.h"
#include "test_util.h"

using fused_convt::BackwardArgs;
using fused_convt::ConvTransposeParams;

namespace {

template <typename T>
struct Gradients {
  std::vector<T> input, weight, bias;
};

template <typename T>
Gradients<T> run_backward(const ConvTransposeParams& p, const fused_convt::Epilogue& epi, const BackwardArgs& inputs,
                          bool want_input, bool want_weight, bool want_bias) {
  Gradients<T> g;
  g.input = test::poisoned<T>(p.input_numel());
  g.weight = test::poisoned<T>(p.weight_numel());
  g.bias = test::poisoned<T>(p.out_channels);
  BackwardArgs args = inputs;
  args.grad_input = want_input ? g.input.data() : nullptr;
  args.grad_weight = want_weight ? g.weight.data() : nullptr;
  args.grad_bias = want_bias && p.has_bias ? g.bias.data() : nullptr;
  fused_convt::backward_cpu(p, epi, test::Storage<T>::dtype, args);
  return g;
}

enum class FactorSource { None, Random, Forward };

template <typename T>
void check_backward(const ConvTransposeParams& p, FactorSource factor_source, test::Rng& rng,
                    const std::string& label) {
  const auto dtype = test::Storage<T>::dtype;
  std::vector<double> x_exact, w_exact, go_exact, factor_exact, b_exact;
  const auto x = test::random_tensor<T>(rng, p.input_numel(), -1, 1, &x_exact);
  const auto w = test::random_tensor<T>(rng, p.weight_numel(), -1, 1, &w_exact);
  const auto grad_output = test::random_tensor<T>(rng, p.output_numel(), -1, 1, &go_exact);
  std::vector<T> factor;
  // The forward's epilogue: the backward multiplies the saved factor by its multiply_value.
  fused_convt::Epilogue epi;
  epi.add_value = -0.4;
  epi.multiply_value = 1.3;
  if (factor_source == FactorSource::Random) {
    factor = test::random_tensor<T>(rng, p.output_numel(), -1, 1, &factor_exact);
  } else if (factor_source == FactorSource::Forward) {
    // The grad_factor forward_cpu saves, as the autograd path passes it on.
    const auto b = p.has_bias ? test::random_tensor<T>(rng, p.out_channels, -1, 1, &b_exact) : std::vector<T>{};
    factor.resize(size_t(p.output_numel()));
    const fused_convt::ForwardArgs args{x.data(), w.data(), p.has_bias ? b.data() : nullptr, nullptr, factor.data()};
    fused_convt::forward_cpu(p, epi, dtype, args);
    factor_exact.resize(factor.size());
    for (size_t i = 0; i < factor.size(); ++i) factor_exact[i] = test::to_double(factor[i]);
  }
  for (double& f : factor_exact) f *= double(typename fused_convt::AccumulatorOf<T>::type(epi.multiply_value));
  const std::string what = label + " " + fused_convt::dtype_name(dtype) + " " + test::describe(p) +
                           (factor_source == FactorSource::None ? " no grad_factor" : " with grad_factor");

  BackwardArgs inputs;
  inputs.grad_output = grad_output.data();
  inputs.grad_factor = factor.empty() ? nullptr : factor.data();
  inputs.input = x.data();
  inputs.weight = w.data();
  const Gradients<T> all = run_backward<T>(p, epi, inputs, true, true, true);

  const test::BackwardReference ref = test::reference_backward(p, x_exact, w_exact, go_exact, factor_exact);
  test::check_close(all.input, ref.grad_input.value, test::sum_tolerances<T>(ref.grad_input), 1.0,
                    what + ": grad_input");
  test::check_close(all.weight, ref.grad_weight.value, test::sum_tolerances<T>(ref.grad_weight), 1.0,
                    what + ": grad_weight");
  if (p.has_bias) {
    test::check_close(all.bias, ref.grad_bias.value, test::sum_tolerances<T>(ref.grad_bias), 1.0, what + ": grad_bias");
  }

  const Gradients<T> again = run_backward<T>(p, epi, inputs, true, true, true);
  CHECK_MSG(test::bitwise_equal(again.input, all.input) && test::bitwise_equal(again.weight, all.weight) &&
                test::bitwise_equal(again.bias, all.bias),
            what + ": two runs differ");
  CHECK_MSG(test::bitwise_equal(run_backward<T>(p, epi, inputs, true, false, false).input, all.input),
            what + ": grad_input alone");
  CHECK_MSG(test::bitwise_equal(run_backward<T>(p, epi, inputs, false, true, false).weight, all.weight),
            what + ": grad_weight alone");
  if (p.has_bias) {
    CHECK_MSG(test::bitwise_equal(run_backward<T>(p, epi, inputs, false, false, true).bias, all.bias), what + ": grad_bias alone");
  }
}

template <typename T>
void backward_matches_reference(test::Rng& rng, int random_cases) {
  for (int i = 0; i < random_cases; ++i) {
    const auto source = static_cast<FactorSource>(i % 3);
    check_backward<T>(test::random_params(rng), source, rng, "random #" + std::to_string(i));
  }
  // Channels wide enough for several output channels per group and taps per output.
  ConvTransposeParams wide;
  wide.batch = 2, wide.in_channels = 6, wide.out_channels = 8, wide.in_h = 9, wide.in_w = 7, wide.groups = 2;
  wide.kernel_h = 4, wide.kernel_w = 3, wide.stride_h = 2, wide.pad_h = 1, wide.dil_w = 2, wide.out_pad_h = 1;
  check_backward<T>(wide, FactorSource::Forward, rng, "wide");
}

void argument_checks() {
  ConvTransposeParams p;
  p.batch = 1, p.in_channels = 2, p.out_channels = 2, p.in_h = 3, p.in_w = 3, p.kernel_h = p.kernel_w = 2;
  p.has_bias = false;
  std::vector<float> buffer(64, 1.0f), grad_bias(2);
  BackwardArgs args;
  args.grad_output = buffer.data();
  args.input = buffer.data();
  args.weight = buffer.data();
  args.grad_bias = grad_bias.data();
  bool threw = false;
  try {
    fused_convt::backward_cpu(p, fused_convt::Epilogue{}, fused_convt::DType::Float32, args);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK_MSG(threw, "grad_bias without has_bias must throw std::invalid_argument");

  // An empty batch: grad_weight and grad_bias are sums over nothing.
  p.has_bias = true;
  p.batch = 0;
  std::vector<float> grad_weight(size_t(p.weight_numel()), 5.0f);
  grad_bias.assign(2, 5.0f);
  args.grad_weight = grad_weight.data();
  args.grad_bias = grad_bias.data();
  fused_convt::backward_cpu(p, fused_convt::Epilogue{}, fused_convt::DType::Float32, args);
  for (float v : grad_weight) CHECK_MSG(v == 0.0f, "grad_weight of an empty batch");
  for (float v : grad_bias) CHECK_MSG(v == 0.0f, "grad_bias of an empty batch");
}

}  // namespace

int main() {
  test::Rng rng(99);
  backward_matches_reference<float>(rng, 30);
  backward_matches_reference<double>(rng, 30);
  backward_matches_reference<fused_convt::HalfBits>(rng, 24);
  backward_matches_reference<fused_convt::BFloat16Bits>(rng, 24);
  argument_checks();
  return test::summary("test_cpu_backward");
}
