// The column-pair forward's problem and its host-side plan (pair_forward.cuh runs it on sm_90a).
//
// Why a second forward: the phase kernel (implicit_gemm_conv.cuh) gives a block one output phase, so at
// stride 2 its stores land on every other output column and each 32-byte sector is half written by one
// block and half by another. Here a warpgroup owns 64 pixels of a row phase and BOTH column phases
// (stride_w == 2): output columns 2j and 2j + 1 come from the same thread, the tile is staged in shared
// memory, and consecutive lanes store consecutive output pairs. Both column phases read the same input
// columns up to a shift, so one patch feeds both through wgmma (operands straight from shared memory, no
// ldmatrix, no fragment registers).
//
// Index math (stride_w = 2, dilation 1; shared/DESIGN.md's phase decomposition). Output row oh = s_h i + ph
// takes the taps kh = kh0 + s_h t (kh0 = (ph + pad_h) mod s_h), input row ih = i + q_h - t with
// q_h = floor((ph + pad_h) / s_h); output column ow = 2 j + pw likewise takes kw = kw0 + 2 t, iw = j + q_w - t.
// The input is copied once into zero-padded planes of 16 bytes per pixel (8 channels of a 16-bit type, 4 of
// float, rounded to TF32), [image][plane][padded pixel][16 bytes] with rows of plane_w pixels, padded by
// pad_top rows and pad_left columns. With the phase grid as wide as a padded row (columns j >= out_cols are
// computed and dropped), pixel l = i plane_w + j of the grid reads padded pixel l + shift(dh, dw),
// shift = (dh + pad_top) plane_w + dw + pad_left: every tap is a constant shift, and a tile of 64 grid pixels
// reads one contiguous run of `patch` padded pixels per plane. Both column phases read the same shifts where
// their column offsets dw coincide (kb_v1: both dw in {-1, 0}), so a wgmma computes the pair at once, its N
// the two phases' channels side by side.
//
// At stride_h 2 the row phases share their input rows the same way (kb_v1: both dh in {-1, 0}), and a tile holds
// both (row_phases 2): its N is [column phase][row phase][channel], so that one warp stores output rows 2i and
// 2i + 1 of a channel one after the other. With the row phases in different blocks, each wrote every other row
// of an NCHW plane, and the H100 writes every other row of kb_v1's output (520-byte rows) at 1.35 TB/s against
// 3.27 for the whole tensor (a fill_, torch 2.11): half the bytes in 1.2x the time, as if DRAM paid for the
// rows between.
#pragma once

#include <algorithm>
#include <cstdint>

#include "divider.h"
#include "fused_convt/macros.h"
#include "fused_convt/params.h"

namespace fused_convt {

constexpr int kPairTileM = 64;        // grid pixels per warpgroup tile (wgmma's M)
constexpr int kPairPlaneBytes = 16;   // bytes per pixel of a plane: one row of a wgmma core matrix
constexpr int kPairMaxWarpgroups = 4;
// NCHW staging: output pairs per channel row, padded so that the epilogue's writes (lanes of four channels two
// apart, eight pixels each) fall in distinct banks: 68 for 32-bit pairs of a 16-bit type (channel rows 4 banks
// apart), 66 for 64-bit pairs of float (8 banks apart).
FCT_HD constexpr int pair_stage_stride(int elem_bytes) { return elem_bytes == 2 ? kPairTileM + 4 : kPairTileM + 2; }
// Zeros that a tap a set lacks multiplies, both operands: B of 128 rows (two column phases of 64 channels) and
// two planes.
constexpr int kPairZeroBytes = 4096;
// The opt-in shared memory of one compute capability 9.0 block: the budget of the sm_90a kernels (the pair forward,
// grad_input_wgmma.cuh's stages).
constexpr int kSm90BlockSmem = 227 * 1024;
// An SM's shared memory (compute capability 9.0); each resident block also reserves 1 KB of it.
constexpr int kSm90SmSmem = 228 * 1024;

// Taps of one phase along one axis: kernel index k0 + stride t and input offset q - t, t < count.
struct PairAxisTaps {
  int k0, q, count;
};

FCT_HD PairAxisTaps pair_axis_taps(int phase, int kernel, int stride, int pad) {
  const int k0 = (phase + pad) % stride;
  return {k0, (phase + pad) / stride, k0 < kernel ? (kernel - k0 + stride - 1) / stride : 0};
}

// The input offsets that phases first .. first + phases - 1 of an axis read together: q - t for t < count (k0
// unused; count 0 where none has a tap). The column phases' (col_hi, col_taps), a set's row slots (row_offsets)
// and the padding all come from these ranges.
FCT_HD PairAxisTaps pair_offset_range(int first, int phases, int kernel, int stride, int pad) {
  int hi = -(1 << 30), lo = 1 << 30;
  for (int phase = first; phase < first + phases; ++phase) {
    const PairAxisTaps t = pair_axis_taps(phase, kernel, stride, pad);
    if (t.count) hi = hi > t.q ? hi : t.q, lo = lo < t.q - t.count + 1 ? lo : t.q - t.count + 1;
  }
  return {0, hi, hi >= lo ? hi - lo + 1 : 0};
}

// A weight set's coordinates: sets are numbered (group, row phase, channel tile), the channel tile fastest. With
// row_phases 2 every set holds both row phases (row_phase 0).
struct PairSet {
  int group, row_phase, channel_tile;
};

struct PairProblem {
  int elem_bytes;        // 2 (float16, bfloat16) or 4 (float as TF32)
  int batch, groups, cin_g, cout_g, in_h, in_w, out_h, out_w;
  int kernel_h, kernel_w, stride_h, pad_h, pad_w;
  int n_tile;            // a tile's (row phase, channel) columns per column phase: 16, 32 or 64 (a wgmma's N is
                         // twice that), row_phases x channel_tile() of them
  int row_phases;        // row phases per tile: 2 (both, at stride_h 2) or 1 (one per set)
  // Parts of K per input channel: 1, or 3 for exact float (TF32 off) as 3xTF32: each channel's plane comes three
  // times, as the input's TF32 parts lo, cross, hi against the weights' cross, lo, hi (Fp32SplitMath's split:
  // lo x cross + cross x lo + hi x hi, small products first), so the kernel is the TF32 one over 3 cin_g channels.
  int k_parts;
  int pad_top, pad_left, plane_w, plane_len;
  int rows, out_cols;    // phase rows per row phase (the most any has), pair columns ceil(out_w / 2)
  int tiles;             // tiles per (image, row phase)
  int shift_min, patch;  // a tile's first padded pixel is its grid start + shift_min; pixels per plane
  // Input column offsets that either column phase reads: dw = col_hi - u, u < col_taps (the two phases' ranges
  // touch or overlap, stride_w being 2). One wgmma per (row tap, column offset) multiplies the shifted patch by
  // both phases' weights at once, a phase's rows zero where it has no tap at that offset.
  int col_hi, col_taps;
  int max_taps;          // weight slots per set: the most row offsets of any set (row_offsets) x col_taps
  int max_axis_taps;     // max(row taps, col_taps): 1 to 3, the kernel's unrolled loops
  int sets;              // groups x stride_h / row_phases x channel tiles: the weights a block keeps resident
  int warpgroups;        // per block (the smem budget), and blocks per set (the grid)
  int blocks_per_sm;     // 1, or 2 blocks of three warpgroups (two_blocks_per_sm)
  int chunks;            // a tile's planes arrive in this many copies (K chunks), each filling one buffer
  int blocks_per_set, grid;  // grid: blocks_per_set x sets, or one wave of blocks looping over the sets
  Divider by_tiles, by_plane_w;  // tile numbers -> image, grid pixels -> row (no integer division per tile)
  bool channels_last_out;  // NHWC output: the staging layout, so the shared memory, depends on it
  bool lockstep;           // the grid's soft lockstep (pair_lockstep; the launcher)
  bool aligned_stores;     // NCHW: every pair (2j, 2j + 1) 4-byte aligned; NHWC: 16-byte pieces (the launcher)

  FCT_HD int plane_channels() const { return kPairPlaneBytes / elem_bytes; }
  FCT_HD int channel_planes() const { return cin_g / plane_channels(); }  // of one part
  FCT_HD int planes() const { return k_parts * channel_planes(); }          // K planes: every part's
  FCT_HD int chunk_planes() const { return planes() / chunks; }
  FCT_HD int channel_tile() const { return n_tile / row_phases; }  // output channels per tile
  FCT_HD int channel_tiles() const { return cout_g / channel_tile(); }
  FCT_HD int row_groups() const { return stride_h / row_phases; }  // sets per group and channel tile
  FCT_HD int64_t outputs() const { return int64_t(batch) * groups * cout_g * out_h * out_w; }  // per stored tensor
  FCT_HD PairSet set_at(int set) const {
    const int channel_tile = set % channel_tiles(), row_phase = set / channel_tiles() % row_groups();
    return {set / channel_tiles() / row_groups(), row_phase, channel_tile};
  }
  // The input row offsets a set's weight slots read: dh = q - a for slot row a < count (k0 unused). One row phase:
  // its taps (slot row a is tap a); both: every offset either reads, a phase's weights zero where it has no tap.
  FCT_HD PairAxisTaps row_offsets(int set_row_phase) const {
    return pair_offset_range(set_row_phase * row_phases, row_phases, kernel_h, stride_h, pad_h);
  }
  FCT_HD int shift(int dh, int dw) const { return (dh + pad_top) * plane_w + dw + pad_left; }
  // Bytes of one resident weight set, and of one patch buffer (also the epilogue's staging).
  // A slot holds B for both column phases: 2 n_tile rows of cin_g channels.
  FCT_HD int weight_bytes() const { return max_taps * k_parts * cin_g * 2 * n_tile * elem_bytes; }
  // Bytes of a patch plane, copied and stored back to back: patch * 16. (Planes padded to 128 bytes, each on
  // the same offset in a 128-byte line, measured slower: kb_v1 bf16 0.70 -> 0.75 ms on the H100.)
  FCT_HD int plane_bytes() const { return patch * kPairPlaneBytes; }
  // The epilogue's staged tile: NCHW [channel][pair_stage_stride output pairs], NHWC [output pixel][n_tile
  // values + 16 bytes] (16-byte rows, 16 bytes of padding). grad_factor is staged NCHW whatever the output's
  // layout; the NHWC staging is never the smaller one (128 n_tile elem_bytes + 2048 bytes against + 16 n_tile).
  FCT_HD int nchw_stage_bytes() const { return n_tile * pair_stage_stride(elem_bytes) * 2 * elem_bytes; }
  FCT_HD int stage_bytes() const {
    return channels_last_out ? 2 * kPairTileM * (n_tile * elem_bytes + 16) : nchw_stage_bytes();
  }
  // A buffer holds one K chunk of a tile's patch, and after the tile's last chunk its staged outputs.
  FCT_HD int buffer_bytes() const {
    const int patch_bytes = chunk_planes() * plane_bytes(), stage_bytes = this->stage_bytes();
    return (std::max(patch_bytes, stage_bytes) + 127) / 128 * 128;
  }
  // The mbarriers (weights, one per buffer) and the MMA turn counter (pair_mma_turns), 8 bytes each.
  FCT_HD static constexpr int sync_bytes(int wgs) { return (2 + 2 * wgs) * 8; }
  // Weights, two buffers per warpgroup, sync_bytes, the zeros, the set's bias per channel.
  FCT_HD int smem_bytes(int wgs) const {
    return weight_bytes() + wgs * 2 * buffer_bytes() + sync_bytes(wgs) + kPairZeroBytes + n_tile * 4;
  }
  // 16-byte rows (kPairPlaneBytes) of the padded input and of the packed weights.
  FCT_HD int64_t padded_input_rows() const { return int64_t(batch) * groups * planes() * plane_len; }
  FCT_HD int64_t packed_weight_rows() const { return int64_t(sets) * max_taps * planes() * 2 * n_tile; }
  // The grid: one wave of blocks_per_sm blocks per SM, split evenly over the sets (or looping over them).
  void size_grid(int sms) {
    const int slots = std::max(1, sms * blocks_per_sm);
    blocks_per_set = std::max(1, slots / sets);
    grid = sets <= slots ? blocks_per_set * sets : slots;
  }
  // 16-channel tiles (a wgmma's N of 32: 55-88 registers a thread in the inference kernels, 92 in the training
  // ones, compiled for 80 here) as two blocks of three warpgroups per SM, six warpgroups instead of four,
  // where two blocks' shared memory fits an SM (228 KB, 1 KB of it reserved per block): the kernel is latency-bound
  // (Nsight Compute at kb_v0: 6.7 cycles per issued instruction). The launcher keeps float at one block where its
  // output outgrows L2. False (the plan unchanged) where it does not fit.
  bool two_blocks_per_sm(int sms) {
    if (n_tile != 16 || warpgroups < 3) return false;
    const int saved = warpgroups;
    warpgroups = 3;
    if (2 * (smem_bytes(3) + 1024) > kSm90SmSmem) {
      warpgroups = saved;
      return false;
    }
    blocks_per_sm = 2;
    size_grid(sms);
    return true;
  }
};

// Plans the column-pair forward; false where it does not apply (then the phase kernel runs). elem_bytes: 2 for
// float16 / bfloat16, 4 for float multiplied as TF32; sms: the device's multiprocessor count (the grid is one
// wave: a block per SM, two_blocks_per_sm two); channels_last_out: an NHWC output; k_parts: 3 for exact float (TF32
// off), else 1; both_row_phases: whether a tile may hold both row phases at stride_h 2 (the caller's rule,
// pair_both_row_phases).
inline bool plan_pair_forward(const ConvTransposeParams& p, int elem_bytes, int sms, bool channels_last_out,
                              PairProblem* out, int k_parts = 1, bool both_row_phases = true) {
  if (p.stride_w != 2 || p.dil_h != 1 || p.dil_w != 1 || (elem_bytes != 2 && elem_bytes != 4)) return false;
  if (k_parts != 1 && (k_parts != 3 || elem_bytes != 4)) return false;
  const int64_t cin_g = p.in_channels_per_group(), cout_g = p.out_channels_per_group();
  // Exact float's weight set is three times TF32's, so its tiles stop at 16 channels. Where TF32's would be 32 wide
  // the narrower tiles cost more than the phase kernel's 3xTF32 (kb_v1, H100: 3.30 -> 3.62 ms); where they are 16
  // anyway it gains (kb_v0: 0.150 -> 0.120 ms). So exact float takes this kernel only at 16-channel tiles.
  if (k_parts == 3 && cout_g % 32 == 0) return false;
  // A wgmma K step reads two planes (32 bytes of each pixel's channels): 16 channels of a 16-bit type, 8 of float.
  if (cin_g * elem_bytes % (2 * kPairPlaneBytes) != 0 || cout_g % 16 != 0) return false;
  PairProblem pr{};
  pr.elem_bytes = elem_bytes;
  // Float tiles stop at 32 channels: at 64 the weight set (kb_v1: 128 KB) and the staged outputs (35 KB per
  // warpgroup) would leave room for one or two warpgroups.
  pr.n_tile = cout_g % 64 == 0 && elem_bytes == 2 ? 64 : cout_g % 32 == 0 ? 32 : 16;
  pr.k_parts = k_parts;
  const int sh = int(p.stride_h);
  // Both row phases in a tile at stride_h 2 (its channel tile halved, the same N), for NCHW outputs (in NHWC a
  // pixel's channels would split over two rows: kb_v1 bf16 0.52 -> 0.84 ms) but not exact float (its 16-channel
  // tiles are tuned as they are).
  pr.row_phases = both_row_phases && sh == 2 && k_parts == 1 && !channels_last_out ? 2 : 1;
  pr.stride_h = sh, pr.kernel_h = int(p.kernel_h), pr.pad_h = int(p.pad_h);
  const PairAxisTaps rows_read = pair_offset_range(0, sh, pr.kernel_h, sh, pr.pad_h);
  const PairAxisTaps cols_read = pair_offset_range(0, 2, int(p.kernel_w), 2, int(p.pad_w));
  const int dh_max = rows_read.q, dh_min = rows_read.q - rows_read.count + 1;
  const int dw_max = cols_read.q, dw_min = cols_read.q - cols_read.count + 1, col_taps = cols_read.count;
  auto most_row_offsets = [&] {
    int most = 0;
    for (int r = 0; r < pr.row_groups(); ++r) most = std::max(most, pr.row_offsets(r).count);
    return most;
  };
  int th_max = most_row_offsets();
  if (th_max > 3 && pr.row_phases == 2) pr.row_phases = 1, th_max = most_row_offsets();  // one phase's may fit
  if (th_max == 0 || col_taps == 0) return false;  // every output is the bias: not worth a path
  if (th_max > 3 || col_taps > 3) return false;
  const int64_t out_h = p.out_h(), out_w = p.out_w();
  pr.pad_top = std::max(0, -dh_min);
  pr.pad_left = std::max(0, -dw_min);
  pr.out_cols = int((out_w + 1) / 2);
  pr.rows = int((out_h + sh - 1) / sh);
  const int64_t plane_w = pr.out_cols + dw_max + pr.pad_left;
  const int64_t grid = int64_t(pr.rows) * plane_w;
  const int64_t tiles = (grid + kPairTileM - 1) / kPairTileM;
  const int64_t shift_min = int64_t(dh_min + pr.pad_top) * plane_w + dw_min + pr.pad_left;
  const int64_t shift_max = int64_t(dh_max + pr.pad_top) * plane_w + dw_max + pr.pad_left;
  const int64_t patch = kPairTileM + shift_max - shift_min;
  const int64_t padded_rows = pr.rows + dh_max + pr.pad_top;
  const int64_t plane_len = std::max(padded_rows * plane_w, (tiles - 1) * kPairTileM + shift_min + patch);
  if (plane_len > (int64_t(1) << 30) || patch > 4096 || p.batch * tiles > INT32_MAX) return false;
  pr.batch = int(p.batch), pr.groups = int(p.groups), pr.cin_g = int(cin_g), pr.cout_g = int(cout_g);
  pr.in_h = int(p.in_h), pr.in_w = int(p.in_w), pr.out_h = int(out_h), pr.out_w = int(out_w);
  pr.kernel_w = int(p.kernel_w), pr.pad_w = int(p.pad_w);
  pr.plane_w = int(plane_w), pr.plane_len = int(plane_len), pr.tiles = int(tiles);
  pr.shift_min = int(shift_min), pr.patch = int(patch);
  pr.by_tiles = Divider(uint32_t(tiles)), pr.by_plane_w = Divider(uint32_t(plane_w));
  pr.channels_last_out = channels_last_out;
  pr.col_hi = dw_max, pr.col_taps = col_taps;
  pr.max_taps = th_max * col_taps;
  pr.max_axis_taps = std::max(th_max, col_taps);
  pr.sets = int(p.groups) * pr.row_groups() * pr.channel_tiles();
  // The most warpgroups that fit (bf16 at kb_v1: four 0.70 ms, three 0.78, two 1.01), a float tile's patch in
  // as few K chunks as lets them (every chunk an even number of planes). 16-bit patches stay whole (kb_v1 fits
  // four warpgroups so; chunks are not measured there), and their kernels compile without the chunk loop.
  pr.warpgroups = 0;
  for (int wgs = kPairMaxWarpgroups; wgs >= 1 && !pr.warpgroups; --wgs)
    for (pr.chunks = 1; pr.planes() % (2 * pr.chunks) == 0 && (pr.chunks == 1 || elem_bytes == 4); pr.chunks *= 2)
      if (pr.smem_bytes(wgs) <= kSm90BlockSmem) {
        pr.warpgroups = wgs;
        break;
      }
  if (!pr.warpgroups) return false;
  pr.blocks_per_sm = 1;
  pr.size_grid(sms);
  *out = pr;
  return true;
}

// Whether the pair kernel's warpgroups keep the grid in a soft lockstep (pair_forward_kernel: before a tile, wait
// until every warpgroup has finished all but the last of its tiles). It exists for the output sectors that the two
// row phases (different blocks) and neighbouring tiles share: while the blocks stay together both halves of such a
// sector meet in L2, once they drift apart DRAM writes it twice. Where everything the launch stores fits in L2
// (l2_bytes) the halves meet there anyway and the waits are pure cost; and the float inference forward was faster
// without it at every kb_v1-like point measured (H100, KernelBench data; perf/NOTES.md forward row 50: kb_v1 0.880
// -> 0.827 ms; the one loss, kb_v0 at batch 512, 0.201 -> 0.216). `output_bytes` / `factor_bytes`: per element of
// each tensor the launch stores (0: not stored).
inline bool pair_lockstep(const PairProblem& pr, int output_bytes, int factor_bytes, int64_t l2_bytes) {
  if (pr.elem_bytes == 4 && factor_bytes == 0) return false;
  return pr.outputs() * (output_bytes + factor_bytes) > l2_bytes;
}

// Whether a block's warpgroups issue their wgmmas in turn (pair_forward_kernel): warpgroup w's n-th issue waits
// for the n-th of every warpgroup before it. The four warps of a warpgroup each run on their own sub-partition's
// tensor core, one warp of every warpgroup on each; warpgroups that issue at once interleave there and each waits
// for all of them (Nsight Compute at kb_v1 bf16: 39% of the warps' stall samples in arriving at, issuing and waiting
// for wgmmas, whose work is a quarter of that), while in turn each one's run back to back. It pays for 16-bit tiles
// of 64 and 32 channels (N 128, 64): H100, CUDA graph replay, kb_v1 bf16 inference 0.478 -> 0.413-0.422 ms
// (KernelBench data), training forward 0.866 -> 0.806; 32-channel tiles on randn data -1% to -6% at three shapes,
// +1.5% at a fourth (128 -> 96 channels at 32 x 32). Not for float (TF32 kb_v1 0.842 -> 0.985: its tiles come in
// two K chunks, and a turn waits on another warpgroup's copy; a turn per tile, 0.864) nor 16-channel tiles (kb_v0
// bf16 0.0349 -> 0.0363). perf/NOTES.md forward rows 58, 61, 62.
FCT_HD constexpr bool pair_mma_turns(int elem_bytes, int n_tile) { return elem_bytes == 2 && n_tile >= 32; }

// Whether a pair tile may hold both row phases (plan_pair_forward's both_row_phases, which NCHW outputs take), so
// that the rows the two phases interleave reach memory from one block at once rather than from different blocks at
// different times: 16-bit forwards always; float ones only with the factor, where the stores (`stored_bytes`: every
// tensor the launch stores) outgrow L2; not the float inference forward. H100, KernelBench data (perf/NOTES.md
// forward rows 57 and 70): kb_v1 bf16 inference 0.539 -> 0.48 ms, training forwards (output and factor) bf16 1.11 ->
// 0.86 and TF32 1.26 -> 1.15, but TF32 inference 0.846 -> 0.880; at kb_v0's shape in bf16 (graph replay, batch 64 /
// 128 / 256) inference 23.0 / 34.8 / 61 -> 23.0 / 34.3 / 57.5 us and training forwards 31.5 / 56 / 87.5 -> 31 / 46 /
// 87.5 us: stores that fit L2 gain too (the twenty-third session's kernel had lost 0.0346 -> 0.0360 ms at kb_v0).
inline bool pair_both_row_phases(int elem_bytes, bool stores_factor, int64_t stored_bytes, int64_t l2_bytes) {
  return elem_bytes == 2 || (stores_factor && stored_bytes > l2_bytes);
}

}  // namespace fused_convt
