// grad_weight on tensor cores as a pipelined GEMM over channels-last operands (channels_last_pack.cuh).
//
// grad_weight[ic, oc, kh, kw] = sum over the pixels (n, a, b) of output phase (r_h, r_w) that tap (kh, kw)
// feeds of X[n, a + off_h, b + off_w, ic] * G[phase, n, a, b, oc] (offsets from tap_map.h). A block owns one
// phase, up to kGemmTaps of its taps, a TM x TN (ic, oc) tile (64 x 64, narrower where a group has few
// channels: GemmShape), one group and one contiguous slice ("split") of the phase's pixels. Per pipeline
// stage it copies a step of pixel rows of G (once for all its taps) and the X rows its taps read (one patch
// for all taps, or per tap: gemm_patch_steps) into shared memory with 16-byte cp.async (zero-filled outside
// the image), up to kGemmMaxStages stages deep, so the loads of later stages are in flight while the tensor
// cores work on this one; registers hold only accumulators and fragments. Operands sit [pixel][channel] (the
// reduction index outermost), so 16-bit fragments come from ldmatrix.trans and 32-bit ones from conflict-free
// 32-bit loads (row stride = 8 or 24 mod 32 words). Each split writes its own partial sums; sum_splits adds
// them in order.
#pragma once

#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>

#include "channels_last_pack.cuh"
#include "cuda_common.cuh"
#include "mma.cuh"
#include "tma.cuh"

namespace fused_convt {

constexpr int kGemmTaps = 4;        // taps per block: each staged G row serves all of them
constexpr int kGemmThreads = 256;   // 8 warps, each 512 results (16 x 32 or 32 x 16, ic x oc) per tap
constexpr int kGemmMaxStages = 4;  // 2 where the device's shared memory is smaller
constexpr int kGemmStageBudget = 28 * 1024;  // bytes: four stages of two blocks fit an SM of 227 KB
// Blocks the reduction is split over (device independent, so the split count, and the bits, are too): about two
// per SM of an H100. With 1024 the splits' partial sums (splits x weight, written, then added by sum_splits) and
// each block's short reduction cost more than the parallelism gained: 1024 -> 256 made the backward 1.06x (kb_v1
// TF32) to 2.7x (bench.py's n32 c64 -> 32 point, bf16) faster, 1.23-1.26x at kb_v0 (H100, KernelBench data).
constexpr int64_t kGemmTargetBlocks = 256;

// What a grad_weight block owns, from its grid position: grid.x = phase (fastest, so the blocks of all
// phases that share grad_output sectors run together) + phases * split; grid.y = tap group x ic tile x
// oc tile; grid.z = group. Shared by this kernel and float64's direct one (backward.cu).
struct WeightBlock {
  int phase, rh, rw, tap_group, ic_tile, oc_tile, group;
  int64_t split;
  __device__ WeightBlock(int phases, int tap_groups, int ic_tiles, int stride_w)
      : phase(int(blockIdx.x % phases)),
        rh(phase / stride_w),
        rw(phase % stride_w),
        tap_group(int(blockIdx.y % tap_groups)),
        ic_tile(int(blockIdx.y / tap_groups % ic_tiles)),
        oc_tile(int(blockIdx.y / (tap_groups * ic_tiles))),
        group(int(blockIdx.z)),
        split(blockIdx.x / phases) {}
};

struct WeightGemmPlan {
  int phases, tap_groups, ic_tiles, oc_tiles;
  int tile_m, tile_n;         // ic x oc extent of a block (GemmShape)
  bool patch;                 // patch steps (gemm_patch_steps): a split is tiles_per_split tiles, else pixels
  int64_t splits, pixels_per_split, tiles_per_split;
  PhaseSplitLayout g_layout;  // G
  int64_t x_row;              // values per pixel row of X: groups x padded input channels
};

// Pixels (reduction extent) per pipeline stage: 16-bit operands 32 (two k16 MMA steps), float 16 (two k8
// steps), so that a stage is the same bytes either way. A float stage of 32 pixels needed 138 KB for three
// stages, one block per SM, and ran at 2.5 ms against 1.0 for bf16 at kb_v1 (H100).
template <typename Math>
constexpr int gemm_pixels() { return sizeof(typename Math::Smem) == 2 ? 32 : 16; }

// Patch steps. A step's pixels are a tile of kGemmPatchCols phase columns x (pixels / kGemmPatchCols) phase
// rows of one image, and it stages the input pixels under the tile once, one more row and column than the
// tile: where the block's taps reach input offsets that span at most one row and one column (every phase at
// k <= 2 s and dilation 1, as kb_v0 and kb_v1), those rows serve all its taps, each tap's A fragments read at
// its shift. Per-tap steps (the alternative) copy each tap's X rows of a run of consecutive pixels: four X
// rows per pixel at k4 s2 against ~1.4 plus the ragged edges' empty pixels, in a GEMM that Nsight Compute shows
// bound by L2 (78% busy at kb_v1 bf16, where every X row was read once per tap and output-channel tile).
// Non-finite values: both kinds of step multiply zeros that stand for absent terms (X rows outside the image
// against a NaN of g; with patch steps also the zero G rows past a ragged tile grid against an infinite
// input), so grad_weight can hold NaN in more entries than PyTorch's sums (measured with an infinite input:
// docs/optimizations.md section 9); finite inputs give the same terms.
constexpr int kGemmPatchCols = 8;

// Tap `index` (th * taps_w + tw) of output phase (rh, rw): its kernel tap and the input offset it reads at
// (tap_map.h). The kernel's tap tables and the planner's patch test (gemm_patch_steps) both come from here.
struct GemmTap {
  int kh, kw, off_h, off_w;
};
FCT_HD GemmTap gemm_tap(const ConvTransposeParams& p, int rh, int rw, int taps_w, int index) {
  GemmTap tap;
  tap.kh = phase_tap(p.kernel_h, p.stride_h, p.dil_h, rh, index / taps_w);
  tap.kw = phase_tap(p.kernel_w, p.stride_w, p.dil_w, rw, index % taps_w);
  tap.off_h = phase_tap_offset(phase_span(p.out_h(), p.stride_h, p.pad_h, rh), tap.kh, p.stride_h, p.dil_h, rh);
  tap.off_w = phase_tap_offset(phase_span(p.out_w(), p.stride_w, p.pad_w, rw), tap.kw, p.stride_w, p.dil_w, rw);
  return tap;
}

// The input offsets that taps first ... end - 1 of output phase (r_h, r_w) read at: least and greatest per axis.
struct GemmTapSpan {
  int min_h, max_h, min_w, max_w;
};
inline GemmTapSpan gemm_tap_span(const ConvTransposeParams& p, int rh, int rw, int taps_w, int first, int end) {
  GemmTapSpan span{INT_MAX, INT_MIN, INT_MAX, INT_MIN};
  for (int index = first; index < end; ++index) {
    const GemmTap tap = gemm_tap(p, rh, rw, taps_w, index);
    span.min_h = std::min(span.min_h, tap.off_h), span.max_h = std::max(span.max_h, tap.off_h);
    span.min_w = std::min(span.min_w, tap.off_w), span.max_w = std::max(span.max_w, tap.off_w);
  }
  return span;
}

// Whether every block's taps (groups of kGemmTaps of a phase) read offsets within one row and one column.
inline bool gemm_patch_steps(const ConvTransposeParams& p) {
  for (int rh = 0; rh < int(p.stride_h); ++rh)
    for (int rw = 0; rw < int(p.stride_w); ++rw) {
      const int taps_w = phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw);
      const int taps = phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh) * taps_w;
      for (int first = 0; first < taps; first += kGemmTaps) {
        const GemmTapSpan span = gemm_tap_span(p, rh, rw, taps_w, first, std::min(first + kGemmTaps, taps));
        if (span.max_h - span.min_h > 1 || span.max_w - span.min_w > 1) return false;
      }
    }
  return true;
}

// A block's tile and stage geometry, for patch steps (kPatchSteps: gemm_patch_steps) or per-tap steps. The 8 warps
// each own kWarpM (ic) x kWarpN (oc) results per tap: 16 x 32 where the tile has 32 or more output channels, else
// 32 x 16. Per k step a warp loads one B fragment pair (G) per 16 output channels and one A fragment (X) per tap and
// 16 input channels: at 16 x 32, 6 ldmatrix for 16 MMAs, against 9 at 32 x 16 (a 64 x 64 bf16 block step read ~74
// KB of fragments, ~49 KB at 16 x 32: at kb_v1 grad_weight + grad_bias 1.64 -> 1.62 ms bf16, 2.87 -> 2.72 TF32,
// H100; shared memory was not the bound, L2 was: gemm_patch_steps).
// The tile's kWarpTiles warp tiles, times kGroups pixel groups where the tile needs fewer than 8 warps, the
// warps of group q multiplying rows q * kGroupPixels ... of each stage and their sums added at the end. A
// narrow tile (a group's 32 input x 16 output channels at kb_v0, where the 64 x 64 tile was an eighth used and
// 7 of 8 warps multiplied zeros) copies only its channels, and its stage holds kGroups times the pixels in
// about the bytes of the wide tile's: fewer steps, each a copy round trip and a barrier. The warps left over
// after the warp tiles and pixel groups split the block's taps between them (kTapWarps sets of kWarpTaps taps),
// so that every warp multiplies, not two of eight: with per-tap steps that measured the same (kb_v0's GEMM is
// bound by its L2 requests), with the 16-bit patch steps 42.5 -> 39.6 us (H100). Rows are padded by 16 bytes
// (16-bit: ldmatrix's eight rows in distinct bank groups) or 8 words (32-bit loads: row stride 8 or 24 mod 32
// words).
// Patch steps take tiles of several pixel groups only as whole 8 x 8 squares (kPatchable): float's 8 x 4 tiles
// over kb_v0's 33-pixel planes were ragged and measured slower than per-tap steps (GEMM 69 -> 75 us), while 8 x 8
// cut the 16-bit GEMM 56 -> 40 us (H100). A patch stage holds only the patch, so the float 32 x 16 tile fits 8 x 8
// pixels (four groups) in fewer bytes than its per-tap stage of 32 pixels: kb_v0's TF32 training step 205 -> 197
// us. Only where warps are left to split the taps (kTapWarps > 1): the float 32 x 32 square, whose four groups of
// two warp tiles take all eight warps (four taps each), measured from 4% faster to 9% slower than per-tap steps
// over perf/bench.py's sweep (H100), so it keeps them.
template <typename Math, int kTM, int kTN, bool kPatchSteps>
struct GemmShape {
  static constexpr int kTileM = kTM, kTileN = kTN;  // the plan's tile_m / tile_n, which picked this shape
  static constexpr bool kPatch = kPatchSteps;
  static constexpr int kValueBytes = int(sizeof(typename Math::Smem));
  static constexpr int kGroupPixels = gemm_pixels<Math>();
  static constexpr int kXRowBytes = kTM * kValueBytes + (kValueBytes == 2 ? 16 : 32);
  static constexpr int kGRowBytes = kTN * kValueBytes + (kValueBytes == 2 ? 16 : 32);
  static constexpr int kXPieces = kTM * kValueBytes / 16, kGPieces = kTN * kValueBytes / 16;  // per row
  static constexpr int kWarpN = kTN >= 32 ? 32 : 16, kWarpM = 512 / kWarpN;
  static constexpr int kWarpsN = kTN / kWarpN, kWarpTiles = kTM / kWarpM * kWarpsN;
  static constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;  // m16 and n8 MMA tiles per warp and tap
  // X rows a stage of `rows` pixels holds: the patch under its tile (one more row and column), or a row per tap.
  static constexpr int x_rows(int rows, bool patch) {
    return patch ? (rows / kGemmPatchCols + 1) * (kGemmPatchCols + 1) : kGemmTaps * rows;
  }
  static constexpr int stage_bytes(int rows, bool patch) { return rows * kGRowBytes + x_rows(rows, patch) * kXRowBytes; }
  // Per-tap steps: a thread copies one piece of one pixel's G row and X rows (kThreadsPerRow threads per row).
  static constexpr int tap_groups() {
    int groups = 1;
    while (groups * 2 * kWarpTiles <= kGemmThreads / 32 &&
           stage_bytes(groups * 2 * kGroupPixels, false) <= kGemmStageBudget &&
           kGemmThreads / (groups * 2 * kGroupPixels) >= (kXPieces > kGPieces ? kXPieces : kGPieces))
      groups *= 2;
    return groups;
  }
  static constexpr int groups() {
    constexpr int kSquare = kGemmPatchCols * kGemmPatchCols / kGroupPixels;  // groups of an 8 x 8 tile
    return kPatchSteps && tap_groups() > 1 && kSquare * kWarpTiles < kGemmThreads / 32 &&
                   stage_bytes(kSquare * kGroupPixels, true) <= kGemmStageBudget
               ? kSquare
               : tap_groups();
  }
  static constexpr int kGroups = groups();
  static constexpr int kTapWarps = std::min(kGemmTaps, kGemmThreads / 32 / (kGroups * kWarpTiles));
  static constexpr int kWarpTaps = kGemmTaps / kTapWarps;         // taps a warp multiplies
  static constexpr int kRows = kGroups * kGroupPixels;            // pixel rows per stage
  // Patch steps: a tile of 8 columns x kTileRows rows of phase pixels, its patch of kTileRows + 1 rows x kPatchCols.
  static constexpr int kTileRows = kRows / kGemmPatchCols, kPatchCols = kGemmPatchCols + 1;
  static constexpr int kXRows = x_rows(kRows, kPatchSteps);
  static constexpr int kStageBytes = stage_bytes(kRows, kPatchSteps);
  static constexpr int kThreadsPerRow = kGemmThreads / kRows;     // (per-tap steps)
  // The pixel groups' sums pass through the stages' shared memory at the end (groups 1 ... kGroups - 1).
  static constexpr int kSumBytes = (kGroups - 1) * kWarpTiles * kTapWarps * kWarpTaps * kMTiles * kNTiles * 4 * 32 * 4;
  static constexpr bool kPatchable = kPatchSteps && (kGroups == 1 || kRows == kGemmPatchCols * kGemmPatchCols);
  // Patch steps may take each stage's X patch from the channels-last copy by one TMA box (kXBox:
  // encode_gemm_x_box): [patch row][patch column][kXRowBytes of channels], the copies' layout, row padding
  // included (the box reads the next channels into it, which no fragment reads), so the fragments are the
  // copies'. The box's destination must be 128-byte aligned (H100: one 16 bytes off faulted, "misaligned
  // address"), so the G tile before it must fill whole 128 bytes and the stages start at multiples of 128.
  static constexpr int kXBoxChannels = kXRowBytes / kValueBytes;
  static constexpr bool kXBoxable = kPatchable && kXBoxChannels <= 256 && kRows * kGRowBytes % 128 == 0;
  static constexpr int stage_size(bool x_box) { return x_box ? (kStageBytes + 127) / 128 * 128 : kStageBytes; }
  // Dynamic shared memory: the stages (or the group sums, where more), then with X boxes a barrier per stage.
  static constexpr int smem_bytes(int stages, bool x_box) {
    return std::max(stages * stage_size(x_box), kSumBytes) + (x_box ? stages * 8 : 0);
  }
  static_assert(kTM % kWarpM == 0 && kTN % kWarpN == 0 && kWarpTiles <= kGemmThreads / 32, "whole warp tiles");
  static_assert(kGemmTaps % kTapWarps == 0, "whole tap sets");
  static_assert(kPatchSteps ? kRows % kGemmPatchCols == 0 : kThreadsPerRow >= kXPieces && kThreadsPerRow >= kGPieces,
                "patch tiles of whole rows; per-tap steps: at most one piece per thread and row");
};

// The tile for a group's channel counts: 32 or 64 input channels, 16, 32 or 64 output channels.
inline int gemm_tile_m(int64_t in_per_group) { return in_per_group <= 32 ? 32 : 64; }
inline int gemm_tile_n(int64_t out_per_group) { return out_per_group <= 16 ? 16 : out_per_group <= 32 ? 32 : 64; }

// Calls f(GemmShape<Math, TM, TN, patch>{}) for a plan's tile; per-tap steps where patch steps do not fit the tile
// (kPatchable), so no patch kernel is built for it.
template <typename Math, typename F>
decltype(auto) with_gemm_shape(int tile_m, int tile_n, bool patch, F&& f) {
  auto with_steps = [&](auto tm, auto tn) -> decltype(auto) {
    constexpr int kTM = decltype(tm)::value, kTN = decltype(tn)::value;
    using PatchShape = GemmShape<Math, kTM, kTN, true>;
    if constexpr (PatchShape::kPatchable) {
      if (patch) return f(PatchShape{});
    }
    return f(GemmShape<Math, kTM, kTN, false>{});
  };
  auto with_n = [&](auto tm) -> decltype(auto) {
    if (tile_n == 16) return with_steps(tm, std::integral_constant<int, 16>{});
    if (tile_n == 32) return with_steps(tm, std::integral_constant<int, 32>{});
    return with_steps(tm, std::integral_constant<int, 64>{});
  };
  return tile_m == 32 ? with_n(std::integral_constant<int, 32>{}) : with_n(std::integral_constant<int, 64>{});
}

inline WeightGemmPlan plan_weight_gemm(const ConvTransposeParams& p, DType dtype) {
  WeightGemmPlan plan{};
  plan.tile_m = gemm_tile_m(p.in_channels_per_group());
  plan.tile_n = gemm_tile_n(p.out_channels_per_group());
  // The shape's constants for the dtype's operand width (float: Tf32Math and Fp32SplitMath alike).
  auto of_shape = [&](bool patch, auto constant) {
    return dtype == DType::Float32 ? with_gemm_shape<Tf32Math>(plan.tile_m, plan.tile_n, patch, constant)
                                   : with_gemm_shape<Half16Math<__half>>(plan.tile_m, plan.tile_n, patch, constant);
  };
  plan.phases = int(p.stride_h * p.stride_w);
  plan.patch = of_shape(true, [](auto shape) { return decltype(shape)::kPatch; }) && gemm_patch_steps(p);
  const int pixel_step = of_shape(plan.patch, [](auto shape) { return decltype(shape)::kRows; });
  const int tile_rows = pixel_step / kGemmPatchCols;
  int max_taps = 0;
  int64_t max_phase_pixels = 0, max_phase_tiles = 0;
  for (int64_t rh = 0; rh < p.stride_h; ++rh)
    for (int64_t rw = 0; rw < p.stride_w; ++rw) {
      max_taps = std::max(max_taps, phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh) *
                                        phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw));
      const int64_t extent_h = phase_span(p.out_h(), p.stride_h, p.pad_h, rh).extent;
      const int64_t extent_w = phase_span(p.out_w(), p.stride_w, p.pad_w, rw).extent;
      max_phase_pixels = std::max<int64_t>(max_phase_pixels, p.batch * extent_h * extent_w);
      max_phase_tiles = std::max<int64_t>(max_phase_tiles, p.batch * ((extent_h + tile_rows - 1) / tile_rows) *
                                                               ((extent_w + kGemmPatchCols - 1) / kGemmPatchCols));
    }
  plan.tap_groups = std::max(1, ceil_div_int(max_taps, kGemmTaps));
  plan.ic_tiles = ceil_div_int(p.in_channels_per_group(), plan.tile_m);
  plan.oc_tiles = ceil_div_int(p.out_channels_per_group(), plan.tile_n);
  const int64_t tiles = int64_t(plan.phases) * plan.tap_groups * plan.ic_tiles * plan.oc_tiles * p.groups;
  const int64_t steps = std::max<int64_t>(1, plan.patch ? max_phase_tiles : (max_phase_pixels + pixel_step - 1) / pixel_step);
  const int64_t splits = std::clamp<int64_t>(kGemmTargetBlocks / tiles, 1, std::min<int64_t>(steps, 256));
  if (plan.patch) {
    plan.tiles_per_split = (steps + splits - 1) / splits;
    plan.splits = (steps + plan.tiles_per_split - 1) / plan.tiles_per_split;
  } else {
    plan.pixels_per_split = (steps + splits - 1) / splits * pixel_step;
    plan.splits = std::max<int64_t>(1, (max_phase_pixels + plan.pixels_per_split - 1) / plan.pixels_per_split);
  }
  plan.g_layout = PhaseSplitLayout{p.batch,
                                   PhaseAxis{int(p.out_h()), int(p.stride_h), int(p.pad_h)},
                                   PhaseAxis{int(p.out_w()), int(p.stride_w), int(p.pad_w)},
                                   p.groups * padded_channels(p.out_channels_per_group())};
  plan.x_row = p.groups * padded_channels(p.in_channels_per_group());
  return plan;
}

// Fragment loads from [pixel (k)][channel] tiles, by operand width.
template <int kBytes> struct KMajorFragments;

template <> struct KMajorFragments<2> {
  // The pixel (within the k step) of the staged row whose address this lane gives ldmatrix for A.
  __device__ __forceinline__ static int a_pixel(int lane) { return ((lane >> 4) & 1) * 8 + (lane & 7); }
  // A (16 channels x 16 pixels): matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15);
  // `row`: the staged row of this lane's pixel (a_pixel).
  __device__ __forceinline__ static void a_at(uint32_t (&raw)[4], uint32_t tile, int row_bytes, int m, int row, int lane) {
    ldmatrix_x4_trans(raw, tile + row * row_bytes + (m + ((lane >> 3) & 1) * 8) * 2);
  }
  // B for channels n..n+15 (two n8 fragments): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
  __device__ __forceinline__ static void b(uint32_t (&raw)[4], uint32_t tile, int row_bytes, int n, int k, int lane) {
    ldmatrix_x4_trans(raw, tile + (k + ((lane >> 3) & 1) * 8 + (lane & 7)) * row_bytes + (n + ((lane >> 4) & 1) * 8) * 2);
  }
};

template <> struct KMajorFragments<4> {
  __device__ __forceinline__ static int a_pixel(int lane) { return lane & 3; }
  // m16n8k8 TF32: a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]; A[m][k] sits at row k. `row`:
  // the staged row of pixel t (a_pixel); pixel t + 4 sits four rows on (in both stagings).
  __device__ __forceinline__ static void a_at(uint32_t (&raw)[4], uint32_t tile, int row_bytes, int m, int row, int lane) {
    const int g = lane >> 2;
    const uint32_t base = tile + row * row_bytes + (m + g) * 4;
    raw[0] = lds32(base);
    raw[1] = lds32(base + 32);
    raw[2] = lds32(base + 4 * row_bytes);
    raw[3] = lds32(base + 4 * row_bytes + 32);
  }
  // b0 = B[t][g], b1 = B[t+4][g] for the n8 fragments at n and n + 8.
  __device__ __forceinline__ static void b(uint32_t (&raw)[4], uint32_t tile, int row_bytes, int n, int k, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const uint32_t base = tile + (k + t) * row_bytes + (n + g) * 4;
    raw[0] = lds32(base);
    raw[1] = lds32(base + 4 * row_bytes);
    raw[2] = lds32(base + 32);
    raw[3] = lds32(base + 4 * row_bytes + 32);
  }
};

// Two blocks per SM (128 registers), which the narrow tiles' group sums otherwise pushed to ~150; exact fp32's
// three-product fragments keep their ~170 (one block).
template <typename Math>
constexpr int gemm_min_blocks() { return std::is_same<Math, Fp32SplitMath>::value ? 1 : 2; }

// Grid as WeightBlock says; Shape: GemmShape<Math, TM, TN, patch steps (gemm_patch_steps) or per-tap>. kXBox: the
// patch steps' X by x_map's boxes (encode_gemm_x_box), else by 16-byte copies, from x_cl either way.
template <typename Math, typename Shape, int kStages, bool kXBox>
__global__ void __launch_bounds__(kGemmThreads, gemm_min_blocks<Math>())
grad_weight_gemm_kernel(ConvTransposeParams p, WeightGemmPlan plan, const typename Math::Smem* __restrict__ x_cl,
                        const __grid_constant__ CUtensorMap x_map, const typename Math::Smem* __restrict__ g_split,
                        float* __restrict__ weight_partial) {
  static_assert(!kXBox || Shape::kXBoxable, "X boxes serve patch steps");
  follow_previous_grid();
  using Smem = typename Math::Smem;
  using Frags = KMajorFragments<int(sizeof(Smem))>;
  constexpr int kXRowBytes = Shape::kXRowBytes, kGRowBytes = Shape::kGRowBytes;
  constexpr int kRows = Shape::kRows;
  constexpr bool kPatch = Shape::kPatch;
  constexpr int kGTileBytes = kRows * kGRowBytes, kXTileBytes = kRows * kXRowBytes;
  constexpr int kStageBytes = Shape::stage_size(kXBox);
  constexpr int kValuesPerPiece = 16 / int(sizeof(Smem));
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t x_bars = smem_address(smem) + Shape::smem_bytes(kStages, kXBox) - kStages * 8;  // (kXBox)

  const WeightBlock block(plan.phases, plan.tap_groups, plan.ic_tiles, int(p.stride_w));
  const int rh = block.rh, rw = block.rw, tap_group = block.tap_group, group = block.group;
  const int64_t split = block.split;
  const int ic0 = block.ic_tile * Shape::kTileM, oc0 = block.oc_tile * Shape::kTileN;
  const int taps_h = phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh);
  const int taps_w = phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw);
  const int taps = max(0, min(kGemmTaps, taps_h * taps_w - tap_group * kGemmTaps));
  const PhaseSplitLayout& gl = plan.g_layout;
  const int extent_h = gl.h.extent(rh), extent_w = gl.w.extent(rw);
  const int64_t phase_plane = int64_t(extent_h) * extent_w;
  const int64_t pixel_begin = split * plan.pixels_per_split;  // (per-tap steps)
  const int64_t pixel_end = min(p.batch * phase_plane, pixel_begin + plan.pixels_per_split);
  if (taps == 0) return;  // this phase has fewer taps; an empty split still writes its (zero) partials
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Warp -> (tap set, pixel group, warp tile); warps past the last tap set only copy. (Where one warp tile
  // and group hold all taps, as in the 64 x 64 tile, these fold to constants.)
  constexpr int kWarpTaps = Shape::kWarpTaps, kGroupWarps = Shape::kGroups * Shape::kWarpTiles;
  constexpr bool kAllMultiply = kGroupWarps * Shape::kTapWarps == kGemmThreads / 32;
  const int warp_tile = warp % Shape::kWarpTiles;
  const int warp_group = Shape::kGroups == 1 ? 0 : warp / Shape::kWarpTiles % Shape::kGroups;
  const int tap_set = Shape::kTapWarps == 1 ? 0 : warp / kGroupWarps;
  const int warp_m = warp_tile / Shape::kWarpsN, warp_n = warp_tile % Shape::kWarpsN;
  const bool multiplies = kAllMultiply || tap_set < Shape::kTapWarps;
  const int group_row = warp_group * Shape::kGroupPixels;
  const int first_tap = tap_set * kWarpTaps;  // the warp's taps: first_tap ... + kWarpTaps - 1

  int tap_kh[kGemmTaps], tap_off_h[kGemmTaps], tap_kw[kGemmTaps], tap_off_w[kGemmTaps];
#pragma unroll
  for (int t = 0; t < kGemmTaps; ++t) {
    const GemmTap tap = gemm_tap(p, rh, rw, taps_w, min(tap_group * kGemmTaps + t, taps_h * taps_w - 1));
    tap_kh[t] = tap.kh, tap_kw[t] = tap.kw, tap_off_h[t] = tap.off_h, tap_off_w[t] = tap.off_w;
  }
  // Entry first_tap + u of a tap table, by selects (a register array indexed at run time would live in local
  // memory).
  auto warp_tap = [&](const int (&table)[kGemmTaps], int u) {
    int value = table[u];
#pragma unroll
    for (int t = u + 1; t < kGemmTaps; ++t) value = first_tap + u == t ? table[t] : value;
    return value;
  };

  // Copy assignment: thread -> 16-byte piece of the G rows and of the X rows it copies, where the tile's rows have
  // that piece, and its first rows of each step: per-tap steps one pixel's G row and X rows (row0), patch steps
  // G rows g_row0 + pass x kGRowStep and X rows x_row0 + pass x kXRowStep, each of its pieces assigned apart, so
  // that a stage may hold more pieces than there are threads. Channel limits are per group.
  constexpr int kGThreads = kPatch ? Shape::kGPieces : Shape::kThreadsPerRow;  // threads per G row
  constexpr int kXThreads = kPatch ? Shape::kXPieces : Shape::kThreadsPerRow;  // threads per X row
  constexpr int kGRowStep = kGemmThreads / kGThreads, kXRowStep = kGemmThreads / kXThreads;
  const int g_piece = tid % kGThreads, x_piece = tid % kXThreads;
  const int g_row0 = tid / kGThreads, x_row0 = tid / kXThreads;
  const int row0 = g_row0;  // (per-tap steps: x_row0 too)
  const bool x_copies = kXThreads == Shape::kXPieces || x_piece < Shape::kXPieces;
  const bool g_copies = kGThreads == Shape::kGPieces || g_piece < Shape::kGPieces;
  const int in_padded = int(padded_channels(p.in_channels_per_group()));
  const int out_padded = int(padded_channels(p.out_channels_per_group()));
  const bool x_piece_ok = ic0 + x_piece * kValuesPerPiece < in_padded;
  const bool g_piece_ok = oc0 + g_piece * kValuesPerPiece < out_padded;
  const Smem* g_phase = g_split + (gl.phase_first_row(rh, rw)) * gl.row + group * out_padded + oc0 + g_piece * kValuesPerPiece;
  const Smem* x_group = x_cl + group * in_padded + ic0 + x_piece * kValuesPerPiece;
  const int in_h = int(p.in_h), in_w = int(p.in_w);

  // Patch steps: the tile grid of the phase plane, a thread's G pixel in the tile and its X patch rows.
  constexpr int kTileRows = Shape::kTileRows, kPatchCols = Shape::kPatchCols;
  constexpr int kPatchRows = Shape::kXRows;
  constexpr int kGPasses = (kRows + kGRowStep - 1) / kGRowStep, kXPasses = (kPatchRows + kXRowStep - 1) / kXRowStep;
  const int tiles_w = (extent_w + kGemmPatchCols - 1) / kGemmPatchCols, tiles_h = (extent_h + kTileRows - 1) / kTileRows;
  const int64_t tile_begin = split * plan.tiles_per_split;
  const int64_t tile_end = min(p.batch * tiles_h * tiles_w, tile_begin + plan.tiles_per_split);

  const int64_t steps = kPatch ? (tile_begin < tile_end ? tile_end - tile_begin : 0)
                               : pixel_begin < pixel_end ? (pixel_end - pixel_begin + kRows - 1) / kRows : 0;
  // The thread's copy row of the next step to load: its pixel and (image n, phase row a, column b). Steps
  // are loaded in order, so the position advances by kRows pixels: two divisions per block instead of
  // two per step (one of them 64-bit, a called subroutine), which were most of a step's copy instructions.
  // The thread's G row and its image's X rows are running pointers, and a tap's X row is that image's plus
  // a 32-bit pixel offset (planes are below 2^31 pixels, validate()) times the row: one wide multiply-add per
  // copy. (Computed from (n, a, b) per copy in 64-bit arithmetic, the addresses took ~25 instructions per X
  // copy, most of a step's ~280 per warp against its 32 MMAs.)
  int64_t pixel = pixel_begin + row0;
  int a = 0, b = 0, step_a = 0, step_b = 0;
  // (Bytes and unsigned 32-bit factors: a copy's address is one IMAD.WIDE.U32 with the image as addend.)
  const uint32_t x_row_bytes = uint32_t(plan.x_row) * uint32_t(sizeof(Smem));
  const uint32_t g_row_bytes = uint32_t(gl.row) * uint32_t(sizeof(Smem));
  const int64_t x_image_step = int64_t(in_h) * in_w * plan.x_row;
  const Smem* x_image = x_group;
  const Smem* g_row = g_phase;
  // Patch steps: the next tile to load (its row and column in the image's tile grid), the image's G plane, the
  // thread's G pixel in a tile, and the patch's origin relative to a tile's first pixel (the taps' least offsets).
  int tile_r = 0, tile_c = 0, tile_image = 0;
  int tiles_left = int(steps);  // (a split's tiles are far below 2^31: each is 8 x kTileRows pixels of G in memory)
  const Smem* g_image = g_phase;
  const int g_c = g_row0 % kGemmPatchCols;  // (kGRowStep is a multiple of the tile's width)
  int patch_h = tap_off_h[0], patch_w = tap_off_w[0];
#pragma unroll
  for (int t = 1; t < kGemmTaps; ++t) {
    if (t < taps) patch_h = min(patch_h, tap_off_h[t]), patch_w = min(patch_w, tap_off_w[t]);
  }
  if (steps > 0) {
    if constexpr (kPatch) {
      const int64_t image_tiles = int64_t(tiles_h) * tiles_w;
      const int64_t n = tile_begin / image_tiles;
      const int rc = int(tile_begin - n * image_tiles);
      tile_r = rc / tiles_w;
      tile_c = rc - tile_r * tiles_w;
      tile_image = int(n);
      x_image = x_group + n * x_image_step;
      g_image = g_phase + n * phase_plane * gl.row;
    } else {
      const int64_t n = pixel / phase_plane;
      const int ab = int(pixel - n * phase_plane);
      a = ab / extent_w;
      b = ab - a * extent_w;
      step_a = kRows / extent_w;
      step_b = kRows - step_a * extent_w;
      x_image = x_group + n * x_image_step;
      g_row = g_phase + pixel * gl.row;
    }
  }
  // A copy that is skipped (zero-filled) names the operand's first element, which always exists: past the
  // batch's last pixel the running pointers may lie past the copy.
  auto load_patch_stage = [&](uint32_t base, int stage) {
    const int a0 = tile_r * kTileRows, b0 = tile_c * kGemmPatchCols;
    if (g_copies) {
#pragma unroll
      for (int pass = 0; pass < kGPasses; ++pass) {
        const int j = g_row0 + pass * kGRowStep;  // the tile's pixel
        if (kRows % kGRowStep != 0 && j >= kRows) break;
        const int ga = a0 + j / kGemmPatchCols, gb = b0 + g_c;
        const bool ok = tiles_left > 0 && g_piece_ok && ga < extent_h && gb < extent_w;
        const uint32_t at = ok ? uint32_t(ga * extent_w + gb) : 0u;
        cp_async_16(base + g_piece * 16 + j * kGRowBytes,
                    reinterpret_cast<const unsigned char*>(ok ? g_image : g_split) + uint64_t(at) * g_row_bytes,
                    ok ? 16 : 0);
      }
    }
    if constexpr (kXBox) {
      if (tid == 0 && tiles_left > 0) {  // zeros outside the image, as the copies'
        const uint32_t bar = x_bars + 8 * stage;
        mbarrier_arrive_expect_tx(bar, kPatchRows * kXRowBytes);
        tma_load_4d(base + kGTileBytes, &x_map, group * in_padded + ic0, b0 + patch_w, a0 + patch_h, tile_image, bar);
      }
    } else if (x_copies) {
#pragma unroll
      for (int pass = 0; pass < kXPasses; ++pass) {
        const int q = x_row0 + pass * kXRowStep;  // patch row
        if (kPatchRows % kXRowStep != 0 && q >= kPatchRows) break;
        const int pr = q / kPatchCols, pc = q - pr * kPatchCols;
        const int ih = a0 + patch_h + pr, iw = b0 + patch_w + pc;
        const bool ok = tiles_left > 0 && x_piece_ok && unsigned(ih) < unsigned(in_h) && unsigned(iw) < unsigned(in_w);
        const uint32_t at = ok ? uint32_t(ih * in_w + iw) : 0u;
        cp_async_16(base + x_piece * 16 + kGTileBytes + q * kXRowBytes,
                    reinterpret_cast<const unsigned char*>(ok ? x_image : x_cl) + uint64_t(at) * x_row_bytes,
                    ok ? 16 : 0);
      }
    }
    --tiles_left;
    if (++tile_c == tiles_w) {
      tile_c = 0;
      if (++tile_r == tiles_h) {
        tile_r = 0;
        // (The image steps are recomputed from the parameters here, rarely, rather than kept in registers.)
        x_image += int64_t(p.in_h) * p.in_w * plan.x_row;
        g_image += phase_plane * gl.row;
        ++tile_image;
      }
    }
  };
  auto load_tap_stage = [&](uint32_t base) {
    const bool pixel_ok = pixel < pixel_end;
    if (g_copies) {
      const bool g_ok = pixel_ok && g_piece_ok;
      cp_async_16(base + g_piece * 16 + row0 * kGRowBytes, g_ok ? g_row : g_split, g_ok ? 16 : 0);
    }
    if (x_copies) {
#pragma unroll
      for (int t = 0; t < kGemmTaps; ++t) {
        if (t >= taps) break;
        const int ih = a + tap_off_h[t], iw = b + tap_off_w[t];
        const bool ok = pixel_ok && x_piece_ok && unsigned(ih) < unsigned(in_h) && unsigned(iw) < unsigned(in_w);
        const uint32_t at = ok ? uint32_t(ih * in_w + iw) : 0u;
        cp_async_16(base + x_piece * 16 + kGTileBytes + t * kXTileBytes + row0 * kXRowBytes,
                    reinterpret_cast<const unsigned char*>(ok ? x_image : x_cl) + uint64_t(at) * x_row_bytes,
                    ok ? 16 : 0);
      }
    }
    pixel += kRows;
    g_row += int64_t(kRows) * gl.row;
    a += step_a;
    b += step_b;
    if (b >= extent_w) {
      b -= extent_w;
      ++a;
    }
    while (a >= extent_h) {  // into the next image (several for planes smaller than a step)
      a -= extent_h;
      x_image += x_image_step;
    }
  };
  auto load_stage = [&](int stage) {
    const uint32_t base = smem_address(smem + stage * kStageBytes);
    if constexpr (kPatch) {
      load_patch_stage(base, stage);
    } else {
      load_tap_stage(base);
    }
  };
  // The staged row of this lane's A pixel (Frags::a_pixel) for tap t at k step k: per-tap steps stage tap t's
  // rows in its own tile; patch steps stage one patch, whose row for pixel (r, c) of the tile and tap t is
  // (r + dh) x kPatchCols + c + dw, (dh, dw) the tap's offset from the patch origin.
  const int lane_pixel = Frags::a_pixel(lane);
  int lane_patch_row[kWarpTaps];  // at k = 0, for the warp's taps
#pragma unroll
  for (int u = 0; u < kWarpTaps; ++u)
    lane_patch_row[u] = (lane_pixel / kGemmPatchCols + warp_tap(tap_off_h, u) - patch_h) * kPatchCols +
                        lane_pixel % kGemmPatchCols + warp_tap(tap_off_w, u) - patch_w;
  // (u: the warp's u-th tap, tap first_tap + u of the block)
  auto a_row = [&](int u, int k) {
    return kPatch ? lane_patch_row[u] + k / kGemmPatchCols * kPatchCols : (first_tap + u) * kRows + k + lane_pixel;
  };

  if constexpr (kXBox) {
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) mbarrier_init(x_bars + 8 * s, 1);
      mbarrier_init_fence();
    }
    __syncthreads();
  }
  constexpr int kMTiles = Shape::kMTiles, kNTiles = Shape::kNTiles;
  float acc[kWarpTaps][kMTiles][kNTiles][4];
#pragma unroll
  for (int k = 0; k < kWarpTaps * kMTiles * kNTiles * 4; ++k) (&acc[0][0][0][0])[k] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_stage(s);
    cp_async_commit();
  }
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `step` is visible; everyone is done with the stage the next copy overwrites
    const int64_t next = step + kStages - 1;
    if (next < steps) load_stage(int(next % kStages));
    cp_async_commit();
    if (!multiplies) continue;
    if constexpr (kXBox) mbarrier_wait(x_bars + 8 * int(step % kStages), uint32_t(step / kStages) & 1u);

    const uint32_t g_tile = smem_address(smem + int(step % kStages) * kStageBytes);
    // A block with all kGemmTaps taps (every phase of k4 s2) multiplies them straight through; the tap loop's
    // exits were a compare, a branch and a NOP per tap and k-step. (Not for exact fp32: its three-product
    // fragments in two copies of the loop spilled, 182 -> 255 registers and 136 bytes of stack.)
    auto multiply = [&](auto all_taps) {
#pragma unroll
      for (int ks = 0; ks < Shape::kGroupPixels / Math::kStep; ++ks) {
        const int k = group_row + ks * Math::kStep;
        typename Math::BFrag b[kNTiles];
#pragma unroll
        for (int j = 0; j < kNTiles; j += 2) {
          uint32_t raw_b[4];
          Frags::b(raw_b, g_tile, kGRowBytes, warp_n * Shape::kWarpN + j * 8, k, lane);
          Math::make_b(b[j], raw_b[0], raw_b[1]);
          Math::make_b(b[j + 1], raw_b[2], raw_b[3]);
        }
        // A block with all taps loads every tap's A fragments of the k step before its MMAs: one register set
        // reused per tap made each ldmatrix wait for the previous tap's MMAs and each MMA for its ldmatrix.
        constexpr int kAhead = decltype(all_taps)::value ? kWarpTaps : 1;
        uint32_t raw_a[kAhead][kMTiles][4];
        auto load_a = [&](int u, uint32_t (&raw)[kMTiles][4]) {
#pragma unroll
          for (int i = 0; i < kMTiles; ++i)
            Frags::a_at(raw[i], g_tile + kGTileBytes, kXRowBytes, warp_m * Shape::kWarpM + i * 16, a_row(u, k), lane);
        };
        if constexpr (kAhead > 1) {
#pragma unroll
          for (int u = 0; u < kWarpTaps; ++u) load_a(u, raw_a[u]);
        }
#pragma unroll
        for (int u = 0; u < kWarpTaps; ++u) {
          if (!decltype(all_taps)::value && first_tap + u >= taps) break;
          if constexpr (kAhead == 1) load_a(u, raw_a[0]);
#pragma unroll
          for (int i = 0; i < kMTiles; ++i) {
            typename Math::AFrag a;
            Math::make_a(a, raw_a[kAhead > 1 ? u : 0][i]);
#pragma unroll
            for (int j = 0; j < kNTiles; ++j) Math::mma(acc[u][i][j], a, b[j]);
          }
        }
      }
    };
    if (!std::is_same<Math, Fp32SplitMath>::value && taps == kGemmTaps) {
      multiply(std::true_type{});
    } else {
      multiply(std::false_type{});
    }
  }
  cp_async_wait<0>();

  // The pixel groups' sums, added in group order by group 0 of each tap set (through the stages' shared memory).
  if constexpr (Shape::kGroups > 1) {
    constexpr int kAccValues = kWarpTaps * kMTiles * kNTiles * 4;
    static_assert(Shape::kSumBytes == (Shape::kGroups - 1) * Shape::kWarpTiles * Shape::kTapWarps * kAccValues * 32 * 4,
                  "the launch's shared memory holds the group sums");
    float* sums = reinterpret_cast<float*>(smem);
    // (The sums slot of tap set `tap_set`, group q > 0 and this warp tile.)
    auto slot = [&](int q) {
      return ((tap_set * (Shape::kGroups - 1) + q - 1) * Shape::kWarpTiles + warp_tile) * kAccValues;
    };
    __syncthreads();  // every warp is done with the stages
    if (multiplies && warp_group > 0) {
#pragma unroll
      for (int k = 0; k < kAccValues; ++k) sums[(slot(warp_group) + k) * 32 + lane] = (&acc[0][0][0][0])[k];
    }
    __syncthreads();
    if (!multiplies || warp_group != 0) return;
    for (int q = 1; q < Shape::kGroups; ++q) {
#pragma unroll
      for (int k = 0; k < kAccValues; ++k) (&acc[0][0][0][0])[k] += sums[(slot(q) + k) * 32 + lane];
    }
  } else if (!multiplies) {
    return;
  }

  // Partials tap-major, [split][tap][input channel][output channel] (SplitSum's taps puts the sums in PyTorch's
  // layout): a lane's two output channels are adjacent, one 8-byte store where the row length is even, and a warp's
  // stores fill whole sectors. (In PyTorch's layout, taps innermost, each 4-byte store took a sector of its own: a
  // third of the kernel's L1-to-L2 sectors at kb_v0, Nsight Compute.)
  const int in_per_group = int(p.in_channels_per_group()), out_per_group = int(p.out_channels_per_group());
  const int64_t weight_numel = p.in_channels * out_per_group * p.kernel_h * p.kernel_w;
  const bool pairs = out_per_group % 2 == 0;
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int u = 0; u < kWarpTaps; ++u) {
    if (first_tap + u >= taps) break;
    const int64_t tap = int64_t(warp_tap(tap_kh, u)) * p.kernel_w + warp_tap(tap_kw, u);
    float* tap_partial = weight_partial + split * weight_numel + tap * p.in_channels * out_per_group;
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // (q = 2 h, 2 h + 1: rows g + 8 h, adjacent output channels)
          const int ic_local = ic0 + warp_m * Shape::kWarpM + i * 16 + g + h * 8;
          const int oc_local = oc0 + warp_n * Shape::kWarpN + j * 8 + 2 * t4;
          if (ic_local >= in_per_group || oc_local >= out_per_group) continue;
          float* at = tap_partial + (int64_t(group) * in_per_group + ic_local) * out_per_group + oc_local;
          if (pairs) {
            *reinterpret_cast<float2*>(at) = make_float2(acc[u][i][j][2 * h], acc[u][i][j][2 * h + 1]);
          } else {
            at[0] = acc[u][i][j][2 * h];
            if (oc_local + 1 < out_per_group) at[1] = acc[u][i][j][2 * h + 1];
          }
        }
  }
}

// The map of x_cl's X boxes for patch steps (sm_90 code on the device), or false where the shape, the device or
// FUSED_CONVT_NO_TMA rule them out (then the kernel copies X by cp.async).
template <typename Math>
bool encode_gemm_x_box(const ConvTransposeParams& p, const WeightGemmPlan& plan, const typename Math::Smem* x_cl,
                       CUtensorMap* map) {
  if (!plan.patch || tma_disabled() || current_device_attribute(cudaDevAttrComputeCapabilityMajor) < 9) return false;
  return with_gemm_shape<Math>(plan.tile_m, plan.tile_n, true, [&](auto shape) {
    using Shape = decltype(shape);
    if constexpr (Shape::kXBoxable) {
      // (Code of a 9.0 virtual architecture holds the TMA instructions, as it holds the launch wait.)
      const void* kernel = reinterpret_cast<const void*>(grad_weight_gemm_kernel<Math, Shape, kGemmMaxStages, true>);
      const int64_t dims[4] = {plan.x_row, p.in_w, p.in_h, p.batch};
      const uint32_t box[4] = {uint32_t(Shape::kXBoxChannels), uint32_t(Shape::kPatchCols),
                               uint32_t(Shape::kTileRows + 1), 1};
      return kernel_follows_previous_grid(kernel) &&
             encode_dense_map(map, x_cl, Shape::kValueBytes, 4, dims, box, CU_TENSOR_MAP_SWIZZLE_NONE);
    } else {
      return false;
    }
  });
}

// grad_weight's partial sums from X (x_cl; by x_map's boxes where given: encode_gemm_x_box) and G (g_split).
template <typename Math>
void launch_grad_weight_gemm(const ConvTransposeParams& p, const WeightGemmPlan& plan,
                             const typename Math::Smem* x_cl, const CUtensorMap* x_map,
                             const typename Math::Smem* g_split, float* weight_partial, cudaStream_t stream) {
  const int64_t grid_x = plan.splits * plan.phases;
  const int64_t grid_y = int64_t(plan.tap_groups) * plan.ic_tiles * plan.oc_tiles;
  if (grid_x > 0x7fffffff || grid_y > 65535 || p.groups > 65535)
    throw std::invalid_argument("fused_convt: grad_weight grid too large (kernel taps x channel tiles > 65535 "
                                "or groups > 65535)");
  with_gemm_shape<Math>(plan.tile_m, plan.tile_n, plan.patch, [&](auto shape) {
    using Shape = decltype(shape);
    auto launch = [&](auto stages, auto x_box) {
      constexpr int kStages = decltype(stages)::value;
      constexpr bool kXBox = decltype(x_box)::value;
      constexpr int kSmem = Shape::smem_bytes(kStages, kXBox);
      auto kernel = grad_weight_gemm_kernel<Math, Shape, kStages, kXBox>;
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmem, "cudaFuncSetAttribute(grad_weight_gemm_kernel)");
      alignas(64) static const CUtensorMap no_map{};  // (a parameter the copying kernel does not read)
      launch_kernel(kernel, {dim3(unsigned(grid_x), unsigned(grid_y), unsigned(p.groups)), dim3(kGemmThreads), kSmem,
                             stream},
                    "grad_weight_gemm_kernel", p, plan, x_cl, kXBox ? *x_map : no_map, g_split, weight_partial);
    };
    auto launch_staged = [&](auto stages) {
      if constexpr (Shape::kXBoxable) {
        if (x_map) return launch(stages, std::true_type{});
      }
      if (x_map) throw std::logic_error("fused_convt: grad_weight's X boxes given for a shape that takes none");
      launch(stages, std::false_type{});
    };
    const bool x_box = x_map != nullptr;
    const size_t available = max_dynamic_smem_bytes();
    if (available >= size_t(Shape::smem_bytes(kGemmMaxStages, x_box))) {
      launch_staged(std::integral_constant<int, kGemmMaxStages>{});
    } else if (available >= size_t(Shape::smem_bytes(2, x_box))) {
      launch_staged(std::integral_constant<int, 2>{});
    } else {
      throw std::runtime_error("fused_convt: grad_weight needs " + std::to_string(Shape::smem_bytes(2, x_box)) +
                               " bytes of shared memory per block; this device offers " + std::to_string(available));
    }
  });
}

}  // namespace fused_convt
