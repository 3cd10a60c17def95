// Shared host/device helpers of the CUDA kernels: error checking, the device guard, the dtype switch and
// element conversions between storage types and accumulators.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "fused_convt/api.h"

namespace fused_convt {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    // Clear the sticky-free error so the next call on this thread starts clean.
    cudaGetLastError();
    throw std::runtime_error(std::string("fused_convt: CUDA error in ") + what + ": " +
                             cudaGetErrorString(status));
  }
}

// Makes ctx.device current for the scope of a call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// The saved factor's element type for a call of storage type T (grad_factor_dtype in api.h): float16 for
// float with TF32 (kTf32), T otherwise.
template <typename T, bool kTf32>
using FactorType = std::conditional_t<std::is_same_v<T, float> && kTf32, __half, T>;

template <typename T> struct DeviceAcc { using type = float; };
template <> struct DeviceAcc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Four consecutive accumulators from 16-byte aligned shared memory.
__device__ __forceinline__ void load4(const float* from, float (&to)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(from);
  to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}
__device__ __forceinline__ void load4(const double* from, double (&to)[4]) {
  const double2 lo = reinterpret_cast<const double2*>(from)[0], hi = reinterpret_cast<const double2*>(from)[1];
  to[0] = lo.x, to[1] = lo.y, to[2] = hi.x, to[3] = hi.y;
}

// Sum over the 32 lanes of a warp in a fixed butterfly order (bitwise reproducible); every lane gets it.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int width = 16; width > 0; width /= 2) v += __shfl_xor_sync(0xffffffffu, v, width);
  return v;
}

template <typename Fn>
void dispatch_device_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float64: fn(double{}); return;
    case DType::Float16: fn(__half{}); return;
    case DType::BFloat16: fn(__nv_bfloat16{}); return;
  }
  throw std::invalid_argument("fused_convt: unsupported dtype tag " + std::to_string(static_cast<int>(dtype)));
}

inline int ceil_div_int(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Whether the environment switch `name` is on: set and not "0". Read at each call, so that tests can flip it.
inline bool env_switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value && *value && std::strcmp(value, "0") != 0;
}

// An attribute of the current device.
inline int current_device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attribute, device), "cudaDeviceGetAttribute");
  return value;
}

// Whether the current device runs this build's sm_90a kernels (wgmma, setmaxnreg): the build carries them (CMake:
// an sm_90a target architecture defines FUSED_CONVT_SM90A) and the device is of compute capability 9.0.
inline bool sm90a_kernels_run_here() {
#ifdef FUSED_CONVT_SM90A
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
         current_device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
#else
  return false;
#endif
}

// Largest dynamic shared memory a block of this device may opt in to.
inline size_t max_dynamic_smem_bytes() {
  return static_cast<size_t>(current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device: cudaFuncSetAttribute once per
// kernel, device and larger size, not once per launch (~3 us of host time each, three or four per training step,
// which bound the small shapes; torch.profiler on the H100 machine). (A cudaDeviceReset between calls would drop
// the attribute while this cache still holds it: the next launch then fails with a CUDA error, never silently.)
// all_shared: also prefer the largest shared-memory carve-out of the SM's unified L1 / shared memory (for kernels
// whose occupancy needs it; the driver may otherwise pick a smaller one).
inline void allow_dynamic_smem(const void* kernel, int bytes, const char* what, bool all_shared = false) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> guard(lock);
  int& done = allowed[{kernel, device}];
  if (bytes <= done) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
  if (all_shared)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    int(cudaSharedmemCarveoutMaxShared)), what);
  done = bytes;
}

// Programmatic dependent launch (compute capability 9.0 and later). Every kernel of the library starts with
// follow_previous_grid() and is launched by launch_kernel(), which marks the launch
// cudaLaunchAttributeProgrammaticStreamSerialization inside a ProgrammaticLaunches scope that allows it (the calls
// whose tensors fit in L2: launches_may_overlap) where the kernel's code on the device waits
// (kernel_follows_previous_grid). A marked kernel may be launched once every block of the kernel before it in the
// stream has started (griddepcontrol.launch_dependents, each block's first instruction after the wait): its blocks take
// the SMs that the previous kernel's last wave leaves free and wait at follow_previous_grid() until that kernel has
// finished and its writes are visible. That hides the gaps between kernels (the launch, the first blocks' start-up),
// which count where kernels are short. The wait comes before a block's first memory access and before any return, so no
// grid ends without having waited, and the grid after it may rely on everything before it having finished. A kernel
// that is not marked (outside such a scope, or PyTorch's) starts only after the previous one has finished, as always.
// FUSED_CONVT_SERIAL_LAUNCHES set (and not "0") launches unmarked everywhere, for comparison.
__device__ __forceinline__ void follow_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether a call's kernels may overlap (programmatic dependent launch): where its output-sized tensors
// (`output_bytes`: one of them) fit in L2. There each kernel is short, a wave or less (kb_v0's training step: nine
// kernels of 3 to 45 us), and the gaps between them count: H100, CUDA graph replay, kb_v0 steps TF32 205.5 -> 201
// us, bf16 146.5 -> 141. Larger calls' kernels run for many waves, and the next kernel's blocks, let in early, sit
// on the SMs beside them: kb_v1 steps measured 3.20 -> 3.35 ms TF32 and 2.02 -> 2.17 bf16 so (the backward's g pass
// slower behind the training forward, grad_input taking the SMs before grad_weight's GEMM on the side stream could;
// perf/NOTES.md backward row 49).
inline bool launches_may_overlap(int64_t output_bytes) {
  return output_bytes <= current_device_attribute(cudaDevAttrL2CacheSize);
}

// Marks this thread's launches for programmatic dependent launch, or not, for its lifetime (one call's launches;
// the previous setting comes back after it). Outside any scope they are not marked.
class ProgrammaticLaunches {
 public:
  explicit ProgrammaticLaunches(bool on) : saved_(on_here()) { on_here() = on; }
  ~ProgrammaticLaunches() { on_here() = saved_; }
  ProgrammaticLaunches(const ProgrammaticLaunches&) = delete;
  ProgrammaticLaunches& operator=(const ProgrammaticLaunches&) = delete;
  static bool& on_here() {
    thread_local bool on = false;
    return on;
  }

 private:
  bool saved_;
};

// Whether `kernel`, as the current device runs it, holds follow_previous_grid()'s instructions: code generated for a
// virtual architecture of 9.0 or later (cudaFuncAttributes::ptxVersion, the __CUDA_ARCH__ it was compiled under;
// read once per kernel and device). Where a device runs older code (a build without a 9.0 target on an H100, or a
// later GPU running PTX of compute_89 compiled just in time, the sm_90a code being for 9.0 alone) the wait is not
// there, and a marked launch could overtake the kernel before it: those launches stay unmarked.
inline bool kernel_follows_previous_grid(const void* kernel) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, bool> known;  // (kernel, device) -> answer
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> guard(lock);
  const auto found = known.find({kernel, device});
  if (found != known.end()) return found->second;
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
  return known[{kernel, device}] = attributes.ptxVersion >= 90;
}

// Whether this launch of `kernel` is marked: a ProgrammaticLaunches scope allows it, the switch does not forbid it,
// and the kernel's code on this device waits (kernel_follows_previous_grid: compute capability 9.0 and later).
inline bool programmatic_launch_here(const void* kernel) {
  return ProgrammaticLaunches::on_here() && !env_switch_on("FUSED_CONVT_SERIAL_LAUNCHES") &&
         kernel_follows_previous_grid(kernel);
}

// A kernel's launch configuration: its grid, block, dynamic shared memory, stream, and clusters of cluster_x
// blocks along x (1: none).
struct LaunchShape {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  unsigned cluster_x = 1;
};

// Launches `kernel` (which starts with follow_previous_grid()), marked where programmatic_launch_here() allows; a
// launch error throws, naming `what`.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), const LaunchShape& shape, const char* what, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.smem;
  config.stream = shape.stream;
  cudaLaunchAttribute attributes[2]{};
  unsigned count = 0;
  if (shape.cluster_x > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = shape.cluster_x;
    attributes[count].val.clusterDim.y = attributes[count].val.clusterDim.z = 1;
    ++count;
  }
  if (programmatic_launch_here(reinterpret_cast<const void*>(kernel))) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

}  // namespace fused_convt
