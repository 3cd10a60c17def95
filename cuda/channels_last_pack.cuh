// Channels-last, phase-split copies of NCHW tensors in a tensor-core operand type: the operands of the
// grad_weight GEMM (grad_weight_gemm.cuh).
//
// grad_weight reduces over pixels, so its GEMM operands are [pixel][channel] tiles; staged with 16-byte
// cp.async they must have the channels of a pixel contiguous. The two operands come from NCHW tensors:
//  * x -> X[n][ih][iw][group][channel padded], a plain transpose;
//  * g = grad_output * grad_factor -> G[phase][n][a][b][group][channel padded]: the product is formed once,
//    rounded to the operand type once, and each output phase becomes one contiguous plane, so that a
//    block of the GEMM walks its phase's pixels as consecutive rows. The same pass sums grad_bias (in the
//    accumulator type, from the unrounded product), per block in a fixed order, into partials that a
//    second kernel adds in index order: deterministic, with no atomics. With dst == nullptr only the bias
//    sums are made (weights frozen).
// Channels are padded per group (`padded` values per group, layout.row = groups x padded; grad_weight uses a
// multiple of kPackAlign, the forward's patch a multiple of its 16-channel chunk) so that every 16-byte piece
// of a row belongs to one group; the padding is zero-filled by the caller (only needed where it exists).
// The same kernel, with stride 1 and no factor, makes the forward's channels-last copy of x.
#pragma once

#include <algorithm>

#include "cuda_common.cuh"
#include "fused_convt/params.h"
#include "fused_convt/tap_map.h"
#include "mma.cuh"

namespace fused_convt {

constexpr int kPackAlign = 8;     // channel padding per group: 16 bytes of 16-bit values, 32 of float
constexpr int kPackChannels = 32;  // channels of one transpose tile (one per lane when writing)
constexpr int kPackPixels = 64;    // pixels of one tile (two per lane when reading)
constexpr int kPackThreads = 256;
constexpr int kPackWarps = kPackThreads / 32;
constexpr int kPackChannelsPerWarp = kPackChannels / kPackWarps;
constexpr int kPackPixelsPerLane = kPackPixels / 32;

FCT_HD int64_t padded_channels(int64_t per_group) { return (per_group + kPackAlign - 1) / kPackAlign * kPackAlign; }

// grid = (batch x pixel blocks, channel tiles). A block walks one contiguous range of one image's pixels
// (rows x cols flattened: a channel's plane is contiguous, whatever the image width) in tiles of
// kPackChannels x kPackPixels: warps read channel rows (lanes along pixels, coalesced, 8 loads per thread in
// flight per tile), then write pixel rows (lanes along channels). Index math is kept out of the per-value
// path: versions that derived each destination per stored value were compute-bound at ~0.4-1 TB/s (H100).
// Walking image rows instead of the flattened plane also wasted most of a tile at each row end.
// bias_partial[(n * pixel_blocks + pixel_block) * channels + c] = sum of the block's values of channel c.
template <typename T, typename Math>
__global__ void __launch_bounds__(kPackThreads)
pack_channels_last_kernel(const T* __restrict__ src, const T* __restrict__ factor, int channels, int groups,
                          int padded, int pixel_blocks, PhaseSplitLayout layout, typename Math::Smem* __restrict__ dst,
                          typename DeviceAcc<T>::type* __restrict__ bias_partial) {
  using Acc = typename DeviceAcc<T>::type;
  __shared__ Acc tile[kPackChannels][kPackPixels + 1];
  __shared__ int64_t dst_rows[kPackPixels];
  const int cols = layout.w.size;
  const int plane = layout.h.size * cols;  // < 2^31 (validated)
  const int pixel_block = int(blockIdx.x % pixel_blocks);
  const int64_t n = blockIdx.x / pixel_blocks;
  const int per_block = int((plane + int64_t(pixel_blocks) * kPackPixels - 1) / (int64_t(pixel_blocks) * kPackPixels) *
                            kPackPixels);
  const int begin = pixel_block * per_block, end = min(plane, begin + per_block);
  const int c0 = blockIdx.y * kPackChannels;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per_group = channels / groups;
  // Channels this warp reads, and the channel this lane writes (its place in a padded pixel row).
  const int read_channels = min(kPackChannelsPerWarp, max(0, channels - c0 - warp + kPackWarps - 1) / kPackWarps);
  const T* src_channel = src + (n * channels + c0 + warp) * int64_t(plane);
  const T* factor_channel = factor ? factor + (n * channels + c0 + warp) * int64_t(plane) : nullptr;
  const int64_t channel_step = int64_t(kPackWarps) * plane;
  const int c_write = c0 + lane;
  const int64_t dst_channel = c_write < channels ? int64_t(c_write / per_group) * padded + c_write % per_group : 0;

  Acc bias_sum[kPackChannelsPerWarp];
#pragma unroll
  for (int i = 0; i < kPackChannelsPerWarp; ++i) bias_sum[i] = Acc(0);

  for (int p0 = begin; p0 < end; p0 += kPackPixels) {
    Acc v[kPackChannelsPerWarp][kPackPixelsPerLane];
#pragma unroll
    for (int i = 0; i < kPackChannelsPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < kPackPixelsPerLane; ++j) {
        const int pixel = p0 + j * 32 + lane;
        const bool ok = i < read_channels && pixel < end;
        v[i][j] = ok ? to_acc(src_channel[i * channel_step + pixel]) : Acc(0);
        if (factor_channel && ok) v[i][j] *= to_acc(factor_channel[i * channel_step + pixel]);
      }
    // Destination row of each pixel of the tile (PhaseSplitLayout::pixel_row in 32-bit steps), decoded once
    // per pixel by one thread while the loads are in flight: decoding it in the write loop (every lane, every
    // channel tile) was ~100 integer instructions per 32 stored values and made this kernel compute-bound.
    // The barrier at the end of the previous tile protects both dst_rows and tile.
    if (dst && threadIdx.x < kPackPixels && p0 + int(threadIdx.x) < end) {
      const int o_h = (p0 + int(threadIdx.x)) / cols, o_w = p0 + int(threadIdx.x) - o_h * cols;
      const int rh = layout.h.phase_of(o_h), rw = layout.w.phase_of(o_w);
      const int extent_h = layout.h.extent(rh), extent_w = layout.w.extent(rw);
      dst_rows[threadIdx.x] =
          layout.batch * (int64_t(layout.h.before(rh)) * cols + int64_t(extent_h) * layout.w.before(rw)) +
          (n * extent_h + layout.h.index_in_phase(o_h, rh)) * extent_w + layout.w.index_in_phase(o_w, rw);
    }
#pragma unroll
    for (int i = 0; i < kPackChannelsPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < kPackPixelsPerLane; ++j) {
        bias_sum[i] += v[i][j];
        if (dst) tile[warp + i * kPackWarps][j * 32 + lane] = v[i][j];
      }
    if (dst == nullptr) continue;  // bias only (uniform over the block): the tile is not used
    __syncthreads();
    if (c_write < channels) {
      for (int q = warp; q < kPackPixels && p0 + q < end; q += kPackWarps)
        dst[dst_rows[q] * layout.row + dst_channel] = Math::to_smem(from_acc<T>(tile[lane][q]));
    }
    __syncthreads();
  }

  if (bias_partial) {
    // Lanes hold pixels: a fixed butterfly over the lanes, then lane 0 writes the warp's channels.
#pragma unroll
    for (int i = 0; i < kPackChannelsPerWarp; ++i) {
      const Acc v = warp_sum(bias_sum[i]);
      const int c = c0 + warp + i * kPackWarps;
      if (lane == 0 && c < channels) bias_partial[(n * pixel_blocks + pixel_block) * channels + c] = v;
    }
  }
}

// Pixel blocks per image: enough blocks to fill the GPU at small batch, fixed by the problem alone (the bias
// partials' count and order depend on it).
inline int pack_pixel_blocks(int64_t batch, int channels, int64_t plane) {
  const int64_t tiles = batch * ((channels + kPackChannels - 1) / kPackChannels);
  if (tiles == 0) return 1;
  const int64_t max_blocks = std::max<int64_t>(1, (plane + kPackPixels - 1) / kPackPixels);
  return int(std::clamp<int64_t>((2048 + tiles - 1) / tiles, 1, max_blocks));
}

template <typename T, typename Math>
void launch_pack_channels_last(const T* src, const T* factor, int channels, int groups, int padded,
                               const PhaseSplitLayout& layout, typename Math::Smem* dst, typename DeviceAcc<T>::type* bias_partial,
                               cudaStream_t stream) {
  const int pixel_blocks = pack_pixel_blocks(layout.batch, channels, int64_t(layout.h.size) * layout.w.size);
  const int64_t blocks_x = layout.batch * pixel_blocks, blocks_y = (channels + kPackChannels - 1) / kPackChannels;
  if (blocks_x == 0 || blocks_y == 0) return;  // empty batch: no values, and the bias sums have no partials
  if (blocks_x > 0x7fffffff || blocks_y > 65535)
    throw std::invalid_argument("fused_convt: channels-last pack grid too large (batch x pixel blocks > 2^31 - 1 "
                                "or channels > 65535 x 32)");
  pack_channels_last_kernel<T, Math><<<dim3(unsigned(blocks_x), unsigned(blocks_y)), kPackThreads, 0, stream>>>(
      src, factor, channels, groups, padded, pixel_blocks, layout, dst, bias_partial);
  check_launch("pack_channels_last_kernel");
}

}  // namespace fused_convt
