"""The forward's two ways of staging its input patch (GPU only): on sm_90 the Tensor Memory Accelerator copies
each step's patch (cuda/tma.cuh), elsewhere, or with FUSED_CONVT_NO_TMA set, per-thread cp.async does. Both put
the same values in the same swizzled shared-memory rows, so the outputs must agree bit for bit; the cp.async
kernels otherwise run on no GPU this project is tested on."""
import pytest
import torch

from conftest import requires_cuda
from reference import Problem

PROBLEMS = [
    # KernelBench-like (k4 s2, all four phases alike), with groups (32 output channels each) and padding
    Problem(2, 32, 64, (9, 11), (4, 4), (2, 2), padding=(1, 1), groups=2, add_value=-0.5, multiply_value=2.0),
    # column phases of 2, 1 and 1 taps (different patch widths: one TMA box for all), output_padding
    Problem(2, 24, 32, (7, 6), (4, 4), (2, 3), padding=(1, 2), output_padding=(1, 0), add_value=-0.5),
    # stride 1, channels not a multiple of 16 (padded chunks), tiles spanning five rows of 60
    Problem(1, 20, 16, (6, 60), (3, 3), (1, 1), padding=(1, 1), add_value=-0.5, multiply_value=-1.5),
]
DTYPES = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, None), (torch.float16, None)]


def forward(p: Problem, x, w, b, allow_tf32, training):
    return torch.ops.fused_convt.conv_transpose2d_fused(
        x, w, b, [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation], p.groups, p.add_value,
        p.multiply_value, apply_epilogue=True, save_grad_factor=training, allow_tf32=allow_tf32)


@requires_cuda
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype,allow_tf32", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_tma_and_cp_async_forwards_agree_bitwise(index, dtype, allow_tf32, training, monkeypatch):
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    with torch.no_grad():
        monkeypatch.delenv("FUSED_CONVT_NO_TMA", raising=False)
        default = forward(p, x, w, b, allow_tf32, training)
        monkeypatch.setenv("FUSED_CONVT_NO_TMA", "1")
        copied = forward(p, x, w, b, allow_tf32, training)
    for ours, theirs in zip(default, copied):
        assert ours.shape == theirs.shape
        assert torch.equal(ours, theirs)
    assert not torch.isnan(default[0]).any()
    # both epilogue branches occur (a test on all-zero outputs would compare little)
    assert 0 < (default[0] != 0).double().mean().item() < 1


@requires_cuda
@pytest.mark.parametrize("dtype,allow_tf32", DTYPES)
@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_tma_and_cp_async_gradients_agree_bitwise(index, dtype, allow_tf32, monkeypatch):
    """grad_input copies its patches from the g pass's copy (grad_weight requested) by TMA where the copy's
    planes are uniform, by cp.async otherwise or with FUSED_CONVT_NO_TMA: the same values either way."""
    p = PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    grad = torch.randn(forward(p, x, w, b, allow_tf32, False)[0].shape, device="cuda", dtype=dtype)
    grads = []
    for no_tma in ("0", "1"):
        monkeypatch.setenv("FUSED_CONVT_NO_TMA", no_tma)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = torch.ops.fused_convt.conv_transpose2d_fused(
            leaves[0], leaves[1], leaves[2], [*p.stride], [*p.padding], [*p.output_padding], [*p.dilation],
            p.groups, p.add_value, p.multiply_value, apply_epilogue=True, save_grad_factor=True,
            allow_tf32=allow_tf32)[0]
        y.backward(grad)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        assert torch.equal(ours, theirs)
    assert grads[0][0].abs().max() > 0


# Problems whose grad_weight GEMM takes patch steps, on sm_90 with X boxes from the channels-last copy: the kb_v0
# tile (32 x 16), a group of 24 input channels (its box also reads the next group's, whose rows are dropped) with
# padding, the 64 x 64 tile (three-row patches in float, five-row in 16-bit), an input of 7 columns.
X_BOX_PROBLEMS = [
    Problem(2, 32, 16, (10, 16), (4, 4), (2, 2), add_value=-0.5, multiply_value=2.0),
    Problem(2, 48, 32, (8, 8), (4, 4), (2, 2), padding=(1, 1), groups=2, add_value=-0.5),
    Problem(1, 64, 64, (6, 8), (4, 4), (2, 2), add_value=-0.5, multiply_value=-1.5),
    Problem(2, 32, 16, (9, 7), (4, 4), (2, 2), add_value=-0.5),
]


@requires_cuda
@pytest.mark.parametrize("dtype,allow_tf32", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, None)])
@pytest.mark.parametrize("index", range(len(X_BOX_PROBLEMS)))
def test_grad_weight_x_boxes_and_channels_last_copy_agree_bitwise(index, dtype, allow_tf32, monkeypatch):
    """grad_weight's GEMM takes its X patches from the channels-last copy by TMA boxes on sm_90
    (encode_gemm_x_box), by cp.async otherwise or with FUSED_CONVT_NO_TMA: the same staged values, the same bits."""
    from torch.profiler import ProfilerActivity, profile
    p = X_BOX_PROBLEMS[index]
    x, w, b = p.tensors(dtype, "cuda", seed=index)
    grad = torch.randn(forward(p, x, w, b, allow_tf32, False)[0].shape, device="cuda", dtype=dtype)
    grads, kernels = [], set()
    # (The GEMM, not the wgmma kernel, which takes some of these shapes on sm_90a: float rows of 16 in two-row chunks.)
    monkeypatch.setenv("FUSED_CONVT_NO_WGMMA_GRAD_WEIGHT", "1")
    for no_tma in ("0", "1"):
        monkeypatch.setenv("FUSED_CONVT_NO_TMA", no_tma)
        w_leaf = w.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            y = forward(p, x, w_leaf, b, allow_tf32, True)[0]
            y.backward(grad)
            torch.cuda.synchronize()
        if no_tma == "0":
            kernels = {event.key for event in prof.key_averages() if event.device_time_total > 0}
        grads.append(w_leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().max() > 0
    if torch.cuda.get_device_capability()[0] >= 9:
        gemm = [last_template_argument(k, "grad_weight_gemm_kernel") for k in kernels if "grad_weight_gemm_kernel<" in k]
        assert gemm == ["true"], sorted(kernels)  # kXBox


def last_template_argument(name: str, template: str) -> str:
    """The last top-level template argument of `template<...>` in a demangled kernel name."""
    depth, args, current = 1, [], ""
    for char in name[name.index(template + "<") + len(template) + 1:]:
        depth += (char == "<") - (char == ">")
        if depth == 0:
            break
        if depth == 1 and char == ",":
            args.append(current)
            current = ""
        else:
            current += char
    return (args + [current])[-1].strip()
