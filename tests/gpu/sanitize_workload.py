"""A small workload that reaches every CUDA kernel variant the dispatcher can pick (tensor-core forward with
each math policy and channel tile, the column-pair forward (inference, training, recompute), the direct gather kernel for forward and
grad_input, the grad_weight / grad_bias split reductions), run under compute-sanitizer by sanitize.sh. Exits non-zero on a wrong result."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import fused_convt  # noqa: E402
from reference import Problem, composite_float64, rel_err  # noqa: E402

CASES = [
    # (problem, dtypes): channel tiles 16 / 32 / 64, stride 1-3, groups, no bias, a shape only the direct path takes
    (Problem(2, 8, 12, (5, 7), (4, 4), (2, 2), add_value=-0.5, multiply_value=2.0), None),
    (Problem(1, 6, 40, (4, 5), (3, 2), (1, 2), (1, 0), (0, 1), groups=2, bias=False), None),
    (Problem(2, 16, 80, (3, 4), (5, 3), (3, 1), (2, 1), (2, 0), (1, 2)), None),
    (Problem(1, 4, 4, (3, 3), (9, 9), (1, 1), dilation=(3, 3)), None),
    # the training forward's epilogue clusters (tc_training_epilogue_cluster): two column phases with a partial
    # channel tile (float only), four column phases with 72 channels (a ragged second tile)
    (Problem(2, 8, 40, (5, 7), (4, 4), (2, 2), add_value=-0.5), None),
    (Problem(1, 16, 72, (4, 6), (3, 4), (2, 4)), None),
    # grad_input copying its patches from the g pass's copy (16 output channels), sources of 2, 1 and 1 taps
    (Problem(2, 8, 16, (6, 5), (4, 4), (2, 3), (1, 3), (1, 0)), None),
    # the grad_weight GEMM's patch steps (64 x 64 tiles), ragged tile grids
    (Problem(2, 64, 64, (5, 6), (4, 4), (2, 2)), None),
    # the narrow 32 x 16 tile: tap sets of one tap per warp, patch steps in 16-bit
    (Problem(2, 32, 16, (5, 6), (4, 4), (2, 2)), None),
    # X by TMA boxes from the channels-last copy in the 32 x 16 tile's patch steps
    (Problem(2, 32, 16, (5, 8), (4, 4), (2, 2), add_value=-0.5), None),
    # grad_weight and grad_input on wgmma (sm_90a): 128 output channels (two warpgroups), input rows of two float
    # chunks and one 16-bit chunk; one ragged row tile of grad_input (3 rows of 8); grad_weight's 16-bit chunks of
    # two rows (64 output channels: one warpgroup)
    (Problem(1, 64, 128, (3, 64), (4, 4), (2, 2), add_value=-0.5), None),
    (Problem(1, 64, 64, (4, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5), None),
    # the narrow wgmma tiles of both gradients (16 output channels): two input channel tiles, rows of 64; chunks of
    # two rows (grad_weight's 16-bit rows of 32); grad_input's ragged row tile (9 rows: the second tile of one)
    (Problem(1, 64, 16, (3, 64), (4, 4), (2, 2), add_value=-0.5), None),
    (Problem(1, 32, 16, (4, 32), (4, 4), (2, 2), padding=(1, 1), add_value=-0.5), None),
    (Problem(1, 32, 16, (9, 32), (4, 4), (2, 2), add_value=-0.5), None),
]
DTYPES = [(torch.float32, True, 5e-3), (torch.float32, False, 1e-5), (torch.bfloat16, None, 3e-2),
          (torch.float16, None, 5e-3), (torch.float64, None, 1e-12)]

failures = 0
for index, (problem, _) in enumerate(CASES):
    for dtype, tf32, tol in DTYPES:
        x, w, b = problem.tensors(dtype, "cuda", seed=index, requires_grad=True)
        y = fused_convt.conv_transpose2d_fused(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                               allow_tf32=tf32)
        y.backward(torch.ones_like(y))
        err = rel_err(y, composite_float64(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs()))
        if not err <= tol:
            failures += 1
            print(f"case {index} {dtype} tf32={tf32}: relative error {err:.3e} > {tol}")
# grad_bias without grad_weight: the g pass that only sums the bias (no channels-last copy, no GEMM).
for dtype, tf32, _ in DTYPES:
    x, w, b = CASES[0][0].tensors(dtype, "cuda", seed=0, requires_grad=True)
    w.requires_grad_(False)
    fused_convt.conv_transpose2d_fused(x, w, b, **CASES[0][0].conv_kwargs(), **CASES[0][0].epilogue_kwargs(),
                                       allow_tf32=tf32).sum().backward()
# The column-pair kernel (sm_90a; stride_w 2; 16-bit, and float as TF32): 64- and 16-channel tiles, NCHW and NHWC
# outputs, a row stride of 1 with odd output widths, a float patch in two K chunks (64 channels, rows wide enough
# that four warpgroups' whole patches would not fit); each as the inference forward, the training forward (output
# and grad_factor) and, NCHW, the recompute backward's factor-only forward; channels_last, the backward's g pass
# reading the channels_last grad_output in place.
PAIR_CASES = [Problem(2, 32, 64, (5, 6), (4, 4), (2, 2), add_value=-0.5),
              Problem(1, 32, 16, (4, 7), (3, 3), (1, 2), (1, 1), (0, 0)),
              Problem(1, 64, 32, (3, 20), (4, 4), (2, 2), add_value=-0.5)]
pair_runs = 0
for index, problem in enumerate(PAIR_CASES):
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 5e-3)):
        for layout in (torch.contiguous_format, torch.channels_last):
            x, w, b = problem.tensors(dtype, "cuda", seed=100 + index)
            with torch.no_grad():
                y = fused_convt.conv_transpose2d_fused(x.contiguous(memory_format=layout), w, b,
                                                       **problem.conv_kwargs(), **problem.epilogue_kwargs(),
                                                       allow_tf32=True if dtype == torch.float32 else None)
            expected = composite_float64(x, w, b, **problem.conv_kwargs(), **problem.epilogue_kwargs())
            recompute = layout == torch.contiguous_format
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            y_train = fused_convt.conv_transpose2d_fused(
                leaves[0].contiguous(memory_format=layout), *leaves[1:], **problem.conv_kwargs(),
                **problem.epilogue_kwargs(), recompute=recompute, allow_tf32=True if dtype == torch.float32 else None)
            y_train.backward(torch.ones_like(y_train))
            for mode, out in (("inference", y), ("training", y_train)):
                err = rel_err(out, expected)
                pair_runs += 1
                if not err <= tol:
                    failures += 1
                    print(f"pair case {index} {dtype} {layout} {mode}: relative error {err:.3e} > {tol}")
torch.cuda.synchronize()
print(f"sanitize workload: {len(CASES) * len(DTYPES) + pair_runs} runs, {failures} wrong")
sys.exit(1 if failures else 0)
