"""Autograd of fused_convt: the hand-written backward (grad_input, grad_weight, grad_bias) against finite
differences (gradcheck) and against the float64 PyTorch composite, the u == 0 tie and the epilogue
derivative in the tails, determinism, what forward saves, double backward, torch.compile and partial
gradients. Every check runs on the CPU and, where a GPU exists, on CUDA."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import fused_convt
from conftest import requires_cuda
from fused_convt import FusedConvTranspose2dFunction, _C
from reference import REL_TOL, Problem, composite, random_problems, rel_err


# Small problems so that full (not fast-mode) gradcheck stays cheap: every Jacobian entry is checked.
GRADCHECK_PROBLEMS = random_problems(24, seed=1234, max_batch=2, max_channels=4, max_hw=4) + [
    # The KernelBench layer shape (k4 s2) in miniature, and an unbatched (3-D) input.
    Problem(batch=2, in_channels=3, out_channels=2, in_hw=(3, 3), kernel=(4, 4), stride=(2, 2),
            add_value=0.5, multiply_value=2.0),
    Problem(batch=1, in_channels=2, out_channels=4, in_hw=(3, 2), kernel=(3, 2), stride=(2, 3), padding=(1, 0),
            output_padding=(1, 2), groups=2, add_value=-0.5, multiply_value=-1.5),
]

# Each way into the kernels: functional op with and without recompute, the identity epilogue, and the
# exported autograd.Function with and without recompute.
VARIANTS = ("fused", "fused_recompute", "identity", "function", "function_recompute")


def run_variant(variant, problem, x, w, b):
    if variant == "identity":
        return fused_convt.conv_transpose2d(x, w, b, **problem.conv_kwargs())
    recompute = variant.endswith("_recompute")
    if variant.startswith("function"):
        return FusedConvTranspose2dFunction.apply(x, w, b, problem.stride, problem.padding, problem.output_padding,
                                                  problem.groups, problem.dilation, problem.add_value,
                                                  problem.multiply_value, recompute)
    return fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                              recompute=recompute)


def reference_grads(problem, tensors, grad_output, apply_epilogue=True):
    """Gradients of the PyTorch composite, evaluated in float64 on the CPU, w.r.t. the non-None tensors."""
    leaves = [None if t is None else t.detach().to("cpu", torch.float64).requires_grad_() for t in tensors]
    y = composite(*leaves, **problem.conv_kwargs(), **problem.epilogue_kwargs(), apply_epilogue=apply_epilogue)
    return torch.autograd.grad(y, [t for t in leaves if t is not None], grad_output.to("cpu", torch.float64))


def present(tensors):
    return [t for t in tensors if t is not None]


def test_gradcheck_problem_set_covers_the_features():
    problems = [p for p in GRADCHECK_PROBLEMS if p.batch > 0]
    assert len(problems) >= 20
    assert any(not p.bias for p in problems)
    assert any(p.groups > 1 for p in problems)
    assert any(max(p.dilation) > 1 for p in problems)
    assert any(max(p.output_padding) > 0 for p in problems)
    assert any(max(p.stride) > 1 for p in problems)
    assert any(p.kernel[0] != p.kernel[1] for p in problems)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("index", range(len(GRADCHECK_PROBLEMS)))
def test_gradcheck_float64(device, index, variant):
    problem = GRADCHECK_PROBLEMS[index]
    x, w, b = problem.tensors(torch.float64, device, seed=index, requires_grad=True)
    if index == len(GRADCHECK_PROBLEMS) - 1 and not variant.startswith("function"):
        x = x[0].detach().requires_grad_()  # unbatched (3-D) input, which the functional ops accept

    def fn(*args):
        return run_variant(variant, problem, args[0], args[1], args[2] if b is not None else None)

    assert torch.autograd.gradcheck(fn, tuple(present((x, w, b))), eps=1e-6, atol=1e-7, rtol=1e-5)


# The tie u == 0: PyTorch's binary min splits the gradient in half and GELU'(0) = 1/2, so d out / d u = m / 4.

def tie_problem_tensors(dtype, device):
    """1x1 kernel, one channel, weight 1, bias 0.25, add_value -0.5: u = x - 0.25 exactly. x takes the values
    0.25 (u == 0), -1 (u < 0) and 2 (u > 0), all exactly representable in every dtype."""
    problem = Problem(batch=2, in_channels=1, out_channels=1, in_hw=(4, 5), kernel=(1, 1), add_value=-0.5,
                      multiply_value=2.0)
    pattern = torch.tensor([0.25, -1.0, 2.0], dtype=torch.float64)
    index = torch.arange(2 * 4 * 5).remainder(3)
    x = pattern[index].reshape(2, 1, 4, 5)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    b = torch.full((1,), 0.25, dtype=torch.float64)
    x, w, b = (t.to(device, dtype).requires_grad_() for t in (x, w, b))
    return problem, (x, w, b), index.reshape(2, 1, 4, 5) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["fused", "fused_recompute", "function"])
def test_tie_at_zero_preactivation_gives_quarter_multiply_value(device, dtype, variant):
    problem, tensors, tie = tie_problem_tensors(dtype, device)
    y = run_variant(variant, problem, *tensors)
    grad_output = torch.linspace(-1.0, 2.0, y.numel(), dtype=torch.float64).reshape(y.shape).to(device, dtype)
    grads = torch.autograd.grad(y, tensors, grad_output)
    ref = reference_grads(problem, tensors, grad_output)

    grad_input, expected_input = grads[0].cpu().double(), ref[0]
    upstream = grad_output.cpu().double()
    assert tie.sum() > 0
    # At the ties: m/4 * upstream (weight is 1), and what the composite gives: exactly, except that float32
    # grad_input on CUDA runs on tensor cores as 3xTF32, which keeps ~22 bits of each operand.
    if device == "cuda" and dtype == torch.float32:
        same = lambda a, b: torch.allclose(a, b, rtol=2.0 ** -20, atol=0.0)  # noqa: E731
    else:
        same = torch.equal
    assert same(grad_input[tie], problem.multiply_value / 4 * upstream[tie])
    assert same(grad_input[tie], expected_input[tie])
    # Elsewhere the usual branches: u > 0 gives exactly 0.
    positive = (tensors[0].detach().cpu().double() == 2.0)
    assert torch.equal(grad_input[positive], torch.zeros_like(grad_input[positive]))
    for ours, expected in zip(grads, ref):
        assert rel_err(ours, expected) <= REL_TOL[dtype]


@pytest.mark.parametrize("recompute", [False, True])
def test_every_output_tied_when_weight_is_zero(device, recompute):
    """weight == 0 and bias == -add_value: u == 0 at every output, through a k3 s2 d2 grouped layer (including
    outputs with no taps). grad_bias[oc] = m/4 * sum of upstream; grad_weight = m/4 * (x correlated with it)."""
    problem = Problem(batch=2, in_channels=4, out_channels=6, in_hw=(5, 4), kernel=(3, 2), stride=(2, 2),
                      padding=(1, 0), dilation=(2, 1), groups=2, add_value=-0.75, multiply_value=-1.5)
    x, w, b = problem.tensors(torch.float64, device, seed=3)
    w = torch.zeros_like(w).requires_grad_()
    b = torch.full_like(b, 0.75).requires_grad_()
    x.requires_grad_()
    y = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                           recompute=recompute)
    assert torch.equal(y, torch.zeros_like(y))
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    grads = torch.autograd.grad(y, (x, w, b), grad_output)
    ref = reference_grads(problem, (x, w, b), grad_output)

    expected_bias = problem.multiply_value / 4 * grad_output.cpu().sum(dim=(0, 2, 3))
    assert torch.allclose(ref[2], expected_bias, rtol=1e-13, atol=0)
    assert torch.equal(grads[0].cpu(), torch.zeros_like(ref[0]))  # weight 0: nothing flows back to x
    assert rel_err(grads[1], ref[1]) <= REL_TOL[torch.float64]
    assert rel_err(grads[2], ref[2]) <= REL_TOL[torch.float64]
    assert ref[1].abs().max() > 0.1  # the tie gradient is not trivially zero


def composite_epilogue_float64(u, multiply_value):
    """Value and d/du of the composite's epilogue at a float64 scalar, through PyTorch autograd."""
    u = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    value = F.gelu(torch.min(u, torch.tensor(0.0, dtype=torch.float64))) * multiply_value
    (derivative,) = torch.autograd.grad(value, u)
    return value.item(), derivative.item()


MULTIPLY_VALUES = (2.0, -1.5, 0.5, 1.0)
EPILOGUE_POINTS = ([-40.0, -38.0, -30.0, -20.0, -10.0, -8.0, -1e-300, -5e-324, 5e-324, 1e-300, 40.0]
                   + [k / 16 for k in range(-128, 129)])


@pytest.mark.parametrize("multiply_value", MULTIPLY_VALUES)
def test_epilogue_derivative_at_exact_zero_is_quarter_multiply_value(multiply_value):
    assert _C.epilogue_derivative(0.0, multiply_value) == multiply_value / 4
    assert _C.epilogue_derivative(-0.0, multiply_value) == multiply_value / 4
    assert composite_epilogue_float64(0.0, multiply_value)[1] == multiply_value / 4
    assert _C.epilogue_value(0.0, multiply_value) == 0.0


@pytest.mark.parametrize("multiply_value", MULTIPLY_VALUES)
def test_epilogue_matches_composite_autograd(multiply_value):
    """Value and derivative of the shared epilogue against PyTorch's float64 autograd of min + GELU. PyTorch
    evaluates Phi as 0.5 * (1 + erf), which loses its relative accuracy in the negative tail (at u = -10 it
    returns -0.0), so the comparison is absolute at a float64 ulp of the epilogue's scale |m|."""
    for u in EPILOGUE_POINTS:
        value, derivative = _C.epilogue_value(u, multiply_value), _C.epilogue_derivative(u, multiply_value)
        ref_value, ref_derivative = composite_epilogue_float64(u, multiply_value)
        assert abs(value - ref_value) <= 1e-14 * abs(multiply_value), (u, value, ref_value)
        assert abs(derivative - ref_derivative) <= 1e-14 * abs(multiply_value), (u, derivative, ref_derivative)
        if u > 0:
            assert value == 0.0 and derivative == 0.0


@pytest.mark.parametrize("multiply_value", MULTIPLY_VALUES)
def test_epilogue_tails_keep_relative_accuracy(multiply_value):
    """Against 50-digit mpmath: full relative accuracy down to where the result underflows float64."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for u in EPILOGUE_POINTS:
        if u >= 0:
            continue
        z = mpmath.mpf(u)
        cdf = mpmath.erfc(-z / mpmath.sqrt(2)) / 2
        pdf = mpmath.exp(-z * z / 2) / mpmath.sqrt(2 * mpmath.pi)
        for ours, exact in ((_C.epilogue_value(u, multiply_value), multiply_value * z * cdf),
                            (_C.epilogue_derivative(u, multiply_value), multiply_value * (cdf + z * pdf))):
            exact = float(exact)
            if abs(exact) > 1e-300:
                assert ours != 0.0 and abs(ours - exact) <= 1e-13 * abs(exact), (u, ours, exact)
            else:  # below the normal range: at most a few subnormal ulps
                assert abs(ours - exact) <= 1e-305, (u, ours, exact)
    # The tail is not flushed to zero as 1 + erf would: u = -30 keeps a nonzero value and derivative.
    assert _C.epilogue_value(-30.0, multiply_value) != 0.0
    assert _C.epilogue_derivative(-30.0, multiply_value) != 0.0


def test_epilogue_propagates_nan():
    for multiply_value in MULTIPLY_VALUES:
        assert math.isnan(_C.epilogue_value(math.nan, multiply_value))
        assert math.isnan(_C.epilogue_derivative(math.nan, multiply_value))
        ref_value, ref_derivative = composite_epilogue_float64(math.nan, multiply_value)
        assert math.isnan(ref_value) and math.isnan(ref_derivative)


def test_nan_input_propagates_to_gradients_like_composite(device):
    problem = Problem(batch=2, in_channels=2, out_channels=3, in_hw=(4, 4), kernel=(2, 2), add_value=-0.5)
    x, w, b = problem.tensors(torch.float64, device, seed=1)
    x[0, 0, 1, 1] = math.nan
    tensors = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    y = fused_convt.conv_transpose2d_fused(*tensors, **problem.epilogue_kwargs())
    grads = torch.autograd.grad(y.sum(), tensors)
    ref = reference_grads(problem, tensors, torch.ones(y.shape, dtype=torch.float64))
    assert torch.isnan(y[0, :, 1:3, 1:3]).all() and not torch.isnan(y[1]).any()
    for ours, expected in zip(grads, ref):
        ours = ours.cpu()
        assert torch.equal(torch.isnan(ours), torch.isnan(expected))
        finite = ~torch.isnan(expected)
        assert torch.allclose(ours[finite], expected[finite], rtol=1e-12, atol=1e-14)
    assert torch.isnan(grads[1]).any() and not torch.isnan(grads[0][1]).any()


# Gradients against the float64 composite at the storage precision's tolerance.

GRADIENT_PROBLEMS = random_problems(5, seed=77, max_batch=3, max_channels=8, max_hw=8) + [
    # add_value < 0 with randn data: both epilogue branches common (asserted below).
    Problem(batch=4, in_channels=8, out_channels=6, in_hw=(10, 9), kernel=(4, 3), stride=(2, 2), padding=(1, 0),
            add_value=-0.3, multiply_value=2.0),
]
GRADIENT_DTYPES = [torch.float64, torch.float32,
                   pytest.param(torch.float16, marks=requires_cuda), pytest.param(torch.bfloat16, marks=requires_cuda)]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", GRADIENT_DTYPES)
@pytest.mark.parametrize("index", range(len(GRADIENT_PROBLEMS)))
def test_gradients_match_float64_composite(device, dtype, recompute, index):
    problem = GRADIENT_PROBLEMS[index]
    tensors = problem.tensors(dtype, device, seed=index, requires_grad=True)
    y = fused_convt.conv_transpose2d_fused(*tensors, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                           recompute=recompute)
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + index)).to(device, dtype)
    grads = torch.autograd.grad(y, present(tensors), grad_output)
    ref = reference_grads(problem, tensors, grad_output)
    for name, ours, expected in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref):
        assert ours.dtype == dtype and ours.device.type == device
        assert rel_err(ours, expected) <= REL_TOL[dtype], name


def test_gradient_problem_has_both_epilogue_branches():
    problem = GRADIENT_PROBLEMS[-1]
    x, w, b = problem.tensors(torch.float64)
    u = F.conv_transpose2d(x, w, b, **problem.conv_kwargs()) + problem.add_value
    negative = (u < 0).double().mean().item()
    assert 0.3 < negative < 0.7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_epilogue_gradients_match_float64_conv_transpose(device, dtype):
    problem = Problem(batch=3, in_channels=6, out_channels=4, in_hw=(7, 5), kernel=(3, 4), stride=(3, 2),
                      padding=(1, 2), output_padding=(2, 0), dilation=(1, 2), groups=2)
    tensors = problem.tensors(dtype, device, seed=4, requires_grad=True)
    y = fused_convt.conv_transpose2d(*tensors, **problem.conv_kwargs())
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    grads = torch.autograd.grad(y, tensors, grad_output)
    ref = reference_grads(problem, tensors, grad_output, apply_epilogue=False)
    for ours, expected in zip(grads, ref):
        assert rel_err(ours, expected) <= REL_TOL[dtype]


def test_non_contiguous_inputs_and_grad_output(device):
    """channels_last input, a permuted-storage weight and an expanded (stride-0) upstream gradient, as
    `y.sum().backward()` produces, give the same gradients as contiguous tensors."""
    problem = Problem(batch=2, in_channels=4, out_channels=6, in_hw=(5, 4), kernel=(3, 2), stride=(2, 1),
                      padding=(1, 0), groups=2, add_value=-0.5, multiply_value=2.0)
    x, w, b = problem.tensors(torch.float64, device, seed=21)
    x_strided = x.to(memory_format=torch.channels_last).requires_grad_()
    w_strided = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0).requires_grad_()
    b_strided = b.clone().requires_grad_()
    assert not x_strided.is_contiguous() and not w_strided.is_contiguous()
    y = fused_convt.conv_transpose2d_fused(x_strided, w_strided, b_strided, **problem.conv_kwargs(),
                                           **problem.epilogue_kwargs())
    y.sum().backward()
    ref = reference_grads(problem, (x, w, b), torch.ones(y.shape, dtype=torch.float64))
    for ours, expected in zip((x_strided.grad, w_strided.grad, b_strided.grad), ref):
        assert rel_err(ours, expected) <= REL_TOL[torch.float64]


# Determinism: the backward reduces in a fixed order (no float atomics), so reruns are bitwise equal.

@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_deterministic(device, dtype, recompute):
    # A large batch * plane (the grad_weight reduction length) so that CUDA splits the reduction over blocks.
    problem = Problem(batch=8, in_channels=16, out_channels=16, in_hw=(24, 24), kernel=(4, 4), stride=(2, 2),
                      padding=(1, 1), add_value=-0.25, multiply_value=2.0)
    tensors = problem.tensors(dtype, device, seed=8, requires_grad=True)
    runs = []
    for _ in range(2):
        y = fused_convt.conv_transpose2d_fused(*tensors, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                               recompute=recompute)
        grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
        runs.append(torch.autograd.grad(y, tensors, grad_output))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
        assert first.abs().sum() > 0


# What forward saves for backward.

def saved_beyond_inputs(fn, inputs):
    """Run fn under saved_tensors_hooks; return the saved tensors that are not one of `inputs`."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = fn()
    input_keys = {(t.data_ptr(), t.shape) for t in inputs if t is not None}
    extra = [t for t in saved if (t.data_ptr(), t.shape) not in input_keys]
    return output, saved, extra


MEMORY_PROBLEM = Problem(batch=2, in_channels=3, out_channels=5, in_hw=(6, 7), kernel=(3, 3), stride=(2, 2),
                         add_value=-0.5, multiply_value=2.0)


@pytest.mark.parametrize("path", ["functional", "function"])
@pytest.mark.parametrize("recompute", [False, True])
def test_saved_tensors_for_backward(device, recompute, path):
    x, w, b = MEMORY_PROBLEM.tensors(torch.float32, device, requires_grad=True)
    variant = ("fused" if path == "functional" else "function") + ("_recompute" if recompute else "")
    y, saved, extra = saved_beyond_inputs(lambda: run_variant(variant, MEMORY_PROBLEM, x, w, b), (x, w, b))
    assert len(saved) >= 3  # x, w, b (and the factor) are saved
    assert {y.numel()} & {x.numel(), w.numel(), b.numel()} == set()  # shapes chosen so sizes cannot be confused
    if recompute:
        assert sum(t.numel() for t in extra) == 0
    else:
        assert len([t for t in extra if t.numel() > 0]) == 1
        (factor,) = [t for t in extra if t.numel() > 0]
        assert factor.shape == y.shape and factor.dtype == y.dtype
        assert sum(t.numel() for t in extra) == y.numel()
    y.backward(torch.ones_like(y))  # and the saved tensors suffice for backward
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_saved_grad_factor_is_the_epilogue_derivative(device):
    """The op's second output is d out / d u divided by multiply_value where a backward will follow, and empty
    otherwise."""
    p = MEMORY_PROBLEM
    x, w, b = p.tensors(torch.float64, device, seed=2)

    def forward_op(apply_epilogue, save_grad_factor):
        return torch.ops.fused_convt.conv_transpose2d_fused(
            x, w, b, [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation], p.groups, p.add_value,
            p.multiply_value, apply_epilogue=apply_epilogue, save_grad_factor=save_grad_factor, allow_tf32=False)

    _, factor = forward_op(True, True)
    assert forward_op(True, False)[1].numel() == 0 and forward_op(False, True)[1].numel() == 0

    u = (F.conv_transpose2d(x.cpu(), w.cpu(), b.cpu(), p.stride, p.padding, p.output_padding, p.groups, p.dilation)
         + p.add_value).requires_grad_()
    out = F.gelu(torch.min(u, torch.tensor(0.0, dtype=u.dtype))) * p.multiply_value
    (expected,) = torch.autograd.grad(out.sum(), u)
    assert rel_err(factor, expected / p.multiply_value) <= REL_TOL[torch.float64]
    assert torch.equal(factor.cpu()[u.detach() > 0], torch.zeros_like(expected[u.detach() > 0]))

    with torch.no_grad():
        y, saved, _ = saved_beyond_inputs(
            lambda: fused_convt.conv_transpose2d_fused(x.requires_grad_(), w, b, **p.epilogue_kwargs()), (x, w, b))
    assert saved == [] and y.grad_fn is None


# Double backward is refused with a message, not silently wrong.

@pytest.mark.parametrize("recompute", [False, True])
def test_double_backward_raises(device, recompute):
    x, w, b = MEMORY_PROBLEM.tensors(torch.float64, device, requires_grad=True)
    y = fused_convt.conv_transpose2d_fused(x, w, b, **MEMORY_PROBLEM.conv_kwargs(),
                                           **MEMORY_PROBLEM.epilogue_kwargs(), recompute=recompute)
    grad_input, grad_weight = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    assert grad_input.requires_grad  # the first-order gradient is a graph node, so misuse is caught later
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad_input.sum() + grad_weight.sum(), (x, w))


@pytest.mark.parametrize("loss", ["square_sum", "sum"])
def test_double_backward_through_function_raises(device, loss):
    """Also when the upstream gradient is a constant (loss = y.sum()): the first-order gradient is still a
    graph node whose backward refuses, never a silently constant gradient penalty."""
    x, w, b = MEMORY_PROBLEM.tensors(torch.float64, device, requires_grad=True)
    y = run_variant("function", MEMORY_PROBLEM, x, w, b)
    total = y.square().sum() if loss == "square_sum" else y.sum()
    (grad_input,) = torch.autograd.grad(total, (x,), create_graph=True)
    assert grad_input.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        grad_input.sum().backward()


# torch.compile sees the op as single nodes (fake kernels) and differentiates through register_autograd.

def test_torch_compile_fullgraph_matches_eager_gradients():
    problem = Problem(batch=2, in_channels=4, out_channels=6, in_hw=(5, 6), kernel=(3, 4), stride=(2, 1),
                      padding=(1, 1), output_padding=(1, 0), groups=2, add_value=-0.5, multiply_value=2.0)

    def loss_fn(x, w, b):
        y = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs())
        return (y * y).sum() + y.mean()

    tensors = problem.tensors(torch.float32, "cpu", seed=11, requires_grad=True)
    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_loss = compiled(*tensors)
    compiled_grads = torch.autograd.grad(compiled_loss, tensors)
    eager_loss = loss_fn(*tensors)
    eager_grads = torch.autograd.grad(eager_loss, tensors)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for ours, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
        assert expected.abs().sum() > 0


# Gradients for only some inputs.

PARTIAL_PROBLEM = Problem(batch=2, in_channels=4, out_channels=4, in_hw=(4, 5), kernel=(3, 2), stride=(2, 1),
                          padding=(1, 0), groups=2, add_value=-0.5, multiply_value=-1.5)


@pytest.mark.parametrize("variant", ["fused", "fused_recompute", "function", "identity"])
@pytest.mark.parametrize("wanted", ["x", "w", "b", "xw", "wb", "xb", "xw_no_bias"])
def test_gradients_for_some_inputs_only(device, variant, wanted):
    problem = PARTIAL_PROBLEM
    tensors = list(problem.tensors(torch.float64, device, seed=12))
    if wanted == "xw_no_bias":
        tensors[2] = None
    flags = [name in wanted for name in "xwb"]
    for t, flag in zip(tensors, flags):
        if t is not None:
            t.requires_grad_(flag)
    y = run_variant(variant, problem, *tensors)
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    y.backward(grad_output.to(device))

    ref = reference_grads(problem, tensors, grad_output, apply_epilogue=variant != "identity")
    for t, expected in zip(present(tensors), ref):
        if t.requires_grad:
            assert t.grad is not None and rel_err(t.grad, expected) <= REL_TOL[torch.float64]
        else:
            assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_backward_op_computes_only_the_masked_gradients(device, dtype):
    """Each gradient alone is bitwise the one computed with the others (on CUDA grad_bias comes from the
    grad_weight blocks or, without grad_weight, from the same kernel with the multiply off)."""
    p = PARTIAL_PROBLEM
    x, w, b = p.tensors(dtype, device, seed=14)
    conv = dict(stride=[*p.stride], padding=[*p.padding], output_padding=[*p.output_padding],
                dilation=[*p.dilation], groups=p.groups, add_value=p.add_value, multiply_value=p.multiply_value,
                apply_epilogue=True, allow_tf32=False)
    y, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, save_grad_factor=True, **conv)

    def backward_op(mask):
        return torch.ops.fused_convt.conv_transpose2d_fused_backward(torch.ones_like(y), x, w, b, factor,
                                                                     output_mask=mask, **conv)

    full = backward_op([True, True, True])
    for mask in ([False, True, False], [True, False, False], [False, False, True]):
        for wanted, ours, expected in zip(mask, backward_op(mask), full):
            if wanted:
                assert torch.equal(ours, expected)
            else:
                assert ours.numel() == 0


def test_frozen_module_weights_get_no_gradient(device):
    layer = fused_convt.FusedConvTranspose2d(3, 4, 3, stride=2, add_value=-0.5, multiply_value=2.0).to(device)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(15)).to(device).requires_grad_()
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert layer.bias.grad is not None and x.grad is not None
    assert layer.bias.grad.abs().sum() > 0


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops dispatched under it; the mode makes fused_convt take the custom-op path."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_plain_eager_path_equals_the_custom_op_path_bitwise(device):
    """In plain eager mode the op implementations are called directly (less host time); under a dispatch mode
    the custom ops run. Both must give bitwise the same output and gradients, and the mode must see the ops."""
    p = PARTIAL_PROBLEM
    results = []
    for mode in (None, _RecordOps()):
        x, w, b = p.tensors(torch.float32, device, seed=16, requires_grad=True)

        def run():
            y = fused_convt.conv_transpose2d_fused(x, w, b, **p.conv_kwargs(), **p.epilogue_kwargs())
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(17)).to(device))
            return y

        if mode is None:
            y = run()
        else:
            with mode:
                y = run()
            assert any("fused_convt.conv_transpose2d_fused.default" in n for n in mode.names)
            assert any("fused_convt.conv_transpose2d_fused_backward.default" in n for n in mode.names)
        results.append((y.detach(), x.grad, w.grad, b.grad))
    for plain, dispatched in zip(*results):
        assert torch.equal(plain, dispatched)


@pytest.mark.parametrize("dispatched", ["forward", "backward"])
def test_function_paths_mixed_across_forward_and_backward_agree_bitwise(device, dispatched):
    """FusedConvTranspose2dFunction keeps a direct forward's native problem description for a direct backward.
    A forward under a dispatch mode (the custom op runs, nothing is kept) with a plain backward, and a plain
    forward with its backward under the mode (the backward op runs, the kept description unused), must give
    bitwise the output and gradients of the plain run, and the mode must see the op it covered."""
    p = PARTIAL_PROBLEM

    def run(forward_mode, backward_mode):
        x, w, b = p.tensors(torch.float32, device, seed=18, requires_grad=True)
        with forward_mode:
            y = FusedConvTranspose2dFunction.apply(x, w, b, p.stride, p.padding, p.output_padding, p.groups,
                                                   p.dilation, p.add_value, p.multiply_value)
        with backward_mode:
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(19)).to(device))
        return y.detach(), x.grad, w.grad, b.grad

    plain = run(contextlib.nullcontext(), contextlib.nullcontext())
    mode = _RecordOps()
    if dispatched == "forward":
        mixed, op = run(mode, contextlib.nullcontext()), "fused_convt.conv_transpose2d_fused.default"
    else:
        mixed, op = run(contextlib.nullcontext(), mode), "fused_convt.conv_transpose2d_fused_backward.default"
    assert any(op in name for name in mode.names)
    for expected, got in zip(plain, mixed):
        assert torch.equal(expected, got)
