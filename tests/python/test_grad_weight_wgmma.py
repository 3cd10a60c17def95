"""grad_weight on wgmma (cuda/grad_weight_wgmma.cuh; GPU only): on an sm_90 device, problems of its shape (one
group, input channels of whole 64s, 64 or 128k output channels, 2 x 2 taps per phase, input rows of whole 128-byte
chunks: 32 float or 64 16-bit pixels) take it with TF32, bfloat16 and float16; FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT=1
keeps them on the mma.sync GEMM. Both multiply the same operands and add in another order: their results agree to
the output's rounding, and each is within its precision's error of a float64 reference."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_convt
from conftest import requires_cuda
from reference import Problem

PROBLEMS = [
    # two warpgroups (128 output channels), padding 1: G's boxes start before the phase grid; rows of one float
    # chunk (32 pixels: 16-bit values take the mma.sync GEMM)
    Problem(2, 64, 128, (6, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5, multiply_value=2.0),
    # one warpgroup, two input channel tiles, padding 0 (phase rows of 65 pixels)
    Problem(1, 128, 64, (3, 64), (4, 4), (2, 2), add_value=-0.5),
    # two output channel blocks; row phases of different heights (output_padding)
    Problem(2, 64, 256, (5, 64), (4, 4), (2, 2), output_padding=(1, 0), add_value=-0.5),
]
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
# dtype -> (relative difference allowed between the two GEMMs, error allowed against float64)
DTYPES = {torch.float32: (1e-5, 3e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def takes_wgmma(p: Problem, dtype) -> bool:
    return ON_HOPPER and p.in_hw[1] % (128 // torch.empty(0, dtype=dtype).element_size()) == 0


def weight_gradient(p: Problem, x, w, b, grad, epilogue=True, channels_last=False):
    """(grad_weight, grad_input, grad_bias) of the op (float32 at TF32), and the names of the CUDA kernels that ran."""
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    op = fused_convt.conv_transpose2d_fused if epilogue else fused_convt.conv_transpose2d
    kwargs = p.epilogue_kwargs() if epilogue else {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op(*leaves, **p.conv_kwargs(), **kwargs, allow_tf32=True).backward(grad)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return leaves[1].grad, leaves[0].grad, leaves[2].grad, names


def ran_wgmma(names) -> bool:
    return any("grad_weight_wgmma_kernel" in name for name in names)


def random_grad(p: Problem, x, w, b):
    shape = fused_convt.conv_transpose2d(x, w, b, **p.conv_kwargs()).shape
    return torch.randn(shape, device="cuda").to(x.dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_wgmma_and_mma_sync_agree(index, dtype, monkeypatch):
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    grad = random_grad(p, x, w, b)
    monkeypatch.delenv("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT", raising=False)
    gw, gi, gb, names = weight_gradient(p, x, w, b, grad)
    assert ran_wgmma(names) == takes_wgmma(p, dtype)
    monkeypatch.setenv("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT", "1")
    gw_sync, gi_sync, gb_sync, names_sync = weight_gradient(p, x, w, b, grad)
    assert not ran_wgmma(names_sync)
    assert torch.isfinite(gw).all()
    diff = (gw.float() - gw_sync.float()).abs().max().item()
    assert diff <= DTYPES[dtype][0] * gw_sync.float().abs().max().item()
    # grad_input and grad_bias come from the same kernels either way
    assert torch.equal(gi, gi_sync) and torch.equal(gb, gb_sync)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_wgmma_grad_weight_matches_float64(index, dtype):
    """The plain transposed convolution (no epilogue: grad_weight is the GEMM alone) against float64 autograd on
    the same values."""
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=10 + index)
    grad = random_grad(p, x, w, b)
    gw, _, _, names = weight_gradient(p, x, w, b, grad, epilogue=False)
    assert ran_wgmma(names) == takes_wgmma(p, dtype)
    w64 = w.double().requires_grad_()
    torch.nn.functional.conv_transpose2d(x.double(), w64, b.double(), **p.conv_kwargs()).backward(grad.double())
    err = (gw.double() - w64.grad).abs().max().item() / w64.grad.abs().max().item()
    assert err < DTYPES[dtype][1]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_grad_weight_deterministic_and_layout_blind(dtype):
    """Bitwise the same on a second run, and with a channels_last input (transposed into the same NCHW copy)."""
    p = PROBLEMS[1]
    x, w, b = p.tensors(dtype, "cuda", seed=3)
    grad = random_grad(p, x, w, b)
    first = weight_gradient(p, x, w, b, grad)[0]
    second = weight_gradient(p, x, w, b, grad)[0]
    nhwc, _, _, names = weight_gradient(p, x, w, b, grad, channels_last=True)
    assert ran_wgmma(names) == takes_wgmma(p, dtype)
    assert torch.equal(first, second) and torch.equal(first, nhwc)


@requires_cuda
def test_empty_batch_of_a_wgmma_shape():
    """A shape the wgmma GEMM takes, with no images: zero weight and bias gradients (no tensor map of a zero
    extent is made)."""
    p = PROBLEMS[1]
    x, w, b = p.tensors(torch.float32, "cuda", seed=4)
    x = x[:0].clone()
    grad = torch.randn(fused_convt.conv_transpose2d(x, w, b, **p.conv_kwargs()).shape, device="cuda")
    gw, gi, gb, _ = weight_gradient(p, x, w, b, grad)
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
