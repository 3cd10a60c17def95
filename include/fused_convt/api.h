// The public C++ entry points of fused_convt. No torch, no pybind11, no CUDA headers: device memory and
// streams are passed as plain pointers, so a C++ program links this library with nothing else.
//
// Layout contract: every tensor is contiguous. input [N, C_in, H, W]; weight [C_in, C_out/groups, kH, kW]
// (nn.ConvTranspose2d's layout); bias [C_out]; output and grad_factor [N, C_out, H_out, W_out].
// All pointers of one call hold the same DType, except grad_factor on CUDA (grad_factor_dtype). Errors throw std::invalid_argument (bad arguments) or
// std::runtime_error (a CUDA failure), with a message naming what went wrong.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fused_convt/dtype.h"
#include "fused_convt/epilogue.h"
#include "fused_convt/params.h"

namespace fused_convt {

struct ForwardArgs {
  const void* input = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;   // required iff params.has_bias
  void* output = nullptr;       // may be null when only grad_factor is wanted (recompute in backward)
  // Optional, saved for the backward pass: d output / d pre-activation divided by epilogue.multiply_value
  // (EpilogueOutputs in epilogue.h), in grad_factor_dtype(dtype, allow_tf32) on CUDA, dtype on the CPU.
  void* grad_factor = nullptr;
  void* workspace = nullptr;    // device scratch of forward_workspace_bytes() bytes (CUDA only)
  // float32 only: allow TF32 tensor-core math (PyTorch's default for convolutions). Without it float32 runs
  // "3xTF32" on tensor cores (each operand as two TF32 parts: near-fp32 accuracy, ~1e-6 relative).
  // float16/bfloat16 always use tensor cores with fp32 accumulation; float64 runs fp64 FMA.
  bool allow_tf32 = false;
  // The input's memory is NHWC, PyTorch's channels_last: element (n, c, h, w) at ((n*H + h)*W + w)*C + c.
  // forward_cpu reads it always, forward_cuda where forward_reads_channels_last() is true (it refuses it
  // elsewhere); NCHW otherwise.
  bool input_channels_last = false;
  // output is NHWC (channels_last; what PyTorch's convolutions return for a channels_last input), else NCHW.
  // Both paths, every type. grad_factor stays NCHW: it is saved for the backward, whose kernels read NCHW
  // (an NHWC factor cost the channels_last training step a transpose of it).
  bool output_channels_last = false;
};

struct BackwardArgs {
  const void* grad_output = nullptr;
  // From ForwardArgs::grad_factor (same dtype and allow_tf32); null means the identity epilogue.
  const void* grad_factor = nullptr;
  const void* input = nullptr;        // needed for grad_weight
  const void* weight = nullptr;       // needed for grad_input
  void* grad_input = nullptr;         // each gradient output is optional (null: not computed)
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  void* workspace = nullptr;          // device scratch (CUDA only) of at least
  size_t workspace_bytes = 0;         //   backward_workspace_bytes(params, dtype, grad_weight != nullptr) bytes
  bool allow_tf32 = false;            // as ForwardArgs::allow_tf32, for grad_input and grad_weight
  // grad_output / input is NHWC (channels_last), read in place; only where backward_reads_channels_last() is true
  // for the call (backward_cuda refuses it elsewhere). The other tensors, gradients included, stay NCHW.
  bool grad_output_channels_last = false;
  bool input_channels_last = false;
};

// Where a call runs. The stream is a cudaStream_t (null: the legacy default stream); the device index is
// made current for the duration of the call and restored afterwards. The call's work is ordered on that stream
// after everything queued before it and before everything queued after it. (On compute capability 9.0 and later, in
// calls whose tensors fit in L2, a kernel of the library may start while the one before it in the stream finishes,
// waiting for its writes before touching memory: programmatic dependent launch, cuda/cuda_common.cuh. A kernel of
// other code starts early after ours only where it was itself launched for that, and then must wait the same way.)
struct CudaContext {
  int device = 0;
  void* stream = nullptr;
};

// The element type of grad_factor on CUDA: float16 for float32 with allow_tf32, whose backward multiplies in TF32
// (float16's 11-bit significand is TF32's; the factor is bounded by 1, epilogue.h), which halves the bytes the
// training forward writes and the backward reads, and the memory saved between them; the call's dtype otherwise.
inline DType grad_factor_dtype(DType dtype, bool allow_tf32) {
  return dtype == DType::Float32 && allow_tf32 ? DType::Float16 : dtype;
}

void forward_cpu(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype,
                 const ForwardArgs& args);
// The epilogue is the forward's: the backward scales grad_factor by its multiply_value (factor_scale).
void backward_cpu(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype, const BackwardArgs& args);

// True when the library was built with its CUDA kernels; the entry points below throw otherwise.
bool cuda_compiled();
// Number of usable CUDA devices (0 without a driver or a GPU, never throws).
int cuda_device_count();

// Bytes of device scratch forward_cuda may need (the weight repacked for the tensor-core path); 0 if none.
size_t forward_workspace_bytes(const ConvTransposeParams& params, DType dtype);
void forward_cuda(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype,
                  const ForwardArgs& args, const CudaContext& ctx);
// Whether forward_cuda on `device` reads an NHWC (channels_last) input in place, with no transpose, for every
// call: the tensor-core path of float16 / bfloat16 at whole 16-channel chunks per group, where the
// channels-last copy it otherwise makes of the input has exactly the NHWC layout. False without CUDA.
bool forward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device);
// The same for one call (its input pointer and input_channels_last are not read): also true where that call
// runs the column-pair kernel, whose input pass reads NHWC as it reads NCHW: the forward (an output, grad_factor
// or both) in float16, bfloat16 or float32 with allow_tf32 on an sm_90a build and
// device, stride_w 2.
bool forward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device, const ForwardArgs& call);
// Bytes of device scratch backward_cuda needs (deterministic split reductions and, for grad_weight, channels-last
// operand copies about the size of the output). Pass grad_weight = false for calls that do not ask for it.
size_t backward_workspace_bytes(const ConvTransposeParams& params, DType dtype, bool grad_weight = true);
void backward_cuda(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype, const BackwardArgs& args,
                   const CudaContext& ctx);
// Whether backward_cuda on `device` reads in place every tensor the call marks NHWC (grad_output_channels_last,
// input_channels_last; its pointers are only tested for null, allow_tf32 is read). grad_output: where the g pass
// is its only reader, i.e. a tensor-core dtype with out_channels a multiple of 4, grad_weight or grad_bias wanted,
// and grad_input not wanted or read from the g pass's copy (grad_weight wanted and that copy's path fitting the
// device). input: a tensor-core dtype with in_channels a multiple of 4 (grad_weight's channels-last copy of x is
// made from it without a transpose). False without CUDA.
bool backward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device, const BackwardArgs& call);

// Transposes a batch of row-major matrices of elem_bytes-byte values (2, 4 or 8) on the device, src
// [batch][rows][cols] into dst [batch][cols][rows] (not overlapping src): an NHWC (channels_last) tensor into NCHW
// with rows = H * W and cols = C, as the backward takes its operands. A tiled copy at about the device's copy rate.
void transpose_cuda(const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols, int elem_bytes,
                    const CudaContext& ctx);

}  // namespace fused_convt
