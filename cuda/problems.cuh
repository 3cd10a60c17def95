// Maps a ConvTransposeParams to the gather problems of the forward pass and of grad_input.
#pragma once

#include "gather_conv.cuh"

namespace fused_convt {

inline GatherProblem gather_problem_common(const ConvTransposeParams& p) {
  GatherProblem pr{};
  pr.batch = p.batch;
  pr.groups = int(p.groups);
  pr.kernel_h = int(p.kernel_h);
  pr.kernel_w = int(p.kernel_w);
  pr.weight_group_stride = p.in_channels_per_group() * p.out_channels_per_group() * p.kernel_h * p.kernel_w;
  return pr;
}

// Forward: destination = output [N, C_out, H_out, W_out], source = input [N, C_in, H, W].
inline GatherProblem forward_gather_problem(const ConvTransposeParams& p) {
  GatherProblem pr = gather_problem_common(p);
  pr.dst_channels = int(p.out_channels);
  pr.dst_h = int(p.out_h());
  pr.dst_w = int(p.out_w());
  pr.src_channels = int(p.in_channels);
  pr.src_h = int(p.in_h);
  pr.src_w = int(p.in_w);
  pr.dst_per_group = int(p.out_channels_per_group());
  pr.src_per_group = int(p.in_channels_per_group());
  pr.map_h = forward_tap_map(p.stride_h, p.pad_h, p.dil_h);
  pr.map_w = forward_tap_map(p.stride_w, p.pad_w, p.dil_w);
  pr.weight_src_stride = int(p.out_channels_per_group() * p.kernel_h * p.kernel_w);
  pr.weight_dst_stride = int(p.kernel_h * p.kernel_w);
  return pr;
}

// grad_input: destination = grad_input [N, C_in, H, W], source = g [N, C_out, H_out, W_out].
inline GatherProblem grad_input_gather_problem(const ConvTransposeParams& p) {
  GatherProblem pr = gather_problem_common(p);
  pr.dst_channels = int(p.in_channels);
  pr.dst_h = int(p.in_h);
  pr.dst_w = int(p.in_w);
  pr.src_channels = int(p.out_channels);
  pr.src_h = int(p.out_h());
  pr.src_w = int(p.out_w());
  pr.dst_per_group = int(p.in_channels_per_group());
  pr.src_per_group = int(p.out_channels_per_group());
  pr.map_h = grad_input_tap_map(p.stride_h, p.pad_h, p.dil_h);
  pr.map_w = grad_input_tap_map(p.stride_w, p.pad_w, p.dil_w);
  pr.weight_src_stride = int(p.kernel_h * p.kernel_w);
  pr.weight_dst_stride = int(p.out_channels_per_group() * p.kernel_h * p.kernel_w);
  return pr;
}

}  // namespace fused_convt
