// The column-pair forward (pair_problem.h): the forward at stride_w 2 on sm_90a, for float16, bfloat16
// and float with TF32 allowed (wgmma k16 on 16-bit operands, k8 on TF32: either way 32 bytes of K a step).
//
// A block keeps one weight set (group, row phase, 64/32/16 output channels of both column phases; every row
// tap and input column offset) resident in shared memory and its warpgroups walk tiles of 64 grid pixels of
// that set, each on its own: per tile one bulk copy per 16-byte plane brings the patch (two tiles in flight per
// warpgroup, an mbarrier per buffer; where four warpgroups' buffers would not fit, in K chunks of planes, a
// buffer each), and one wgmma per (row tap, column offset) multiplies the shifted patch (a row shift of the A
// descriptor) by both column phases' weights at once; the epilogue runs on the accumulators in registers. The
// outputs pass through the tile's just-consumed patch buffer so that consecutive lanes store consecutive
// output pairs (2j, 2j + 1): whole sectors, one store per pair, where the phase kernel's two column phases
// each wrote half of every sector from different blocks (kb_v1 bf16, H100 prototype: 1.07 -> 0.56 ms on
// random data). The training forward also stores grad_factor (NCHW; float16 for float, which runs here only
// with TF32: FactorType), staged through the same buffer after the output. Where a tile's wgmmas are long
// (16-bit tiles of 32 or 64 channels) a block's warpgroups issue them in turn (pair_mma_turns).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "cuda_common.cuh"
#include "fused_convt/epilogue.h"
#include "mma.cuh"
#include "pair_problem.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace fused_convt {

// Channels per 16-byte plane row, and such a row of operands: 16-bit values as they are, float rounded to TF32
// (as the phase kernel's Tf32Math stages them).
template <typename T>
constexpr int kPairPlaneChannels = kPairPlaneBytes / int(sizeof(T));
template <typename T>
__device__ __forceinline__ uint4 pair_plane_row(const T (&v)[kPairPlaneChannels<T>]) {
  if constexpr (std::is_same<T, float>::value) {
    return make_uint4(round_to_tf32(v[0]), round_to_tf32(v[1]), round_to_tf32(v[2]), round_to_tf32(v[3]));
  } else {
    return *reinterpret_cast<const uint4*>(v);
  }
}

// Exact float (k_parts 3): part `part` of a value as Fp32SplitMath splits it, the input's parts in the order
// lo, cross, hi and the weights' cross, lo, hi (pair_problem.h), so that K pairs them lo x cross, cross x lo, hi x hi.
__device__ __forceinline__ float split_part(float v, int part) {
  uint32_t hi, cross, lo;
  Fp32SplitMath::split(__float_as_uint(v), hi, cross, lo);
  return __uint_as_float(part == 0 ? lo : part == 1 ? cross : hi);
}
template <typename T>
__device__ __forceinline__ void split_parts(T (&v)[kPairPlaneChannels<T>], int part) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int q = 0; q < kPairPlaneChannels<T>; ++q) v[q] = split_part(v[q], part);
  }
}

// The input in zero-padded planes of 16 bytes per pixel, [image][plane][padded pixel][16 bytes]
// (pair_problem.h), from NCHW or NHWC: one row per thread, each of its loads coalesced with its neighbours'
// along the row. Blocks `block` of `blocks` (pack_pair_operands' share of its grid).
template <typename T>
__device__ void pack_pair_input(const PairProblem& pr, const T* __restrict__ input, bool channels_last,
                                uint4* __restrict__ padded, int block, int blocks) {
  constexpr int kPlane = kPairPlaneChannels<T>;
  const int planes = pr.groups * pr.planes(), channels = pr.groups * pr.cin_g;
  const int64_t total = pr.padded_input_rows();
  for (int64_t idx = block * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(blocks) * blockDim.x) {
    const int pixel = int(idx % pr.plane_len);
    const int64_t image_plane = idx / pr.plane_len;
    const int plane = int(image_plane % planes);
    const int64_t n = image_plane / planes;
    const int r = pixel / pr.plane_w, ih = r - pr.pad_top, iw = pixel - r * pr.plane_w - pr.pad_left;
    T v[kPlane];
    for (int q = 0; q < kPlane; ++q) v[q] = T(0.0f);
    if (ih >= 0 && ih < pr.in_h && iw >= 0 && iw < pr.in_w) {
      const int part = plane % pr.planes() / pr.channel_planes();
      const int c0 = plane / pr.planes() * pr.cin_g + plane % pr.channel_planes() * kPlane;
      if (channels_last) {
        const T* src = input + ((n * pr.in_h + ih) * pr.in_w + iw) * channels + c0;
        for (int q = 0; q < kPlane; ++q) v[q] = src[q];
      } else {
        const T* src = input + ((n * channels + c0) * pr.in_h + ih) * int64_t(pr.in_w) + iw;
        for (int q = 0; q < kPlane; ++q) v[q] = src[int64_t(q) * pr.in_h * pr.in_w];
      }
      if (pr.k_parts == 3) split_parts<T>(v, part);  // lo, cross, hi
    }
    padded[idx] = pair_plane_row<T>(v);
  }
}

// The weights of each set as the kernel's resident slots, [set][slot][plane][column phase][row phase][channel]
// [16 bytes] (n_tile rows per column phase): slot a * col_taps + u holds input row offset dh = q - a (the set's
// row_offsets) and column offset dw = col_hi - u, for each phase the tap that reads those offsets, or zeros where
// the phase has none. weight: PyTorch's [C_in][C_out / groups][kh][kw].
// Also zeroes the pair kernel's progress counter (this launch runs first, on the same stream). Blocks `block` of
// `blocks`, as pack_pair_input.
template <typename T>
__device__ void pack_pair_weight(const PairProblem& pr, const T* __restrict__ weight, uint4* __restrict__ packed,
                                 unsigned int* __restrict__ progress, int block, int blocks) {
  if (block == 0 && threadIdx.x == 0) *progress = 0;
  constexpr int kPlane = kPairPlaneChannels<T>;
  const int planes = pr.planes(), rows = 2 * pr.n_tile;
  const int64_t total = pr.packed_weight_rows();
  for (int64_t idx = block * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(blocks) * blockDim.x) {
    const int row = int(idx % rows), plane = int(idx / rows % planes), slot = int(idx / rows / planes % pr.max_taps);
    const int set = int(idx / rows / planes / pr.max_taps);
    const PairSet at = pr.set_at(set);
    const int g = at.group, ct = at.channel_tile, pw = row / pr.n_tile;
    const int rp = row % pr.n_tile / pr.channel_tile(), co = row % pr.channel_tile();
    const PairAxisTaps th = pair_axis_taps(at.row_phase * pr.row_phases + rp, pr.kernel_h, pr.stride_h, pr.pad_h);
    const PairAxisTaps tw = pair_axis_taps(pw, pr.kernel_w, 2, pr.pad_w);
    const PairAxisTaps slot_rows = pr.row_offsets(at.row_phase);
    const int a = slot / pr.col_taps;
    const int s = th.q - (slot_rows.q - a), t = tw.q - (pr.col_hi - slot % pr.col_taps);  // row tap, column tap
    T v[kPlane];
    for (int q = 0; q < kPlane; ++q) v[q] = T(0.0f);
    if (a < slot_rows.count && s >= 0 && s < th.count && t >= 0 && t < tw.count) {
      const int kh = th.k0 + pr.stride_h * s, kw = tw.k0 + 2 * t;
      const int co_g = ct * pr.channel_tile() + co;
      for (int q = 0; q < kPlane; ++q) {
        const int64_t ci = int64_t(g) * pr.cin_g + plane % pr.channel_planes() * kPlane + q;
        v[q] = weight[((ci * pr.cout_g + co_g) * pr.kernel_h + kh) * pr.kernel_w + kw];
      }
      if (pr.k_parts == 3) {  // against the input's lo, cross, hi: cross, lo, hi
        const int part = plane / pr.channel_planes();
        split_parts<T>(v, part == 2 ? 2 : 1 - part);
      }
    }
    packed[idx] = pair_plane_row<T>(v);
  }
}

// Both packs in one launch (a launch less per forward: host time and a gap between kernels, which count at small
// shapes): the first weight_blocks blocks pack the weights, the others the input.
template <typename T>
__global__ void pack_pair_operands(PairProblem pr, const T* __restrict__ weight, const T* __restrict__ input,
                                   bool channels_last, int weight_blocks, uint4* __restrict__ packed,
                                   unsigned int* __restrict__ progress, uint4* __restrict__ padded) {
  follow_previous_grid();
  const int block = int(blockIdx.x);
  if (block < weight_blocks) pack_pair_weight<T>(pr, weight, packed, progress, block, weight_blocks);
  else pack_pair_input<T>(pr, input, channels_last, padded, block - weight_blocks, int(gridDim.x) - weight_blocks);
}

// Barrier of one warpgroup (named barrier `id`, 1 + its index: 0 is __syncthreads').
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The output pixel of grid pixel l0 + m in column phase pw, and whether it exists.
struct PairPixel {
  int oh, ow;
  bool ok;
};
__device__ __forceinline__ PairPixel pair_pixel(const PairProblem& pr, int l, int ph, int pw) {
  const int i = pr.by_plane_w.quotient(l), j = pr.by_plane_w.remainder(l, i), oh = pr.stride_h * i + ph, ow = 2 * j + pw;
  return {oh, ow, i < pr.rows && oh < pr.out_h && j < pr.out_cols && ow < pr.out_w};
}

// An output pair (2j, 2j + 1) of one channel as one word: two 16-bit values in 32 bits, two floats in 64.
template <typename T>
using PairWord = std::conditional_t<sizeof(T) == 2, uint32_t, uint2>;
template <typename T>
__device__ __forceinline__ PairWord<T> pair_word(float first, float second) {
  if constexpr (sizeof(T) == 2) return Half16Math<T>::to_word({first, second});
  else return make_uint2(__float_as_uint(first), __float_as_uint(second));
}
// A pair's values stored apart (an odd row length or a misaligned output), the second only where it exists.
template <typename T>
__device__ __forceinline__ void store_pair_apart(T* out, PairWord<T> word, bool first, bool second) {
  if constexpr (sizeof(T) == 2) {
    if (first) *reinterpret_cast<uint16_t*>(out) = uint16_t(word & 0xFFFF);
    if (second) *reinterpret_cast<uint16_t*>(out + 1) = uint16_t(word >> 16);
  } else {
    if (first) out[0] = __uint_as_float(word.x);
    if (second) out[1] = __uint_as_float(word.y);
  }
}

// NCHW stores of a staged tile ([row phase x channel][pixel] output pairs, row phases ph, ph + 1, ... from the
// tile's first): warp w writes staged rows w, w + 4, ..., lane the pairs of grid pixels lane and 32 + lane, so
// consecutive lanes write consecutive pairs: one store per pair where every pair is aligned (an even row length
// and output pointer), else the two values apart. kRowPhases: pr.row_phases. A warp's rows are the same channels
// in each row phase, stored channel by channel, so that output rows 2i and 2i + 1 of a channel leave together.
// kPreload: every staged value is read into registers and the buffer released (release_buffer) before the first
// store; else each is read as it is stored, and the buffer released after the last (no registers held: the
// training forward's first store pass, while grad_factor's words wait in registers).
template <typename T, int N, int kRowPhases, bool kPreload, typename Release>
__device__ __forceinline__ void store_tile_nchw(const PairProblem& pr, const PairWord<T>* stage, int l0, int ph,
                                                int warp, int lane, T* out_image, Release release_buffer) {
  constexpr int kStride = pair_stage_stride(sizeof(T)), kPerPhase = N / 4 / kRowPhases;  // staged rows per row phase
  const int64_t channel_step = 4 * int64_t(pr.out_h) * pr.out_w;  // to this warp's next channel
  T* out[kRowPhases][2];
  bool first_ok[kRowPhases][2], second_ok[kRowPhases][2];
#pragma unroll
  for (int r = 0; r < kRowPhases; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const PairPixel first = pair_pixel(pr, l0 + 32 * h + lane, ph + r, 0);
      first_ok[r][h] = first.ok;
      second_ok[r][h] = first.ok && first.ow + 1 < pr.out_w;
      out[r][h] = out_image + warp * (channel_step / 4) + first.oh * pr.out_w + first.ow;
    }
  PairWord<T> staged[kPreload ? N / 4 : 1][2] = {};  // (initialized: unread without kPreload, which nvcc warned of)
  auto word = [&](int c, int h) {
    if constexpr (kPreload) return staged[c][h];
    else return stage[(warp + 4 * c) * kStride + 32 * h + lane];
  };
  if constexpr (kPreload) {
#pragma unroll
    for (int c = 0; c < N / 4; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) staged[c][h] = stage[(warp + 4 * c) * kStride + 32 * h + lane];
    release_buffer();
  }
  // One uniform branch per tile, not per store: the aligned loop is predicated whole-pair stores and pointer steps
  // (with the branch inside the loop, each store took ~13 instructions).
  if (pr.aligned_stores) {
#pragma unroll
    for (int c = 0; c < kPerPhase; ++c)
#pragma unroll
      for (int r = 0; r < kRowPhases; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (first_ok[r][h])
            *reinterpret_cast<PairWord<T>*>(out[r][h] + c * channel_step) = word(r * kPerPhase + c, h);
  } else {
#pragma unroll
    for (int c = 0; c < kPerPhase; ++c)
#pragma unroll
      for (int r = 0; r < kRowPhases; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          store_pair_apart<T>(out[r][h] + c * channel_step, word(r * kPerPhase + c, h), first_ok[r][h],
                              second_ok[r][h]);
  }
  if constexpr (!kPreload) release_buffer();
}

// NHWC stores of a staged tile ([output pixel][channel], rows of kPairNhwcRow<T, N> values): 16-byte pieces
// (8 channels of a 16-bit type, 4 of float), consecutive threads the consecutive pieces of a pixel's N channels
// and then of the next pixel. kPreload as for store_tile_nchw. (One row phase per tile: plan_pair_forward.)
template <typename T, int N>
constexpr int kPairNhwcRow = N + kPairPlaneBytes / int(sizeof(T));
template <typename T, int N, bool kPreload, typename Release>
__device__ __forceinline__ void store_tile_nhwc(const PairProblem& pr, const T* stage, int n, int l0, int ph,
                                                int channel0, int tid, T* output, Release release_buffer) {
  constexpr int kPiece = kPairPlaneChannels<T>, kPieces = N / kPiece, kRounds = 2 * kPairTileM * kPieces / 128;
  auto staged_piece = [&](int k) {
    const int piece = k * 128 + tid, pixel = piece / kPieces;
    return *reinterpret_cast<const uint4*>(stage + pixel * kPairNhwcRow<T, N> + piece % kPieces * kPiece);
  };
  uint4 staged[kPreload ? kRounds : 1];
  if constexpr (kPreload) {
#pragma unroll
    for (int k = 0; k < kRounds; ++k) staged[k] = staged_piece(k);
    release_buffer();
  }
  const int channels = pr.groups * pr.cout_g;
#pragma unroll
  for (int k = 0; k < kRounds; ++k) {
    const int piece = k * 128 + tid, pixel = piece / kPieces;
    const PairPixel at = pair_pixel(pr, l0 + pixel / 2, ph, pixel % 2);
    if (!at.ok) continue;
    T* out = output + ((int64_t(n) * pr.out_h + at.oh) * pr.out_w + at.ow) * channels + channel0 +
             piece % kPieces * kPiece;
    uint4 value;
    if constexpr (kPreload) value = staged[k];
    else value = staged_piece(k);
    if (pr.aligned_stores) {
      *reinterpret_cast<uint4*>(out) = value;
    } else {
      const T* v = reinterpret_cast<const T*>(&value);
#pragma unroll
      for (int q = 0; q < kPiece; ++q) out[q] = v[q];
    }
  }
  if constexpr (!kPreload) release_buffer();
}

// The grid's lockstep (pair_forward_kernel): waits until *progress reaches target, or gives up after
// kPairLockstepTimeoutNs and returns false (a grid that is not resident all at once, beside another kernel, may
// never send the rounds waited for; then the warpgroup stops waiting, and only the lockstep's speed is lost).
constexpr uint64_t kPairLockstepTimeoutNs = 200000;
__device__ __forceinline__ bool wait_for_progress(const unsigned int* progress, unsigned int target) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    unsigned int done;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(done) : "l"(progress) : "memory");
    if (done >= target) return true;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > kPairLockstepTimeoutNs) return false;
    __nanosleep(256);
  }
}

// Waits until *turns reaches target (pair_mma_turns), lane 0 polling for its warp. The counter is read atomically,
// as it is written, so that racecheck sees no hazard. Warpgroup w's n-th issue (from 0) waits for n * wgs + w
// counts: n issues of every warpgroup and one more of each before w. No wait lasts forever: the first waiter in
// (n, w) order has them, since the warpgroups before it have issued n + 1 times, those after it n times (or, done
// with their tiles, counted the issues they skip).
__device__ __forceinline__ void wait_for_turn(unsigned int* turns, unsigned int target, int lane) {
  if (lane == 0)
    while (atomicAdd(turns, 0u) < target) {
    }
  __syncwarp();
}

// One launch runs every set: block b serves set b / blocks_per_set (and every gridDim / blocks_per_set-th set
// after it when there are more sets than blocks); its warpgroups take that set's tiles in turn.
// kNhwc: the output's layout (pr.channels_last_out), a template parameter so that each kernel carries one
// store path (with both, the NCHW forward measured 0.70 -> 0.77 ms at kb_v1 bf16). kFactor: grad_factor is
// stored too (the training forward), and output may be null (only grad_factor wanted).
// kRowPhases: pr.row_phases (2: both row phases per tile, NCHW outputs only). kMinBlocks: 2 for the two blocks of
// three warpgroups per SM of PairProblem::two_blocks_per_sm (at most 80 registers a thread), else 1.
// kParts: pr.k_parts (3: exact float, inference only), a template parameter so that the TF32 and 16-bit kernels
// take the short Phi at compile time (a runtime choice between the two forms cost kb_v1 TF32 1.5%: forward row 73).
template <typename T, int N, int kTaps, int kRowPhases, bool kNhwc, bool kFactor, int kMinBlocks, int kParts>
__global__ void __launch_bounds__(kMinBlocks == 2 ? 3 * 128 : kPairMaxWarpgroups * 128, kMinBlocks)
    pair_forward_kernel(PairProblem pr, Epilogue epilogue, const uint4* __restrict__ padded,
                        const uint4* __restrict__ packed, const T* __restrict__ bias, T* __restrict__ output,
                        FactorType<T, true>* __restrict__ grad_factor, unsigned int* __restrict__ progress) {
  follow_previous_grid();
#ifdef FCT_WGMMA_ENABLED
  extern __shared__ __align__(128) unsigned char smem[];
  // The warpgroup index through a shuffle from lane 0: the compiler then knows it is the same on every lane, and
  // the descriptors and addresses derived from it live in uniform registers (from threadIdx directly, each
  // wgmma took four moves into them, and 36 bytes a thread spilled).
  constexpr bool kSixteenBit = sizeof(T) == 2;
  using F = FactorType<T, true>;  // float stores a factor here only with TF32 (exact float: inference only)
  const int wgs = blockDim.x / 128, wg = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0), tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, quad = lane % 4, row8 = lane / 4;
  // Planes from a compile-time channel count (pr.planes() divides by a runtime one); 16-bit patches come whole
  // (plan_pair_forward), so their kernels compile without the chunk loop.
  const int planes = kParts * pr.cin_g / kPairPlaneChannels<T>, chunks = kSixteenBit ? 1 : pr.chunks;
  const int chunk_planes = planes / chunks;
  const int buffer_bytes = pr.buffer_bytes(), plane_bytes = pr.plane_bytes();
  unsigned char* weights = smem;
  unsigned char* buffers = smem + pr.weight_bytes() + wg * 2 * buffer_bytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + pr.weight_bytes() + wgs * 2 * buffer_bytes);
  uint4* zeros = reinterpret_cast<uint4*>(smem + pr.weight_bytes() + wgs * 2 * buffer_bytes +
                                          PairProblem::sync_bytes(wgs));
  float* bias_add = reinterpret_cast<float*>(zeros + kPairZeroBytes / 16);  // this set's bias + add_value
  // MMA turns (pair_mma_turns): the wgmma issues of the set so far, every warpgroup's.
  constexpr bool kTurns = pair_mma_turns(int(sizeof(T)), N);
  unsigned int* turns = reinterpret_cast<unsigned int*>(&bars[1 + 2 * wgs]);
  for (int i = threadIdx.x; i < kPairZeroBytes / 16; i += blockDim.x) zeros[i] = make_uint4(0, 0, 0, 0);
  fence_proxy_async_shared();  // visible to wgmma (the async proxy)
  const uint32_t weight_bar = smem_address(&bars[0]), full_bar = smem_address(&bars[1 + 2 * wg]);
  if (threadIdx.x == 0) {
    mbarrier_init(weight_bar, 1);
    for (int i = 0; i < 2 * wgs; ++i) mbarrier_init(smem_address(&bars[1 + i]), 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  const EpilogueConstants<float> epi(epilogue);
  const int slot = blockIdx.x % pr.blocks_per_set, sets_stride = gridDim.x / pr.blocks_per_set;
  // Tile numbers (image x tiles + tile) fit 32 bits (plan_pair_forward): no 64-bit division per tile.
  const int total = pr.batch * pr.tiles, tile_stride = pr.blocks_per_set * wgs;
  const int64_t plane_pixels = pr.plane_len;
  int k = 0;     // this warpgroup's tiles so far (the lockstep's rounds)
  int item = 0;  // and its (tile, K chunk) copies so far: buffer item & 1, its barrier's phase (item >> 1) & 1
  for (int set = blockIdx.x / pr.blocks_per_set, round = 0; set < pr.sets; set += sets_stride, ++round) {
    __syncthreads();  // every warpgroup is done with the previous set's weights and bias
    const PairSet at = pr.set_at(set);
    // ph: the tile's first row phase; channel0: its first output channel (both row phases have the same).
    const int g = at.group, ph = at.row_phase * kRowPhases, ct = at.channel_tile;
    const int channel0 = g * pr.cout_g + ct * pr.channel_tile();
    if (kTurns && threadIdx.x == 0) *turns = 0;  // between this set's two __syncthreads
    const int set_item = item;  // item - set_item: this warpgroup's wgmma issues in this set (one per K chunk)
    // In shared memory rather than registers (the epilogue is at the 128-register bound).
    if (threadIdx.x < N) {
      const int co = channel0 + threadIdx.x % pr.channel_tile();
      bias_add[threadIdx.x] = (bias ? to_acc(bias[co]) : 0.0f) + (epi.enabled ? epi.add_value : 0.0f);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(weight_bar, pr.weight_bytes());
      bulk_copy(smem_address(weights), packed + int64_t(set) * (pr.weight_bytes() / 16), pr.weight_bytes(),
                weight_bar);
    }
    // A K chunk of a tile's patch: one run of pr.patch pixels per plane of the chunk, its image and group.
    auto issue = [&](int tile, int chunk, int buffer) {
      const int n = pr.by_tiles.quotient(tile), l0 = pr.by_tiles.remainder(tile, n) * kPairTileM;
      const uint32_t bar = full_bar + 8 * buffer;
      mbarrier_arrive_expect_tx(bar, chunk_planes * plane_bytes);
      const uint4* src = padded + (((int64_t(n) * pr.groups + g) * planes + chunk * chunk_planes) * plane_pixels +
                                   l0 + pr.shift_min);
      for (int p = 0; p < chunk_planes; ++p)
        bulk_copy(smem_address(buffers + buffer * buffer_bytes + p * plane_bytes), src + p * plane_pixels,
                  plane_bytes, bar);
    };
    int tile = slot * wgs + wg;
    // The copy `ahead` items after chunk 0 of this tile (the tile's chunks, then the next tile's), if any.
    auto issue_ahead = [&](int ahead, int buffer) {
      const int later = tile + ahead / chunks * tile_stride;
      if (later < total) issue(later, ahead % chunks, buffer);
    };
    // Lockstep, where each block serves one set and the launcher asks for it (pair_lockstep): the warpgroups of
    // the grid finish tiles of the same image region together. Output rows of the two row phases (other sets, other blocks) and neighbouring tiles
    // share 32-byte sectors at their ends; when blocks drift apart, the first partial sector leaves L2 before its
    // other part arrives and DRAM reads and writes it twice (H100, kb_v1 bf16 on KernelBench's data: without it
    // SM busy times spread from 0.77M to 1.15M cycles, L2 write misses rose from 0.24M to 3.3M sectors, DRAM
    // reads from 81 to 259 MB, and the kernel took 0.68 ms where it took 0.51 in isolation). Each warpgroup
    // leader counts its finished tiles in *progress and, before its tile k, waits until every warpgroup has finished
    // k - kPairSlack tiles. One tile of slack rather than two (eighteenth session; 4 and 8 were slower still):
    // kb_v1 inference forward bf16 0.645 -> 0.549 ms, TF32 0.918 -> 0.875, training forward (output and factor)
    // bf16 1.28 -> 1.11, TF32 1.50 -> 1.26 (H100, KernelBench data, same call; randn data 1.36 -> 1.12 and
    // 1.53 -> 1.44).
    constexpr int kPairSlack = 1;
    const bool lockstep = pr.lockstep && pr.sets <= sets_stride;
    const unsigned int grid_wgs = gridDim.x * wgs, rounds = (total + tile_stride - 1) / tile_stride;
    bool waiting = lockstep && tid == 0;
    if (tid == 0) {
      issue_ahead(0, item & 1);
      issue_ahead(1, (item + 1) & 1);
    }
    const PairAxisTaps th = pr.row_offsets(at.row_phase);
    mbarrier_wait(weight_bar, round & 1);
    const uint32_t weight_base = smem_address(weights);
    // Descriptor words: the high word (the row stride) is the same for every operand; the low word holds the
    // address and the K stride. B has 2N rows: both column phases' N (row phase, channel) columns. The zeros as a
    // 64-row A operand and a 2N-row B operand (real strides: every byte read is zero).
    const uint32_t a_hi = uint32_t(wgmma_descriptor(0, 0, 128) >> 32), b_hi = a_hi;
    const uint32_t zero_a_lo = uint32_t(wgmma_descriptor(smem_address(zeros), kPairTileM * 16, 128));
    const uint32_t zero_b_lo = uint32_t(wgmma_descriptor(smem_address(zeros), 2 * N * 16, 128));
    const uint32_t weight_lo = uint32_t(wgmma_descriptor(weight_base, 2 * N * 16, 128));
    // The A offset of tap (0, 0) in the patch (row offset th.q, column offset col_hi): tap (a, u) reads a rows
    // and u pixels before it, its weights in slot a * col_taps + u (16-byte units).
    const int slot_units = planes * 2 * N;
    const int a_base = pr.shift(th.q, pr.col_hi) - pr.shift_min;
    const int64_t set_offset = int64_t(channel0) * pr.out_h * int64_t(pr.out_w);
    for (; tile < total; tile += tile_stride, ++k) {
      if (waiting && k >= kPairSlack) waiting = wait_for_progress(progress, (k - kPairSlack) * grid_wgs);
      // The first wgmma overwrites the accumulators (scale-d 0): zeroing them with ordinary moves instead made
      // ptxas wait for every wgmma, and so did runtime loops over the taps; so the tap loops run kTaps x kTaps
      // times, and a tap the set lacks multiplies zeros by zeros (both operands from the block's zeros): it adds
      // exactly 0, whatever the input holds (an infinity times a zero weight would not). A column phase without
      // a tap at some offset has zero weights there (pack_pair_weight), one without any taps is the bias.
      // acc[pw] holds column phase pw: the wgmma's columns N pw ... N pw + N - 1.
      float acc[2][N / 2];
      float(&acc_both)[N] = reinterpret_cast<float(&)[N]>(acc);
      int buffer = 0;
#pragma unroll 1
      for (int chunk = 0; chunk < chunks; ++chunk, ++item) {
        buffer = __shfl_sync(0xffffffffu, item & 1, 0);
        mbarrier_wait(full_bar + 8 * buffer, (item >> 1) & 1);
        if constexpr (kTurns) wait_for_turn(turns, unsigned(item - set_item) * wgs + wg, lane);
        wgmma_fence();
        // Descriptors advance by adding to their address field (16-byte units, in the low word; shared memory
        // stays below the field's 256 KB).
        const uint32_t patch_lo =
            uint32_t(wgmma_descriptor(smem_address(buffers + buffer * buffer_bytes), plane_bytes, 128));
        const uint32_t weight_chunk_lo = __shfl_sync(0xffffffffu, weight_lo + chunk * chunk_planes * 2 * N, 0);
#pragma unroll 1
        for (int kk = 0; kk < chunk_planes / 2; ++kk) {
          const uint32_t a_kk = patch_lo + kk * (plane_bytes / 8), b_kk = weight_chunk_lo + kk * 4 * N;
#pragma unroll
          for (int a = 0; a < kTaps; ++a)
#pragma unroll
            for (int u = 0; u < kTaps; ++u) {
              const bool used = a < th.count && u < pr.col_taps;
              const uint32_t a_lo = used ? a_kk + (a_base - a * pr.plane_w - u) : zero_a_lo;
              const uint32_t b_lo = used ? b_kk + (a * pr.col_taps + u) * slot_units : zero_b_lo;
              wgmma_k32bytes<T, 2 * N>(acc_both, (uint64_t(a_hi) << 32) | a_lo, (uint64_t(b_hi) << 32) | b_lo,
                                       (a | u | kk | chunk) != 0);
            }
        }
        wgmma_commit();
        if (kTurns && tid == 0) atomicAdd(turns, 1u);
        // The previous chunk's wgmmas done (this chunk's may still run), every warp's: the copy two items after
        // that chunk refills its buffer (the last chunk's buffer stages the outputs first, release_buffer below).
        if (chunk > 0) {
          wgmma_wait<1>();
          named_barrier_sync(1 + wg, 128);
          if (tid == 0) issue_ahead(chunk + 1, buffer ^ 1);
        }
      }
      wgmma_wait_all();
      // The accumulator of (row 16 warp + row8 + 8 r, column phase pw, column 8 c + 2 quad + e) is
      // acc[pw][4 c + 2 r + e].
      // Epilogue into the consumed patch buffer: NCHW as [channel][pixel] output pairs (2j, 2j + 1), NHWC as
      // [output pixel][channel]. With kFactor, grad_factor (NCHW) follows through the same buffer once the
      // output's staged values are stored, its words waiting in registers (the accumulators' registers) meanwhile.
      named_barrier_sync(1 + wg, 128);
      unsigned char* stage = buffers + buffer * buffer_bytes;
      const int n = pr.by_tiles.quotient(tile), l0 = pr.by_tiles.remainder(tile, n) * kPairTileM;
      const int64_t image_offset = int64_t(n) * pr.groups * pr.cout_g * pr.out_h * pr.out_w;
      // The epilogue of one pre-activation u (replaced by the value; f: its factor, with kFactor), its whole
      // function or (tail false) the form where u >= 0. Phi (and phi) to ~2e-5 relative (normal_cdf_nonpositive_16bit)
      // wherever the value is rounded to 16 bits or comes from TF32 products (kParts 1), and the factor is 16-bit
      // (the training forward: exact float runs inference only): perf/NOTES.md forward rows 73-74. Exact float's
      // inference keeps float's Phi.
      constexpr bool kShortPhi = kParts == 1;
      auto epilogue_at = [&](auto tail, float& u, float& f) {
        constexpr bool kTail = decltype(tail)::value;
        if constexpr (kFactor) {
          const EpilogueOutputs<float> o = kTail ? epilogue_value_and_derivative<float, kShortPhi>(u, epi.multiply_value)
                                                 : epilogue_at_nonnegative(u);
          u = o.value, f = o.factor;
        } else {
          u = kTail ? epilogue_from_preactivation<float, kShortPhi>(u, epi.multiply_value) : value_at_nonnegative(u);
        }
      };
      // Words of both column phases of channels 8 c + 2 quad + e (e = 0, 1) as NCHW pairs of type U (T, or F for
      // grad_factor, whose staging also goes beside an NHWC output: the NHWC staging, whose size sets the buffer,
      // is never the smaller one; nor is a float16 factor's beside a float output).
      auto stage_nchw = [&](auto type, int r, int c, const PairWord<decltype(type)> (&words)[2]) {
        using U = decltype(type);
#pragma unroll
        for (int e = 0; e < 2; ++e)
          reinterpret_cast<PairWord<U>*>(stage)[(8 * c + 2 * quad + e) * pair_stage_stride(sizeof(U)) + 16 * warp +
                                                row8 + 8 * r] = words[e];
      };
      PairWord<F> factor_words[kFactor ? 2 : 1][kFactor ? N / 8 : 1][2];  // [r][c][e]
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < N / 8; ++c) {
          float v[2][2], f[2][2];  // [column phase][column 8 c + 2 quad + e]: the value and its factor
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float shift = bias_add[8 * c + 2 * quad + e];
            v[0][e] = acc[0][4 * c + 2 * r + e] + shift, v[1][e] = acc[1][4 * c + 2 * r + e] + shift;
            f[0][e] = f[1][e] = 1.0f;  // the identity's derivative
          }
          if (epi.enabled) {
            const bool tail = v[0][0] < 0.0f || v[0][1] < 0.0f || v[1][0] < 0.0f || v[1][1] < 0.0f;
            // A branch, not a select: the warp skips the tail's math where none of its 128 values needs it.
            // (KernelBench's data, almost every output on the u >= 0 side: one vote per 128 values measured
            // 0.650 -> 0.619 ms against one per 64 at kb_v1 bf16; on data where most warps need the tail the
            // finer vote was faster, fused_convt_timer's +0.5 data 0.77 -> 0.68 with the NHWC path split off.)
            if (__any_sync(0xffffffffu, tail)) {
#pragma unroll
              for (int q = 0; q < 4; ++q) epilogue_at(std::true_type{}, v[q / 2][q % 2], f[q / 2][q % 2]);
            } else {
#pragma unroll
              for (int q = 0; q < 4; ++q) epilogue_at(std::false_type{}, v[q / 2][q % 2], f[q / 2][q % 2]);
            }
          }
          if constexpr (kFactor) {
#pragma unroll
            for (int e = 0; e < 2; ++e) factor_words[r][c][e] = pair_word<F>(f[0][e], f[1][e]);
          }
          if (kFactor && !output) continue;
          const int m = 16 * warp + row8 + 8 * r;
          if constexpr (kNhwc) {
#pragma unroll
            for (int pw = 0; pw < 2; ++pw)
              *reinterpret_cast<PairWord<T>*>(reinterpret_cast<T*>(stage) + (2 * m + pw) * kPairNhwcRow<T, N> + 8 * c +
                                              2 * quad) = pair_word<T>(v[pw][0], v[pw][1]);
          } else {
            stage_nchw(T(), r, c, {pair_word<T>(v[0][0], v[1][0]), pair_word<T>(v[0][1], v[1][1])});
          }
        }
      named_barrier_sync(1 + wg, 128);
      // The last store phase of a tile loads its staged values into registers first, so that the proxy fence (a
      // CTA memory barrier, which would wait for this thread's global stores) and the buffer's next copy come
      // before the stores. The buffer's next copy (the asynchronous proxy) may only start after these generic
      // reads.
      auto release_buffer = [&] {
        fence_proxy_async_shared();
        named_barrier_sync(1 + wg, 128);
        if (tid == 0) issue_ahead(chunks + 1, buffer);
      };
      auto store_output = [&](auto release) {
        if constexpr (kNhwc)
          store_tile_nhwc<T, N, !kFactor>(pr, reinterpret_cast<const T*>(stage), n, l0, ph, channel0,
                                          tid, output, release);
        else
          store_tile_nchw<T, N, kRowPhases, !kFactor>(pr, reinterpret_cast<const PairWord<T>*>(stage), l0, ph, warp,
                                                      lane, output + set_offset + image_offset, release);
      };
      if constexpr (kFactor) {
        // The output streamed from the buffer (kb_v1 bf16, add -0.5 data: 1.52 -> 1.37 ms against reading it all
        // first, when 112 bytes a thread spilled), then grad_factor staged where it was.
        if (output) store_output([&] { named_barrier_sync(1 + wg, 128); });
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int c = 0; c < N / 8; ++c) stage_nchw(F(), r, c, factor_words[r][c]);
        named_barrier_sync(1 + wg, 128);
        store_tile_nchw<F, N, kRowPhases, true>(pr, reinterpret_cast<const PairWord<F>*>(stage), l0, ph, warp, lane,
                                                grad_factor + set_offset + image_offset, release_buffer);
      } else {
        store_output(release_buffer);
      }
      if (lockstep && tid == 0) atomicAdd(progress, 1u);
    }
    // A warpgroup with fewer tiles than warpgroup 0 (the most) counts the turns it does not take, so that every
    // wait for a turn ends.
    if (kTurns && tid == 0) {
      const int first = slot * wgs, most = first < total ? (total - first + tile_stride - 1) / tile_stride * chunks : 0;
      if (item - set_item < most) atomicAdd(turns, unsigned(most - (item - set_item)));
    }
    // A warpgroup with fewer tiles than the most counts the rounds it does not run, so that every round's
    // count completes.
    if (lockstep && tid == 0 && unsigned(k) < rounds) atomicAdd(progress, rounds - unsigned(k));
  }
#endif
}

// Workspace of the pair path: [packed weights (rounded to 256 B)][progress counter (256 B)][padded input].
inline size_t pair_packed_bytes(const PairProblem& pr) {
  return (size_t(pr.packed_weight_rows()) * kPairPlaneBytes + 255) / 256 * 256;
}
constexpr size_t kPairProgressBytes = 256;
inline size_t pair_workspace_bytes(const PairProblem& pr) {
  return pair_packed_bytes(pr) + kPairProgressBytes + size_t(pr.padded_input_rows()) * kPairPlaneBytes;
}

// Plans the pair path for this device, or false where it does not apply (no sm_90a code in this build, not
// compute capability 9.0, or a problem outside plan_pair_forward). stores_output / stores_factor: what the launch
// will store (pair_both_row_phases' rule; FUSED_CONVT_PAIR_BOTH_ROW_PHASES set and not "0" takes both row phases
// per tile wherever the plan can, so that tests reach that layout at small sizes).
inline bool pair_forward_plan_for_device(const ConvTransposeParams& params, int elem_bytes, bool output_channels_last,
                                         PairProblem* pr, int k_parts, bool stores_output, bool stores_factor) {
  if (!sm90a_kernels_run_here()) return false;
  const int64_t stored =  // a factor is 16 bits (FactorType)
      params.output_numel() * ((stores_output ? elem_bytes : 0) + (stores_factor ? 2 : 0));
  const bool both_row_phases =
      env_switch_on("FUSED_CONVT_PAIR_BOTH_ROW_PHASES") ||
      pair_both_row_phases(elem_bytes, stores_factor, stored, current_device_attribute(cudaDevAttrL2CacheSize));
  return plan_pair_forward(params, elem_bytes, current_device_attribute(cudaDevAttrMultiProcessorCount),
                           output_channels_last, pr, k_parts, both_row_phases);
}

// Runs the pair forward (pr from pair_forward_plan_for_device) into an NCHW or NHWC output and, where given, an
// NCHW grad_factor of FactorType<T, true> (output may then be null).
template <typename T>
void launch_pair_forward(PairProblem pr, const Epilogue& epilogue, const T* input, bool input_channels_last,
                         const T* weight, const T* bias, T* output, FactorType<T, true>* grad_factor, void* workspace,
                         cudaStream_t stream) {
  if (pr.elem_bytes != int(sizeof(T)) || (sizeof(T) == 4 && pr.n_tile == 64))
    throw std::logic_error("fused_convt: a pair plan made for another element type");
  if (!output && !grad_factor) throw std::logic_error("fused_convt: a pair forward with nothing to store");
  if (pr.k_parts != 1 && grad_factor)  // its factor would be float, which the kernel does not store
    throw std::logic_error("fused_convt: an exact float pair forward with grad_factor");
  // Whole-pair stores (NCHW: an even row length) or 16-byte pieces (NHWC: channel counts are multiples of 16),
  // where every tensor this launch stores allows them.
  auto aligned = [&](const auto* tensor, bool nhwc) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(tensor);
    return !tensor || (nhwc ? address % 16 == 0 : pr.out_w % 2 == 0 && address % (2 * sizeof(*tensor)) == 0);
  };
  pr.aligned_stores = aligned(output, pr.channels_last_out) && aligned(grad_factor, false);
  pr.lockstep = pair_lockstep(pr, output ? int(sizeof(T)) : 0, grad_factor ? int(sizeof(FactorType<T, true>)) : 0,
                              current_device_attribute(cudaDevAttrL2CacheSize));
  auto* packed = static_cast<uint4*>(workspace);
  auto* progress = reinterpret_cast<unsigned int*>(static_cast<unsigned char*>(workspace) + pair_packed_bytes(pr));
  auto* padded = reinterpret_cast<uint4*>(static_cast<unsigned char*>(workspace) + pair_packed_bytes(pr) +
                                          kPairProgressBytes);
  const int threads = 256;
  auto blocks = [&](int64_t rows) { return int(std::min<int64_t>((rows + threads - 1) / threads, 65536)); };
  const int weight_blocks = blocks(pr.packed_weight_rows());
  launch_kernel(pack_pair_operands<T>, {dim3(unsigned(weight_blocks + blocks(pr.padded_input_rows()))), dim3(threads), 0,
                                        stream},
                "pack_pair_operands", pr, weight, input, input_channels_last, weight_blocks, packed, progress, padded);
  auto run = [&](auto kernel) {
    const int smem = pr.smem_bytes(pr.warpgroups);
    allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, "cudaFuncSetAttribute(pair_forward_kernel)");
    launch_kernel(kernel, {dim3(unsigned(pr.grid)), dim3(unsigned(pr.warpgroups * 128)), size_t(smem), stream},
                  "pair_forward_kernel", pr, epilogue, padded, packed, bias, output, grad_factor, progress);
  };
  auto with_parts = [&](auto n_tile, auto nhwc, auto factor, auto min_blocks, auto row_phases, auto parts) {
    constexpr int N = decltype(n_tile)::value, kMinBlocks = decltype(min_blocks)::value;
    constexpr int kRowPhases = decltype(row_phases)::value, kParts = decltype(parts)::value;
    constexpr bool kNhwc = decltype(nhwc)::value, kFactor = decltype(factor)::value;
    if (pr.max_axis_taps == 1) run(pair_forward_kernel<T, N, 1, kRowPhases, kNhwc, kFactor, kMinBlocks, kParts>);
    else if (pr.max_axis_taps == 2) run(pair_forward_kernel<T, N, 2, kRowPhases, kNhwc, kFactor, kMinBlocks, kParts>);
    else run(pair_forward_kernel<T, N, 3, kRowPhases, kNhwc, kFactor, kMinBlocks, kParts>);
  };
  // Exact float's kernels exist only for the tiles plan_pair_forward gives it: 16 channels, one row phase, no factor.
  auto with_row_phases = [&](auto n_tile, auto nhwc, auto factor, auto min_blocks, auto row_phases) {
    if constexpr (std::is_same<T, float>::value && decltype(n_tile)::value == 16 &&
                  decltype(row_phases)::value == 1 && !decltype(factor)::value) {
      if (pr.k_parts == 3)
        return with_parts(n_tile, nhwc, factor, min_blocks, row_phases, std::integral_constant<int, 3>{});
    }
    if (pr.k_parts != 1) throw std::logic_error("fused_convt: no exact float pair kernel for this plan's tiles");
    with_parts(n_tile, nhwc, factor, min_blocks, row_phases, std::integral_constant<int, 1>{});
  };
  auto with_blocks = [&](auto n_tile, auto nhwc, auto factor, auto min_blocks) {
    if constexpr (!decltype(nhwc)::value) {  // NHWC tiles hold one row phase (plan_pair_forward)
      if (pr.row_phases == 2)
        return with_row_phases(n_tile, nhwc, factor, min_blocks, std::integral_constant<int, 2>{});
    }
    with_row_phases(n_tile, nhwc, factor, min_blocks, std::integral_constant<int, 1>{});
  };
  auto with_taps = [&](auto n_tile, auto nhwc, auto factor) {
    if constexpr (decltype(n_tile)::value == 16) {
      if (pr.blocks_per_sm == 2) return with_blocks(n_tile, nhwc, factor, std::integral_constant<int, 2>{});
    }
    with_blocks(n_tile, nhwc, factor, std::integral_constant<int, 1>{});
  };
  auto with_tile = [&](auto nhwc, auto factor) {
    if constexpr (sizeof(T) == 2) {  // float tiles stop at 32 channels (plan_pair_forward): none compiled
      if (pr.n_tile == 64) return with_taps(std::integral_constant<int, 64>{}, nhwc, factor);
    }
    if (pr.n_tile == 32) with_taps(std::integral_constant<int, 32>{}, nhwc, factor);
    else with_taps(std::integral_constant<int, 16>{}, nhwc, factor);
  };
  auto with_layout = [&](auto factor) {
    if (pr.channels_last_out) with_tile(std::true_type{}, factor);
    else with_tile(std::false_type{}, factor);
  };
  // Two blocks per SM for 16-channel tiles (two_blocks_per_sm): 16-bit everywhere measured (kb_v0 bf16 inference
  // 38.7 -> 36.0 us, at batch 512 136.6 -> 121.1), float only where its output fits in L2 (kb_v0 56.7 -> 54.4 us;
  // at batch 512, 143 MB, it measured 221.5 -> 231.7). H100, CUDA graph replay, perf/NOTES.md forward row 54. The
  // training forward too (row 71: kb_v0's kernel 48.7 -> 47.1 us TF32, 36.8 -> 35.1 bf16).
  if (sizeof(T) == 2 || pr.outputs() * int64_t(sizeof(T)) <= current_device_attribute(cudaDevAttrL2CacheSize))
    pr.two_blocks_per_sm(current_device_attribute(cudaDevAttrMultiProcessorCount));
  if (grad_factor) with_layout(std::true_type{});
  else with_layout(std::false_type{});
}

}  // namespace fused_convt
