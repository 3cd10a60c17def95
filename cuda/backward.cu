// CUDA backward: grad_input through the tensor-core implicit-GEMM kernel (each block sums the stride phases
// of grad_output, see grad_input_tc_problem) or, where that does not apply, the direct gather kernel;
// grad_weight and grad_bias through deterministic split reductions.
//
// grad_weight (tensor-core dtypes) is a GEMM over pixels whose operands must be channels-last rows for 16-byte
// asynchronous copies: one pass forms g = grad_output * grad_factor, sums grad_bias and writes g phase-split,
// channels-last, in the operand type into the workspace (channels_last_pack.cuh), x gets a channels-last copy,
// and grad_weight_gemm.cuh multiplies them. That pass runs first, and grad_input copies its tiles from the g
// it wrote (as the forward copies its input's channels-last copy); without grad_weight there is no copy and
// grad_input forms g in registers as it loads its tiles. On sm_90a, shapes of 2 x 2 taps per phase take wgmma
// kernels for both (grad_weight_wgmma.cuh, grad_input_wgmma.cuh; TF32 and 16-bit), reading the same g copy.
// float64 keeps a direct FFMA kernel for both (below).
//
// float64: grad_weight[ic, oc_local, kh, kw] = sum over (n, ih, iw) of x[n, ic, ih, iw] * g[n, oc, oh, ow]
// with oh = ih*s - p + kh*d. Grouped by output phase (shared/DESIGN.md, as in the forward): the phase pixel
// (a, b) of output phase (r_h, r_w) meets, through each tap (kh, kw) of that phase, the input pixel
// (a + off_h, b + off_w). One block owns one phase, one of its taps, a 64 x 64 tile of (ic, oc), one group
// and one contiguous slice ("split") of the phase's pixels; per step it stages 32 phase pixels of g and the
// 32 matching pixels of x and multiplies them in FFMA. grad_bias rides along: the blocks of the first tap
// and ic tile also sum the g values they stage.
// The split counts depend only on the problem, each split writes its own partial sums, and a second kernel
// adds the splits (and phases, for the bias) in index order: bitwise reproducible, with no atomics.
#include <algorithm>

#include "grad_weight_gemm.cuh"
#include "grad_input_wgmma.cuh"
#include "grad_weight_wgmma.cuh"
#include "implicit_gemm_conv.cuh"
#include "problems.cuh"
#include "side_stream.h"
#include "weight_partials.h"

namespace fused_convt {

constexpr int kWeightTile = 64;      // ic and oc extent of a grad_weight block
constexpr int kWeightMicro = 4;      // FFMA engine: each thread kWeightMicro x kWeightMicro results
constexpr int kWeightTileStride = kWeightTile + 4;  // keeps every 4-wide row read 16-byte aligned
constexpr int kPixelStep = 32;       // pixels staged per step: one per lane
constexpr int kWeightThreads = 256;  // 8 warps
constexpr int kChannelsPerThread = kWeightTile / (kWeightThreads / 32);  // staged channels per lane and step
constexpr int64_t kTargetBlocks = 1024;  // fixed (device independent) so results do not depend on the GPU

struct BackwardPlan {
  int phases;              // stride_h * stride_w output phases (also those without taps: the bias needs them)
  int tap_groups;          // blocks per phase along its taps (Engine::kTaps each)
  int ic_tiles, oc_tiles;
  int64_t max_phase_pixels;  // N * extent_h * extent_w of the largest phase
  int64_t splits, pixels_per_split;
};

// float64 (one tap per block). The split count depends only on the problem (not on which gradients are
// requested), so grad_bias is bitwise the same with or without grad_weight.
inline BackwardPlan plan_backward(const ConvTransposeParams& p) {
  BackwardPlan plan{};
  plan.phases = int(p.stride_h * p.stride_w);
  int max_taps = 0, max_extent_h = 0, max_extent_w = 0;
  for (int64_t rh = 0; rh < p.stride_h; ++rh)
    for (int64_t rw = 0; rw < p.stride_w; ++rw)
      max_taps = std::max(max_taps, phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh) *
                                        phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw));
  for (int64_t r = 0; r < p.stride_h; ++r)
    max_extent_h = std::max(max_extent_h, phase_span(p.out_h(), p.stride_h, p.pad_h, r).extent);
  for (int64_t r = 0; r < p.stride_w; ++r)
    max_extent_w = std::max(max_extent_w, phase_span(p.out_w(), p.stride_w, p.pad_w, r).extent);
  plan.tap_groups = std::max(1, max_taps);
  plan.ic_tiles = ceil_div_int(p.in_channels_per_group(), kWeightTile);
  plan.oc_tiles = ceil_div_int(p.out_channels_per_group(), kWeightTile);
  plan.max_phase_pixels = p.batch * max_extent_h * max_extent_w;
  const int64_t tiles = int64_t(plan.phases) * plan.tap_groups * plan.ic_tiles * plan.oc_tiles * p.groups;
  const int64_t steps = std::max<int64_t>(1, (plan.max_phase_pixels + kPixelStep - 1) / kPixelStep);
  const int64_t splits = std::clamp<int64_t>(kTargetBlocks / tiles, 1, std::min<int64_t>(steps, 256));
  plan.pixels_per_split = (steps + splits - 1) / splits * kPixelStep;
  plan.splits = std::max<int64_t>(1, (plan.max_phase_pixels + plan.pixels_per_split - 1) / plan.pixels_per_split);
  return plan;
}

// g = grad_output x grad_factor x factor_scale (float64's direct grad_weight kernel).
template <typename T>
struct GradLoader {
  const T* grad_output;
  const T* grad_factor;
  T scale;
  __device__ __forceinline__ typename DeviceAcc<T>::type operator()(int64_t index) const {
    auto grad = to_acc(grad_output[index]);
    return grad_factor ? grad * (to_acc(grad_factor[index]) * scale) : grad;
  }
};

// The multiply of the float64 grad_weight block: it holds the shared-memory tiles (Storage: x per tap, g),
// receives every staged (channel, pixel) value, multiplies a staged step into its accumulators, and reports
// each accumulator with its (tap, ic, oc) position in the block. One tap per block, tiles [pixel][channel],
// 4 x 4 results per thread read as two 4-wide shared loads per 16 FMAs.
template <typename T>
struct FfmaWeightEngine {
  using Acc = typename DeviceAcc<T>::type;
  static constexpr int kTaps = 1;
  static constexpr int kMinBlocks = 1;
  struct Storage {
    __align__(16) Acc x[kTaps][kPixelStep][kWeightTileStride];
    __align__(16) Acc g[kPixelStep][kWeightTileStride];
  };
  Acc acc[kWeightMicro][kWeightMicro];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWeightMicro; ++i)
#pragma unroll
      for (int j = 0; j < kWeightMicro; ++j) acc[i][j] = Acc(0);
  }
  __device__ __forceinline__ static void stage_x(Storage& s, int tap, int c, int q, Acc v) { s.x[tap][q][c] = v; }
  __device__ __forceinline__ static void stage_g(Storage& s, int c, int q, Acc v) { s.g[q][c] = v; }
  __device__ __forceinline__ void multiply(const Storage& s, int tid, int /*taps*/) {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll 4
    for (int q = 0; q < kPixelStep; ++q) {
      Acc a[kWeightMicro], b[kWeightMicro];
      load4(&s.x[0][q][ty * kWeightMicro], a);
      load4(&s.g[q][tx * kWeightMicro], b);
#pragma unroll
      for (int i = 0; i < kWeightMicro; ++i)
#pragma unroll
        for (int j = 0; j < kWeightMicro; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }
  template <typename Fn>
  __device__ __forceinline__ void for_each_result(int tid, Fn&& fn) const {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll
    for (int i = 0; i < kWeightMicro; ++i)
#pragma unroll
      for (int j = 0; j < kWeightMicro; ++j) fn(0, ty * kWeightMicro + i, tx * kWeightMicro + j, acc[i][j]);
  }
};

// Grid as WeightBlock (grad_weight_gemm.cuh) says. weight_partial == nullptr: bias only.
template <typename T, typename Engine>
__global__ void __launch_bounds__(kWeightThreads, Engine::kMinBlocks)
grad_weight_bias_partial_kernel(ConvTransposeParams p, BackwardPlan plan, const T* __restrict__ x, GradLoader<T> g,
                                typename DeviceAcc<T>::type* __restrict__ weight_partial,
                                typename DeviceAcc<T>::type* __restrict__ bias_partial) {
  follow_previous_grid();
  using Acc = typename DeviceAcc<T>::type;
  constexpr int kTaps = Engine::kTaps;
  __shared__ typename Engine::Storage tiles;
  __shared__ int tap_kh[kTaps], tap_kw[kTaps], tap_off_h[kTaps], tap_off_w[kTaps];

  const WeightBlock block(plan.phases, plan.tap_groups, plan.ic_tiles, int(p.stride_w));
  const int phase = block.phase, rh = block.rh, rw = block.rw, tap_group = block.tap_group, group = block.group;
  const int64_t split = block.split;
  const int ic_tile = block.ic_tile, ic0 = block.ic_tile * kWeightTile, oc0 = block.oc_tile * kWeightTile;

  const int taps_h = phase_taps(p.kernel_h, p.stride_h, p.dil_h, rh);
  const int taps_w = phase_taps(p.kernel_w, p.stride_w, p.dil_w, rw);
  const int taps = weight_partial ? max(0, min(kTaps, taps_h * taps_w - tap_group * kTaps)) : 0;
  const bool sums_bias = bias_partial && tap_group == 0 && ic_tile == 0;
  if (taps == 0 && !sums_bias) return;  // uniform over the block

  const PhaseSpan span_h = phase_span(p.out_h(), p.stride_h, p.pad_h, rh);
  const PhaseSpan span_w = phase_span(p.out_w(), p.stride_w, p.pad_w, rw);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid < kTaps) {
    const int index = tap_group * kTaps + tid;
    const int th = index / max(taps_w, 1), tw = index % max(taps_w, 1);
    const int kh = tid < taps ? phase_tap(p.kernel_h, p.stride_h, p.dil_h, rh, th) : 0;
    const int kw = tid < taps ? phase_tap(p.kernel_w, p.stride_w, p.dil_w, rw, tw) : 0;
    tap_kh[tid] = kh;
    tap_kw[tid] = kw;
    tap_off_h[tid] = phase_tap_offset(span_h, kh, p.stride_h, p.dil_h, rh);
    tap_off_w[tid] = phase_tap_offset(span_w, kw, p.stride_w, p.dil_w, rw);
  }
  __syncthreads();

  const int in_per_group = int(p.in_channels / p.groups), out_per_group = int(p.out_channels / p.groups);
  const int in_h = int(p.in_h), in_w = int(p.in_w), out_w = int(p.out_w());
  const int in_plane = in_h * in_w;
  const int64_t out_plane = p.out_h() * p.out_w();
  const int phase_plane = span_h.extent * span_w.extent;
  const int64_t phase_pixels = p.batch * phase_plane;
  const int64_t pixel_begin = split * plan.pixels_per_split;
  const int64_t pixel_end = min(phase_pixels, pixel_begin + plan.pixels_per_split);

  Engine engine;
  engine.clear();
  Acc bias_sum[kChannelsPerThread];
#pragma unroll
  for (int i = 0; i < kChannelsPerThread; ++i) bias_sum[i] = Acc(0);

  // Register staging of one step: lane = phase pixel (consecutive b, so x loads are coalesced), the warp's
  // channels c = warp + 8 i. Loaded before the previous step's multiply so that it hides the latency.
  // The loop is latency-bound (few warps per SM, a barrier per step), so it is kept lean: channel and tap
  // limits are warp-uniform branches, and per step only the pixel part of the offsets changes.
  constexpr int kWarps = kWeightThreads / 32;
  // Channels c = warp + 8 i inside the group: ceil((per_group - tile start - warp) / 8) of them, at most 8.
  auto channels_here = [&](int per_group, int c0) {
    return min(kChannelsPerThread, max(0, per_group - c0 - warp + kWarps - 1) / kWarps);
  };
  const int x_channels = weight_partial ? channels_here(in_per_group, ic0) : 0;
  const int g_channels = channels_here(out_per_group, oc0);
  const int64_t x_channel_step = int64_t(kWarps) * in_plane, g_channel_step = kWarps * out_plane;
  const int64_t x_first = int64_t(group * in_per_group + ic0 + warp) * in_plane;
  const int64_t g_first = int64_t(group * out_per_group + oc0 + warp) * out_plane;
  const int extent_w = max(span_w.extent, 1);
  Acc x_next[kTaps][kChannelsPerThread], g_next[kChannelsPerThread];
  auto load_step = [&](int64_t base) {
    const int64_t pixel = base + lane;
    const bool pixel_ok = pixel < pixel_end;
    const int64_t n = pixel_ok ? pixel / phase_plane : 0;
    const int ab = pixel_ok ? int(pixel - n * phase_plane) : 0;
    const int a = ab / extent_w, b = ab - (ab / extent_w) * extent_w;
    const int64_t g_pixel = n * p.out_channels * out_plane + g_first +
                            int64_t(span_h.first + a * int(p.stride_h)) * out_w + span_w.first + b * int(p.stride_w);
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) {
      g_next[i] = Acc(0);
      if (i < g_channels && pixel_ok) g_next[i] = g(g_pixel + i * g_channel_step);
    }
    const int64_t x_image = n * p.in_channels * in_plane + x_first;
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      if (t >= taps) break;
      const int ih = a + tap_off_h[t], iw = b + tap_off_w[t];
      const bool ok = pixel_ok && ih >= 0 && ih < in_h && iw >= 0 && iw < in_w;
      const T* x_pixel = x + x_image + (ok ? ih * in_w + iw : 0);
#pragma unroll
      for (int i = 0; i < kChannelsPerThread; ++i) {
        x_next[t][i] = Acc(0);
        if (i < x_channels && ok) x_next[t][i] = to_acc(x_pixel[i * x_channel_step]);
      }
    }
  };

  if (pixel_begin < pixel_end) load_step(pixel_begin);
  for (int64_t base = pixel_begin; base < pixel_end; base += kPixelStep) {
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) {
      const int c = warp + i * (kWeightThreads / 32);
      bias_sum[i] += g_next[i];
      Engine::stage_g(tiles, c, lane, g_next[i]);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        if (t >= taps) break;
        Engine::stage_x(tiles, t, c, lane, x_next[t][i]);
      }
    }
    __syncthreads();
    if (base + kPixelStep < pixel_end) load_step(base + kPixelStep);
    if (taps > 0) engine.multiply(tiles, tid, taps);
    __syncthreads();
  }

  if (sums_bias) {
    // Lanes hold one pixel each: a fixed butterfly over the lanes, then lane 0 writes the warp's channels.
#pragma unroll
    for (int i = 0; i < kChannelsPerThread; ++i) {
      const Acc v = warp_sum(bias_sum[i]);
      const int oc_local = oc0 + warp + i * (kWeightThreads / 32);
      if (lane == 0 && oc_local < out_per_group)
        bias_partial[(split * plan.phases + phase) * p.out_channels + group * out_per_group + oc_local] = v;
    }
  }
  if (taps > 0) {
    const int64_t kernel_taps = p.kernel_h * p.kernel_w;
    const int64_t weight_numel = p.in_channels * out_per_group * kernel_taps;
    engine.for_each_result(tid, [&](int t, int ic_in_tile, int oc_in_tile, Acc value) {
      const int ic_local = ic0 + ic_in_tile, oc_local = oc0 + oc_in_tile;
      if (t < taps && ic_local < in_per_group && oc_local < out_per_group) {
        const int64_t ic = int64_t(group) * in_per_group + ic_local;
        const int64_t tap = int64_t(tap_kh[t]) * p.kernel_w + tap_kw[t];
        weight_partial[split * weight_numel + (ic * out_per_group + oc_local) * kernel_taps + tap] = value;
      }
    });
  }
}

// result[i] = the sum over s of partial[s * count + i], in a fixed order (bitwise reproducible): a block
// takes kResults consecutive results (coalesced loads along i) and kSumThreads / kResults lanes per result;
// lane k adds splits k, k + lanes, ... in order, then the lanes' sums are added by a fixed pairwise tree. With
// one thread per result walking every split, few results (the bias: one per channel, over thousands of
// partials) took ~60 us per call at kb_v0 (H100), a single chain of dependent adds; with 8 lanes each, the 16
// bias sums of kb_v0 (2048 partials) were still one block of 30 us (Nsight Compute): few results get a block
// each. (kResults is a template parameter: with a run-time lane count the split loop's loads no longer
// overlapped, and kb_v1's weight sums went from 25 to 38 us.)
constexpr int kSumThreads = 256;
// One sum over split partials: the sum over s < splits of partial[s * count + i], i < count, into
// result[result_index(i)]: where taps > 1 the partials are a weight's values laid out tap-major, as the grad_weight
// GEMMs write them, and the results go to PyTorch's weight layout (weight_partials.h; inner: the input channels for
// grad_weight_wgmma_kernel's layout, 0 for grad_weight_gemm_kernel's).
template <typename T>
struct SplitSum {
  const typename DeviceAcc<T>::type* partial;
  int64_t splits, count;
  T* result;
  int64_t taps = 1, inner = 0;

  FCT_HD int64_t result_index(int64_t i) const { return tap_major_weight_index(i, count, taps, inner); }
};

// Blocks block, block + blocks, ... of `blocks` take rounds of kResults results each.
template <typename T, int kResults>
__device__ __forceinline__ void sum_splits(const SplitSum<T>& sum, int64_t block, int64_t blocks,
                                           typename DeviceAcc<T>::type* lane_sums) {
  using Acc = typename DeviceAcc<T>::type;
  constexpr int kLanes = kSumThreads / kResults;  // lane_sums: [lane][result]
  const int r = int(threadIdx.x) % kResults, k = int(threadIdx.x) / kResults;
  for (int64_t first = block * kResults; first < sum.count; first += blocks * kResults) {
    const int64_t i = first + r;
    Acc acc = Acc(0);
    if (i < sum.count) {
#pragma unroll 4
      for (int64_t s = k; s < sum.splits; s += kLanes) acc += sum.partial[s * sum.count + i];
    }
    lane_sums[threadIdx.x] = acc;
    __syncthreads();
#pragma unroll
    for (int half = kLanes / 2; half > 0; half /= 2) {
      if (k < half) lane_sums[threadIdx.x] += lane_sums[threadIdx.x + half * kResults];
      __syncthreads();
    }
    if (k == 0 && i < sum.count) sum.result[sum.result_index(i)] = from_acc<T>(lane_sums[r]);
    __syncthreads();  // before the next round's lane sums overwrite these
  }
}

// Two sums in one launch (grad_weight's and grad_bias's: a launch less per backward, whose host time and gap count
// at small shapes): the first first_blocks blocks take the first, the others the second.
template <typename T, int kResults0, int kResults1>
__global__ void __launch_bounds__(kSumThreads)
sum_splits_kernel(SplitSum<T> first, int first_blocks, SplitSum<T> second) {
  follow_previous_grid();
  __shared__ typename DeviceAcc<T>::type lane_sums[kSumThreads];
  const int block = int(blockIdx.x);
  if (block < first_blocks) sum_splits<T, kResults0>(first, block, first_blocks, lane_sums);
  else sum_splits<T, kResults1>(second, block - first_blocks, int(gridDim.x) - first_blocks, lane_sums);
}

// Runs `first` and `second` (either may be empty: count 0); each takes 32 results per block where that makes 256
// blocks or more, else one result per block (256 lanes): a choice by count alone, and a result's additions are one
// block's whatever the grid, so the order of the additions, and the bits, are the same on every device.
template <typename T>
void launch_sum_splits(const SplitSum<T>& first, const SplitSum<T>& second, cudaStream_t stream) {
  constexpr int kWide = 32;
  auto wide = [](const SplitSum<T>& sum) { return sum.count >= 256 * kWide; };
  auto blocks = [&](const SplitSum<T>& sum) {
    const int64_t per_block = wide(sum) ? kWide : 1;
    return int(std::min<int64_t>((sum.count + per_block - 1) / per_block, 65535));
  };
  const int first_blocks = blocks(first), total = first_blocks + blocks(second);
  if (total == 0) return;
  auto kernel = wide(first) ? (wide(second) ? sum_splits_kernel<T, kWide, kWide> : sum_splits_kernel<T, kWide, 1>)
                            : (wide(second) ? sum_splits_kernel<T, 1, kWide> : sum_splits_kernel<T, 1, 1>);
  launch_kernel(kernel, {dim3(unsigned(total)), dim3(kSumThreads), 0, stream}, "sum_splits_kernel", first,
                first_blocks, second);
}

static size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The packed weights of grad_input's mma.sync kernel or its wgmma one (where that one's shape applies: the query
// knows no device), whichever is larger.
static size_t packed_grad_input_weight_bytes(const ConvTransposeParams& params, DType dtype) {
  if (dtype == DType::Float64) return 0;
  size_t bytes = 0;
  TcProblem problem;
  if (grad_input_tc_problem(params, &problem))
    bytes = dtype == DType::Float32 ? packed_weight_bytes<Tf32Math>(problem)
                                    : packed_weight_bytes<Half16Math<__half>>(problem);
  const int operand = dtype == DType::Float32 ? 4 : 2;
  InputWgmmaPlan wgmma_plan{};
  if (plan_input_wgmma_shape(params, operand, &wgmma_plan))
    bytes = std::max(bytes, input_wgmma_weight_bytes(params, operand));
  return round_up_256(bytes);
}

// Byte offsets into the workspace. float64: [grad_weight partials: split x weight][grad_bias partials:
// split x phase x out_channels]. Tensor-core dtypes: [packed weight for grad_input][grad_weight partials:
// split x weight (tap-major: SplitSum)][grad_bias partials: image x pixel block x
// out_channels][x channels-last][g phase-split];
// the grad_weight parts only when grad_weight is asked for (the g copy is the size of the output).
// grad_bias partial sums per output channel made by the g pass (tensor-core dtypes): one per image and block.
static int64_t bias_partial_count(const ConvTransposeParams& p) {
  return p.batch * pack_pixel_blocks(p.batch, int(p.out_channels), p.out_h() * p.out_w());
}

struct BackwardWorkspace {
  size_t weight_partial, bias_partial, x_cl, g_split, total;
};

static BackwardWorkspace backward_workspace_layout(const ConvTransposeParams& p, DType dtype, bool grad_weight) {
  BackwardWorkspace w{};
  if (dtype == DType::Float64) {
    const BackwardPlan plan = plan_backward(p);
    w.weight_partial = 0;
    w.bias_partial = round_up_256(size_t(plan.splits * p.weight_numel()) * sizeof(double));
    w.total = w.bias_partial + size_t(plan.splits * plan.phases * p.out_channels) * sizeof(double);
    return w;
  }
  const WeightGemmPlan plan = plan_weight_gemm(p, dtype);
  // Partials for the split count of either GEMM (the wgmma one's by shape alone: the query knows no device).
  const size_t operand = dtype == DType::Float32 ? sizeof(float) : sizeof(__half);
  WgmmaWeightPlan wgmma_plan{};
  const int64_t splits = plan_weight_wgmma_shape(p, int(operand), &wgmma_plan) ? std::max(plan.splits, wgmma_plan.splits)
                                                                              : plan.splits;
  const int64_t bias_values = p.has_bias ? bias_partial_count(p) * p.out_channels : 0;
  w.weight_partial = packed_grad_input_weight_bytes(p, dtype);
  w.bias_partial = w.weight_partial + (grad_weight ? round_up_256(size_t(splits * p.weight_numel()) * 4) : 0);
  w.x_cl = w.bias_partial + round_up_256(size_t(bias_values) * sizeof(float));
  const int64_t x_values = grad_weight ? p.batch * p.in_h * p.in_w * plan.x_row : 0;
  const int64_t g_values = grad_weight ? p.batch * p.out_h() * p.out_w() * plan.g_layout.row : 0;
  w.g_split = w.x_cl + round_up_256(size_t(x_values) * operand);
  w.total = w.g_split + size_t(g_values) * operand;
  return w;
}

size_t backward_workspace_bytes(const ConvTransposeParams& params, DType dtype, bool grad_weight) {
  validate(params);
  return backward_workspace_layout(params, dtype, grad_weight).total;
}

// grad_input by the direct gather kernel (float64, and shapes outside the tensor-core path); F: the factor's type.
template <typename T, typename F>
void launch_grad_input_gather(const ConvTransposeParams& params, const Epilogue& epilogue, const BackwardArgs& args,
                              cudaStream_t stream) {
  launch_gather_conv<T, GatherDirection::GradInput, F>(
      grad_input_gather_problem(params), epilogue, static_cast<const T*>(args.grad_output),
      static_cast<const F*>(args.grad_factor), static_cast<const T*>(args.weight), nullptr,
      static_cast<T*>(args.grad_input), nullptr, stream);
}

// grad_input on tensor cores; false (nothing launched) where the fast path does not apply. g_copy: the g
// pass's phase-split copy of g where grad_weight made one (null: g formed from grad_output and the factor).
template <typename T, typename Math>
bool launch_grad_input_tensor_cores(const ConvTransposeParams& params, const Epilogue& epilogue,
                                    const BackwardArgs& args, void* packed, typename Math::Smem* g_copy,
                                    const PhaseSplitLayout& g_layout, cudaStream_t stream) {
  TcProblem problem;
  if (!grad_input_tc_problem(params, &problem)) return false;
  if (g_copy && !grad_input_copy_layout(&problem, g_layout)) g_copy = nullptr;
  if (args.grad_output_channels_last && !g_copy)  // backward_reads_channels_last() promised the copy
    throw std::logic_error("fused_convt: an NHWC grad_output without grad_input's copy path");
  const GatherProblem layout = grad_input_gather_problem(params);
  // An NHWC grad_output is no source for the register path (Plain): only the copy may run.
  return launch_implicit_gemm_conv<T, Math, GatherDirection::GradInput>(
      problem, epilogue, args.grad_output_channels_last ? nullptr : static_cast<const T*>(args.grad_output),
      static_cast<const typename Math::Factor*>(args.grad_factor),
      static_cast<const T*>(args.weight), layout.weight_group_stride, layout.weight_src_stride,
      layout.weight_dst_stride, nullptr, static_cast<T*>(args.grad_input), nullptr, packed, g_copy, true, stream);
}

// The backward of the tensor-core dtypes (Math: the operand policy of mma.cuh). The g pass runs first where
// grad_weight or grad_bias is wanted, so that grad_input copies its patches from the g it wrote (as the forward
// copies its input's channels-last copy) instead of forming g again in registers; then grad_input beside
// grad_weight's x copy, GEMM and sum (on a side stream where both are wanted), then grad_bias's ordered sum.
template <typename T, typename Math>
void launch_backward_tensor_cores(const ConvTransposeParams& p, const Epilogue& epilogue, DType dtype,
                                  const BackwardArgs& args, unsigned char* workspace, const BackwardWorkspace& w,
                                  cudaStream_t stream) {
  using Smem = typename Math::Smem;
  const WeightGemmPlan plan = plan_weight_gemm(p, dtype);
  float* weight_partial = args.grad_weight ? reinterpret_cast<float*>(workspace + w.weight_partial) : nullptr;
  float* bias_partial = args.grad_bias ? reinterpret_cast<float*>(workspace + w.bias_partial) : nullptr;
  Smem* x_cl = args.grad_weight ? reinterpret_cast<Smem*>(workspace + w.x_cl) : nullptr;
  Smem* g_split = args.grad_weight ? reinterpret_cast<Smem*>(workspace + w.g_split) : nullptr;
  if (args.grad_weight) {
    // Channel padding (where the per-group count is not a multiple of kPackAlign) must read as zero.
    if (padded_channels(p.out_channels_per_group()) != p.out_channels_per_group())
      check_cuda(cudaMemsetAsync(g_split, 0, w.total - w.g_split, stream), "cudaMemsetAsync");
    if (padded_channels(p.in_channels_per_group()) != p.in_channels_per_group())
      check_cuda(cudaMemsetAsync(x_cl, 0, w.g_split - w.x_cl, stream), "cudaMemsetAsync");
  }
  if (args.grad_weight || args.grad_bias)
    launch_pack_channels_last<T, Math>(static_cast<const T*>(args.grad_output),
                                       static_cast<const typename Math::Factor*>(args.grad_factor),
                                       float(factor_scale(epilogue)), int(p.out_channels), int(p.groups),
                                       int(padded_channels(p.out_channels_per_group())), plan.g_layout, g_split,
                                       bias_partial, stream, args.grad_output_channels_last);
  // grad_input and grad_weight's chain (x copy, GEMM, sum) both need only the g pass: where both are wanted, the
  // chain runs on a side stream beside grad_input (side_stream.h).
  const bool grad_input = args.grad_input && p.input_numel() > 0;
  ForkJoin fork(stream, grad_input && args.grad_weight && !serial_backward());
  // grad_bias from the g pass's partials: with grad_weight's sum where that runs (on the side stream, beside
  // grad_input), else alone at the end.
  const SplitSum<T> bias_sum{bias_partial, bias_partial_count(p), args.grad_bias ? p.out_channels : 0,
                             static_cast<T*>(args.grad_bias)};
  // grad_weight on wgmma where its shape and the device allow (grad_weight_wgmma.cuh; not exact float), else on
  // mma.sync.
  WgmmaWeightPlan wgmma_plan{};
  bool on_wgmma = false;
  if constexpr (!std::is_same<Math, Fp32SplitMath>::value)
    on_wgmma = args.grad_weight && wgmma_weight_input_ok(args.input) &&
               plan_weight_wgmma(p, int(sizeof(T)), &wgmma_plan);
  if (on_wgmma) {
    const cudaStream_t side = fork.side();
    launch_grad_weight_wgmma<T>(p, wgmma_plan, plan.g_layout, static_cast<const T*>(args.input),
                                args.input_channels_last, x_cl, g_split, weight_partial, side);
    launch_sum_splits<T>({weight_partial, wgmma_plan.splits, p.weight_numel(), static_cast<T*>(args.grad_weight),
                          p.kernel_h * p.kernel_w, p.in_channels},
                         bias_sum, side);
  } else if (args.grad_weight) {
    const cudaStream_t side = fork.side();
    const PhaseSplitLayout x_layout{p.batch, PhaseAxis{int(p.in_h), 1, 0}, PhaseAxis{int(p.in_w), 1, 0}, plan.x_row};
    launch_pack_channels_last<T, Math>(static_cast<const T*>(args.input), nullptr, 1.0f, int(p.in_channels),
                                       int(p.groups), int(padded_channels(p.in_channels_per_group())), x_layout, x_cl,
                                       nullptr, side, args.input_channels_last);
    // (The GEMM's X by TMA boxes from the copy where it can.)
    alignas(64) CUtensorMap x_map{};
    const bool x_box = encode_gemm_x_box<Math>(p, plan, x_cl, &x_map);
    launch_grad_weight_gemm<Math>(p, plan, x_cl, x_box ? &x_map : nullptr, g_split, weight_partial, side);
    launch_sum_splits<T>({weight_partial, plan.splits, p.weight_numel(), static_cast<T*>(args.grad_weight),
                          p.kernel_h * p.kernel_w},
                         bias_sum, side);
  }
  // grad_input on wgmma from the g pass's G where grad_weight made it and the shape and device allow (not exact
  // float), else on mma.sync, else the gather kernel.
  InputWgmmaPlan input_plan{};
  bool input_on_wgmma = false;
  if constexpr (!std::is_same<Math, Fp32SplitMath>::value)
    input_on_wgmma = grad_input && g_split && plan_input_wgmma(p, int(sizeof(T)), &input_plan);
  if (input_on_wgmma) {
    launch_grad_input_wgmma<T>(p, input_plan, plan.g_layout, g_split, static_cast<const T*>(args.weight), workspace,
                               static_cast<T*>(args.grad_input), stream);
  } else if (grad_input) {
    const bool tensor_cores = workspace && packed_grad_input_weight_bytes(p, dtype) > 0 &&
                              launch_grad_input_tensor_cores<T, Math>(p, epilogue, args, workspace, g_split,
                                                                      plan.g_layout, stream);
    if (!tensor_cores && args.grad_output_channels_last)
      throw std::logic_error("fused_convt: an NHWC grad_output reached grad_input's NCHW kernels");
    if (!tensor_cores) launch_grad_input_gather<T, typename Math::Factor>(p, epilogue, args, stream);
  }
  fork.join();
  if (!args.grad_weight) launch_sum_splits<T>(bias_sum, {}, stream);
}

// grad_input's copy path (the g pass's G in place of grad_output) fits this device for Math, as
// launch_implicit_gemm_conv decides it: the TMA form where it applies, else the cp.async one, which decides.
template <typename Math>
static bool grad_input_copy_fits(const ConvTransposeParams& params, DType dtype) {
  TcProblem problem;
  if (!grad_input_tc_problem(params, &problem) || packed_grad_input_weight_bytes(params, dtype) == 0 ||
      !grad_input_copy_layout(&problem, plan_weight_gemm(params, dtype).g_layout))
    return false;
  return with_channel_tile(problem, [&](auto bn) {
    return layout_implicit_gemm<Math, GatherDirection::GradInput, decltype(bn)::value, TcVariant::CopiedSource>(
               &problem) > 0;
  });
}

bool backward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device,
                                  const BackwardArgs& call) {
  validate(params);
  if (dtype == DType::Float64) return !call.grad_output_channels_last && !call.input_channels_last;
  if (call.input_channels_last && params.in_channels % kPackVector != 0) return false;
  if (!call.grad_output_channels_last) return true;
  if (params.out_channels % kPackVector != 0 || (!call.grad_weight && !call.grad_bias)) return false;
  if (!call.grad_input || params.input_numel() == 0) return true;
  if (!call.grad_weight) return false;  // grad_input would read grad_output itself
  DeviceGuard guard(device);
  if (dtype == DType::Float32)
    return call.allow_tf32 ? grad_input_copy_fits<Tf32Math>(params, dtype)
                           : grad_input_copy_fits<Fp32SplitMath>(params, dtype);
  return grad_input_copy_fits<Half16Math<__half>>(params, dtype);
}

void backward_cuda(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype, const BackwardArgs& args,
                   const CudaContext& ctx) {
  validate(params);
  if ((args.grad_output_channels_last || args.input_channels_last) &&
      !backward_reads_channels_last(params, dtype, ctx.device, args))
    throw std::invalid_argument("fused_convt: a channels_last grad_output or input is read in place only where "
                                "backward_reads_channels_last() is true for the call; pass NCHW (contiguous) "
                                "tensors here");
  if (args.grad_bias && !params.has_bias)
    throw std::invalid_argument("fused_convt: grad_bias requested but params.has_bias is false");
  const BackwardWorkspace layout = backward_workspace_layout(params, dtype, args.grad_weight != nullptr);
  if (args.workspace && args.workspace_bytes < layout.total)
    throw std::invalid_argument("fused_convt: backward_cuda got a workspace of " + std::to_string(args.workspace_bytes) +
                                " bytes (BackwardArgs::workspace_bytes); this call needs " +
                                std::to_string(layout.total) + " (backward_workspace_bytes)");
  if ((args.grad_weight || args.grad_bias) && !args.workspace)
    throw std::invalid_argument("fused_convt: backward_cuda needs a workspace of backward_workspace_bytes() bytes");
  DeviceGuard guard(ctx.device);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);

  dispatch_device_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ProgrammaticLaunches overlap(launches_may_overlap(params.output_numel() * int64_t(sizeof(T))));
    unsigned char* workspace = static_cast<unsigned char*>(args.workspace);
    if constexpr (std::is_same_v<T, double>) {
      const GradLoader<T> g{static_cast<const T*>(args.grad_output), static_cast<const T*>(args.grad_factor),
                            factor_scale(epilogue)};
      if (args.grad_input && params.input_numel() > 0) launch_grad_input_gather<T, T>(params, epilogue, args, stream);
      if (!args.grad_weight && !args.grad_bias) return;
      // Without grad_weight the blocks only sum the bias: one tap group and ic tile.
      const BackwardPlan plan = plan_backward(params);
      BackwardPlan launch_plan = plan;
      if (!args.grad_weight) launch_plan.tap_groups = launch_plan.ic_tiles = 1;
      const int64_t grid_x = plan.splits * plan.phases;
      const int64_t grid_y = int64_t(launch_plan.tap_groups) * launch_plan.ic_tiles * launch_plan.oc_tiles;
      if (grid_x > 0x7fffffff || grid_y > 65535 || params.groups > 65535)
        throw std::invalid_argument("fused_convt: grad_weight grid too large (kernel taps x channel tiles > 65535 "
                                    "or groups > 65535)");
      double* weight_partial = reinterpret_cast<double*>(workspace + layout.weight_partial);
      double* bias_partial = reinterpret_cast<double*>(workspace + layout.bias_partial);
      launch_kernel(grad_weight_bias_partial_kernel<T, FfmaWeightEngine<T>>,
                    {dim3(unsigned(grid_x), unsigned(grid_y), unsigned(params.groups)), dim3(kWeightThreads), 0, stream},
                    "grad_weight_bias_partial_kernel", params, launch_plan, static_cast<const T*>(args.input), g,
                    args.grad_weight ? weight_partial : nullptr, args.grad_bias ? bias_partial : nullptr);
      launch_sum_splits<T>({weight_partial, plan.splits, args.grad_weight ? params.weight_numel() : 0,
                            static_cast<T*>(args.grad_weight)},
                           {bias_partial, plan.splits * plan.phases, args.grad_bias ? params.out_channels : 0,
                            static_cast<T*>(args.grad_bias)},
                           stream);
    } else if constexpr (std::is_same_v<T, float>) {
      if (args.allow_tf32) {
        launch_backward_tensor_cores<T, Tf32Math>(params, epilogue, dtype, args, workspace, layout, stream);
      } else {
        launch_backward_tensor_cores<T, Fp32SplitMath>(params, epilogue, dtype, args, workspace, layout, stream);
      }
    } else {
      launch_backward_tensor_cores<T, Half16Math<T>>(params, epilogue, dtype, args, workspace, layout, stream);
    }
  });
}

}  // namespace fused_convt
