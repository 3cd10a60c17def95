// grad_weight on wgmma (sm_90a), TF32, bfloat16 and float16: the GEMM of grad_weight_gemm.cuh with operands the
// warpgroup instruction can take: TF32 comes from shared memory only K-major (here: pixel-contiguous), which NCHW x
// is and the g pass's channels-last G is not (16-bit operands could be either; one layout serves all three). For
// tap (kh, kw) of output phase (r_h, r_w), with the sum taken over the input's pixels q = (n, i, j) instead of the
// phase's (G is zero outside the phase grid),
//   grad_weight[ic, oc, kh, kw] = sum over q of G[phase, n, i - off_h, j - off_w, oc] * X[n, ic, i, j]
// is D = A x B with M = output channels (A = G at the tap's shift, loaded into registers: a register operand has
// no layout, and the shift is an address offset), N = input channels (B = X from shared memory: one window serves
// all four taps) and K = input pixels.
//
// A block owns one phase, its four taps, up to 128 output channels (a warpgroup per 64), 64 input channels and a
// contiguous run ("split") of K chunks; a chunk is 128 bytes of pixels (32 TF32, 64 16-bit) of one input row
// (n, i, j0 ...), or, where rows are half a chunk (16-bit kb_v0; not in wide TF32 tiles, whose registers are spent),
// two whole rows (n, i and i + 1), which NCHW x holds contiguously (x's map is [image][channel][group of kRows
// rows][pixel of the group]: a chunk is one box either way). A producer thread brings each chunk into a pipeline
// stage with the Tensor Memory Accelerator, in the 128-byte swizzle: X as one box of 64 channels x a chunk (the
// layout wgmma reads B in), and the G pixels the four taps pair with it, the chunk's rows plus one of phase rows x
// its columns plus one (zeros outside the phase grid), as boxes of 128 bytes of channels (conflict-free loads of A:
// 32-bit loads for TF32, ldmatrix.trans for 16-bit values). The consumer warpgroups load A fragments and issue 16
// wgmmas per chunk (4 k steps of 32 bytes x 4 taps, m64n64k8 / k16, in two halves whose fragments alternate between
// two register sets) and release the stage to the producer once they are done. Each split writes its partial sums
// tap-major (SplitSum); sum_splits adds them in order.
//
// Narrow tiles serve 16 output channels (kb_v0), where a warpgroup's 64 rows of M would be 3/4 empty: M is then the
// four taps x 16 channels, each warp's 16 rows one tap's (A comes from registers, so each warp reads G at its own
// tap's shift), and N 32 input channels: one m64n32 wgmma per k step. G's boxes keep their 128-byte rows, the
// channels past the 16 zero-filled by the TMA and never read; X's box holds 32 channels.
//
// X is read in place (NCHW) or transposed into the workspace first (NHWC). Float X is rounded to TF32 in shared
// memory, by the producer warpgroup's idle warps as each stage lands, as every other TF32 operand of the library is
// rounded: the tensor cores would otherwise truncate it, a bias of -2^-11 on average. (A separate rounding pass
// over x cost 0.1 ms at kb_v1.)
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "cuda_common.cuh"
#include "fused_convt/api.h"
#include "grad_weight_gemm.cuh"
#include "mma.cuh"
#include "pair_problem.h"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_phases.cuh"

namespace fused_convt {

constexpr int kWgmmaIcTile = 64;        // N of the wgmma (narrow tiles: kWgmmaNarrowIcTile)
constexpr int kWgmmaOcPerGroup = 64;    // M of a warpgroup
constexpr int kWgmmaNarrowIcTile = 32;  // narrow tiles' N
// Narrow blocks resident per SM: their consumers hold 16 accumulators and 16 A registers, so two blocks fit the
// register file at 128 a thread (no setmaxnreg split) and, at their stage counts, an SM's shared memory.
constexpr int kWgmmaNarrowBlocksPerSm = 2;

// Whether tiles of operands of `bytes` may take chunks of two input rows: narrow tiles, and 16-bit wide ones (wide
// TF32 tiles have no registers left for the second row's A offsets).
constexpr bool wgmma_two_row_chunks(int bytes, bool narrow) { return narrow || bytes == 2; }

// A stage's geometry for operands of kBytes (4: TF32, 2: bfloat16 / float16), wide or narrow tiles, chunks of kRows
// input rows.
template <int kBytes, bool kNarrow = false, int kRows = 1>
struct WgmmaGeometry {
  static_assert(kRows == 1 || (kRows == 2 && wgmma_two_row_chunks(kBytes, kNarrow)), "chunks of one or two rows");
  static constexpr int kChunk = 128 / kBytes;        // pixels (K) per stage
  static constexpr int kRowPixels = kChunk / kRows;  // a chunk's columns (two rows: a chunk half, the input's width)
  static constexpr int kStepPixels = 32 / kBytes;    // K of one wgmma (32 bytes)
  static constexpr int kBoxChannels = 128 / kBytes;  // output channels per G box (narrow: 16, the rest zero fill)
  static constexpr int kIcTile = kNarrow ? kWgmmaNarrowIcTile : kWgmmaIcTile;  // N
  static constexpr int kXBox = kIcTile * 128;        // X: kIcTile channels x one 128-byte row of pixels
  static constexpr int kBoxesPerGroup = kNarrow ? 1 : kWgmmaOcPerGroup / kBoxChannels;
  static constexpr int kWarpTaps = kNarrow ? 1 : kWgmmaTaps;  // taps (accumulator sets) per warp
  static constexpr int kGCols = kRowPixels + 1;      // G columns a chunk's taps read: two column offsets
  static constexpr int kGRows = (kRows + 1) * kGCols;  // 128-byte rows of a G box: two row offsets
  static constexpr int kGBox = (kGRows * 128 + 1023) / 1024 * 1024;  // box starts 1024-byte aligned
  // Stage bytes (X's box, then the G boxes of the block's channels) and the kernel's shared memory (stages
  // 1024-byte aligned, as the 128-byte swizzle's pattern repeats every 1024 bytes, then the barriers).
  static constexpr int stage_bytes(int warpgroups) { return kXBox + warpgroups * kBoxesPerGroup * kGBox; }
  // A narrow stage (13 KB TF32, 21 KB 16-bit, 17 KB 16-bit of two rows) holds a quarter of a wide warpgroup's MMAs:
  // more of them in flight, up to 8, as many as let two narrow blocks share an SM (kWgmmaNarrowBlocksPerSm; each block
  // also reserves 1 KB, and smem_bytes adds 1 KB for the alignment and the barriers of up to 8 stages).
  static constexpr int kStages =
      kNarrow ? std::min(8, (kSm90SmSmem / kWgmmaNarrowBlocksPerSm - 1024 - 1024 - 3 * 8 * 8) / stage_bytes(1)) : 4;
  static constexpr int smem_bytes(int warpgroups) { return 1024 + kStages * stage_bytes(warpgroups) + 3 * kStages * 8; }
};

// Split count for about one wave on an H100 (wide tiles: one block per SM, narrow: kWgmmaNarrowBlocksPerSm), fixed
// so that the split count, and the bits, do not depend on the device.
constexpr int64_t kWgmmaTargetBlocks = 128;
constexpr int64_t kWgmmaNarrowTargetBlocks = 256;

// Whether to take this path (FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT set and not "0": the mma.sync GEMM everywhere, so
// that tests and timings on a Hopper machine can compare the two). Read at each call.
inline bool wgmma_grad_weight_disabled() { return env_switch_on("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT"); }

struct WgmmaWeightPlan {
  bool narrow;  // narrow tiles (kWgmmaNarrowOc)
  int rows;     // input rows per chunk (WgmmaGeometry's kRows)
  int phases, warpgroups, oc_blocks, ic_tiles;
  int64_t splits, chunks_per_split;
  WgmmaPhaseTaps taps[kWgmmaMaxPhases];
};

// The plan where the problem has this path's shape, whatever the device: one group; wide tiles: input channels a
// multiple of 64, output channels 64 (one warpgroup per block) or a multiple of 128 (two); narrow tiles: input
// channels a multiple of 32, 16 output channels; phases as wgmma_phase_tables takes them; input rows of whole
// chunks (128 bytes), or (narrow tiles, 16-bit wide ones) of half a chunk in images of even height. (The caller
// also needs x 16-byte aligned: wgmma_weight_input_ok.)
inline bool plan_weight_wgmma_shape(const ConvTransposeParams& p, int elem_bytes, WgmmaWeightPlan* plan) {
  const int64_t cin = p.in_channels, cout = p.out_channels, chunk = 128 / elem_bytes;
  const bool narrow = cout == kWgmmaNarrowOc && cin % kWgmmaNarrowIcTile == 0;
  const bool wide = cin % kWgmmaIcTile == 0 && (cout == 64 || cout % 128 == 0);
  // Chunks of one row, or of two where a row is half a chunk (in images of even height); 0: neither.
  const bool two_rows = wgmma_two_row_chunks(elem_bytes, narrow) && 2 * p.in_w == chunk && p.in_h % 2 == 0;
  const int rows = p.in_w % chunk == 0 ? 1 : two_rows ? 2 : 0;
  // (An empty batch has no tensor map: the driver refuses zero extents. G's pixel rows are 32-bit TMA
  // coordinates.)
  if (p.groups != 1 || !(narrow || wide) || rows == 0 || p.batch == 0 || p.output_numel() / cout > INT32_MAX ||
      !wgmma_phase_tables(p, plan->taps))
    return false;
  const int64_t chunks = p.batch * p.in_h * p.in_w / chunk;  // per phase
  plan->narrow = narrow;
  plan->rows = rows;
  plan->phases = int(p.stride_h * p.stride_w);
  plan->warpgroups = narrow || cout == 64 ? 1 : 2;
  plan->oc_blocks = narrow ? 1 : int(cout / (kWgmmaOcPerGroup * plan->warpgroups));
  plan->ic_tiles = int(cin / (narrow ? kWgmmaNarrowIcTile : kWgmmaIcTile));
  const int64_t tiles = int64_t(plan->phases) * plan->oc_blocks * plan->ic_tiles;
  const int64_t target = narrow ? kWgmmaNarrowTargetBlocks : kWgmmaTargetBlocks;
  const int64_t splits = std::clamp<int64_t>(target / tiles, 1, std::max<int64_t>(1, chunks));
  plan->chunks_per_split = std::max<int64_t>(1, (chunks + splits - 1) / splits);
  plan->splits = std::max<int64_t>(1, (chunks + plan->chunks_per_split - 1) / plan->chunks_per_split);
  return true;
}

// The plan for this call on this device, or false (then the mma.sync GEMM runs): the shape above, an sm_90a
// build on a compute capability 9.0 device, the driver's TMA encoder, and the switch.
inline bool plan_weight_wgmma(const ConvTransposeParams& p, int elem_bytes, WgmmaWeightPlan* plan) {
  return !wgmma_grad_weight_disabled() && plan_weight_wgmma_shape(p, elem_bytes, plan) && wgmma_backward_runs_here();
}

// x as this path reads it: 16-byte aligned (the TMA's base address).
inline bool wgmma_weight_input_ok(const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; }

struct WgmmaWeightArgs {
  ConvTransposeParams p;
  WgmmaWeightPlan plan;
};

// Grid: x = phase + phases x split, y = input channel tile + ic_tiles x output channel block. Threads: the
// consumer warpgroups, then the producer warpgroup (one thread of it issues the copies). T: float (TF32 operands),
// __nv_bfloat16 or __half. kNarrow: narrow tiles (one consumer warpgroup); kRows: input rows per chunk.
template <typename T, int kWgs, bool kNarrow, int kRows>
__global__ void __launch_bounds__((kWgs + 1) * 128, kNarrow ? kWgmmaNarrowBlocksPerSm : 1)
    grad_weight_wgmma_kernel(const __grid_constant__ WgmmaGMaps g_maps, const __grid_constant__ CUtensorMap x_map,
                             const __grid_constant__ WgmmaWeightArgs args, float* __restrict__ weight_partial) {
  follow_previous_grid();
#ifdef FCT_WGMMA_ENABLED
  using Geo = WgmmaGeometry<int(sizeof(T)), kNarrow, kRows>;
  static_assert(!kNarrow || kWgs == 1, "narrow tiles: one consumer warpgroup");
  constexpr int kStages = Geo::kStages, kStageBytes = Geo::stage_bytes(kWgs), kBoxes = kWgs * Geo::kBoxesPerGroup;
  constexpr int kWarpTaps = Geo::kWarpTaps, kN = Geo::kIcTile;
  constexpr int kSteps = 128 / 32, kHalfSteps = kSteps / 2;  // wgmma k steps per chunk and half chunk
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ConvTransposeParams& p = args.p;
  const WgmmaWeightPlan& plan = args.plan;
  const uint32_t smem = (smem_address(smem_raw) + 1023) & ~1023u;
  const uint32_t full_bar = smem + kStages * kStageBytes, empty_bar = full_bar + 8 * kStages;
  // Float: a stage's X is rounded in place before the consumers read it; they wait on `ready` (the rounding warps'
  // arrivals) instead of `full`.
  constexpr bool kRoundX = sizeof(T) == 4;
  constexpr int kRoundWarps = 3;  // the producer warpgroup's warps 1-3
  const uint32_t ready_bar = kRoundX ? empty_bar + 8 * kStages : full_bar;

  const int phase = int(blockIdx.x % plan.phases);
  const int64_t split = blockIdx.x / plan.phases;
  const int ic0 = int(blockIdx.y % plan.ic_tiles) * kN;
  const int oc0 = int(blockIdx.y / plan.ic_tiles) * kWgs * kWgmmaOcPerGroup;
  const WgmmaPhaseTaps& taps = plan.taps[phase];
  const int max_h = taps.max_h, max_w = taps.max_w;  // G's box starts at the larger offsets' pixel
  // 32-bit chunk numbers: a phase's chunks are below 2^31 (plan_weight_wgmma_shape). A chunk: kRows rows of a
  // group of rows (n, i ... i + kRows - 1), kRowPixels columns of them.
  const int row_chunks = int(p.in_w) / Geo::kRowPixels, image_groups = int(p.in_h) / kRows;
  const int chunks = int(p.batch) * image_groups * row_chunks;
  const int begin = int(split * plan.chunks_per_split);
  const int count = max(0, min(chunks, begin + int(plan.chunks_per_split)) - begin);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + 8 * s, 1);
      mbarrier_init(empty_bar + 8 * s, kWgs * 4);  // one arrival per consumer warp
      if (kRoundX) mbarrier_init(ready_bar + 8 * s, kRoundWarps);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (threadIdx.x >= kWgs * 128) {  // the producer warpgroup: one thread issues every copy, warps 1-3 round X
    // (Narrow blocks keep 128 registers a thread: two share the register file, and an .inc of the consumers beyond
    // what the producers' .dec frees would wait forever.)
    if constexpr (!kNarrow) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWgmmaProducerRegisters));
    const int rounder = int(threadIdx.x) - kWgs * 128 - 32;
    if (kRoundX && rounder >= 0) {
      // Each stage's X box to TF32 (round to nearest, as every TF32 operand of the library: the tensor cores would
      // truncate it, a bias of -2^-11 on average), in place: the swizzle moves whole 16-byte pieces.
      for (int i = 0; i < count; ++i) {
        const int s = i % kStages;
        const uint32_t stage = smem + s * kStageBytes;
        mbarrier_wait(full_bar + 8 * s, (i / kStages) & 1);
        for (int v = rounder; v < Geo::kXBox / 16; v += kRoundWarps * 32) {
          const uint4 q = lds128(stage + 16 * v);
          sts128(stage + 16 * v, make_uint4(round_to_tf32(__uint_as_float(q.x)), round_to_tf32(__uint_as_float(q.y)),
                                            round_to_tf32(__uint_as_float(q.z)), round_to_tf32(__uint_as_float(q.w))));
        }
        fence_proxy_async_shared();  // the rounded values visible to wgmma
        __syncwarp();
        if (threadIdx.x % 32 == 0) mbarrier_arrive(ready_bar + 8 * s);
      }
      return;
    }
    if (threadIdx.x != kWgs * 128) return;
    const CUtensorMap* g_map = &g_maps.phase[phase];
    for (int i = 0; i < count; ++i) {
      const int s = i % kStages;
      if (i >= kStages) mbarrier_wait(empty_bar + 8 * s, (i / kStages - 1) & 1);
      const int chunk = begin + i, group = chunk / row_chunks;  // group: n x image_groups + i / kRows
      const int j0 = (chunk - group * row_chunks) * Geo::kRowPixels, n = group / image_groups;
      const int in_row = (group - n * image_groups) * kRows;
      const uint32_t stage = smem + s * kStageBytes, bar = full_bar + 8 * s;
      mbarrier_arrive_expect_tx(bar, Geo::kXBox + kBoxes * Geo::kGRows * 128);
      tma_load_4d(stage, &x_map, j0, in_row / kRows, ic0, n, bar);
#pragma unroll
      for (int b = 0; b < kBoxes; ++b)
        tma_load_4d(stage + Geo::kXBox + b * Geo::kGBox, g_map, oc0 + Geo::kBoxChannels * b, j0 - max_w,
                    in_row - max_h, n, bar);
    }
    return;
  }

  if constexpr (!kNarrow) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWgmmaConsumerRegisters<kWgs>));
  // Consumer warpgroup wg. Wide tiles: output channels oc0 + 64 wg ... of every tap, warp w's rows 16 w ...;
  // narrow: warp w's rows are tap w's 16 channels. The warpgroup index through a shuffle (uniform registers for the
  // addresses, as in pair_forward_kernel).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0), warp = int(threadIdx.x / 32) % 4;
  const int lane = int(threadIdx.x % 32), g = lane / 4, t4 = lane % 4;
  const int row0 = kNarrow ? 0 : wg * kWgmmaOcPerGroup + 16 * warp;  // the warp's first A row (output channel)
  auto tap_of = [&](int t) { return kNarrow ? warp : t; };           // accumulator set t's tap
  // Tap t's pixel k (of chunk row r, column c) sits in G's box row (r + max_h - off_h) x kGCols + max_w - off_w + c,
  // whose 16-byte pieces the swizzle permutes by the row's low three bits; a k step moves 8 or 16 rows on, which
  // keeps them, so one offset per load of a tap serves every k step of a row (of the chunk; of two rows, a half
  // chunk's: a_offset[r]). TF32: four 32-bit loads, of pixels t4 and t4 + 4 (q / 2) and rows row0 + g and + 8
  // (q % 2, two pieces on); 16-bit: one ldmatrix.trans of the warp's 16 rows x 16 pixels, this lane giving the
  // address of pixel (lane & 7) + 8 ((lane >> 4) & 1) and rows 8 ((lane >> 3) & 1) ... + 7.
  constexpr int kLoads = sizeof(T) == 4 ? 4 : 1;
  uint32_t a_offset[kRows][kWarpTaps][kLoads];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int t = 0; t < kWarpTaps; ++t)
#pragma unroll
      for (int q = 0; q < kLoads; ++q) {
        const int tap = tap_of(t);
        const int tap_row = (r + max_h - taps.off_h[tap]) * Geo::kGCols + max_w - taps.off_w[tap];
        const int channel = row0 + (sizeof(T) == 4 ? g + 8 * (q & 1) : 8 * ((lane >> 3) & 1));  // of the block's
        const int box = channel / Geo::kBoxChannels, in_box = channel % Geo::kBoxChannels;
        const int pixel = sizeof(T) == 4 ? t4 + 4 * (q >> 1) : (lane & 7) + 8 * ((lane >> 4) & 1);
        const uint32_t row = uint32_t(tap_row + pixel);
        const uint32_t piece = uint32_t(in_box * int(sizeof(T))) / 16;
        a_offset[r][t][q] = Geo::kXBox + uint32_t(box) * Geo::kGBox + row * 128 + ((piece ^ (row & 7)) << 4) +
                            uint32_t(in_box * int(sizeof(T))) % 16;
      }
  float acc[kWarpTaps][kN / 2];
  // Half h of chunk i: its A fragments into `a` (registers that must not change until its wgmmas are done: two
  // sets used in turn, and the wait after each half retires the one before), its wgmmas (8 wide, 2 narrow), then
  // the wait; after the first half, the previous chunk's stage is released. (Two-row chunks: half h is row h.)
  auto half = [&](int i, int h, uint32_t (&a)[kHalfSteps][kWarpTaps][4]) {
    const int s = i % kStages, r = kRows == 1 ? 0 : h;
    const uint32_t stage = smem + s * kStageBytes;
    if (h == 0) mbarrier_wait(ready_bar + 8 * s, (i / kStages) & 1);
#pragma unroll
    for (int kk = 0; kk < kHalfSteps; ++kk) {
      const uint32_t step = stage + ((kRows == 1 ? h * kHalfSteps : 0) + kk) * Geo::kStepPixels * 128;
#pragma unroll
      for (int t = 0; t < kWarpTaps; ++t) {
        if constexpr (sizeof(T) == 4) {
#pragma unroll
          for (int q = 0; q < 4; ++q) a[kk][t][q] = lds32(step + a_offset[r][t][q]);
        } else {
          ldmatrix_x4_trans(a[kk][t], step + a_offset[r][t][0]);
        }
      }
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHalfSteps; ++kk)
#pragma unroll
      for (int t = 0; t < kWarpTaps; ++t)
        wgmma_m64n_rs<T, kN>(acc[t], a[kk][t], wgmma_sw128_descriptor(stage + (h * kHalfSteps + kk) * 32),
                             (i | h | kk) != 0);
    wgmma_commit();
    if (i > 0 || h > 0) wgmma_wait<1>();
    if (h == 0 && i > 0 && lane == 0) mbarrier_arrive(empty_bar + 8 * ((i - 1) % kStages));
  };
  uint32_t a_first[kHalfSteps][kWarpTaps][4], a_second[kHalfSteps][kWarpTaps][4];
#pragma unroll 1
  for (int i = 0; i < count; ++i) {
    half(i, 0, a_first);
    half(i, 1, a_second);
  }
  wgmma_wait_all();
  if (count == 0) {
#pragma unroll
    for (int t = 0; t < kWarpTaps; ++t)
#pragma unroll
      for (int e = 0; e < kN / 2; ++e) acc[t][e] = 0.0f;
  }

  // acc[t][4 j + q]: output channel oc0 + row0 + g + 8 (q / 2), input channel ic0 + 8 j + 2 t4 + q % 2. The
  // partials are tap-major, [tap][output channel][input channel] (SplitSum::inner), so that a lane's two adjacent
  // input channels are one 8-byte store and a quad's stores one whole sector. (A split's partials are one weight's
  // values: 32-bit offsets, validate().)
  const int out_channels = int(p.out_channels), in_channels = int(p.in_channels);
  float* partial = weight_partial + split * p.weight_numel();
#pragma unroll
  for (int t = 0; t < kWarpTaps; ++t) {
    const int first = (taps.tap[tap_of(t)] * out_channels + oc0 + row0 + g) * in_channels + ic0 + 2 * t4;
#pragma unroll
    for (int e = 0; e < kN / 2; e += 2)
      *reinterpret_cast<float2*>(partial + first + 8 * ((e % 4) / 2) * in_channels + 8 * (e / 4)) =
          make_float2(acc[t][e], acc[t][e + 1]);
  }
#endif
}

// x's and G's tensor maps: x [image][channel][group of kRows rows][pixel of the group] (x_nchw), G of each phase
// [image][phase row][phase column][row of channels] (g_split, laid out as g_layout), both in the kernel's boxes;
// false where the driver refuses one.
// (Narrow tiles: G's boxes are wider than its 16-channel rows; the TMA fills the rest with zeros, which no
// fragment reads.)
template <int kBytes, bool kNarrow, int kRows>
inline bool encode_wgmma_maps(const ConvTransposeParams& p, const void* x_nchw,
                              const PhaseSplitLayout& g_layout, const void* g_split, CUtensorMap* x_map,
                              WgmmaGMaps* g_maps) {
  using Geo = WgmmaGeometry<kBytes, kNarrow, kRows>;
  const int64_t x_dims[4] = {kRows * p.in_w, p.in_h / kRows, p.in_channels, p.batch};
  const uint32_t x_box[4] = {Geo::kChunk, 1, Geo::kIcTile, 1};
  if (!encode_dense_map(x_map, x_nchw, kBytes, 4, x_dims, x_box, CU_TENSOR_MAP_SWIZZLE_128B)) return false;
  const uint32_t g_box[4] = {Geo::kBoxChannels, Geo::kGCols, kRows + 1, 1};
  return encode_g_phase_maps(p, kBytes, g_layout, g_split, g_box, g_maps);
}

// grad_weight's partial sums (plan.splits x weight values) from x (T; NCHW, or NHWC: transposed into x_copy
// first, so that both layouts give the same bits) and G (g_split, laid out as
// g_layout).
template <typename T>
void launch_grad_weight_wgmma(const ConvTransposeParams& p, const WgmmaWeightPlan& plan,
                              const PhaseSplitLayout& g_layout, const T* x, bool x_channels_last, void* x_copy,
                              const void* g_split, float* weight_partial, cudaStream_t stream) {
  constexpr int kBytes = int(sizeof(T));
  const void* x_nchw = x;
  if (x_channels_last) {
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    transpose_cuda(x, x_copy, p.batch, p.in_h * p.in_w, p.in_channels, kBytes, CudaContext{device, stream});
    x_nchw = x_copy;
  }
  const WgmmaWeightArgs args{p, plan};
  const dim3 grid(unsigned(plan.splits * plan.phases), unsigned(plan.ic_tiles * plan.oc_blocks));
  auto launch = [&](auto warpgroups, auto narrow, auto rows) {
    constexpr int kWgs = decltype(warpgroups)::value, kRows = decltype(rows)::value;
    constexpr bool kNarrow = decltype(narrow)::value;
    alignas(64) CUtensorMap x_map{};
    alignas(64) WgmmaGMaps g_maps{};
    if (!encode_wgmma_maps<kBytes, kNarrow, kRows>(p, x_nchw, g_layout, g_split, &x_map, &g_maps))
      throw std::runtime_error("fused_convt: cuTensorMapEncodeTiled failed for grad_weight's operands");
    const int smem = WgmmaGeometry<kBytes, kNarrow, kRows>::smem_bytes(kWgs);
    auto kernel = grad_weight_wgmma_kernel<T, kWgs, kNarrow, kRows>;
    // Narrow: the largest shared-memory carve-out, which two blocks' stages need.
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, "cudaFuncSetAttribute(grad_weight_wgmma_kernel)",
                       kNarrow);
    launch_kernel(kernel, {grid, dim3((kWgs + 1) * 128), size_t(smem), stream}, "grad_weight_wgmma_kernel", g_maps,
                  x_map, args, weight_partial);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  auto with_tiles = [&](auto narrow, auto rows) {
    if constexpr (!decltype(narrow)::value) {
      if (plan.warpgroups == 2) return launch(Two{}, narrow, rows);
    }
    launch(One{}, narrow, rows);
  };
  auto with_rows = [&](auto narrow) {
    if constexpr (wgmma_two_row_chunks(kBytes, decltype(narrow)::value)) {
      if (plan.rows == 2) return with_tiles(narrow, Two{});
    }
    with_tiles(narrow, One{});
  };
  if (plan.narrow) with_rows(std::true_type{});
  else with_rows(std::false_type{});
}

}  // namespace fused_convt
