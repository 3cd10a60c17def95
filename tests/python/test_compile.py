"""torch.compile and torch.library.opcheck over the custom ops. Compilation is slow, so there are two
compiled callables per device: a training step through the functional op and the module in inference."""
import pytest
import torch

import fused_convt
from reference import REL_TOL, Problem, rel_err

PROBLEM = Problem(batch=2, in_channels=4, out_channels=6, in_hw=(5, 4), kernel=(3, 2), stride=(2, 1),
                  padding=(1, 0), output_padding=(1, 0), groups=2, add_value=-0.3, multiply_value=1.5)


def test_compiled_function_with_backward_matches_eager(device):
    """fullgraph=True: the op traces as one node (no graph break), forward and backward included."""
    torch._dynamo.reset()

    def loss_and_output(x, w, b):
        y = fused_convt.conv_transpose2d_fused(x, w, b, **PROBLEM.conv_kwargs(), **PROBLEM.epilogue_kwargs())
        return (y * y).sum(), y

    compiled = torch.compile(loss_and_output, fullgraph=True)
    results = []
    for fn in (loss_and_output, compiled):
        x, w, b = PROBLEM.tensors(torch.float32, device, seed=1, requires_grad=True)
        loss, y = fn(x, w, b)
        loss.backward()
        results.append((y.detach(), x.grad, w.grad, b.grad))
    (y_eager, *grads_eager), (y_compiled, *grads_compiled) = results
    assert 0.1 <= (y_eager != 0).double().mean().item() <= 0.9
    # Both run the same kernels on the same data; only the compiled graph's reduction order may differ.
    assert torch.equal(y_compiled, y_eager)
    for name, ours, eager in zip(("input", "weight", "bias"), grads_compiled, grads_eager):
        assert ours is not None and eager is not None, name
        assert rel_err(ours, eager.double()) <= REL_TOL[torch.float32], name


def test_compiled_module_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = fused_convt.FusedConvTranspose2d(6, 4, (2, 3), stride=(1, 2), padding=(0, 1), dilation=(2, 1),
                                              groups=2, add_value=-0.1, multiply_value=2.0).to(device)
    x = torch.randn(2, 6, 5, 4).to(device)
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        eager = module(x)
        assert torch.equal(compiled(x), eager)
        # A second input of the same shape reuses the compiled graph and still matches.
        x2 = torch.randn(2, 6, 5, 4).to(device)
        assert torch.equal(compiled(x2), module(x2))


def _conv_args(p: Problem):
    """The op's arguments after the tensors, up to apply_epilogue (on)."""
    return (list(p.stride), list(p.padding), list(p.output_padding), list(p.dilation), p.groups, p.add_value,
            p.multiply_value, True)


def _opcheck_args(dtype, device, bias, save_grad_factor, allow_tf32=False):
    p = Problem(**{**PROBLEM.__dict__, "bias": bias})
    x, w, b = p.tensors(dtype, device, seed=2, requires_grad=True)
    return (x, w, b, *_conv_args(p), save_grad_factor, allow_tf32)


@pytest.mark.parametrize("save_grad_factor", [True, False], ids=["save-factor", "recompute"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_forward_op(dtype, bias, save_grad_factor, device):
    """Schema, autograd registration, fake (meta) kernel and AOT dispatch with dynamic shapes."""
    args = _opcheck_args(dtype, device, bias, save_grad_factor)
    result = torch.library.opcheck(torch.ops.fused_convt.conv_transpose2d_fused.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor",
                           "test_aot_dispatch_dynamic"}


def test_opcheck_forward_op_with_tf32_flag(device):
    """allow_tf32 is part of the schema; on the CPU and for float64 it changes nothing."""
    result = torch.library.opcheck(torch.ops.fused_convt.conv_transpose2d_fused.default,
                                   _opcheck_args(torch.float64, device, True, True, allow_tf32=True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_opcheck_identity_epilogue_and_batch_zero(device):
    p = Problem(batch=0, in_channels=3, out_channels=3, in_hw=(4, 4), kernel=(3, 3), stride=(2, 2))
    x, w, b = p.tensors(torch.float32, device, seed=3, requires_grad=True)
    for apply_epilogue in (False, True):
        args = (x, w, b, [2, 2], [0, 0], [0, 0], [1, 1], 1, 0.0, 1.0, apply_epilogue, True, False)
        result = torch.library.opcheck(torch.ops.fused_convt.conv_transpose2d_fused.default, args)
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]],
                         ids=["all", "input-only", "params-only"])
@pytest.mark.parametrize("saved_factor", [True, False], ids=["saved-factor", "recompute"])
def test_opcheck_backward_op(saved_factor, mask, device):
    """The backward op with inputs that do not require grad: it has no derivative of its own (double
    backward raises by design), so AOT dispatch is checked on the first-order graph only."""
    x, w, b = PROBLEM.tensors(torch.float64, device, seed=4)
    allow_tf32 = False
    y, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *_conv_args(PROBLEM), True, allow_tf32)
    grad_output = torch.randn(y.shape, dtype=torch.float64).to(device)
    factor = factor if saved_factor else factor.new_empty(0)
    args = (grad_output, x, w, b, factor, *_conv_args(PROBLEM), allow_tf32, mask)
    result = torch.library.opcheck(torch.ops.fused_convt.conv_transpose2d_fused_backward.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
