"""An ``autograd.Function`` over the same custom ops. ``conv_transpose2d_fused`` uses it in plain eager mode
(it calls the op implementations directly there, saving host time) and differentiates through
``torch.library.register_autograd`` elsewhere (torch.compile, export, dispatch modes); both paths run the
same forward and backward kernels, and both refuse double backward with the same message (under
create_graph the backward op itself runs, and its autograd formula raises)."""
import torch

from .ops import prepare_args, resolve_allow_tf32, run_backward_op, run_forward_op


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
        output, grad_factor, ctx.params = run_forward_op(args, True, not recompute, tf32)
        ctx.save_for_backward(args.input, args.weight, args.bias, grad_factor)
        ctx.input_dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.call_args = (args.conv, args.groups, args.add_value, args.multiply_value, tf32)
        ctx.unbatched = args.unbatched
        return output.squeeze(0) if args.unbatched else output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, grad_factor = ctx.saved_tensors
        if ctx.unbatched:
            grad_output = grad_output.unsqueeze(0)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = run_backward_op(
            ctx.params, grad_output, input, weight, bias, grad_factor, *ctx.call_args, mask)
        if ctx.unbatched and mask[0]:
            grad_input = grad_input.squeeze(0)
        # Under autocast the Function computed in a lower precision: return gradients in the inputs' dtypes.
        grads = (grad_input, grad_weight, grad_bias)
        # (.to only where the dtype differs: it returns the tensor itself otherwise, at a dispatch's host time.)
        return tuple((g if g.dtype == dtype else g.to(dtype)) if m else None
                     for g, m, dtype in zip(grads, mask, ctx.input_dtypes)) + (None,) * 9
