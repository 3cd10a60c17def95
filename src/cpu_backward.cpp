// CPU backward. g = grad_output * grad_factor * multiply_value (factor_scale) is formed on the fly wherever it is read (never stored),
// as in the CUDA kernels. Each result element is owned by one OpenMP task and summed in a fixed order,
// so repeated runs are bitwise equal.
//   grad_input[n, ic, ih, iw]      = sum over oc in ic's group and taps of g[n, oc, oh, ow] * w[ic, oc_local, kh, kw]
//   grad_weight[ic, oc_local, kh, kw] = sum over n, ih, iw of x[n, ic, ih, iw] * g[n, oc, oh, ow]
//   grad_bias[oc]                  = sum over n, oh, ow of g[n, oc, oh, ow]
// with oh = ih*s - p + kh*d (the grad-input TapMap), taps outside the output skipped.
#include <vector>

#include "cpu_axis_taps.h"
#include "cpu_dispatch.h"
#include "fused_convt/api.h"

namespace fused_convt {
namespace {

template <typename T>
struct GradSource {
  using Acc = typename AccumulatorOf<T>::type;
  const T* grad_output;
  const T* grad_factor;
  Acc scale;  // factor_scale
  Acc operator()(int64_t index) const {
    const Acc grad = load_acc(grad_output, index);
    return grad_factor ? grad * (load_acc(grad_factor, index) * scale) : grad;
  }
};

template <typename T>
void backward_typed(const ConvTransposeParams& p, const Epilogue& epi, const BackwardArgs& args) {
  using Acc = typename AccumulatorOf<T>::type;
  const GradSource<T> g{static_cast<const T*>(args.grad_output), static_cast<const T*>(args.grad_factor),
                        Acc(factor_scale(epi))};
  const T* x = static_cast<const T*>(args.input);
  const T* w = static_cast<const T*>(args.weight);
  T* grad_input = static_cast<T*>(args.grad_input);
  T* grad_weight = static_cast<T*>(args.grad_weight);
  T* grad_bias = static_cast<T*>(args.grad_bias);

  const int in_h = int(p.in_h), in_w = int(p.in_w), out_h = int(p.out_h()), out_w = int(p.out_w());
  const AxisTaps rows = collect_axis_taps(grad_input_tap_map(p.stride_h, p.pad_h, p.dil_h), in_h,
                                          int(p.kernel_h), out_h);
  const AxisTaps cols = collect_axis_taps(grad_input_tap_map(p.stride_w, p.pad_w, p.dil_w), in_w,
                                          int(p.kernel_w), out_w);
  const int64_t in_per_group = p.in_channels_per_group(), out_per_group = p.out_channels_per_group();
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t in_plane = int64_t(in_h) * in_w, out_plane = int64_t(out_h) * out_w;

  if (grad_input) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t plane = 0; plane < p.batch * p.in_channels; ++plane) {
      const int64_t n = plane / p.in_channels, ic = plane % p.in_channels;
      const int64_t group = ic / in_per_group;
      for (int ih = 0; ih < in_h; ++ih) {
        for (int iw = 0; iw < in_w; ++iw) {
          Acc acc = 0;
          for (int64_t oc_local = 0; oc_local < out_per_group; ++oc_local) {
            const int64_t g_plane = (n * p.out_channels + group * out_per_group + oc_local) * out_plane;
            const T* w_slice = w + (ic * out_per_group + oc_local) * taps;
            for (int r = rows.begin[ih]; r < rows.begin[ih + 1]; ++r) {
              for (int c = cols.begin[iw]; c < cols.begin[iw + 1]; ++c) {
                acc += g(g_plane + int64_t(rows.source[r]) * out_w + cols.source[c]) *
                       load_acc(w_slice, int64_t(rows.tap[r]) * p.kernel_w + cols.tap[c]);
              }
            }
          }
          store_from_acc(grad_input, plane * in_plane + int64_t(ih) * in_w + iw, acc);
        }
      }
    }
  }

  if (grad_weight) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t pair = 0; pair < p.in_channels * out_per_group; ++pair) {
      const int64_t ic = pair / out_per_group, oc_local = pair % out_per_group;
      const int64_t oc = (ic / in_per_group) * out_per_group + oc_local;
      std::vector<Acc> acc(taps, Acc(0));
      for (int64_t n = 0; n < p.batch; ++n) {
        const int64_t x_plane = (n * p.in_channels + ic) * in_plane;
        const int64_t g_plane = (n * p.out_channels + oc) * out_plane;
        for (int ih = 0; ih < in_h; ++ih) {
          for (int iw = 0; iw < in_w; ++iw) {
            const Acc xv = load_acc(x, x_plane + int64_t(ih) * in_w + iw);
            for (int r = rows.begin[ih]; r < rows.begin[ih + 1]; ++r) {
              for (int c = cols.begin[iw]; c < cols.begin[iw + 1]; ++c) {
                acc[rows.tap[r] * p.kernel_w + cols.tap[c]] +=
                    xv * g(g_plane + int64_t(rows.source[r]) * out_w + cols.source[c]);
              }
            }
          }
        }
      }
      for (int64_t t = 0; t < taps; ++t) store_from_acc(grad_weight, pair * taps + t, acc[t]);
    }
  }

  if (grad_bias) {
#pragma omp parallel for schedule(static)
    for (int64_t oc = 0; oc < p.out_channels; ++oc) {
      Acc acc = 0;
      for (int64_t n = 0; n < p.batch; ++n) {
        const int64_t g_plane = (n * p.out_channels + oc) * out_plane;
        for (int64_t i = 0; i < out_plane; ++i) acc += g(g_plane + i);
      }
      store_from_acc(grad_bias, oc, acc);
    }
  }
}

}  // namespace

void backward_cpu(const ConvTransposeParams& params, const Epilogue& epilogue, DType dtype, const BackwardArgs& args) {
  validate(params);
  if (args.grad_bias && !params.has_bias)
    throw std::invalid_argument("fused_convt: grad_bias requested but params.has_bias is false");
  dispatch_host_dtype(dtype, [&](auto tag) { backward_typed<decltype(tag)>(params, epilogue, args); });
}

}  // namespace fused_convt
