"""The saved factor's dtype (float16 for float32 CUDA calls with TF32, the input's otherwise), the TF32 backward's
gradients against float64, and the backward op's check of the factor it is handed."""
import pytest
import torch

import fused_convt
from conftest import requires_cuda
from reference import Problem, rel_err

PROBLEM = Problem(batch=4, in_channels=8, out_channels=6, in_hw=(10, 9), kernel=(4, 3), stride=(2, 2), padding=(1, 0),
                  add_value=-0.3, multiply_value=2.0)
# Far from 1, so that a factor read without its scale (or scaled twice) is far off.
LARGE_SCALE = Problem(batch=2, in_channels=16, out_channels=16, in_hw=(12, 12), kernel=(4, 4), stride=(2, 2),
                      padding=(1, 1), add_value=-0.2, multiply_value=-300.0)


def conv_lists(p: Problem):
    return [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation], p.groups, p.add_value, p.multiply_value


def forward_op(p: Problem, x, w, b, allow_tf32):
    return torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *conv_lists(p), True, True, allow_tf32)


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_factor_dtype(device, dtype, allow_tf32):
    x, w, b = PROBLEM.tensors(dtype, device, seed=3)
    y, factor = forward_op(PROBLEM, x, w, b, allow_tf32)
    half = device == "cuda" and dtype == torch.float32 and allow_tf32
    assert factor.dtype == (torch.float16 if half else dtype) and factor.shape == y.shape and factor.is_contiguous()
    assert y.dtype == dtype


@requires_cuda
def test_bfloat16_factor_stays_bfloat16():
    x, w, b = PROBLEM.tensors(torch.bfloat16, "cuda", seed=3)
    assert forward_op(PROBLEM, x, w, b, True)[1].dtype == torch.bfloat16


@requires_cuda
@pytest.mark.parametrize("problem", [PROBLEM, LARGE_SCALE], ids=["m2", "m-300"])
def test_tf32_backward_matches_float64_on_its_factor(problem):
    """The TF32 backward (float16 factor, scaled back by multiply_value) against float64 gradients of the
    transposed convolution for g = grad_output x factor x multiply_value formed from the same saved factor: TF32's
    operand rounding only. (Against the float64 composite the TF32 forward's pre-activations fall on the other side
    of the kink u = 0 for some outputs, each moving g by m / 2 x grad_output: ~1% at these sizes, whatever the
    backward's precision.) The recompute backward rebuilds the same factor bits, so its gradients are equal."""
    x, w, b = problem.tensors(torch.float32, "cuda", seed=5)
    y, factor = forward_op(problem, x, w, b, True)
    assert factor.dtype == torch.float16
    assert 0.1 < (y != 0).double().mean().item() < 0.9  # both epilogue branches occur
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).cuda()

    def backward(f):
        return torch.ops.fused_convt.conv_transpose2d_fused_backward(grad_output, x, w, b, f, *conv_lists(problem),
                                                                     True, True, [True, True, True])

    ours = backward(factor)
    exact = [t.double().cpu().requires_grad_() for t in (x, w, b)]
    g = grad_output.double().cpu() * factor.double().cpu() * problem.multiply_value
    conv = torch.nn.functional.conv_transpose2d(*exact, **problem.conv_kwargs())
    expected = torch.autograd.grad(conv, exact, g)
    for name, mine, reference in zip(("grad_input", "grad_weight", "grad_bias"), ours, expected):
        assert rel_err(mine, reference) <= 2e-3, (name, rel_err(mine, reference))
    for name, mine, recomputed in zip(("grad_input", "grad_weight", "grad_bias"), ours, backward(factor[:0])):
        assert torch.equal(mine, recomputed), name


def test_backward_op_rejects_a_factor_of_another_dtype_or_shape(device):
    x, w, b = PROBLEM.tensors(torch.float32, device, seed=4)
    y, factor = forward_op(PROBLEM, x, w, b, False)
    grad = torch.ones_like(y)

    def backward(f):
        return torch.ops.fused_convt.conv_transpose2d_fused_backward(grad, x, w, b, f, *conv_lists(PROBLEM), True,
                                                                     False, [True, True, True])

    backward(factor)  # the forward's own factor is accepted
    for wrong in (factor.double(), factor.to(torch.float16), factor[:1]):
        with pytest.raises(ValueError, match="grad_factor must be the forward op's second output"):
            backward(wrong)
