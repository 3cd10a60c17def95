"""The training forward's epilogue clusters (GPU only): where the forward writes the output and d out / d u
and the channel tile's output in flight is large (tc_training_epilogue_cluster in cuda/tc_problem.h: stride_w 2
or 4, output width a multiple of it, NCHW, at least ~25 float / ~50 16-bit output channels on an H100), the
column phases' blocks exchange their staged tiles and store whole output rows. These problems take that path
on sm_90; each output element must be written once, by the right block, with the right value."""
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from fused_convt._validation import output_size
from reference import REL_TOL, Problem, composite_float64, rel_err

CLUSTER_PROBLEMS = [
    # two column phases (16 output columns at stride 2), 40 channels: one partial channel tile of 64
    Problem(2, 8, 40, (5, 7), (4, 4), (2, 2), add_value=-0.5, multiply_value=2.0),
    # four column phases (24 output columns at stride 4), 72 channels: a full tile of 64, then 8 columns
    Problem(1, 16, 72, (4, 6), (3, 4), (2, 4), add_value=-0.5, multiply_value=2.0),
    # padding and output_padding that keep the width a multiple of the stride (rotated first columns), groups
    Problem(2, 16, 128, (6, 9), (4, 4), (2, 2), padding=(1, 1), output_padding=(1, 0), groups=2,
            add_value=-0.5, multiply_value=-1.5),
]
# exact float32 (3xTF32), bf16 (the 16-bit tile of 64 is large enough only with 64 columns: the last problem)
DTYPES = [(torch.float32, False), (torch.bfloat16, None)]


def training_forward(p: Problem, x, w, b, allow_tf32):
    """The op's value and saved factor (d out / d u / m), into memory that held NaN (unwritten elements stay NaN)."""
    poison = [torch.full((p.batch, p.out_channels, 64, 64), float("nan"), device="cuda", dtype=x.dtype)
              for _ in range(2)]
    del poison
    return torch.ops.fused_convt.conv_transpose2d_fused(
        x, w, b, [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation], p.groups, p.add_value,
        p.multiply_value, apply_epilogue=True, save_grad_factor=True, allow_tf32=allow_tf32)


def expected_factor(p: Problem, x, w, b):
    u = (F.conv_transpose2d(x.double().cpu(), w.double().cpu(), b.double().cpu(), p.stride, p.padding,
                            p.output_padding, p.groups, p.dilation) + p.add_value).requires_grad_()
    out = F.gelu(torch.min(u, torch.tensor(0.0, dtype=u.dtype))) * p.multiply_value
    return torch.autograd.grad(out.sum(), u)[0] / p.multiply_value, u.detach()  # the saved factor: d out / d u / m


@requires_cuda
@pytest.mark.parametrize("dtype,allow_tf32", DTYPES)
@pytest.mark.parametrize("index", range(len(CLUSTER_PROBLEMS)))
def test_training_forward_through_clusters_matches_float64(index, dtype, allow_tf32):
    p = CLUSTER_PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    y, factor = training_forward(p, x, w, b, allow_tf32)
    torch.cuda.synchronize()
    assert not torch.isnan(y).any() and not torch.isnan(factor).any(), "unwritten output elements"
    reference = composite_float64(x, w, b, **p.conv_kwargs(), **p.epilogue_kwargs())
    assert rel_err(y, reference) <= REL_TOL[dtype]
    expected, u = expected_factor(p, x, w, b)
    assert rel_err(factor, expected) <= REL_TOL[dtype]
    # both epilogue branches are common in these problems (u < 0: a GELU slope, u > 0: zero)
    assert 0.1 < (u < 0).double().mean().item() < 0.9
    # the value agrees with the inference forward (one output: no clusters) to the dtype's rounding
    with torch.no_grad():
        alone = torch.ops.fused_convt.conv_transpose2d_fused(
            x, w, b, [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation], p.groups, p.add_value,
            p.multiply_value, apply_epilogue=True, save_grad_factor=False, allow_tf32=allow_tf32)[0]
    assert rel_err(y, alone) <= REL_TOL[dtype]


def test_cluster_problems_take_the_cluster_shape():
    """Each problem above meets tc_epilogue_cluster's shape condition (mirrored here: stride_w 2 or 4, output
    width a multiple of it), so the test exercises clusters wherever the device launches them."""
    for p in CLUSTER_PROBLEMS:
        out_w = output_size(p.in_hw[1], p.kernel[1], p.stride[1], p.padding[1], p.dilation[1], p.output_padding[1])
        assert p.stride[1] in (2, 4) and out_w % p.stride[1] == 0
        assert p.out_channels // p.groups >= 40
