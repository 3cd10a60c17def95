"""Every refusal of the public entry points: the exception type (TypeError for a wrong type or dtype,
ValueError for a wrong value, as _validation.py raises them), a message naming the argument, and a
valid call that still works afterwards."""
import math
import random

import pytest
import torch

import fused_convt
from conftest import requires_cuda
from fused_convt import _validation
from reference import REL_TOL, composite_float64, rel_err

# The valid call every case perturbs: input [2, 4, 5, 6], weight [4, 3, 3, 2] (out_channels 3), bias [3],
# stride 2, padding 1, output_padding 1: output [2, 3, 10, 11].
STRIDE, PADDING, OUTPUT_PADDING, DILATION, GROUPS = 2, 1, 1, 1, 1


def valid_args(device):
    g = torch.Generator().manual_seed(0)
    return dict(
        input=torch.randn(2, 4, 5, 6, generator=g).to(device),
        weight=(torch.randn(4, 3, 3, 2, generator=g) / 4).to(device),
        bias=torch.randn(3, generator=g).to(device),
        stride=STRIDE, padding=PADDING, output_padding=OUTPUT_PADDING, groups=GROUPS, dilation=DILATION,
        add_value=-0.5, multiply_value=2.0,
    )


def _with(**changes):
    """A case builder: the valid arguments with some replaced; a callable value receives the valid args."""
    def build(args):
        return {**args, **{k: (v(args) if callable(v) else v) for k, v in changes.items()}}
    return build


# (id, build, exception, message regex)
CASES = [
    # dtypes and types: TypeError
    ("input-int64", _with(input=lambda a: a["input"].long()), TypeError, r"input dtype .*got torch\.int64"),
    ("input-int32", _with(input=lambda a: a["input"].int()), TypeError, r"input dtype .*got torch\.int32"),
    ("input-bool", _with(input=lambda a: a["input"] > 0), TypeError, r"input dtype .*got torch\.bool"),
    ("input-complex", _with(input=lambda a: a["input"].to(torch.complex64)), TypeError, r"input dtype"),
    ("all-int", _with(input=lambda a: a["input"].long(), weight=lambda a: a["weight"].long(),
                      bias=lambda a: a["bias"].long()), TypeError, r"input dtype"),
    ("weight-float64", _with(weight=lambda a: a["weight"].double()), TypeError,
     r"weight dtype torch\.float64 must match input dtype torch\.float32"),
    ("weight-int", _with(weight=lambda a: a["weight"].int()), TypeError, r"weight dtype torch\.int32"),
    ("bias-float16", _with(bias=lambda a: a["bias"].half()), TypeError,
     r"bias dtype torch\.float16 must match input dtype torch\.float32"),
    ("input-half-weight-float", _with(input=lambda a: a["input"].half()), TypeError,
     r"weight dtype torch\.float32 must match input dtype torch\.float16"),
    ("input-list", _with(input=lambda a: a["input"].tolist()), TypeError, r"input must be a torch\.Tensor"),
    ("weight-list", _with(weight=lambda a: a["weight"].tolist()), TypeError, r"weight must be a torch\.Tensor"),
    ("bias-list", _with(bias=[0.0, 0.0, 0.0]), TypeError, r"bias must be a torch\.Tensor or None"),
    ("stride-float", _with(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1\.5"),
    ("stride-bool", _with(stride=True), TypeError, r"stride must be an int or a pair of ints, got True"),
    ("stride-str", _with(stride="2"), TypeError, r"stride must be an int or a pair"),
    ("stride-triple", _with(stride=(2, 2, 2)), TypeError, r"stride must be an int or a pair"),
    ("stride-float-pair", _with(stride=(2.0, 2.0)), TypeError, r"stride must be an int or a pair"),
    ("stride-empty", _with(stride=()), TypeError, r"stride must be an int or a pair"),
    ("padding-float", _with(padding=1.0), TypeError, r"(?<!output_)padding must be an int or a pair"),
    ("output-padding-none", _with(output_padding=None), TypeError, r"output_padding must be an int or a pair"),
    ("dilation-float", _with(dilation=[1, 1.0]), TypeError, r"dilation must be an int or a pair"),
    # ranks and shapes: ValueError
    ("input-2d", _with(input=lambda a: a["input"][0, 0]), ValueError, r"input must be 4-D .*got shape \(5, 6\)"),
    ("input-5d", _with(input=lambda a: a["input"][None]), ValueError, r"input must be 4-D"),
    ("weight-3d", _with(weight=lambda a: a["weight"][0]), ValueError, r"weight must be 4-D .*got shape \(3, 3, 2\)"),
    ("weight-5d", _with(weight=lambda a: a["weight"][None]), ValueError, r"weight must be 4-D"),
    ("weight-channels", _with(weight=lambda a: torch.cat([a["weight"], a["weight"][:1]])), ValueError,
     r"weight\.shape\[0\] \(5\) must equal input channels \(4\)"),
    ("weight-empty-out-channels", _with(weight=lambda a: a["weight"][:, :0], bias=None), ValueError,
     r"weight must have non-empty dims"),
    ("weight-empty-kernel", _with(weight=lambda a: a["weight"][:, :, :0]), ValueError,
     r"weight must have non-empty dims"),
    ("input-empty-height", _with(input=lambda a: a["input"][:, :, :0]), ValueError,
     r"input channels, height and width must be > 0"),
    ("groups-not-dividing", _with(groups=3), ValueError, r"in_channels \(4\) must be divisible by groups \(3\)"),
    ("groups-zero", _with(groups=0), ValueError, r"groups must be a positive int, got 0"),
    ("groups-negative", _with(groups=-2), ValueError, r"groups must be a positive int, got -2"),
    ("groups-float", _with(groups=1.0), TypeError, r"groups must be a positive int, got 1\.0"),
    ("groups-bool", _with(groups=True), TypeError, r"groups must be a positive int, got True"),
    ("bias-too-long", _with(bias=lambda a: torch.cat([a["bias"], a["bias"][:1]])), ValueError,
     r"bias must have shape \[3\] \(out_channels\), got \(4,\)"),
    ("bias-2d", _with(bias=lambda a: a["bias"][None]), ValueError, r"bias must have shape \[3\]"),
    ("bias-grouped", _with(groups=2, weight=lambda a: a["weight"][:, :2]), ValueError,
     r"bias must have shape \[4\] \(out_channels\), got \(3,\)"),
    # convolution hyper-parameters: ValueError
    ("stride-zero", _with(stride=0), ValueError, r"stride must be >= 1 in each dimension, got \(0, 0\)"),
    ("stride-negative", _with(stride=(2, -1)), ValueError, r"stride must be >= 1 in each dimension, got \(2, -1\)"),
    ("dilation-zero", _with(dilation=(0, 1)), ValueError, r"dilation must be >= 1 in each dimension, got \(0, 1\)"),
    ("dilation-negative", _with(dilation=-1), ValueError, r"dilation must be >= 1"),
    ("padding-negative", _with(padding=(0, -1)), ValueError,
     r"(?<!output_)padding must be >= 0 in each dimension, got \(0, -1\)"),
    ("output-padding-negative", _with(output_padding=-1), ValueError, r"output_padding must be >= 0"),
    ("output-padding-h", _with(output_padding=(2, 1)), ValueError,
     r"output_padding\[0\] = 2 must be smaller than stride\[0\] \(2\) or dilation\[0\] \(1\)"),
    ("output-padding-w", _with(stride=(2, 1), output_padding=(1, 1)), ValueError,
     r"output_padding\[1\] = 1 must be smaller than stride\[1\] \(1\) or dilation\[1\] \(1\)"),
    ("output-padding-dilated", _with(stride=1, dilation=2, output_padding=2), ValueError,
     r"output_padding\[0\] = 2 must be smaller than stride\[0\] \(1\) or dilation\[0\] \(2\)"),
    # out_h = 4*2 - 2*6 + 2 + 1 + 1 = 0: exactly empty.
    ("padding-empty-output", _with(padding=6), ValueError,
     r"padding \(6, 6\) leaves an empty output \(computed size \(0, 1\)\)"),
    ("padding-negative-output", _with(padding=(1, 20)), ValueError, r"padding \(1, 20\) leaves an empty output"),
    # epilogue scalars: ValueError for a non-finite number, TypeError for something that is not a number
    ("add-nan", _with(add_value=math.nan), ValueError, r"add_value must be a finite float, got nan"),
    ("add-inf", _with(add_value=math.inf), ValueError, r"add_value must be a finite float, got inf"),
    ("add-neg-inf", _with(add_value=-math.inf), ValueError, r"add_value must be a finite float, got -inf"),
    ("add-str", _with(add_value="0.5"), TypeError, r"add_value must be a finite float"),
    ("add-bool", _with(add_value=True), TypeError, r"add_value must be a finite float, got True"),
    ("add-huge-int", _with(add_value=10**400), ValueError, r"add_value must be a finite float"),
    ("multiply-nan", _with(multiply_value=math.nan), ValueError, r"multiply_value must be a finite float, got nan"),
    ("multiply-inf", _with(multiply_value=-math.inf), ValueError, r"multiply_value must be a finite float"),
    ("multiply-none", _with(multiply_value=None), TypeError, r"multiply_value must be a finite float"),
]
EPILOGUE_ARGS = ("add_value", "multiply_value")
CASE_PARAMS = [pytest.param(build, exc, msg, id=name) for name, build, exc, msg in CASES]
CONV_CASE_PARAMS = [pytest.param(build, exc, msg, id=name) for name, build, exc, msg in CASES
                    if not any(arg in name for arg in ("add-", "multiply-"))]


def call_fused(a):
    return fused_convt.conv_transpose2d_fused(**a)


def call_identity(a):
    a = {k: v for k, v in a.items() if k not in EPILOGUE_ARGS}
    return fused_convt.conv_transpose2d(**a)


def call_function(a):
    return fused_convt.FusedConvTranspose2dFunction.apply(
        a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["output_padding"], a["groups"],
        a["dilation"], a["add_value"], a["multiply_value"])


def assert_valid_call_works(device, call=call_fused):
    a = valid_args(device)
    out = call(a)
    conv = dict(stride=STRIDE, padding=PADDING, output_padding=OUTPUT_PADDING, groups=GROUPS, dilation=DILATION)
    if call is call_identity:
        ref = composite_float64(a["input"], a["weight"], a["bias"], apply_epilogue=False, **conv)
    else:
        ref = composite_float64(a["input"], a["weight"], a["bias"], add_value=-0.5, multiply_value=2.0, **conv)
    assert out.shape == (2, 3, 10, 11)
    assert rel_err(out, ref) <= REL_TOL[torch.float32]


def test_the_valid_call_is_valid(device):
    for call in (call_fused, call_identity, call_function):
        assert_valid_call_works(device, call)


@pytest.mark.parametrize("build,exc,msg", CASE_PARAMS)
def test_fused_refuses(build, exc, msg, device):
    with pytest.raises(exc, match=msg):
        call_fused(build(valid_args(device)))
    assert_valid_call_works(device)


@pytest.mark.parametrize("build,exc,msg", CONV_CASE_PARAMS)
def test_identity_op_refuses(build, exc, msg, device):
    with pytest.raises(exc, match=msg):
        call_identity(build(valid_args(device)))
    assert_valid_call_works(device, call_identity)


@pytest.mark.parametrize("build,exc,msg", CASE_PARAMS)
def test_autograd_function_refuses(build, exc, msg, device):
    with pytest.raises(exc, match=msg):
        call_function(build(valid_args(device)))
    assert_valid_call_works(device, call_function)


@requires_cuda
@pytest.mark.parametrize("moved", ["input", "weight", "bias"])
def test_device_mismatch_is_refused(moved):
    a = valid_args("cpu")
    a[moved] = a[moved].cuda()
    with pytest.raises(ValueError, match=r"all tensors must be on one device; input is on .*(weight|bias) on"):
        call_fused(a)
    assert_valid_call_works("cuda")
    assert_valid_call_works("cpu")


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_module_refuses_padding_modes_other_than_zeros(padding_mode):
    with pytest.raises(ValueError, match=rf"padding_mode='zeros'.*got '{padding_mode}'"):
        fused_convt.FusedConvTranspose2d(4, 3, 3, padding_mode=padding_mode)
    module = fused_convt.FusedConvTranspose2d(4, 3, 3, padding_mode="zeros")
    assert module(torch.randn(1, 4, 5, 5)).shape == (1, 3, 7, 7)


def valid_params():
    """The C++ problem description of a valid grouped call: input [2, 4, 5, 6], weight [4, 3, 3, 2], groups 2."""
    p = fused_convt._C.Params()
    p.batch, p.in_channels, p.in_h, p.in_w = 2, 4, 5, 6
    p.out_channels, p.kernel_h, p.kernel_w = 6, 3, 2
    p.stride_h = p.stride_w = 2
    p.pad_h = p.pad_w = 1
    p.out_pad_h = p.out_pad_w = 1
    p.groups = 2
    p.has_bias = True
    return p


FIELDS = ("batch", "in_channels", "in_h", "in_w", "out_channels", "kernel_h", "kernel_w", "stride_h", "stride_w",
          "pad_h", "pad_w", "out_pad_h", "out_pad_w", "dil_h", "dil_w", "groups", "has_bias")


@pytest.mark.parametrize("has_bias", [True, False])
def test_params_from_shapes_equal_the_fields_set_one_by_one(has_bias):
    """The one-call constructor the ops use: input [N, C_in, H, W] and weight [C_in, C_out/groups, kH, kW] shapes
    (torch.Size or any sequence), the (h, w) pairs and groups fill the same fields as setting them one by one."""
    expected = valid_params()
    expected.has_bias = has_bias
    input_shape, weight_shape = torch.Size([2, 4, 5, 6]), torch.Size([4, 3, 3, 2])
    for pairs in (([2, 2], [1, 1], [1, 1], [1, 1]), ((2, 2), (1, 1), (1, 1), (1, 1))):
        p = fused_convt._C.Params(input_shape, weight_shape, *pairs, 2, has_bias)
        assert {f: getattr(p, f) for f in FIELDS} == {f: getattr(expected, f) for f in FIELDS}
    assert (p.out_h, p.out_w) == (10, 11)


def _random_conv_args(rng):
    """Arguments for check_conv_args around valid ones: each size, hyper-parameter, dtype, device and type now
    and then wrong, planes and weights now and then too large (expanded views: no memory is used)."""
    def pick(*choices):
        return choices[rng.randrange(len(choices))]

    def vary(valid, *wrong):
        return pick(*wrong) if rng.random() < 0.04 else valid

    def tensor(*shape, dtype=torch.float32, device="cpu"):
        return torch.empty(1, dtype=dtype, device=device).expand(*shape)

    dtype = vary(pick(torch.float32, torch.float64, torch.float16), torch.int32, torch.bool)
    groups = vary(pick(1, 2), 3, 0, -1)
    in_channels = vary(max(groups, 1) * pick(1, 2), 0, 3)
    input = tensor(pick(0, 1, 2), in_channels, vary(pick(1, 3, 5), 0, 50000), vary(pick(1, 4), 0, 2**28, 2**31),
                   dtype=dtype)
    out_per_group = vary(pick(1, 2, 3), 0, 2**31)
    weight = tensor(vary(in_channels, in_channels + 1), out_per_group, vary(pick(1, 2, 3), 0),
                    vary(pick(1, 2, 3), 0, 50000), dtype=vary(dtype, torch.float32, torch.float64),
                    device=vary("cpu", "meta"))
    bias = pick(None, tensor(out_per_group * max(groups, 1), dtype=vary(dtype, torch.float64),
                             device=vary("cpu", "meta")))
    bias = vary(bias, tensor(out_per_group + 1, dtype=dtype), tensor(1, out_per_group, dtype=dtype), [0.0])
    input = vary(input, tensor(*input.shape[1:], dtype=dtype), [0.0])
    weight = vary(weight, tensor(*weight.shape[1:], dtype=weight.dtype, device=weight.device), [0.0])
    stride, dilation = [pick(1, 2, 3), pick(1, 2, 3)], [pick(1, 2), pick(1, 2)]
    output_padding = [vary(max(stride[0], dilation[0]) - 1, 2, 3, -1), vary(0, 1, 3, -1)]
    stride = [vary(stride[0], 0, -1), vary(stride[1], 0)]
    dilation = [vary(dilation[0], 0), vary(dilation[1], -1)]
    padding = [vary(pick(0, 1), 6, -1), vary(pick(0, 1), 9, -2)]
    return input, weight, bias, stride, padding, output_padding, groups, dilation


def test_fast_validation_agrees_with_the_checks_one_by_one(monkeypatch):
    """check_conv_args returns after one cheap test where every check surely passes (_plainly_valid); on a
    spread of valid and invalid arguments its verdict must be that of the checks one by one: the same
    exception type and message, or none."""
    cases = [_random_conv_args(random.Random(seed)) for seed in range(3000)]

    def verdicts():
        outcomes = []
        for args in cases:
            try:
                _validation.check_conv_args(*args)
                outcomes.append(None)
            except (TypeError, ValueError) as e:
                outcomes.append((type(e), str(e)))
        return outcomes

    fast = verdicts()
    valid = [args for args, outcome in zip(cases, fast) if outcome is None]
    assert 500 < len(valid) < len(cases) - 500  # both kinds well represented
    assert all(_validation._plainly_valid(*args) for args in valid)  # (CPU tensors: the fast path takes them all)
    monkeypatch.setattr(_validation, "_plainly_valid", lambda *args: False)
    assert verdicts() == fast


NATIVE_CASES = [
    pytest.param({"groups": 3}, r"in_channels \(4\) must be divisible by groups \(3\)", id="groups-not-dividing"),
    pytest.param({"groups": 0}, r"groups must be > 0, got 0", id="groups-zero"),
    pytest.param({"out_channels": 5}, r"out_channels \(5\) must be divisible by groups \(2\)", id="out-channels"),
    pytest.param({"batch": -1}, r"batch size must be >= 0, got -1", id="batch"),
    pytest.param({"in_channels": 0}, r"in_channels must be > 0, got 0", id="in-channels"),
    pytest.param({"in_w": 0}, r"input height and width must be > 0, got 5x0", id="in-w"),
    pytest.param({"kernel_h": 0}, r"kernel_size must be > 0, got 0x2", id="kernel"),
    pytest.param({"stride_w": 0}, r"stride must be > 0, got \(2, 0\)", id="stride"),
    pytest.param({"dil_h": -1}, r"dilation must be > 0, got \(-1, 1\)", id="dilation"),
    pytest.param({"pad_w": -1}, r"padding must be >= 0, got \(1, -1\)", id="padding"),
    pytest.param({"out_pad_h": -1}, r"output_padding must be >= 0", id="output-padding-negative"),
    pytest.param({"out_pad_w": 2}, r"output_padding\[1\] = 2 must be smaller than stride\[1\] \(2\)",
                 id="output-padding-range"),
    pytest.param({"pad_h": 6}, r"padding leaves an empty output: computed output size 0x11", id="empty-output"),
]


def native_cpu_forward_with_null_pointers(params):
    """forward_cpu validates before it reads any pointer, so a refused call never touches these nulls."""
    null = 0
    fused_convt._C.forward(params, fused_convt._C.Epilogue(), 0, null, null, null, null, null, null, False, False,
                           False, -1, 0)


def test_native_validate_accepts_the_valid_params():
    p = valid_params()
    assert fused_convt._C.validate(p) is None
    assert (p.out_h, p.out_w) == (10, 11)


@pytest.mark.parametrize("changes,msg", NATIVE_CASES)
def test_native_validate_names_the_field(changes, msg):
    """The C++ entry validates on its own (a C++ caller has no Python in front of it)."""
    p = valid_params()
    for field, value in changes.items():
        setattr(p, field, value)
    with pytest.raises(ValueError, match=msg):
        fused_convt._C.validate(p)
    with pytest.raises(ValueError, match=msg):
        native_cpu_forward_with_null_pointers(p)
    fused_convt._C.validate(valid_params())


def test_native_forward_refuses_a_missing_bias_pointer():
    with pytest.raises(ValueError, match=r"bias pointer must be given exactly when params\.has_bias"):
        native_cpu_forward_with_null_pointers(valid_params())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_channels_last_in_place_needs_16_bit_and_whole_chunks(dtype):
    """valid_params has 3 and 2 channels per group: never a whole 16-channel chunk, so no dtype reads its
    channels_last input in place (answered before any device is touched; False in CPU-only builds too), and
    float32 / float64 never do."""
    from fused_convt.ops import _DTYPE_TAGS
    assert fused_convt._C.forward_reads_channels_last(valid_params(), _DTYPE_TAGS[dtype], 0) is False


def test_numpy_scalars_are_accepted_like_python_numbers():
    np = pytest.importorskip("numpy")
    x, w, b = torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3, 3), torch.randn(3)
    ours = fused_convt.conv_transpose2d_fused(x, w, b, stride=np.int64(2), padding=(np.int32(1), 1),
                                              groups=np.int64(1), add_value=np.float32(-0.5),
                                              multiply_value=np.float64(2.0))
    plain = fused_convt.conv_transpose2d_fused(x, w, b, stride=2, padding=1, add_value=-0.5, multiply_value=2.0)
    assert torch.equal(ours, plain)


@pytest.mark.skipif(not fused_convt._C.cuda_compiled(), reason="built without the CUDA kernels")
@pytest.mark.parametrize("dtype,operand_bytes", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_workspace_sizes_follow_the_requested_gradients(dtype, operand_bytes):
    """grad_weight's workspace holds channels-last copies of g (output-sized, phase-split) and of x in the
    operand type, channels padded per group to 8 (valid_params: 3 and 2 per group, 2 groups); a backward
    without grad_weight asks for none of it, and Python sizes each call so (BackwardArgs::workspace_bytes
    lets the C++ entry refuse a smaller one). The forward copies x channels-last, padded to 16, beside the
    packed weight."""
    from fused_convt.ops import _DTYPE_TAGS
    p, tag = valid_params(), _DTYPE_TAGS[dtype]
    full = fused_convt._C.backward_workspace_bytes(p, tag, True)
    without = fused_convt._C.backward_workspace_bytes(p, tag, grad_weight=False)
    g_copy = p.batch * p.out_h * p.out_w * p.groups * 8 * operand_bytes
    x_copy = p.batch * p.in_h * p.in_w * p.groups * 8 * operand_bytes
    assert full - without >= g_copy + x_copy
    assert fused_convt._C.backward_workspace_bytes(p, tag) == full
    forward = fused_convt._C.forward_workspace_bytes(p, tag)
    x_copy_forward = p.batch * p.in_h * p.in_w * p.groups * 16 * operand_bytes
    packed_weight = p.groups * p.kernel_h * p.kernel_w * (p.out_channels // p.groups) * 16 * operand_bytes
    assert forward >= x_copy_forward + packed_weight
