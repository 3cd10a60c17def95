"""The functional ops and their torch.library registration.

Two custom ops carry all the work, so that torch.compile traces them as single nodes and autograd
goes through our own backward:

* ``fused_convt::conv_transpose2d_fused`` returns ``(output, grad_factor)``. ``grad_factor`` is
  d output / d pre-activation divided by ``multiply_value`` (the backward multiplies it back), written by the
  forward kernel beside the output when a backward will follow (one output-sized tensor, float16 for a float32
  CUDA call with TF32: ``_factor_dtype``), and an empty tensor otherwise or with ``recompute=True``.
* ``fused_convt::conv_transpose2d_fused_backward`` returns ``(grad_input, grad_weight, grad_bias)``
  (empty tensors where ``output_mask`` says a gradient is not needed). With an empty ``grad_factor``
  and the epilogue on, it reruns the forward kernel in factor-only mode into a temporary first.

The native module does not link libtorch: tensors are passed as data pointers plus the problem
description, and CUDA work goes on ``torch.cuda.current_stream()`` of the tensors' device.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from ._validation import as_finite_float, as_groups, as_pair, check_conv_args, output_size

_DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_TAG_DTYPES = {tag: dtype for dtype, tag in _DTYPE_TAGS.items()}


def _factor_dtype(input: Tensor, allow_tf32: bool) -> torch.dtype:
    """grad_factor's dtype: on CUDA the native rule (float16 for float32 with TF32, whose backward multiplies in
    TF32 anyway: half the bytes the training forward writes, the backward reads and the step keeps), else the
    input's."""
    if not input.is_cuda:
        return input.dtype
    return _TAG_DTYPES[_C.grad_factor_dtype(_DTYPE_TAGS[input.dtype], allow_tf32)]


def _params(input: Tensor, weight: Tensor, has_bias: bool, stride, padding, output_padding, dilation, groups):
    return _C.Params(input.shape, weight.shape, stride, padding, output_padding, dilation, groups, has_bias)


# The current stream's raw handle without building a torch.cuda.Stream object (that took 4 us of the ~65 us
# host time of a small forward on the H100 machine); torch's generated code reads it the same way. Where torch
# lacks the function, torch.cuda.current_stream.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _where(t: Tensor) -> Tuple[int, int]:
    """(device index, stream handle) for the native call; (-1, 0) for the CPU."""
    if t.is_cpu:
        return -1, 0
    device = t.device
    if _raw_stream is not None:
        return device.index, _raw_stream(device.index)
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def _output_shape(input: Tensor, weight: Tensor, stride, padding, output_padding, dilation, groups):
    h, w = (
        output_size(input.shape[2 + a], weight.shape[2 + a], stride[a], padding[a], dilation[a], output_padding[a])
        for a in range(2)
    )
    return (input.shape[0], weight.shape[1] * groups, h, w)


def _is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor laid out NHWC and not also NCHW-contiguous (where both hold, e.g. 1 x 1 images or one
    channel, the two layouts are the same memory)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _nchw(t: Tensor) -> Tensor:
    """t NCHW-contiguous. A channels_last CUDA tensor goes through the library's tiled transpose: PyTorch's own
    `.contiguous()` of one (a generic permuted copy, ~1 TB/s in float and ~0.5 in bfloat16 on the H100) was 2.3 ms
    of kb_v1's bf16 channels_last training step."""
    if not (t.is_cuda and _is_channels_last(t)):
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    n, c, h, w = t.shape
    device, stream = _where(t)
    _C.transpose(t.data_ptr(), out.data_ptr(), n, h * w, c, t.element_size(), device, stream)
    return out


def _output_format(input: Tensor) -> torch.memory_format:
    """The output's layout follows the input's, as for PyTorch's convolutions: channels_last in, out."""
    return torch.channels_last if _is_channels_last(input) else torch.contiguous_format


def _writes_channels_last(output: Optional[Tensor]) -> bool:
    """Whether the native forward stores `output` NHWC (None or empty: not written at all)."""
    return output is not None and output.numel() > 0 and not output.is_contiguous()


def _forward_layout(input: Tensor, params, output: Optional[Tensor], grad_factor: Optional[Tensor],
                    allow_tf32: bool) -> Tensor:
    """The input as the native forward call with these outputs reads it: a channels_last tensor in place on the
    CPU, and on CUDA where the kernel takes NHWC as it is (the tensor-core path of float16 / bfloat16 at whole
    16-channel chunks per group; the column-pair forward, float32 with TF32 included, inference and training: no
    transpose at all); else an NCHW-contiguous tensor (a copy if it was not one: `_nchw`)."""
    if _is_channels_last(input) and (not input.is_cuda or _C.forward_call_reads_channels_last(
            params, _DTYPE_TAGS[input.dtype], input.device.index, _ptr(output), _ptr(grad_factor), allow_tf32,
            _writes_channels_last(output))):
        return input
    return _nchw(input)


def _run_forward(input, weight, bias, params, epilogue, output, grad_factor, allow_tf32) -> None:
    """input: NCHW-contiguous, or channels_last as _forward_layout leaves it; output (None or empty: not
    written) NCHW-contiguous or channels_last; grad_factor (likewise optional) NCHW-contiguous."""
    device, stream = _where(input)
    dtype = _DTYPE_TAGS[input.dtype]
    workspace = None
    if device >= 0:
        nbytes = _C.forward_workspace_bytes(params, dtype)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=input.device) if nbytes else None
    _C.forward(params, epilogue, dtype, _ptr(input), _ptr(weight), _ptr(bias), _ptr(output), _ptr(grad_factor),
               _ptr(workspace), allow_tf32, not input.is_contiguous(),
               _writes_channels_last(output),
               device, stream)


def _forward_impl(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    dilation: List[int],
    groups: int,
    add_value: float,
    multiply_value: float,
    apply_epilogue: bool,
    save_grad_factor: bool,
    allow_tf32: bool,
) -> Tuple[Tensor, Tensor]:
    params = _params(input, weight, bias is not None, stride, padding, output_padding, dilation, groups)
    return _forward(params, input, weight, bias, add_value, multiply_value, apply_epilogue, save_grad_factor,
                    allow_tf32)


def _forward(params, input: Tensor, weight: Tensor, bias: Optional[Tensor], add_value: float, multiply_value: float,
             apply_epilogue: bool, save_grad_factor: bool, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    """The forward op's implementation, given `params` (_params of the same call: the conv arguments)."""
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    shape = (params.batch, params.out_channels, params.out_h, params.out_w)
    output, grad_factor = _forward_outputs(input, shape, save_grad_factor and apply_epilogue, allow_tf32)
    if output.numel() > 0:
        epilogue = _C.Epilogue(add_value, multiply_value, apply_epilogue)
        _run_forward(_forward_layout(input, params, output, grad_factor, allow_tf32), weight, bias, params, epilogue,
                     output, grad_factor, allow_tf32)
    return output, grad_factor


def _forward_outputs(input: Tensor, shape, with_factor: bool, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    """The output, in the input's layout (_output_format), and the saved factor (empty unless with_factor) in
    _factor_dtype, NCHW always: the backward's kernels read it so (a channels_last factor would cost them a
    transpose)."""
    # (*shape: torch.empty parses separate sizes faster than a tuple, by a third of its host time.)
    output = torch.empty(*shape, dtype=input.dtype, device=input.device, memory_format=_output_format(input))
    if not with_factor:
        return output, input.new_empty(0)
    return output, torch.empty(*shape, dtype=_factor_dtype(input, allow_tf32), device=input.device)


_forward_op = torch.library.custom_op("fused_convt::conv_transpose2d_fused", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, dilation, groups, add_value, multiply_value,
      apply_epilogue, save_grad_factor, allow_tf32):
    shape = _output_shape(input, weight, stride, padding, output_padding, dilation, groups)
    return _forward_outputs(input, shape, save_grad_factor and apply_epilogue, allow_tf32)


def _check_grad_factor(grad_factor: Tensor, grad_output: Tensor, dtype: torch.dtype) -> None:
    """A saved factor handed to the backward op must be the forward op's: the kernels read it as `dtype` over
    grad_output's extent (another dtype or shape would read wrong values or out of bounds)."""
    if grad_factor.shape != grad_output.shape or grad_factor.dtype != dtype or grad_factor.device != grad_output.device:
        raise ValueError(
            f"fused_convt: grad_factor must be the forward op's second output for this call: shape "
            f"{tuple(grad_output.shape)}, dtype {dtype} on {grad_output.device} (float16 for float32 CUDA calls with "
            f"allow_tf32), or empty to recompute it; got shape {tuple(grad_factor.shape)}, dtype {grad_factor.dtype} "
            f"on {grad_factor.device}")


def _backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    grad_factor: Tensor,
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    dilation: List[int],
    groups: int,
    add_value: float,
    multiply_value: float,
    apply_epilogue: bool,
    allow_tf32: bool,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    params = _params(input, weight, bias is not None, stride, padding, output_padding, dilation, groups)
    return _backward(params, grad_output, input, weight, bias, grad_factor, add_value, multiply_value, apply_epilogue,
                     allow_tf32, output_mask)


def _backward(params, grad_output: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor], grad_factor: Tensor,
              add_value: float, multiply_value: float, apply_epilogue: bool, allow_tf32: bool,
              output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward op's implementation, given `params` (_params of the same call: the conv arguments)."""
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    want_input, want_weight, want_bias = output_mask
    want_bias = want_bias and bias is not None

    # The CUDA backward reads a channels_last grad_output in place where its g pass is the only reader, and a
    # channels_last input where the channels divide evenly (backward_reads_channels_last); elsewhere either is
    # made NCHW first.
    def read_in_place(t: Tensor, grad_output_nhwc: bool, input_nhwc: bool) -> bool:
        return t.is_cuda and _is_channels_last(t) and _C.backward_call_reads_channels_last(
            params, _DTYPE_TAGS[input.dtype], input.device.index, want_input, want_weight, want_bias, allow_tf32,
            grad_output_nhwc, input_nhwc)

    grad_output_nhwc = read_in_place(grad_output, True, False)
    input_nhwc = read_in_place(input, False, True)
    grad_output = grad_output if grad_output_nhwc else _nchw(grad_output)
    input = input if input_nhwc else _nchw(input)
    epilogue = _C.Epilogue(add_value, multiply_value, apply_epilogue)
    if not apply_epilogue:
        grad_factor = None
    elif grad_factor.numel() == 0:
        if grad_output.numel() > 0:
            # recompute=True: rebuild the factor from x and the weights, output not written.
            grad_factor = torch.empty_like(grad_output, dtype=_factor_dtype(input, allow_tf32),
                                           memory_format=torch.contiguous_format)
            _run_forward(_forward_layout(input, params, None, grad_factor, allow_tf32), weight, bias, params,
                         epilogue, None, grad_factor, allow_tf32)
    else:
        _check_grad_factor(grad_factor, grad_output, _factor_dtype(input, allow_tf32))
        grad_factor = grad_factor.contiguous()

    # (NCHW whatever the input's layout: the kernels write grad_input NCHW.)
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if want_input else input.new_empty(0)
    grad_weight = torch.empty_like(weight) if want_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if want_bias else input.new_empty(0)
    if want_input or want_weight or want_bias:
        device, stream = _where(input)
        workspace, nbytes = None, 0
        if device >= 0:
            # grad_weight's channels-last operand copies (about the output's size) only when it is wanted.
            nbytes = _C.backward_workspace_bytes(params, _DTYPE_TAGS[input.dtype], want_weight)
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=input.device)
        _C.backward(params, epilogue, _DTYPE_TAGS[input.dtype], _ptr(grad_output), _ptr(grad_factor), _ptr(input),
                    _ptr(weight), _ptr(grad_input), _ptr(grad_weight), _ptr(grad_bias), _ptr(workspace), nbytes,
                    allow_tf32, grad_output_nhwc, input_nhwc, device, stream)
    return grad_input, grad_weight, grad_bias


_backward_op = torch.library.custom_op("fused_convt::conv_transpose2d_fused_backward", _backward_impl,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad_output, input, weight, bias, grad_factor, stride, padding, output_padding, dilation, groups,
      add_value, multiply_value, apply_epilogue, allow_tf32, output_mask):
    want_input, want_weight, want_bias = output_mask
    return (
        torch.empty_like(input) if want_input else input.new_empty(0),
        torch.empty_like(weight) if want_weight else weight.new_empty(0),
        torch.empty_like(bias) if (want_bias and bias is not None) else input.new_empty(0),
    )


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
# Private predicates of torch's dispatcher, looked up once: on a torch without one of them the direct path is
# never taken (the custom ops always work), rather than failing every call.
_MODE_PREDICATES = tuple(getattr(torch._C, name, None) for name in (
    "_len_torch_dispatch_stack", "_is_torch_function_mode_enabled", "_are_functorch_transforms_active"))
_HAVE_MODE_PREDICATES = all(callable(f) for f in _MODE_PREDICATES)


def _plain_eager(tensors) -> bool:
    """True where calling the op implementations directly is indistinguishable from dispatching the custom
    ops (as long as no autograd has to be recorded): plain CPU/CUDA tensors (or None), no compiling or
    tracing, and no dispatch / function modes or functorch transforms that would want to see the op.
    Skipping torch.library's dispatch and autograd wrappers saves ~120 us of host time per forward+backward,
    which bounds small shapes."""
    if not _HAVE_MODE_PREDICATES or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    dispatch_modes, function_modes, functorch = _MODE_PREDICATES
    if dispatch_modes() > 0 or function_modes() or functorch():
        return False
    # (A loop rather than all() over a generator, and is_cpu / is_cuda rather than t.device.type, which builds a
    # torch.device per tensor: this runs three times per training step.)
    for t in tensors:
        if t is not None and not (type(t) in _PLAIN_TENSOR_TYPES and (t.is_cpu or t.is_cuda)):
            return False
    return True


def _records_autograd(tensors) -> bool:
    """(Tested before _plain_eager, which costs more: so it meets any argument, a non-tensor too. A loop, which
    stops at the first such tensor, rather than any() over a generator: a third of the host time.)"""
    if torch.is_grad_enabled():
        for t in tensors:
            if isinstance(t, Tensor) and t.requires_grad:
                return True
    return False


def run_forward_op(args: "PreparedArgs", apply_epilogue: bool, save_grad_factor: bool, allow_tf32: bool):
    """``torch.ops.fused_convt.conv_transpose2d_fused`` of prepare_args' arguments, its implementation called
    directly where that is the same. Returns (output, grad_factor, params): params the native problem description
    where the call was direct (for run_backward_op, rather than building it again), else None."""
    tensors = (args.input, args.weight, args.bias)
    rest = (args.add_value, args.multiply_value, apply_epilogue, save_grad_factor, allow_tf32)  # (after the conv)
    if _records_autograd(tensors) or not _plain_eager(tensors):  # (the cheaper test first)
        return (*_forward_op(*tensors, *args.conv, args.groups, *rest), None)
    params = _params(args.input, args.weight, args.bias is not None, *args.conv, args.groups)
    return (*_forward(params, *tensors, *rest), params)


def run_backward_op(params, grad_output: Tensor, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                    grad_factor: Tensor, conv, groups: int, add_value: float, multiply_value: float,
                    allow_tf32: bool, output_mask: List[bool]):
    """The backward of run_forward_op's call (epilogue on; conv as in PreparedArgs):
    ``torch.ops.fused_convt.conv_transpose2d_fused_backward``, its implementation called directly where that is
    the same, with run_forward_op's params (None: built here). With create_graph (grad mode on in backward) the
    op runs, so double backward fails clearly."""
    tensors = (grad_output, input, weight, bias, grad_factor)
    rest = (add_value, multiply_value, True, allow_tf32, output_mask)  # (the op's arguments after the conv's)
    if _records_autograd(tensors) or not _plain_eager(tensors):
        return _backward_op(*tensors, *conv, groups, *rest)
    if params is None:
        params = _params(input, weight, bias is not None, *conv, groups)
    return _backward(params, *tensors, *rest)


def _setup_forward_context(ctx, inputs, output):
    (input, weight, bias, stride, padding, output_padding, dilation, groups, add_value, multiply_value,
     apply_epilogue, _save_grad_factor, allow_tf32) = inputs
    grad_factor = output[1]
    ctx.mark_non_differentiable(grad_factor)
    ctx.save_for_backward(input, weight, bias, grad_factor)
    ctx.conv_args = (stride, padding, output_padding, dilation, groups, add_value, multiply_value, apply_epilogue,
                     allow_tf32)


def _forward_op_backward(ctx, grad_output, _grad_of_grad_factor):
    input, weight, bias, grad_factor = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    grad_input, grad_weight, grad_bias = _backward_op(grad_output, input, weight, bias, grad_factor,
                                                      *ctx.conv_args, mask)
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None, grad_bias if mask[2] else None,
            None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd(_forward_op, _forward_op_backward, setup_context=_setup_forward_context)


def _setup_backward_context(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fused_convt: double backward (gradients of gradients) is not supported; "
        "use torch.nn.functional.conv_transpose2d and the PyTorch composite for higher-order derivatives"
    )


torch.library.register_autograd(_backward_op, _no_double_backward, setup_context=_setup_backward_context)


class PreparedArgs(NamedTuple):
    input: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    conv: Tuple[List[int], List[int], List[int], List[int]]  # stride, padding, output_padding, dilation
    groups: int
    add_value: float
    multiply_value: float
    unbatched: bool


def prepare_args(input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                 multiply_value) -> PreparedArgs:
    """Normalizes the public arguments (ints or pairs, NumPy scalars, unbatched 3-D input, autocast) and
    validates them once, before any launch. Shared by the functional ops and FusedConvTranspose2dFunction."""
    conv = (as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(output_padding, "output_padding"),
            as_pair(dilation, "dilation"))
    groups = as_groups(groups)
    add_value, multiply_value = as_finite_float(add_value, "add_value"), as_finite_float(multiply_value,
                                                                                        "multiply_value")
    unbatched = isinstance(input, Tensor) and input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    input, weight, bias = _autocast(input, weight, bias)
    check_conv_args(input, weight, bias, conv[0], conv[1], conv[2], groups, conv[3])
    return PreparedArgs(input, weight, bias, conv, groups, add_value, multiply_value, unbatched)


def _autocast(input, weight, bias):
    """Inside torch.autocast the op runs in the autocast dtype, as PyTorch's convolutions do (they are on
    autocast's lower-precision list): floating-point tensors are cast (differentiably) to that dtype."""
    if not isinstance(input, Tensor) or not (input.is_cpu or input.is_cuda):
        return input, weight, bias
    device_type = "cuda" if input.is_cuda else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(input), cast(weight), cast(bias)


def resolve_allow_tf32(allow_tf32: Optional[bool]) -> bool:
    """None follows PyTorch's own switch for convolutions, ``torch.backends.cudnn.allow_tf32`` (default True)."""
    return torch.backends.cudnn.allow_tf32 if allow_tf32 is None else bool(allow_tf32)


def _call(input, weight, bias, stride, padding, output_padding, groups, dilation, add_value, multiply_value,
          apply_epilogue, recompute, allow_tf32):
    if apply_epilogue and _records_autograd((input, weight, bias)) and _plain_eager((input, weight, bias)):
        # The explicit autograd.Function over the op implementations: same kernels, less host time than
        # the custom op's registered autograd (which torch.compile, export and dispatch modes still use).
        # (Imported here, as autograd imports this module; the module rather than the class: half the host time.)
        from . import autograd
        return autograd.FusedConvTranspose2dFunction.apply(input, weight, bias, stride, padding, output_padding,
                                                           groups, dilation, add_value, multiply_value, recompute,
                                                           allow_tf32)
    args = prepare_args(input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                        multiply_value)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (args.input, args.weight, args.bias))
    output, _, _ = run_forward_op(args, apply_epilogue, needs_grad and not recompute, resolve_allow_tf32(allow_tf32))
    return output.squeeze(0) if args.unbatched else output


def conv_transpose2d_fused(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                           output_padding=0, groups: int = 1, dilation=1, *, add_value: float = 0.0,
                           multiply_value: float = 1.0, recompute: bool = False,
                           allow_tf32: Optional[bool] = None) -> Tensor:
    """``multiply_value * gelu(min(conv_transpose2d(input, weight, bias, ...) + add_value, 0))`` in one kernel.

    Arguments follow ``torch.nn.functional.conv_transpose2d``. With ``recompute=True`` the forward saves
    only the inputs for backward and the backward recomputes the pre-activation (less memory, more time).
    ``allow_tf32`` (float32 on CUDA only): TF32 tensor cores; None follows ``torch.backends.cudnn.allow_tf32``.
    """
    return _call(input, weight, bias, stride, padding, output_padding, groups, dilation, add_value,
                 multiply_value, True, recompute, allow_tf32)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, allow_tf32: Optional[bool] = None) -> Tensor:
    """Plain transposed convolution (identity epilogue): a drop-in for ``torch.nn.functional.conv_transpose2d``."""
    return _call(input, weight, bias, stride, padding, output_padding, groups, dilation, 0.0, 1.0, False, False,
                 allow_tf32)
