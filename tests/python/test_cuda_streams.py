"""CUDA execution contract: every launch goes on the caller's current stream, nothing on the hot path syncs
the host, and forward / forward+backward can be captured in a CUDA graph whose replay equals eager bitwise."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

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


def _gradients(x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    fused(*leaves).backward(grad)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_side_stream_equals_serial_bitwise(dtype, monkeypatch):
    """With grad_input and grad_weight both wanted, grad_weight's chain runs on a side stream forked from the
    caller's (cuda/side_stream.h); FUSED_CONVT_SERIAL_BACKWARD keeps it on one stream. Same kernels, same bits."""
    x, w, b = PROBLEM.tensors(dtype, "cuda")
    grad = torch.randn(fused(x, w, b).shape, device="cuda", dtype=dtype)
    monkeypatch.setenv("FUSED_CONVT_SERIAL_BACKWARD", "1")
    serial = _gradients(x, w, b, grad)
    monkeypatch.delenv("FUSED_CONVT_SERIAL_BACKWARD")
    forked = _gradients(x, w, b, grad)
    for ours, ref in zip(forked, serial):
        assert torch.equal(ours, ref)
    assert all(t.abs().max() > 0 for t in forked)


def test_backward_side_stream_joins_before_later_work():
    """The caller's stream waits for the side stream: work queued after the backward on the caller's stream
    (reading grad_weight, then overwriting the inputs) sees the finished gradients, with no host sync between."""
    x, w, b = PROBLEM.tensors(torch.float32, "cuda")
    grad = torch.randn(fused(x, w, b).shape, device="cuda")
    expected = _gradients(x, w, b, grad)
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        fused(*leaves).backward(grad)
        weight_grad = leaves[1].grad.clone()  # queued on the caller's stream right after the join
        assert torch.equal(weight_grad, expected[1])
        assert torch.equal(leaves[0].grad, expected[0])


def test_first_backward_of_a_thread_inside_a_graph_capture():
    """A thread's side stream is created on its first forked backward, which must not happen inside a capture:
    there the backward runs serially, and the replay still equals eager bitwise. The backward op is called from a
    new thread (autograd would run it on its own device thread, whose side stream earlier tests made)."""
    import threading
    x, w, b = PROBLEM.tensors(torch.float32, "cuda")
    conv = [[*PROBLEM.stride], [*PROBLEM.padding], [*PROBLEM.output_padding], [*PROBLEM.dilation], PROBLEM.groups,
            PROBLEM.add_value, PROBLEM.multiply_value, True]
    y, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *conv, save_grad_factor=True, allow_tf32=True)
    grad = torch.randn(y.shape, device="cuda")

    def backward():
        return torch.ops.fused_convt.conv_transpose2d_fused_backward(grad, x, w, b, factor, *conv, True,
                                                                      [True, True, True])

    eager = backward()
    outcome = {}

    def capture():
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = backward()
            graph.replay()
            torch.cuda.synchronize()
            outcome["captured"] = captured
            outcome["forked"] = backward()  # outside the capture: this thread's side stream now exists
            torch.cuda.synchronize()
        except Exception as error:  # reported to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=capture)
    thread.start()
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    for result in (outcome["captured"], outcome["forked"]):
        for ours, ref in zip(result, eager):
            assert torch.equal(ours, ref)


def _chain_and_gradients(layers, x, grad):
    """Calls of `layers` one after another, each reading the last one's output; the output and the gradients of x
    and of every parameter."""
    x = x.detach().clone().requires_grad_()
    y = x
    for layer in layers:
        y = layer(y)
    params = [p for layer in layers for p in layer.parameters()]
    return [y.detach(), *torch.autograd.grad(y, [x, *params], grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programmatic_launches_equal_serial_launches_bitwise(dtype, monkeypatch):
    """On compute capability 9.0 the kernels of calls whose tensors fit in L2 are launched for programmatic
    dependent launch (cuda/cuda_common.cuh: a kernel's blocks may start while the previous kernel's last ones run,
    and wait for its writes inside); FUSED_CONVT_SERIAL_LAUNCHES launches without. A chain of calls on one stream, each reading the last
    one's output, its backward, PROBLEM's (the phase kernels) and a CUDA graph of the chain all give the same bits
    either way. At 64 channels and stride 2 the chain takes the sm_90a kernels on an H100 (the pair forward,
    grad_input and grad_weight on wgmma; float as TF32)."""
    torch.manual_seed(0)
    layers = [fused_convt.FusedConvTranspose2d(64, 64, 4, stride=2, padding=1, add_value=-0.5, multiply_value=2.0,
                                               allow_tf32=True, device="cuda", dtype=dtype) for _ in range(3)]
    x = torch.randn(2, 64, 3, 64, device="cuda", dtype=dtype)  # rows of 64 pixels: grad_input's wgmma tiles
    grad = torch.randn(2, 64, 24, 512, device="cuda", dtype=dtype)
    px, pw, pb = PROBLEM.tensors(dtype, "cuda")
    pgrad = torch.randn(fused(px, pw, pb).shape, device="cuda", dtype=dtype)

    def run():
        results = _chain_and_gradients(layers, x, grad) + _gradients(px, pw, pb, pgrad)

        def chain():
            y = x
            for layer in layers:
                y = layer(y)
            return y

        graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            side = torch.cuda.Stream()  # a warm-up outside the capture, on a side stream (graph capture's rule)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                chain()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                captured = chain()
            eager = chain()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        return results + [eager]

    monkeypatch.setenv("FUSED_CONVT_SERIAL_LAUNCHES", "1")
    serial = run()
    monkeypatch.delenv("FUSED_CONVT_SERIAL_LAUNCHES")
    programmatic = run()
    for ours, ref in zip(programmatic, serial):
        assert torch.equal(ours, ref)
    assert all(t.abs().max() > 0 for t in programmatic)
    if torch.cuda.get_device_capability() == (9, 0):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _chain_and_gradients(layers, x, grad)
            torch.cuda.synchronize()
        kernels = {event.key for event in prof.key_averages() if event.device_time_total > 0}
        for name in ("pair_forward_kernel", "grad_input_wgmma_kernel", "grad_weight_wgmma_kernel"):
            assert any(name in kernel for kernel in kernels), (name, sorted(kernels))
