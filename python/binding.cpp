// pybind11 module fused_convt._C: a thin layer over include/fused_convt/api.h. It does not link libtorch:
// Python passes data pointers (as integers), the problem description, a dtype tag and, for CUDA, the
// device index and torch's current stream handle. std::invalid_argument becomes ValueError and
// std::runtime_error becomes RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "fused_convt/api.h"

namespace py = pybind11;
using namespace fused_convt;

namespace {

template <typename T = void>
T* as_ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

void forward(const ConvTransposeParams& params, const Epilogue& epilogue, int dtype, std::uintptr_t input,
             std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t output, std::uintptr_t grad_factor,
             std::uintptr_t workspace, bool allow_tf32, bool input_channels_last, bool output_channels_last,
             int device, std::uintptr_t stream) {
  const ForwardArgs args{as_ptr(input),       as_ptr(weight),    as_ptr(bias),        as_ptr(output),
                         as_ptr(grad_factor), as_ptr(workspace), allow_tf32,          input_channels_last,
                         output_channels_last};
  if (device < 0) {
    forward_cpu(params, epilogue, static_cast<DType>(dtype), args);
  } else {
    forward_cuda(params, epilogue, static_cast<DType>(dtype), args, CudaContext{device, as_ptr(stream)});
  }
}

void backward(const ConvTransposeParams& params, const Epilogue& epilogue, int dtype, std::uintptr_t grad_output,
              std::uintptr_t grad_factor,
              std::uintptr_t input, std::uintptr_t weight, std::uintptr_t grad_input, std::uintptr_t grad_weight,
              std::uintptr_t grad_bias, std::uintptr_t workspace, std::size_t workspace_bytes, bool allow_tf32,
              bool grad_output_channels_last, bool input_channels_last, int device, std::uintptr_t stream) {
  const BackwardArgs args{as_ptr(grad_output), as_ptr(grad_factor), as_ptr(input),     as_ptr(weight),
                          as_ptr(grad_input),  as_ptr(grad_weight), as_ptr(grad_bias), as_ptr(workspace),
                          workspace_bytes,     allow_tf32,          grad_output_channels_last, input_channels_last};
  if (device < 0) {
    backward_cpu(params, epilogue, static_cast<DType>(dtype), args);
  } else {
    backward_cuda(params, epilogue, static_cast<DType>(dtype), args, CudaContext{device, as_ptr(stream)});
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_convt native kernels (CPU and CUDA), called by fused_convt.ops";

  py::class_<ConvTransposeParams>(m, "Params")
      .def(py::init<>())
      // The whole description in one call, from the tensors' shapes (input [N, C_in, H, W], weight
      // [C_in, C_out/groups, kH, kW]) and the (h, w) pairs: setting the fields one by one was a dozen round trips
      // on every forward and backward, which bound small shapes.
      .def(py::init([](const std::array<int64_t, 4>& input_shape, const std::array<int64_t, 4>& weight_shape,
                       const std::array<int64_t, 2>& stride, const std::array<int64_t, 2>& padding,
                       const std::array<int64_t, 2>& output_padding, const std::array<int64_t, 2>& dilation,
                       int64_t groups, bool has_bias) {
             ConvTransposeParams p;
             p.batch = input_shape[0];
             p.in_channels = input_shape[1];
             p.in_h = input_shape[2];
             p.in_w = input_shape[3];
             p.out_channels = weight_shape[1] * groups;
             p.kernel_h = weight_shape[2];
             p.kernel_w = weight_shape[3];
             p.stride_h = stride[0];
             p.stride_w = stride[1];
             p.pad_h = padding[0];
             p.pad_w = padding[1];
             p.out_pad_h = output_padding[0];
             p.out_pad_w = output_padding[1];
             p.dil_h = dilation[0];
             p.dil_w = dilation[1];
             p.groups = groups;
             p.has_bias = has_bias;
             return p;
           }),
           py::arg("input_shape"), py::arg("weight_shape"), py::arg("stride"), py::arg("padding"),
           py::arg("output_padding"), py::arg("dilation"), py::arg("groups"), py::arg("has_bias"))
      .def_readwrite("batch", &ConvTransposeParams::batch)
      .def_readwrite("in_channels", &ConvTransposeParams::in_channels)
      .def_readwrite("in_h", &ConvTransposeParams::in_h)
      .def_readwrite("in_w", &ConvTransposeParams::in_w)
      .def_readwrite("out_channels", &ConvTransposeParams::out_channels)
      .def_readwrite("kernel_h", &ConvTransposeParams::kernel_h)
      .def_readwrite("kernel_w", &ConvTransposeParams::kernel_w)
      .def_readwrite("stride_h", &ConvTransposeParams::stride_h)
      .def_readwrite("stride_w", &ConvTransposeParams::stride_w)
      .def_readwrite("pad_h", &ConvTransposeParams::pad_h)
      .def_readwrite("pad_w", &ConvTransposeParams::pad_w)
      .def_readwrite("out_pad_h", &ConvTransposeParams::out_pad_h)
      .def_readwrite("out_pad_w", &ConvTransposeParams::out_pad_w)
      .def_readwrite("dil_h", &ConvTransposeParams::dil_h)
      .def_readwrite("dil_w", &ConvTransposeParams::dil_w)
      .def_readwrite("groups", &ConvTransposeParams::groups)
      .def_readwrite("has_bias", &ConvTransposeParams::has_bias)
      .def_property_readonly("out_h", &ConvTransposeParams::out_h)
      .def_property_readonly("out_w", &ConvTransposeParams::out_w);

  py::class_<Epilogue>(m, "Epilogue")
      .def(py::init([](double add_value, double multiply_value, bool enabled) {
             return Epilogue{add_value, multiply_value, enabled};
           }),
           py::arg("add_value") = 0.0, py::arg("multiply_value") = 1.0, py::arg("enabled") = true)
      .def_readwrite("add_value", &Epilogue::add_value)
      .def_readwrite("multiply_value", &Epilogue::multiply_value)
      .def_readwrite("enabled", &Epilogue::enabled);

  m.def("validate", &validate, "Raise ValueError if the problem description is invalid");
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("forward_reads_channels_last", [](const ConvTransposeParams& params, int dtype, int device) {
    return forward_reads_channels_last(params, DType(dtype), device);
  });
  // For one call: the pointers (integers, 0 for none) of the forward call that follows, only tested for null.
  m.def("forward_call_reads_channels_last",
        [](const ConvTransposeParams& params, int dtype, int device, std::uintptr_t output,
           std::uintptr_t grad_factor, bool allow_tf32, bool output_channels_last) {
          ForwardArgs call;
          call.output = as_ptr<void>(output);
          call.grad_factor = as_ptr<void>(grad_factor);
          call.allow_tf32 = allow_tf32;
          call.output_channels_last = output_channels_last;
          return forward_reads_channels_last(params, DType(dtype), device, call);
        });
  // For one backward call: which gradients it computes (flags), its precision and which of grad_output and input
  // would be passed NHWC.
  m.def("backward_call_reads_channels_last",
        [](const ConvTransposeParams& params, int dtype, int device, bool grad_input, bool grad_weight, bool grad_bias,
           bool allow_tf32, bool grad_output_channels_last, bool input_channels_last) {
          BackwardArgs call;
          call.grad_output_channels_last = grad_output_channels_last;
          call.input_channels_last = input_channels_last;
          int dummy = 0;  // non-null pointers stand for the wanted gradients
          call.grad_input = grad_input ? &dummy : nullptr;
          call.grad_weight = grad_weight ? &dummy : nullptr;
          call.grad_bias = grad_bias ? &dummy : nullptr;
          call.allow_tf32 = allow_tf32;
          return backward_reads_channels_last(params, DType(dtype), device, call);
        });
  m.def("grad_factor_dtype", [](int dtype, bool allow_tf32) { return int(grad_factor_dtype(DType(dtype), allow_tf32)); },
        "The dtype tag of grad_factor on CUDA (float16 for float32 with TF32, else the call's)");
  m.def("forward_workspace_bytes",
        [](const ConvTransposeParams& params, int dtype) { return forward_workspace_bytes(params, DType(dtype)); });
  m.def("backward_workspace_bytes",
        [](const ConvTransposeParams& params, int dtype, bool grad_weight) {
          return backward_workspace_bytes(params, DType(dtype), grad_weight);
        },
        py::arg("params"), py::arg("dtype"), py::arg("grad_weight") = true);
  m.def("transpose",
        [](std::uintptr_t src, std::uintptr_t dst, std::int64_t batch, std::int64_t rows, std::int64_t cols,
           int elem_bytes, int device, std::uintptr_t stream) {
          transpose_cuda(as_ptr<const void>(src), as_ptr(dst), batch, rows, cols, elem_bytes,
                         CudaContext{device, as_ptr(stream)});
        },
        "[batch][rows][cols] -> [batch][cols][rows] on a CUDA device", py::call_guard<py::gil_scoped_release>());
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  // The shared epilogue math in double, so Python tests check the very functions the kernels use.
  m.def("epilogue_value", &epilogue_from_preactivation<double>, py::arg("u"), py::arg("multiply_value"));
  m.def("epilogue_derivative", &epilogue_derivative<double>, py::arg("u"), py::arg("multiply_value"));
}
