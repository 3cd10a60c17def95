"""An ``autograd.Function`` over the same custom ops, for code that wants an explicit Function object.
``conv_transpose2d_fused`` already differentiates through ``torch.library.register_autograd``; both paths run
the same forward and backward kernels, and both refuse double backward with the same message (the backward
op's own autograd formula raises)."""
import torch

from .ops import prepare_args, resolve_allow_tf32


class FusedConvTranspose2dFunction(torch.autograd.Function):
    """``FusedConvTranspose2dFunction.apply(input, weight, bias, stride, padding, output_padding, groups,
    dilation, add_value, multiply_value, recompute, allow_tf32)``; ``bias`` may be None and ``allow_tf32`` None
    (follow ``torch.backends.cudnn.allow_tf32``)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                multiply_value, recompute=False, allow_tf32=None):
        args = prepare_args(input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                            multiply_value)
        tf32 = resolve_allow_tf32(allow_tf32)
        output, grad_factor = torch.ops.fused_convt.conv_transpose2d_fused(
            args.input, args.weight, args.bias, *args.conv, args.groups, args.add_value, args.multiply_value, True,
            not recompute, tf32)
        ctx.save_for_backward(args.input, args.weight, args.bias, grad_factor)
        ctx.input_dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.conv_args = (*args.conv, args.groups, args.add_value, args.multiply_value, True, tf32)
        ctx.unbatched = args.unbatched
        return output.squeeze(0) if args.unbatched else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, grad_factor = ctx.saved_tensors
        if ctx.unbatched:
            grad_output = grad_output.unsqueeze(0)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = torch.ops.fused_convt.conv_transpose2d_fused_backward(
            grad_output, input, weight, bias, grad_factor, *ctx.conv_args, mask)
        if ctx.unbatched and mask[0]:
            grad_input = grad_input.squeeze(0)
        # Under autocast the Function computed in a lower precision: return gradients in the inputs' dtypes.
        grads = (grad_input, grad_weight, grad_bias)
        return tuple(g.to(dtype) if m else None for g, m, dtype in zip(grads, mask, ctx.input_dtypes)) + (None,) * 9
