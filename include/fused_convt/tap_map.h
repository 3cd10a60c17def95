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

// Output phases of one axis (the phase decomposition of shared/DESIGN.md). Output o belongs to phase
// r = (o + p) mod s: phase r holds o = first + s*a for a in [0, extent), i.e. o = s*j + r - p with
// j = j0 + a. Tap k feeds only phase (k*d) mod s, and there output a reads input i = a + offset with
// offset = j0 - (k*d - r) / s. The forward's tensor-core tiles and grad_weight's blocks are built from this.
struct PhaseSpan {
  int first, extent, j0;
};

FCT_HD PhaseSpan phase_span(int64_t out, int64_t stride, int64_t pad, int64_t r) {
  const int64_t j0 = -floor_div(r - pad, stride);  // ceil((pad - r) / stride)
  const int64_t j_last = floor_div(out - 1 + pad - r, stride);
  return PhaseSpan{static_cast<int>(stride * j0 + r - pad), static_cast<int>(j_last >= j0 ? j_last - j0 + 1 : 0),
                   static_cast<int>(j0)};
}

FCT_HD int64_t phase_of_tap(int64_t k, int64_t stride, int64_t dilation) { return k * dilation % stride; }

// Number of taps of phase r, and the t-th of them in increasing k (-1 past the last).
FCT_HD int phase_taps(int64_t kernel, int64_t stride, int64_t dilation, int64_t r) {
  int taps = 0;
  for (int64_t k = 0; k < kernel; ++k) taps += phase_of_tap(k, stride, dilation) == r;
  return taps;
}
FCT_HD int phase_tap(int64_t kernel, int64_t stride, int64_t dilation, int64_t r, int t) {
  for (int64_t k = 0; k < kernel; ++k)
    if (phase_of_tap(k, stride, dilation) == r && t-- == 0) return static_cast<int>(k);
  return -1;
}

FCT_HD int phase_tap_offset(const PhaseSpan& span, int64_t k, int64_t stride, int64_t dilation, int64_t r) {
  return span.j0 - static_cast<int>((k * dilation - r) / stride);
}

}  // namespace fused_convt
