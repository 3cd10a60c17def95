// The split sum's map from the grad_weight GEMMs' tap-major partial sums to PyTorch's weight layout
// (cuda/weight_partials.h). For each kernel's layout, as its stores write a (tap, input channel, output channel)
// value, the map must send that partial to the same weight value's index [ic][oc][kh][kw] (taps innermost): a
// wrong map would put correct sums in wrong places, which a sum over the weight would not notice.
#include <cstdint>
#include <string>
#include <vector>

#include "test_util.h"
#include "weight_partials.h"

namespace {

struct Shape {
  int64_t in_channels, out_per_group, taps, groups;
};

std::string describe(const Shape& s) {
  return "in " + std::to_string(s.in_channels) + " out/group " + std::to_string(s.out_per_group) + " taps " +
         std::to_string(s.taps) + " groups " + std::to_string(s.groups);
}

// PyTorch's index of weight value (ic, oc, tap): [in_channels][out_channels / groups][taps].
int64_t weight_index(const Shape& s, int64_t ic, int64_t oc, int64_t tap) {
  return (ic * s.out_per_group + oc) * s.taps + tap;
}

// grad_weight_gemm_kernel's store: tap * in_channels * out_per_group + (group * in_per_group + ic_local) *
// out_per_group + oc_local, i.e. [tap][input channel (all groups)][output channel of its group].
void check_gemm_layout(const Shape& s) {
  const int64_t count = s.in_channels * s.out_per_group * s.taps;
  std::vector<int> hits(size_t(count), 0);
  for (int64_t tap = 0; tap < s.taps; ++tap)
    for (int64_t ic = 0; ic < s.in_channels; ++ic)
      for (int64_t oc = 0; oc < s.out_per_group; ++oc) {
        const int64_t partial = tap * s.in_channels * s.out_per_group + ic * s.out_per_group + oc;
        const int64_t w = fused_convt::tap_major_weight_index(partial, count, s.taps, 0);
        CHECK_MSG(w == weight_index(s, ic, oc, tap), "GEMM layout " + describe(s));
        if (w >= 0 && w < count) ++hits[size_t(w)];
      }
  for (int h : hits) CHECK_MSG(h == 1, "GEMM layout: a weight value written " + std::to_string(h) + " times");
}

// grad_weight_wgmma_kernel's store (one group): (tap * out_channels + oc) * in_channels + ic.
void check_wgmma_layout(const Shape& s) {
  const int64_t count = s.in_channels * s.out_per_group * s.taps;
  for (int64_t tap = 0; tap < s.taps; ++tap)
    for (int64_t oc = 0; oc < s.out_per_group; ++oc)
      for (int64_t ic = 0; ic < s.in_channels; ++ic) {
        const int64_t partial = (tap * s.out_per_group + oc) * s.in_channels + ic;
        CHECK_MSG(fused_convt::tap_major_weight_index(partial, count, s.taps, s.in_channels) ==
                      weight_index(s, ic, oc, tap),
                  "wgmma layout " + describe(s));
      }
}

}  // namespace

int main() {
  // kb_v0 and kb_v1's weights, odd extents, grouped weights (in_channels over all groups), one tap (the bias sums'
  // case: the partials already in the result's layout).
  const Shape gemm_shapes[] = {{32, 16, 16, 1}, {64, 128, 16, 1}, {3, 5, 9, 1}, {12, 7, 4, 3}, {16, 8, 25, 4},
                               {9, 11, 1, 1}};
  for (const Shape& s : gemm_shapes) check_gemm_layout(s);
  // The wgmma kernel's shapes (one group, 2 x 2 taps per phase: 4 or 16 taps): narrow and wide tiles.
  const Shape wgmma_shapes[] = {{32, 16, 16, 1}, {64, 16, 16, 1}, {64, 128, 16, 1}, {128, 64, 4, 1}, {64, 256, 8, 1}};
  for (const Shape& s : wgmma_shapes) check_wgmma_layout(s);
  return test::summary("test_weight_partials");
}
