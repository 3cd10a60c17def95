// CUDA backward: grad_input through the tensor-core implicit-GEMM kernel (one launch per stride phase of
// grad_output, see grad_input_tc_problems) or, where that does not apply, the direct gather kernel;
// grad_weight and grad_bias through deterministic split reductions.
//
// g = grad_output * grad_factor is formed in registers wherever a kernel loads it; it is never stored.
//
// grad_weight[ic, oc_local, kh, kw] = sum over (n, ih, iw) of x[n, ic, ih, iw] * g[n, oc, oh, ow] with
// oh = ih*s - p + kh*d: per tap and group a GEMM of [in/group x pixels] by [pixels x out/group] with a
// huge reduction over pixels. A block owns a 64 x 64 tile of (ic, oc) for one tap, one group and one
// contiguous slice ("split") of the pixels; it stages 32 pixels of x and of g per step in shared memory and
// multiplies them on tensor cores (same precision policies as the forward) or, for float64, in FFMA.
// The split count depends only on the problem, each split writes its own partial sums, and a second kernel
// adds the splits in index order: results are bitwise reproducible, with no atomics.
// grad_bias sums g over (n, oh, ow) the same way: per (channel, split) partials, then the ordered sum.
#include <algorithm>

#include "implicit_gemm_conv.cuh"
#include "problems.cuh"

namespace fused_convt {

constexpr int kWeightTile = 64;      // ic and oc extent of a grad_weight block
constexpr int kWeightMicro = 4;      // each thread: kWeightMicro x kWeightMicro results
constexpr int kWeightTileStride = kWeightTile + 4;  // keeps every 4-wide row read 16-byte aligned
constexpr int kPixelStep = 32;       // pixels staged per step
constexpr int kWeightThreads = 256;  // 16 x 16 threads
constexpr int kBiasThreads = 256;
constexpr int64_t kTargetBlocks = 1024;  // fixed (device independent) so results do not depend on the GPU

struct BackwardPlan {
  int64_t pixels;          // N * H * W, the grad_weight reduction length
  int64_t weight_splits, pixels_per_split;
  int64_t bias_splits, outputs_per_bias_split;
  int ic_tiles, oc_tiles;
};

inline BackwardPlan plan_backward(const ConvTransposeParams& p) {
  BackwardPlan plan{};
  plan.pixels = p.batch * p.in_h * p.in_w;
  plan.ic_tiles = ceil_div_int(p.in_channels_per_group(), kWeightTile);
  plan.oc_tiles = ceil_div_int(p.out_channels_per_group(), kWeightTile);
  const int64_t tiles = int64_t(plan.ic_tiles) * plan.oc_tiles * p.kernel_h * p.kernel_w * p.groups;
  const int64_t steps = std::max<int64_t>(1, (plan.pixels + kPixelStep - 1) / kPixelStep);
  const int64_t splits = std::clamp<int64_t>(kTargetBlocks / tiles, 1, std::min<int64_t>(steps, 256));
  plan.pixels_per_split = (steps + splits - 1) / splits * kPixelStep;
  plan.weight_splits = std::max<int64_t>(1, (plan.pixels + plan.pixels_per_split - 1) / plan.pixels_per_split);

  const int64_t per_channel = p.batch * p.out_h() * p.out_w();
  const int64_t bias_splits = std::clamp<int64_t>(kTargetBlocks / p.out_channels, 1, 64);
  plan.outputs_per_bias_split = std::max<int64_t>(1, (per_channel + bias_splits - 1) / bias_splits);
  plan.bias_splits = std::max<int64_t>(1, (per_channel + plan.outputs_per_bias_split - 1) / plan.outputs_per_bias_split);
  return plan;
}

template <typename T>
struct GradLoader {
  const T* grad_output;
  const T* grad_factor;
  __device__ __forceinline__ typename DeviceAcc<T>::type operator()(int64_t index) const {
    auto grad = to_acc(grad_output[index]);
    return grad_factor ? grad * to_acc(grad_factor[index]) : grad;
  }
};

// The multiply of one grad_weight block, swappable under the shared staging loop below. Each engine holds
// its shared-memory tiles (Storage), receives every staged (channel, pixel) value of x and g, multiplies a
// staged step into its accumulators, and reports each accumulator with its (ic, oc) position in the tile.

// FFMA (float64, and any dtype without a tensor-core policy): tiles [pixel][channel], 4 x 4 results per
// thread read as two 4-wide shared loads per 16 FMAs.
template <typename T>
struct FfmaWeightEngine {
  using Acc = typename DeviceAcc<T>::type;
  struct Storage {
    __align__(16) Acc x[kPixelStep][kWeightTileStride];
    __align__(16) Acc g[kPixelStep][kWeightTileStride];
  };
  Acc acc[kWeightMicro][kWeightMicro];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWeightMicro; ++i)
#pragma unroll
      for (int j = 0; j < kWeightMicro; ++j) acc[i][j] = Acc(0);
  }
  __device__ __forceinline__ static void stage(Storage& s, int c, int q, Acc x_value, Acc g_value) {
    s.x[q][c] = x_value;
    s.g[q][c] = g_value;
  }
  __device__ __forceinline__ void multiply(const Storage& s, int tid) {
    const int ty = tid / 16, tx = tid % 16;
#pragma unroll 4
    for (int q = 0; q < kPixelStep; ++q) {
      Acc a[kWeightMicro], b[kWeightMicro];
      load4(&s.x[q][ty * kWeightMicro], a);
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
      for (int j = 0; j < kWeightMicro; ++j) fn(ty * kWeightMicro + i, tx * kWeightMicro + j, acc[i][j]);
  }
};

// Tensor cores (Math from mma.cuh): tiles [channel][pixel] in the operand format, rows padded by 16 B so
// ldmatrix is conflict-free; per tap the block is the GEMM [ic x pixels] * [pixels x oc]. 8 warps as 2 (ic)
// x 4 (oc), each 32 x 16 results = 2 x 2 mma tiles.
template <typename T, typename Math>
struct MmaWeightEngine {
  using Smem = typename Math::Smem;
  static constexpr int kRowBytes = kPixelStep * int(sizeof(Smem)) + 16;
  struct Storage {
    __align__(16) unsigned char x[kWeightTile * kRowBytes];
    __align__(16) unsigned char g[kWeightTile * kRowBytes];
  };
  float acc[2][2][4];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
  }
  __device__ __forceinline__ static void stage(Storage& s, int c, int q, float x_value, float g_value) {
    reinterpret_cast<Smem*>(s.x + c * kRowBytes)[q] = Math::to_smem(from_acc<T>(x_value));
    reinterpret_cast<Smem*>(s.g + c * kRowBytes)[q] = Math::to_smem(from_acc<T>(g_value));
  }
  __device__ __forceinline__ void multiply(const Storage& s, int tid) {
    const int lane = tid & 31, warp = tid >> 5, warp_m = warp >> 2, warp_n = warp & 3;
    const uint32_t x_base = smem_address(s.x), g_base = smem_address(s.g);
#pragma unroll
    for (int ks = 0; ks < kPixelStep / Math::kStep; ++ks) {
      typename Math::AFrag a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        uint32_t raw[4];
        const int row = warp_m * 32 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(raw, x_base + row * kRowBytes + ks * 32 + (lane >> 4) * 16);
        Math::make_a(a[i], raw);
      }
      uint32_t raw[4];
      const int row = warp_n * 16 + (lane & 7) + (lane >> 4) * 8;
      ldmatrix_x4(raw, g_base + row * kRowBytes + ks * 32 + ((lane >> 3) & 1) * 16);
      typename Math::BFrag b[2];
      Math::make_b(b[0], raw[0], raw[1]);
      Math::make_b(b[1], raw[2], raw[3]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) Math::mma(acc[i][j], a[i], b[j]);
    }
  }
  template <typename Fn>
  __device__ __forceinline__ void for_each_result(int tid, Fn&& fn) const {
    const int lane = tid & 31, warp = tid >> 5, warp_m = warp >> 2, warp_n = warp & 3;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          fn(warp_m * 32 + i * 16 + g + (q >> 1) * 8, warp_n * 16 + j * 8 + 2 * t + (q & 1), acc[i][j][q]);
  }
};

template <typename T, typename Engine>
__global__ void __launch_bounds__(kWeightThreads)
grad_weight_partial_kernel(ConvTransposeParams p, BackwardPlan plan, const T* __restrict__ x, GradLoader<T> g,
                           typename DeviceAcc<T>::type* __restrict__ partial) {
  using Acc = typename DeviceAcc<T>::type;
  __shared__ typename Engine::Storage tiles;

  const int in_per_group = int(p.in_channels / p.groups), out_per_group = int(p.out_channels / p.groups);
  const int ic0 = (blockIdx.x % plan.ic_tiles) * kWeightTile;
  const int oc0 = (blockIdx.x / plan.ic_tiles) * kWeightTile;
  const int tap = blockIdx.y, kh = tap / int(p.kernel_w), kw = tap % int(p.kernel_w);
  const int group = int(blockIdx.z % p.groups);
  const int64_t split = blockIdx.z / p.groups;
  const int64_t pixel_begin = split * plan.pixels_per_split;
  const int64_t pixel_end = min(plan.pixels, pixel_begin + plan.pixels_per_split);
  const int in_h = int(p.in_h), in_w = int(p.in_w), out_h = int(p.out_h()), out_w = int(p.out_w());
  const int in_plane = in_h * in_w;
  const int64_t out_plane = int64_t(out_h) * out_w;
  const int dh = int(kh * p.dil_h - p.pad_h), dw = int(kw * p.dil_w - p.pad_w);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  static_assert(kPixelStep == 32, "one pixel per lane");
  Engine engine;
  engine.clear();

  for (int64_t base = pixel_begin; base < pixel_end; base += kPixelStep) {
    // Lane = pixel (coalesced along the image row), warp = first channel: each pixel is decoded once per step.
    const int64_t pixel = base + lane;
    const bool pixel_ok = pixel < pixel_end;
    const int64_t n = pixel_ok ? pixel / in_plane : 0;
    const int hw = pixel_ok ? int(pixel % in_plane) : 0, ih = hw / in_w, iw = hw % in_w;
    const int oh = ih * int(p.stride_h) + dh, ow = iw * int(p.stride_w) + dw;
    const bool tap_ok = pixel_ok && oh >= 0 && oh < out_h && ow >= 0 && ow < out_w;
    const T* x_pixel = x + (n * p.in_channels + group * in_per_group + ic0) * in_plane + hw;
    const int64_t g_pixel = (n * p.out_channels + group * out_per_group + oc0) * out_plane + int64_t(oh) * out_w + ow;
#pragma unroll
    for (int c = warp; c < kWeightTile; c += kWeightThreads / 32) {
      const Acc x_value = (pixel_ok && ic0 + c < in_per_group) ? to_acc(x_pixel[int64_t(c) * in_plane]) : Acc(0);
      const Acc g_value = (tap_ok && oc0 + c < out_per_group) ? g(g_pixel + int64_t(c) * out_plane) : Acc(0);
      Engine::stage(tiles, c, lane, x_value, g_value);
    }
    __syncthreads();
    engine.multiply(tiles, tid);
    __syncthreads();
  }

  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t weight_numel = p.in_channels * out_per_group * taps;
  engine.for_each_result(tid, [&](int ic_in_tile, int oc_in_tile, Acc value) {
    const int ic_local = ic0 + ic_in_tile, oc_local = oc0 + oc_in_tile;
    if (ic_local < in_per_group && oc_local < out_per_group) {
      const int64_t ic = int64_t(group) * in_per_group + ic_local;
      partial[split * weight_numel + (ic * out_per_group + oc_local) * taps + tap] = value;
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
grad_bias_partial_kernel(ConvTransposeParams p, BackwardPlan plan, GradLoader<T> g,
                         typename DeviceAcc<T>::type* __restrict__ partial) {
  using Acc = typename DeviceAcc<T>::type;
  __shared__ Acc sums[kBiasThreads];
  const int64_t channel = blockIdx.x, split = blockIdx.y;
  const int64_t out_plane = p.out_h() * p.out_w();
  const int64_t per_channel = p.batch * out_plane;
  const int64_t begin = split * plan.outputs_per_bias_split;
  const int64_t end = min(per_channel, begin + plan.outputs_per_bias_split);
  Acc acc = Acc(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBiasThreads) {
    const int64_t n = i / out_plane;
    acc += g((n * p.out_channels + channel) * out_plane + i % out_plane);
  }
  sums[threadIdx.x] = acc;
  __syncthreads();
  // Fixed-shape tree: the same additions in the same order on every run.
  for (int width = kBiasThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[split * p.out_channels + channel] = sums[0];
}

// result[i] = sum over s in order of partial[s * count + i].
template <typename T>
__global__ void sum_splits_kernel(const typename DeviceAcc<T>::type* __restrict__ partial, int64_t splits,
                                  int64_t count, T* __restrict__ result) {
  using Acc = typename DeviceAcc<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    Acc acc = Acc(0);
    for (int64_t s = 0; s < splits; ++s) acc += partial[s * count + i];
    result[i] = from_acc<T>(acc);
  }
}

template <typename T>
void launch_sum_splits(const typename DeviceAcc<T>::type* partial, int64_t splits, int64_t count, T* result,
                       cudaStream_t stream) {
  const int blocks = int(std::min<int64_t>((count + 255) / 256, 65535));
  sum_splits_kernel<T><<<blocks, 256, 0, stream>>>(partial, splits, count, result);
  check_launch("sum_splits_kernel");
}

static size_t accumulator_size(DType dtype) { return dtype == DType::Float64 ? sizeof(double) : sizeof(float); }

// Workspace layout: [packed weight for the tensor-core grad_input][grad_weight partials][grad_bias partials].
static size_t packed_grad_input_weight_bytes(const ConvTransposeParams& params, DType dtype) {
  TcProblem problems[kTcMaxPhases];
  int count = 0;
  if (dtype == DType::Float64 || !grad_input_tc_problems(params, problems, &count)) return 0;
  const size_t bytes = dtype == DType::Float32 ? packed_weight_bytes<Tf32Math>(problems[0])
                                               : packed_weight_bytes<Half16Math<__half>>(problems[0]);
  return (bytes + 255) / 256 * 256;
}

size_t backward_workspace_bytes(const ConvTransposeParams& params, DType dtype) {
  validate(params);
  const BackwardPlan plan = plan_backward(params);
  const int64_t values = plan.weight_splits * params.weight_numel() + plan.bias_splits * params.out_channels;
  return packed_grad_input_weight_bytes(params, dtype) + size_t(values) * accumulator_size(dtype);
}

// grad_input on tensor cores; false (nothing launched) where the fast path does not apply.
template <typename T>
bool launch_grad_input_tensor_cores(const ConvTransposeParams& params, const BackwardArgs& args, void* packed,
                                    cudaStream_t stream) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    TcProblem problems[kTcMaxPhases];
    int count = 0;
    if (!grad_input_tc_problems(params, problems, &count)) return false;
    const GatherProblem layout = grad_input_gather_problem(params);
    for (int i = 0; i < count; ++i) {
      auto launch = [&](auto math) {
        return launch_implicit_gemm_conv<T, decltype(math), GatherDirection::GradInput>(
            problems[i], Epilogue{}, static_cast<const T*>(args.grad_output), static_cast<const T*>(args.grad_factor),
            static_cast<const T*>(args.weight), layout.weight_group_stride, layout.weight_src_stride,
            layout.weight_dst_stride, nullptr, static_cast<T*>(args.grad_input), nullptr, packed, stream);
      };
      bool launched;
      if constexpr (std::is_same_v<T, float>) {
        launched = args.allow_tf32 ? launch(Tf32Math{}) : launch(Fp32SplitMath{});
      } else {
        launched = launch(Half16Math<T>{});
      }
      // Every phase has the same tile and staging sizes, so only the first can decline.
      if (!launched) {
        if (i == 0) return false;
        throw std::runtime_error("fused_convt: grad_input phase launch declined after the first phase");
      }
    }
    return true;
  }
}

void backward_cuda(const ConvTransposeParams& params, DType dtype, const BackwardArgs& args,
                   const CudaContext& ctx) {
  validate(params);
  if (args.grad_bias && !params.has_bias)
    throw std::invalid_argument("fused_convt: grad_bias requested but params.has_bias is false");
  if ((args.grad_weight || args.grad_bias) && !args.workspace)
    throw std::invalid_argument("fused_convt: backward_cuda needs a workspace of backward_workspace_bytes() bytes");
  DeviceGuard guard(ctx.device);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const BackwardPlan plan = plan_backward(params);

  dispatch_device_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename DeviceAcc<T>::type;
    const GradLoader<T> g{static_cast<const T*>(args.grad_output), static_cast<const T*>(args.grad_factor)};
    unsigned char* workspace = static_cast<unsigned char*>(args.workspace);
    const size_t packed_bytes = packed_grad_input_weight_bytes(params, dtype);
    Acc* weight_partial = workspace ? reinterpret_cast<Acc*>(workspace + packed_bytes) : nullptr;
    Acc* bias_partial = weight_partial ? weight_partial + plan.weight_splits * params.weight_numel() : nullptr;

    if (args.grad_input && params.input_numel() > 0) {
      const bool tensor_cores = workspace && packed_bytes > 0 &&
                                launch_grad_input_tensor_cores<T>(params, args, workspace, stream);
      if (!tensor_cores) {
        launch_gather_conv<T, GatherDirection::GradInput>(
            grad_input_gather_problem(params), Epilogue{}, g.grad_output, g.grad_factor,
            static_cast<const T*>(args.weight), nullptr, static_cast<T*>(args.grad_input), nullptr, stream);
      }
    }
    if (args.grad_weight) {
      const dim3 grid(unsigned(plan.ic_tiles * plan.oc_tiles), unsigned(params.kernel_h * params.kernel_w),
                      unsigned(plan.weight_splits * params.groups));
      if (grid.z > 65535 || grid.y > 65535)
        throw std::invalid_argument("fused_convt: grad_weight grid too large (kernel taps or groups x splits > 65535)");
      auto launch = [&](auto engine) {
        grad_weight_partial_kernel<T, decltype(engine)><<<grid, kWeightThreads, 0, stream>>>(
            params, plan, static_cast<const T*>(args.input), g, weight_partial);
      };
      if constexpr (std::is_same_v<T, double>) {
        launch(FfmaWeightEngine<T>{});
      } else if constexpr (std::is_same_v<T, float>) {
        if (args.allow_tf32) {
          launch(MmaWeightEngine<T, Tf32Math>{});
        } else {
          launch(MmaWeightEngine<T, Fp32SplitMath>{});
        }
      } else {
        launch(MmaWeightEngine<T, Half16Math<T>>{});
      }
      check_launch("grad_weight_partial_kernel");
      launch_sum_splits<T>(weight_partial, plan.weight_splits, params.weight_numel(),
                           static_cast<T*>(args.grad_weight), stream);
    }
    if (args.grad_bias) {
      const dim3 grid(unsigned(params.out_channels), unsigned(plan.bias_splits));
      grad_bias_partial_kernel<T><<<grid, kBiasThreads, 0, stream>>>(params, plan, g, bias_partial);
      check_launch("grad_bias_partial_kernel");
      launch_sum_splits<T>(bias_partial, plan.bias_splits, params.out_channels, static_cast<T*>(args.grad_bias),
                           stream);
    }
  });
}

}  // namespace fused_convt
