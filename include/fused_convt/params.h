// The problem description of a 2-D transposed convolution (PyTorch's nn.ConvTranspose2d semantics),
// its output-size math and its validation. No torch, no CUDA: used by the CPU path, the CUDA launchers,
// the Python binding and the C++ tests alike.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "fused_convt/macros.h"

namespace fused_convt {

// Output extent of one spatial axis: (in - 1)*s - 2p + d*(k - 1) + op + 1.
FCT_HD int64_t transposed_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                      int64_t dilation, int64_t output_pad) {
  return (in - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_pad + 1;
}

// Floor division for a possibly negative numerator and a positive divisor, in the arguments' integer type. The tap
// maps (tap_map.h), whose values validate() keeps below 2^31, divide in 32 bits: on the GPU a 64-bit division is a
// called subroutine of ~70 instructions, a 32-bit one a dozen inline.
template <typename Int>
FCT_HD Int floor_div(Int num, Int den) {
  const Int q = num / den;
  return (num % den != 0 && num < 0) ? q - 1 : q;
}

struct ConvTransposeParams {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t out_pad_h = 0, out_pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  int64_t groups = 1;
  bool has_bias = true;

  FCT_HD int64_t out_h() const {
    return transposed_output_size(in_h, kernel_h, stride_h, pad_h, dil_h, out_pad_h);
  }
  FCT_HD int64_t out_w() const {
    return transposed_output_size(in_w, kernel_w, stride_w, pad_w, dil_w, out_pad_w);
  }
  FCT_HD int64_t in_channels_per_group() const { return in_channels / groups; }
  FCT_HD int64_t out_channels_per_group() const { return out_channels / groups; }
  FCT_HD int64_t input_numel() const { return batch * in_channels * in_h * in_w; }
  FCT_HD int64_t output_numel() const { return batch * out_channels * out_h() * out_w(); }
  // weight: [in_channels, out_channels / groups, kernel_h, kernel_w], as nn.ConvTranspose2d stores it.
  FCT_HD int64_t weight_numel() const {
    return in_channels * out_channels_per_group() * kernel_h * kernel_w;
  }
};

// Throws std::invalid_argument naming the offending field, its value and what was expected.
// Kernels index one image plane and one weight slice with 32-bit ints, so those are bounded here;
// whole-tensor offsets are 64-bit everywhere.
inline void validate(const ConvTransposeParams& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("fused_convt: " + what); };
  auto s = [](int64_t v) { return std::to_string(v); };
  if (p.batch < 0) fail("batch size must be >= 0, got " + s(p.batch));
  if (p.in_channels <= 0) fail("in_channels must be > 0, got " + s(p.in_channels));
  if (p.out_channels <= 0) fail("out_channels must be > 0, got " + s(p.out_channels));
  if (p.in_h <= 0 || p.in_w <= 0)
    fail("input height and width must be > 0, got " + s(p.in_h) + "x" + s(p.in_w));
  if (p.kernel_h <= 0 || p.kernel_w <= 0)
    fail("kernel_size must be > 0, got " + s(p.kernel_h) + "x" + s(p.kernel_w));
  if (p.stride_h <= 0 || p.stride_w <= 0)
    fail("stride must be > 0, got (" + s(p.stride_h) + ", " + s(p.stride_w) + ")");
  if (p.dil_h <= 0 || p.dil_w <= 0)
    fail("dilation must be > 0, got (" + s(p.dil_h) + ", " + s(p.dil_w) + ")");
  if (p.pad_h < 0 || p.pad_w < 0)
    fail("padding must be >= 0, got (" + s(p.pad_h) + ", " + s(p.pad_w) + ")");
  if (p.groups <= 0) fail("groups must be > 0, got " + s(p.groups));
  if (p.in_channels % p.groups != 0)
    fail("in_channels (" + s(p.in_channels) + ") must be divisible by groups (" + s(p.groups) + ")");
  if (p.out_channels % p.groups != 0)
    fail("out_channels (" + s(p.out_channels) + ") must be divisible by groups (" + s(p.groups) + ")");
  if (p.out_pad_h < 0 || p.out_pad_w < 0)
    fail("output_padding must be >= 0, got (" + s(p.out_pad_h) + ", " + s(p.out_pad_w) + ")");
  if (p.out_pad_h >= p.stride_h && p.out_pad_h >= p.dil_h)
    fail("output_padding[0] = " + s(p.out_pad_h) + " must be smaller than stride[0] (" + s(p.stride_h) +
         ") or dilation[0] (" + s(p.dil_h) + ")");
  if (p.out_pad_w >= p.stride_w && p.out_pad_w >= p.dil_w)
    fail("output_padding[1] = " + s(p.out_pad_w) + " must be smaller than stride[1] (" + s(p.stride_w) +
         ") or dilation[1] (" + s(p.dil_w) + ")");
  if (p.out_h() <= 0 || p.out_w() <= 0)
    fail("padding leaves an empty output: computed output size " + s(p.out_h()) + "x" + s(p.out_w()));
  const int64_t int_max = std::numeric_limits<int32_t>::max();
  // Tap maps work in 32-bit ints: every intermediate o + p +- k*d and i*s + k*d stays below this bound.
  // Checked factor by factor first so the products themselves cannot overflow 64 bits.
  const int64_t axis_inputs[2][6] = {{p.in_h, p.kernel_h, p.stride_h, p.pad_h, p.dil_h, p.out_pad_h},
                                     {p.in_w, p.kernel_w, p.stride_w, p.pad_w, p.dil_w, p.out_pad_w}};
  for (int axis = 0; axis < 2; ++axis) {
    const int64_t* a = axis_inputs[axis];
    bool small = true;
    for (int i = 0; i < 6; ++i) small = small && a[i] <= int_max;
    if (!small || (a[0] - 1) * a[2] + a[4] * (a[1] - 1) + a[5] + 1 + a[3] > int_max)
      fail("spatial extent of axis " + s(axis) + " ((in - 1)*stride + dilation*(kernel - 1) + output_padding + 1 + "
           "padding) must be below 2^31");
  }
  if (p.out_h() * p.out_w() > int_max || p.in_h * p.in_w > int_max)
    fail("one image plane must have fewer than 2^31 elements, got input " + s(p.in_h) + "x" + s(p.in_w) +
         ", output " + s(p.out_h()) + "x" + s(p.out_w()));
  if (p.weight_numel() > int_max)
    fail("the weight must have fewer than 2^31 elements, got " + s(p.weight_numel()));
  if (p.in_channels > int_max / 4 || p.out_channels > int_max / 4)
    fail("channel counts must be below 2^29");
}

}  // namespace fused_convt
