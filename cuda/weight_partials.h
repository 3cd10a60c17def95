// Where the split sum writes each grad_weight value. The grad_weight GEMMs store their per-split partial sums
// tap-major, so that their stores fill whole sectors (docs/optimizations.md 9j, 9k); the sum kernel (backward.cu's
// SplitSum) writes each sum to PyTorch's weight layout [in_channels][out_channels / groups][kernel_h][kernel_w],
// taps innermost. Plain C++: tests/cpp/test_weight_partials.cpp checks the map against both kernels' stores.
#pragma once

#include <cstdint>

#include "fused_convt/macros.h"

namespace fused_convt {

// The weight index of partial i of `count` values over `taps` taps, laid out i = tap * rows + row (rows = count /
// taps): where inner is 0, row = ic * (out_channels / groups) + oc (grad_weight_gemm_kernel: [tap][input channel][its
// group's output channel]); else row = oc * inner + ic, inner the input channels (grad_weight_wgmma_kernel, one
// group: [tap][output channel][input channel]; its phases have four taps, so it never passes taps 1). taps 1: i
// itself (the bias sums, whose partials are in the result's own layout).
FCT_HD int64_t tap_major_weight_index(int64_t i, int64_t count, int64_t taps, int64_t inner) {
  if (taps == 1) return i;
  const int64_t rows = count / taps, row = i % rows;
  const int64_t weight_row = inner > 0 ? row % inner * (rows / inner) + row / inner : row;
  return weight_row * taps + i / rows;
}

}  // namespace fused_convt
