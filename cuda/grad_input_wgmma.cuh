// grad_input on wgmma (sm_90a), TF32, bfloat16 and float16, from the g pass's phase-split G, which the backward
// makes where grad_weight is wanted. For input pixel (n, i, j) and input channel ic,
//   grad_input[n, ic, i, j] = sum over phases, their four taps t and output channels oc of
//                             G[phase, n, i - off_h[t], j - off_w[t], oc] * W[ic, oc, tap[t]]
// (wgmma_phases.cuh), which is D = A x B with M = input pixels (A = G at the tap's shift, loaded into registers:
// the shift is an address offset, as in grad_weight_wgmma.cuh), N = 64 input channels (B = the weights, packed
// [phase x tap][ic][oc] so that K is contiguous, as wgmma reads TF32 from shared memory) and K = phases x taps x
// output channels. Every tap adds into the same accumulators, so no partial sums leave the block.
//
// A block (wide tiles) owns 64 input channels and a tile of 8 input rows x 64 columns of one image; each of its two
// consumer warpgroups owns 4 of those rows, one 64-pixel m tile (32 accumulators per thread) per row (narrow tiles,
// for 16 output channels: kWgmmaNarrowOc). A pipeline stage holds one phase's chunk of output channels (one
// 128-byte row: 32 TF32 or 64 16-bit values), brought by one producer thread with the Tensor Memory Accelerator in
// the 128-byte swizzle: G as one box of 9 phase rows x 65 columns (the four taps' windows overlap in it), and the
// four taps' weights as one box of 4 x 64 channels. Per tap and k step of 32 bytes, a warpgroup loads its A
// fragments with ldmatrix (the TF32 fragment is the 16-bit one's words) and issues one m64n64 wgmma per m tile;
// those groups alternate between two register sets, as in grad_weight_wgmma.cuh. The sums are stored straight from
// the accumulators: for each channel, eight lanes hold eight neighbouring pixels (32-byte pieces for float).
//
// What bounds it (docs/optimizations.md 9e): reading G once from DRAM (kb_v1: 1.1 GB TF32, Nsight Compute 69% of
// DRAM's peak, L2 72%). A stage reads 74 KB of G and 32 KB of weights from L2 for 8.4 MFLOP (TF32).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "cuda_common.cuh"
#include "fused_convt/api.h"
#include "mma.cuh"
#include "pair_problem.h"
#include "tc_problem.h"
#include "tma.cuh"
#include "wgmma.cuh"
#include "wgmma_phases.cuh"

namespace fused_convt {

constexpr int kInputWgmmaGroups = 2;  // consumer warpgroups
// Narrow tiles serve 16 output channels (kb_v0: 32 input channels, rows of 32), where a wide tile's 64 input
// channels, 64-pixel rows and 128-byte chunks of output channels would be mostly empty: N is 32 input channels, an m
// tile of 64 pixels is two rows of 32 (each warp's 16 pixels half a row, so its A offsets are its own), and a stage's
// K is the 16 channels, in rows of their bytes (64 TF32, 32 16-bit: two k steps or one) in the swizzle of that span.
// Their consumers hold 2 m tiles of 16 accumulators, so two blocks share an SM (no setmaxnreg split), each with a
// stage per phase (27 KB TF32, 14 KB 16-bit).
constexpr int kInputWgmmaNarrowBlocksPerSm = 2;

// A block's geometry for operands of kBytes (4: TF32, 2: bfloat16 / float16), wide or narrow tiles.
template <int kBytes, bool kNarrow = false>
struct InputWgmmaGeometry {
  static constexpr int kChannels = kNarrow ? 32 : 64;  // input channels per block: N of the wgmma
  static constexpr int kCols = kNarrow ? 32 : 64;      // input columns of a tile (an m tile: 64 / kCols rows)
  static constexpr int kTileRows = 64 / kCols;         // input rows per m tile
  // m tiles per warpgroup: wide 4, in two stages of 106 KB (kb_v1 alone on the H100: 0.461 / 0.250 ms TF32 /
  // bf16), not 2 in three of 73 KB (0.482 / 0.270 ms), which read more L2 bytes per FLOP; narrow 2.
  static constexpr int kMTiles = kNarrow ? 2 : 4;
  static constexpr int kRows = kInputWgmmaGroups * kMTiles * kTileRows;  // input rows per block
  static constexpr int kRowBytes = kNarrow ? kWgmmaNarrowOc * kBytes : 128;  // a box row: K of a stage
  static constexpr int kOcChunk = kRowBytes / kBytes;  // output channels per stage
  static constexpr int kSteps = kRowBytes / 32;        // k steps of 32 bytes per tap
  static constexpr int kGCols = kCols + 1, kGRows = kRows + 1;
  static constexpr int kGBytes = kGRows * kGCols * kRowBytes;
  static constexpr int kGBox = (kGBytes + 1023) / 1024 * 1024;  // the weights' box starts 1024-byte aligned
  static constexpr int kWBox = kWgmmaTaps * kChannels * kRowBytes;
  static constexpr int kStageBytes = kGBox + kWBox;
  static constexpr int kBlocksPerSm = kNarrow ? kInputWgmmaNarrowBlocksPerSm : 1;
  // As many stages as fit (at most 4: narrow tiles, one per phase) the blocks of an SM, after each one's 1024-byte
  // alignment, its barriers and (two blocks) the 1 KB the system reserves per block.
  static constexpr int kStages = std::min(
      4, ((kNarrow ? kSm90SmSmem / kBlocksPerSm - 1024 : kSm90BlockSmem) - 1024 - 64) / kStageBytes);
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes + 2 * kStages * 8;
  static_assert(kStages >= 2, "grad_input_wgmma: a stage too large for two");
};

// Whether to take this path (FUSED_CONVT_NO_WGMMA_GRAD_INPUT on: grad_input on mma.sync everywhere, so that tests
// and timings on a Hopper machine can compare the two).
inline bool wgmma_grad_input_disabled() { return env_switch_on("FUSED_CONVT_NO_WGMMA_GRAD_INPUT"); }

struct InputWgmmaPlan {
  bool narrow;  // narrow tiles (kWgmmaNarrowOc output channels)
  int phases, oc_chunks, row_tiles, col_tiles, ic_tiles;
  WgmmaPhaseTaps taps[kWgmmaMaxPhases];
};

// The plan where the problem has this path's shape, whatever the device: one group; wide tiles: input channels a
// multiple of 64, output channels a multiple of a stage's chunk (32 float, 64 16-bit), input rows a multiple of 64
// columns; narrow tiles: input channels a multiple of 32, 16 output channels, rows a multiple of 32; phases as
// wgmma_phase_tables takes them; a nonempty batch (the driver refuses a map of zero extent); G's pixel rows within
// 32-bit TMA coordinates.
inline bool plan_input_wgmma_shape(const ConvTransposeParams& p, int elem_bytes, InputWgmmaPlan* plan) {
  const int64_t chunk = 128 / elem_bytes;
  // (The tiles' sizes other than K do not depend on the operand type.)
  using Wide = InputWgmmaGeometry<4, false>;
  using Narrow = InputWgmmaGeometry<4, true>;
  auto tiles_fit = [&](auto geo) {
    return p.in_channels % decltype(geo)::kChannels == 0 && p.in_w % decltype(geo)::kCols == 0;
  };
  const bool wide = tiles_fit(Wide{}) && p.out_channels % chunk == 0;
  const bool narrow = !wide && tiles_fit(Narrow{}) && p.out_channels == kWgmmaNarrowOc;
  if (p.groups != 1 || !(wide || narrow) || p.batch == 0 || p.output_numel() / p.out_channels > INT32_MAX ||
      !wgmma_phase_tables(p, plan->taps))
    return false;
  const int rows = narrow ? Narrow::kRows : Wide::kRows, cols = narrow ? Narrow::kCols : Wide::kCols;
  const int channels = narrow ? Narrow::kChannels : Wide::kChannels;
  plan->narrow = narrow;
  plan->phases = int(p.stride_h * p.stride_w);
  plan->oc_chunks = narrow ? 1 : int(p.out_channels / chunk);
  plan->row_tiles = ceil_div_int(p.in_h, int64_t(rows));
  plan->col_tiles = int(p.in_w / cols);
  plan->ic_tiles = int(p.in_channels / channels);
  return p.batch * plan->row_tiles * plan->col_tiles * plan->ic_tiles <= INT32_MAX;  // grid x
}

// The plan for this call on this device, or false (then grad_input runs on mma.sync): the shape above, an sm_90a
// build on a compute capability 9.0 device, the driver's TMA encoder, and the switch.
inline bool plan_input_wgmma(const ConvTransposeParams& p, int elem_bytes, InputWgmmaPlan* plan) {
  return !wgmma_grad_input_disabled() && plan_input_wgmma_shape(p, elem_bytes, plan) && wgmma_backward_runs_here();
}

// Bytes of the packed weights (the workspace's grad_input weight region must hold them).
inline size_t input_wgmma_weight_bytes(const ConvTransposeParams& p, int elem_bytes) {
  return size_t(p.weight_numel()) * size_t(elem_bytes);
}

struct InputWgmmaArgs {
  ConvTransposeParams p;
  InputWgmmaPlan plan;
};

// The weights [ic][oc][kh][kw] as the B operand reads them: [phase x 4 + t][ic][oc], at tap t of the phase (float:
// rounded to TF32, as every TF32 operand of the library is). Grid: x over output channels, y over input channels
// (looping where there are more than a grid's y), z over (phase, tap): no index division per element (with three
// 64-bit ones per element it took 12-31 us at kb_v1 in torch.profiler, H100; now 11). (static: a kernel defined in
// a header.)
template <typename T, typename Bits>
static __global__ void pack_input_wgmma_weight(const __grid_constant__ InputWgmmaArgs args, const T* __restrict__ w,
                                               Bits* __restrict__ packed) {
  follow_previous_grid();
  const ConvTransposeParams& p = args.p;
  const int64_t cout = p.out_channels, cin = p.in_channels, oc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int phase_tap = int(blockIdx.z), tap = args.plan.taps[phase_tap / kWgmmaTaps].tap[phase_tap % kWgmmaTaps];
  if (oc >= cout) return;
  for (int64_t ic = blockIdx.y; ic < cin; ic += gridDim.y) {
    const T v = w[(ic * cout + oc) * (p.kernel_h * p.kernel_w) + tap];
    Bits& out = packed[(phase_tap * cin + ic) * cout + oc];
    if constexpr (std::is_same<T, float>::value) out = round_to_tf32(v);
    else out = v;
  }
}

// Grid: x = input channel tile + ic_tiles x (column tile + col_tiles x (row tile + row_tiles x image)): the blocks
// that read the same G boxes run side by side, so G comes from DRAM about once. Threads: the two
// consumer warpgroups, then the producer warpgroup (one thread of it issues the copies). T: float (TF32
// operands), __nv_bfloat16 or __half; kNarrow: the narrow tiles.
template <typename T, bool kNarrow>
__global__ void __launch_bounds__((kInputWgmmaGroups + 1) * 128,
                                  InputWgmmaGeometry<int(sizeof(T)), kNarrow>::kBlocksPerSm)
    grad_input_wgmma_kernel(const __grid_constant__ WgmmaGMaps g_maps, const __grid_constant__ CUtensorMap w_map,
                            const __grid_constant__ InputWgmmaArgs args, T* __restrict__ grad_input) {
  follow_previous_grid();
#ifdef FCT_WGMMA_ENABLED
  using Geo = InputWgmmaGeometry<int(sizeof(T)), kNarrow>;
  constexpr int kMTiles = Geo::kMTiles, kN = Geo::kChannels, kSteps = Geo::kSteps;
  constexpr int kStages = Geo::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ConvTransposeParams& p = args.p;
  const InputWgmmaPlan& plan = args.plan;
  const uint32_t smem = (smem_address(smem_raw) + 1023) & ~1023u;
  const uint32_t full_bar = smem + kStages * Geo::kStageBytes, empty_bar = full_bar + 8 * kStages;

  int tile = int(blockIdx.x);
  const int ic0 = tile % plan.ic_tiles * kN;
  tile /= plan.ic_tiles;
  const int j0 = tile % plan.col_tiles * Geo::kCols;
  tile /= plan.col_tiles;
  const int i0 = tile % plan.row_tiles * Geo::kRows, n = tile / plan.row_tiles;
  const int stages = plan.phases * plan.oc_chunks;  // phase-major

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar + 8 * s, 1);
      mbarrier_init(empty_bar + 8 * s, kInputWgmmaGroups * 4);  // one arrival per consumer warp
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (threadIdx.x >= kInputWgmmaGroups * 128) {  // the producer warpgroup: one thread issues every copy
    if constexpr (!kNarrow) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWgmmaProducerRegisters));
    if (threadIdx.x != kInputWgmmaGroups * 128) return;
    for (int i = 0; i < stages; ++i) {
      const int s = i % kStages;
      if (i >= kStages) mbarrier_wait(empty_bar + 8 * s, (i / kStages - 1) & 1);
      const int phase = i / plan.oc_chunks, oc = i % plan.oc_chunks * Geo::kOcChunk;
      const uint32_t stage = smem + s * Geo::kStageBytes, bar = full_bar + 8 * s;
      mbarrier_arrive_expect_tx(bar, Geo::kGBytes + Geo::kWBox);
      tma_load_4d(stage, &g_maps.phase[phase], oc, j0 - plan.taps[phase].max_w, i0 - plan.taps[phase].max_h, n, bar);
      tma_load_3d(stage + Geo::kGBox, &w_map, oc, ic0, phase * kWgmmaTaps, bar);
    }
    return;
  }

  if constexpr (!kNarrow)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWgmmaConsumerRegisters<kInputWgmmaGroups>));
  // Consumer warpgroup wg: m tiles kMTiles wg ... of the tile. (The warpgroup index through a shuffle: uniform
  // registers for the addresses, as in pair_forward_kernel.)
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0), warp = int(threadIdx.x / 32) % 4;
  const int lane = int(threadIdx.x % 32);
  // Warp w's 16 pixels of an m tile: row 16 w / kCols of it, columns from 16 w % kCols. This lane's ldmatrix
  // address: pixel column warp_col + 8 ((lane >> 3) & 1) + (lane & 7) (the matrix rows of fragment words 0/1 and
  // 2/3), 16-byte piece lane >> 4 of a k step's 32 bytes (words 0/1, then 2/3). Tap t of m tile mt reads G's box
  // row (kTileRows (mt + kMTiles wg) + warp_row + max_h - off_h) x kGCols + column + max_w - off_w; the swizzle
  // XORs the piece with bits of the row (tc_stage_offset), and k step kk adds 2 kk to the piece, which XOR adds as
  // kk x 32 bytes (the piece's bit 0 is lane >> 4, the step's bits are above it).
  const int warp_row = 16 * warp / Geo::kCols, warp_col = 16 * warp % Geo::kCols;
  const int column = warp_col + 8 * ((lane >> 3) & 1) + (lane & 7), piece = lane >> 4;
  uint32_t a_offset[kWgmmaTaps][kMTiles];
  auto set_phase = [&](int phase) {
    const WgmmaPhaseTaps& taps = plan.taps[phase];
#pragma unroll
    for (int t = 0; t < kWgmmaTaps; ++t)
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int box_row = Geo::kTileRows * (mt + kMTiles * wg) + warp_row + taps.max_h - taps.off_h[t];
        const int row = box_row * Geo::kGCols + column + taps.max_w - taps.off_w[t];
        a_offset[t][mt] = uint32_t(tc_stage_offset(row, piece, Geo::kRowBytes));
      }
  };
  float acc[kMTiles][kN / 2];
  // Step u (tap u / kSteps, k step u % kSteps) of stage i: A fragments into `a` (registers that must not change
  // until the group's wgmmas are done: two sets used in turn, and the wait after each group retires the one before),
  // one wgmma per m tile, then the wait; the first group of a stage also releases the stage before it, whose last
  // group that wait retired.
  auto group = [&](int i, int u, uint32_t (&a)[kMTiles][4]) {
    const int t = u / kSteps, kk = u % kSteps;
    const uint32_t stage = smem + (i % kStages) * Geo::kStageBytes;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], stage + (a_offset[t][mt] ^ uint32_t(kk * 32)));
    wgmma_fence();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
      wgmma_m64n_rs<T, kN>(
          acc[mt], a[mt],
          wgmma_swizzled_descriptor<Geo::kRowBytes>(stage + Geo::kGBox + t * kN * Geo::kRowBytes + kk * 32),
          (i | u) != 0);
    wgmma_commit();
    wgmma_wait<1>();  // (unconditional: a wait skipped on the first group made ptxas serialize every wgmma)
    if (u == 0 && i > 0 && lane == 0) mbarrier_arrive(empty_bar + 8 * ((i - 1) % kStages));
  };
  uint32_t a_even[kMTiles][4], a_odd[kMTiles][4];
#pragma unroll 1
  for (int i = 0; i < stages; ++i) {
    if (i % plan.oc_chunks == 0) set_phase(i / plan.oc_chunks);
    mbarrier_wait(full_bar + 8 * (i % kStages), (i / kStages) & 1);
#pragma unroll
    for (int u = 0; u < kWgmmaTaps * kSteps; u += 2) {  // (an even count: four taps)
      group(i, u, a_even);
      group(i, u + 1, a_odd);
    }
  }
  wgmma_wait_all();

  // acc[mt][4 e4 + q]: pixel 16 warp + g + 8 (q / 2) of m tile kMTiles wg + mt (row warp_row, column warp_col + g +
  // 8 (q / 2) of it), input channel ic0 + 8 e4 + 2 t4 + q % 2. For each channel, eight lanes hold eight neighbouring
  // pixels (32-byte pieces for float).
  const int g = lane / 4, t4 = lane % 4;
  const int64_t plane = p.in_h * p.in_w;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int row = i0 + Geo::kTileRows * (kMTiles * wg + mt) + warp_row;
    if (row >= p.in_h) continue;
    T* out = grad_input + ((n * p.in_channels + ic0 + 2 * t4) * p.in_h + row) * p.in_w + j0 + warp_col + g;
#pragma unroll
    for (int e = 0; e < kN / 2; ++e) out[(8 * (e / 4) + e % 2) * plane + 8 * ((e % 4) / 2)] = from_acc<T>(acc[mt][e]);
  }
#endif
}

// grad_input (NCHW) from G (g_split, laid out as g_layout) and the weights, which are packed into packed_weight
// (input_wgmma_weight_bytes) first; the plan's tiles (narrow or wide).
template <typename T, bool kNarrow>
void launch_grad_input_wgmma_tiles(const ConvTransposeParams& p, const InputWgmmaPlan& plan,
                                   const PhaseSplitLayout& g_layout, const void* g_split, const T* weight,
                                   void* packed_weight, T* grad_input, cudaStream_t stream) {
  constexpr int kBytes = int(sizeof(T));
  using Bits = typename std::conditional<kBytes == 4, uint32_t, T>::type;
  using Geo = InputWgmmaGeometry<kBytes, kNarrow>;
  const InputWgmmaArgs args{p, plan};
  const int threads = 128;
  const dim3 pack_grid(unsigned((p.out_channels + threads - 1) / threads),
                       unsigned(std::min<int64_t>(p.in_channels, 65535)), unsigned(plan.phases * kWgmmaTaps));
  launch_kernel(pack_input_wgmma_weight<T, Bits>, {pack_grid, dim3(threads), 0, stream}, "pack_input_wgmma_weight",
                args, weight, static_cast<Bits*>(packed_weight));
  alignas(64) CUtensorMap w_map{};
  alignas(64) WgmmaGMaps g_maps{};
  const int64_t w_dims[3] = {p.out_channels, p.in_channels, int64_t(plan.phases) * kWgmmaTaps};
  const uint32_t w_box[3] = {uint32_t(Geo::kOcChunk), uint32_t(Geo::kChannels), uint32_t(kWgmmaTaps)};
  const uint32_t g_box[4] = {uint32_t(Geo::kOcChunk), uint32_t(Geo::kGCols), uint32_t(Geo::kGRows), 1};
  if (!encode_dense_map(&w_map, packed_weight, kBytes, 3, w_dims, w_box, swizzle_of_rows(Geo::kRowBytes)) ||
      !encode_g_phase_maps(p, kBytes, g_layout, g_split, g_box, &g_maps))
    throw std::runtime_error("fused_convt: cuTensorMapEncodeTiled failed for grad_input's operands");
  const auto kernel = grad_input_wgmma_kernel<T, kNarrow>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), Geo::kSmemBytes,
                     "cudaFuncSetAttribute(grad_input_wgmma_kernel)", kNarrow);
  const dim3 grid(unsigned(p.batch * plan.row_tiles * plan.col_tiles * plan.ic_tiles));
  launch_kernel(kernel, {grid, dim3((kInputWgmmaGroups + 1) * 128), Geo::kSmemBytes, stream}, "grad_input_wgmma_kernel",
                g_maps, w_map, args, grad_input);
}

template <typename T>
void launch_grad_input_wgmma(const ConvTransposeParams& p, const InputWgmmaPlan& plan, const PhaseSplitLayout& g_layout,
                             const void* g_split, const T* weight, void* packed_weight, T* grad_input,
                             cudaStream_t stream) {
  if (plan.narrow)
    launch_grad_input_wgmma_tiles<T, true>(p, plan, g_layout, g_split, weight, packed_weight, grad_input, stream);
  else
    launch_grad_input_wgmma_tiles<T, false>(p, plan, g_layout, g_split, weight, packed_weight, grad_input, stream);
}

}  // namespace fused_convt
