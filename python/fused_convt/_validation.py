"""Argument checks of the public ops: run once, before any kernel launch, with messages that name the
argument, its value and what was expected. The C++ side validates the same problem again (a C++ caller
has no Python in front of it); these checks exist so Python users get a specific message first."""
import math
import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

try:
    from numpy import bool_ as np_bool
except ImportError:  # numpy is optional
    np_bool = bool

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MAX = 2**31 - 1

IntOrPair = Union[int, Sequence[int]]


def _as_int(value, name: str, expected: str = "an int or a pair of ints") -> int:
    """Python and NumPy integers (not bools, not floats) as an int."""
    if type(value) is int:  # the common case first: these checks run on every call (host time bounds small shapes)
        return value
    if isinstance(value, (bool, np_bool)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"fused_convt: {name} must be {expected}, got {value!r}")
    return int(value)


def as_pair(value: IntOrPair, name: str) -> List[int]:
    """An int or a 1/2-sequence of ints as a [h, w] list."""
    if isinstance(value, (tuple, list)) and len(value) in (1, 2):
        return [_as_int(value[0], name), _as_int(value[-1], name)]
    return [_as_int(value, name)] * 2


def as_groups(value) -> int:
    return _as_int(value, "groups", "a positive int")


def as_finite_float(value, name: str) -> float:
    """add_value / multiply_value: any real number (Python or NumPy) that is finite as a float."""
    if type(value) is float and math.isfinite(value):
        return value
    if isinstance(value, (bool, np_bool)) or not isinstance(value, numbers.Real):
        raise TypeError(f"fused_convt: {name} must be a finite float, got {value!r}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ValueError(f"fused_convt: {name} must be a finite float, got {value!r}")
    return as_float


def output_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int, output_padding: int):
    """(in - 1)*s - 2p + d*(k - 1) + op + 1, the same formula as include/fused_convt/params.h.
    Kept in Python too because fake (meta) kernels must compute it on symbolic sizes."""
    return (in_size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def check_conv_args(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    groups: int,
    dilation: List[int],
) -> None:
    """Checks tensors and (already normalized) convolution arguments; raises before any launch. The common valid
    call returns after _plainly_valid."""
    if _plainly_valid(input, weight, bias, stride, padding, output_padding, groups, dilation):
        return
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_convt: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"fused_convt: bias must be a torch.Tensor or None, got {type(bias).__name__}")

    dtype, device = input.dtype, input.device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_convt: input dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"fused_convt: {name} dtype {t.dtype} must match input dtype {dtype}")

    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(
                f"fused_convt: all tensors must be on one device; input is on {device}, {name} on {t.device}"
            )
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"fused_convt: tensors must be on a CPU or CUDA device, got {device}")

    input_shape, weight_shape = input.shape, weight.shape
    if len(input_shape) != 4:
        raise ValueError(
            f"fused_convt: input must be 4-D [N, C_in, H, W] (or 3-D unbatched), got shape {tuple(input_shape)}"
        )
    if len(weight_shape) != 4:
        raise ValueError(
            f"fused_convt: weight must be 4-D [C_in, C_out/groups, kH, kW], got shape {tuple(weight_shape)}"
        )
    if groups <= 0:
        raise ValueError(f"fused_convt: groups must be a positive int, got {groups!r}")
    _, in_channels, in_h, in_w = input_shape
    weight_in_channels, out_channels_per_group, kernel_h, kernel_w = weight_shape
    if weight_in_channels != in_channels:
        raise ValueError(
            f"fused_convt: weight.shape[0] ({weight_in_channels}) must equal input channels ({in_channels})"
        )
    if in_channels % groups != 0:
        raise ValueError(f"fused_convt: in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels_per_group <= 0 or min(kernel_h, kernel_w) <= 0:
        raise ValueError(f"fused_convt: weight must have non-empty dims 1-3, got shape {tuple(weight_shape)}")
    out_channels = out_channels_per_group * groups
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_channels):
        raise ValueError(
            f"fused_convt: bias must have shape [{out_channels}] (out_channels), got {tuple(bias.shape)}"
        )
    if in_h <= 0 or in_w <= 0 or in_channels <= 0:
        raise ValueError(f"fused_convt: input channels, height and width must be > 0, got shape {tuple(input_shape)}")

    for name, pair, low in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0),
                            ("output_padding", output_padding, 0)):
        if min(pair) < low:
            raise ValueError(f"fused_convt: {name} must be >= {low} in each dimension, got {tuple(pair)}")
    for axis in range(2):
        if output_padding[axis] >= stride[axis] and output_padding[axis] >= dilation[axis]:
            raise ValueError(
                f"fused_convt: output_padding[{axis}] = {output_padding[axis]} must be smaller than "
                f"stride[{axis}] ({stride[axis]}) or dilation[{axis}] ({dilation[axis]})"
            )
    out_hw = (output_size(in_h, kernel_h, stride[0], padding[0], dilation[0], output_padding[0]),
              output_size(in_w, kernel_w, stride[1], padding[1], dilation[1], output_padding[1]))
    if min(out_hw) <= 0:
        raise ValueError(f"fused_convt: padding {tuple(padding)} leaves an empty output (computed size {out_hw})")
    if out_hw[0] * out_hw[1] > _INT32_MAX or in_h * in_w > _INT32_MAX:
        raise ValueError(f"fused_convt: one image plane must have fewer than 2^31 elements, got output {out_hw}")
    if weight.numel() > _INT32_MAX:
        raise ValueError(f"fused_convt: weight must have fewer than 2^31 elements, got {weight.numel()}")


def _plainly_valid(input, weight, bias, stride, padding, output_padding, groups, dilation) -> bool:
    """Whether every check of check_conv_args passes, tested for CPU and CUDA tensors in one expression without
    the checks' loops and messages: half their host time, and they run on every call (host time bounds small
    shapes). False sends the call through the checks, which name what is wrong."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
            and input.dim() == 4 and weight.dim() == 4):
        return False
    dtype, device = input.dtype, input.device
    if not (dtype in SUPPORTED_DTYPES and (input.is_cpu or input.is_cuda) and weight.dtype == dtype
            and weight.device == device):
        return False
    _, in_channels, in_h, in_w = input.shape
    weight_in_channels, out_channels_per_group, kernel_h, kernel_w = weight.shape
    if bias is not None and not (bias.dtype == dtype and bias.device == device
                                 and bias.shape == (out_channels_per_group * groups,)):
        return False
    (stride_h, stride_w), (pad_h, pad_w), (out_pad_h, out_pad_w), (dil_h, dil_w) = (
        stride, padding, output_padding, dilation)
    out_h = output_size(in_h, kernel_h, stride_h, pad_h, dil_h, out_pad_h)
    out_w = output_size(in_w, kernel_w, stride_w, pad_w, dil_w, out_pad_w)
    return (groups > 0 and weight_in_channels == in_channels > 0 and in_channels % groups == 0
            and out_channels_per_group > 0 and kernel_h > 0 and kernel_w > 0 and in_h > 0 and in_w > 0
            and stride_h > 0 and stride_w > 0 and dil_h > 0 and dil_w > 0
            and pad_h >= 0 and pad_w >= 0 and out_pad_h >= 0 and out_pad_w >= 0
            and (out_pad_h < stride_h or out_pad_h < dil_h) and (out_pad_w < stride_w or out_pad_w < dil_w)
            and out_h > 0 and out_w > 0 and out_h * out_w <= _INT32_MAX and in_h * in_w <= _INT32_MAX
            and weight.numel() <= _INT32_MAX)
