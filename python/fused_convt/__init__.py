"""fused_convt: ``multiply_value * GELU(min(ConvTranspose2d(x) + add_value, 0))`` as one hand-written kernel
(CUDA and CPU), with its own backward, for PyTorch and C++."""
from . import _C
from .autograd import FusedConvTranspose2dFunction
from .modules import FusedConvTranspose2d
from .ops import conv_transpose2d, conv_transpose2d_fused


def cuda_available() -> bool:
    """True when the native module has CUDA kernels and a CUDA device is visible."""
    return _C.cuda_compiled() and _C.cuda_device_count() > 0


__all__ = [
    "FusedConvTranspose2d",
    "FusedConvTranspose2dFunction",
    "conv_transpose2d",
    "conv_transpose2d_fused",
    "cuda_available",
]
__version__ = "0.1.0"
