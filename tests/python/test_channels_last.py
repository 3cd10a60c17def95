"""channels_last inputs. The CPU path reads NHWC in place always; on CUDA the tensor-core path does where it can
(float16 / bfloat16, whole 16-channel chunks per group), and so does the column-pair forward (sm_90a, stride_w 2;
float16, bfloat16, and float32 with TF32; inference and training); elsewhere (exact float32 here) the input is made NCHW
first. The output is channels_last too, as PyTorch's convolutions return for a channels_last input, written
NHWC by the kernels themselves. Either way the forward equals the NCHW input's bitwise (the same arithmetic on
the same values, without the transposes), and so do the gradients."""
import pytest
import torch

import fused_convt
from fused_convt.ops import _DTYPE_TAGS, _is_channels_last, _nchw, _params
from conftest import requires_cuda
from reference import composite_float64, rel_err

# (in channels, out channels, groups, kernel, stride, dtype, read in place)
CASES = [
    (32, 16, 1, 4, 2, torch.bfloat16, True),
    (64, 32, 2, 3, 1, torch.float16, True),
    (32, 32, 1, 5, 3, torch.bfloat16, True),
    (48, 48, 3, 4, 2, torch.bfloat16, True),
    (24, 16, 1, 4, 2, torch.bfloat16, False),  # 24 channels: a partial chunk, so an NCHW copy first
    (32, 16, 1, 4, 2, torch.float32, False),
]


def make(device, cin, cout, groups, k, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(3, cin, 9, 11, device=device, generator=g).to(dtype)
    w = (torch.randn(cin, cout // groups, k, k, device=device, generator=g) * 0.1).to(dtype)
    b = torch.randn(cout, device=device, generator=g).to(dtype)
    return x, w, b


@pytest.mark.parametrize("cin,cout,groups,k,stride,dtype,in_place", CASES)
def test_channels_last_input_matches_nchw_bitwise(device, cin, cout, groups, k, stride, dtype, in_place):
    x, w, b = make(device, cin, cout, groups, k, dtype)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    if device == "cuda":
        params = _params(x, w, True, (stride, stride), (1, 1), (0, 0), (1, 1), groups)
        assert fused_convt._C.forward_reads_channels_last(params, _DTYPE_TAGS[dtype], x.device.index) is in_place
    kwargs = dict(stride=stride, padding=1, groups=groups, add_value=-0.3, multiply_value=1.5)
    with torch.no_grad():
        expected = fused_convt.conv_transpose2d_fused(x, w, b, **kwargs)
        out = fused_convt.conv_transpose2d_fused(x_cl, w, b, **kwargs)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert expected.is_contiguous() and not out.isnan().any()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved-factor", "recompute"])
@pytest.mark.parametrize("cin,cout,groups,k,stride,dtype,in_place", CASES[:2] + CASES[-1:])
def test_channels_last_input_gradients_match_nchw(device, cin, cout, groups, k, stride, dtype, in_place, recompute):
    """The training forward stores the factor NCHW whatever the output's layout (the backward reads NCHW)."""
    kwargs = dict(stride=stride, padding=1, groups=groups, add_value=-0.3, multiply_value=1.5)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        x, w, b = make(device, cin, cout, groups, k, dtype)
        x = x.to(memory_format=layout).requires_grad_()
        w.requires_grad_()
        b.requires_grad_()
        y = fused_convt.FusedConvTranspose2dFunction.apply(x, w, b, stride, 1, 0, groups, 1, -0.3, 1.5, recompute)
        assert y.is_contiguous(memory_format=layout)
        grad = torch.randn(y.shape, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1))
        y.backward(grad.contiguous(memory_format=layout))
        grads.append((y.detach(), x.grad, w.grad, b.grad))
    for nchw, nhwc in zip(*grads):
        assert torch.equal(nchw, nhwc)


def test_channels_last_output_under_opcheck(device):
    """The fake kernel gives the output the real kernel's channels_last strides, and the factor NCHW's."""
    x, w, b = make(device, 32, 16, 1, 4, torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    args = (x, w.requires_grad_(), b.requires_grad_(), [2, 2], [1, 1], [0, 0], [1, 1], 1, -0.3, 1.5, True, True,
            False)
    result = torch.library.opcheck(torch.ops.fused_convt.conv_transpose2d_fused.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    out, factor = torch.ops.fused_convt.conv_transpose2d_fused(*args)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert factor.is_contiguous()


def _call_reads(params, dtype, x, training, allow_tf32):
    """forward_call_reads_channels_last for a call with a channels_last output and, when training, a factor
    (the pointers are only tested for null)."""
    return fused_convt._C.forward_call_reads_channels_last(params, _DTYPE_TAGS[dtype], x.device.index, 1,
                                                           1 if training else 0, allow_tf32, True)


@requires_cuda
@pytest.mark.parametrize("cin,cout,groups,k,stride,dtype,in_place", CASES)
def test_call_query_extends_the_problem_query(cin, cout, groups, k, stride, dtype, in_place):
    """Whatever is read in place for every call is read in place for each; the training forward (a factor beside
    the output) wherever the inference forward is (the column-pair kernel stores both; only the phase kernel's
    float32 copies). Exact float32 (TF32 off): its training forward never (the phase kernel stages a split copy of
    the input), its inference forward only through the column-pair kernel, which takes it at 16-channel tiles
    (output channels per group not a multiple of 32; docs/optimizations.md 7e)."""
    x, w, _ = make("cuda", cin, cout, groups, k, dtype)
    params = _params(x, w, True, (stride, stride), (1, 1), (0, 0), (1, 1), groups)
    for allow_tf32 in (False, True):
        inference = _call_reads(params, dtype, x, False, allow_tf32)
        training = _call_reads(params, dtype, x, True, allow_tf32)
        assert inference or not in_place
        if dtype == torch.float32 and not allow_tf32:
            assert not training
            assert not inference or (cout // groups) % 32 != 0
        else:
            assert training is inference


@requires_cuda
@pytest.mark.parametrize("cin,cout,k,stride", [(32, 16, 4, 2), (64, 32, 3, 2), (24, 16, 4, 2)])
def test_tf32_inference_with_channels_last_input(cin, cout, k, stride):
    """float32 with TF32 (the column-pair kernel on sm_90a, else the phase kernel after an NCHW copy): a
    channels_last input gives a channels_last output equal bitwise to the NCHW input's, within TF32's tolerance
    of the float64 composite."""
    x, w, b = make("cuda", cin, cout, 1, k, torch.float32)
    kwargs = dict(stride=stride, padding=1, add_value=-0.3, multiply_value=1.5)
    with torch.no_grad():
        expected = fused_convt.conv_transpose2d_fused(x, w, b, **kwargs, allow_tf32=True)
        out = fused_convt.conv_transpose2d_fused(x.to(memory_format=torch.channels_last), w, b, **kwargs,
                                                 allow_tf32=True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, expected)
    assert rel_err(out, composite_float64(x, w, b, **kwargs)) < 5e-3


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 64, 33, 31), (3, 40, 1, 70), (2, 24, 6, 10), (2, 130, 8, 9)])
def test_nchw_copy_of_channels_last_cuda_tensor(dtype, shape):
    """The backward's NCHW copy of a channels_last tensor (the library's tiled transpose, 2-, 4- and 8-byte values,
    tiles cut at every edge; 2- and 4-byte values in pairs where H * W and C are even, else one by one) is PyTorch's
    `.contiguous()` bitwise."""
    x = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    assert _is_channels_last(x)
    y = _nchw(x)
    assert y.is_contiguous() and y.dtype == dtype and torch.equal(y, x.contiguous())


@requires_cuda
def test_transpose_rejects_other_value_widths_cuda():
    x = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="2-, 4- or 8-byte values, got elem_bytes = 3"):
        fused_convt._C.transpose(x.data_ptr(), x.data_ptr(), 1, 1, 1, 3, x.device.index, 0)


@requires_cuda
@pytest.mark.parametrize("dtype,allow_tf32", [(torch.bfloat16, False), (torch.float32, True), (torch.float32, False),
                                              (torch.float64, False)], ids=["bf16", "tf32", "fp32", "fp64"])
def test_channels_last_grad_output_read_in_place_where_the_g_pass_reads_it(dtype, allow_tf32):
    """The CUDA backward reads a channels_last grad_output in place where the g pass is its only reader (grad_weight
    or grad_bias wanted, grad_input not wanted or taken from the g pass's copy), and a channels_last input (x) for
    grad_weight's copy: the same products in the same order, so every gradient equals the NCHW tensors' bitwise, for
    every output mask and layout; elsewhere they are made NCHW first."""
    x, w, b = make("cuda", 32, 16, 1, 4, dtype)
    conv = ([2, 2], [1, 1], [0, 0], [1, 1], 1, -0.3, 1.5, True)
    _, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *conv, True, allow_tf32)
    grad = torch.randn(factor.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)).to(dtype)
    grad_cl = grad.contiguous(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    params = _params(x, w, True, (2, 2), (1, 1), (0, 0), (1, 1), 1)
    for mask in ([True, True, True], [False, True, False], [False, False, True], [True, False, True],
                 [True, False, False]):
        reads = fused_convt._C.backward_call_reads_channels_last(params, _DTYPE_TAGS[dtype], 0, *mask, allow_tf32,
                                                                 True, False)
        reads_x = fused_convt._C.backward_call_reads_channels_last(params, _DTYPE_TAGS[dtype], 0, *mask, allow_tf32,
                                                                   False, True)
        assert reads_x is (dtype != torch.float64)  # x: any tensor-core call (32 channels)
        if dtype == torch.float64 or (mask[0] and not mask[1]):
            assert not reads  # float64 has no g pass; grad_input without grad_weight reads grad_output itself
        elif not mask[0] or dtype != torch.float32 or allow_tf32:
            assert reads  # (exact float32's grad_input copy path may not fit: either answer is consistent)
        expected = torch.ops.fused_convt.conv_transpose2d_fused_backward(grad, x, w, b, factor, *conv, allow_tf32, mask)
        for x_in, g_in in ((x, grad_cl), (x_cl, grad), (x_cl, grad_cl)):
            got = torch.ops.fused_convt.conv_transpose2d_fused_backward(g_in, x_in, w, b, factor, *conv, allow_tf32,
                                                                        mask)
            for name, e, g in zip(("grad_input", "grad_weight", "grad_bias"), expected, got):
                assert torch.equal(e, g), (mask, name, x_in.is_contiguous(), g_in.is_contiguous())
