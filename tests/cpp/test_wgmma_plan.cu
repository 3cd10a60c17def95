// The wgmma backward kernels' planners (host code: runs without a GPU) against brute force.
// Both kernels pair input pixel (i, j) through tap t of phase (r_h, r_w) with G[phase][i - off_h[t]][j - off_w[t]]
// and the weight tap tap[t] (wgmma_phases.cuh). For every input pixel and kernel tap of random accepted problems:
// the output pixel o = i s - pad + k d of nn.ConvTranspose2d's scatter is the phase's pixel at that G index; every
// kernel tap belongs to exactly one phase's table; the taps' offsets are the largest and the largest minus one on
// each axis (the boxes' two rows and columns). And grad_input's tile windows: the G box of the tile holding an input
// pixel holds every G pixel its taps read; grad_weight's G box of a chunk likewise. Refusals only where a condition
// the headers name fails. Built with nvcc (the headers hold kernels); never launches anything.
#include <cstdint>
#include <string>

#include "grad_input_wgmma.cuh"
#include "grad_weight_wgmma.cuh"
#include "test_util.h"

namespace {

using fused_convt::ConvTransposeParams;
using fused_convt::kWgmmaTaps;
using fused_convt::WgmmaPhaseTaps;

// One axis of brute force: for tap k of phase r and every input index i whose output lies inside, the output is
// the phase's pixel i - off; returns the number of (i, k) pairs checked.
int64_t check_axis(int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t dil, int r, int k, int off,
                   const std::string& what) {
  const fused_convt::PhaseSpan span = fused_convt::phase_span(out, stride, pad, r);
  int64_t pairs = 0;
  for (int64_t i = 0; i < in; ++i) {
    const int64_t o = i * stride - pad + k * dil;
    if (o < 0 || o >= out) continue;
    ++pairs;
    CHECK_MSG((o + pad) % stride == r && o == span.first + stride * (i - off),
              what + ": tap " + std::to_string(k) + " input " + std::to_string(i));
  }
  return pairs;
}

// The tap tables of an accepted problem against the scatter; returns the pairs checked.
int64_t check_tables(const ConvTransposeParams& p, const WgmmaPhaseTaps (&tables)[fused_convt::kWgmmaMaxPhases]) {
  const std::string what = test::describe(p);
  std::vector<int> seen(size_t(p.kernel_h * p.kernel_w), 0);
  int64_t pairs = 0;
  for (int rh = 0; rh < p.stride_h; ++rh)
    for (int rw = 0; rw < p.stride_w; ++rw) {
      const WgmmaPhaseTaps& taps = tables[rh * p.stride_w + rw];
      int max_h = INT32_MIN, max_w = INT32_MIN, min_h = INT32_MAX, min_w = INT32_MAX;
      for (int t = 0; t < kWgmmaTaps; ++t) {
        const int kh = taps.tap[t] / int(p.kernel_w), kw = taps.tap[t] % int(p.kernel_w);
        ++seen[size_t(taps.tap[t])];
        pairs += check_axis(p.in_h, p.out_h(), p.stride_h, p.pad_h, p.dil_h, rh, kh, taps.off_h[t], what + " rows");
        pairs += check_axis(p.in_w, p.out_w(), p.stride_w, p.pad_w, p.dil_w, rw, kw, taps.off_w[t], what + " cols");
        max_h = std::max(max_h, taps.off_h[t]), min_h = std::min(min_h, taps.off_h[t]);
        max_w = std::max(max_w, taps.off_w[t]), min_w = std::min(min_w, taps.off_w[t]);
      }
      CHECK_MSG(taps.max_h == max_h && taps.max_w == max_w && max_h - min_h == 1 && max_w - min_w == 1,
                what + ": phase offsets");
    }
  for (int count : seen) CHECK_MSG(count == 1, what + ": a kernel tap in other than one phase");
  return pairs;
}

// grad_input's windows: tile row block i0 ... i0 + rows - 1 reads G rows [i0 - max_h, i0 - max_h + rows]; every
// tap's G row of each of its input rows lies there (and columns likewise, for tiles of whole rows). Tiles: wide (8
// rows of 64 columns) or narrow (8 rows of 32).
void check_input_windows(const ConvTransposeParams& p, const fused_convt::InputWgmmaPlan& plan) {
  const std::string what = test::describe(p) + ": grad_input window";
  const int rows = plan.narrow ? fused_convt::InputWgmmaGeometry<4, true>::kRows
                               : fused_convt::InputWgmmaGeometry<4, false>::kRows;
  const int cols = plan.narrow ? 32 : 64;
  CHECK_MSG(rows == 8, what + " rows per tile");
  CHECK_MSG(plan.row_tiles * rows >= p.in_h && (plan.row_tiles - 1) * rows < p.in_h, what + " row tiles");
  CHECK_MSG(plan.col_tiles * cols == p.in_w, what + " column tiles");
  CHECK_MSG(plan.ic_tiles * (plan.narrow ? 32 : 64) == p.in_channels, what + " channel tiles");
  for (int phase = 0; phase < plan.phases; ++phase) {
    const WgmmaPhaseTaps& taps = plan.taps[phase];
    for (int t = 0; t < kWgmmaTaps; ++t)
      for (int i = 0; i < p.in_h; ++i) {
        const int i0 = i / rows * rows, row = i - taps.off_h[t] - (i0 - taps.max_h);
        CHECK_MSG(row >= 0 && row <= rows, what + " rows");
      }
  }
}

}  // namespace

int main() {
  test::Rng rng(20261127);
  int64_t pairs = 0;
  int accepted = 0, input_planned = 0, weight_planned = 0, narrow_planned = 0, two_row_planned = 0,
      two_row_planned16 = 0, input_narrow_planned = 0;
  for (int it = 0; it < 600; ++it) {
    ConvTransposeParams p;
    p.batch = rng.integer(0, 3);
    p.groups = it % 7 == 6 ? 2 : 1;
    p.in_channels = 64 * rng.integer(1, 2) * p.groups, p.out_channels = (it % 5 == 4 ? 48 : 64) * rng.integer(1, 2);
    if (it % 13 == 12) p.out_channels = 16;  // grad_weight's narrow tiles
    p.out_channels *= p.groups;
    p.in_h = rng.integer(1, 20), p.in_w = 32 * rng.integer(1, 4);
    if (it % 17 == 16) p.in_w = 16;  // rows of half a float chunk
    p.stride_h = rng.integer(1, 3), p.stride_w = rng.integer(1, 3);
    // Mostly kernel = 2 x stride (the shape the tables take), sometimes not.
    p.kernel_h = it % 9 == 8 ? rng.integer(1, 5) : 2 * p.stride_h;
    p.kernel_w = it % 11 == 10 ? rng.integer(1, 5) : 2 * p.stride_w;
    p.pad_h = rng.integer(0, p.kernel_h - 1), p.pad_w = rng.integer(0, p.kernel_w - 1);
    p.out_pad_h = rng.integer(0, p.stride_h - 1), p.out_pad_w = rng.integer(0, p.stride_w - 1);
    if (p.out_h() <= 0 || p.out_w() <= 0) continue;
    WgmmaPhaseTaps tables[fused_convt::kWgmmaMaxPhases];
    const bool four_taps = p.kernel_h == 2 * p.stride_h && p.kernel_w == 2 * p.stride_w;
    const bool fits = four_taps && p.stride_h * p.stride_w <= fused_convt::kWgmmaMaxPhases;
    const bool taken = fused_convt::wgmma_phase_tables(p, tables);
    // Kernel = 2 x stride at dilation 1 gives every phase 2 x 2 taps one row and column apart; the tables refuse
    // only more than four phases, or an empty phase (output_padding and padding can leave one without pixels).
    bool empty_phase = false;
    for (int r = 0; r < p.stride_h; ++r) empty_phase |= fused_convt::phase_span(p.out_h(), p.stride_h, p.pad_h, r).extent == 0;
    for (int r = 0; r < p.stride_w; ++r) empty_phase |= fused_convt::phase_span(p.out_w(), p.stride_w, p.pad_w, r).extent == 0;
    if (fits && !empty_phase) CHECK_MSG(taken, "tables refused " + test::describe(p));
    if (!four_taps) CHECK_MSG(!taken, "tables taken " + test::describe(p));
    if (!taken) continue;
    ++accepted;
    pairs += check_tables(p, tables);
    fused_convt::InputWgmmaPlan input{};
    // Wide tiles (output channels of whole float chunks, rows of 64s) or narrow ones (16 output channels, rows of
    // 32s).
    const bool input_wide = p.out_channels % 32 == 0 && p.in_w % 64 == 0;
    const bool input_narrow = p.out_channels == 16 && p.in_w % 32 == 0;
    const bool input_shape = p.groups == 1 && (input_wide || input_narrow) && p.batch > 0;
    CHECK_MSG(fused_convt::plan_input_wgmma_shape(p, 4, &input) == input_shape, "grad_input plan " + test::describe(p));
    if (input_shape) {
      ++input_planned, input_narrow_planned += input_narrow;
      CHECK_MSG(input.narrow == input_narrow && input.oc_chunks == (input_narrow ? 1 : p.out_channels / 32),
                "grad_input tiles " + test::describe(p));
      check_input_windows(p, input);
    }
    fused_convt::WgmmaWeightPlan weight{};
    const bool narrow = p.out_channels == 16;
    // Chunks of 32 float pixels: one row where the rows are of whole chunks, two rows of 16 (narrow tiles, even
    // heights).
    const bool tiles = p.groups == 1 && (narrow || p.out_channels == 64 || p.out_channels % 128 == 0) && p.batch > 0;
    const int rows = p.in_w % 32 == 0 ? 1 : narrow && p.in_w == 16 && p.in_h % 2 == 0 ? 2 : 0;
    const bool weight_shape = tiles && rows > 0;
    CHECK_MSG(fused_convt::plan_weight_wgmma_shape(p, 4, &weight) == weight_shape, "grad_weight plan " + test::describe(p));
    if (weight_shape) {
      ++weight_planned, narrow_planned += narrow, two_row_planned += rows == 2;
      CHECK_MSG(weight.narrow == narrow && weight.rows == rows &&
                    weight.warpgroups == (narrow || p.out_channels == 64 ? 1 : 2) &&
                    weight.ic_tiles == p.in_channels / (narrow ? 32 : 64),
                "grad_weight tiles " + test::describe(p));
      const int64_t chunks = p.batch * p.in_h * p.in_w / 32;
      CHECK_MSG(weight.splits * weight.chunks_per_split >= chunks &&
                    (weight.splits - 1) * weight.chunks_per_split < chunks,
                "grad_weight splits " + test::describe(p));
    }
    // 16-bit chunks of 64 pixels: one row, or two rows of 32 (wide tiles too).
    const int rows16 = p.in_w % 64 == 0 ? 1 : p.in_w == 32 && p.in_h % 2 == 0 ? 2 : 0;
    CHECK_MSG(fused_convt::plan_weight_wgmma_shape(p, 2, &weight) == (tiles && rows16 > 0),
              "grad_weight plan (16-bit) " + test::describe(p));
    if (tiles && rows16 > 0) {
      CHECK_MSG(weight.rows == rows16 && weight.narrow == narrow, "grad_weight rows (16-bit) " + test::describe(p));
      two_row_planned16 += rows16 == 2 && !narrow;
    }
  }
  CHECK_MSG(accepted > 150 && input_planned > 40 && weight_planned > 40 && narrow_planned > 3 && two_row_planned > 0 &&
                two_row_planned16 > 5 && input_narrow_planned > 3,
            "too few problems planned: " + std::to_string(accepted) + " / " + std::to_string(input_planned) + " / " +
                std::to_string(weight_planned));

  // kb_v1 (N128 Cin64 Cout128 64x64 k4 s2): both kernels, 8-row tiles of one 64-column tile, 4 TF32 / 2 16-bit
  // channel chunks; four phases whose largest offsets are 0 (the boxes start at the tile's own pixel).
  ConvTransposeParams kb = test::make_params(128, 64, 128, 64, 64, 1);
  kb.kernel_h = kb.kernel_w = 4, kb.stride_h = kb.stride_w = 2;
  fused_convt::InputWgmmaPlan input{};
  CHECK_MSG(fused_convt::plan_input_wgmma_shape(kb, 4, &input) && input.phases == 4 && input.row_tiles == 8 &&
                input.col_tiles == 1 && input.ic_tiles == 1 && input.oc_chunks == 4,
            "kb_v1 grad_input plan (TF32)");
  for (int phase = 0; phase < 4; ++phase)
    CHECK_MSG(input.taps[phase].max_h == 0 && input.taps[phase].max_w == 0, "kb_v1 largest offsets");
  CHECK_MSG(fused_convt::plan_input_wgmma_shape(kb, 2, &input) && input.oc_chunks == 2, "kb_v1 grad_input plan (16-bit)");
  fused_convt::WgmmaWeightPlan weight{};
  CHECK_MSG(fused_convt::plan_weight_wgmma_shape(kb, 4, &weight) && weight.warpgroups == 2 && weight.splits == 32,
            "kb_v1 grad_weight plan");
  // kb_v0 (Cin32 Cout16, rows of 32): grad_weight's narrow tiles, in TF32 chunks of one row, 64 splits of 64 rows;
  // in 16-bit chunks of two rows, 64 splits of 32 chunks; grad_input's narrow tiles (4 row tiles of 8 rows, one
  // column tile, one channel tile, one chunk per phase). An odd height leaves 16-bit grad_weight to the mma.sync
  // GEMM.
  ConvTransposeParams kb0 = test::make_params(128, 32, 16, 32, 32, 1);
  kb0.kernel_h = kb0.kernel_w = 4, kb0.stride_h = kb0.stride_w = 2;
  CHECK_MSG(fused_convt::plan_weight_wgmma_shape(kb0, 4, &weight) && weight.narrow && weight.rows == 1 &&
                weight.ic_tiles == 1 && weight.splits == 64 && weight.chunks_per_split == 64,
            "kb_v0 grad_weight plan (TF32)");
  CHECK_MSG(fused_convt::plan_weight_wgmma_shape(kb0, 2, &weight) && weight.narrow && weight.rows == 2 &&
                weight.splits == 64 && weight.chunks_per_split == 32,
            "kb_v0 grad_weight plan (16-bit)");
  for (int bytes : {4, 2})
    CHECK_MSG(fused_convt::plan_input_wgmma_shape(kb0, bytes, &input) && input.narrow && input.row_tiles == 4 &&
                  input.col_tiles == 1 && input.ic_tiles == 1 && input.oc_chunks == 1 && input.phases == 4,
              "kb_v0 grad_input plan (" + std::to_string(bytes) + "-byte operands)");
  // Narrow stages (9 G rows x 33 columns and 4 taps x 32 channels, in rows of the 16 channels' bytes): one per phase,
  // in two blocks per SM.
  using Narrow = fused_convt::InputWgmmaGeometry<4, true>;
  using Narrow16 = fused_convt::InputWgmmaGeometry<2, true>;
  CHECK_MSG(Narrow::kRowBytes == 64 && Narrow::kSteps == 2 && Narrow16::kRowBytes == 32 && Narrow16::kSteps == 1 &&
                Narrow::kStages == 4 && Narrow16::kStages == 4 &&
                2 * (Narrow::kSmemBytes + 1024) <= fused_convt::kSm90SmSmem,
            "narrow grad_input stages");
  kb0.in_h = 31;
  CHECK_MSG(!fused_convt::plan_weight_wgmma_shape(kb0, 2, &weight),
            "grad_weight planned (16-bit, rows of 32, odd height)");
  std::printf("test_wgmma_plan: %lld (input pixel, tap) pairs on %d accepted problems (%d grad_input, %d grad_weight, "
              "%d of them narrow, %d of two-row chunks; 16-bit: %d wide of two-row chunks; %d narrow grad_input)\n",
              (long long)pairs, accepted, input_planned, weight_planned, narrow_planned, two_row_planned,
              two_row_planned16, input_narrow_planned);
  return test::summary("test_wgmma_plan");
}
