"""grad_weight and grad_input on wgmma (cuda/grad_weight_wgmma.cuh, cuda/grad_input_wgmma.cuh; GPU only). On an sm_90
device, problems of their shapes take them with TF32, bfloat16 and float16:
- grad_weight: one group, input channels of whole 64s and 64 or 128k output channels (or, in its narrow tiles, input
  channels of whole 32s and 16 output channels), 2 x 2 taps per phase, input rows of whole 128-byte chunks (32 float
  or 64 16-bit pixels);
- grad_input (from the g pass's G, made where grad_weight is wanted): one group, input channels of whole 64s,
  output channels of whole 128-byte chunks (32 float or 64 16-bit), 2 x 2 taps per phase, input rows of whole 64s
  (or, in its narrow tiles, input channels of whole 32s, 16 output channels and rows of whole 32s).
FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT=1 / FUSED_CONVT_NO_WGMMA_GRAD_INPUT=1 keep them on mma.sync. Both kernels of a
gradient multiply the same operands and add in another order: their results agree to the output's rounding, and
each is within its precision's error of a float64 reference."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_convt
from conftest import requires_cuda
from reference import Problem

PROBLEMS = [
    # two warpgroups (128 output channels), padding 1: G's boxes start before the phase grid; rows of one float
    # chunk (32 pixels: 16-bit values in chunks of two rows; grad_input, whose rows are 64s, on mma.sync)
    Problem(2, 64, 128, (6, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5, multiply_value=2.0),
    # one warpgroup, two input channel tiles, padding 0 (phase rows of 65 pixels); a ragged row tile
    Problem(1, 128, 64, (3, 64), (4, 4), (2, 2), add_value=-0.5),
    # two output channel blocks; row phases of different heights (output_padding)
    Problem(2, 64, 256, (5, 64), (4, 4), (2, 2), output_padding=(1, 0), add_value=-0.5),
    # grad_input: two column tiles, three row tiles (17 rows), 96 output channels (float only; the GEMM on
    # mma.sync)
    Problem(2, 64, 96, (17, 128), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5),
    # two phases (stride 2 x 1, kernel 4 x 2: 2 x 2 taps each), non-square, padding on one axis
    Problem(1, 64, 128, (7, 64), (4, 2), (2, 1), padding=(1, 0), add_value=-0.5),
    # grad_weight's narrow tiles (16 output channels): rows of one float chunk (16-bit on mma.sync: an odd height),
    # padding 1; chunks of two rows (16-bit rows of 32, float rows of 16); two input channel tiles in rows of 64
    # (every type)
    Problem(2, 32, 16, (5, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5),
    Problem(2, 32, 16, (6, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5),
    Problem(3, 32, 16, (4, 16), (4, 4), (2, 2), add_value=-0.5),
    Problem(1, 64, 16, (3, 64), (4, 4), (2, 2), add_value=-0.5),
    # grad_input's narrow tiles: three row tiles of 8 rows (the last of one row, half an m tile), padding 0
    Problem(2, 32, 16, (17, 32), (4, 4), (2, 2), add_value=-0.5),
]
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
# dtype -> (relative difference allowed between the two kernels, error allowed against float64)
DTYPES = {torch.float32: (1e-5, 3e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
# gradient -> (its index in backward's results, the switch that keeps it on mma.sync, the wgmma kernel's name)
KERNELS = {
    "grad_weight": (0, "FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT", "grad_weight_wgmma_kernel"),
    "grad_input": (1, "FUSED_CONVT_NO_WGMMA_GRAD_INPUT", "grad_input_wgmma_kernel"),
}


def takes_wgmma(p: Problem, dtype, gradient) -> bool:
    chunk = 128 // torch.empty(0, dtype=dtype).element_size()
    if gradient == "grad_weight":
        narrow = p.out_channels == 16 and p.in_channels % 32 == 0
        # chunks of two rows (not in wide TF32 tiles)
        two_rows = (narrow or chunk == 64) and 2 * p.in_hw[1] == chunk and p.in_hw[0] % 2 == 0
        fits = (p.in_hw[1] % chunk == 0 or two_rows) and (narrow or p.out_channels == 64 or p.out_channels % 128 == 0)
    else:
        wide = p.in_channels % 64 == 0 and p.in_hw[1] % 64 == 0 and p.out_channels % chunk == 0
        narrow = p.in_channels % 32 == 0 and p.in_hw[1] % 32 == 0 and p.out_channels == 16
        fits = wide or narrow
    return ON_HOPPER and fits


def gradients(p: Problem, x, w, b, grad, epilogue=True, channels_last=False):
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


def ran(names, gradient) -> bool:
    return any(KERNELS[gradient][2] in name for name in names)


def random_grad(p: Problem, x, w, b):
    shape = fused_convt.conv_transpose2d(x, w, b, **p.conv_kwargs()).shape
    return torch.randn(shape, device="cuda").to(x.dtype)


@requires_cuda
@pytest.mark.parametrize("gradient", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_wgmma_and_mma_sync_agree(index, dtype, gradient, monkeypatch):
    p = PROBLEMS[index]
    which, switch, _ = KERNELS[gradient]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    grad = random_grad(p, x, w, b)
    for _, name, _ in KERNELS.values():
        monkeypatch.delenv(name, raising=False)
    on = gradients(p, x, w, b, grad)
    assert ran(on[3], gradient) == takes_wgmma(p, dtype, gradient)
    monkeypatch.setenv(switch, "1")
    off = gradients(p, x, w, b, grad)
    assert not ran(off[3], gradient)
    assert torch.isfinite(on[which]).all()
    diff = (on[which].float() - off[which].float()).abs().max().item()
    assert diff <= DTYPES[dtype][0] * off[which].float().abs().max().item()
    # the other gradients come from the same kernels either way
    for other in range(3):
        if other != which:
            assert torch.equal(on[other], off[other])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_wgmma_gradients_match_float64(index, dtype):
    """The plain transposed convolution (no epilogue: the gradients are the two GEMMs alone) against float64 autograd
    on the same values."""
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=10 + index)
    grad = random_grad(p, x, w, b)
    gw, gi, _, names = gradients(p, x, w, b, grad, epilogue=False)
    for gradient in KERNELS:
        assert ran(names, gradient) == takes_wgmma(p, dtype, gradient)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    torch.nn.functional.conv_transpose2d(x64, w64, b.double(), **p.conv_kwargs()).backward(grad.double())
    for ours, exact in ((gw, w64.grad), (gi, x64.grad)):
        err = (ours.double() - exact).abs().max().item() / exact.abs().max().item()
        assert err < DTYPES[dtype][1]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
# wide tiles (16-bit: chunks of two rows, then of one); the narrow ones, in chunks of two rows (16-bit) and of one;
# grad_input's narrow tiles with a ragged row tile
@pytest.mark.parametrize("index", [0, 1, len(PROBLEMS) - 4, len(PROBLEMS) - 2, len(PROBLEMS) - 1])
def test_wgmma_gradients_deterministic_and_layout_blind(index, dtype):
    """Bitwise the same on a second run, and with a channels_last input (transposed into the same NCHW copy)."""
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=3)
    grad = random_grad(p, x, w, b)
    first = gradients(p, x, w, b, grad)
    second = gradients(p, x, w, b, grad)
    nhwc = gradients(p, x, w, b, grad, channels_last=True)
    for gradient, (which, _, _) in KERNELS.items():
        assert ran(nhwc[3], gradient) == takes_wgmma(p, dtype, gradient)
        assert torch.equal(first[which], second[which]) and torch.equal(first[which], nhwc[which])


@requires_cuda
def test_empty_batch_of_a_wgmma_shape():
    """A shape both wgmma kernels take, with no images: zero weight and bias gradients, an empty grad_input (no
    tensor map of a zero extent is made)."""
    p = PROBLEMS[1]
    x, w, b = p.tensors(torch.float32, "cuda", seed=4)
    x = x[:0].clone()
    grad = torch.randn(fused_convt.conv_transpose2d(x, w, b, **p.conv_kwargs()).shape, device="cuda")
    gw, gi, gb, _ = gradients(p, x, w, b, grad)
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
