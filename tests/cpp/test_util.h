// Shared pieces of the C++ tests: a CHECK macro that counts instead of aborting, a seeded RNG, the
// storage-type helpers, and the slow, obviously-right references: nn.ConvTranspose2d as PyTorch defines it
// (the scatter o = i*s - p + k*d, summed in double) and the epilogue in long double.
//
// Tolerances come from the precision. A sum of K products accumulated in a type with unit roundoff u is off
// by at most about K*u*S, S the sum of the absolute products (the reference and the library both contribute,
// hence the factor 2 below); the epilogue adds its own evaluation error and the store a final rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fused_convt/api.h"

namespace test {

inline int& check_count() { static int count = 0; return count; }
inline int& failure_count() { static int count = 0; return count; }

inline void report_failure(const char* file, int line, const char* condition, const std::string& context) {
  // The first failures say what went wrong; thousands of lines of the same mismatch would not.
  if (++failure_count() <= 25) {
    std::fprintf(stderr, "%s:%d: CHECK(%s) failed%s%s\n", file, line, condition, context.empty() ? "" : ": ",
                 context.c_str());
  }
}

// %.9g: enough digits to tell apart the values a failure message compares.
inline std::string fmt(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", v);
  return text;
}

// Prints "<name>: N checks, M failures" and returns the process exit status.
inline int summary(const char* name) {
  std::printf("%s: %d checks, %d failures\n", name, check_count(), failure_count());
  return failure_count() == 0 ? 0 : 1;
}

}  // namespace test

// CHECK_MSG evaluates its message only when the condition fails, so it is cheap inside element loops.
#define CHECK_MSG(condition, message)                                           \
  do {                                                                          \
    ++::test::check_count();                                                    \
    if (!(condition)) ::test::report_failure(__FILE__, __LINE__, #condition, (message)); \
  } while (0)
#define CHECK(condition) CHECK_MSG(condition, std::string())

namespace test {

using fused_convt::BFloat16Bits;
using fused_convt::ConvTransposeParams;
using fused_convt::DType;
using fused_convt::Epilogue;
using fused_convt::HalfBits;

// splitmix64: the same stream on every platform (std:: distributions are implementation-defined).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int64_t integer(int64_t lo, int64_t hi) { return lo + int64_t(next() % uint64_t(hi - lo + 1)); }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53; }
  bool coin() { return next() & 1u; }

 private:
  uint64_t state_;
};

inline std::string describe(const ConvTransposeParams& p) {
  auto s = [](int64_t v) { return std::to_string(v); };
  return "N=" + s(p.batch) + " Cin=" + s(p.in_channels) + " Cout=" + s(p.out_channels) + " H,W=" + s(p.in_h) +
         "," + s(p.in_w) + " k=" + s(p.kernel_h) + "," + s(p.kernel_w) + " s=" + s(p.stride_h) + "," +
         s(p.stride_w) + " p=" + s(p.pad_h) + "," + s(p.pad_w) + " op=" + s(p.out_pad_h) + "," + s(p.out_pad_w) +
         " d=" + s(p.dil_h) + "," + s(p.dil_w) + " g=" + s(p.groups) + " bias=" + s(p.has_bias);
}

inline bool is_valid(const ConvTransposeParams& p) {
  try {
    fused_convt::validate(p);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

// A small random problem covering every feature: groups, stride, padding, output_padding (including
// output_padding >= stride where dilation allows it), dilation, non-square shapes, bias on and off.
inline ConvTransposeParams random_params(Rng& rng, int64_t max_extent = 6) {
  for (;;) {
    ConvTransposeParams p;
    p.groups = rng.integer(1, 3);
    p.batch = rng.integer(1, 2);
    p.in_channels = p.groups * rng.integer(1, 3);
    p.out_channels = p.groups * rng.integer(1, 3);
    p.in_h = rng.integer(1, max_extent);
    p.in_w = rng.integer(1, max_extent);
    p.kernel_h = rng.integer(1, 4);
    p.kernel_w = rng.integer(1, 4);
    p.stride_h = rng.integer(1, 3);
    p.stride_w = rng.integer(1, 3);
    p.dil_h = rng.integer(1, 3);
    p.dil_w = rng.integer(1, 3);
    p.pad_h = rng.integer(0, 2);
    p.pad_w = rng.integer(0, 2);
    p.out_pad_h = rng.integer(0, std::max(p.stride_h, p.dil_h) - 1);
    p.out_pad_w = rng.integer(0, std::max(p.stride_w, p.dil_w) - 1);
    p.has_bias = rng.coin();
    if (is_valid(p)) return p;
  }
}

// ---- storage types ---------------------------------------------------------------------------------

template <typename T> struct Storage;
template <> struct Storage<float> {
  static constexpr DType dtype = DType::Float32;
  static constexpr double unit_roundoff = 0x1.0p-24;
  static constexpr double denorm_min = 0x1.0p-149;
  static float from_double(double v) { return float(v); }
};
template <> struct Storage<double> {
  static constexpr DType dtype = DType::Float64;
  static constexpr double unit_roundoff = 0x1.0p-53;
  static constexpr double denorm_min = 0x1.0p-1074;
  static double from_double(double v) { return v; }
};
template <> struct Storage<HalfBits> {
  static constexpr DType dtype = DType::Float16;
  static constexpr double unit_roundoff = 0x1.0p-11;
  static constexpr double denorm_min = 0x1.0p-24;
  static HalfBits from_double(double v) { return fused_convt::to_half(float(v)); }
};
template <> struct Storage<BFloat16Bits> {
  static constexpr DType dtype = DType::BFloat16;
  static constexpr double unit_roundoff = 0x1.0p-8;
  static constexpr double denorm_min = 0x1.0p-133;
  static BFloat16Bits from_double(double v) { return fused_convt::to_bfloat16(float(v)); }
};

// The accumulator and epilogue precision: double for double, float for the rest.
template <typename T> struct Precision {
  static constexpr double unit_roundoff = 0x1.0p-24;
  static constexpr double denorm_min = 0x1.0p-149;
};
template <> struct Precision<double> {
  static constexpr double unit_roundoff = 0x1.0p-53;
  static constexpr double denorm_min = 0x1.0p-1074;
};

template <typename T> double to_double(T v) { return double(fused_convt::to_float(v)); }

// Random values in [lo, hi], rounded to T; `exact` receives the stored values as doubles.
template <typename T>
std::vector<T> random_tensor(Rng& rng, int64_t count, double lo, double hi, std::vector<double>* exact) {
  std::vector<T> values(static_cast<size_t>(count));
  exact->resize(size_t(count));
  for (int64_t i = 0; i < count; ++i) {
    values[size_t(i)] = Storage<T>::from_double(rng.uniform(lo, hi));
    (*exact)[size_t(i)] = to_double(values[size_t(i)]);
  }
  return values;
}

// ---- the epilogue in long double ---------------------------------------------------------------------

inline long double ref_normal_cdf(long double z) { return 0.5L * std::erfc(-z / std::sqrt(2.0L)); }
inline long double ref_normal_pdf(long double z) {
  return std::exp(-0.5L * z * z) / std::sqrt(2.0L * 3.14159265358979323846264338327950288L);
}

// multiply_value * GELU(min(u, 0)) with GELU(z) = z * 0.5 * erfc(-z / sqrt 2).
inline long double ref_epilogue(long double u, long double m) {
  if (std::isnan(u)) return u;
  if (u >= 0) return 0;
  return m * u * ref_normal_cdf(u);
}

// d/du of ref_epilogue; m/4 at the tie u == 0 (PyTorch's binary minimum splits it, GELU'(0) = 1/2).
inline long double ref_epilogue_derivative(long double u, long double m) {
  if (std::isnan(u)) return u;
  if (u > 0) return 0;
  if (u == 0) return m / 4;
  return m * (ref_normal_cdf(u) + u * ref_normal_pdf(u));
}

// d^2/du^2 of ref_epilogue for u != 0: m * phi(u) * (2 - u^2) below 0, nothing above.
inline long double ref_epilogue_second_derivative(long double u, long double m) {
  return u < 0 ? m * ref_normal_pdf(u) * (2 - u * u) : 0;
}

// Bound on the evaluation error of the epilogue (value or derivative) in a type with unit roundoff `unit`.
// erfc(x) and exp(-x^2/2) amplify a relative error e of their argument to about x^2 * e, hence the u^2 term;
// `magnitude` is the size of the terms summed (|m| * (Phi + |u| phi) for the derivative, whose two terms
// cancel near u = -0.75), and the last term covers results that underflow into subnormals.
inline double epilogue_tolerance(double u, double m, double unit, double denorm_min) {
  if (!(u < 0)) return 0;
  const double magnitude = std::fabs(m) * double(ref_normal_cdf(u) + std::fabs(u) * ref_normal_pdf(u));
  return unit * (16 + 2 * u * u) * magnitude + 8 * std::fabs(m) * (std::fabs(u) + 1) * denorm_min;
}

// ---- nn.ConvTranspose2d by its definition ----------------------------------------------------------

// Offset of (a, b, c, d) in a contiguous 4-D tensor whose last three extents are extent_b, extent_c, extent_d.
inline int64_t flat_index(int64_t a, int64_t b, int64_t c, int64_t d, int64_t extent_b, int64_t extent_c,
                          int64_t extent_d) {
  return ((a * extent_b + b) * extent_c + c) * extent_d + d;
}

// Calls fn(x_index, w_index, y_index) for every (input, tap) pair that lands inside the output:
// input (n, ic, ih, iw) spreads through weight[ic, oc_local, kh, kw] to output (n, oc, ih*s - p + kh*d, ...).
template <typename Fn>
void for_each_scatter_term(const ConvTransposeParams& p, Fn&& fn) {
  const int64_t out_h = p.out_h(), out_w = p.out_w();
  const int64_t in_per_group = p.in_channels / p.groups, out_per_group = p.out_channels / p.groups;
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t ic = 0; ic < p.in_channels; ++ic)
      for (int64_t ih = 0; ih < p.in_h; ++ih)
        for (int64_t iw = 0; iw < p.in_w; ++iw)
          for (int64_t oc_local = 0; oc_local < out_per_group; ++oc_local)
            for (int64_t kh = 0; kh < p.kernel_h; ++kh)
              for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
                const int64_t oh = ih * p.stride_h - p.pad_h + kh * p.dil_h;
                const int64_t ow = iw * p.stride_w - p.pad_w + kw * p.dil_w;
                if (oh < 0 || oh >= out_h || ow < 0 || ow >= out_w) continue;
                const int64_t oc = (ic / in_per_group) * out_per_group + oc_local;
                fn(flat_index(n, ic, ih, iw, p.in_channels, p.in_h, p.in_w),
                   flat_index(ic, oc_local, kh, kw, out_per_group, p.kernel_h, p.kernel_w),
                   flat_index(n, oc, oh, ow, p.out_channels, out_h, out_w));
              }
}

// A reference value with the data its error bound needs: the number of products summed and the sum of
// their absolute values.
struct ReferenceSums {
  std::vector<double> value, abs_sum;
  std::vector<int64_t> terms;
  void resize(int64_t count) {
    value.assign(size_t(count), 0.0);
    abs_sum.assign(size_t(count), 0.0);
    terms.assign(size_t(count), 0);
  }
  void add(int64_t index, double product) {
    value[size_t(index)] += product;
    abs_sum[size_t(index)] += std::fabs(product);
    ++terms[size_t(index)];
  }
  // |computed - value| allowed when both are accumulated with unit roundoff `unit` (and the computed one
  // multiplies operands rounded with relative error operand_unit: 2 * operand_unit per product).
  double sum_tolerance(int64_t index, double unit, double operand_unit = 0) const {
    return (2 * double(terms[size_t(index)] + 2) * unit + 2 * operand_unit + operand_unit * operand_unit) *
           abs_sum[size_t(index)];
  }
};

// Pre-activation acc + bias (add_value not included) of every output.
inline ReferenceSums reference_preactivation(const ConvTransposeParams& p, const std::vector<double>& x,
                                             const std::vector<double>& w, const std::vector<double>& bias) {
  ReferenceSums pre;
  pre.resize(p.output_numel());
  for_each_scatter_term(p, [&](int64_t xi, int64_t wi, int64_t yi) { pre.add(yi, x[size_t(xi)] * w[size_t(wi)]); });
  if (p.has_bias) {
    const int64_t plane = p.out_h() * p.out_w();
    for (int64_t i = 0; i < p.output_numel(); ++i) pre.add(i, bias[size_t((i / plane) % p.out_channels)]);
  }
  return pre;
}

struct BackwardReference {
  ReferenceSums grad_input, grad_weight, grad_bias;
};

// g = grad_output * grad_factor (grad_factor may be empty: the identity epilogue), then the three sums of the
// scatter definition: grad_input and grad_weight pair every input with the outputs it reaches.
inline BackwardReference reference_backward(const ConvTransposeParams& p, const std::vector<double>& x,
                                            const std::vector<double>& w, const std::vector<double>& grad_output,
                                            const std::vector<double>& grad_factor) {
  std::vector<double> g(grad_output);
  for (size_t i = 0; i < g.size() && !grad_factor.empty(); ++i) g[i] *= grad_factor[i];
  BackwardReference ref;
  ref.grad_input.resize(p.input_numel());
  ref.grad_weight.resize(p.weight_numel());
  ref.grad_bias.resize(p.out_channels);
  for_each_scatter_term(p, [&](int64_t xi, int64_t wi, int64_t yi) {
    ref.grad_input.add(xi, g[size_t(yi)] * w[size_t(wi)]);
    ref.grad_weight.add(wi, x[size_t(xi)] * g[size_t(yi)]);
  });
  const int64_t plane = p.out_h() * p.out_w();
  for (int64_t i = 0; i < p.output_numel(); ++i) ref.grad_bias.add((i / plane) % p.out_channels, g[size_t(i)]);
  return ref;
}

// ---- checking results against the references ---------------------------------------------------------

// The forward reference (output and grad_factor as doubles) with a tolerance per element for storage type T.
struct ForwardExpectation {
  std::vector<double> output, output_tol, factor, factor_tol;
};

// operand_unit: the relative rounding of each operand before it is multiplied (TF32 tensor cores), 0 when
// the products are formed from the stored values.
template <typename T>
ForwardExpectation expected_forward(const ReferenceSums& pre, const Epilogue& epi, double operand_unit = 0) {
  const double acc_unit = Precision<T>::unit_roundoff, acc_denorm = Precision<T>::denorm_min;
  const double store_unit = Storage<T>::unit_roundoff, store_denorm = Storage<T>::denorm_min;
  ForwardExpectation e;
  const size_t count = pre.value.size();
  e.output.resize(count);
  e.output_tol.resize(count);
  e.factor.resize(count);
  e.factor_tol.resize(count);
  const double m = epi.enabled ? epi.multiply_value : 1.0;
  for (size_t i = 0; i < count; ++i) {
    // add_value is rounded once to the accumulator type and added: one more term of the sum.
    const double pre_tol = pre.sum_tolerance(int64_t(i), acc_unit, operand_unit) +
                           2 * acc_unit * (std::fabs(pre.value[i]) + std::fabs(epi.add_value));
    if (!epi.enabled) {
      e.output[i] = pre.value[i];
      e.output_tol[i] = pre_tol + 2 * store_unit * std::fabs(e.output[i]) + store_denorm;
      e.factor[i] = 1.0;
      e.factor_tol[i] = 0.0;
      continue;
    }
    const long double u = (long double)pre.value[i] + (long double)epi.add_value;
    e.output[i] = double(ref_epilogue(u, m));
    // The saved factor is the derivative divided by m (EpilogueOutputs): the derivative at m = 1.
    e.factor[i] = double(ref_epilogue_derivative(u, 1));
    // An error of at most pre_tol in u moves the value by at most pre_tol times the largest slope within
    // pre_tol of u: |f'(u)| + pre_tol * max|f''|, max|f''| <= 0.8 |m|; the factor likewise with the third
    // derivative, bounded by 1. Within pre_tol of 0 the computed u may fall on either side of the kink,
    // where the factor jumps between 1/2 and 0 (the 1/2 evaluated just below 0, and stored, with rounding) and the
    // slope of the value is at most |m|/2.
    const double eval_tol = epilogue_tolerance(double(u), m, acc_unit, acc_denorm);
    const double factor_eval_tol = epilogue_tolerance(double(u), 1.0, acc_unit, acc_denorm);
    const bool at_kink = std::fabs(double(u)) <= pre_tol;
    const double slope = at_kink ? std::fabs(m) / 2 : std::fabs(m * e.factor[i]) + 0.8 * std::fabs(m) * pre_tol;
    const double factor_slope = std::fabs(double(ref_epilogue_second_derivative(u, 1))) + pre_tol;
    e.output_tol[i] = slope * pre_tol + eval_tol + 2 * store_unit * std::fabs(e.output[i]) + store_denorm;
    e.factor_tol[i] = at_kink ? 0.5 + epilogue_tolerance(-pre_tol, 1.0, acc_unit, acc_denorm) + store_unit +
                                    store_denorm
                              : factor_slope * pre_tol + factor_eval_tol + 2 * store_unit * std::fabs(e.factor[i]) +
                                    store_denorm;
  }
  return e;
}

// Checks computed[i] against expected[i] within tol[i] * scale; NaN never passes.
template <typename T>
void check_close(const std::vector<T>& computed, const std::vector<double>& expected, const std::vector<double>& tol,
                 double scale, const std::string& what) {
  CHECK_MSG(computed.size() == expected.size(), what + ": size mismatch");
  for (size_t i = 0; i < computed.size() && i < expected.size(); ++i) {
    const double got = to_double(computed[i]);
    CHECK_MSG(std::fabs(got - expected[i]) <= tol[i] * scale,
              what + " [" + std::to_string(i) + "]: got " + fmt(got) + " expected " + fmt(expected[i]) +
                  " (tolerance " + fmt(tol[i] * scale) + ")");
  }
}

template <typename T>
std::vector<double> sum_tolerances(const ReferenceSums& sums, double operand_unit = 0) {
  std::vector<double> tol(sums.value.size());
  for (size_t i = 0; i < tol.size(); ++i) {
    tol[i] = sums.sum_tolerance(int64_t(i), Precision<T>::unit_roundoff, operand_unit) +
             2 * Storage<T>::unit_roundoff * std::fabs(sums.value[i]) + Storage<T>::denorm_min;
  }
  return tol;
}

// A host buffer filled with NaN (in T), so an element a kernel forgets to write cannot pass a comparison.
template <typename T>
std::vector<T> poisoned(int64_t count) {
  return std::vector<T>(size_t(count), Storage<T>::from_double(std::numeric_limits<double>::quiet_NaN()));
}

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A problem with the given sizes and groups; everything else at ConvTransposeParams' defaults.
inline fused_convt::ConvTransposeParams make_params(int64_t n, int64_t cin, int64_t cout, int64_t h, int64_t w,
                                                    int64_t groups) {
  fused_convt::ConvTransposeParams p;
  p.batch = n, p.in_channels = cin, p.out_channels = cout, p.in_h = h, p.in_w = w, p.groups = groups;
  return p;
}

}  // namespace test
