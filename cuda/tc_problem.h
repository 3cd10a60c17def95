// The tensor-core path's problem description and its host-side planning: the tile and staging constants,
// one TcPhase per stride-1 sub-problem, and the builders that decide whether a forward or grad_input problem
// takes the implicit-GEMM kernel (implicit_gemm_conv.cuh) and size its shared-memory patch exactly. Plain
// C++ (no CUDA), so the planner is tested on any machine (tests/cpp/test_tc_plan.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "fused_convt/params.h"
#include "fused_convt/tap_map.h"

namespace fused_convt {

constexpr int kTcBlockM = 256;
constexpr int kTcWarps = 8;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kTcChunk = 16;            // input channels per pipeline stage
constexpr int kTcMaxAxisTaps = 8;
constexpr int kTcMaxPhases = 16;
constexpr int kTcPixelsPerThread = 2;   // patch pixels each thread stages: the patch holds <= 512 pixels
constexpr int kTcMaxPatchPixels = kTcPixelsPerThread * kTcThreads;

// Staged rows of kTcChunk values (patch pixels and weight rows: 32 bytes for 16-bit operands, 64 for float)
// lie dense in shared memory, the 16-byte pieces of row r permuted by an XOR with bits of r: bit 2 of r for
// 32-byte rows, bits 1-2 for 64-byte rows (the Tensor Memory Accelerator's 32- and 64-byte swizzles, which
// take the same bits of the byte offset). ldmatrix's eight row addresses of consecutive rows, from any
// first row, then fall in eight distinct 16-byte bank groups, as the 16-byte padding of each row did
// before; but a warp's copies now fill whole 128-byte lines (padded rows spread 32 pieces over 6 lines
// for 16-bit rows). The permutation repeats every 8 rows.
FCT_HD constexpr int tc_stage_swizzle(int row, int row_bytes) { return ((row * row_bytes) >> 3) & (row_bytes - 16); }
FCT_HD constexpr int tc_stage_offset(int row, int piece, int row_bytes) {
  return row * row_bytes + ((piece * 16) ^ tc_stage_swizzle(row, row_bytes));
}

// Floats per pixel row of the epilogue's staged accumulators ([pixel][min(BN, 32) columns, + 4]): each
// thread reads its pixel's columns four at a time (one 16-byte load per four outputs; a column-major tile
// took a load per output), and the + 4 puts the eight rows of a quarter-warp's 16-byte loads in distinct
// bank groups. Within a row the four-column groups are permuted (tc_epilogue_slot) so that the fragment
// writes (8-byte, columns 2t and 2t + 1 of rows g) are conflict-free too: in natural order they were 2-way
// (twice the shared-memory wavefronts of the writes; bf16 kb_v1 1.005 -> 1.037 ms on the H100).
template <int BN>
constexpr int tc_epilogue_stride() { return (BN < 32 ? BN : 32) + 4; }

// Position in a staged row of column c (of the part's `columns`): group c / 4 goes to slot
// c / 8 + (columns / 8) * ((c / 4) & 1), i.e. the first halves of the 8-column fragments, then the second
// halves, so that the rows g = 0..3 and half t / 2 of one write land on eight distinct 16-byte bank groups.
FCT_HD constexpr int tc_epilogue_slot(int c, int columns) {
  return ((c >> 3) + (columns >> 3) * ((c >> 2) & 1)) * 4 + (c & 3);
}

// The staged tile of an epilogue cluster of S blocks (tc_epilogue_cluster, S = 2 or 4): block r receives from
// every block of the cluster the part's columns [r * share, (r + 1) * share), share = columns / S, in rows of
// the cluster's output-row order (row m * S + slot for phase pixel m of the phase whose first output column
// is slot), share + 4 floats apart: a quarter-warp's 16-byte reads of eight consecutive rows fall in distinct
// bank groups, and at S = 2 the fragment writes (rows g * S, 8-byte columns 2t) are conflict-free too. A
// share of four (S = 4, 16 columns) packs its rows: + 4 would put every other row in the same bank group.
constexpr int kTcMaxEpilogueCluster = 4;
FCT_HD constexpr int tc_cluster_stride(int columns, int cluster) {
  return columns / cluster < 8 ? columns / cluster : columns / cluster + 4;
}

// Floats of the staged tile under either layout.
template <int BN>
constexpr int tc_epilogue_tile_floats() {
  constexpr int columns = BN < 32 ? BN : 32, cluster_floats = columns + 4 * kTcMaxEpilogueCluster;
  return kTcBlockM * (tc_epilogue_stride<BN>() > cluster_floats ? tc_epilogue_stride<BN>() : cluster_floats);
}

// One stride-1 sub-problem. Phase pixel (a, b) is the destination (first_h + a*dst_step_h, first_w + b*...)
// and its tap (th, tw) reads source sample (a + off_h[th], b + off_w[tw]) of the source grid sampled as
// (sample*src_step + src_offset): the forward pass reads the input directly (step 1, offset 0), one output
// phase per block; grad_input reads the stride phases of grad_output (step s, offset r), all with the same
// destination, and each block sums them in registers.
struct TcPhase {
  int first_h, first_w, extent_h, extent_w;
  int src_offset_h, src_offset_w;
  int taps_h, taps_w;
  int kh[kTcMaxAxisTaps], kw[kTcMaxAxisTaps];
  int off_h[kTcMaxAxisTaps], off_w[kTcMaxAxisTaps];
};

struct TcProblem {
  int64_t batch;
  int groups;
  int dst_channels, dst_h, dst_w, dst_per_group;
  int dst_channels_last;  // dst is NHWC (a channels_last forward output); else NCHW. dst_factor: NCHW always
  int epilogue_cluster;   // blocks that store their column phases together (tc_epilogue_cluster); 1: none
  int src_channels, src_h, src_w, src_per_group, src_padded;
  int kernel_w, kernel_taps;
  int dst_step_h, dst_step_w;
  int src_step_h, src_step_w;
  int phases, m_tiles, n_tiles;
  int max_taps, max_patch_pixels;      // over all phases: sizes of the staging buffers
  int patch_box_w, patch_box_h;        // over all phases and tiles: the widest patch row, the most rows
  int stage_patch_bytes, stage_bytes;  // shared-memory layout, set by the launcher
  TcPhase phase[kTcMaxPhases];
  // grad_input reading the g pass's phase-split copy (grad_input_copy_layout): each source phase's plane there
  // (its first pixel row and extents; sample (a, b) is its pixel (a, b)). Unused otherwise. (Behind the
  // phases, so that the other kernels' parameter layout is unchanged.)
  int64_t copy_first_row[kTcMaxPhases];
  int copy_extent_h[kTcMaxPhases], copy_extent_w[kTcMaxPhases];
  // Where every plane of the copy has the same extents (each output axis a multiple of its stride) the copy is
  // a regular [plane][image][copy_plane_h][copy_plane_w][row] tensor, which one TMA map describes: each source's
  // plane index there. copy_planes: their count, 0 where the extents differ.
  int copy_plane[kTcMaxPhases];
  int copy_planes, copy_plane_h, copy_plane_w;
};

// The phases of one axis of the forward pass (PhaseSpan in tap_map.h) with their taps: kernel index k and
// input shift, so that phase pixel a reads input a + offset. Phases without outputs are left out.
struct AxisPhase {
  int first, extent, taps;
  int kernel_index[kTcMaxAxisTaps], offset[kTcMaxAxisTaps];
};

// Returns false when an axis phase has more taps than the fast path holds.
inline bool forward_axis_phases(int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                                int64_t dilation, AxisPhase* phases, int* count) {
  *count = 0;
  for (int64_t r = 0; r < stride; ++r) {
    const PhaseSpan span = phase_span(out, stride, pad, r);
    if (span.extent == 0) continue;
    AxisPhase ph{};
    ph.first = span.first;
    ph.extent = span.extent;
    for (int64_t k = 0; k < kernel; ++k) {
      if (phase_of_tap(k, stride, dilation) != r) continue;
      if (ph.taps == kTcMaxAxisTaps) return false;
      ph.kernel_index[ph.taps] = int(k);
      ph.offset[ph.taps] = phase_tap_offset(span, k, stride, dilation, r);
      ++ph.taps;
    }
    phases[(*count)++] = ph;
  }
  return true;
}

inline int span_of(const int* offsets, int n) {
  if (n == 0) return 0;
  int lo = offsets[0], hi = offsets[0];
  for (int i = 1; i < n; ++i) { lo = std::min(lo, offsets[i]); hi = std::max(hi, offsets[i]); }
  return hi - lo;
}

// The first and last phase row of the tile of kTcBlockM consecutive pixels from m0, in a grid of `count`
// pixels with rows of `extent_w` (the last tile may be partial): the kernel's patch geometry and the planner's
// bound below both come from it. I: int in the kernel, int64_t on the host.
struct TileRows {
  int first, last;
};
template <typename I>
FCT_HD TileRows tile_rows(I m0, I count, I extent_w) {
  return {int(m0 / extent_w), int((std::min<I>(m0 + kTcBlockM, count) - 1) / extent_w)};
}

// The most phase rows a tile of kTcBlockM consecutive phase pixels spans (the kernel's patch_of), over the
// tiles of an extent_h x extent_w grid. A tile's start modulo the width repeats after at most extent_w tiles,
// and the last tile may be partial, so those tiles cover every case. Exact rather than the worst case over
// all starts: the bound decides whether a shape takes this path (k5 s1 at 36 x 36 outputs: 13 -> 12 rows
// with 40 columns, under kTcMaxPatchPixels; it fell back to the direct kernel at 2x eager's time).
inline int max_tile_rows(int extent_h, int extent_w) {
  const int64_t count = int64_t(extent_h) * extent_w;
  const int64_t tiles = (count + kTcBlockM - 1) / kTcBlockM;
  auto rows_of = [&](int64_t tile) {
    const TileRows rows = tile_rows<int64_t>(tile * kTcBlockM, count, extent_w);
    return rows.last - rows.first + 1;
  };
  int rows = tiles > 0 ? rows_of(tiles - 1) : 0;
  for (int64_t tile = 0; tile < std::min<int64_t>(tiles, extent_w); ++tile) rows = std::max(rows, rows_of(tile));
  return rows;
}

// Fills the tile counts and staging sizes from the phases; false if a tile's patch would not fit.
inline bool finish_tc_problem(TcProblem* pr) {
  int max_count = 0;
  pr->max_taps = pr->max_patch_pixels = pr->patch_box_w = pr->patch_box_h = 0;
  for (int i = 0; i < pr->phases; ++i) {
    const TcPhase& ph = pr->phase[i];
    max_count = std::max(max_count, ph.extent_h * ph.extent_w);
    pr->max_taps = std::max(pr->max_taps, ph.taps_h * ph.taps_w);
    const int64_t rows = int64_t(max_tile_rows(ph.extent_h, ph.extent_w)) + span_of(ph.off_h, ph.taps_h);
    const int64_t cols = int64_t(ph.extent_w - 1) + span_of(ph.off_w, ph.taps_w) + 1;
    if (rows * cols > kTcMaxPatchPixels) return false;
    // The kernel addresses inside one image (NCHW, or its channels-last source padded per group) and inside
    // one group's packed weight with 32-bit offsets.
    if (int64_t(pr->src_channels) * pr->src_h * pr->src_w > INT32_MAX ||
        int64_t(pr->groups) * pr->src_padded * pr->src_h * pr->src_w > INT32_MAX ||
        int64_t(pr->dst_channels) * pr->dst_h * pr->dst_w > INT32_MAX ||
        int64_t(pr->kernel_taps) * pr->dst_per_group * pr->src_padded > INT32_MAX)
      return false;
    pr->max_patch_pixels = std::max(pr->max_patch_pixels, int(rows * cols));
    pr->patch_box_w = std::max(pr->patch_box_w, int(cols));
    pr->patch_box_h = std::max(pr->patch_box_h, int(rows));
  }
  pr->m_tiles = (max_count + kTcBlockM - 1) / kTcBlockM;
  pr->epilogue_cluster = 1;  // the launcher's choice (tc_epilogue_cluster)
  return pr->phases > 0;
}

// Whether the forward's patches can come by TMA boxes of patch_box_w x patch_box_h pixels (one size for every
// phase and tile, each patch at the top left of its box): a box is at most 256 pixels along each axis.
inline bool tc_tma_box(const TcProblem& pr) {
  return pr.patch_box_w > 0 && pr.patch_box_w <= 256 && pr.patch_box_h > 0 && pr.patch_box_h <= 256;
}

// The forward's blocks each own one output phase, so an NCHW output row interleaves the s_w column phases of
// its row phase value by value, and each 32-byte sector is written in pieces by s_w blocks: where the pieces
// do not meet in L2, each becomes a DRAM read-modify-write (Nsight Compute, kb_v1 TF32 training forward with
// value and factor: 1.23 GB of DRAM reads for 0.13 GB of input, 3.07 GB written for 2.18). A cluster of those
// s_w blocks (consecutive in the grid: the phases are row-major) can instead exchange their staged tiles
// through distributed shared memory and each store whole runs of output rows for a share of the channels.
// That needs the column phases to tile every row identically: all s_w present, equal extents, so that phase
// pixel m of each is the same (a, b) and output column first_w + b * s_w, with the first_w a rotation of
// 0 .. s_w - 1. Returns s_w where that holds (NCHW destination; s_w 2 or 4, so that the shares of 16 or 32
// staged columns are whole groups of four), else 1.
inline int tc_epilogue_cluster(const TcProblem& pr) {
  const int s = pr.dst_step_w;
  if ((s != 2 && s != 4) || pr.dst_channels_last || pr.phases % s != 0) return 1;
  for (int i = 0; i < pr.phases; ++i) {
    const TcPhase& ph = pr.phase[i];
    const TcPhase& lead = pr.phase[i - i % s];  // the row phase's first column phase
    if (ph.extent_w * s != pr.dst_w || ph.extent_h != lead.extent_h || ph.first_h != lead.first_h ||
        ph.first_w != (lead.first_w + i % s) % s)
      return 1;
  }
  return s;
}

// The launcher's rule for epilogue clusters (tc_epilogue_cluster), applied only where the forward writes both
// the output and d output / d pre-activation (the training forward): where the half-written sectors of the
// blocks in flight could outgrow the L2 cache: more than a quarter of it in their channel tiles of both
// outputs. On the H100 (50 MB L2), kb_v1 (34 MB in TF32, 17 MB in bf16) gained (TF32 3.25 -> 2.09 ms, bf16
// 1.75 -> 1.65) and kb_v0 (9 MB, 7 MB) lost (TF32 0.114 -> 0.135 ms); with the output alone clusters cost more
// than they save (kb_v1 TF32 1.44 -> 1.71 ms: the cluster barriers, the blocks waiting for their partners).
inline int tc_training_epilogue_cluster(const TcProblem& pr, int channel_tile, int value_bytes, int resident_blocks,
                                        int64_t l2_bytes) {
  const int64_t in_flight = int64_t(resident_blocks) * kTcBlockM * std::min(channel_tile, pr.dst_per_group) *
                            value_bytes * 2;
  return 4 * in_flight > l2_bytes ? tc_epilogue_cluster(pr) : 1;
}

// Builds the forward TcProblem (without the launch-dependent fields); false if the fast path does not
// cover these parameters (too many phases or taps, or a patch larger than the staging buffers).
inline bool forward_tc_problem(const ConvTransposeParams& p, TcProblem* pr) {
  AxisPhase rows[kTcMaxPhases], cols[kTcMaxPhases];
  int row_count = 0, col_count = 0;
  if (p.stride_h * p.stride_w > kTcMaxPhases) return false;
  if (!forward_axis_phases(p.out_h(), p.kernel_h, p.stride_h, p.pad_h, p.dil_h, rows, &row_count) ||
      !forward_axis_phases(p.out_w(), p.kernel_w, p.stride_w, p.pad_w, p.dil_w, cols, &col_count))
    return false;
  *pr = TcProblem{};
  pr->batch = p.batch;
  pr->groups = int(p.groups);
  pr->dst_channels = int(p.out_channels);
  pr->dst_h = int(p.out_h());
  pr->dst_w = int(p.out_w());
  pr->dst_per_group = int(p.out_channels_per_group());
  pr->src_channels = int(p.in_channels);
  pr->src_h = int(p.in_h);
  pr->src_w = int(p.in_w);
  pr->src_per_group = int(p.in_channels_per_group());
  pr->src_padded = (pr->src_per_group + kTcChunk - 1) / kTcChunk * kTcChunk;
  pr->kernel_w = int(p.kernel_w);
  pr->kernel_taps = int(p.kernel_h * p.kernel_w);
  pr->dst_step_h = int(p.stride_h);
  pr->dst_step_w = int(p.stride_w);
  pr->src_step_h = pr->src_step_w = 1;
  for (int i = 0; i < row_count; ++i) {
    for (int j = 0; j < col_count; ++j) {
      TcPhase& ph = pr->phase[pr->phases++];
      ph.first_h = rows[i].first;
      ph.first_w = cols[j].first;
      ph.extent_h = rows[i].extent;
      ph.extent_w = cols[j].extent;
      ph.taps_h = rows[i].taps;
      ph.taps_w = cols[j].taps;
      for (int k = 0; k < kTcMaxAxisTaps; ++k) {
        ph.kh[k] = rows[i].kernel_index[k];
        ph.off_h[k] = rows[i].offset[k];
        ph.kw[k] = cols[j].kernel_index[k];
        ph.off_w[k] = cols[j].offset[k];
      }
    }
  }
  return finish_tc_problem(pr);
}

// grad_input on tensor cores: grad_input[i] = sum over k of g[i*s - p + k*d] * w[k]. Writing
// k*d - p = s*q + r (0 <= r < s), tap k reads sample i + q of the stride phase r of g (rows r, r + s, ...).
// So each of the s_h * s_w phases of g is a stride-1 correlation with the taps of that phase, and
// grad_input is their sum: one TcPhase per phase of g (phases without taps are left out), all with the
// whole of grad_input as destination, summed by every block in registers (a fixed order: deterministic).
// False if the fast path does not apply.
inline bool grad_input_tc_problem(const ConvTransposeParams& p, TcProblem* pr) {
  if (p.stride_h * p.stride_w > kTcMaxPhases) return false;
  *pr = TcProblem{};
  pr->batch = p.batch;
  pr->groups = int(p.groups);
  pr->dst_channels = int(p.in_channels);
  pr->dst_h = int(p.in_h);
  pr->dst_w = int(p.in_w);
  pr->dst_per_group = int(p.in_channels_per_group());
  pr->src_channels = int(p.out_channels);
  pr->src_h = int(p.out_h());
  pr->src_w = int(p.out_w());
  pr->src_per_group = int(p.out_channels_per_group());
  pr->src_padded = (pr->src_per_group + kTcChunk - 1) / kTcChunk * kTcChunk;
  pr->kernel_w = int(p.kernel_w);
  pr->kernel_taps = int(p.kernel_h * p.kernel_w);
  pr->dst_step_h = pr->dst_step_w = 1;
  pr->src_step_h = int(p.stride_h);
  pr->src_step_w = int(p.stride_w);
  for (int64_t rh = 0; rh < p.stride_h; ++rh) {
    for (int64_t rw = 0; rw < p.stride_w; ++rw) {
      TcPhase ph{};
      ph.extent_h = pr->dst_h;
      ph.extent_w = pr->dst_w;
      ph.src_offset_h = int(rh);
      ph.src_offset_w = int(rw);
      const int64_t axis[2][4] = {{p.kernel_h, p.stride_h, p.pad_h, p.dil_h},
                                  {p.kernel_w, p.stride_w, p.pad_w, p.dil_w}};
      const int64_t phase_of_axis[2] = {rh, rw};
      int* taps[2] = {&ph.taps_h, &ph.taps_w};
      int* kernel_index[2] = {ph.kh, ph.kw};
      int* offset[2] = {ph.off_h, ph.off_w};
      for (int a = 0; a < 2; ++a) {
        for (int64_t k = 0; k < axis[a][0]; ++k) {
          const int64_t shifted = k * axis[a][3] - axis[a][2];  // k*d - p = s*q + r
          const int64_t q = floor_div(shifted, axis[a][1]);
          if (shifted - q * axis[a][1] != phase_of_axis[a]) continue;
          if (*taps[a] == kTcMaxAxisTaps) return false;
          kernel_index[a][*taps[a]] = int(k);
          offset[a][*taps[a]] = int(q);
          ++*taps[a];
        }
      }
      if (ph.taps_h > 0 && ph.taps_w > 0) pr->phase[pr->phases++] = ph;
    }
  }
  return finish_tc_problem(pr);
}

// Points grad_input's sources at the g pass's copy of g (layout g: phase-split by (o + pad) mod s, channels-last,
// `row` values per pixel, channels padded per group), so that the kernel copies its patches from there. Source
// sample i of a phase reads grad_output row o = i * s + r (r < s), which the copy holds in its phase
// r' = (r + pad) mod s at index i: the rows of phase r' below o = r start below pad. False (nothing changed)
// where the copy's channel padding is not the kernel's 16-channel chunks (a chunk would read the next group's g).
inline bool grad_input_copy_layout(TcProblem* pr, const PhaseSplitLayout& g) {
  if (g.row != int64_t(pr->groups) * pr->src_padded) return false;
  for (int i = 0; i < pr->phases; ++i) {
    const int rh = g.h.phase_of(pr->phase[i].src_offset_h), rw = g.w.phase_of(pr->phase[i].src_offset_w);
    pr->copy_first_row[i] = g.phase_first_row(rh, rw);
    pr->copy_extent_h[i] = g.h.extent(rh);
    pr->copy_extent_w[i] = g.w.extent(rw);
    pr->copy_plane[i] = rh * g.w.stride + rw;
  }
  bool uniform = true;
  for (int r = 1; r < g.h.stride; ++r) uniform = uniform && g.h.extent(r) == g.h.extent(0);
  for (int r = 1; r < g.w.stride; ++r) uniform = uniform && g.w.extent(r) == g.w.extent(0);
  pr->copy_planes = uniform ? g.h.stride * g.w.stride : 0;
  pr->copy_plane_h = g.h.extent(0);
  pr->copy_plane_w = g.w.extent(0);
  return true;
}

}  // namespace fused_convt
