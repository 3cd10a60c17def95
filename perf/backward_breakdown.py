"""Per-gradient timing of the backward pass (grad_input, grad_weight, grad_bias, all three) on the
KernelBench shapes, next to eager forward+backward in the same process. Complements perf/bench.py when
working on one backward kernel. Usage: PYTHONPATH=python python perf/backward_breakdown.py"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "python"))
import fused_convt  # noqa: E402
from reference import KB_V0, KB_V1, composite  # noqa: E402


def conv_lists(problem):
    return [list(problem.stride), list(problem.padding), list(problem.output_padding), list(problem.dilation),
            problem.groups]


def main():
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms, do_bench medians, TF32 allowed")
    for name, problem in (("kb_v0", KB_V0), ("kb_v1", KB_V1)):
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b = problem.tensors(dtype, "cuda")
            epilogue = (problem.add_value, problem.multiply_value, True)
            y, factor = torch.ops.fused_convt.conv_transpose2d_fused(x, w, b, *conv_lists(problem), *epilogue,
                                                                     True, True)
            grad = torch.randn_like(y)
            times = {}
            for part, mask in (("grad_input", [True, False, False]), ("grad_weight", [False, True, False]),
                               ("grad_bias", [False, False, True]), ("all", [True, True, True])):
                times[part] = triton.testing.do_bench(
                    lambda: torch.ops.fused_convt.conv_transpose2d_fused_backward(
                        grad, x, w, b, factor, *conv_lists(problem), *epilogue, True, mask), return_mode="median")
            xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))

            def eager():
                composite(xg, wg, bg, **problem.conv_kwargs(), **problem.epilogue_kwargs()).backward(grad)

            def ours():
                fused_convt.conv_transpose2d_fused(xg, wg, bg, **problem.conv_kwargs(),
                                                   **problem.epilogue_kwargs()).backward(grad)

            eager_ms = triton.testing.do_bench(eager, return_mode="median")
            ours_ms = triton.testing.do_bench(ours, return_mode="median")
            parts = "  ".join(f"{k} {v:.3f}" for k, v in times.items())
            print(f"{name} {str(dtype)[6:]:9s} backward: {parts} | fwd+bwd ours {ours_ms:.3f} eager {eager_ms:.3f}"
                  f" (eager/ours {eager_ms / ours_ms:.2f}x)")
            del x, w, b, y, factor, grad, xg, wg, bg
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
