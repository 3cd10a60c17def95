// forward_cuda / backward_cuda against forward_cpu / backward_cpu and the double reference, in float (exact
// and with TF32 allowed), double, float16 and bfloat16, on problems that take the tensor-core path and on
// problems that fall back to the direct kernel. Device results and workspaces are poisoned with 0xFF bytes
// (NaN in every dtype) first, so an element a kernel forgets to write fails the comparison. Both entry
// points must be bitwise reproducible. Exits 77 (ctest: skipped) when no CUDA device is visible.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_convt/api.h"
#include "test_util.h"

using fused_convt::BackwardArgs;
using fused_convt::ConvTransposeParams;
using fused_convt::CudaContext;
using fused_convt::Epilogue;
using fused_convt::ForwardArgs;

namespace {

void cuda_ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    cuda_ok(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)), "cudaMalloc");
  }
  template <typename T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    if (bytes_) cuda_ok(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice), "cudaMemcpy to device");
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  // 0xFF bytes are a NaN in float, double, float16 and bfloat16.
  void poison() { if (bytes_) cuda_ok(cudaMemset(ptr_, 0xFF, bytes_), "cudaMemset"); }
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    if (bytes_) cuda_ok(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};


template <typename T>
std::vector<double> as_doubles(const std::vector<T>& values) {
  std::vector<double> result(values.size());
  for (size_t i = 0; i < values.size(); ++i) result[i] = test::to_double(values[i]);
  return result;
}

// Checks a device result against the reference (within tol) and against the CPU result (within 2 * tol:
// both are within tol of the reference).
template <typename T>
void check_device(const std::vector<T>& device, const std::vector<T>& cpu, const std::vector<double>& reference,
                  const std::vector<double>& tol, const std::string& what) {
  test::check_close(device, reference, tol, 1.0, what + " vs reference");
  test::check_close(device, as_doubles(cpu), tol, 2.0, what + " vs CPU");
}

struct CaseOptions {
  bool full = true;  // false: forward writes only grad_factor, backward only grad_input (no workspace)
  cudaStream_t stream = nullptr;
  bool allow_tf32 = false;
};

// TF32 keeps 10 mantissa bits: an operand is off by less than 2^-10 of itself, rounded or truncated.
constexpr double kTf32OperandUnit = 0x1.0p-10;
int nhwc_backward_cases = 0;  // backward runs from NHWC grad_output / input (main checks there are some)
// float32 without TF32 runs on tensor cores as 3xTF32 (x = hi + lo, two TF32 roundings, lo*lo dropped):
// each product carries up to ~3 * 2^-22 relative error instead of float32's 2^-24.
constexpr double kSplitTf32OperandUnit = 0x1.0p-21;

template <typename T>
void check_case(const ConvTransposeParams& p, const Epilogue& epi, const CaseOptions& options, test::Rng& rng,
                const std::string& label) {
  const auto dtype = test::Storage<T>::dtype;
  const bool tf32 = options.allow_tf32 && dtype == fused_convt::DType::Float32;
  // Operand rounding of the float32 tensor-core paths (TF32 or 3xTF32); the other dtypes keep their own.
  const double tensor_core_unit =
      dtype == fused_convt::DType::Float32 ? (tf32 ? kTf32OperandUnit : kSplitTf32OperandUnit) : 0.0;
  // The tensor-core backward (grad_input whenever a workspace is passed, grad_weight always) rounds
  // g = grad_output * grad_factor to the storage type before the MMA, as PyTorch's composite stores g;
  // float32 is 3xTF32 instead, or TF32 (the backward follows allow_tf32 like the forward). float64 stays exact.
  double grad_input_unit = 0.0, grad_weight_unit = 0.0;
  if (dtype == fused_convt::DType::Float32) {
    grad_input_unit = grad_weight_unit = tf32 ? kTf32OperandUnit : kSplitTf32OperandUnit;
  } else if (dtype != fused_convt::DType::Float64) {
    grad_weight_unit = test::Storage<T>::unit_roundoff;
    if (options.full) grad_input_unit = grad_weight_unit;
  }
  const std::string what =
      label + " " + fused_convt::dtype_name(dtype) + (tf32 ? " (TF32)" : "") + " " + test::describe(p);
  const CudaContext ctx{0, options.stream};
  auto sync = [&] { cuda_ok(cudaStreamSynchronize(options.stream), "cudaStreamSynchronize"); };

  std::vector<double> x_exact, w_exact, b_exact, go_exact;
  const auto x = test::random_tensor<T>(rng, p.input_numel(), -1, 1, &x_exact);
  const auto w = test::random_tensor<T>(rng, p.weight_numel(), -1, 1, &w_exact);
  const auto b = p.has_bias ? test::random_tensor<T>(rng, p.out_channels, -1, 1, &b_exact) : std::vector<T>{};
  const auto grad_output = test::random_tensor<T>(rng, p.output_numel(), -1, 1, &go_exact);

  // ---- forward
  std::vector<T> out_cpu(size_t(p.output_numel())), factor_cpu(size_t(p.output_numel()));
  const void* bias = p.has_bias ? b.data() : nullptr;
  fused_convt::forward_cpu(p, epi, dtype, ForwardArgs{x.data(), w.data(), bias, out_cpu.data(), factor_cpu.data()});
  const test::ForwardExpectation expected = test::expected_forward<T>(
      test::reference_preactivation(p, x_exact, w_exact, b_exact), epi, tensor_core_unit);

  const DeviceBuffer x_dev(x), w_dev(w), b_dev(b), go_dev(grad_output);
  // grad_factor on the device is float16 with TF32 (grad_factor_dtype): its expected values keep their
  // tolerance plus float16's rounding, and the backward below reads the device's factor (the CPU's backward the
  // same values as T), so both multiply the same g.
  const auto factor_dtype = fused_convt::grad_factor_dtype(dtype, options.allow_tf32);
  CHECK_MSG(factor_dtype == (tf32 ? fused_convt::DType::Float16 : dtype), what + ": grad_factor_dtype");
  DeviceBuffer out_dev(out_cpu.size() * sizeof(T)),
      factor_dev(factor_cpu.size() * fused_convt::dtype_size(factor_dtype));
  auto download_factor = [&] {
    return tf32 ? as_doubles(factor_dev.download<fused_convt::HalfBits>()) : as_doubles(factor_dev.download<T>());
  };
  std::vector<double> factor_tol = expected.factor_tol;
  if (tf32) {
    for (size_t i = 0; i < factor_tol.size(); ++i)
      factor_tol[i] += 2 * test::Storage<fused_convt::HalfBits>::unit_roundoff * std::fabs(expected.factor[i]) +
                       test::Storage<fused_convt::HalfBits>::denorm_min;
  }
  const size_t forward_workspace_bytes = fused_convt::forward_workspace_bytes(p, dtype);
  DeviceBuffer forward_workspace(forward_workspace_bytes);
  ForwardArgs forward_args{x_dev.get(), w_dev.get(), p.has_bias ? b_dev.get() : nullptr,
                           options.full ? out_dev.get() : nullptr, factor_dev.get()};
  forward_args.workspace = forward_workspace.get();
  forward_args.allow_tf32 = options.allow_tf32;
  auto run_forward = [&] {
    for (DeviceBuffer* buffer : {&out_dev, &factor_dev, &forward_workspace}) buffer->poison();
    cuda_ok(cudaDeviceSynchronize(), "poison");
    fused_convt::forward_cuda(p, epi, dtype, forward_args, ctx);
    sync();
  };
  run_forward();
  const auto out = out_dev.download<T>();
  const std::vector<double> factor = download_factor();
  if (options.full) check_device(out, out_cpu, expected.output, expected.output_tol, what + ": output");
  check_device(factor, as_doubles(factor_cpu), expected.factor, factor_tol, what + ": grad_factor");
  run_forward();
  CHECK_MSG(!options.full || test::bitwise_equal(out_dev.download<T>(), out), what + ": forward output not reproducible");
  CHECK_MSG(test::bitwise_equal(download_factor(), factor), what + ": forward grad_factor not reproducible");
  auto as_nchw = [&](const std::vector<T>& nhwc) {
    const int64_t channels = p.out_channels, plane = p.out_h() * p.out_w();
    std::vector<T> nchw(nhwc.size());
    for (int64_t n = 0; n < p.batch; ++n)
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t i = 0; i < plane; ++i)
          nchw[size_t((n * channels + c) * plane + i)] = nhwc[size_t((n * plane + i) * channels + c)];
    return nchw;
  };
  // The inference forward (the output alone, no grad_factor) may take its own kernel (on sm_90a the
  // column-pair wgmma path, cuda/pair_forward.cuh): the same values within tolerance, reproducible bitwise.
  if (options.full) {
    ForwardArgs inference_args = forward_args;
    inference_args.grad_factor = nullptr;
    auto run_inference = [&] {
      for (DeviceBuffer* buffer : {&out_dev, &forward_workspace}) buffer->poison();
      cuda_ok(cudaDeviceSynchronize(), "poison");
      fused_convt::forward_cuda(p, epi, dtype, inference_args, ctx);
      sync();
      return out_dev.download<T>();
    };
    const auto inference = run_inference();
    check_device(inference, out_cpu, expected.output, expected.output_tol, what + ": inference output");
    CHECK_MSG(test::bitwise_equal(run_inference(), inference), what + ": inference output not reproducible");
    inference_args.output_channels_last = true;  // the same values, stored NHWC
    CHECK_MSG(test::bitwise_equal(as_nchw(run_inference()), inference),
              what + ": channels_last inference output differs from the NCHW one");
  }
  // A channels_last (NHWC) output: the same arithmetic stored in the other layout, so bitwise the NCHW run's
  // values, permuted; a missed or misplaced element shows as the poison or a mismatch.
  {
    ForwardArgs nhwc_args = forward_args;
    nhwc_args.output_channels_last = true;
    for (DeviceBuffer* buffer : {&out_dev, &factor_dev, &forward_workspace}) buffer->poison();
    cuda_ok(cudaDeviceSynchronize(), "poison");
    fused_convt::forward_cuda(p, epi, dtype, nhwc_args, ctx);
    sync();
    CHECK_MSG(!options.full || test::bitwise_equal(as_nchw(out_dev.download<T>()), out),
              what + ": channels_last output differs from the NCHW output");
    CHECK_MSG(test::bitwise_equal(download_factor(), factor),
              what + ": grad_factor (NCHW) beside a channels_last output differs");
  }

  // ---- backward, with the grad_factor the CPU forward saved (identical input for both paths); with TF32 the
  // device's float16 factor (the CPU's backward reads its values as float)
  const auto factor_half = factor_dev.download<fused_convt::HalfBits>();
  std::vector<T> factor_for_cpu = factor_cpu;
  if (tf32) {
    for (size_t i = 0; i < factor_for_cpu.size(); ++i)
      factor_for_cpu[i] = test::Storage<T>::from_double(fused_convt::to_float(factor_half[i]));
  }
  BackwardArgs cpu_args;
  cpu_args.grad_output = grad_output.data();
  cpu_args.grad_factor = epi.enabled ? factor_for_cpu.data() : nullptr;
  cpu_args.input = x.data();
  cpu_args.weight = w.data();
  std::vector<T> gi_cpu(size_t(p.input_numel())), gw_cpu(size_t(p.weight_numel())), gb_cpu(size_t(p.out_channels));
  cpu_args.grad_input = gi_cpu.data();
  cpu_args.grad_weight = gw_cpu.data();
  cpu_args.grad_bias = p.has_bias ? gb_cpu.data() : nullptr;
  fused_convt::backward_cpu(p, epi, dtype, cpu_args);
  // g's factor as both backwards form it: the saved factor times multiply_value (rounded to the accumulator type).
  std::vector<double> factor_exact = epi.enabled ? as_doubles(factor_for_cpu) : std::vector<double>{};
  for (double& f : factor_exact) f *= double(typename fused_convt::AccumulatorOf<T>::type(epi.multiply_value));
  const test::BackwardReference ref = test::reference_backward(p, x_exact, w_exact, go_exact, factor_exact);

  // Where the tensor-core path needs its workspace, leaving it out is an argument error, not a crash.
  if (forward_workspace_bytes > 0 && p.output_numel() > 0 && (dtype != fused_convt::DType::Float32 || tf32)) {
    ForwardArgs without_workspace = forward_args;
    without_workspace.workspace = nullptr;
    std::string outcome = "no exception";
    try {
      fused_convt::forward_cuda(p, epi, dtype, without_workspace, ctx);
    } catch (const std::invalid_argument&) {
      outcome.clear();
    } catch (const std::exception& error) {
      outcome = error.what();
    }
    CHECK_MSG(outcome.empty(), what + ": forward_cuda without its workspace must throw std::invalid_argument, got " +
                                   outcome);
  }

  const DeviceBuffer saved_factor_dev = tf32 ? DeviceBuffer(factor_half) : DeviceBuffer(factor_cpu);
  DeviceBuffer gi_dev(gi_cpu.size() * sizeof(T)), gw_dev(gw_cpu.size() * sizeof(T)), gb_dev(gb_cpu.size() * sizeof(T));
  DeviceBuffer workspace(fused_convt::backward_workspace_bytes(p, dtype));
  BackwardArgs dev_args;
  dev_args.grad_output = go_dev.get();
  dev_args.grad_factor = epi.enabled ? saved_factor_dev.get() : nullptr;
  dev_args.input = x_dev.get();
  dev_args.weight = w_dev.get();
  dev_args.grad_input = gi_dev.get();
  dev_args.allow_tf32 = options.allow_tf32;
  if (options.full) {
    dev_args.grad_weight = gw_dev.get();
    dev_args.grad_bias = p.has_bias ? gb_dev.get() : nullptr;
    dev_args.workspace = workspace.get();
    dev_args.workspace_bytes = workspace.bytes();
  }
  auto run_backward = [&] {
    for (DeviceBuffer* buffer : {&gi_dev, &gw_dev, &gb_dev, &workspace}) buffer->poison();
    cuda_ok(cudaDeviceSynchronize(), "poison");
    fused_convt::backward_cuda(p, epi, dtype, dev_args, ctx);
    sync();
  };
  run_backward();
  const auto gi = gi_dev.download<T>(), gw = gw_dev.download<T>(), gb = gb_dev.download<T>();
  check_device(gi, gi_cpu, ref.grad_input.value, test::sum_tolerances<T>(ref.grad_input, grad_input_unit),
               what + ": grad_input");
  if (options.full) {
    check_device(gw, gw_cpu, ref.grad_weight.value, test::sum_tolerances<T>(ref.grad_weight, grad_weight_unit),
                 what + ": grad_weight");
    if (p.has_bias) {
      check_device(gb, gb_cpu, ref.grad_bias.value, test::sum_tolerances<T>(ref.grad_bias), what + ": grad_bias");
    }
  }
  run_backward();
  CHECK_MSG(test::bitwise_equal(gi_dev.download<T>(), gi), what + ": grad_input not reproducible");
  if (options.full) {
    CHECK_MSG(test::bitwise_equal(gw_dev.download<T>(), gw), what + ": grad_weight not reproducible");
    CHECK_MSG(!p.has_bias || test::bitwise_equal(gb_dev.download<T>(), gb), what + ": grad_bias not reproducible");
  }
  // NHWC (channels_last) grad_output and / or input read in place where backward_reads_channels_last() says so:
  // the same products in the same order, so bitwise the NCHW run's gradients; elsewhere backward_cuda refuses them.
  auto nhwc_of = [](const std::vector<T>& nchw, int64_t batch, int64_t channels, int64_t plane) {
    std::vector<T> nhwc(nchw.size());
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t i = 0; i < plane; ++i)
          nhwc[size_t((n * plane + i) * channels + c)] = nchw[size_t((n * channels + c) * plane + i)];
    return nhwc;
  };
  const DeviceBuffer go_nhwc_dev(nhwc_of(grad_output, p.batch, p.out_channels, p.out_h() * p.out_w()));
  const DeviceBuffer x_nhwc_dev(nhwc_of(x, p.batch, p.in_channels, p.in_h * p.in_w));
  for (const auto& [go_nhwc, x_nhwc] : {std::pair{true, false}, std::pair{false, true}, std::pair{true, true}}) {
    BackwardArgs nhwc_args = dev_args;
    nhwc_args.grad_output_channels_last = go_nhwc;
    nhwc_args.input_channels_last = x_nhwc;
    if (go_nhwc) nhwc_args.grad_output = go_nhwc_dev.get();
    if (x_nhwc) nhwc_args.input = x_nhwc_dev.get();
    const std::string layouts = std::string(go_nhwc ? " NHWC grad_output" : "") + (x_nhwc ? " NHWC input" : "");
    if (fused_convt::backward_reads_channels_last(p, dtype, 0, nhwc_args)) {
      for (DeviceBuffer* buffer : {&gi_dev, &gw_dev, &gb_dev, &workspace}) buffer->poison();
      cuda_ok(cudaDeviceSynchronize(), "poison");
      fused_convt::backward_cuda(p, epi, dtype, nhwc_args, ctx);
      sync();
      CHECK_MSG(test::bitwise_equal(gi_dev.download<T>(), gi), what + ": grad_input with" + layouts + " differs");
      CHECK_MSG(!options.full || test::bitwise_equal(gw_dev.download<T>(), gw),
                what + ": grad_weight with" + layouts + " differs");
      CHECK_MSG(!options.full || !p.has_bias || test::bitwise_equal(gb_dev.download<T>(), gb),
                what + ": grad_bias with" + layouts + " differs");
      ++nhwc_backward_cases;
    } else {
      bool refused = false;
      try {
        fused_convt::backward_cuda(p, epi, dtype, nhwc_args, ctx);
      } catch (const std::invalid_argument&) {
        refused = true;
      }
      CHECK_MSG(refused, what + ":" + layouts + " where backward_reads_channels_last() is false must be refused");
    }
  }
}

// Square kernel, stride, padding and output padding: both axes alike.
ConvTransposeParams square(ConvTransposeParams p, int64_t kernel, int64_t stride, int64_t pad = 0,
                           int64_t out_pad = 0) {
  p.kernel_h = p.kernel_w = kernel, p.stride_h = p.stride_w = stride, p.pad_h = p.pad_w = pad;
  p.out_pad_h = p.out_pad_w = out_pad;
  return p;
}

// Problems large enough for several destination tiles, channel tiles, source chunks and grad_weight splits,
// on both forward paths: the tensor-core implicit GEMM (stride_h * stride_w <= 16, few taps per phase,
// patches that fit its staging buffers) and the direct gather kernel.
std::vector<std::pair<std::string, ConvTransposeParams>> tiled_cases() {
  std::vector<std::pair<std::string, ConvTransposeParams>> cases;
  const auto make = test::make_params;
  cases.push_back({"k4 s2 p1, channel tiles and source chunks", square(make(2, 20, 36, 19, 19, 1), 4, 2, 1)});
  cases.push_back({"k4 s2 p1, several M tiles per phase, channels not a multiple of 16",
                   square(make(1, 24, 40, 32, 32, 1), 4, 2, 1)});
  cases.push_back({"stride 1, groups, 17 channels per group", square(make(2, 34, 18, 20, 20, 2), 3, 1, 1)});
  ConvTransposeParams p = square(make(1, 16, 16, 12, 12, 1), 3, 2, 1, 1);
  p.dil_h = p.dil_w = 2;
  cases.push_back({"phases without taps (gcd(d, s) = 2)", p});
  cases.push_back({"depthwise", square(make(2, 8, 8, 23, 21, 8), 3, 2, 1, 1)});
  p = make(1, 6, 10, 9, 13, 2);
  p.kernel_h = 7, p.kernel_w = 5, p.dil_h = 3, p.dil_w = 2, p.stride_h = 2, p.stride_w = 3, p.pad_h = 4, p.pad_w = 2;
  p.out_pad_h = 2, p.out_pad_w = 1;
  cases.push_back({"large dilated kernel", p});
  // grad_input copies its patches from the g pass's copy (16 channels per group): the column phases have 2,
  // 1 and 1 taps, so consecutive steps' patches differ (a 16-bit step once ran with a later step's patch).
  p = make(2, 24, 32, 15, 11, 1);
  p.kernel_h = p.kernel_w = 4, p.stride_h = 2, p.stride_w = 3, p.pad_h = 1, p.pad_w = 3, p.out_pad_h = 1;
  cases.push_back({"k4 s(2, 3): grad_input's sources differ in taps", p});
  // The same with 30 x 30 outputs: every g plane 15 x 10, so grad_input's patches come by TMA on sm_90.
  p.pad_w = 2, p.out_pad_h = 0;
  cases.push_back({"k4 s(2, 3), uniform g planes", p});
  p = make(1, 4, 4, 6, 5, 1);
  p.kernel_h = p.kernel_w = 2, p.stride_h = 5, p.stride_w = 4, p.out_pad_h = 3;
  cases.push_back({"20 phases (direct kernel only)", p});
  cases.push_back({"many grad_weight splits", square(make(4, 3, 5, 32, 32, 1), 2, 2)});
  cases.push_back({"wide channels (several grad_weight tiles)", square(make(2, 40, 70, 6, 6, 1), 3, 1, 1)});
  // The grad_weight GEMM's narrow tiles (GemmShape): 64 input x 32 and x 16 output channels (two and one warp
  // tiles, one pixel group); 32 x 16 and 32 x 32 (pixel groups) come with the cases above.
  cases.push_back({"grad_weight tile 64 x 32", square(make(2, 48, 24, 10, 9, 1), 3, 2, 1)});
  cases.push_back({"grad_weight tile 64 x 16", square(make(2, 40, 12, 9, 10, 1), 4, 2)});
  // Narrow tiles whose warps split the taps between them (32 x 16: four tap sets of one tap, two of two with float
  // patch steps; 32 x 32: two of two), with patch steps in 16-bit and in float at 32 x 16 (8 x 8 tiles of four
  // pixel groups, more copies than threads): four taps per phase over ragged 8 x 8 patch tiles, phases of two and
  // one taps (tap sets without taps), one tap per phase.
  cases.push_back({"grad_weight tile 32 x 16, tap sets, k4 s2", square(make(3, 32, 16, 11, 13, 1), 4, 2)});
  cases.push_back({"grad_weight tile 32 x 32, tap sets, k3 s2 p1", square(make(2, 24, 20, 10, 9, 1), 3, 2, 1)});
  cases.push_back({"grad_weight tile 32 x 16, one tap per phase", square(make(2, 32, 12, 9, 7, 1), 2, 2)});
  // X by TMA boxes from the channels-last copy (sm_90): the 32 x 16 tile, groups of 24 input channels (a box reads
  // into the next group's), the 64 x 64 tile.
  cases.push_back({"grad_weight X boxes, 32 x 16", square(make(2, 32, 16, 10, 16, 1), 4, 2)});
  cases.push_back({"grad_weight X boxes, groups of 24, p1", square(make(2, 48, 32, 8, 8, 2), 4, 2, 1)});
  cases.push_back({"grad_weight X boxes, 64 x 64", square(make(1, 64, 64, 6, 8, 1), 4, 2)});
  // Patch steps of the grad_weight GEMM (64 x 64 tiles, taps within one row and column of each other): ragged
  // tile grids (phase planes 12 x 14, and 11 x 13 with padding, where the rows past the grid's edge read inside
  // the image), several images per split; one tap per phase with channel tiles cut short; groups with phases
  // of two and one taps.
  cases.push_back({"grad_weight patch steps, k4 s2", square(make(3, 64, 64, 11, 13, 1), 4, 2)});
  cases.push_back({"grad_weight patch steps, k4 s2 p1", square(make(3, 64, 64, 11, 13, 1), 4, 2, 1)});
  cases.push_back({"grad_weight patch steps, one tap per phase", square(make(2, 72, 100, 9, 7, 1), 2, 2)});
  cases.push_back({"grad_weight patch steps, groups, k3 s2", square(make(2, 128, 128, 8, 8, 2), 3, 2, 1, 1)});
  // The column-pair forward (stride_w 2, channels per group multiples of 16, or 8 in float; sm_90a): 16-channel
  // tiles with an odd output width (pairs cut at the row's end, stored apart); one row phase (stride_h 1); taps 3
  // and 2 per phase with groups; a column phase without taps (kernel_w 1); more weight sets (groups) than SMs; in
  // float (TF32) a patch in two K chunks (64 channels, rows too wide for four warpgroups' whole patches). The
  // patch-step cases above take it with 64-channel tiles.
  cases.push_back({"pair: odd output width, 16-channel tiles", square(make(2, 32, 16, 9, 7, 1), 4, 2, 1, 1)});
  p = make(2, 16, 32, 6, 10, 1);
  p.kernel_h = 3, p.kernel_w = 2, p.stride_h = 1, p.stride_w = 2, p.pad_h = 1;
  cases.push_back({"pair: one row phase, 32-channel tiles", p});
  cases.push_back({"pair: k5 s2 p2, groups", square(make(1, 32, 32, 12, 12, 2), 5, 2, 2)});
  p = make(1, 16, 16, 5, 5, 1);
  p.kernel_h = 3, p.kernel_w = 1, p.stride_h = p.stride_w = 2;
  cases.push_back({"pair: a column phase without taps", p});
  cases.push_back({"pair: more weight sets than SMs", square(make(1, 16 * 70, 16 * 70, 3, 3, 70), 2, 2)});
  cases.push_back({"pair: K chunks (float)", square(make(1, 64, 32, 3, 20, 1), 4, 2)});
  // grad_weight on wgmma (one group, input channels of whole 64s, 64 or 128k output channels, four taps per phase,
  // input rows of whole 128-byte chunks: 32 float or 64 16-bit pixels, or 16-bit rows of 32 in two-row chunks):
  // two warpgroups (16-bit in two-row chunks), and one; one warpgroup with two input channel tiles; two output
  // channel blocks and row phases of different heights (output_padding).
  cases.push_back({"grad_weight wgmma, two warpgroups", square(make(2, 64, 128, 6, 32, 1), 4, 2, 1)});
  cases.push_back({"grad_weight wgmma, one warpgroup, rows of 32", square(make(2, 64, 64, 4, 32, 1), 4, 2)});
  cases.push_back({"grad_weight wgmma, one warpgroup", square(make(1, 128, 64, 3, 64, 1), 4, 2, 1)});
  p = square(make(2, 64, 256, 5, 64, 1), 4, 2, 1);
  p.out_pad_h = 1;
  cases.push_back({"grad_weight wgmma, uneven row phases", p});
  // Its narrow tiles (16 output channels, input channels of whole 32s): rows of one float chunk (16-bit on
  // mma.sync: an odd height), padding 1; two input channel tiles in rows of 64 (every type); chunks of two rows
  // (16-bit rows of 32, float rows of 16; padding 1 and 0).
  cases.push_back({"grad_weight wgmma, narrow tiles", square(make(2, 32, 16, 5, 32, 1), 4, 2, 1)});
  cases.push_back({"grad_weight wgmma, narrow tiles, two-row chunks", square(make(2, 32, 16, 6, 32, 1), 4, 2, 1)});
  cases.push_back({"grad_weight wgmma, narrow tiles, two-row float chunks", square(make(3, 32, 16, 4, 16, 1), 4, 2)});
  cases.push_back({"grad_weight wgmma, narrow tiles, two channel tiles", square(make(1, 64, 16, 3, 64, 1), 4, 2)});
  // grad_input on wgmma (where the g pass ran; one group, input channels of whole 64s, output channels of whole
  // 128-byte chunks, four taps per phase, input rows of whole 64s): the cases above of 64-pixel rows, and two
  // column tiles with a ragged row tile (17 rows: tiles of 8) and 96 output channels (float only; the GEMM on
  // mma.sync); one phase of four taps (k2 s1); two phases of a 4 x 2 kernel at stride 2 x 1 (both kernels).
  cases.push_back({"grad_input wgmma, column tiles, ragged row tile", square(make(1, 64, 96, 17, 128, 1), 4, 2, 1)});
  cases.push_back({"grad_input wgmma, one phase (k2 s1)", square(make(1, 64, 64, 9, 64, 1), 2, 1)});
  p = make(1, 64, 128, 7, 64, 1);
  p.kernel_h = 4, p.kernel_w = 2, p.stride_h = 2, p.stride_w = 1, p.pad_h = 1;
  cases.push_back({"wgmma backward, two phases (k4x2 s2x1)", p});
  // grad_input's narrow tiles (16 output channels, input channels of whole 32s, rows of whole 32s): the narrow cases
  // above of such rows, and three row tiles (the last of one row: half an m tile) with two column tiles, stride 2 x 1.
  p = make(2, 32, 16, 17, 64, 1);
  p.kernel_h = 4, p.kernel_w = 2, p.stride_h = 2, p.stride_w = 1, p.pad_w = 1;
  cases.push_back({"grad_input wgmma, narrow tiles, ragged row tile, two phases", p});
  p = make(0, 4, 6, 5, 5, 2);
  p.kernel_h = p.kernel_w = 3, p.stride_h = 2;
  cases.push_back({"empty batch", p});
  return cases;
}

// One case's exception (a CUDA error, a rejected problem) is a failure of that case; the others still run.
template <typename T>
void run_case(const ConvTransposeParams& p, const Epilogue& epi, const CaseOptions& options, test::Rng& rng,
              const std::string& label) {
  try {
    check_case<T>(p, epi, options, rng, label);
  } catch (const std::exception& error) {
    CHECK_MSG(false, label + " " + fused_convt::dtype_name(test::Storage<T>::dtype) + " " + test::describe(p) +
                         ": exception: " + error.what());
  }
}

template <typename T>
void device_matches_cpu(test::Rng& rng, cudaStream_t stream, int random_cases) {
  // float32 runs every problem twice: exact fp32 arithmetic and with TF32 tensor cores allowed.
  const bool is_float = std::is_same<T, float>::value;
  Epilogue epi;
  epi.add_value = -0.3;
  epi.multiply_value = 1.7;
  for (const auto& [name, p] : tiled_cases()) {
    run_case<T>(p, epi, CaseOptions{true, stream, false}, rng, name);
    if (is_float) run_case<T>(p, epi, CaseOptions{true, stream, true}, rng, name);
  }
  // The cp.async forward, which the launcher otherwise takes only before sm_90 (FUSED_CONVT_NO_TMA, tma.cuh),
  // grad_weight and grad_input on mma.sync where the wgmma kernels would run (grad_weight_wgmma.cuh,
  // grad_input_wgmma.cuh), and the pair forward's tiles of both row phases, which float forwards of these sizes
  // would not take (pair_both_row_phases).
  setenv("FUSED_CONVT_NO_TMA", "1", 1);
  setenv("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT", "1", 1);
  setenv("FUSED_CONVT_NO_WGMMA_GRAD_INPUT", "1", 1);
  setenv("FUSED_CONVT_PAIR_BOTH_ROW_PHASES", "1", 1);  // pair tiles of both row phases at stride_h 2, whatever the size
  for (const auto& [name, p] : tiled_cases()) {
    run_case<T>(p, epi, CaseOptions{true, stream, false}, rng, name + " (cp.async)");
    if (is_float) run_case<T>(p, epi, CaseOptions{true, stream, true}, rng, name + " (cp.async)");
  }
  unsetenv("FUSED_CONVT_NO_TMA");
  unsetenv("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT");
  unsetenv("FUSED_CONVT_NO_WGMMA_GRAD_INPUT");
  unsetenv("FUSED_CONVT_PAIR_BOTH_ROW_PHASES");
  for (int i = 0; i < random_cases; ++i) {
    Epilogue random_epi;
    random_epi.enabled = i % 5 != 4;
    random_epi.add_value = rng.uniform(-1.5, 0.5);
    random_epi.multiply_value = rng.uniform(-2.0, 2.0);
    const CaseOptions options{i % 4 != 3, i % 2 ? stream : nullptr, is_float && i % 3 == 1};
    run_case<T>(test::random_params(rng, 12), random_epi, options, rng, "random #" + std::to_string(i));
  }
}

void argument_checks() {
  ConvTransposeParams p;
  p.batch = 1, p.in_channels = 2, p.out_channels = 2, p.in_h = 3, p.in_w = 3, p.kernel_h = p.kernel_w = 2;
  DeviceBuffer buffer(1024);
  BackwardArgs args;
  args.grad_output = args.input = args.weight = buffer.get();
  args.grad_weight = buffer.get();
  bool threw = false;
  try {
    fused_convt::backward_cuda(p, Epilogue{}, fused_convt::DType::Float32, args, CudaContext{});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK_MSG(threw, "backward_cuda without a workspace must throw std::invalid_argument");

  // A workspace sized for a call without grad_weight is too small for one with it: an argument error.
  const size_t small = fused_convt::backward_workspace_bytes(p, fused_convt::DType::Float32, false);
  const size_t full = fused_convt::backward_workspace_bytes(p, fused_convt::DType::Float32, true);
  CHECK_MSG(small < full, "grad_weight's workspace must include its operand copies");
  DeviceBuffer workspace(small);
  args.workspace = workspace.get();
  args.workspace_bytes = workspace.bytes();
  threw = false;
  try {
    fused_convt::backward_cuda(p, Epilogue{}, fused_convt::DType::Float32, args, CudaContext{});
  } catch (const std::invalid_argument& error) {
    threw = std::string(error.what()).find("this call needs") != std::string::npos;
  }
  CHECK_MSG(threw, "backward_cuda with a too-small workspace must throw std::invalid_argument naming the size");
}

}  // namespace

int main() {
  if (fused_convt::cuda_device_count() == 0) {
    std::printf("test_cuda_vs_cpu: no CUDA device visible, skipped\n");
    return 77;
  }
  CHECK(fused_convt::cuda_compiled());
  try {
    cudaDeviceProp properties;
    cuda_ok(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties");
    std::printf("test_cuda_vs_cpu: device 0 is %s (sm_%d%d)\n", properties.name, properties.major, properties.minor);
    cudaStream_t stream = nullptr;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    test::Rng rng(4242);
    device_matches_cpu<float>(rng, stream, 25);
    device_matches_cpu<double>(rng, stream, 25);
    device_matches_cpu<fused_convt::HalfBits>(rng, stream, 25);
    device_matches_cpu<fused_convt::BFloat16Bits>(rng, stream, 25);
    argument_checks();
    CHECK_MSG(nhwc_backward_cases >= 30, "too few backward runs from NHWC grad_output / input: " +
                                             std::to_string(nhwc_backward_cases));
    cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
  } catch (const std::exception& error) {
    CHECK_MSG(false, std::string("exception: ") + error.what());
  }
  return test::summary("test_cuda_vs_cpu");
}
