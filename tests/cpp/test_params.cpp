// params.h and tap_map.h: the output-size math against PyTorch's values, validate() naming each bad field,
// floor_div on negative numerators, the TapMaps and the phase decomposition against the scatter definition
// o = i*s - p + k*d.
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_convt/params.h"
#include "fused_convt/tap_map.h"
#include "test_util.h"

using fused_convt::ConvTransposeParams;
using fused_convt::TapMap;

namespace {

// nn.ConvTranspose2d(1, 1, k, s, p, op, dilation=d)(x).shape[-1] for a square input of extent `in`,
// as printed by PyTorch.
void output_size_matches_pytorch() {
  struct Case { int64_t in, kernel, stride, pad, dilation, output_pad, expected; };
  const Case cases[] = {
      {5, 3, 2, 1, 1, 1, 10},  {32, 4, 2, 1, 1, 0, 64}, {7, 3, 1, 1, 1, 0, 7},   {1, 1, 1, 0, 1, 0, 1},
      {64, 4, 2, 0, 1, 0, 130}, {7, 3, 3, 2, 2, 1, 20}, {10, 5, 1, 0, 3, 2, 24}, {3, 2, 3, 0, 1, 2, 10},
      {4, 3, 1, 2, 1, 0, 2},   {6, 7, 4, 3, 2, 3, 30},  {9, 1, 5, 0, 1, 4, 45},
  };
  for (const Case& c : cases) {
    const int64_t got = fused_convt::transposed_output_size(c.in, c.kernel, c.stride, c.pad, c.dilation, c.output_pad);
    CHECK_MSG(got == c.expected, "in=" + std::to_string(c.in) + " k=" + std::to_string(c.kernel) + ": got " +
                                     std::to_string(got) + ", PyTorch gives " + std::to_string(c.expected));
  }
  // out_h and out_w use their own axis: rows from case 1, columns from case 6.
  ConvTransposeParams p;
  p.in_h = 5, p.kernel_h = 3, p.stride_h = 2, p.pad_h = 1, p.dil_h = 1, p.out_pad_h = 1;
  p.in_w = 7, p.kernel_w = 3, p.stride_w = 3, p.pad_w = 2, p.dil_w = 2, p.out_pad_w = 1;
  p.batch = 2, p.in_channels = 4, p.out_channels = 6, p.groups = 2;
  CHECK(p.out_h() == 10);
  CHECK(p.out_w() == 20);
  CHECK(p.output_numel() == 2 * 6 * 10 * 20);
  CHECK(p.input_numel() == 2 * 4 * 5 * 7);
  CHECK(p.weight_numel() == 4 * 3 * 3 * 3);  // [C_in, C_out / groups, kH, kW]
  CHECK(p.in_channels_per_group() == 2 && p.out_channels_per_group() == 3);
}

ConvTransposeParams valid_params() {
  ConvTransposeParams p;
  p.batch = 2, p.in_channels = 4, p.out_channels = 6, p.in_h = 5, p.in_w = 7;
  p.kernel_h = 3, p.kernel_w = 2, p.stride_h = 2, p.stride_w = 3, p.pad_h = 1, p.pad_w = 0;
  p.out_pad_h = 1, p.out_pad_w = 2, p.dil_h = 1, p.dil_w = 1, p.groups = 2;
  return p;
}

template <typename Mutate>
void rejects(const char* what, const char* field_in_message, Mutate mutate) {
  ConvTransposeParams p = valid_params();
  mutate(p);
  try {
    fused_convt::validate(p);
    CHECK_MSG(false, std::string(what) + ": accepted");
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    CHECK_MSG(message.find(field_in_message) != std::string::npos,
              std::string(what) + ": message \"" + message + "\" does not name " + field_in_message);
  }
}

template <typename Mutate>
void accepts(const char* what, Mutate mutate) {
  ConvTransposeParams p = valid_params();
  mutate(p);
  try {
    fused_convt::validate(p);
    CHECK(true);
  } catch (const std::invalid_argument& error) {
    CHECK_MSG(false, std::string(what) + ": rejected with \"" + error.what() + "\"");
  }
}

void validate_names_the_bad_field() {
  using P = ConvTransposeParams;
  rejects("negative batch", "batch", [](P& p) { p.batch = -1; });
  rejects("zero in_channels", "in_channels", [](P& p) { p.in_channels = 0; });
  rejects("zero out_channels", "out_channels", [](P& p) { p.out_channels = 0; });
  rejects("zero input height", "height", [](P& p) { p.in_h = 0; });
  rejects("zero input width", "width", [](P& p) { p.in_w = 0; });
  rejects("zero kernel", "kernel_size", [](P& p) { p.kernel_w = 0; });
  rejects("zero stride", "stride", [](P& p) { p.stride_h = 0; });
  rejects("negative stride", "stride", [](P& p) { p.stride_w = -2; });
  rejects("zero dilation", "dilation", [](P& p) { p.dil_w = 0; });
  rejects("negative padding", "padding", [](P& p) { p.pad_h = -1; });
  rejects("zero groups", "groups", [](P& p) { p.groups = 0; });
  rejects("groups not dividing in_channels", "in_channels", [](P& p) { p.groups = 3, p.out_channels = 6; });
  rejects("groups not dividing out_channels", "out_channels", [](P& p) { p.out_channels = 5; });
  rejects("negative output_padding", "output_padding", [](P& p) { p.out_pad_w = -1; });
  rejects("output_padding == stride > dilation", "output_padding[0]", [](P& p) { p.out_pad_h = 2; });
  rejects("output_padding >= stride and dilation", "output_padding[1]", [](P& p) {
    p.stride_w = 2, p.dil_w = 2, p.out_pad_w = 3;
  });
  rejects("padding empties the output", "empty output", [](P& p) {
    p.in_h = 1, p.kernel_h = 1, p.pad_h = 1, p.out_pad_h = 0;
  });
  rejects("input plane >= 2^31", "plane", [](P& p) { p.in_h = 50000, p.in_w = 50000; });
  // The tap maps' 32-bit intermediates: huge stride / dilation + padding are refused, not wrapped.
  rejects("stride of 2^32", "spatial extent", [](P& p) { p.stride_h = int64_t(1) << 32; });
  rejects("dilation and padding beyond 2^31", "spatial extent", [](P& p) {
    p.kernel_w = 2, p.dil_w = int64_t(1) << 33, p.pad_w = int64_t(1) << 32;
  });
  rejects("output plane >= 2^31", "plane", [](P& p) {
    p.in_h = 2, p.in_w = 2, p.stride_h = 60000, p.stride_w = 60000, p.pad_h = 0, p.pad_w = 0;
  });
  rejects("weight >= 2^31 elements", "weight", [](P& p) {
    p.in_channels = 1 << 16, p.out_channels = 1 << 16, p.groups = 1;
  });
  rejects("channels >= 2^29", "channel", [](P& p) {
    p.in_channels = (int64_t(1) << 29) + 2, p.out_channels = 2, p.groups = 2, p.kernel_h = 1, p.kernel_w = 1;
  });

  accepts("the base problem", [](P&) {});
  accepts("empty batch", [](P& p) { p.batch = 0; });
  accepts("output_padding >= stride when smaller than dilation", [](P& p) {
    p.stride_h = 1, p.dil_h = 3, p.out_pad_h = 2;
  });
  accepts("depthwise", [](P& p) { p.in_channels = 6, p.groups = 6; });
  accepts("padding leaving one output row", [](P& p) {
    p.in_h = 1, p.kernel_h = 3, p.stride_h = 1, p.pad_h = 1, p.out_pad_h = 0;
  });
}

void floor_div_rounds_down() {
  CHECK(fused_convt::floor_div(-7, 2) == -4);
  CHECK(fused_convt::floor_div(-6, 2) == -3);
  CHECK(fused_convt::floor_div(-1, 3) == -1);
  CHECK(fused_convt::floor_div(0, 3) == 0);
  CHECK(fused_convt::floor_div(7, 2) == 3);
  CHECK(fused_convt::floor_div(-9, 3) == -3);
  for (int64_t num = -50; num <= 50; ++num) {
    for (int64_t den = 1; den <= 7; ++den) {
      const auto expected = int64_t(std::floor(double(num) / double(den)));
      CHECK_MSG(fused_convt::floor_div(num, den) == expected,
                "floor_div(" + std::to_string(num) + ", " + std::to_string(den) + ")");
    }
  }
}

// The forward map answers "which input i feeds output o through tap k": i with o = i*s - p + k*d, if any
// (the range of i is the caller's business). grad_input's map is the scatter itself.
void tap_maps_match_scatter(test::Rng& rng) {
  for (int trial = 0; trial < 200; ++trial) {
    const int stride = int(rng.integer(1, 5)), pad = int(rng.integer(0, 4)), dilation = int(rng.integer(1, 4));
    const int taps = int(rng.integer(1, 6)), in = int(rng.integer(1, 9));
    const int out = int(fused_convt::transposed_output_size(in, taps, stride, pad, dilation, 0));
    const std::string context = "s=" + std::to_string(stride) + " p=" + std::to_string(pad) +
                                " d=" + std::to_string(dilation) + " k=" + std::to_string(taps);
    const TapMap forward = fused_convt::forward_tap_map(stride, pad, dilation);
    const TapMap backward = fused_convt::grad_input_tap_map(stride, pad, dilation);

    for (int o = 0; o < std::max(out, 1); ++o) {
      for (int k = 0; k < taps; ++k) {
        int expected_i = 0;
        bool exists = false;
        for (int i = -40; i <= 40; ++i) {
          if (i * stride - pad + k * dilation == o) exists = true, expected_i = i;
        }
        int i = 0;
        const bool found = forward.source(o, k, &i);
        CHECK_MSG(found == exists, context + " o=" + std::to_string(o) + " k=" + std::to_string(k));
        if (found && exists) CHECK_MSG(i == expected_i, context + " o=" + std::to_string(o));
      }
    }
    for (int i = 0; i < in; ++i) {
      for (int k = 0; k < taps; ++k) {
        int o = 0;
        CHECK_MSG(backward.source(i, k, &o) && o == i * stride - pad + k * dilation,
                  context + " i=" + std::to_string(i) + " k=" + std::to_string(k));
      }
    }

    // source_first / source_last bound every source a destination range reads (the staged patch).
    for (const TapMap* map : {&forward, &backward}) {
      const int extent = map == &forward ? out : in;
      const int first_dst = int(rng.integer(0, std::max(extent - 1, 0)));
      const int last_dst = int(rng.integer(first_dst, std::max(extent - 1, first_dst)));
      const int lo = map->source_first(first_dst, taps), hi = map->source_last(last_dst, taps);
      for (int dst = first_dst; dst <= last_dst; ++dst) {
        for (int k = 0; k < taps; ++k) {
          int src = 0;
          if (map->source(dst, k, &src)) {
            CHECK_MSG(src >= lo && src <= hi, context + " dst=" + std::to_string(dst) + " src=" + std::to_string(src) +
                                                  " outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
          }
        }
      }
    }
  }
}

// The phase decomposition (PhaseSpan and the phase_* helpers): the phases partition the outputs, every tap
// belongs to exactly one phase, and phase pixel a with tap k reads input a + offset, the i of the scatter
// o = i*s - p + k*d. Exhaustive over small axes, including outputs that leave a phase empty.
void phases_partition_outputs_and_taps() {
  for (int out = 1; out <= 14; ++out)
    for (int kernel = 1; kernel <= 7; ++kernel)
      for (int stride = 1; stride <= 4; ++stride)
        for (int pad = 0; pad <= 3; ++pad)
          for (int dilation = 1; dilation <= 3; ++dilation) {
            const std::string context = "out=" + std::to_string(out) + " k=" + std::to_string(kernel) +
                                        " s=" + std::to_string(stride) + " p=" + std::to_string(pad) +
                                        " d=" + std::to_string(dilation);
            std::vector<int> hits(out, 0), tap_phases(kernel, 0);
            for (int r = 0; r < stride; ++r) {
              const fused_convt::PhaseSpan span = fused_convt::phase_span(out, stride, pad, r);
              const int taps = fused_convt::phase_taps(kernel, stride, dilation, r);
              CHECK_MSG(fused_convt::phase_tap(kernel, stride, dilation, r, taps) == -1, context);
              for (int a = 0; a < span.extent; ++a) {
                const int o = span.first + stride * a;
                CHECK_MSG(o >= 0 && o < out && (o + pad) % stride == r, context + " r=" + std::to_string(r));
                if (o >= 0 && o < out) ++hits[o];
                for (int t = 0; t < taps; ++t) {
                  const int k = fused_convt::phase_tap(kernel, stride, dilation, r, t);
                  const int i = a + fused_convt::phase_tap_offset(span, k, stride, dilation, r);
                  CHECK_MSG(k >= 0 && i * stride - pad + k * dilation == o,
                            context + " r=" + std::to_string(r) + " a=" + std::to_string(a));
                }
              }
              for (int t = 0; t < taps; ++t) {
                const int k = fused_convt::phase_tap(kernel, stride, dilation, r, t);
                if (k >= 0 && k < kernel) ++tap_phases[k];
              }
            }
            for (int o = 0; o < out; ++o) CHECK_MSG(hits[o] == 1, context + " o=" + std::to_string(o));
            for (int k = 0; k < kernel; ++k) CHECK_MSG(tap_phases[k] == 1, context + " k=" + std::to_string(k));
          }
}

// PhaseAxis (closed-form counts) agrees with phase_span, and PhaseSplitLayout::pixel_row numbers the pixels
// of every image phase by phase without gaps or repeats.
void phase_split_layout_matches_phase_span() {
  for (int size = 1; size <= 13; ++size)
    for (int stride = 1; stride <= 5; ++stride)
      for (int pad = 0; pad <= 6; ++pad) {
        const fused_convt::PhaseAxis axis{size, stride, pad};
        const std::string context = "size=" + std::to_string(size) + " s=" + std::to_string(stride) +
                                    " p=" + std::to_string(pad);
        int before = 0;
        for (int r = 0; r < stride; ++r) {
          const fused_convt::PhaseSpan span = fused_convt::phase_span(size, stride, pad, r);
          CHECK_MSG(axis.extent(r) == span.extent, context + " extent r=" + std::to_string(r));
          CHECK_MSG(axis.before(r) == before, context + " before r=" + std::to_string(r));
          before += span.extent;
          for (int a = 0; a < span.extent; ++a) {
            const int o = span.first + stride * a;
            CHECK_MSG(axis.phase_of(o) == r && axis.index_in_phase(o, r) == a,
                      context + " o=" + std::to_string(o));
          }
        }
      }
  const fused_convt::PhaseSplitLayout layout{3, {7, 3, 1}, {5, 2, 2}, 1};
  std::vector<int> seen(3 * 7 * 5, 0);
  for (int n = 0; n < 3; ++n)
    for (int oh = 0; oh < 7; ++oh)
      for (int ow = 0; ow < 5; ++ow) {
        const int64_t row = layout.pixel_row(n, oh, ow);
        CHECK_MSG(row >= 0 && row < int64_t(seen.size()), "pixel_row in range");
        if (row >= 0 && row < int64_t(seen.size())) ++seen[size_t(row)];
      }
  for (int count : seen) CHECK_MSG(count == 1, "pixel_row is a bijection");
}

}  // namespace

int main() {
  test::Rng rng(20240611);
  output_size_matches_pytorch();
  validate_names_the_bad_field();
  floor_div_rounds_down();
  tap_maps_match_scatter(rng);
  phases_partition_outputs_and_taps();
  phase_split_layout_matches_phase_span();
  return test::summary("test_params");
}
