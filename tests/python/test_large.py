"""Tensors past 2^31 elements: the kernels index within one image in 32 bits and across images in 64 bits.
A bfloat16 output of 1000 kb_v1-sized images (2.16e9 elements, 4.3 GB) is spot-checked against the float64
composite on images at the start, the middle and the end (whose offsets are all beyond 2^31)."""
import pytest
import torch
import torch.nn.functional as F

import fused_convt
from conftest import requires_cuda
from reference import REL_TOL, rel_err

pytestmark = requires_cuda


def test_bfloat16_output_beyond_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GB of free GPU memory, {free / 2**30:.1f} GB free")
    generator = torch.Generator(device="cuda").manual_seed(31)
    x = torch.randn(1000, 64, 64, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    w = (torch.randn(64, 128, 4, 4, device="cuda", generator=generator) / 16).to(torch.bfloat16)
    b = torch.randn(128, device="cuda", generator=generator).to(torch.bfloat16)
    y = fused_convt.conv_transpose2d_fused(x, w, b, stride=2, add_value=-0.5, multiply_value=2.0)
    assert y.shape == (1000, 128, 130, 130) and y.numel() > 2**31
    for n in (0, 1, 500, 998, 999):
        ref = F.conv_transpose2d(x[n:n + 1].double(), w.double(), b.double(), stride=2) - 0.5
        ref = F.gelu(torch.minimum(ref, torch.zeros_like(ref))) * 2.0
        assert rel_err(y[n:n + 1], ref) <= REL_TOL[torch.bfloat16], f"image {n}"
