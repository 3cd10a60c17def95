// The direct tiled gather kernel, shared by the forward pass and grad_input.
//
// Both are "gather" convolutions: every destination element is a sum over source channels and kernel taps
// of source(tap-mapped position) * weight, and the TapMap of each axis says which source position a tap
// reads (forward: i = (o + p - k*d) / s when divisible; grad_input: o = i*s - p + k*d).
//
// Work split: a block owns a TILE_H x TILE_W tile of destination pixels and DST_C destination channels of
// one group of one image; each thread owns one pixel and DST_C fp32 (fp64 for double) accumulators.
// The block walks the group's source channels in chunks: it stages the zero-padded source patch the tile
// reads and the weight slice [chunk][tap][DST_C] in shared memory, then every thread gathers its taps from
// shared memory. Per-row and per-column tap lists are built once per block, so the inner loop tests
// neither divisibility nor bounds. Each destination is written exactly once, no atomics.
// This is the general kernel: any stride, padding, dilation, output_padding, groups and dtype.
#pragma once

#include <algorithm>

#include "cuda_common.cuh"
#include "fused_convt/tap_map.h"

namespace fused_convt {

enum class GatherDirection { Forward, GradInput };

constexpr int kGatherTileH = 8;
constexpr int kGatherTileW = 16;
constexpr int kGatherThreads = kGatherTileH * kGatherTileW;

struct GatherProblem {
  int64_t batch;
  int dst_channels, dst_h, dst_w;
  int dst_channels_last;  // dst is NHWC (a channels_last forward output); else NCHW. dst_factor: NCHW always
  int src_channels, src_h, src_w;
  int groups, dst_per_group, src_per_group;
  int kernel_h, kernel_w;
  TapMap map_h, map_w;
  // Weight offset of (group, local source channel, local destination channel, tap):
  // group * weight_group_stride + src * weight_src_stride + dst * weight_dst_stride + tap.
  int64_t weight_group_stride;
  int weight_src_stride, weight_dst_stride;
  // Tiling, chosen by the launcher.
  int src_chunk, patch_h, patch_w, tiles_h, tiles_w, channel_tiles;
};

// Upper bound of the source rows one tile can touch along an axis (floor division adds at most one).
inline int patch_extent(const TapMap& map, int tile, int taps) {
  const int span = (tile - 1) * map.dst_scale + (taps - 1) * std::abs(map.tap_scale);
  return span / map.divisor + 2;
}

template <typename Acc>
size_t gather_smem_bytes(const GatherProblem& pr, int src_chunk, int dst_c) {
  const size_t taps = size_t(pr.kernel_h) * pr.kernel_w;
  const size_t values = size_t(src_chunk) * pr.patch_h * pr.patch_w + size_t(src_chunk) * taps * dst_c;
  const size_t tap_lists = size_t(kGatherTileH) * pr.kernel_h + size_t(kGatherTileW) * pr.kernel_w;
  return values * sizeof(Acc) + tap_lists * sizeof(int2) + (kGatherTileH + kGatherTileW) * sizeof(int);
}

// Builds the (tap, patch-local source) list of each destination coordinate of the tile along one axis.
__device__ __forceinline__ void build_tap_list(const TapMap& map, int dst, int taps, int src_extent,
                                               int patch_first, int2* list, int* count) {
  int n = 0;
  for (int k = 0; k < taps; ++k) {
    int src;
    if (map.source(dst, k, &src) && src >= 0 && src < src_extent) list[n++] = make_int2(k, src - patch_first);
  }
  *count = n;
}

// F: the saved factor's type (FactorType). epi: the forward's epilogue, which the forward applies and grad_input
// scales its factor by (factor_scale).
template <typename T, typename F, GatherDirection Dir, int DST_C>
__global__ void __launch_bounds__(kGatherThreads)
gather_conv_kernel(GatherProblem pr, Epilogue epi, const T* __restrict__ src, const F* __restrict__ src_factor,
                   const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ dst,
                   F* __restrict__ dst_factor) {
  follow_previous_grid();
  using Acc = typename DeviceAcc<T>::type;
  const int taps = pr.kernel_h * pr.kernel_w;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* patch = reinterpret_cast<Acc*>(smem_raw);
  Acc* weight_tile = patch + pr.src_chunk * pr.patch_h * pr.patch_w;
  int2* row_list = reinterpret_cast<int2*>(weight_tile + pr.src_chunk * taps * DST_C);
  int2* col_list = row_list + kGatherTileH * pr.kernel_h;
  int* row_count = reinterpret_cast<int*>(col_list + kGatherTileW * pr.kernel_w);
  int* col_count = row_count + kGatherTileH;

  int64_t block = blockIdx.x;
  const int tile_w = int(block % pr.tiles_w); block /= pr.tiles_w;
  const int tile_h = int(block % pr.tiles_h); block /= pr.tiles_h;
  const int channel_tile = int(block % (int64_t(pr.groups) * pr.channel_tiles));
  const int64_t n = block / (int64_t(pr.groups) * pr.channel_tiles);
  const int group = channel_tile / pr.channel_tiles;
  const int dst_local0 = (channel_tile % pr.channel_tiles) * DST_C;
  const int dst_h0 = tile_h * kGatherTileH, dst_w0 = tile_w * kGatherTileW;
  const int first_h = pr.map_h.source_first(dst_h0, pr.kernel_h);
  const int first_w = pr.map_w.source_first(dst_w0, pr.kernel_w);
  const int rows = pr.map_h.source_last(dst_h0 + kGatherTileH - 1, pr.kernel_h) - first_h + 1;
  const int cols = pr.map_w.source_last(dst_w0 + kGatherTileW - 1, pr.kernel_w) - first_w + 1;

  const int tid = threadIdx.x;
  if (tid < kGatherTileH) {
    build_tap_list(pr.map_h, dst_h0 + tid, pr.kernel_h, pr.src_h, first_h, row_list + tid * pr.kernel_h,
                   row_count + tid);
  } else if (tid < kGatherTileH + kGatherTileW) {
    const int c = tid - kGatherTileH;
    build_tap_list(pr.map_w, dst_w0 + c, pr.kernel_w, pr.src_w, first_w, col_list + c * pr.kernel_w,
                   col_count + c);
  }

  const int ty = tid / kGatherTileW, tx = tid % kGatherTileW;
  const int out_y = dst_h0 + ty, out_x = dst_w0 + tx;
  Acc acc[DST_C];
#pragma unroll
  for (int c = 0; c < DST_C; ++c) acc[c] = Acc(0);

  const int64_t src_plane = int64_t(pr.src_h) * pr.src_w;
  const T* src_group = src + (n * pr.src_channels + int64_t(group) * pr.src_per_group) * src_plane;
  const F* src_factor_group =
      src_factor ? src_factor + (n * pr.src_channels + int64_t(group) * pr.src_per_group) * src_plane : nullptr;
  const Acc scale = Acc(factor_scale(epi));
  const T* weight_group = weight + group * pr.weight_group_stride;
  const int patch_values = rows * cols;

  for (int c0 = 0; c0 < pr.src_per_group; c0 += pr.src_chunk) {
    const int chunk = min(pr.src_chunk, pr.src_per_group - c0);
    __syncthreads();  // the previous chunk's reads are done (and the tap lists are visible at c0 == 0)
    for (int i = tid; i < chunk * patch_values; i += kGatherThreads) {
      const int c = i / patch_values, r = (i % patch_values) / cols, q = i % cols;
      const int y = first_h + r, x = first_w + q;
      Acc v = Acc(0);
      if (y >= 0 && y < pr.src_h && x >= 0 && x < pr.src_w) {
        const int64_t offset = (c0 + c) * src_plane + int64_t(y) * pr.src_w + x;
        v = to_acc(src_group[offset]);
        if (src_factor_group) v *= Acc(to_acc(src_factor_group[offset])) * scale;
      }
      patch[(c * pr.patch_h + r) * pr.patch_w + q] = v;
    }
    for (int i = tid; i < chunk * taps * DST_C; i += kGatherThreads) {
      const int dc = i % DST_C, tap = (i / DST_C) % taps, c = i / (DST_C * taps);
      Acc v = Acc(0);
      if (dst_local0 + dc < pr.dst_per_group) {
        v = to_acc(weight_group[int64_t(c0 + c) * pr.weight_src_stride +
                                int64_t(dst_local0 + dc) * pr.weight_dst_stride + tap]);
      }
      weight_tile[i] = v;
    }
    __syncthreads();
    if (out_y < pr.dst_h && out_x < pr.dst_w) {
      for (int c = 0; c < chunk; ++c) {
        const Acc* patch_c = patch + c * pr.patch_h * pr.patch_w;
        const Acc* weight_c = weight_tile + c * taps * DST_C;
        for (int r = 0; r < row_count[ty]; ++r) {
          const int2 row = row_list[ty * pr.kernel_h + r];
          for (int q = 0; q < col_count[tx]; ++q) {
            const int2 col = col_list[tx * pr.kernel_w + q];
            const Acc v = patch_c[row.y * pr.patch_w + col.y];
            const Acc* w = weight_c + (row.x * pr.kernel_w + col.x) * DST_C;
#pragma unroll
            for (int dc = 0; dc < DST_C; dc += 4) {
              Acc w4[4];
              load4(w + dc, w4);  // every thread reads the same taps: 4-wide broadcasts, not 16 scalar loads
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[dc + e] = fma(v, w4[e], acc[dc + e]);
            }
          }
        }
      }
    }
  }

  if (out_y >= pr.dst_h || out_x >= pr.dst_w) return;
  const int64_t dst_plane = int64_t(pr.dst_h) * pr.dst_w;
  const EpilogueConstants<Acc> epilogue(epi);
#pragma unroll
  for (int dc = 0; dc < DST_C; ++dc) {
    if (dst_local0 + dc >= pr.dst_per_group) break;
    const int channel = group * pr.dst_per_group + dst_local0 + dc;
    const int64_t pixel = int64_t(out_y) * pr.dst_w + out_x;
    const int64_t factor_index = (n * pr.dst_channels + channel) * dst_plane + pixel;
    const int64_t index = pr.dst_channels_last ? (n * dst_plane + pixel) * pr.dst_channels + channel : factor_index;
    if constexpr (Dir == GatherDirection::Forward) {
      const Acc pre = acc[dc] + (bias ? to_acc(bias[channel]) : Acc(0));
      if (dst_factor) {
        const EpilogueOutputs<Acc> both = apply_epilogue_with_factor(epilogue, pre);
        if (dst) dst[index] = from_acc<T>(both.value);
        dst_factor[factor_index] = from_acc<F>(both.factor);
      } else if (dst) {
        dst[index] = from_acc<T>(apply_epilogue(epilogue, pre));
      }
    } else {
      dst[index] = from_acc<T>(acc[dc]);
    }
  }
}

// Chooses the channel tile and the source chunk, sizes shared memory and launches on the stream.
template <typename T, GatherDirection Dir, typename F>
void launch_gather_conv(GatherProblem pr, const Epilogue& epi, const T* src, const F* src_factor,
                        const T* weight, const T* bias, T* dst, F* dst_factor, cudaStream_t stream) {
  using Acc = typename DeviceAcc<T>::type;
  pr.patch_h = patch_extent(pr.map_h, kGatherTileH, pr.kernel_h);
  // A row length that is a multiple of 4 keeps the weight tile behind the patch 16-byte aligned (4-wide
  // loads) and the int2 tap lists behind it 8-byte aligned.
  pr.patch_w = (patch_extent(pr.map_w, kGatherTileW, pr.kernel_w) + 3) / 4 * 4;
  pr.tiles_h = ceil_div_int(pr.dst_h, kGatherTileH);
  pr.tiles_w = ceil_div_int(pr.dst_w, kGatherTileW);

  auto launch = [&](auto dst_c_constant) {
    constexpr int DST_C = decltype(dst_c_constant)::value;
    pr.channel_tiles = ceil_div_int(pr.dst_per_group, DST_C);
    const size_t smem_limit = max_dynamic_smem_bytes();
    pr.src_chunk = std::min(8, pr.src_per_group);
    while (pr.src_chunk > 1 && gather_smem_bytes<Acc>(pr, pr.src_chunk, DST_C) > 48 * 1024) pr.src_chunk /= 2;
    const size_t smem = gather_smem_bytes<Acc>(pr, pr.src_chunk, DST_C);
    if (smem > smem_limit) {
      throw std::invalid_argument("fused_convt: kernel " + std::to_string(pr.kernel_h) + "x" +
                                  std::to_string(pr.kernel_w) + " with this stride/dilation needs " +
                                  std::to_string(smem) + " bytes of shared memory per block; the device allows " +
                                  std::to_string(smem_limit));
    }
    const int64_t blocks = pr.batch * pr.groups * pr.channel_tiles * int64_t(pr.tiles_h) * pr.tiles_w;
    if (blocks > int64_t(0x7fffffff))
      throw std::invalid_argument("fused_convt: problem needs more than 2^31-1 thread blocks");
    auto kernel = gather_conv_kernel<T, F, Dir, DST_C>;
    if (smem > 48 * 1024) {
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), int(smem), "cudaFuncSetAttribute(gather_conv_kernel)");
    }
    launch_kernel(kernel, {dim3(unsigned(blocks)), dim3(kGatherThreads), smem, stream}, "gather_conv_kernel", pr, epi,
                  src, src_factor, weight, bias, dst, dst_factor);
  };
  // Narrow destination groups (depthwise-like) get a narrow channel tile so lanes are not wasted.
  if (pr.dst_per_group <= 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 16>{});
  }
}

}  // namespace fused_convt
