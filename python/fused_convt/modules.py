"""``FusedConvTranspose2d``: ``nn.ConvTranspose2d`` followed by the fused epilogue, as one module.

It subclasses ``nn.ConvTranspose2d``, so parameter names, shapes, initialization and ``state_dict`` are
exactly PyTorch's: a checkpoint of one loads into the other."""
from typing import List, Optional

from torch import Tensor, nn

from .ops import conv_transpose2d_fused


class FusedConvTranspose2d(nn.ConvTranspose2d):
    """``multiply_value * gelu(min(ConvTranspose2d(x) + add_value, 0))``; ``recompute=True`` trades backward
    time for saved memory (see ``conv_transpose2d_fused``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None, *, add_value: float = 0.0, multiply_value: float = 1.0, recompute: bool = False,
                 allow_tf32: Optional[bool] = None):
        if padding_mode != "zeros":
            raise ValueError(f"fused_convt: only padding_mode='zeros' is supported, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self.add_value = float(add_value)
        self.multiply_value = float(multiply_value)
        self.recompute = recompute
        self.allow_tf32 = allow_tf32

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return conv_transpose2d_fused(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                      self.groups, self.dilation, add_value=self.add_value,
                                      multiply_value=self.multiply_value, recompute=self.recompute,
                                      allow_tf32=self.allow_tf32)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", add_value={self.add_value}, multiply_value={self.multiply_value}"
                + (", recompute=True" if self.recompute else ""))
