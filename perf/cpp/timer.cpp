// fused_convt_timer: the C++ API's own timings at the KernelBench shapes, without Python or PyTorch.
//
//   fused_convt_timer [kb_v0|kb_v1] [label]
//
// For bfloat16 and float32 (TF32): the inference forward on two data sets (add_value 0.5, where nearly every
// output is 0 as in KernelBench's data, and -0.5, where most take the erfc path), the training forward
// (output and d out / d u), the backward with all three gradients and with grad_weight + grad_bias alone.
// Each line gives the median of 20 calls, each bracketed by CUDA events and synchronized (so a call's host
// work before its first launch counts), the average of 20 calls back to back (as triton's do_bench sees
// them), the host time per call in that back-to-back loop (what a small shape's time is made of when it
// exceeds the GPU's), and a checksum of the result's bytes: two builds that should compute the same bits
// print the same checksums. Exits 77 without a GPU. It links only the library and the CUDA runtime, so a build made on one
// machine runs on another with a newer driver: perf/NOTES.md's quick device check.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "fused_convt/api.h"

namespace {

using namespace fused_convt;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "fused_convt_timer: %s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

// A device buffer that frees itself.
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) { check(cudaMalloc(&ptr, n ? n : 1), "cudaMalloc"); }
  ~Buffer() { cudaFree(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// Uniform values in [-scale, scale) from a hash of the index, stored as float32 or bfloat16 (rounded to
// nearest even), copied to the device.
void fill(Buffer& buffer, int64_t count, bool bf16, uint32_t seed, float scale) {
  std::vector<unsigned char> host(buffer.bytes);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    const float v = (float(x & 0xffffff) / float(0x1000000) * 2.0f - 1.0f) * scale;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if (bf16) {
      const uint16_t half = uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
      std::memcpy(&host[size_t(i) * 2], &half, 2);
    } else {
      std::memcpy(&host[size_t(i) * 4], &bits, 4);
    }
  }
  check(cudaMemcpy(buffer.ptr, host.data(), buffer.bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
}

uint64_t checksum(const Buffer& buffer) {
  std::vector<unsigned char> host(buffer.bytes);
  check(cudaMemcpy(host.data(), buffer.ptr, buffer.bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  uint64_t sum = 1469598103934665603ull;  // FNV-1a
  for (unsigned char byte : host) sum = (sum ^ byte) * 1099511628211ull;
  return sum;
}

void time_call(const char* label, const std::string& what, const std::function<void()>& call, const Buffer& result) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  for (int i = 0; i < 3; ++i) call();
  std::vector<float> synced;
  for (int i = 0; i < 20; ++i) {
    check(cudaEventRecord(start), "cudaEventRecord");
    call();
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    synced.push_back(ms);
  }
  std::sort(synced.begin(), synced.end());
  check(cudaEventRecord(start), "cudaEventRecord");
  const auto host_start = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) call();
  const double host_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - host_start).count() / 20;
  check(cudaEventRecord(stop), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float back_to_back = 0;
  check(cudaEventElapsedTime(&back_to_back, start, stop), "cudaEventElapsedTime");
  std::printf("%-10s %-44s synced %8.4f ms   back-to-back %8.4f ms   host %7.1f us   checksum %016llx\n", label,
              what.c_str(), synced[synced.size() / 2], back_to_back / 20, host_us,
              static_cast<unsigned long long>(checksum(result)));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string shape = argc > 1 ? argv[1] : "kb_v1";
  const char* label = argc > 2 ? argv[2] : "";
  if (shape != "kb_v0" && shape != "kb_v1") {
    std::fprintf(stderr, "usage: fused_convt_timer [kb_v0|kb_v1] [label]\n");
    return 2;
  }
  if (cuda_device_count() == 0) {
    std::printf("fused_convt_timer: no CUDA device; nothing timed\n");
    return 77;
  }
  ConvTransposeParams p;  // kb_v1: N128 Cin64 Cout128 64x64 k4 s2; kb_v0: N128 Cin32 Cout16 32x32 k4 s2
  const bool v1 = shape == "kb_v1";
  p.batch = 128, p.in_channels = v1 ? 64 : 32, p.out_channels = v1 ? 128 : 16, p.in_h = p.in_w = v1 ? 64 : 32;
  p.kernel_h = p.kernel_w = 4, p.stride_h = p.stride_w = 2;
  const CudaContext ctx{0, nullptr};
  for (const bool bf16 : {true, false}) {
    const DType dtype = bf16 ? DType::BFloat16 : DType::Float32;
    const size_t value = bf16 ? 2 : 4;
    Buffer x(p.input_numel() * value), w(p.weight_numel() * value), b(p.out_channels * value);
    Buffer out(p.output_numel() * value), factor(p.output_numel() * value), grad_out(p.output_numel() * value);
    Buffer grad_x(p.input_numel() * value), grad_w(p.weight_numel() * value), grad_b(p.out_channels * value);
    Buffer forward_workspace(forward_workspace_bytes(p, dtype));
    Buffer backward_workspace(backward_workspace_bytes(p, dtype, true));
    fill(x, p.input_numel(), bf16, 1, 1.7f);  // ~ randn's spread; weights as nn.ConvTranspose2d initializes them
    fill(w, p.weight_numel(), bf16, 2, 0.022f);
    fill(b, p.out_channels, bf16, 3, 0.022f);
    fill(grad_out, p.output_numel(), bf16, 4, 1.0f);
    const std::string mode = std::string(shape) + (bf16 ? " bf16 " : " tf32 ");
    ForwardArgs forward{x.ptr, w.ptr, b.ptr, out.ptr, nullptr, forward_workspace.ptr};
    forward.allow_tf32 = true;
    for (const double add : {0.5, -0.5}) {
      const Epilogue epilogue{add, 2.0, true};
      time_call(label, mode + "forward, add " + (add > 0 ? "+0.5" : "-0.5"),
                [&] { forward_cuda(p, epilogue, dtype, forward, ctx); }, out);
    }
    const Epilogue epilogue{-0.5, 2.0, true};  // the training step: factors of both branches
    ForwardArgs training = forward;
    training.grad_factor = factor.ptr;
    time_call(label, mode + "training forward (output, factor)", [&] { forward_cuda(p, epilogue, dtype, training, ctx); },
              factor);
    BackwardArgs backward;
    backward.grad_output = grad_out.ptr;
    backward.grad_factor = factor.ptr;
    backward.input = x.ptr;
    backward.weight = w.ptr;
    backward.grad_input = grad_x.ptr;
    backward.grad_weight = grad_w.ptr;
    backward.grad_bias = grad_b.ptr;
    backward.workspace = backward_workspace.ptr;
    backward.workspace_bytes = backward_workspace.bytes;
    backward.allow_tf32 = true;
    time_call(label, mode + "backward, grad_input (all three)", [&] { backward_cuda(p, epilogue, dtype, backward, ctx); }, grad_x);
    BackwardArgs weights_only = backward;
    weights_only.grad_input = nullptr;
    time_call(label, mode + "backward, grad_weight + grad_bias", [&] { backward_cuda(p, epilogue, dtype, weights_only, ctx); },
              grad_w);
  }
  return 0;
}
