// CPU helper: the (tap, source) pairs of one axis, tabulated once per call so that the inner loops of the
// CPU path test neither divisibility nor bounds.
#pragma once

#include <vector>

#include "fused_convt/tap_map.h"

namespace fused_convt {

struct AxisTaps {
  std::vector<int> begin;  // size extent + 1: the pairs of coordinate i are [begin[i], begin[i + 1])
  std::vector<int> tap, source;
};

inline AxisTaps collect_axis_taps(const TapMap& map, int dst_extent, int taps, int src_extent) {
  AxisTaps result;
  result.begin.push_back(0);
  for (int dst = 0; dst < dst_extent; ++dst) {
    for (int k = 0; k < taps; ++k) {
      int src;
      if (map.source(dst, k, &src) && src >= 0 && src < src_extent) {
        result.tap.push_back(k);
        result.source.push_back(src);
      }
    }
    result.begin.push_back(static_cast<int>(result.tap.size()));
  }
  return result;
}

}  // namespace fused_convt
