// Channels-last, phase-split copies of NCHW tensors in a tensor-core operand type: the operands of the
// grad_weight GEMM (grad_weight_gemm.cuh).
//
// grad_weight reduces over pixels, so its GEMM operands are [pixel][channel] tiles; staged with 16-byte
// cp.async they must have the channels of a pixel contiguous. The two operands come from NCHW tensors, or from
// channels_last (NHWC) ones, whose rows are staged as they are (kSrcNhwc):
//  * x -> X[n][ih][iw][group][channel padded], a plain transpose;
//  * g = grad_output * grad_factor * factor_scale -> G[phase][n][a][b][group][channel padded] (the factor of type
//    Math::Factor, float16 for TF32): the product is formed once,
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

constexpr int kPackAlign = 8;      // channel padding per group: 16 bytes of 16-bit values, 32 of float
constexpr int kPackValues = 4096;  // values of one transpose tile: 64 channels x 64 pixels, or narrower
constexpr int kPackVector = 4;     // adjacent channels a thread moves together (one 16-byte shared access)
constexpr int kPackThreads = 256;
constexpr int kPackWarps = kPackThreads / 32;

// A tile of kChannels channels (64, or 32 / 16 where the tensor has no more: a 64-channel tile was a quarter
// used by kb_v0's 16-channel g, whose pass ran at 0.8 TB/s, H100) x kPixels pixels. Reading, warp w takes
// channel vectors w % V8 + 8 i (V8 = min(vectors, 8)) and 32-pixel segments w / V8 + (8 / V8) j: 4 (vector,
// segment) pairs per warp in every shape, 16 loads per thread. Writing, a pass of the block covers
// kThreads / kVectors pixel rows.
template <int kChannels>
struct PackTile {
  static constexpr int kPixels = kPackValues / kChannels;
  static constexpr int kVectors = kChannels / kPackVector;               // channel vectors of a pixel row
  static constexpr int kWarpVectors = kVectors < kPackWarps ? kVectors : kPackWarps;  // V8
  static constexpr int kVectorsPerWarp = kVectors / kWarpVectors;
  static constexpr int kSegmentStride = kPackWarps / kWarpVectors;       // warps sharing a vector
  static constexpr int kSegmentsPerWarp = kPixels / 32 / kSegmentStride;
  static constexpr int kWritePixels = kPixels * kVectors / kPackThreads;  // pixel rows one thread writes
  // Row pitch in values. Reading, a quarter warp stores 16-byte vectors at pixels p..p+7 of one channel
  // vector: word offsets p x pitch = 4p or 20p (mod 32 banks), eight distinct 4-bank groups. Writing, a
  // quarter warp loads eight consecutive vectors of one pixel row, conflict-free; in the 16-channel tile the
  // eight span two rows (offsets 0-12 and 20-32 words), and the last meets the first's banks: two wavefronts.
  static constexpr int kPitch = kChannels + kPackVector;
  static_assert(kVectorsPerWarp * kSegmentsPerWarp == 4 && kPackThreads % kVectors == 0 && kPixels <= kPackThreads,
                "pack tile shape");
};

// The tile width for a tensor of `channels` channels.
inline int pack_tile_channels(int channels) { return channels <= 16 ? 16 : channels <= 32 ? 32 : 64; }

FCT_HD int64_t padded_channels(int64_t per_group) { return (per_group + kPackAlign - 1) / kPackAlign * kPackAlign; }

// Two adjacent values as one load of twice their size (kPairs).
template <typename T> struct PackPair;
template <> struct PackPair<__half> { using type = __half2; };
template <> struct PackPair<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct PackPair<float> { using type = float2; };

template <typename S, int W>
struct alignas(W * sizeof(S)) PackPiece {
  S v[W];
};

// Value j (and j + 1 with kPairs) of `to` from `from` at `at`, or zeros where the vector is not read (U: the
// source's type, or the factor's).
template <bool kPairs, typename U, int kCount>
__device__ __forceinline__ void load_segment_values(const U* from, int64_t at, bool read, int j, U (&to)[kCount]) {
  if constexpr (kPairs) {
    using Pair = typename PackPair<U>::type;
    const Pair two = read ? *reinterpret_cast<const Pair*>(from + at) : Pair();
    to[j] = two.x, to[j + 1] = two.y;
  } else {
    to[j] = read ? from[at] : U();
  }
}

// A thread's channel vector stored into a destination row in pieces of `width` values (a power of two, at most
// W), one store each. `width` divides the per-group channel count, so a piece (width-aligned in the tile) lies in
// one group and is width-aligned in the row (rows and groups are multiples of kPackAlign values; the base is
// 16-byte aligned, as cp.async needs). dst_channel[k] < 0: channel k is past the last channel, and so is its
// whole piece (width divides the channel count).
template <int W, typename Smem>
__device__ __forceinline__ void store_pieces(int width, Smem* row, const int (&dst_channel)[kPackVector],
                                             const Smem (&v)[kPackVector]) {
  if constexpr (W > 1) {
    if (width < W) return store_pieces<W / 2>(width, row, dst_channel, v);
  }
#pragma unroll
  for (int k = 0; k < kPackVector; k += W) {
    if (dst_channel[k] < 0) continue;
    PackPiece<Smem, W> piece;
#pragma unroll
    for (int i = 0; i < W; ++i) piece.v[i] = v[k + i];
    *reinterpret_cast<PackPiece<Smem, W>*>(row + dst_channel[k]) = piece;
  }
}

// grid = (batch x pixel blocks, channel tiles). A block walks one contiguous range of one image's pixels
// (rows x cols flattened: a channel's plane is contiguous, whatever the image width) in tiles of
// kChannels x kPixels (PackTile): warps read channel rows (lanes along pixels, coalesced; 16 loads per thread,
// 32 with the factor, all in flight before any is used) and put them in shared memory as pixel rows; then
// each thread writes vectors of kPackVector adjacent channels of a pixel row (8-byte stores of 16-bit values,
// 16-byte of float; a warp covers 32 vectors of consecutive pixel rows), in narrower pieces where the per-group
// channel count is not a multiple of kPackVector. The tile and the destination rows are double-buffered: one
// barrier per tile. (The previous 32-channel tile stored one 2-byte value per lane, 64 B per warp store, with
// two barriers per tile: 1.8 TB/s at kb_v1 bf16, H100.) Index math is kept out of the per-value path: versions
// that derived each destination per stored value were compute-bound at ~0.4-1 TB/s (H100). Walking image
// rows instead of the flattened plane also wasted most of a tile at each row end.
// 3 blocks per SM: at most 80 registers, which the loads in flight take without spilling (35-41 KB of shared
// memory per block).
// kPairs (even planes, sources aligned to two values): a lane loads two adjacent pixels at once, a warp 128 bytes
// of 16-bit values per load instead of 64. Nsight Compute on the kb_v1 bf16 g pass without it: 743 us for 1.67 GB,
// DRAM 67% busy, long-scoreboard waits 5.8 cycles per instruction, 36% occupancy (registers): latency-bound,
// the bytes in flight per register too few. Float with its float16 factor (TF32) likewise: kb_v1 1.107 -> 1.071 ms
// (H100).
// bias_partial[(n * pixel_blocks + pixel_block) * channels + c] = sum of the block's values of channel c.
// kSrcNhwc: src (grad_output) is NHWC, PyTorch's channels_last: each tile's pixel rows are first copied into the
// tile as they are (the write phase's thread mapping, one channel vector of a pixel row per thread), and the read
// phase then takes its values from the tile instead of from src, multiplies them by the factor (NCHW, read as
// before) and puts the products back: no transpose of a channels_last grad_output beforehand (it moved the whole
// tensor twice, ~0.7 ms of kb_v1's TF32 channels_last training step), and the same products summed in the same
// order, so bitwise the NCHW source's G and grad_bias.
template <typename T, typename Math, bool kFactor, int kChannels, bool kPairs, bool kSrcNhwc>
__global__ void __launch_bounds__(kPackThreads, 3)
pack_channels_last_kernel(const T* __restrict__ src, const typename Math::Factor* __restrict__ factor,
                          typename DeviceAcc<T>::type scale, int channels, int groups, int padded, int pixel_blocks,
                          PhaseSplitLayout layout, typename Math::Smem* __restrict__ dst,
                          typename DeviceAcc<T>::type* __restrict__ bias_partial) {
  follow_previous_grid();
  using Acc = typename DeviceAcc<T>::type;
  using Factor = typename Math::Factor;
  using Smem = typename Math::Smem;
  using Tile = PackTile<kChannels>;
  constexpr int kPixels = Tile::kPixels, kVectorsPerWarp = Tile::kVectorsPerWarp;
  constexpr int kSegmentsPerWarp = Tile::kSegmentsPerWarp;
  static_assert(sizeof(Acc) == 4, "the tile's padding assumes 4-byte values");
  __shared__ __align__(16) Acc tile[2][kPixels][Tile::kPitch];
  __shared__ int64_t dst_rows[2][kPixels];
  const int cols = layout.w.size;
  const int plane = layout.h.size * cols;  // < 2^31 (validated)
  const int pixel_block = int(blockIdx.x % pixel_blocks);
  const int64_t n = blockIdx.x / pixel_blocks;
  const int per_block = int((plane + int64_t(pixel_blocks) * kPixels - 1) / (int64_t(pixel_blocks) * kPixels) * kPixels);
  const int begin = pixel_block * per_block, end = min(plane, begin + per_block);
  const int c0 = blockIdx.y * kChannels;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int per_group = channels / groups;

  // Reading: the warp's channel vectors (its first + i x kPackWarps) and pixel segments (its first + j x
  // kSegmentStride), their channels after the first `read_channels` being past the last channel. A vector
  // wholly past it is not loaded (a warp-uniform predicate); the others' loads are clamped to channel
  // read_channels - 1 and to the last pixel, and the values out of range are zeroed after the loads.
  // (In the 64-channel tile every warp has its own vectors: warp < kPackWarps, which the compiler cannot know,
  // is folded in by hand.)
  const int warp_vector = Tile::kWarpVectors == kPackWarps ? warp : warp % Tile::kWarpVectors;
  const int first_segment = Tile::kWarpVectors == kPackWarps ? 0 : warp / Tile::kWarpVectors;
  const int first_read = c0 + warp_vector * kPackVector;
  const int read_channels = channels - first_read;
  const int64_t src_offset = (n * channels + first_read) * int64_t(plane);
  constexpr int kVectorStride = kPackWarps * kPackVector;  // channels between a warp's vectors
  // (kPairs: values j and j + 1, j even, are pixels 2 lane and 2 lane + 1 of a 64-pixel segment.)
  auto segment_pixel = [&](int j) {
    return kPairs ? (first_segment + j / 2 * Tile::kSegmentStride) * 64 + 2 * lane + j % 2
                  : (first_segment + j * Tile::kSegmentStride) * 32 + lane;
  };
  static_assert(!kPairs || kSegmentsPerWarp % 2 == 0, "pairs of segments");
  // Writing: this thread's channel vector (the same in every pixel row it writes), its channels' places in a
  // padded row (-1 past the last channel), and the widest piece that the group layout allows.
  const int write_vector = int(threadIdx.x) % Tile::kVectors;
  const int write_pixel = int(threadIdx.x) / Tile::kVectors;
  int dst_channel[kPackVector];
#pragma unroll
  for (int k = 0; k < kPackVector; ++k) {
    const int c = c0 + write_vector * kPackVector + k;
    dst_channel[k] = c < channels ? c / per_group * padded + c % per_group : -1;
  }
  const int piece_width = min(per_group & -per_group, kPackVector);  // largest power of two dividing per_group

  Acc bias_sum[kVectorsPerWarp][kPackVector];
#pragma unroll
  for (int i = 0; i < kVectorsPerWarp; ++i)
#pragma unroll
    for (int k = 0; k < kPackVector; ++k) bias_sum[i][k] = Acc(0);

  int buffer = 0;
  for (int p0 = begin; p0 < end; p0 += kPixels, buffer ^= 1) {
    if constexpr (kSrcNhwc) {
      // The tile's NHWC rows into the tile (this buffer was last read two tiles ago, as below), zeros past the
      // last pixel or channel.
      const int c = c0 + write_vector * kPackVector;
#pragma unroll
      for (int s = 0; s < Tile::kWritePixels; ++s) {
        const int q = write_pixel + s * (kPackThreads / Tile::kVectors);
        const bool pixel_ok = p0 + q < end;
        const T* row = src + (n * plane + min(p0 + q, end - 1)) * int64_t(channels);
        PackPiece<Acc, kPackVector> piece;
#pragma unroll
        for (int k = 0; k < kPackVector; ++k)
          piece.v[k] = pixel_ok && c + k < channels ? Acc(to_acc(row[min(c + k, channels - 1)])) : Acc(0);
        *reinterpret_cast<PackPiece<Acc, kPackVector>*>(&tile[buffer][q][write_vector * kPackVector]) = piece;
      }
    }
    // All loads are issued before any value is used: loads guarded per value compiled to each conversion
    // waiting for its load (one memory round trip after another).
    T raw[kVectorsPerWarp][kPackVector][kSegmentsPerWarp];
    Factor raw_factor[kVectorsPerWarp][kPackVector][kSegmentsPerWarp];
#pragma unroll
    for (int i = 0; i < kVectorsPerWarp; ++i) {
      const bool vector_read = i * kVectorStride < read_channels;
#pragma unroll
      for (int k = 0; k < kPackVector; ++k)
#pragma unroll
        for (int j = 0; j < kSegmentsPerWarp; j += kPairs ? 2 : 1) {
          // (kPairs: end is even, as are the plane and every pair's first pixel.)
          const int64_t at = src_offset + int64_t(min(i * kVectorStride + k, read_channels - 1)) * plane +
                             min(p0 + segment_pixel(j), end - (kPairs ? 2 : 1));
          if constexpr (!kSrcNhwc) load_segment_values<kPairs>(src, at, vector_read, j, raw[i][k]);
          if constexpr (kFactor) load_segment_values<kPairs>(factor, at, vector_read, j, raw_factor[i][k]);
        }
    }
    if constexpr (kSrcNhwc) __syncthreads();  // the staged rows are complete
    Acc v[kVectorsPerWarp][kPackVector][kSegmentsPerWarp];
#pragma unroll
    for (int i = 0; i < kVectorsPerWarp; ++i)
#pragma unroll
      for (int k = 0; k < kPackVector; ++k)
#pragma unroll
        for (int j = 0; j < kSegmentsPerWarp; ++j) {
          const bool ok = i * kVectorStride + k < read_channels && p0 + segment_pixel(j) < end;
          const Acc factor = kFactor ? Acc(to_acc(raw_factor[i][k][j])) * scale : Acc(1);
          Acc value;
          if constexpr (kSrcNhwc) value = tile[buffer][segment_pixel(j)][first_read - c0 + i * kVectorStride + k];
          else value = to_acc(raw[i][k][j]);
          v[i][k][j] = ok ? value * factor : Acc(0);
        }
    // Destination row of each pixel of the tile (PhaseSplitLayout::pixel_row in 32-bit steps), decoded once
    // per pixel by one thread while the loads are in flight: decoding it in the write loop (every lane, every
    // channel tile) was ~100 integer instructions per 32 stored values and made this kernel compute-bound.
    // This buffer (of tile and dst_rows) was last read two tiles ago, before every thread passed the previous
    // tile's barrier.
    if (dst && threadIdx.x < kPixels && p0 + int(threadIdx.x) < end) {
      const int o_h = (p0 + int(threadIdx.x)) / cols, o_w = p0 + int(threadIdx.x) - o_h * cols;
      const int rh = layout.h.phase_of(o_h), rw = layout.w.phase_of(o_w);
      const int extent_h = layout.h.extent(rh), extent_w = layout.w.extent(rw);
      dst_rows[buffer][threadIdx.x] =
          layout.batch * (int64_t(layout.h.before(rh)) * cols + int64_t(extent_h) * layout.w.before(rw)) +
          (n * extent_h + layout.h.index_in_phase(o_h, rh)) * extent_w + layout.w.index_in_phase(o_w, rw);
    }
#pragma unroll
    for (int i = 0; i < kVectorsPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < kSegmentsPerWarp; ++j) {
        PackPiece<Acc, kPackVector> column;
#pragma unroll
        for (int k = 0; k < kPackVector; ++k) {
          bias_sum[i][k] += v[i][k][j];
          column.v[k] = v[i][k][j];
        }
        if (dst) {
          *reinterpret_cast<PackPiece<Acc, kPackVector>*>(
              &tile[buffer][segment_pixel(j)][first_read - c0 + i * kVectorStride]) = column;
        }
      }
    if (dst == nullptr) continue;  // bias only (uniform over the block): the tile is not used
    __syncthreads();
#pragma unroll
    for (int s = 0; s < Tile::kWritePixels; ++s) {
      const int q = write_pixel + s * (kPackThreads / Tile::kVectors);
      if (p0 + q >= end) break;
      const PackPiece<Acc, kPackVector> column =
          *reinterpret_cast<const PackPiece<Acc, kPackVector>*>(&tile[buffer][q][write_vector * kPackVector]);
      Smem values[kPackVector];
#pragma unroll
      for (int k = 0; k < kPackVector; ++k) values[k] = Math::to_smem(from_acc<T>(column.v[k]));
      store_pieces<kPackVector>(piece_width, dst + dst_rows[buffer][q] * layout.row, dst_channel, values);
    }
  }

  if (bias_partial) {
    // Lanes hold pixels: a fixed butterfly over the lanes; where warps share a vector (narrow tiles), the
    // later segments' warps hand their sums to the first's through shared memory, added in warp order; then
    // lane 0 of the first writes the vector's channels.
    __shared__ Acc shared_sums[kPackWarps][kPackVector];
    Acc sums[kVectorsPerWarp][kPackVector];
#pragma unroll
    for (int i = 0; i < kVectorsPerWarp; ++i)
#pragma unroll
      for (int k = 0; k < kPackVector; ++k) sums[i][k] = warp_sum(bias_sum[i][k]);
    if constexpr (Tile::kSegmentStride > 1) {
      static_assert(kVectorsPerWarp == 1, "warps share a vector only in tiles of at most kPackWarps vectors");
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < kPackVector; ++k) shared_sums[warp][k] = sums[0][k];
      }
      __syncthreads();
      if (first_segment != 0) return;
#pragma unroll
      for (int k = 0; k < kPackVector; ++k)
        for (int w = warp + Tile::kWarpVectors; w < kPackWarps; w += Tile::kWarpVectors) sums[0][k] += shared_sums[w][k];
    }
#pragma unroll
    for (int i = 0; i < kVectorsPerWarp; ++i)
#pragma unroll
      for (int k = 0; k < kPackVector; ++k) {
        const int channel = i * kVectorStride + k;
        if (lane == 0 && channel < read_channels)
          bias_partial[(n * pixel_blocks + pixel_block) * channels + first_read + channel] = sums[i][k];
      }
  }
}

// Pixel blocks per image: enough blocks to fill the GPU at small batch, fixed by the problem alone (the bias
// partials' count and order depend on it).
inline int pack_pixel_blocks(int64_t batch, int channels, int64_t plane) {
  const int tile_channels = pack_tile_channels(channels);
  const int64_t tiles = batch * ((channels + tile_channels - 1) / tile_channels);
  if (tiles == 0) return 1;
  const int64_t tile_pixels = kPackValues / tile_channels;
  const int64_t max_blocks = std::max<int64_t>(1, (plane + tile_pixels - 1) / tile_pixels);
  return int(std::clamp<int64_t>((2048 + tiles - 1) / tiles, 1, max_blocks));
}

// factor (null for a plain copy) is scaled by `scale` (factor_scale of the forward's epilogue). src_nhwc: src is
// NHWC (channels_last), the factor NCHW.
template <typename T, typename Math>
void launch_pack_channels_last(const T* src, const typename Math::Factor* factor, float scale, int channels,
                               int groups, int padded, const PhaseSplitLayout& layout, typename Math::Smem* dst,
                               typename DeviceAcc<T>::type* bias_partial, cudaStream_t stream,
                               bool src_nhwc = false) {
  const int tile_channels = pack_tile_channels(channels);
  const int pixel_blocks = pack_pixel_blocks(layout.batch, channels, int64_t(layout.h.size) * layout.w.size);
  const int64_t blocks_x = layout.batch * pixel_blocks, blocks_y = (channels + tile_channels - 1) / tile_channels;
  if (blocks_x == 0 || blocks_y == 0) return;  // empty batch: no values, and the bias sums have no partials
  if (blocks_x > 0x7fffffff || blocks_y > 65535)
    throw std::invalid_argument("fused_convt: channels-last pack grid too large (batch x pixel blocks > 2^31 - 1 "
                                "or channels > 65535 x 64)");
  // Pairs where every pair is whole and aligned: an even plane, sources aligned to two values.
  const bool pairs = (int64_t(layout.h.size) * layout.w.size) % 2 == 0 &&
                     (src_nhwc || reinterpret_cast<uintptr_t>(src) % (2 * sizeof(T)) == 0) &&
                     reinterpret_cast<uintptr_t>(factor) % (2 * sizeof(typename Math::Factor)) == 0;
  auto launch = [&](auto with_factor, auto tile) {
    constexpr bool kFactor = decltype(with_factor)::value;
    constexpr int kChannels = decltype(tile)::value;
    auto kernel = pairs ? pack_channels_last_kernel<T, Math, kFactor, kChannels, true, false>
                        : pack_channels_last_kernel<T, Math, kFactor, kChannels, false, false>;
    if (src_nhwc)
      kernel = pairs ? pack_channels_last_kernel<T, Math, kFactor, kChannels, true, true>
                     : pack_channels_last_kernel<T, Math, kFactor, kChannels, false, true>;
    launch_kernel(kernel, {dim3(unsigned(blocks_x), unsigned(blocks_y)), dim3(kPackThreads), 0, stream},
                  "pack_channels_last_kernel", src, factor, typename DeviceAcc<T>::type(scale), channels, groups, padded,
                  pixel_blocks, layout, dst, bias_partial);
  };
  auto with_tile = [&](auto with_factor) {
    if (tile_channels == 16) return launch(with_factor, std::integral_constant<int, 16>{});
    if (tile_channels == 32) return launch(with_factor, std::integral_constant<int, 32>{});
    launch(with_factor, std::integral_constant<int, 64>{});
  };
  if (factor) {
    with_tile(std::true_type{});
  } else {
    with_tile(std::false_type{});
  }
}

}  // namespace fused_convt
