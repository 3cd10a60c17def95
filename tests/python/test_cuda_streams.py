"""CUDA execution contract: every launch goes on the caller's current stream, nothing on the hot path syncs
the host, and forward / forward+backward can be captured in a CUDA graph whose replay equals eager bitwise."""
import pytest
import torch

import fused_convt
from conftest import requires_cuda
from reference import Problem

pytestmark = requires_cuda

PROBLEM = Problem(batch=3, in_channels=20, out_channels=24, in_hw=(9, 11), kernel=(4, 3), stride=(2, 2),
                  padding=(1, 0), output_padding=(1, 0), groups=2, add_value=-0.5, multiply_value=2.0)


def fused(x, w, b, **kwargs):
    return fused_convt.conv_transpose2d_fused(x, w, b, **PROBLEM.conv_kwargs(), **PROBLEM.epilogue_kwargs(),
                                              **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recompute", [False, True])
def test_forward_and_backward_never_sync_the_host(dtype, recompute):
    x, w, b = PROBLEM.tensors(dtype, "cuda", requires_grad=True)
    grad = torch.randn(fused(x, w, b).shape, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = fused(x, w, b, recompute=recompute)
        y.backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_native_calls_get_the_current_stream_of_the_tensors_device():
    """ops._where hands the native code the raw handle of the current stream, a side stream's inside
    torch.cuda.stream, whichever way it reads it."""
    from fused_convt.ops import _where
    x = torch.zeros(1, device="cuda")
    assert _where(x) == (x.device.index, torch.cuda.current_stream().cuda_stream)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _where(x) == (x.device.index, side.cuda_stream)
    assert _where(torch.zeros(1)) == (-1, 0)


def test_runs_on_the_callers_stream_in_order():
    """Work queued before the op on a side stream (a long sleep, then writing x) must be seen by the op, and
    work queued after it must see its output, with no synchronisation in between."""
    x, w, b = PROBLEM.tensors(torch.float32, "cuda")
    new_x = torch.randn_like(x)
    expected = fused(new_x, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms: the default stream would run ahead if we used it
        x.copy_(new_x)
        y = fused(x, w, b)
        doubled = y * 2
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)
    assert torch.equal(doubled, expected * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_graph_replay_equals_eager_bitwise(dtype):
    x, w, b = PROBLEM.tensors(dtype, "cuda")
    eager = fused(x, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as PyTorch recommends
        fused(x, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fused(x, w, b))
    assert not torch.equal(captured, eager)  # the replay really recomputed from the new input


def test_forward_backward_graph_replay_equals_eager_bitwise():
    x, w, b = PROBLEM.tensors(torch.float32, "cuda", requires_grad=True)
    grad = torch.randn(fused(x, w, b).shape, device="cuda")

    def step():
        for t in (x, w, b):
            t.grad = None
        fused(x, w, b).backward(grad)
        return x.grad.clone(), w.grad.clone(), b.grad.clone()

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in (x, w, b):
            t.grad = None
        fused(x, w, b).backward(grad)
    graph.replay()
    torch.cuda.synchronize()
    for ours, ref in zip((x.grad, w.grad, b.grad), eager):
        assert torch.equal(ours, ref)
