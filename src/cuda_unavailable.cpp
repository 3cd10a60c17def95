// Entry points of a build without a CUDA compiler: the library stays usable on the CPU, and every CUDA
// entry point says clearly why it cannot run.
#include <stdexcept>

#include "fused_convt/api.h"

namespace fused_convt {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("fused_convt was built without CUDA (no CUDA compiler at build time); "
                           "only CPU tensors are supported");
}
}  // namespace

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
void forward_cuda(const ConvTransposeParams&, const Epilogue&, DType, const ForwardArgs&, const CudaContext&) {
  no_cuda();
}
size_t forward_workspace_bytes(const ConvTransposeParams&, DType) { return 0; }
bool forward_reads_channels_last(const ConvTransposeParams&, DType, int) { return false; }
bool forward_reads_channels_last(const ConvTransposeParams&, DType, int, const ForwardArgs&) { return false; }
size_t backward_workspace_bytes(const ConvTransposeParams&, DType, bool) { return 0; }
void backward_cuda(const ConvTransposeParams&, const Epilogue&, DType, const BackwardArgs&, const CudaContext&) { no_cuda(); }
bool backward_reads_channels_last(const ConvTransposeParams&, DType, int, const BackwardArgs&) { return false; }
void transpose_cuda(const void*, void*, int64_t, int64_t, int64_t, int, const CudaContext&) { no_cuda(); }

}  // namespace fused_convt
