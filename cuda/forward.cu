// CUDA forward entry point: validates, makes the caller's device current and runs the gather kernel on the
// caller's stream.
#include "problems.cuh"

namespace fused_convt {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void forward_cuda(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype,
                  const ForwardArgs& args, const CudaContext& ctx) {
  validate(params);
  if (params.has_bias != (args.bias != nullptr))
    throw std::invalid_argument("fused_convt: bias pointer must be given exactly when params.has_bias");
  if (params.output_numel() == 0) return;
  DeviceGuard guard(ctx.device);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const GatherProblem problem = forward_gather_problem(params);
  dispatch_device_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_gather_conv<T, GatherDirection::Forward>(
        problem, epilogue, static_cast<const T*>(args.input), nullptr, static_cast<const T*>(args.weight),
        static_cast<const T*>(args.bias), static_cast<T*>(args.output), static_cast<T*>(args.grad_factor),
        stream);
  });
}

}  // namespace fused_convt
