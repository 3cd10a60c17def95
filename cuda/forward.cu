// CUDA forward entry point: validates, makes the caller's device current and, on the caller's stream, runs
// the column-pair wgmma kernel at stride_w 2 on sm_90a (float16, bfloat16, and float: as TF32 where it is allowed,
// the output, grad_factor or both; exact, as 3xTF32, for the output alone; pair_forward.cuh),
// else the tensor-core implicit-GEMM kernel where it applies (float16, bfloat16, float32 as TF32 or, without TF32,
// as exact 3xTF32; phases and patches within its limits), else the direct gather kernel (float64, the rest).
// It first makes a channels-last copy of the input in the workspace (tc_async_patch), or, for the 16-bit
// types, reads the input in place where it is already NHWC (forward_reads_channels_last).
#include "implicit_gemm_conv.cuh"
#include "pair_forward.cuh"
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

// Workspace: [packed weight (rounded up to 256 B)][channels-last copy of the input], in the
// operand type (4-byte words for float under every policy, 2-byte values for the 16-bit types).
static size_t forward_packed_bytes(const TcProblem& problem, DType dtype) {
  const size_t bytes = dtype == DType::Float32 ? packed_weight_bytes<Tf32Math>(problem)
                                               : packed_weight_bytes<Half16Math<__half>>(problem);
  return (bytes + 255) / 256 * 256;
}

// Bytes of one operand of the column-pair kernel (pair_forward.cuh) for this type, 0 where it does not run it.
static int pair_operand_bytes(DType dtype) {
  return dtype == DType::Float64 ? 0 : dtype == DType::Float32 ? 4 : 2;
}

// The forward may take the column-pair path instead: the workspace holds whichever layout is larger.
size_t forward_workspace_bytes(const ConvTransposeParams& params, DType dtype) {
  validate(params);
  size_t bytes = 0;
  TcProblem problem;
  if (dtype != DType::Float64 && forward_tc_problem(params, &problem)) {
    // The channels-last copy of the input (tc_async_patch), in the operand type.
    const size_t source = dtype == DType::Float32 ? channels_last_source_bytes<Tf32Math>(problem)
                                                  : channels_last_source_bytes<Half16Math<__half>>(problem);
    bytes = forward_packed_bytes(problem, dtype) + source;
  }
  // (Float: TF32's plan, or exact float's, three parts per input channel: whichever the call takes. Both row phases
  // per tile, where the plan takes them, need the most: their weight slots span both phases' row offsets.)
  for (int k_parts : {1, 3}) {
    PairProblem pair;
    if (pair_operand_bytes(dtype) && plan_pair_forward(params, pair_operand_bytes(dtype), 1, false, &pair, k_parts))
      bytes = std::max(bytes, pair_workspace_bytes(pair));
  }
  return bytes;
}

// Whether this call runs the column-pair kernel (pair_forward.cuh), and its plan: the forward (inference, training
// with grad_factor, or grad_factor alone) in a 16-bit type, or float with TF32 allowed (the kernel multiplies float
// as TF32), or the exact float inference forward (TF32 off: as 3xTF32, three parts of K per channel), where the
// plan applies on the current device. (Until the eighteenth session the training forward took it
// only up to 2^26 outputs and the phase kernel above: kb_v1 1.28 / 1.17 ms bf16 pair / phase with the lockstep's two
// tiles of slack; with one tile, pair_forward.cuh, 1.11 / 1.17, TF32 1.26 / 1.40.)
static bool runs_pair_forward(const ConvTransposeParams& params, DType dtype, const ForwardArgs& args,
                              PairProblem* pair) {
  const bool exact = dtype == DType::Float32 && !args.allow_tf32;
  if (!pair_operand_bytes(dtype) || (exact && args.grad_factor) || (!args.output && !args.grad_factor)) return false;
  return pair_forward_plan_for_device(params, pair_operand_bytes(dtype), args.output_channels_last, pair,
                                      exact ? 3 : 1, args.output != nullptr, args.grad_factor != nullptr);
}

bool forward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device,
                                 const ForwardArgs& call) {
  validate(params);
  PairProblem pair;
  DeviceGuard guard(device);
  return runs_pair_forward(params, dtype, call, &pair) || forward_reads_channels_last(params, dtype, device);
}

bool forward_reads_channels_last(const ConvTransposeParams& params, DType dtype, int device) {
  validate(params);
  TcProblem problem;
  if ((dtype != DType::Float16 && dtype != DType::BFloat16) || !forward_tc_problem(params, &problem) ||
      problem.src_padded != problem.src_per_group)
    return false;
  DeviceGuard guard(device);
  // Both 16-bit policies stage the same bytes: one answer for the two.
  return implicit_gemm_fits<Half16Math<__half>, GatherDirection::Forward>(problem);
}

void forward_cuda(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype,
                  const ForwardArgs& args, const CudaContext& ctx) {
  validate(params);
  if (args.input_channels_last && !forward_reads_channels_last(params, dtype, ctx.device, args))
    throw std::invalid_argument("fused_convt: a channels_last input is read in place only where "
                                "forward_reads_channels_last() is true for the call; pass NCHW (contiguous) "
                                "input here");
  if (params.has_bias != (args.bias != nullptr))
    throw std::invalid_argument("fused_convt: bias pointer must be given exactly when params.has_bias");
  if (params.output_numel() == 0) return;
  DeviceGuard guard(ctx.device);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  dispatch_device_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ProgrammaticLaunches overlap(launches_may_overlap(params.output_numel() * int64_t(sizeof(T))));
    const T* input = static_cast<const T*>(args.input);
    const T* weight = static_cast<const T*>(args.weight);
    const T* bias = static_cast<const T*>(args.bias);
    T* output = static_cast<T*>(args.output);
    // grad_factor in its type (grad_factor_dtype): float16 for float with TF32.
    auto factor_as = [&](auto type) { return static_cast<decltype(type)*>(args.grad_factor); };
    GatherProblem direct = forward_gather_problem(params);
    direct.dst_channels_last = args.output_channels_last;
    auto require_workspace = [&] {
      if (!args.workspace)
        throw std::invalid_argument("fused_convt: forward_cuda needs a workspace of forward_workspace_bytes() bytes");
    };
    if constexpr (!std::is_same_v<T, double>) {
      PairProblem pair;
      if (runs_pair_forward(params, dtype, args, &pair)) {
        require_workspace();
        launch_pair_forward<T>(pair, epilogue, input, args.input_channels_last, weight, bias, output,
                               factor_as(FactorType<T, true>()), args.workspace, stream);
        return;
      }
    }
    if constexpr (!std::is_same_v<T, double>) {
      TcProblem fast;
      if (forward_tc_problem(params, &fast)) {
        fast.dst_channels_last = args.output_channels_last;
        require_workspace();
        auto launch = [&](auto math) {
          using Smem = typename decltype(math)::Smem;
          using Factor = typename decltype(math)::Factor;
          // The channels-last source (tc_async_patch): the input itself where it is NHWC, else a copy in the
          // workspace.
          Smem* source = args.input_channels_last
                             ? const_cast<Smem*>(reinterpret_cast<const Smem*>(input))
                             : reinterpret_cast<Smem*>(static_cast<unsigned char*>(args.workspace) +
                                                       forward_packed_bytes(fast, dtype));
          return launch_implicit_gemm_conv<T, decltype(math), GatherDirection::Forward>(
              fast, epilogue, input, nullptr, weight, direct.weight_group_stride, direct.weight_src_stride,
              direct.weight_dst_stride, bias, output, factor_as(Factor()), args.workspace, source,
              args.input_channels_last, stream);
        };
        bool launched;
        if constexpr (std::is_same_v<T, float>) {
          launched = args.allow_tf32 ? launch(Tf32Math{}) : launch(Fp32SplitMath{});
        } else {
          launched = launch(Half16Math<T>{});
        }
        if (launched) return;
      }
    }
    if (args.input_channels_last)  // forward_reads_channels_last() promised the pair or tensor-core path
      throw std::logic_error("fused_convt: channels_last input reached the NCHW gather kernel");
    auto gather = [&](auto factor_type) {
      using F = decltype(factor_type);
      launch_gather_conv<T, GatherDirection::Forward, F>(direct, epilogue, input, nullptr, weight, bias, output,
                                                         factor_as(F()), stream);
    };
    if (args.allow_tf32) gather(FactorType<T, true>());
    else gather(T());
  });
}

}  // namespace fused_convt
