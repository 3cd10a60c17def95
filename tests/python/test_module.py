"""FusedConvTranspose2d against its twin nn.ConvTranspose2d: the same parameters, the same initialization,
interchangeable state_dicts, and the output of the twin followed by the epilogue."""
import pytest
import torch
from torch import nn

import fused_convt
from conftest import requires_cuda
from reference import REL_TOL, rel_err

# (in_channels, out_channels, kernel_size, constructor keywords)
CONFIGS = [
    pytest.param(4, 6, 3, dict(stride=2, padding=1, output_padding=1), id="s2-p1-op1"),
    pytest.param(6, 4, (2, 3), dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1), groups=2), id="nonsquare-grouped"),
    pytest.param(3, 5, 4, dict(stride=3, bias=False), id="s3-nobias"),
    pytest.param(6, 6, 3, dict(stride=2, groups=6, dilation=2, output_padding=1), id="depthwise-dilated"),
]
EPILOGUE = dict(add_value=-0.1, multiply_value=1.5)


def twins(cin, cout, kernel, kwargs, seed=0, **epilogue):
    """(nn.ConvTranspose2d, FusedConvTranspose2d), each built right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    plain = nn.ConvTranspose2d(cin, cout, kernel, **kwargs)
    torch.manual_seed(seed)
    fused = fused_convt.FusedConvTranspose2d(cin, cout, kernel, **kwargs, **(epilogue or EPILOGUE))
    return plain, fused


def epilogue_of(module, x, output_size=None):
    """The twin's own forward (so its output_size handling too) followed by the epilogue, in float64."""
    module64 = nn.ConvTranspose2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                  module.padding, module.output_padding, module.groups, module.bias is not None,
                                  module.dilation, dtype=torch.float64)
    module64.load_state_dict({k: v.to("cpu", torch.float64) for k, v in module.state_dict().items()})
    with torch.no_grad():
        pre = module64(x.to("cpu", torch.float64), output_size=output_size) + EPILOGUE["add_value"]
        return torch.nn.functional.gelu(pre.clamp_max(0)) * EPILOGUE["multiply_value"]


@pytest.mark.parametrize("cin,cout,kernel,kwargs", CONFIGS)
def test_parameters_and_init_match_nn_conv_transpose2d(cin, cout, kernel, kwargs):
    plain, fused = twins(cin, cout, kernel, kwargs, seed=3)
    assert isinstance(fused, nn.ConvTranspose2d)
    named_plain, named_fused = dict(plain.named_parameters()), dict(fused.named_parameters())
    assert list(named_fused) == list(named_plain)
    for name, param in named_plain.items():
        assert named_fused[name].shape == param.shape
        assert torch.equal(named_fused[name], param), f"{name} initialized differently"
    assert (fused.bias is None) == (kwargs.get("bias", True) is False)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert list(fused.buffers()) == []


@pytest.mark.parametrize("cin,cout,kernel,kwargs", CONFIGS)
def test_state_dict_loads_both_ways(cin, cout, kernel, kwargs):
    plain, fused = twins(cin, cout, kernel, kwargs, seed=1)
    _, fused_other = twins(cin, cout, kernel, kwargs, seed=2)
    plain_other, _ = twins(cin, cout, kernel, kwargs, seed=4)
    assert not torch.equal(fused_other.weight, plain.weight)

    fused_other.load_state_dict(plain.state_dict(), strict=True)
    plain_other.load_state_dict(fused.state_dict(), strict=True)
    for a, b in ((fused_other, plain), (plain_other, fused)):
        for (name_a, value_a), (name_b, value_b) in zip(a.state_dict().items(), b.state_dict().items()):
            assert name_a == name_b and torch.equal(value_a, value_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cin,cout,kernel,kwargs", CONFIGS)
def test_output_is_twin_followed_by_epilogue(cin, cout, kernel, kwargs, dtype, device):
    plain, fused = twins(cin, cout, kernel, kwargs, seed=5)
    fused = fused.to(device, dtype)
    x = torch.randn(2, cin, 5, 4, dtype=dtype).to(device)
    out = fused(x)
    ref = epilogue_of(plain, x)
    assert out.dtype == dtype and out.device.type == device
    assert out.shape == ref.shape
    assert 0.1 <= (ref != 0).double().mean().item() <= 0.9
    assert rel_err(out, ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("extra_rows,extra_cols", [(0, 0), (1, 0), (1, 2)], ids=["base", "plus-row", "plus-both"])
def test_output_size_argument_matches_nn(extra_rows, extra_cols, device):
    """output_size picks the output_padding within [0, stride) like nn.ConvTranspose2d; also as the full
    [N, C, H, W] shape."""
    plain, fused = twins(4, 3, 3, dict(stride=3, padding=1), seed=6)
    fused = fused.to(device)
    x = torch.randn(2, 4, 4, 5).to(device)
    base = (10, 13)  # (4 - 1) * 3 - 2 + 2 + 1, (5 - 1) * 3 - 2 + 2 + 1
    size = [base[0] + extra_rows, base[1] + extra_cols]
    for output_size in (size, [2, 3] + size):
        out = fused(x, output_size=output_size)
        assert list(out.shape) == [2, 3] + size
        assert rel_err(out, epilogue_of(plain, x, output_size=size)) <= REL_TOL[torch.float32]
    assert fused(x).shape == (2, 3, *base)


def test_output_size_out_of_range_is_refused_like_nn():
    plain, fused = twins(4, 3, 3, dict(stride=2), seed=7)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError) as plain_error:
        plain(x, output_size=[12, 9])
    with pytest.raises(ValueError) as fused_error:
        fused(x, output_size=[12, 9])
    assert str(fused_error.value) == str(plain_error.value)


def test_no_bias_module(device):
    plain, fused = twins(4, 6, (3, 2), dict(stride=2, bias=False), seed=8)
    assert fused.bias is None and "bias" not in fused.state_dict()
    fused = fused.to(device)
    x = torch.randn(3, 4, 5, 5).to(device)
    out = fused(x)
    assert rel_err(out, epilogue_of(plain, x)) <= REL_TOL[torch.float32]


def test_default_epilogue_is_gelu_of_min():
    """add_value 0 and multiply_value 1 by default: out = GELU(min(ConvTranspose2d(x), 0))."""
    torch.manual_seed(9)
    plain = nn.ConvTranspose2d(3, 4, 3, stride=2)
    torch.manual_seed(9)
    fused = fused_convt.FusedConvTranspose2d(3, 4, 3, stride=2)
    assert (fused.add_value, fused.multiply_value, fused.recompute) == (0.0, 1.0, False)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        ref = torch.nn.functional.gelu(plain(x).double().clamp_max(0))
    assert rel_err(fused(x), ref) <= REL_TOL[torch.float32]


def test_unbatched_input_through_the_module(device):
    plain, fused = twins(4, 6, 3, dict(stride=2, padding=1), seed=10)
    fused = fused.to(device)
    x = torch.randn(4, 5, 6).to(device)
    out = fused(x)
    assert out.shape == (6, 9, 11)
    assert rel_err(out, epilogue_of(plain, x[None])[0]) <= REL_TOL[torch.float32]


def test_extra_repr_names_the_epilogue():
    module = fused_convt.FusedConvTranspose2d(4, 3, 3, stride=2, add_value=0.5, multiply_value=2.0)
    text = repr(module)
    assert text.startswith("FusedConvTranspose2d(4, 3, kernel_size=(3, 3), stride=(2, 2)")
    assert "add_value=0.5" in text and "multiply_value=2.0" in text
    assert "recompute" not in text
    assert "recompute=True" in repr(fused_convt.FusedConvTranspose2d(4, 3, 3, recompute=True))


def test_constructor_dtype_and_scalars():
    module = fused_convt.FusedConvTranspose2d(2, 2, 2, dtype=torch.float64, add_value=1, multiply_value=-2)
    assert module.weight.dtype == torch.float64
    assert isinstance(module.add_value, float) and module.add_value == 1.0
    assert isinstance(module.multiply_value, float) and module.multiply_value == -2.0
    assert module(torch.randn(1, 2, 3, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16),
                                          pytest.param("cuda", torch.bfloat16, marks=requires_cuda),
                                          pytest.param("cuda", torch.float16, marks=requires_cuda)])
def test_autocast_runs_in_the_autocast_dtype_and_trains_fp32_weights(device, dtype):
    """Mixed-precision training: fp32 module and input under torch.autocast run the op in the autocast dtype
    (like nn.ConvTranspose2d), and gradients reach the fp32 parameters."""
    torch.manual_seed(3)
    fused = fused_convt.FusedConvTranspose2d(4, 6, 3, stride=2, add_value=-0.5, multiply_value=2.0).to(device)
    twin = nn.ConvTranspose2d(4, 6, 3, stride=2).to(device)
    twin.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 5, 5, device=device)
    with torch.autocast(device, dtype=dtype):
        y = fused(x)
        conv = twin(x)
    assert y.dtype == dtype and conv.dtype == dtype
    expected = torch.nn.functional.gelu(torch.min(conv.double() - 0.5, torch.tensor(0.0, device=device))) * 2.0
    assert (y.double() - expected).abs().max().item() <= 3e-2 * expected.abs().max().item()
    y.float().sum().backward()
    assert fused.weight.grad is not None and fused.weight.grad.dtype == torch.float32
    assert fused.weight.grad.abs().sum() > 0
