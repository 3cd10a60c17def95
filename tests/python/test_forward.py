"""Forward numerics of ``conv_transpose2d_fused`` and ``conv_transpose2d`` against the float64 composite.

Every test runs on the CPU and, where a GPU exists, on CUDA (the ``device`` fixture). Tolerances are
``REL_TOL`` of the storage dtype, applied to the relative 2-norm error and, so that one wrong element
cannot hide in a large tensor, to the largest elementwise error relative to the largest reference value.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fused_convt
from conftest import requires_cuda
from reference import KB_V0, REL_TOL, Problem, composite, composite_float64, random_problems, rel_err

# Cases a random draw may miss, named for what they pin down.
EDGE_PROBLEMS = {
    "batch0": Problem(batch=0, in_channels=3, out_channels=4, in_hw=(4, 5), kernel=(3, 3), stride=(2, 2)),
    "batch1-nobias-nonsquare": Problem(batch=1, in_channels=3, out_channels=5, in_hw=(3, 7), kernel=(2, 4),
                                       stride=(1, 3), padding=(0, 1), output_padding=(0, 2), bias=False),
    # Kernel narrower than the stride: rows/columns that no tap reaches hold epilogue(bias + add_value).
    "gaps-stride3": Problem(batch=2, in_channels=2, out_channels=3, in_hw=(3, 4), kernel=(1, 2), stride=(3, 3),
                            output_padding=(2, 1), add_value=-0.5),
    # output_padding >= stride is legal when it is below the dilation.
    "outpad-below-dilation": Problem(batch=2, in_channels=4, out_channels=2, in_hw=(5, 4), kernel=(3, 2),
                                     stride=(1, 2), dilation=(3, 2), output_padding=(2, 1), padding=(2, 0)),
    "depthwise": Problem(batch=2, in_channels=6, out_channels=6, in_hw=(5, 5), kernel=(3, 3), stride=(2, 2),
                         padding=(1, 1), output_padding=(1, 1), groups=6),
    "groups-expand": Problem(batch=1, in_channels=4, out_channels=12, in_hw=(4, 3), kernel=(2, 3), stride=(2, 1),
                             groups=2, dilation=(2, 1), bias=False),
    # Padding crops most of the full output (out = 3*1 - 2*3 + 4 + 1 = 2 rows).
    "padding-crops": Problem(batch=2, in_channels=3, out_channels=3, in_hw=(4, 6), kernel=(5, 5), padding=(3, 2)),
    "kernel1-stride1": Problem(batch=3, in_channels=5, out_channels=7, in_hw=(6, 2), kernel=(1, 1)),
    # More channels and pixels than one CUDA tile, odd sizes so tiles have ragged edges.
    "multi-tile": Problem(batch=2, in_channels=40, out_channels=36, in_hw=(13, 11), kernel=(3, 4), stride=(2, 2),
                          padding=(1, 1), output_padding=(1, 0)),
}
RANDOM_PROBLEMS = random_problems(64, seed=93)


def _problem_id(name, p):
    return (f"{name}-n{p.batch}c{p.in_channels}o{p.out_channels}h{p.in_hw[0]}w{p.in_hw[1]}"
            f"k{p.kernel[0]}{p.kernel[1]}s{p.stride[0]}{p.stride[1]}p{p.padding[0]}{p.padding[1]}"
            f"op{p.output_padding[0]}{p.output_padding[1]}d{p.dilation[0]}{p.dilation[1]}g{p.groups}"
            + ("" if p.bias else "-nobias"))


PROBLEMS = [(f"r{i:02d}", p) for i, p in enumerate(RANDOM_PROBLEMS)] + list(EDGE_PROBLEMS.items())
PROBLEM_PARAMS = [pytest.param(seed, p, id=_problem_id(name, p)) for seed, (name, p) in enumerate(PROBLEMS)]
# The half-precision subset: every fourth random problem plus every edge case.
HALF_PARAMS = PROBLEM_PARAMS[:len(RANDOM_PROBLEMS):4] + PROBLEM_PARAMS[len(RANDOM_PROBLEMS):]

FULL_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
ALL_DTYPES = FULL_DTYPES + HALF_DTYPES

# GELU's minimum, at u = -0.7518: multiply_value * GELU(min(u, 0)) lies in [m * GELU_MIN, 0] for m > 0.
GELU_MIN = -0.16997120747


def assert_matches(ours, ref, dtype):
    """Relative 2-norm error and largest elementwise error (relative to max |ref|) within REL_TOL[dtype]."""
    assert ours.shape == ref.shape
    tol = REL_TOL[dtype]
    err = rel_err(ours, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"
    if ref.numel():
        diff = (ours.detach().to("cpu", torch.float64) - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1e-3)
        assert diff <= tol * scale, f"max elementwise error {diff:.3e} > {tol:.1e} * {scale:.3e}"


def run_fused(p: Problem, x, w, b, **overrides):
    kwargs = {**p.conv_kwargs(), **p.epilogue_kwargs(), **overrides}
    return fused_convt.conv_transpose2d_fused(x, w, b, **kwargs)


def reference(p: Problem, x, w, b, **overrides):
    return composite_float64(x, w, b, **{**p.conv_kwargs(), **p.epilogue_kwargs(), **overrides})


def test_problem_set_covers_the_parameter_space():
    """The parametrization below claims stride 1-3, padding, output_padding, dilation, groups, no bias,
    non-square shapes, batch 0 and 1, both signs of add_value: check that it delivers them."""
    assert len(RANDOM_PROBLEMS) >= 50
    ps = [p for _, p in PROBLEMS]
    assert {s for p in ps for s in p.stride} == {1, 2, 3}
    assert any(max(p.padding) > 0 for p in ps)
    assert any(max(p.output_padding) > 0 for p in ps)
    assert any(max(p.dilation) > 1 for p in ps)
    assert {p.groups for p in ps} >= {1, 2, 3}
    assert any(not p.bias for p in ps) and any(p.bias for p in ps)
    assert any(p.kernel[0] != p.kernel[1] for p in ps) and any(p.in_hw[0] != p.in_hw[1] for p in ps)
    assert {0, 1} <= {p.batch for p in ps}
    assert any(p.add_value < 0 for p in ps) and any(p.add_value > 0 for p in ps)
    assert any(p.multiply_value < 0 for p in ps)


# Every problem in float32 and float64; a subset in float16 / bfloat16.
DTYPE_PROBLEM_PARAMS = [
    pytest.param(*dtype.values, *problem.values, id=f"{problem.id}-{dtype.id}")
    for dtypes, problems in ((FULL_DTYPES, PROBLEM_PARAMS), (HALF_DTYPES, HALF_PARAMS))
    for dtype in dtypes for problem in problems]


@pytest.mark.parametrize("dtype,seed,problem", DTYPE_PROBLEM_PARAMS)
def test_fused_matches_float64_composite(dtype, seed, problem, device):
    x, w, b = problem.tensors(dtype, device, seed=seed)
    out = run_fused(problem, x, w, b)
    assert out.dtype == dtype and out.device.type == device
    # The reference sees the same rounded inputs, so only accumulation and the final rounding differ.
    assert_matches(out, reference(problem, x, w, b), dtype)


BRANCH_PROBLEMS = [
    pytest.param(Problem(batch=2, in_channels=8, out_channels=6, in_hw=(6, 7), kernel=(3, 3), stride=(2, 2),
                         padding=(1, 1), output_padding=(1, 0), add_value=-0.3, multiply_value=2.0), id="s2"),
    pytest.param(Problem(batch=1, in_channels=6, out_channels=6, in_hw=(5, 8), kernel=(4, 2), stride=(1, 3),
                         dilation=(2, 1), groups=3, add_value=-0.5, multiply_value=0.5), id="grouped-dilated"),
    pytest.param(Problem(batch=3, in_channels=5, out_channels=4, in_hw=(4, 4), kernel=(2, 2), stride=(3, 3),
                         bias=False, add_value=-0.2, multiply_value=1.5), id="gaps-nobias"),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("problem", BRANCH_PROBLEMS)
def test_both_epilogue_branches_are_exercised(problem, dtype, device):
    """With add_value < 0 a sizeable share of pre-activations falls on each side of zero: outputs are
    GELU values where u < 0 and exact zeros where u >= 0, and both must match."""
    x, w, b = problem.tensors(dtype, device, seed=7)
    out = run_fused(problem, x, w, b)
    ref = reference(problem, x, w, b)
    nonzero = (ref != 0).double().mean().item()
    assert 0.1 <= nonzero <= 0.9, f"test data hit the nonzero branch at {nonzero:.2f}"
    assert_matches(out, ref, dtype)
    m = problem.multiply_value
    out64 = out.double()
    assert out64.max().item() <= 0.0
    assert out64.min().item() >= m * GELU_MIN * (1 + REL_TOL[dtype])
    # Where the reference clips (u > 0 by more than rounding can move it) ours is exactly zero too.
    pre = reference(problem, x, w, b, apply_epilogue=False) + problem.add_value
    clearly_clipped = pre > 10 * REL_TOL[dtype] * pre.abs().max()
    assert clearly_clipped.any()
    assert (out.cpu()[clearly_clipped] == 0).all()


IDENTITY_PARAMS = PROBLEM_PARAMS[::3]


@pytest.mark.parametrize("dtype", FULL_DTYPES)
@pytest.mark.parametrize("seed,problem", IDENTITY_PARAMS)
def test_identity_op_matches_conv_transpose2d(seed, problem, dtype, device):
    x, w, b = problem.tensors(dtype, device, seed=seed)
    out = fused_convt.conv_transpose2d(x, w, b, **problem.conv_kwargs())
    up = lambda t: None if t is None else t.to("cpu", torch.float64)
    ref = F.conv_transpose2d(up(x), up(w), up(b), **problem.conv_kwargs())
    assert out.dtype == dtype
    assert_matches(out, ref, dtype)
    # Same dtype, same device: PyTorch's own conv_transpose2d agrees to the dtype's precision as well.
    assert_matches(out, F.conv_transpose2d(x, w, b, **problem.conv_kwargs()).double().cpu(), dtype)


def test_identity_op_defaults_match_functional(device):
    x, w, b = EDGE_PROBLEMS["multi-tile"].tensors(torch.float64, device, seed=3)
    assert_matches(fused_convt.conv_transpose2d(x, w), F.conv_transpose2d(x.cpu(), w.cpu()), torch.float64)
    assert_matches(fused_convt.conv_transpose2d(x, w, b), F.conv_transpose2d(x.cpu(), w.cpu(), b.cpu()),
                   torch.float64)


@pytest.mark.parametrize("dtype", FULL_DTYPES)
@pytest.mark.parametrize("problem", [EDGE_PROBLEMS["depthwise"], EDGE_PROBLEMS["batch1-nobias-nonsquare"],
                                     EDGE_PROBLEMS["gaps-stride3"]], ids=["depthwise", "nobias", "gaps"])
def test_unbatched_input(problem, dtype, device):
    """A 3-D [C, H, W] input gives a 3-D output equal to the batched call on the same image, for both ops."""
    x, w, b = dataclasses.replace(problem, batch=1).tensors(dtype, device, seed=11)
    image = x[0]
    assert image.dim() == 3
    fused = run_fused(problem, image, w, b)
    assert fused.dim() == 3
    assert torch.equal(fused, run_fused(problem, x, w, b)[0])
    assert_matches(fused, reference(problem, x, w, b)[0], dtype)
    plain = fused_convt.conv_transpose2d(image, w, b, **problem.conv_kwargs())
    assert plain.dim() == 3
    assert torch.equal(plain, fused_convt.conv_transpose2d(x, w, b, **problem.conv_kwargs())[0])


def _layouts(x, w, b):
    """{name: (input, weight, bias)} with the values of the contiguous tensors but other strides."""
    wide_x = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3] + 1, dtype=x.dtype, device=x.device)
    wide_x[:, :, ::2, 1::2] = x
    permuted_w = w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    spread_b = torch.zeros(2 * b.shape[0], dtype=b.dtype, device=b.device)
    spread_b[::2] = b
    transposed_hw = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)
    return {
        "channels_last": (x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last), b),
        "strided_slice": (wide_x[:, :, ::2, 1::2], permuted_w, spread_b[::2]),
        "transposed_hw": (transposed_hw(x), transposed_hw(w), b),
    }


@pytest.mark.parametrize("layout", ["channels_last", "strided_slice", "transposed_hw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_non_contiguous_inputs_give_the_contiguous_result(layout, dtype, device):
    problem = EDGE_PROBLEMS["multi-tile"]
    x, w, b = problem.tensors(dtype, device, seed=5)
    expected = run_fused(problem, x, w, b)
    expected_plain = fused_convt.conv_transpose2d(x, w, b, **problem.conv_kwargs())
    x2, w2, b2 = _layouts(x, w, b)[layout]
    assert not (x2.is_contiguous() and w2.is_contiguous() and b2.is_contiguous())
    assert torch.equal(x2, x) and torch.equal(w2, w) and torch.equal(b2, b)
    assert torch.equal(run_fused(problem, x2, w2, b2), expected)
    assert torch.equal(fused_convt.conv_transpose2d(x2, w2, b2, **problem.conv_kwargs()), expected_plain)


def test_output_does_not_depend_on_grad_mode_or_recompute(device):
    """Saving d out / d u for backward (grad enabled) must not change the forward values."""
    problem = EDGE_PROBLEMS["depthwise"]
    x, w, b = problem.tensors(torch.float32, device, seed=13)
    with torch.no_grad():
        expected = run_fused(problem, x, w, b)
    for recompute in (False, True):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        out = run_fused(problem, xg, wg, bg, recompute=recompute)
        assert out.requires_grad
        assert torch.equal(out.detach(), expected)


def test_custom_op_grad_factor_matches_epilogue_derivative(device):
    """The op's second output is d out / d u divided by m: Phi(u) + u * phi(u) for u < 0 and 0 for u > 0."""
    problem = EDGE_PROBLEMS["gaps-stride3"]
    x, w, b = problem.tensors(torch.float64, device, seed=17)
    out, factor = torch.ops.fused_convt.conv_transpose2d_fused(
        x, w, b, list(problem.stride), list(problem.padding), list(problem.output_padding),
        list(problem.dilation), problem.groups, problem.add_value, problem.multiply_value, True, True, False)
    assert_matches(out, reference(problem, x, w, b), torch.float64)
    u = reference(problem, x, w, b, apply_epilogue=False) + problem.add_value
    assert (u != 0).all()
    phi = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    cdf = 0.5 * torch.erfc(-u / math.sqrt(2))
    expected = torch.where(u < 0, cdf + u * phi, torch.zeros_like(u))
    assert_matches(factor, expected, torch.float64)
    _, no_factor = torch.ops.fused_convt.conv_transpose2d_fused(
        x, w, b, list(problem.stride), list(problem.padding), list(problem.output_padding),
        list(problem.dilation), problem.groups, problem.add_value, problem.multiply_value, True, False, False)
    assert no_factor.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_follows_the_composite(device, value, allow_tf32, dtype):
    """NaN in gives NaN out at the same places; +inf reaches min(., 0) as +inf (output 0) or as NaN where
    it meets a weight of the other sign, exactly as in the composite; -inf gives what the composite gives.
    (3xTF32 must not split an infinity into inf + NaN.)"""
    problem = EDGE_PROBLEMS["gaps-stride3"]
    x, w, b = problem.tensors(dtype, device, seed=19)
    x[1, 0, 1, 2] = value
    x[0, 1, 0, 0] = value
    out = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                             allow_tf32=allow_tf32).cpu().double()
    ref = reference(problem, x, w, b)
    assert not torch.isfinite(ref).all() or (ref == 0).any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    finite = torch.isfinite(ref)
    tf32 = device == "cuda" and dtype == torch.float32 and allow_tf32
    assert rel_err(out[finite], ref[finite]) <= (5e-3 if tf32 else REL_TOL[dtype])


def test_kernelbench_v0_shape_with_kernelbench_data(device):
    """KernelBench level 2 problem 93 at batch 2: nn.ConvTranspose2d's default init, torch.rand input,
    add 0.5, multiply 2.0. With this data most pre-activations are positive, so most outputs are exact
    zeros and the rest must still match."""
    p = dataclasses.replace(KB_V0, batch=2)
    torch.manual_seed(0)
    module = torch.nn.ConvTranspose2d(p.in_channels, p.out_channels, p.kernel, stride=p.stride)
    x = torch.rand(p.batch, p.in_channels, *p.in_hw)
    w, b = module.weight.detach(), module.bias.detach()
    x, w, b = x.to(device), w.to(device), b.to(device)
    out = fused_convt.conv_transpose2d_fused(x, w, b, p.stride, add_value=0.5, multiply_value=2.0)
    ref = composite_float64(x, w, b, stride=p.stride, add_value=0.5, multiply_value=2.0)
    assert out.shape == (2, 16, 66, 66)
    assert (ref != 0).sum().item() > 1000
    assert_matches(out, ref, torch.float32)


TORCH_COMPARE_PARAMS = PROBLEM_PARAMS[:len(RANDOM_PROBLEMS):8] + [
    PROBLEM_PARAMS[len(RANDOM_PROBLEMS) + i] for i, name in enumerate(EDGE_PROBLEMS)
    if name in ("multi-tile", "depthwise", "gaps-stride3")]


# float64 is left out: there PyTorch's composite is (on the CPU, exactly) the reference itself.
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES)
@pytest.mark.parametrize("seed,problem", TORCH_COMPARE_PARAMS)
def test_error_is_no_worse_than_pytorch_at_the_same_dtype(seed, problem, dtype, device):
    """Against the float64 reference, our error is within REL_TOL and at most 3x that of the PyTorch
    composite run in the same dtype on the same device, or within 2 ulp of the dtype where both are at
    the rounding floor."""
    x, w, b = problem.tensors(dtype, device, seed=seed)
    ref = reference(problem, x, w, b)
    ours = rel_err(run_fused(problem, x, w, b), ref)
    theirs = rel_err(composite(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs()), ref)
    assert ours <= REL_TOL[dtype]
    floor = 2 * torch.finfo(dtype).eps
    if dtype == torch.float32 and device == "cuda":
        # Exact float32 on CUDA runs on tensor cores as 3xTF32: each operand keeps ~22 significand bits
        # (hi + lo, two TF32 roundings), so its floor is ~2^-21 per product rather than float32's 2^-24.
        floor = 2.0 ** -18
    assert ours <= max(3 * theirs, floor), f"ours {ours:.3e}, PyTorch {theirs:.3e}"


@requires_cuda
@pytest.mark.parametrize("name", ["gaps-stride3", "multi-tile", "outpad-below-dilation"])
def test_cuda_writes_every_output_over_nan_poisoned_memory(name):
    """The op allocates its outputs with new_empty. Freed NaN-filled blocks of the same size are handed
    back by the caching allocator, so an output element the kernel forgets to write shows up as NaN."""
    problem = EDGE_PROBLEMS[name]
    x, w, b = problem.tensors(torch.float32, "cuda", seed=23)
    args = (list(problem.stride), list(problem.padding), list(problem.output_padding), list(problem.dilation),
            problem.groups, problem.add_value, problem.multiply_value, True, True, False)
    shape = reference(problem, x, w, b).shape
    poison = [torch.full(shape, float("nan"), device="cuda") for _ in range(2)]
    poisoned_ptrs = {t.data_ptr() for t in poison}
    del poison
    out, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *args)
    assert {out.data_ptr(), factor.data_ptr()} == poisoned_ptrs, "outputs did not reuse the poisoned blocks"
    assert not out.isnan().any() and not factor.isnan().any()
    cpu_out, cpu_factor = torch.ops.fused_convt.conv_transpose2d_fused(x.cpu(), w.cpu(), b.cpu(), *args)
    assert_matches(out, cpu_out.double(), torch.float32)
    assert_matches(factor, cpu_factor.double(), torch.float32)
