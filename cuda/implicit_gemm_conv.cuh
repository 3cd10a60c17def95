// Tensor-core implicit-GEMM gather convolution: the fast path of the forward pass and of grad_input
// (grad_input_tc_problem in tc_problem.h: every block sums the stride phases of grad_output).
//
// Phase decomposition (shared/DESIGN.md): a stride-s transposed convolution is s_h * s_w independent
// stride-1 correlations, one per output phase (oh mod s, ow mod s), each with only the taps that land on
// that phase. No multiply is spent on a structural zero and the inner loop has no divisibility test.
// Each phase is a GEMM: M = the phase's output pixels of one image, N = output channels of a group,
// K = input channels of the group x the phase's taps. A[m, (c, tap)] is gathered from the input.
//
// Work split: a block owns kBlockM = 256 consecutive phase pixels (row-major over the phase grid, so any
// image width wastes at most one partial tile) and BN output channels of one image, phase and group.
// 8 warps each own 32 pixels x BN channels of fp32 accumulators (2 x BN/8 mma tiles).
// Mainloop, in steps of (16 input channels, source phase) with the phase fastest (grad_input sums several
// source phases; the forward has one), two or three pipeline stages in shared memory (tc_stages):
//  * the input patch the tile reads (rows of the phase grid it spans, plus the taps' halo) sits channels-last
//    in shared memory ([pixel][16 channels]) so that ldmatrix serves any tap offset: a tap just shifts the
//    pixel row (per-source tables of shifts and weight taps are built once per block). The forward copies
//    the patch from a channels-last copy of the input that the launcher makes first (channels_last_pack.cuh;
//    ~0.05 ms at kb_v1 bf16) or from a channels_last input itself, so nothing of it passes through registers
//    (tc_async_patch): on sm_90 as one TMA box per step (tma.cuh), before that with 16-byte cp.async. Rows
//    are dense, their 16-byte pieces swizzled (tc_stage_offset). grad_input copies its patches the same way
//    (cp.async) from the g pass's phase-split copy of g where grad_weight made one; otherwise it loads whole
//    pixels (16 channels) of the NCHW source, coalesced along the image row, into registers and forms
//    g = grad_output x factor there;
//  * the weight slice [tap][BN][16] comes from a pre-packed copy, by TMA on sm_90, else with 16-byte cp.async;
//  * every warp runs ldmatrix + mma.sync over the phase's taps, in the precision policy Math (mma.cuh:
//    TF32, 3xTF32 for exact float32, bf16 / fp16), accumulating in fp32.
// The next step's loads are issued before the current step's MMAs, so memory latency hides under math.
// Epilogue: the accumulators pass through shared memory so that each thread owns one pixel; bias, add, min,
// GELU and scale are applied in registers, four output channels at a time, and every output is written once
// (consecutive threads, consecutive pixels). The training forward of large problems launches the column
// phases of a row phase as a thread-block cluster that exchanges tiles, so that its output rows are written in
// whole sectors (store_cluster, tc_training_epilogue_cluster).
#pragma once

#include <algorithm>
#include <climits>
#include <type_traits>

#include <cooperative_groups.h>

#include "channels_last_pack.cuh"
#include "cuda_common.cuh"
#include "gather_conv.cuh"
#include "mma.cuh"
#include "tc_problem.h"
#include "tma.cuh"

namespace fused_convt {

// What a launch adds to its direction's way (one template parameter, so that each direction compiles only
// the variants it uses). Forward: Plain, or EpilogueCluster (the training forward's clusters, store_cluster).
// GradInput: Plain (g = grad_output x factor formed in registers while staging), or CopiedSource (patches
// copied from the g pass's phase-split copy of g, where grad_weight made one: grad_input_copy_layout).
// On sm_90 the TMA variants copy each step's patch and weights with the Tensor Memory Accelerator (tma.cuh,
// tc_tma_box) instead of per-thread cp.async: Forward TmaPatch / TmaPatchCluster, GradInput TmaCopiedSource
// (from the g copy where its planes are uniform, TcProblem::copy_planes).
enum class TcVariant { Plain, EpilogueCluster, CopiedSource, TmaPatch, TmaPatchCluster, TmaCopiedSource };

constexpr bool tc_tma(TcVariant v) {
  return v == TcVariant::TmaPatch || v == TcVariant::TmaPatchCluster || v == TcVariant::TmaCopiedSource;
}
constexpr bool tc_cluster(TcVariant v) { return v == TcVariant::EpilogueCluster || v == TcVariant::TmaPatchCluster; }

// Whether the patch is copied asynchronously from a channels-last copy of the source (the launcher's src_cl)
// instead of staged through registers: the forward, every type, and grad_input from the g pass's copy. At
// kb_v1 bf16 (H100) the forward went 2.15 -> 1.86 ms with the copy included. Float measured slower at first,
// 1.85 -> 2.26 ms (TF32), when each lane copied half a 32-byte sector per copy (copy_patch now gives
// consecutive lanes one row's pieces). Without that copy grad_input forms g while staging (issue 3 keeps g
// out of global memory for it).
template <GatherDirection Dir, TcVariant Variant>
constexpr bool tc_async_patch() {
  return Dir == GatherDirection::Forward || Variant == TcVariant::CopiedSource || Variant == TcVariant::TmaCopiedSource;
}

// Pipeline stages in shared memory. The register-staged path holds one step in registers: two. The 16-bit
// asynchronous patch copy keeps two steps in flight: a tile has only a few 16-channel steps (four at kb_v1),
// and with one step of prefetch 40% of the mainloop's stall samples waited on global loads (Nsight Compute).
// Float stages are twice the bytes: three would leave one block per SM.
template <GatherDirection Dir, typename Math, TcVariant Variant>
constexpr int tc_stages() {
  return tc_async_patch<Dir, Variant>() && sizeof(typename Math::Smem) == 2 ? 3 : 2;
}

// Blocks per SM the kernel is compiled for (its register bound): two, 128 registers, for the 64 accumulators
// of BN = 64 plus the staging; three where the accumulators are few and nothing is staged in registers (the
// 16-bit forward at BN <= 32: 80 registers, BN 16 keeping 40 bytes of its copy state on the stack), so that
// the short blocks of small channel counts (kb_v0: 16 output channels, two steps per tile) overlap more:
// kb_v0 bf16 0.084 -> 0.078 ms (H100). Float stays at two: exact fp32 at BN 32 spilled 192 bytes under 80.
template <GatherDirection Dir, typename Math, int BN, TcVariant Variant>
constexpr int tc_min_blocks() {
  return tc_async_patch<Dir, Variant>() && sizeof(typename Math::Smem) == 2 && BN <= 32 ? 3 : 2;
}

// Bytes of one staged row of kTcChunk values: dense, its pieces permuted by tc_stage_offset.
template <typename Math>
constexpr int tc_row_bytes() { return kTcChunk * int(sizeof(typename Math::Smem)); }

// Parts of the epilogue (32 output channels each) staged at once: every part in the training forward's
// clusters, whose staging barrier publishes the writes into partner blocks with a release that waits for
// this thread's global stores (staged part by part, the second part's barrier waited for the first part's
// stores); one at a time elsewhere, in half the shared memory.
template <int BN, TcVariant Variant>
constexpr int tc_staged_parts() { return tc_cluster(Variant) && BN > 32 ? BN / 32 : 1; }

// Shared memory of the epilogue (staged parts, column shifts, the channels_last pixel table of
// store_pixels), which reuses the stages from the block's start.
template <int BN, TcVariant Variant>
constexpr int tc_epilogue_bytes() {
  return (tc_staged_parts<BN, Variant>() * tc_epilogue_tile_floats<BN>() + BN + kTcBlockM) * int(sizeof(float));
}

// Where the TMA variants' per-stage barriers sit: behind the stages and the tap tables, and behind the
// epilogue's bytes too, 8-byte aligned: an mbarrier's memory may not serve anything else while it is one
// (PTX: invalidated first), and the epilogue reuses the stages.
template <int BN, TcVariant Variant>
FCT_HD int tc_stage_barriers_offset(const TcProblem& pr, int stages, int sources) {
  const int staged = stages * pr.stage_bytes + 2 * sources * pr.max_taps * int(sizeof(int));
  constexpr int kEpilogue = tc_epilogue_bytes<BN, Variant>();
  return ((staged > kEpilogue ? staged : kEpilogue) + 7) / 8 * 8;
}

// Packs the weight as [group][kh*kw][dst_local][src_local padded to kTcChunk] in the MMA's operand type
// (TF32-rounded float or the 16-bit type), so that a block's weight tile is whole 16-byte rows.
template <typename T, typename Math>
__global__ void pack_weight_kernel(const T* __restrict__ weight, typename Math::Smem* __restrict__ packed,
                                   int groups, int taps, int dst_per_group, int src_per_group, int src_padded,
                                   int64_t weight_group_stride, int weight_src_stride, int weight_dst_stride) {
  follow_previous_grid();
  const int64_t total = int64_t(groups) * taps * dst_per_group * src_padded;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int s = int(i % src_padded);
    int64_t rest = i / src_padded;
    const int d = int(rest % dst_per_group);
    rest /= dst_per_group;
    const int tap = int(rest % taps);
    const int64_t g = rest / taps;
    T v = T(0.0f);
    if (s < src_per_group) v = weight[g * weight_group_stride + int64_t(s) * weight_src_stride +
                                      int64_t(d) * weight_dst_stride + tap];
    packed[i] = Math::to_smem(v);
  }
}

// N (2 or 4) consecutive values as one store of N * sizeof(T) bytes; `to` is aligned to that size (the
// caller checks).
template <int N, typename T>
__device__ __forceinline__ void store_consecutive(T* to, const float* v) {
  constexpr int kBytes = N * int(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "one 4-, 8- or 16-byte store");
  using Word = std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2, uint32_t>>;
  T values[N];
#pragma unroll
  for (int k = 0; k < N; ++k) values[k] = from_acc<T>(v[k]);
  Word word;
  memcpy(&word, values, sizeof(word));
  *reinterpret_cast<Word*>(to) = word;
}

// Two blocks per SM: the second block's mainloop hides this one's prologue, epilogue and barriers.
// T is the storage type, Math the tensor-core policy (mma.cuh), Variant as TcVariant says.
template <typename T, typename Math, GatherDirection Dir, int BN, TcVariant Variant>
__global__ void __launch_bounds__(kTcThreads, tc_min_blocks<Dir, Math, BN, Variant>())
implicit_gemm_conv_kernel(const __grid_constant__ TcProblem pr, Epilogue epi, const T* __restrict__ src,
                          const typename Math::Factor* __restrict__ src_factor,
                          const typename Math::Smem* __restrict__ src_cl,
                          const typename Math::Smem* __restrict__ packed, const T* __restrict__ bias,
                          T* __restrict__ dst, typename Math::Factor* __restrict__ dst_factor,
                          const __grid_constant__ CUtensorMap patch_map,
                          const __grid_constant__ CUtensorMap weight_map) {
  follow_previous_grid();
  using Traits = Math;
  using Smem = typename Traits::Smem;
  using Factor = typename Math::Factor;
  constexpr int kRowBytes = tc_row_bytes<Math>();
  constexpr int kNFrags = BN / 8;
  constexpr int kRowChunks = kTcChunk * int(sizeof(Smem)) / 16;  // 16-byte pieces per staged row
  static_assert(kNFrags % 2 == 0, "B fragments are loaded in pairs");
  constexpr int kEpiFrags = kNFrags < 4 ? kNFrags : 4;  // fragments (8 channels each) per epilogue pass
  constexpr int kEpiParts = kNFrags / kEpiFrags;
  constexpr int kEpiStride = tc_epilogue_stride<BN>();

  // (Named apart from the other kernels' 16-byte-aligned smem_raw: one extern name declared with two alignments in
  // a translation unit draws nvcc's warning 1886.)
  extern __shared__ __align__(128) unsigned char tc_smem_raw[];
  // The TMA's swizzle follows address bits up to 512 (64-byte rows): its stages start on 1024-byte boundaries
  // (the launcher adds the slack).
  constexpr bool kTma = tc_tma(Variant);
  unsigned char* smem =
      kTma ? tc_smem_raw + ((1024 - (smem_address(tc_smem_raw) & 1023)) & 1023) : tc_smem_raw;

  // The phase varies fastest: the blocks of all phases of one tile run together, so the interleaved
  // halves of each output sector they write meet in L2 instead of reaching DRAM as partial writes.
  constexpr bool kSumPhases = Dir == GatherDirection::GradInput;  // else one (output) phase per block
  const int grid_phases = kSumPhases ? 1 : pr.phases;
  const int phase_index = int(blockIdx.x % grid_phases);
  const int m_tile = int((blockIdx.x / grid_phases) % pr.m_tiles);
  const int64_t image = blockIdx.x / (int64_t(grid_phases) * pr.m_tiles);
  const int n_tile = int(blockIdx.y % pr.n_tiles);
  const int group = int(blockIdx.y / pr.n_tiles);
  const TcPhase& dst_phase = pr.phase[phase_index];  // destination geometry (shared by summed phases)
  const int count = dst_phase.extent_h * dst_phase.extent_w;
  const int m0 = m_tile * kTcBlockM;
  if (m0 >= count) return;
  const int n0 = n_tile * BN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Offsets inside one image fit 32 bits (checked by finish_tc_problem); only the image base is 64-bit.
  const int src_plane = pr.src_h * pr.src_w;
  const int64_t src_image = (image * pr.src_channels + int64_t(group) * pr.src_per_group) * src_plane;
  const T* src_group = src ? src + src_image : nullptr;  // (null: grad_input from the g pass's copy alone)
  const Factor* factor_group = src_factor ? src_factor + src_image : nullptr;
  const float factor_scale_value = float(factor_scale(epi));  // grad_input: g = grad_output x factor x this
  // Channels-last copy of the source ([image][pixel][group][src_padded]), when the caller made one.
  const int cl_row = pr.groups * pr.src_padded;
  const Smem* cl_group =
      src_cl ? src_cl + image * src_plane * int64_t(cl_row) + int64_t(group) * pr.src_padded : nullptr;
  const Smem* packed_group = packed + int64_t(group) * pr.kernel_taps * pr.dst_per_group * pr.src_padded;

  float acc[2][kNFrags][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kNFrags; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // The mainloop walks steps of (16-channel chunk, source phase), the phase fastest: grad_input sums the
  // stride phases of g, and the column phases of one chunk share every 32-byte sector of grad_output and the
  // factor, so they are read back to back (one DRAM read) instead of one whole pass over all channels apart
  // (Nsight Compute, kb_v1 bf16, phase-major order: 3.2 GB of DRAM traffic for 1.2 GB of data, L2 hit rate
  // 61%). The forward has one source. Each step's patch covers the source rows spanned by the tile's phase
  // rows plus the taps' halo, full phase width; the next step's loads are issued before this step's MMAs.
  const int sources = kSumPhases ? pr.phases : 1;
  const int chunks = (pr.src_per_group + kTcChunk - 1) / kTcChunk;
  // A step's source: its row in the tap tables below (0 in the forward) and its phase.
  auto source_of = [&](int step) { return kSumPhases ? step % sources : 0; };
  auto phase_of = [&](int source) -> const TcPhase& { return pr.phase[kSumPhases ? source : phase_index]; };
  // Taps of a step's source. The forward reads its one phase's count once: a field of pr.phase[phase_index]
  // is a constant-bank load with a computed index at every use (per step, in the loads and in the MMAs).
  const int forward_taps = dst_phase.taps_h * dst_phase.taps_w;
  auto taps_of = [&](int source) {
    return kSumPhases ? phase_of(source).taps_h * phase_of(source).taps_w : forward_taps;
  };
  const int steps = taps_of(0) > 0 ? sources * chunks : 0;  // grad_input keeps phases with taps only

  struct Patch {
    int min_off_h, min_off_w, row_first, cols, pixels;
  };
  auto patch_of = [&](const TcPhase& ph) {
    Patch patch;
    int max_off_h = ph.off_h[0], max_off_w = ph.off_w[0];
    patch.min_off_h = ph.off_h[0];
    patch.min_off_w = ph.off_w[0];
    for (int i = 1; i < ph.taps_h; ++i) {
      patch.min_off_h = min(patch.min_off_h, ph.off_h[i]);
      max_off_h = max(max_off_h, ph.off_h[i]);
    }
    for (int i = 1; i < ph.taps_w; ++i) {
      patch.min_off_w = min(patch.min_off_w, ph.off_w[i]);
      max_off_w = max(max_off_w, ph.off_w[i]);
    }
    const TileRows rows = tile_rows(m0, count, ph.extent_w);
    patch.row_first = rows.first + patch.min_off_h;
    // (The TMA's box has one width for every phase: the patch rows are that long.)
    patch.cols = kTma ? pr.patch_box_w : ph.extent_w + max_off_w - patch.min_off_w;
    patch.pixels = (rows.last + max_off_h - patch.row_first + 1) * patch.cols;
    return patch;
  };

  // Per source and tap, written once per block behind the stages: the patch-row shift of the tap and the
  // offset in the group's packed weight of the tap it multiplies (kh * kernel_w + kw), tap = th * taps_w + tw.
  // Deriving them per step from the phase tables cost registers (spills) in the loop.
  constexpr int kStages = tc_stages<Dir, Math, Variant>();
  int* tap_shift = reinterpret_cast<int*>(smem + kStages * pr.stage_bytes);
  int* tap_weight = tap_shift + sources * pr.max_taps;
  for (int i = tid; i < sources * pr.max_taps; i += kTcThreads) {
    const int source = i / pr.max_taps, tap = i % pr.max_taps;
    const TcPhase& ph = phase_of(source);
    if (tap < ph.taps_h * ph.taps_w) {
      const Patch patch = patch_of(ph);
      const int th = tap / ph.taps_w, tw = tap % ph.taps_w;
      tap_shift[i] = (ph.off_h[th] - patch.min_off_h) * patch.cols + ph.off_w[tw] - patch.min_off_w;
      // (TMA: the kernel tap's slab of the weight map; else its offset in the group's packed weight.)
      const int kernel_tap = ph.kh[th] * pr.kernel_w + ph.kw[tw];
      tap_weight[i] = kTma ? group * pr.kernel_taps + kernel_tap : kernel_tap * pr.dst_per_group * pr.src_padded;
    }
  }
  // TMA: per stage, the barrier its patch copy completes (one arrival: the thread that issues the copy).
  const uint32_t stage_ready = smem_address(smem) + tc_stage_barriers_offset<BN, Variant>(pr, kStages, sources);
  if (kTma && tid == 0) {
    for (int st = 0; st < kStages; ++st) mbarrier_init(stage_ready + 8 * st, 1);
    mbarrier_init_fence();
  }
  __syncthreads();

  // Phase-grid position (a, b) of the pixels of this lane's two A fragments (ldmatrix rows), the same for
  // every source: the destination grid is shared.
  int frag_a[2], frag_b[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = min(m0 + warp * 32 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, count - 1);
    frag_a[i] = m / dst_phase.extent_w;
    frag_b[i] = m % dst_phase.extent_w;
  }

  // Register staging of the next step's patch pixels (grad_input, float forward), packed as they will sit in
  // shared memory. All loads of a pixel are issued before any is used, from addresses that are always valid
  // (channel and pixel clamped; out-of-range values zeroed afterwards by a select): guarding each load with
  // its own condition compiled to a branch per value, and each value's conversion waited for its load, so
  // the 16-32 loads of a pixel ran one memory round trip after another (grad_input at kb_v1 bf16: 3.6 ms,
  // ~18x its tensor-core time).
  constexpr int kWords = kTcChunk / Traits::kValuesPerWord;
  uint32_t staged[kTcPixelsPerThread][kWords];
  int staged_pixels = 0;
  // The patch pixels whose offsets a thread keeps: the register path stages whole pixels (tid + j x
  // threads); the asynchronous copy takes one 16-byte piece (tid % kRowChunks) of each of its pixels, so that
  // consecutive lanes copy the pieces of one row and a warp's copies cover whole 32-byte sectors. (A lane per
  // pixel read half a sector per copy, each sector twice: twice the patch's L2 sector traffic, in a forward
  // that Nsight Compute shows L2-bound.)
  constexpr bool async_patch = tc_async_patch<Dir, Variant>();
  constexpr int kOffsets = async_patch ? kTcMaxPatchPixels * kRowChunks / kTcThreads : kTcPixelsPerThread;
  constexpr int kPixelStep = async_patch ? kTcThreads / kRowChunks : kTcThreads;  // between a thread's pixels
  // The 16-byte piece of a staged row a thread copies (patch and weights alike), and the row it starts at.
  const int piece = tid % kRowChunks, piece_row = tid / kRowChunks;
  auto offset_pixel = [&](int j) { return (async_patch ? piece_row : tid) + j * kPixelStep; };
  constexpr int kPieceValues = kTcChunk / kRowChunks;
  constexpr int kNotInPatch = INT_MIN;
  // Where each of those pixels is read from. Register path: its offset within a channel plane (-1 outside
  // the image). Asynchronous copy: the offset of the thread's piece in the channels-last image, -1 where the
  // pixel lies outside the image (zero-filled), kNotInPatch past the patch's last pixel (not copied), so that
  // a step's copy is an add and a select per piece. The lambdas take the kOffsets-long array by pointer: a
  // reference-to-array parameter sized by the local constant crashed nvcc 13.0's front end (cudafe++).
  auto pixel_offsets = [&](int source_phase, const Patch& patch, int* offsets) {
    const TcPhase& ph = pr.phase[source_phase];
    // The pixel's (row, column) in the patch advances by a fixed step: two divisions, not one per pixel.
    const int step_rows = kPixelStep / patch.cols, step_cols = kPixelStep % patch.cols;
    int row = offset_pixel(0) / patch.cols, col = offset_pixel(0) % patch.cols;
#pragma unroll
    for (int j = 0; j < kOffsets; ++j) {
      const int p = offset_pixel(j);
      const int y = (patch.row_first + row) * pr.src_step_h + ph.src_offset_h;
      const int x = (patch.min_off_w + col) * pr.src_step_w + ph.src_offset_w;
      const bool inside = p < patch.pixels && y >= 0 && y < pr.src_h && x >= 0 && x < pr.src_w;
      if constexpr (async_patch) {
        // The forward's copy is the source image; grad_input's is the source phase's plane (copy_base), where
        // sample (row_first + row, min_off_w + col) is pixel (row_first + row, min_off_w + col).
        const int at = kSumPhases ? (patch.row_first + row) * pr.copy_extent_w[source_phase] + patch.min_off_w + col
                                  : y * pr.src_w + x;
        offsets[j] = inside ? at * cl_row + piece * kPieceValues : (p < patch.pixels ? -1 : kNotInPatch);
      } else {
        offsets[j] = inside ? y * pr.src_w + x : -1;
      }
      row += step_rows;
      col += step_cols;
      if (col >= patch.cols) {
        col -= patch.cols;
        ++row;
      }
    }
  };
  auto load_patch_with = [&](const int* offsets, int c0, auto with_factor) {
    constexpr bool kFactor = decltype(with_factor)::value;
    const int channels = min(kTcChunk, pr.src_per_group - c0);
#pragma unroll
    for (int j = 0; j < kTcPixelsPerThread; ++j) {
      const int offset = c0 * src_plane + max(offsets[j], 0);
      const bool pixel_ok = offsets[j] >= 0;
      T raw[kTcChunk];
      Factor raw_factor[kTcChunk];
#pragma unroll
      for (int c = 0; c < kTcChunk; ++c) {
        const int at = offset + min(c, channels - 1) * src_plane;
        raw[c] = src_group[at];
        if constexpr (kFactor) raw_factor[c] = factor_group[at];
      }
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        float v[Traits::kValuesPerWord];
#pragma unroll
        for (int e = 0; e < Traits::kValuesPerWord; ++e) {
          const int c = w * Traits::kValuesPerWord + e;
          float value = float(to_acc(raw[c]));
          if constexpr (kFactor) value *= float(to_acc(raw_factor[c])) * factor_scale_value;
          v[e] = pixel_ok && c < channels ? value : 0.0f;
        }
        staged[j][w] = Traits::to_word(v);
      }
    }
  };
  auto store_patch = [&](int stage) {
    unsigned char* patch = smem + stage * pr.stage_bytes;
#pragma unroll
    for (int j = 0; j < kTcPixelsPerThread; ++j) {
      const int p = tid + j * kTcThreads;
      if (p < staged_pixels) {
#pragma unroll
        for (int q = 0; q < kRowChunks; ++q)
          *reinterpret_cast<uint4*>(patch + tc_stage_offset(p, q, kRowBytes)) =
              make_uint4(staged[j][4 * q], staged[j][4 * q + 1], staged[j][4 * q + 2], staged[j][4 * q + 3]);
      }
    }
  };
  // With a channels-last source each staged patch row is kRowChunks contiguous 16-byte pieces: copied
  // asynchronously (zero-filled outside the image), with no register staging and no conversion.
  // A thread's patch pieces start at piece_smem within a stage, kPixelStep rows apart.
  // (A thread's rows are kPixelStep apart, a multiple of the swizzle's 8 rows: one permuted offset for all.)
  static_assert(kPixelStep % 8 == 0, "a thread's patch rows share their swizzle");
  const uint32_t piece_smem = tc_stage_offset(piece_row, piece, kRowBytes);
  auto copy_patch = [&](const int* offsets, const Smem* from, int c0, int stage) {
    const uint32_t to = smem_address(smem + stage * pr.stage_bytes) + piece_smem;
#pragma unroll
    for (int j = 0; j < kOffsets; ++j) {
      if (offsets[j] != kNotInPatch)
        cp_async_16(to + j * kPixelStep * kRowBytes, from + (max(offsets[j], 0) + c0), offsets[j] >= 0 ? 16 : 0);
    }
  };
  // Where a source's channels-last pixels start for this block's image and group: the forward's input copy,
  // or grad_input's source phase plane in the g pass's copy.
  auto copy_base = [&](int source) -> const Smem* {
    if constexpr (kSumPhases) {
      return src_cl + (pr.copy_first_row[source] + image * int64_t(pr.copy_extent_h[source]) * pr.copy_extent_w[source]) *
                          cl_row + int64_t(group) * pr.src_padded;
    } else {
      return cl_group;
    }
  };
  // The weight slice [tap][BN][16 channels] of a step. A thread copies its piece of channel row piece_row % BN
  // of every kWeightTapStep-th tap from its first: the channel row and piece are the same in every step, so a
  // copy costs a table read and an add.
  static_assert(kTcThreads / kRowChunks % BN == 0, "a thread's weight pieces keep their channel row");
  constexpr int kWeightTapStep = kTcThreads / kRowChunks / BN;
  const int weight_n = piece_row % BN, weight_first_tap = piece_row / BN;
  const bool weight_valid = n0 + weight_n < pr.dst_per_group;
  const int weight_at = (weight_valid ? n0 + weight_n : 0) * pr.src_padded + piece * kPieceValues;
  const uint32_t weight_smem = pr.stage_patch_bytes + tc_stage_offset(weight_first_tap * BN + weight_n, piece, kRowBytes);
  auto load_weights = [&](int source, int taps, int c0, int stage) {
    const int* weight_taps = tap_weight + source * pr.max_taps;
    if constexpr (kTma) {
      // One box of BN rows per tap, on the stage's barrier (issue_loads announced their bytes).
      if (tid == 0) {
        const uint32_t to = smem_address(smem + stage * pr.stage_bytes) + pr.stage_patch_bytes;
        for (int tap = 0; tap < taps; ++tap)
          tma_load_3d(to + tap * BN * kRowBytes, &weight_map, c0, n0, weight_taps[tap], stage_ready + 8 * stage);
      }
    } else {
      uint32_t to = smem_address(smem + stage * pr.stage_bytes) + weight_smem;
      for (int tap = weight_first_tap; tap < taps; tap += kWeightTapStep, to += kWeightTapStep * BN * kRowBytes)
        cp_async_16(to, packed_group + (weight_taps[tap] + weight_at + c0), weight_valid ? 16 : 0);
    }
    cp_async_commit();
  };
  // Patch geometry and this thread's pixel offsets of the phase last prepared: recomputed only when the
  // phase changes (every step of grad_input, once in the forward, whose per-step recomputation cost it
  // 1.24 -> 1.40 ms at kb_v1 bf16).
  int prepared_phase = -1;
  Patch prepared;
  int offsets[kOffsets];
  auto prepare = [&](int step) {
    const int phase = kSumPhases ? source_of(step) : phase_index;
    if (phase != prepared_phase) {
      prepared = patch_of(pr.phase[phase]);
      if constexpr (!kTma) pixel_offsets(phase, prepared, offsets);
      prepared_phase = phase;
    }
    return prepared;
  };
  // Issues every load of a step into a stage (the register-staged patch waits in `staged` for store_patch);
  // returns the step's patch geometry.
  auto issue_loads = [&](int step, int stage) {
    const int source = source_of(step);
    const Patch patch = prepare(step);
    const int c0 = step / sources * kTcChunk;
    if constexpr (kTma) {
      if (tid == 0) {
        const TcPhase& ph = phase_of(source);
        const uint32_t ready = stage_ready + 8 * stage;
        mbarrier_arrive_expect_tx(ready, uint32_t((pr.patch_box_w * pr.patch_box_h + taps_of(source) * BN) * kRowBytes));
        const uint32_t to = smem_address(smem + stage * pr.stage_bytes);
        if constexpr (kSumPhases) {  // samples of the source phase's plane in the g copy
          tma_load_5d(to, &patch_map, group * pr.src_padded + c0, patch.min_off_w, patch.row_first, int(image),
                      pr.copy_plane[source], ready);
        } else {  // input pixels
          tma_load_4d(to, &patch_map, group * pr.src_padded + c0, patch.min_off_w + ph.src_offset_w,
                      patch.row_first + ph.src_offset_h, int(image), ready);
        }
      }
    } else if constexpr (async_patch) {
      copy_patch(offsets, copy_base(source), c0, stage);
    } else {
      if (Dir == GatherDirection::GradInput && factor_group) {
        load_patch_with(offsets, c0, std::true_type{});
      } else {
        load_patch_with(offsets, c0, std::false_type{});
      }
      staged_pixels = patch.pixels;
    }
    load_weights(source, taps_of(source), c0, stage);  // commits the patch copies
    return patch;
  };
  // Every warp's ldmatrix + mma.sync over the step's taps.
  // A lane's B rows (tap * BN + a multiple of 8 + lane % 8) all share the swizzle of row lane % 8.
  const int b_swizzle = tc_stage_swizzle(lane & 7, kRowBytes);
  uint32_t ready_parity = 0;  // TMA: bit s, the phase of stage s's barrier the next wait expects
  auto multiply = [&](int step, int stage, const Patch& patch) {
    if constexpr (kTma) {
      mbarrier_wait(stage_ready + 8 * stage, (ready_parity >> stage) & 1);
      ready_parity ^= 1u << stage;
    }
    int a_row[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) a_row[i] = (frag_a[i] + patch.min_off_h - patch.row_first) * patch.cols + frag_b[i];
    const uint32_t patch_base = smem_address(smem + stage * pr.stage_bytes);
    const uint32_t weight_base = patch_base + pr.stage_patch_bytes;
    const int* shifts = tap_shift + source_of(step) * pr.max_taps;
    const int taps = taps_of(source_of(step));
    for (int tap = 0; tap < taps; ++tap) {
      const int shift = shifts[tap];
#pragma unroll
      for (int ks = 0; ks < kTcChunk / Traits::kStep; ++ks) {
        typename Traits::AFrag a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          uint32_t raw[4];
          ldmatrix_x4(raw, patch_base + tc_stage_offset(a_row[i] + shift, ks * 2 + (lane >> 4), kRowBytes));
          Traits::make_a(a[i], raw);
        }
        // Every B fragment of the slice is loaded before the first MMA, so that the ldmatrix latencies
        // overlap: loaded in pairs, each used at once, the compiler left each MMA waiting on its own load
        // once the loop's load state took the registers it had used to run them ahead (Nsight Compute).
        typename Traits::BFrag b[kNFrags];
#pragma unroll
        for (int j = 0; j < kNFrags; j += 2) {
          uint32_t raw[4];
          const int n = j * 8 + (lane & 7) + (lane >> 4) * 8;
          ldmatrix_x4(raw, weight_base + (tap * BN + n) * kRowBytes + (((ks * 2 + ((lane >> 3) & 1)) * 16) ^ b_swizzle));
          Traits::make_b(b[j], raw[0], raw[1]);
          Traits::make_b(b[j + 1], raw[2], raw[3]);
        }
#pragma unroll
        for (int j = 0; j < kNFrags; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i) Traits::mma(acc[i][j], a[i], b[j]);
      }
    }
  };

  // Prologue: the first kStages - 1 steps. A missing step commits an empty group, so that the wait below
  // always leaves exactly the kStages - 2 youngest groups in flight.
  static_assert(async_patch || kStages == 2, "the register-staged patch holds one step");
  // grad_input's step geometries in flight, oldest (the step multiplied next) first: its sources differ in
  // taps, so each step has its own patch, and with three stages two steps are ahead of the one multiplied.
  Patch in_flight[kStages - 1] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      in_flight[s] = issue_loads(s, s);
      if constexpr (!async_patch) store_patch(s);
    } else {
      cp_async_commit();
    }
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();
  int stage = 0;
  for (int step = 0; step < steps; ++step) {
    // Step step + kStages - 1 goes into the stage the previous step read (released by its barrier).
    const int ahead = step + kStages - 1, ahead_stage = stage == 0 ? kStages - 1 : stage - 1;
    Patch ahead_patch{};
    if (ahead < steps) {
      ahead_patch = issue_loads(ahead, ahead_stage);
    } else {
      cp_async_commit();
    }
    // The forward's one source keeps its geometry in `prepared`; carrying step geometries through the loop
    // there cost registers (spills) and time (TF32 kb_v1 1.78 -> 1.94 ms).
    multiply(step, stage, kSumPhases ? in_flight[0] : prepared);
    if constexpr (!async_patch) {
      if (ahead < steps) store_patch(ahead_stage);
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if constexpr (kSumPhases) {
#pragma unroll
      for (int i = 0; i + 1 < kStages - 1; ++i) in_flight[i] = in_flight[i + 1];
      in_flight[kStages - 2] = ahead_patch;
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }

  // Epilogue. The accumulators go through shared memory (free after the mainloop), 32 channels at a time,
  // so that each thread then owns one pixel and walks the channels in a short loop: consecutive threads
  // store consecutive pixels, and the loop body (with Phi) stays small enough for the instruction cache;
  // a fully unrolled per-fragment epilogue was ~10k instructions and stalled on instruction fetch.
  // The staged parts (tc_staged_parts), and the one being staged or stored.
  constexpr int kStagedParts = tc_staged_parts<BN, Variant>();
  float* const tiles = reinterpret_cast<float*>(smem);
  float* tile = tiles;
  const int dst_plane = pr.dst_h * pr.dst_w;
  const int64_t dst_image = (image * pr.dst_channels + int64_t(group) * pr.dst_per_group) * dst_plane;
  const EpilogueConstants<float> epilogue(epi);
  const int m = m0 + tid;
  int pixel = 0;
  if (m < count) {
    const int a = m / dst_phase.extent_w, b = m % dst_phase.extent_w;
    pixel = (dst_phase.first_h + a * pr.dst_step_h) * pr.dst_w + dst_phase.first_w + b * pr.dst_step_w;
  }
  const bool stores = m < count;
  // Per-column shift (bias, plus add_value where the epilogue is on: one add per output instead of two),
  // staged once per block behind the tile (a global load per element would stall).
  float* column_shift = tiles + kStagedParts * tc_epilogue_tile_floats<BN>();
  if (tid < BN) {
    const int n = n0 + tid;
    const float column_bias =
        (bias && n < pr.dst_per_group) ? float(to_acc(bias[group * pr.dst_per_group + n])) : 0.0f;
    const bool shifted = Dir == GatherDirection::Forward && epilogue.enabled;  // grad_input stores plain sums
    column_shift[tid] = column_bias + (shifted ? epilogue.add_value : 0.0f);
  }
  // A channels_last (NHWC) destination: each tile pixel's offset in the image, channel 0 (-1 past the
  // tile's last pixel), for the threads that store it (store_pixels).
  int* pixel_at = reinterpret_cast<int*>(column_shift + BN);
  if (Dir == GatherDirection::Forward && pr.dst_channels_last) pixel_at[tid] = stores ? pixel * pr.dst_channels : -1;
  const int columns = min(BN, pr.dst_per_group - n0);
  // One column loop per combination of what is written (value, d value / d pre-activation) and whether the
  // epilogue is on, chosen once per launch: testing the output pointers and the switch per element, with
  // null-checked pointer steps, cost ~35 of ~69 instructions per output (Nsight Compute, kb_v1 bf16 forward).
  // Columns go in groups of kEpiGroup whose branch-free epilogues interleave (a divergent branch per output
  // serialized each dependent chain of ~30 instructions); a warp whose group has no negative pre-activation
  // (most of KernelBench's data) takes the short u >= 0 form instead. Every lane of the warp runs the loop
  // (the vote needs them all); lanes past the tile's last pixel do not store.
  constexpr int kEpiGroup = 4;  // = a float4 of column shifts
  static_assert(kEpiFrags * 8 % kEpiGroup == 0, "groups tile the staged columns");
  // The epilogue of one group of kEpiGroup columns from its pre-activations (pointers: see pixel_offsets).
  auto evaluate = [&](const float* pre, bool tail, EpilogueOutputs<float>* result, auto write_factor, auto enabled) {
    constexpr bool kFactor = decltype(write_factor)::value, kEnabled = decltype(enabled)::value;
    if (!kEnabled) {
#pragma unroll
      for (int k = 0; k < kEpiGroup; ++k) result[k] = {pre[k], 1.0f};
    } else if (__any_sync(0xffffffffu, tail)) {
#pragma unroll
      for (int k = 0; k < kEpiGroup; ++k) {
        if constexpr (kFactor) {
          result[k] = epilogue_value_and_derivative(pre[k], epilogue.multiply_value);
        } else {
          result[k].value = epilogue_from_preactivation(pre[k], epilogue.multiply_value);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kEpiGroup; ++k) result[k] = epilogue_at_nonnegative(pre[k]);
    }
  };
  // The pre-activations of the four staged sums at `sums` (their column shifts added); true if one is negative.
  auto preactivations = [&](const float* sums, const float (&shifts)[kEpiGroup], float (&pre)[kEpiGroup]) {
    const float4 four = *reinterpret_cast<const float4*>(sums);
    const float staged[kEpiGroup] = {four.x, four.y, four.z, four.w};
    bool tail = false;
#pragma unroll
    for (int k = 0; k < kEpiGroup; ++k) {
      pre[k] = staged[k] + shifts[k];
      tail |= pre[k] < 0.0f;
    }
    return tail;
  };
  // Columns [first, last) of kPixels (1 or 2) consecutive pixels of an output row, whose staged rows start
  // at `row` and row + pixel_stride (column c at + slot_of(c)) and whose first pixel's channel `first` sits
  // at `base` (stored if `in_tile`). Two pixels go as one two-value store per column and output (base even
  // and the outputs aligned to two values: the caller checks): half the store and address instructions.
  auto store_columns = [&](auto pixels, const float* row, int pixel_stride, auto slot_of, int first, int last,
                           int64_t base, bool in_tile, auto write_value, auto write_factor, auto enabled) {
    constexpr int kPixels = decltype(pixels)::value;
    constexpr bool kValue = decltype(write_value)::value, kFactor = decltype(write_factor)::value;
    T* out = kValue ? dst + base : nullptr;
    Factor* out_factor = kFactor ? dst_factor + base : nullptr;
    for (int column = first; column < last; column += kEpiGroup) {
      // A group never reaches past the part's kEpiFrags * 8 staged columns (zero weights beyond the group's
      // channels), so its reads need no clamping; only the stores stop at `last`.
      const float4 shift = *reinterpret_cast<const float4*>(column_shift + column);
      const float shifts[kEpiGroup] = {shift.x, shift.y, shift.z, shift.w};
      EpilogueOutputs<float> result[kPixels][kEpiGroup];
#pragma unroll
      for (int p = 0; p < kPixels; ++p) {
        float pre[kEpiGroup];
        const bool tail = preactivations(row + p * pixel_stride + slot_of(column), shifts, pre);
        evaluate(pre, tail, result[p], write_factor, enabled);
      }
      // Plane offsets within the image are 32-bit (finish_tc_problem): one wide multiply-add per address.
      auto store_output = [&](int k) {
        if constexpr (kPixels == 1) {
          if constexpr (kValue) out[k * dst_plane] = from_acc<T>(result[0][k].value);
          if constexpr (kFactor) out_factor[k * dst_plane] = from_acc<Factor>(result[0][k].factor);
        } else {
          const float values[2] = {result[0][k].value, result[1][k].value};
          const float factors[2] = {result[0][k].factor, result[1][k].factor};
          if constexpr (kValue) store_consecutive<2>(out + k * dst_plane, values);
          if constexpr (kFactor) store_consecutive<2>(out_factor + k * dst_plane, factors);
        }
      };
      if (in_tile) {
        if (column + kEpiGroup <= last) {  // every group but a group width's ragged end
#pragma unroll
          for (int k = 0; k < kEpiGroup; ++k) store_output(k);
        } else {
#pragma unroll
          for (int k = 0; k < kEpiGroup; ++k)
            if (column + k < last) store_output(k);
        }
      }
      if constexpr (kValue) out += kEpiGroup * dst_plane;
      if constexpr (kFactor) out_factor += kEpiGroup * dst_plane;
    }
  };
  // NHWC destination (the value; the factor stays NCHW): the lanes run along the channels, kGroups lanes per
  // pixel each owning a group of four columns, so that a warp's stores cover whole runs of its pixels'
  // channels (a thread per pixel, as above, would write 32 scattered pieces per instruction). Four columns go
  // as one 8- or 16-byte store where the layout keeps them aligned.
  const bool vector_stores = pr.dst_channels % kEpiGroup == 0 && pr.dst_per_group % kEpiGroup == 0 &&
                             reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const int64_t dst_image_cl = image * int64_t(dst_plane) * pr.dst_channels + int64_t(group) * pr.dst_per_group + n0;
  auto store_pixels = [&](int first, int last, auto enabled) {
    constexpr int kGroups = kEpiFrags * 8 / kEpiGroup, kPixelsPerPass = 32 / kGroups;
    const int column = first + lane % kGroups * kEpiGroup;
    const float4 shift = *reinterpret_cast<const float4*>(column_shift + column);
    const float shifts[kEpiGroup] = {shift.x, shift.y, shift.z, shift.w};
    const int slot = tc_epilogue_slot(column - first, kEpiFrags * 8);
    T* out = dst + dst_image_cl + column;
    const bool whole = vector_stores && column + kEpiGroup <= last;
#pragma unroll 1
    for (int pass = 0; pass < 32 / kPixelsPerPass; ++pass) {
      const int p = warp * 32 + pass * kPixelsPerPass + lane / kGroups;
      float pre[kEpiGroup];
      const bool tail = preactivations(tile + p * kEpiStride + slot, shifts, pre);
      EpilogueOutputs<float> result[kEpiGroup];
      evaluate(pre, tail, result, std::false_type{}, enabled);
      const int at = pixel_at[p];
      if (at < 0 || column >= last) continue;
      if (whole) {
        const float values[kEpiGroup] = {result[0].value, result[1].value, result[2].value, result[3].value};
        store_consecutive<kEpiGroup>(out + at, values);
      } else {
#pragma unroll
        for (int k = 0; k < kEpiGroup; ++k)
          if (column + k < last) out[at + k] = from_acc<T>(result[k].value);
      }
    }
  };
  // A cluster of the row phase's column phases (tc_epilogue_cluster; forward, NCHW): each block stages the
  // part's columns of rank r's share into block r's tile (distributed shared memory, rows in the cluster's
  // output-row order: tc_cluster_stride), and then stores its share for the pixels of all the cluster's
  // tiles, so that a warp's lanes write consecutive values of a row (whole sectors, each written once)
  // instead of every s_w-th. The exchange goes by stores, which do not wait: reading the partners' tiles
  // instead (a remote load's latency per four columns) cost more than the sectors saved.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int cluster = tc_cluster(Variant) ? pr.epilogue_cluster : 1;
#else
  constexpr int cluster = 1;  // no clusters before sm_90: each block stores its own phase
#endif
  static_assert(kTcThreads == kTcBlockM, "a cluster's S x kTcBlockM pixels go S per thread");
  constexpr int kColumns = kEpiFrags * 8;  // staged per part
  const int share = kColumns / cluster, cluster_stride = tc_cluster_stride(kColumns, cluster);
  const int share_shift = 31 - __clz(share);  // shares are powers of two (16 or 32 columns, S = 2 or 4)
  // Where the staging puts column `column` (of the part) of tile row `row`.
  auto staged_at = [&](int column, int row) -> float* {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (cluster > 1) {
      const unsigned owner = unsigned(column >> share_shift);
      return cooperative_groups::this_cluster().map_shared_rank(tile, owner) +
             (row * cluster + dst_phase.first_w) * cluster_stride + (column & (share - 1));
    }
#endif
    return tile + row * kEpiStride + tc_epilogue_slot(column, kColumns);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  // A thread stores pixels q and q + 1 of the cluster's output-row order (slots 2i and 2i + 1 of one phase
  // pixel: adjacent outputs, the first at an even offset) as pairs where an output row has an even length and
  // both outputs are aligned to two values; else one pixel at a time.
  const bool cluster_pairs = pr.dst_w % 2 == 0 && reinterpret_cast<uintptr_t>(dst) % (2 * sizeof(T)) == 0 &&
                             reinterpret_cast<uintptr_t>(dst_factor) % (2 * sizeof(Factor)) == 0;
  auto store_cluster = [&](int first, int last, auto write_value, auto write_factor, auto enabled) {
    const int rank = int(blockIdx.x % unsigned(cluster));  // in the cluster: its blocks are consecutive in x
    const int lo = first + rank * share, hi = min(last, lo + share);
    auto store_from = [&](auto pixels, int q) {  // q: the (first) pixel's row in the cluster's output-row order
      const int slot = q % cluster, mq = m0 + q / cluster;
      const int a = mq / dst_phase.extent_w, b = mq % dst_phase.extent_w;
      const int at = (dst_phase.first_h + a * pr.dst_step_h) * pr.dst_w + b * cluster + slot;
      store_columns(pixels, tile + q * cluster_stride, cluster_stride, [&](int column) { return column - lo; }, lo,
                    hi, dst_image + int64_t(n0 + lo) * dst_plane + at, mq < count, write_value, write_factor,
                    enabled);
    };
    if (cluster_pairs) {
#pragma unroll 1
      for (int j = 0; j < cluster / 2; ++j) store_from(Two{}, 2 * (tid + j * kTcThreads));
    } else {
#pragma unroll 1
      for (int j = 0; j < cluster; ++j) store_from(One{}, tid + j * kTcThreads);
    }
  };
  // Between staging parts and reading them (`publish`: the partners' writes into this tile become visible),
  // and before the tile is restaged or the block exits (only ordering: every read of the tile, and of the
  // stages before it, has been consumed by then). Clusters: cooperative_groups' sync() fenced at GPU scope
  // before each arrival, which waited for this thread's global stores (Nsight Compute, kb_v1 bf16 training
  // forward: 18% of the stall samples on those fences).
  auto sync_tile = [&](bool publish) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (cluster > 1) {
      cluster_barrier(publish);
      return;
    }
#endif
    __syncthreads();
  };
  using Yes = std::true_type;
  using No = std::false_type;
  const int g = lane >> 2, t = lane & 3;
  if (cluster > 1) sync_tile(false);  // the partners' tiles are their stages until their mainloops are done
#pragma unroll
  for (int part = 0; part < kEpiParts; ++part) {
    const int slot = part % kStagedParts;
    if (slot == 0) {
#pragma unroll
      for (int staging = part; staging < part + kStagedParts; ++staging) {
        tile = tiles + (staging - part) * tc_epilogue_tile_floats<BN>();
#pragma unroll
        for (int j = staging * kEpiFrags; j < (staging + 1) * kEpiFrags; ++j)
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // an mma tile's rows g and g + 8, two adjacent columns each
              const int column = (j - staging * kEpiFrags) * 8 + 2 * t, row = warp * 32 + i * 16 + g + h * 8;
              *reinterpret_cast<float2*>(staged_at(column, row)) =
                  make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
            }
      }
      sync_tile(true);
    }
    tile = tiles + slot * tc_epilogue_tile_floats<BN>();
    const int first = part * kEpiFrags * 8, last = min(columns, first + kEpiFrags * 8);
    auto own_slot = [&](int column) { return tc_epilogue_slot(column - first, kColumns); };
    const int64_t base = dst_image + int64_t(n0 + first) * dst_plane + pixel;
    // Output and factor are each optional (ForwardArgs); a call with neither writes nothing.
    auto store_as = [&](auto write_value, auto write_factor, auto enabled) {
      if (Dir == GatherDirection::Forward && pr.dst_channels_last) {
        // The value NHWC; the factor stays NCHW (ForwardArgs::output_channels_last), the way of the NCHW
        // output (its epilogue evaluated a second time: the channels_last training forward only).
        if constexpr (decltype(write_value)::value) store_pixels(first, last, enabled);
        if constexpr (decltype(write_factor)::value)
          store_columns(One{}, tile + tid * kEpiStride, 0, own_slot, first, last, base, stores, No{}, Yes{}, enabled);
      } else if (cluster > 1) {
        store_cluster(first, last, write_value, write_factor, enabled);
      } else {
        store_columns(One{}, tile + tid * kEpiStride, 0, own_slot, first, last, base, stores, write_value,
                      write_factor, enabled);
      }
    };
    auto store = [&](auto enabled) {
      if (dst && dst_factor) {
        store_as(Yes{}, Yes{}, enabled);
      } else if (dst_factor) {
        store_as(No{}, Yes{}, enabled);
      } else if (dst) {
        store_as(Yes{}, No{}, enabled);
      }
    };
    if constexpr (Dir == GatherDirection::GradInput) {
      store_columns(One{}, tile + tid * kEpiStride, 0, own_slot, first, last, base, stores, Yes{}, No{}, No{});
    } else if (epilogue.enabled) {
      store(Yes{});
    } else {
      store(No{});
    }
    if (slot == kStagedParts - 1) sync_tile(false);
  }
}


template <typename Math>
size_t packed_weight_bytes(const TcProblem& pr) {
  return size_t(pr.groups) * pr.kernel_taps * pr.dst_per_group * pr.src_padded * sizeof(typename Math::Smem);
}

// The forward's channels-last copy of its input: [image][pixel][group][src_padded] in the operand type.
template <typename Math>
size_t channels_last_source_bytes(const TcProblem& pr) {
  return size_t(pr.batch) * pr.src_h * pr.src_w * pr.groups * pr.src_padded * sizeof(typename Math::Smem);
}

// The channel tile the launcher picks from the group width, as a compile-time constant for f.
template <typename F>
decltype(auto) with_channel_tile(const TcProblem& pr, F&& f) {
  if (pr.dst_per_group <= 16) return f(std::integral_constant<int, 16>{});
  if (pr.dst_per_group <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

// Fills the launch-dependent fields of pr for channel tile BN (tiles, shared-memory layout) and returns the
// kernel's dynamic shared memory in bytes, or 0 when it or the grid does not fit the current device.
template <typename Math, GatherDirection Dir, int BN, TcVariant Variant>
size_t layout_implicit_gemm(TcProblem* pr) {
  constexpr int kRowBytes = tc_row_bytes<Math>();
  constexpr int kStages = tc_stages<Dir, Math, Variant>();
  pr->n_tiles = (pr->dst_per_group + BN - 1) / BN;
  // The TMA's boxes (one size for all phases) start on 1024-byte boundaries (its swizzle atoms); the other
  // variants' weight rows start on a line.
  const int align = tc_tma(Variant) ? 1024 : 128;
  const int patch_pixels = tc_tma(Variant) ? pr->patch_box_w * pr->patch_box_h : pr->max_patch_pixels;
  pr->stage_patch_bytes = (patch_pixels * kRowBytes + align - 1) / align * align;
  pr->stage_bytes = (pr->stage_patch_bytes + pr->max_taps * BN * kRowBytes + align - 1) / align * align;
  const int sources = Dir == GatherDirection::GradInput ? pr->phases : 1;  // tap tables' sources
  const size_t staged = size_t(kStages) * pr->stage_bytes + 2 * size_t(sources) * pr->max_taps * sizeof(int);
  const size_t smem = tc_tma(Variant)  // barriers last, + the 1024-byte alignment slack
                          ? size_t(tc_stage_barriers_offset<BN, Variant>(*pr, kStages, sources)) + 8 * kStages + 1024
                          : std::max(staged, size_t(tc_epilogue_bytes<BN, Variant>()));
  const int64_t grid_x = pr->batch * pr->m_tiles * (Dir == GatherDirection::GradInput ? 1 : pr->phases);
  const int64_t grid_y = int64_t(pr->groups) * pr->n_tiles;
  if (smem > max_dynamic_smem_bytes() || grid_x > 0x7fffffff || grid_y > 65535) return 0;
  return smem;
}

// Whether launch_implicit_gemm_conv would run this problem on the current device (rather than return false).
template <typename Math, GatherDirection Dir>
bool implicit_gemm_fits(TcProblem pr) {
  // Plain decides: the launcher falls back to it wherever another variant does not fit (the TMA ones stage
  // aligned boxes, the copied grad_input three 16-bit stages).
  return with_channel_tile(pr, [&](auto bn) {
    return layout_implicit_gemm<Math, Dir, decltype(bn)::value, TcVariant::Plain>(&pr) > 0;
  });
}

// Packs the weight into the workspace and launches the implicit-GEMM kernel with a channel tile BN chosen
// from the group width. Returns false (launching nothing) when shared memory or the grid do not fit.
// src_cl: the channels-last source of the asynchronous path. Forward: always; made here from src unless
// src_cl_ready (the caller's input already has that layout: NHWC at whole 16-channel chunks per group).
// grad_input: the g pass's copy of g where there is one (pr then from grad_input_copy_layout; src and
// src_factor unused), else null (g formed from src and src_factor while staging). epi is the forward's epilogue
// either way: the forward applies it, grad_input scales src_factor by it (factor_scale). The factor's type is
// Math::Factor (float16 for TF32).
template <typename T, typename Math, GatherDirection Dir>
bool launch_implicit_gemm_conv(TcProblem pr, const Epilogue& epi, const T* src,
                               const typename Math::Factor* src_factor, const T* weight, int64_t weight_group_stride,
                               int weight_src_stride, int weight_dst_stride, const T* bias, T* dst,
                               typename Math::Factor* dst_factor, void* workspace,
                               typename Math::Smem* src_cl, bool src_cl_ready, cudaStream_t stream) {
  using Smem = typename Math::Smem;
  if (Dir == GatherDirection::Forward && !src_cl)
    throw std::logic_error("fused_convt: the implicit-GEMM forward launched without its channels-last source");
  // The patch by TMA where the device has one and the box fits its limits (tc_tma_box): the forward's from
  // the channels-last input [image][h][w][row], grad_input's from the g copy where its planes are uniform
  // [plane][image][h'][w'][row].
  alignas(64) CUtensorMap patch_map{};
  const int64_t cl_row = int64_t(pr.groups) * pr.src_padded;
  const int64_t input_dims[4] = {cl_row, pr.src_w, pr.src_h, pr.batch};
  const int64_t copy_dims[5] = {cl_row, pr.copy_plane_w, pr.copy_plane_h, pr.batch, pr.copy_planes};
  const bool forward = Dir == GatherDirection::Forward;
  const bool tma = src_cl && (forward || pr.copy_planes > 0) && tc_tma_box(pr) && !tma_disabled() &&
                   current_device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9 &&
                   encode_rows_map(&patch_map, src_cl, int(sizeof(Smem)), forward ? 4 : 5,
                                   forward ? input_dims : copy_dims, pr.patch_box_w, pr.patch_box_h);
  return with_channel_tile(pr, [&](auto bn_constant) -> bool {
    constexpr int BN = decltype(bn_constant)::value;
    auto run = [&](auto variant_constant) -> bool {
      constexpr TcVariant Variant = decltype(variant_constant)::value;
      const size_t smem = layout_implicit_gemm<Math, Dir, BN, Variant>(&pr);
      if (smem == 0) return false;
      // The TMA variants copy the packed weight by tensor map too (encoded before anything is launched).
      alignas(64) CUtensorMap weight_map{};
      const int64_t weight_dims[3] = {pr.src_padded, pr.dst_per_group, int64_t(pr.groups) * pr.kernel_taps};
      if (tc_tma(Variant) && !encode_rows_map(&weight_map, workspace, int(sizeof(Smem)), 3, weight_dims, BN, 1))
        return false;
      const int64_t grid_x = pr.batch * pr.m_tiles * (Dir == GatherDirection::GradInput ? 1 : pr.phases);
      const int64_t grid_y = int64_t(pr.groups) * pr.n_tiles;

      Smem* packed = static_cast<Smem*>(workspace);
      const int64_t packed_count = int64_t(pr.groups) * pr.kernel_taps * pr.dst_per_group * pr.src_padded;
      const int pack_blocks = int(std::min<int64_t>((packed_count + 255) / 256, 4096));
      launch_kernel(pack_weight_kernel<T, Math>, {dim3(unsigned(pack_blocks)), dim3(256), 0, stream},
                    "pack_weight_kernel", weight, packed, pr.groups, pr.kernel_taps, pr.dst_per_group, pr.src_per_group,
                    pr.src_padded, weight_group_stride, weight_src_stride, weight_dst_stride);
      if (src_cl && !src_cl_ready) {
        if (pr.src_padded != pr.src_per_group)
          check_cuda(cudaMemsetAsync(src_cl, 0, channels_last_source_bytes<Math>(pr), stream), "cudaMemsetAsync");
        const PhaseSplitLayout layout{pr.batch, PhaseAxis{pr.src_h, 1, 0}, PhaseAxis{pr.src_w, 1, 0},
                                      int64_t(pr.groups) * pr.src_padded};
        launch_pack_channels_last<T, Math>(src, nullptr, 1.0f, pr.src_channels, pr.groups, pr.src_padded, layout, src_cl,
                                           nullptr, stream);
      }
      auto kernel = implicit_gemm_conv_kernel<T, Math, Dir, BN, Variant>;
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), int(smem),
                         "cudaFuncSetAttribute(implicit_gemm_conv_kernel)");
      // (Clusters along x: grid_x is a multiple, phases being row-major, s_w per row phase.)
      launch_kernel(kernel, {dim3(unsigned(grid_x), unsigned(grid_y)), dim3(kTcThreads), size_t(smem), stream,
                             tc_cluster(Variant) ? unsigned(pr.epilogue_cluster) : 1u},
                    "implicit_gemm_conv_kernel", pr, epi, src, src_factor, src_cl, packed, bias, dst, dst_factor,
                    patch_map, weight_map);
      return true;
    };
    using Plain = std::integral_constant<TcVariant, TcVariant::Plain>;
    if constexpr (Dir == GatherDirection::Forward) {
      // Epilogue clusters for the training forward of large problems (tc_training_epilogue_cluster).
      if (dst && dst_factor && current_device_attribute(cudaDevAttrClusterLaunch)) {
        const int resident =
            tc_min_blocks<Dir, Math, BN, TcVariant::Plain>() * current_device_attribute(cudaDevAttrMultiProcessorCount);
        pr.epilogue_cluster = tc_training_epilogue_cluster(pr, BN, int(sizeof(T)), resident,
                                                           current_device_attribute(cudaDevAttrL2CacheSize));
      }
      using V = TcVariant;
      if (pr.epilogue_cluster > 1) {
        if (tma && run(std::integral_constant<V, V::TmaPatchCluster>{})) return true;
        return run(std::integral_constant<V, V::EpilogueCluster>{});
      }
      if (tma && run(std::integral_constant<V, V::TmaPatch>{})) return true;
      return run(Plain{});
    } else {
      // The copied form stages more (three 16-bit stages); where that does not fit, g is formed in registers.
      if (tma && run(std::integral_constant<TcVariant, TcVariant::TmaCopiedSource>{})) return true;
      if (src_cl && run(std::integral_constant<TcVariant, TcVariant::CopiedSource>{})) return true;
      return src && run(Plain{});  // (no src: grad_output is NHWC, which only the copy replaces)
    }
  });
}

}  // namespace fused_convt
