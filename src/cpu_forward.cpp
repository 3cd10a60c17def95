// CPU forward: the gather form of the transposed convolution with the epilogue applied per output.
// One (image, output channel) plane per OpenMP task; within a plane each output gathers the taps that
// land on it (TapMap), accumulating in float (double for double) like the CUDA kernels. The input is NCHW or,
// with ForwardArgs::input_channels_last, NHWC, and so is the output (output_channels_last; grad_factor stays
// NCHW): only strides differ.
#include "cpu_axis_taps.h"
#include "cpu_dispatch.h"
#include "fused_convt/api.h"
#include "fused_convt/tap_map.h"

namespace fused_convt {
namespace {

template <typename T>
void forward_typed(const ConvTransposeParams& p, const Epilogue& epi, const ForwardArgs& args) {
  using Acc = typename AccumulatorOf<T>::type;
  const T* x = static_cast<const T*>(args.input);
  const T* w = static_cast<const T*>(args.weight);
  const T* bias = static_cast<const T*>(args.bias);
  T* out = static_cast<T*>(args.output);
  T* factor = static_cast<T*>(args.grad_factor);

  const int out_h = static_cast<int>(p.out_h()), out_w = static_cast<int>(p.out_w());
  const AxisTaps rows = collect_axis_taps(forward_tap_map(p.stride_h, p.pad_h, p.dil_h), out_h,
                                          static_cast<int>(p.kernel_h), static_cast<int>(p.in_h));
  const AxisTaps cols = collect_axis_taps(forward_tap_map(p.stride_w, p.pad_w, p.dil_w), out_w,
                                          static_cast<int>(p.kernel_w), static_cast<int>(p.in_w));
  const int64_t in_per_group = p.in_channels_per_group(), out_per_group = p.out_channels_per_group();
  const int64_t taps = p.kernel_h * p.kernel_w, in_plane = p.in_h * p.in_w;
  const int64_t out_plane = int64_t(out_h) * out_w;
  const int64_t channel_stride = args.input_channels_last ? 1 : in_plane;
  const int64_t pixel_stride = args.input_channels_last ? p.in_channels : 1;
  const int64_t planes = p.batch * p.out_channels;
  const EpilogueConstants<Acc> epilogue(epi);

#pragma omp parallel for schedule(dynamic)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const int64_t n = plane / p.out_channels, oc = plane % p.out_channels;
    const int64_t group = oc / out_per_group, oc_local = oc % out_per_group;
    const Acc bias_value = bias ? load_acc(bias, oc) : Acc(0);
    for (int oh = 0; oh < out_h; ++oh) {
      for (int ow = 0; ow < out_w; ++ow) {
        Acc acc = 0;
        for (int64_t ic_local = 0; ic_local < in_per_group; ++ic_local) {
          const int64_t ic = group * in_per_group + ic_local;
          const T* x_plane = x + n * p.in_channels * in_plane + ic * channel_stride;
          const T* w_slice = w + (ic * out_per_group + oc_local) * taps;
          for (int r = rows.begin[oh]; r < rows.begin[oh + 1]; ++r) {
            for (int c = cols.begin[ow]; c < cols.begin[ow + 1]; ++c) {
              acc += load_acc(x_plane, (int64_t(rows.source[r]) * p.in_w + cols.source[c]) * pixel_stride) *
                     load_acc(w_slice, int64_t(rows.tap[r]) * p.kernel_w + cols.tap[c]);
            }
          }
        }
        const int64_t pixel = int64_t(oh) * out_w + ow;
        const int64_t factor_index = plane * out_plane + pixel;  // NCHW always
        const int64_t index = args.output_channels_last ? (n * out_plane + pixel) * p.out_channels + oc : factor_index;
        const Acc pre = acc + bias_value;
        if (factor) {
          const EpilogueOutputs<Acc> both = apply_epilogue_with_factor(epilogue, pre);
          if (out) store_from_acc(out, index, both.value);
          store_from_acc(factor, factor_index, both.factor);
        } else if (out) {
          store_from_acc(out, index, apply_epilogue(epilogue, pre));
        }
      }
    }
  }
}

}  // namespace

void forward_cpu(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype,
                 const ForwardArgs& args) {
  validate(params);
  if (params.has_bias != (args.bias != nullptr))
    throw std::invalid_argument("fused_convt: bias pointer must be given exactly when params.has_bias");
  if (params.output_numel() == 0) return;
  dispatch_host_dtype(dtype, [&](auto tag) { forward_typed<decltype(tag)>(params, epilogue, args); });
}

}  // namespace fused_convt
