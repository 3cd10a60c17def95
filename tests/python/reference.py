"""Slow, obviously-right references and random problem generators shared by the Python tests."""
import random
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Tolerances on ||ours - ref|| / ||ref|| against the float64 reference, from the storage precision.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def composite(x, weight, bias, stride=1, padding=0, output_padding=0, groups=1, dilation=1, add_value=0.0,
              multiply_value=1.0, apply_epilogue=True):
    """The PyTorch composite (KernelBench level 2 problem 93), in the dtype of its inputs."""
    y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    if not apply_epilogue:
        return y
    y = y + add_value
    y = torch.min(y, torch.tensor(0.0, dtype=y.dtype, device=y.device))
    return F.gelu(y) * multiply_value


def composite_float64(x, weight, bias, **conv):
    """The composite evaluated in float64 on the CPU: the reference every dtype is judged against."""
    up = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    return composite(up(x), up(weight), up(bias), **conv)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert not torch.isnan(ours).any(), "NaN in result"
    denom = ref.norm().item()
    return (ours - ref).norm().item() / (denom if denom > 0 else 1.0)


@dataclass
class Problem:
    """One random nn.ConvTranspose2d configuration."""
    batch: int
    in_channels: int
    out_channels: int
    in_hw: Tuple[int, int]
    kernel: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    output_padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    add_value: float = -0.5
    multiply_value: float = 2.0

    def conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                    groups=self.groups, dilation=self.dilation)

    def epilogue_kwargs(self):
        return dict(add_value=self.add_value, multiply_value=self.multiply_value)

    def tensors(self, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
        """randn input/weight/bias (never zeros): with add_value < 0 both epilogue branches are common."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.in_channels, *self.in_hw, generator=g, dtype=torch.float64)
        w = torch.randn(self.in_channels, self.out_channels // self.groups, *self.kernel, generator=g,
                        dtype=torch.float64)
        fan = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        w = w / fan ** 0.5
        b = torch.randn(self.out_channels, generator=g, dtype=torch.float64) * 0.5 if self.bias else None
        out = []
        for t in (x, w, b):
            if t is not None:
                t = t.to(device=device, dtype=dtype)
                t.requires_grad_(requires_grad)
            out.append(t)
        return tuple(out)


def random_problem(rng: random.Random, max_batch=3, max_channels=9, max_hw=9) -> Problem:
    """A valid random configuration over stride 1-3, padding, output_padding, dilation, groups, bias,
    non-square kernels and sizes."""
    while True:
        groups = rng.choice([1, 1, 2, 3])
        cin = groups * rng.randint(1, max(1, max_channels // groups))
        cout = groups * rng.randint(1, max(1, max_channels // groups))
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        output_padding = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
        hw = (rng.randint(1, max_hw), rng.randint(1, max_hw))
        out = [(hw[a] - 1) * stride[a] - 2 * padding[a] + dilation[a] * (kernel[a] - 1) + output_padding[a] + 1
               for a in range(2)]
        if min(out) <= 0:
            continue
        return Problem(batch=rng.randint(0, max_batch), in_channels=cin, out_channels=cout, in_hw=hw,
                       kernel=kernel, stride=stride, padding=padding, output_padding=output_padding,
                       dilation=dilation, groups=groups, bias=rng.random() < 0.8,
                       add_value=rng.choice([-1.0, -0.5, 0.0, 0.5]), multiply_value=rng.choice([2.0, -1.5, 0.5]))


def random_problems(count: int, seed: int, **limits):
    rng = random.Random(seed)
    return [random_problem(rng, **limits) for _ in range(count)]


# The two KernelBench level-2 problem 93 shape sets (shared/ANCHORS.md).
KB_V0 = Problem(batch=128, in_channels=32, out_channels=16, in_hw=(32, 32), kernel=(4, 4), stride=(2, 2),
                add_value=0.5, multiply_value=2.0)
KB_V1 = Problem(batch=128, in_channels=64, out_channels=128, in_hw=(64, 64), kernel=(4, 4), stride=(2, 2),
                add_value=0.5, multiply_value=2.0)
