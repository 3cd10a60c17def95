"""Differential fuzzing against the float64 PyTorch composite: forward and all three gradients on seeded
random problems (N 0-4, channels 1-64 incl. primes, groups, kernels 1-7 non-square, stride 1-4, padding
0-3, valid output_padding, dilation 1-3, H/W 1-40, bias on/off, every dtype, contiguous / channels_last /
non-contiguous inputs, add_value and multiply_value incl. negative and 0).

Each case is its own test id carrying its seed; a failure prints the seed and the parameters, and
`pytest tests/python/test_fuzz.py -k "seed_123"` replays it. FUSED_CONVT_FUZZ_CASES sets the count per device
(default 300 on the CPU, 1000 on CUDA)."""
import os
import random
from dataclasses import asdict

import pytest
import torch

import fused_convt
from conftest import HAS_CUDA
from reference import REL_TOL, Problem, composite, rel_err

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# Multiply-accumulates per case: keeps the CPU run (reference included) to a few seconds in all.
MAX_MACS = 4_000_000


def fuzz_case(seed: int):
    rng = random.Random(seed)
    while True:
        groups = rng.choice([1, 1, 1, 2, 3, 4])
        per_group_in = rng.choice([1, 2, 3, 5, 7, 8, 13, 16])
        per_group_out = rng.choice([1, 2, 3, 5, 7, 11, 16])
        cin, cout = groups * per_group_in, groups * per_group_out
        if cin > 64 or cout > 64:
            continue
        kernel = (rng.randint(1, 7), rng.randint(1, 7))
        stride = (rng.randint(1, 4), rng.randint(1, 4))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, 3), rng.randint(0, 3))
        output_padding = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
        hw = (rng.randint(1, 40), rng.randint(1, 40))
        out = [(hw[a] - 1) * stride[a] - 2 * padding[a] + dilation[a] * (kernel[a] - 1) + output_padding[a] + 1
               for a in range(2)]
        batch = rng.randint(0, 4)
        macs = max(batch, 1) * cout * out[0] * out[1] * per_group_in * kernel[0] * kernel[1]
        if min(out) <= 0 or macs > MAX_MACS:
            continue
        problem = Problem(batch=batch, in_channels=cin, out_channels=cout, in_hw=hw, kernel=kernel, stride=stride,
                          padding=padding, output_padding=output_padding, dilation=dilation, groups=groups,
                          bias=rng.random() < 0.7, add_value=rng.choice([-1.0, -0.5, 0.0, 0.3]),
                          multiply_value=rng.choice([2.0, 1.0, -1.5, 0.0]))
        return problem, rng.choice(DTYPES), rng.choice(LAYOUTS), rng.random() < 0.5


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view with the same values
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def cases(device: str):
    default = 1000 if device == "cuda" else 300
    count = int(os.environ.get("FUSED_CONVT_FUZZ_CASES", default))
    return [pytest.param(device, seed, id=f"{device}-seed_{seed}") for seed in range(count)]


@pytest.mark.parametrize("device,seed", cases("cpu") + (cases("cuda") if HAS_CUDA else []))
def test_matches_float64_composite(device, seed):
    problem, dtype, layout, recompute = fuzz_case(seed)
    what = f"seed {seed}: {dtype}, {layout}, recompute={recompute}, {asdict(problem)}"
    x, w, b = problem.tensors(dtype, device, seed=seed)
    x = lay_out(x, layout).requires_grad_()
    w = lay_out(w, layout).requires_grad_()
    if b is not None:
        b.requires_grad_()
    y = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                           recompute=recompute, allow_tf32=False)

    leaves = [t.detach().to("cpu", torch.float64).requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref = composite(leaves[0], leaves[1], leaves[2] if b is not None else None, **problem.conv_kwargs(),
                    **problem.epilogue_kwargs())
    tol = REL_TOL[dtype]
    assert rel_err(y, ref) <= tol, what
    if y.numel() == 0:
        return
    grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y.backward(grad.to(device, dtype))
    ref.backward(grad)
    for name, ours, theirs in zip(("grad_input", "grad_weight", "grad_bias"), (x, w, b), leaves):
        if ours is not None:
            assert rel_err(ours.grad, theirs.grad) <= tol, f"{name}, {what}"
