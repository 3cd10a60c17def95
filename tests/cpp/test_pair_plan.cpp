// The column-pair forward's plan (cuda/pair_problem.h, plain C++) against the transposed convolution's own
// index math, on random problems: for every output pixel of every phase and every tap, the padded pixel that
// the kernel reads (grid pixel + the tap's shift) must be the tap's input pixel, inside its tile's patch and
// its padded row (a shift that wrapped into the next row would read a real pixel where PyTorch reads
// nothing), every tap that reaches the pixel must be one of the phase's taps, and its input row offset one of
// its set's weight slots (row_offsets: both row phases of a tile at stride_h 2). Also the kb_v1 plan's
// numbers and the problems the plan must refuse. And the kernel's division by a launch constant (divider.h)
// against the division.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "pair_problem.h"
#include "test_util.h"

namespace {

using fused_convt::ConvTransposeParams;
using fused_convt::kPairTileM;
using fused_convt::pair_axis_taps;
using fused_convt::PairAxisTaps;
using fused_convt::PairProblem;

// Checks one planned problem exhaustively; returns the number of (output pixel, tap) pairs checked.
int64_t check_plan(const PairProblem& pr, const std::string& what) {
  int64_t checked = 0;
  CHECK_MSG(pr.smem_bytes(pr.warpgroups) <= fused_convt::kSm90BlockSmem, what + ": shared memory over the limit");
  CHECK_MSG(pr.plane_len >= (pr.tiles - 1) * kPairTileM + pr.shift_min + pr.patch, what + ": last patch past the plane");
  CHECK_MSG(pr.shift_min >= 0, what + ": a patch starts before its plane");
  CHECK_MSG(pr.chunks >= 1 && pr.chunk_planes() * pr.chunks == pr.planes() && pr.chunk_planes() % 2 == 0,
            what + ": K chunks of an even number of planes");
  CHECK_MSG(pr.buffer_bytes() >= pr.stage_bytes() && pr.buffer_bytes() >= pr.chunk_planes() * pr.plane_bytes(),
            what + ": a buffer holds a chunk and the staged outputs");
  CHECK_MSG(pr.buffer_bytes() >= pr.nchw_stage_bytes(), what + ": a buffer holds grad_factor's NCHW staging");
  for (int t = 0; t < pr.batch * pr.tiles; ++t)
    CHECK_MSG(pr.by_tiles.quotient(t) == t / pr.tiles, what + ": the tile divider");
  const bool both_allowed = pr.stride_h == 2 && pr.k_parts == 1 && !pr.channels_last_out;
  CHECK_MSG((pr.row_phases == 1 || (pr.row_phases == 2 && both_allowed)) &&
                pr.channel_tile() * pr.row_phases == pr.n_tile && pr.channel_tile() % 8 == 0 &&
                pr.sets == pr.groups * pr.row_groups() * pr.channel_tiles(),
            what + ": row phases per tile and sets");
  for (int ph = 0; ph < pr.stride_h; ++ph) {
    const PairAxisTaps th = pair_axis_taps(ph, pr.kernel_h, pr.stride_h, pr.pad_h);
    const PairAxisTaps slot_rows = pr.row_offsets(ph / pr.row_phases);
    CHECK_MSG(slot_rows.count * pr.col_taps <= pr.max_taps && slot_rows.count <= pr.max_axis_taps,
              what + ": the set's weight slots");
    // Every kh that reaches rows of this phase is one of its taps.
    int reaching = 0;
    for (int kh = 0; kh < pr.kernel_h; ++kh) reaching += (ph + pr.pad_h - kh) % pr.stride_h == 0;
    CHECK_MSG(reaching == th.count, what + ": row phase " + std::to_string(ph) + " tap count");
    for (int pw = 0; pw < 2; ++pw) {
      const PairAxisTaps tw = pair_axis_taps(pw, pr.kernel_w, 2, pr.pad_w);
      for (int l = 0; l < pr.tiles * kPairTileM; ++l) {
        const int i = l / pr.plane_w, j = l % pr.plane_w, oh = pr.stride_h * i + ph, ow = 2 * j + pw;
        CHECK_MSG(pr.by_plane_w.quotient(l) == i, what + ": the row divider");
        if (i >= pr.rows || j >= pr.out_cols || oh >= pr.out_h || ow >= pr.out_w) continue;
        const int l0 = l / kPairTileM * kPairTileM;
        for (int a = 0; a < th.count; ++a)
          for (int b = 0; b < tw.count; ++b) {
            const int kh = th.k0 + pr.stride_h * a, kw = tw.k0 + 2 * b;
            const int num_h = oh + pr.pad_h - kh, num_w = ow + pr.pad_w - kw;
            CHECK_MSG(num_h % pr.stride_h == 0 && num_w % 2 == 0, what + ": a tap off its phase");
            const int ih = num_h / pr.stride_h, iw = num_w / 2;
            CHECK_MSG(ih == i + th.q - a && iw == j + tw.q - b, what + ": tap offset");
            const int row = ih + pr.pad_top, col = iw + pr.pad_left;
            CHECK_MSG(row >= 0 && col >= 0 && col < pr.plane_w, what + ": tap outside its padded row");
            CHECK_MSG(tw.q - b <= pr.col_hi && tw.q - b > pr.col_hi - pr.col_taps,
                      what + ": column offset outside the slots");
            CHECK_MSG(th.q - a <= slot_rows.q && th.q - a > slot_rows.q - slot_rows.count,
                      what + ": row offset outside the slots");
            const int padded = l + pr.shift(th.q - a, tw.q - b);
            CHECK_MSG(padded == row * pr.plane_w + col, what + ": shift is not the tap's padded pixel");
            CHECK_MSG(padded - (l0 + pr.shift_min) >= 0 && padded - (l0 + pr.shift_min) < pr.patch,
                      what + ": tap outside its tile's patch");
            ++checked;
          }
      }
    }
  }
  return checked;
}

// Divider against / and % for every divisor up to 3000 and powers of two, on dividends from 0 to 2^31 - 1.
void check_divider(test::Rng& rng) {
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 3000; ++d) divisors.push_back(d);
  for (int e = 12; e < 31; ++e) divisors.insert(divisors.end(), {(1u << e) - 1, 1u << e, (1u << e) + 1});
  divisors.push_back(0x7fffffffu);
  for (const uint32_t d : divisors) {
    const fused_convt::Divider div(d);
    std::vector<int> dividends = {0, 1, int(d - 1), int(std::min<uint32_t>(d, 0x7fffffffu)), 0x7fffffff, 0x7ffffffe};
    for (int k = 0; k < 40; ++k) dividends.push_back(int(rng.integer(0, 0x7fffffff)));
    for (int k = 1; k < 20; ++k) dividends.push_back(int(std::min<int64_t>(int64_t(d) * k * 997 - 1, 0x7fffffff)));
    for (const int n : dividends) {
      if (n < 0) continue;
      const int q = div.quotient(n);
      CHECK_MSG(q == int(uint32_t(n) / d) && div.remainder(n, q) == int(uint32_t(n) % d),
                "Divider(" + std::to_string(d) + ") of " + std::to_string(n) + " gives " + std::to_string(q));
    }
  }
}

}  // namespace

int main() {
  test::Rng rng(20261126);
  check_divider(rng);
  int64_t pairs = 0;
  int planned = 0, planned_exact = 0, planned_two = 0, planned_rows = 0;
  auto describe_two = [](const ConvTransposeParams& p) { return test::describe(p) + ": two blocks per SM"; };
  for (int it = 0; it < 400; ++it) {
    ConvTransposeParams p;
    p.batch = rng.integer(1, 3);
    p.groups = rng.integer(1, 3);
    p.in_channels = p.groups * 16 * rng.integer(1, 4);
    p.out_channels = p.groups * 16 * rng.integer(1, 4);
    p.in_h = rng.integer(1, 20), p.in_w = rng.integer(1, 20);
    p.kernel_h = rng.integer(1, 6), p.kernel_w = rng.integer(1, 6);
    p.stride_h = rng.integer(1, 3), p.stride_w = 2;
    p.pad_h = rng.integer(0, p.kernel_h - 1), p.pad_w = rng.integer(0, p.kernel_w - 1);
    p.out_pad_h = rng.integer(0, p.stride_h - 1), p.out_pad_w = rng.integer(0, 1);
    if (p.out_h() <= 0 || p.out_w() <= 0) continue;
    PairProblem pr;
    if (!fused_convt::plan_pair_forward(p, it % 3 == 2 ? 4 : 2, 132, it % 2 == 1, &pr, 1, it % 5 != 0)) {
      // Refused only for more than the kernel's unrolled three row taps or input column offsets (those of
      // both column phases: kw reaches phase pw at offset (pw + pad_w - kw) / 2 where that divides).
      int dw_lo = 1 << 20, dw_hi = -(1 << 20);
      for (int pw = 0; pw < 2; ++pw)
        for (int kw = 0; kw < p.kernel_w; ++kw)
          if ((pw + p.pad_w - kw) % 2 == 0) {
            const int dw = int(pw + p.pad_w - kw) / 2;
            dw_lo = std::min(dw_lo, dw), dw_hi = std::max(dw_hi, dw);
          }
      const bool many_taps = (p.kernel_h + p.stride_h - 1) / p.stride_h > 3 || dw_hi - dw_lo + 1 > 3;
      CHECK_MSG(many_taps, "refused " + test::describe(p));
      continue;
    }
    ++planned;
    planned_rows += pr.row_phases == 2;
    CHECK_MSG(it % 5 != 0 || pr.row_phases == 1, test::describe(p) + ": both row phases where not asked for");
    pairs += check_plan(pr, test::describe(p));
    // Two blocks of three warpgroups per SM (16-channel tiles, inference), where both blocks' shared memory fits.
    PairProblem two = pr;
    if (two.two_blocks_per_sm(132)) {
      ++planned_two;
      CHECK_MSG(two.n_tile == 16 && two.warpgroups == 3 && two.blocks_per_sm == 2 &&
                    2 * (two.smem_bytes(3) + 1024) <= fused_convt::kSm90SmSmem && two.grid <= 264 &&
                    (two.sets > 264 || two.grid == two.blocks_per_set * two.sets),
                describe_two(p));
    } else {
      CHECK_MSG(two.blocks_per_sm == 1 && two.warpgroups == pr.warpgroups && two.grid == pr.grid, describe_two(p));
    }
    // Exact float takes the same geometry with three parts of K per channel, where its weights fit.
    if (it % 3 == 2 && fused_convt::plan_pair_forward(p, 4, 132, it % 2 == 1, &pr, 3)) {
      ++planned_exact;
      // launch_pair_forward compiles exact float's kernels (kParts 3) for these tiles only.
      CHECK_MSG(pr.n_tile == 16 && pr.row_phases == 1,
                test::describe(p) + " exact: not a 16-channel, one-row-phase tile");
      pairs += check_plan(pr, test::describe(p) + " exact");
    }
  }
  CHECK_MSG(planned > 100, "too few random problems planned: " + std::to_string(planned));
  CHECK_MSG(planned_rows > 25,
            "too few random problems with both row phases per tile: " + std::to_string(planned_rows));
  CHECK_MSG(planned_two > 10, "too few random problems with two blocks per SM: " + std::to_string(planned_two));
  CHECK_MSG(planned_exact > 10, "too few random exact float problems planned: " + std::to_string(planned_exact));

  // kb_v1: N128 Cin64 Cout128 64x64 k4 s2 -> 130 x 130.
  ConvTransposeParams kb = test::make_params(128, 64, 128, 64, 64, 1);
  kb.kernel_h = kb.kernel_w = 4, kb.stride_h = kb.stride_w = 2;
  PairProblem pr;
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 2, 132, false, &pr), "kb_v1 not planned");
  CHECK_MSG(pr.plane_w == 66 && pr.pad_top == 1 && pr.pad_left == 1 && pr.rows == 65 && pr.out_cols == 65,
            "kb_v1 padded geometry");
  CHECK_MSG(pr.patch == 131 && pr.shift_min == 0 && pr.tiles == 68, "kb_v1 patch and tiles");
  // Both row phases in each tile: 2 x 32 channels per column phase, 4 channel tiles.
  CHECK_MSG(pr.n_tile == 64 && pr.row_phases == 2 && pr.channel_tile() == 32 && pr.sets == 4 && pr.warpgroups == 4,
            "kb_v1 sets and warpgroups");
  // Both column phases read input column offsets -1 and 0, both row phases row offsets -1 and 0: 2 x 2 slots.
  CHECK_MSG(pr.col_hi == 0 && pr.col_taps == 2 && pr.max_taps == 4 && pr.weight_bytes() == 64 * 1024, "kb_v1 slots");
  CHECK_MSG(pr.blocks_per_set == 33 && pr.grid == 132, "kb_v1 grid");
  CHECK_MSG(!pr.two_blocks_per_sm(132) && pr.warpgroups == 4 && pr.grid == 132, "kb_v1: 64-channel tiles, one block");
  pairs += check_plan(pr, "kb_v1");
  CHECK_MSG(pr.elem_bytes == 2 && pr.planes() == 8 && pr.chunks == 1, "kb_v1 16-bit planes and chunks");
  // kb_v1 in float (TF32): 2 x 16-channel tiles (a 64 KB weight set), so sets = 8 channel tiles, and
  // four warpgroups with each patch in two K chunks (whole patches of 16 planes, 33.5 KB, would fit two).
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 4, 132, false, &pr), "kb_v1 float not planned");
  CHECK_MSG(pr.n_tile == 32 && pr.planes() == 16 && pr.weight_bytes() == 64 * 1024 && pr.sets == 8, "kb_v1 float sets");
  CHECK_MSG(pr.warpgroups == 4 && pr.chunks == 2 && pr.blocks_per_set == 16 && pr.grid == 128, "kb_v1 float grid");
  pairs += check_plan(pr, "kb_v1 float");
  // Exact float (3xTF32) only where TF32's tiles are 16 channels too (kb_v1's would be 32: not planned).
  CHECK_MSG(!fused_convt::plan_pair_forward(kb, 4, 132, false, &pr, 3), "kb_v1 exact float planned");
  CHECK_MSG(!fused_convt::plan_pair_forward(kb, 2, 132, false, &pr, 3), "exact parts planned for a 16-bit type");

  // The lockstep (pair_lockstep) with an H100's 50 MB L2: kb_v1 keeps it for bf16 (0.55 GB stored) and every
  // training forward, not for float inference; kb_v0 (N128 Cin32 Cout16 32x32: 17.8 MB of bf16 outputs) only for
  // the float training forward (outputs and float16 factor, 53.5 MB).
  const int64_t l2 = 50 << 20;
  // Both row phases per tile (pair_both_row_phases): every 16-bit forward (kb_v1's 0.55 GB, kb_v0's 18 MB) and the
  // float training forward whose stores outgrow L2 (kb_v1 and kb_v0: 53.5 MB); not float inference, nor a float
  // training forward that fits L2 (kb_v0 at batch 64); NHWC outputs never (plan_pair_forward, below).
  const int64_t kb_outputs = 128LL * 128 * 130 * 130, kb_v0_outputs = 128LL * 16 * 66 * 66;
  CHECK_MSG(fused_convt::pair_both_row_phases(2, false, kb_outputs * 2, l2) &&
                fused_convt::pair_both_row_phases(2, false, kb_v0_outputs * 2, l2) &&
                fused_convt::pair_both_row_phases(4, true, kb_outputs * 6, l2) &&
                fused_convt::pair_both_row_phases(4, true, kb_v0_outputs * 6, l2) &&
                !fused_convt::pair_both_row_phases(4, true, kb_v0_outputs / 2 * 6, l2) &&
                !fused_convt::pair_both_row_phases(4, false, kb_outputs * 4, l2),
            "the rule for both row phases per tile");
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 2, 132, true, &pr) && pr.row_phases == 1, "kb_v1 NHWC: one row phase");
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 2, 132, false, &pr, 1, false) && pr.row_phases == 1 &&
                pr.n_tile == 64 && pr.channel_tile() == 64 && pr.sets == 4,
            "kb_v1 with one row phase per tile");
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 2, 132, false, &pr) && fused_convt::pair_lockstep(pr, 2, 0, l2) &&
                fused_convt::pair_lockstep(pr, 2, 2, l2) && fused_convt::pair_lockstep(pr, 0, 2, l2),
            "kb_v1 bf16 lockstep");
  CHECK_MSG(fused_convt::plan_pair_forward(kb, 4, 132, false, &pr) && !fused_convt::pair_lockstep(pr, 4, 0, l2) &&
                fused_convt::pair_lockstep(pr, 4, 2, l2) && fused_convt::pair_lockstep(pr, 0, 2, l2),
            "kb_v1 float lockstep");
  ConvTransposeParams kb0 = test::make_params(128, 32, 16, 32, 32, 1);
  kb0.kernel_h = kb0.kernel_w = 4, kb0.stride_h = kb0.stride_w = 2;
  CHECK_MSG(fused_convt::plan_pair_forward(kb0, 2, 132, false, &pr) && !fused_convt::pair_lockstep(pr, 2, 0, l2) &&
                !fused_convt::pair_lockstep(pr, 2, 2, l2),
            "kb_v0 bf16 lockstep");
  CHECK_MSG(pr.two_blocks_per_sm(132) && pr.warpgroups == 3 && pr.blocks_per_set == 132 && pr.grid == 264,
            "kb_v0 bf16 inference: two blocks of three warpgroups per SM");
  pairs += check_plan(pr, "kb_v0 bf16, two blocks per SM");
  CHECK_MSG(fused_convt::plan_pair_forward(kb0, 4, 132, false, &pr) && !fused_convt::pair_lockstep(pr, 4, 0, l2) &&
                fused_convt::pair_lockstep(pr, 4, 2, l2) && !fused_convt::pair_lockstep(pr, 0, 2, l2),
            "kb_v0 float lockstep");
  // kb_v0 in exact float: three parts of K per input channel (24 planes: 8 of each), 16-channel tiles as in TF32, a
  // 48 KB weight set (three times TF32's).
  CHECK_MSG(fused_convt::plan_pair_forward(kb0, 4, 132, false, &pr, 3), "kb_v0 exact float not planned");
  CHECK_MSG(pr.k_parts == 3 && pr.n_tile == 16 && pr.channel_planes() == 8 && pr.planes() == 24 &&
                pr.weight_bytes() == 48 * 1024 && pr.padded_input_rows() == int64_t(128) * 24 * pr.plane_len &&
                pr.warpgroups == 4,
            "kb_v0 exact float plan");
  pairs += check_plan(pr, "kb_v0 exact float");

  // Refused: another column stride, dilation, channels per group not a multiple of 16, four taps per axis.
  ConvTransposeParams refused = kb;
  refused.stride_w = 3;
  CHECK_MSG(!fused_convt::plan_pair_forward(refused, 2, 132, false, &pr), "stride_w 3 planned");
  refused = kb, refused.dil_h = 2;
  CHECK_MSG(!fused_convt::plan_pair_forward(refused, 2, 132, false, &pr), "dilation planned");
  refused = kb, refused.in_channels = 72;
  CHECK_MSG(!fused_convt::plan_pair_forward(refused, 2, 132, false, &pr), "72 input channels planned (16-bit)");
  // Float (TF32) takes channels per group in multiples of 8: 72 is nine planes of 4 channels twice.
  CHECK_MSG(fused_convt::plan_pair_forward(refused, 4, 132, false, &pr) && pr.planes() == 18,
            "72 input channels refused (float)");
  pairs += check_plan(pr, "kb_v1 float, 72 input channels");
  refused = kb, refused.in_channels = 36;
  CHECK_MSG(!fused_convt::plan_pair_forward(refused, 4, 132, false, &pr), "36 input channels planned (float)");
  refused = kb, refused.kernel_w = 8;
  CHECK_MSG(!fused_convt::plan_pair_forward(refused, 2, 132, false, &pr), "kernel_w 8 planned");
  std::printf("test_pair_plan: %lld (output pixel, tap) pairs on %d planned problems (and %d exact float)\n",
              (long long)pairs, planned, planned_exact);
  return test::summary("test_pair_plan");
}
