// launch_kernel and programmatic dependent launch (cuda/cuda_common.cuh) on the device. A chain of kernels, each
// reading the buffer the one before it wrote, launched marked inside a ProgrammaticLaunches scope: every kernel's
// last block spins before it writes, so a kernel that started without waiting for the one before it would read
// that block's values stale. On compute capability 9.0 and later, with this build's code for it, the launches must
// be marked (kernel_follows_previous_grid), and outside a scope or under FUSED_CONVT_SERIAL_LAUNCHES they must not.
// Exits 77 (ctest: skipped) when no CUDA device is visible.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "test_util.h"

namespace {

__global__ void add_one_kernel(const int* previous, int* next, int n, long long spin_cycles) {
  fused_convt::follow_previous_grid();
  if (blockIdx.x == gridDim.x - 1) {  // the last block writes late
    const long long start = clock64();
    while (clock64() - start < spin_cycles) {
    }
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) next[i] = previous[i] + 1;
}

// Runs kLinks kernels over kLinks + 1 buffers (buffer 0 zero, the others poisoned) and checks that the last holds
// kLinks everywhere.
void check_chain(bool in_scope, const std::string& what) {
  constexpr int kLinks = 24, kN = 1 << 16, kThreads = 256, kBlocks = 64;
  int* buffers = nullptr;
  fused_convt::check_cuda(cudaMalloc(&buffers, sizeof(int) * kN * (kLinks + 1)), "cudaMalloc");
  fused_convt::check_cuda(cudaMemset(buffers, 0xFF, sizeof(int) * kN * (kLinks + 1)), "cudaMemset");
  fused_convt::check_cuda(cudaMemset(buffers, 0, sizeof(int) * kN), "cudaMemset");
  {
    const fused_convt::ProgrammaticLaunches scope(in_scope);
    for (int link = 0; link < kLinks; ++link)
      fused_convt::launch_kernel(add_one_kernel, {dim3(kBlocks), dim3(kThreads), 0, nullptr}, "add_one_kernel",
                                 buffers + link * kN, buffers + (link + 1) * kN, kN, 200000LL);
  }
  std::vector<int> last(kN);
  fused_convt::check_cuda(cudaMemcpy(last.data(), buffers + kLinks * kN, sizeof(int) * kN, cudaMemcpyDeviceToHost),
                          "cudaMemcpy");
  int wrong = 0;
  for (int v : last) wrong += v != kLinks;
  CHECK_MSG(wrong == 0, what + ": " + std::to_string(wrong) + " of " + std::to_string(kN) + " values wrong");
  fused_convt::check_cuda(cudaFree(buffers), "cudaFree");
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_launch: no CUDA device visible, skipped\n");
    return 77;
  }
  try {
    int major = 0;
    fused_convt::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "attribute");
    const void* kernel = reinterpret_cast<const void*>(add_one_kernel);
    cudaFuncAttributes attributes{};
    fused_convt::check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes");
    std::printf("test_launch: compute capability %d.x, kernel code for compute_%d\n", major, attributes.ptxVersion);
    // This build's code for 9.0 and later holds the wait (CMake's architectures: 90a among the defaults).
    CHECK_MSG(fused_convt::kernel_follows_previous_grid(kernel) == (attributes.ptxVersion >= 90),
              "kernel_follows_previous_grid disagrees with the kernel's ptxVersion");
    if (major == 9) {
      CHECK_MSG(attributes.ptxVersion >= 90, "a compute capability 9.0 device runs code for compute_" +
                                                 std::to_string(attributes.ptxVersion) + ": no sm_90 target built?");
    }
    {
      const fused_convt::ProgrammaticLaunches scope(true);
      CHECK_MSG(fused_convt::programmatic_launch_here(kernel) == (attributes.ptxVersion >= 90),
                "inside a scope, launches are marked exactly where the kernel waits");
      setenv("FUSED_CONVT_SERIAL_LAUNCHES", "1", 1);
      CHECK_MSG(!fused_convt::programmatic_launch_here(kernel), "FUSED_CONVT_SERIAL_LAUNCHES must unmark launches");
      unsetenv("FUSED_CONVT_SERIAL_LAUNCHES");
      {
        const fused_convt::ProgrammaticLaunches inner(false);
        CHECK_MSG(!fused_convt::programmatic_launch_here(kernel), "a nested scope that forbids it must unmark");
      }
      CHECK_MSG(fused_convt::programmatic_launch_here(kernel) == (attributes.ptxVersion >= 90),
                "leaving a nested scope must restore the outer setting");
    }
    CHECK_MSG(!fused_convt::programmatic_launch_here(kernel), "outside any scope launches are not marked");
    check_chain(true, "marked chain");
    check_chain(false, "unmarked chain");
  } catch (const std::exception& error) {
    CHECK_MSG(false, std::string("exception: ") + error.what());
  }
  return test::summary("test_launch");
}
