// Index math of the gather form of a transposed convolution, one spatial axis at a time.
//
// PyTorch defines the op as a scatter: input i spreads to outputs o = i*s - p + k*d for every tap k.
// Every kernel here gathers instead (each destination is computed where it lives, no atomics). A TapMap
// answers, for a destination coordinate and a tap, which source coordinate feeds it:
//
//   numer = dst * dst_scale + tap * tap_scale + offset;   src = numer / divisor  (only if divisible)
//
// forward        (dst = output o, src = input i):      i = (o + p - k*d) / s
// grad of input  (dst = input i,  src = output grad o): o =  i*s - p + k*d
// The same map serves grad_weight (pairs of input i and output o per tap).
#pragma once

#include <cstdint>

#include "fused_convt/macros.h"
#include "fused_convt/params.h"

namespace fused_convt {

struct TapMap {
  int dst_scale;
  int tap_scale;
  int offset;
  int divisor;

  // Source coordinate for (dst, tap), or false when the tap falls between input samples (stride).
  // The caller checks the range of src; the tiled kernels stage a zero-padded patch instead.
  FCT_HD bool source(int dst, int tap, int* src) const {
    const int numer = dst * dst_scale + tap * tap_scale + offset;
    if (divisor == 1) {
      *src = numer;
      return true;
    }
    const int q = static_cast<int>(floor_div(numer, divisor));
    *src = q;
    return q * divisor == numer;
  }

  // Smallest / largest source coordinate any tap in [0, taps) can read for dst in [dst_first, dst_last].
  // dst_scale > 0, so numer grows with dst; the tap term decides by its sign.
  FCT_HD int source_first(int dst_first, int taps) const {
    const int tap_term = tap_scale < 0 ? tap_scale * (taps - 1) : 0;
    return static_cast<int>(floor_div(dst_first * dst_scale + tap_term + offset, divisor));
  }
  FCT_HD int source_last(int dst_last, int taps) const {
    const int tap_term = tap_scale > 0 ? tap_scale * (taps - 1) : 0;
    return static_cast<int>(floor_div(dst_last * dst_scale + tap_term + offset, divisor));
  }
};

FCT_HD TapMap forward_tap_map(int64_t stride, int64_t pad, int64_t dilation) {
  return TapMap{1, -static_cast<int>(dilation), static_cast<int>(pad), static_cast<int>(stride)};
}

FCT_HD TapMap grad_input_tap_map(int64_t stride, int64_t pad, int64_t dilation) {
  return TapMap{static_cast<int>(stride), static_cast<int>(dilation), -static_cast<int>(pad), 1};
}

}  // namespace fused_convt
