"""Tensors on any device: the op runs on the device of its inputs (made current for the launch, on that
device's current stream), refuses mixed devices, and trains under DistributedDataParallel.

The DDP test runs two processes over gloo on the CPU everywhere, and over NCCL with one GPU per process where
two GPUs exist; the cuda:1 tests need two GPUs and skip otherwise. On two Hopper GPUs the second cuda:1 test also
runs the sm_90a kernels (the column-pair forward, grad_input and grad_weight on wgmma: shared memory opted in per
device, tensor maps, the side stream) and checks that they ran."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

import fused_convt
from conftest import HAS_CUDA
from reference import Problem

two_gpus = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.device_count() >= 2), reason="needs two CUDA GPUs")
PROBLEM = Problem(batch=4, in_channels=12, out_channels=10, in_hw=(7, 9), kernel=(4, 3), stride=(2, 2),
                  padding=(1, 0), groups=2, add_value=-0.5, multiply_value=2.0)


# Of the sm_90a kernels' shapes (test_backward_wgmma.py): stride 2, 64 channels in and out, rows of 64 pixels.
HOPPER_PROBLEM = Problem(batch=2, in_channels=64, out_channels=64, in_hw=(5, 64), kernel=(4, 4), stride=(2, 2),
                         padding=(1, 1), add_value=-0.5, multiply_value=2.0)
HOPPER_KERNELS = ("pair_forward_kernel", "grad_input_wgmma_kernel", "grad_weight_wgmma_kernel")


def forward_backward(problem, x, w, b, grad, allow_tf32=False):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                           allow_tf32=allow_tf32)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, b.grad


def on_cuda1_with_cuda0_current(problem, dtype, allow_tf32=False):
    """The forward and backward on cuda:0, then on cuda:1 while cuda:0 is current, and the CUDA kernels of the
    second."""
    x, w, b = problem.tensors(dtype, "cuda:0")
    shape = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs()).shape
    grad = torch.randn(shape, device="cuda:0").to(dtype)
    on_zero = forward_backward(problem, x, w, b, grad, allow_tf32)
    with torch.cuda.device(0), profile(activities=[ProfilerActivity.CUDA]) as prof:
        on_one = forward_backward(problem, *(t.to("cuda:1") for t in (x, w, b, grad)), allow_tf32=allow_tf32)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    for a, c in zip(on_zero, on_one):
        assert c.device == torch.device("cuda:1")
        assert torch.equal(a, c.to("cuda:0"))
    return {event.key for event in prof.key_averages() if event.device_time_total > 0}


@two_gpus
def test_cuda1_with_cuda0_current_equals_cuda0_bitwise():
    on_cuda1_with_cuda0_current(PROBLEM, torch.float32)


@two_gpus
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sm90a_kernels_on_cuda1_equal_cuda0_bitwise(dtype):
    kernels = on_cuda1_with_cuda0_current(HOPPER_PROBLEM, dtype, allow_tf32=True)
    if all(torch.cuda.get_device_capability(i) == (9, 0) for i in range(2)):
        for name in HOPPER_KERNELS:
            assert any(name in kernel for kernel in kernels), (name, sorted(kernels))


@two_gpus
def test_mixed_devices_are_refused():
    x, w, b = PROBLEM.tensors(torch.float32, "cuda:0")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        fused_convt.conv_transpose2d_fused(x, w.to("cuda:1"), b)


def make_model(device):
    torch.manual_seed(7)
    return torch.nn.Sequential(
        fused_convt.FusedConvTranspose2d(6, 8, 3, stride=2, add_value=-0.3, multiply_value=2.0, allow_tf32=False),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        fused_convt.FusedConvTranspose2d(4, 3, (2, 3), stride=(1, 2), add_value=-0.2, allow_tf32=False),
    ).to(device)


def make_data(device):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(8, 6, 5, 5, generator=generator)
    target = torch.randn(8, 3, 12, 23, generator=generator) * 0.1
    return x.to(device), target.to(device)


def train(model, x, target, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


def ddp_worker(rank, world, backend, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    model = torch.nn.parallel.DistributedDataParallel(make_model(device),
                                                      device_ids=[rank] if backend == "nccl" else None)
    x, target = make_data(device)
    shard = slice(rank * 4, rank * 4 + 4)  # mean loss per shard; DDP averages the two halves' gradients
    train(model, x[shard], target[shard])
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, out_path)
    # Both ranks leave together: a rank tearing gloo down while its peer was still saving aborted the peer
    # ("terminate called without an active exception", SIGABRT) in one CI run of many.
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=two_gpus)])
def test_ddp_two_processes_equal_one_process_over_the_whole_batch(backend, tmp_path):
    out_path = str(tmp_path / "ddp_state.pt")
    mp.spawn(ddp_worker, args=(2, backend, free_port(), out_path), nprocs=2, join=True)
    device = "cuda:0" if backend == "nccl" else "cpu"
    single = make_model(device)
    initial = {k: v.detach().clone() for k, v in single.state_dict().items()}
    x, target = make_data(device)
    train(single, x, target)
    assert all(not torch.equal(initial[k], v) for k, v in single.state_dict().items()), "training moved nothing"
    ddp_state = torch.load(out_path)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value.cpu(), rtol=1e-5, atol=1e-6, msg=name)
