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
    const int q = floor_div(numer, divisor);
    *src = q;
    return q * divisor == numer;
  }

  // Smallest / largest source coordinate any tap in [0, taps) can read for dst in [dst_first, dst_last].
  // dst_scale > 0, so numer grows with dst; the tap term decides by its sign.
  FCT_HD int source_first(int dst_first, int taps) const {
    const int tap_term = tap_scale < 0 ? tap_scale * (taps - 1) : 0;
    return floor_div(dst_first * dst_scale + tap_term + offset, divisor);
  }
  FCT_HD int source_last(int dst_last, int taps) const {
    const int tap_term = tap_scale > 0 ? tap_scale * (taps - 1) : 0;
    return floor_div(dst_last * dst_scale + tap_term + offset, divisor);
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

// (Divisions in 32 bits, as in TapMap: validate() bounds every value here below 2^31. grad_weight's GEMM blocks
// evaluate these functions before their first copy; in 64 bits kb_v0's GEMM took 69 us, in 32 bits 66.5 (H100).)
FCT_HD PhaseSpan phase_span(int64_t out, int64_t stride, int64_t pad, int64_t r) {
  const int s = static_cast<int>(stride);
  const int j0 = -floor_div(static_cast<int>(r - pad), s);  // ceil((pad - r) / stride)
  const int j_last = floor_div(static_cast<int>(out - 1 + pad - r), s);
  return PhaseSpan{s * j0 + static_cast<int>(r - pad), j_last >= j0 ? j_last - j0 + 1 : 0, j0};
}

FCT_HD int64_t phase_of_tap(int64_t k, int64_t stride, int64_t dilation) {
  return static_cast<int>(k * dilation) % static_cast<int>(stride);
}

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
  return span.j0 - static_cast<int>(k * dilation - r) / static_cast<int>(stride);
}

// One axis of a phase-split buffer (grad_weight's channels-last copy of g): pixel o of an axis of `size`
// belongs to phase r = (o + pad) mod stride, as in PhaseSpan, and is the index_in_phase-th of that phase.
// Counting v = o + pad in closed form keeps this to one 32-bit division per pixel (the copy kernel runs it
// per element; PhaseSpan's 64-bit floor divisions made that kernel compute-bound). Tested against
// phase_span in test_params. stride 1 / pad 0 is the identity (the plain channels-last copy of x).
struct PhaseAxis {
  int size, stride, pad;
  // Values v in [0, x) with v mod stride == r, and with v mod stride < r (x >= 0).
  FCT_HD int count_equal(int x, int r) const { return x / stride + (x % stride > r ? 1 : 0); }
  FCT_HD int count_below(int x, int r) const { return x / stride * r + (x % stride < r ? x % stride : r); }
  FCT_HD int phase_of(int o) const { return (o + pad) % stride; }
  FCT_HD int index_in_phase(int o, int r) const { return count_equal(o + pad, r) - count_equal(pad, r); }
  FCT_HD int extent(int r) const { return count_equal(pad + size, r) - count_equal(pad, r); }
  // Pixels of this axis in phases before r.
  FCT_HD int before(int r) const { return count_below(pad + size, r) - count_below(pad, r); }
};

// The phase-split layout: phases row-major (r_h, r_w), each [batch][extent_h][extent_w] rows of `row` values.
struct PhaseSplitLayout {
  int64_t batch;
  PhaseAxis h, w;
  int64_t row;  // values per pixel row
  // First pixel row of phase (rh, rw).
  FCT_HD int64_t phase_first_row(int rh, int rw) const {
    return batch * (int64_t(h.before(rh)) * w.size + int64_t(h.extent(rh)) * w.before(rw));
  }
  // Pixel row of image n, pixel (o_h, o_w).
  FCT_HD int64_t pixel_row(int64_t n, int o_h, int o_w) const {
    const int rh = h.phase_of(o_h), rw = w.phase_of(o_w);
    return phase_first_row(rh, rw) + (n * h.extent(rh) + h.index_in_phase(o_h, rh)) * w.extent(rw) +
           w.index_in_phase(o_w, rw);
  }
};

}  // namespace fused_convt
