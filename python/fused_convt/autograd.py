"""An ``autograd.Function`` over the same custom ops, for code that wants an explicit Function object.
``conv_transpose2d_fused`` already differentiates through ``torch.library.register_autograd``; both paths run
the same forward and backward kernels."""
import torch
from torch.autograd.function import once_differentiable

from ._validation import as_pair, check_conv_args


class FusedConvTranspose2dFunction(torch.autograd.Function):
    """``FusedConvTranspose2dFunction.apply(input, weight, bias, stride, padding, output_padding, groups,
    dilation, add_value, multiply_value, recompute)``; ``bias`` may be None."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                multiply_value, recompute=False):
        conv = [as_pair(v, n) for v, n in ((stride, "stride"), (padding, "padding"),
                                            (output_padding, "output_padding"), (dilation, "dilation"))]
        check_conv_args(input, weight, bias, conv[0], conv[1], conv[2], groups, conv[3], add_value, multiply_value)
        output, grad_factor = torch.ops.fused_convt.conv_transpose2d_fused(
            input, weight, bias, *conv, groups, float(add_value), float(multiply_value), True, not recompute)
        ctx.save_for_backward(input, weight, bias, grad_factor)
        ctx.conv_args = (*conv, groups, float(add_value), float(multiply_value), True)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, bias, grad_factor = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grads = torch.ops.fused_convt.conv_transpose2d_fused_backward(
            grad_output, input, weight, bias, grad_factor, *ctx.conv_args, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 8
