"""One build's training-step times and gradient fingerprints, for A/B runs of two builds of fused_convt on one
machine (perf/NOTES.md, "Measuring a branch against main in one device call"): run it once per build, alternating
(A B A B), each process with its own module first on PYTHONPATH, and compare the lines. A step is the op's forward
and all three gradients by torch.autograd.grad. On CUDA its time is the GPU's, by CUDA graph replay (do_bench
median), which leaves out the host; on the CPU the median wall time of a few calls. The fingerprints (SHA-1 of each
gradient's bytes) tell whether two builds give the same bits; the inference forward's time and its output's
fingerprint follow. --error adds each gradient's error against float64 autograd on the CPU (minutes at kb_v1);
--kernels prints the step's kernels by their own GPU time (torch.profiler with
FUSED_CONVT_SERIAL_LAUNCHES and FUSED_CONVT_SERIAL_BACKWARD set: with programmatic dependent launch on, a kernel's
profiled duration includes its wait for the one before).

Usage: PYTHONPATH=<build's python dir>:tests/python python perf/step_ab.py LABEL [--shapes kb_v0,n32_c32x16_hw32_k4_s2]
       [--modes tf32,bf16] [--error] [--kernels] [--device cuda|cpu]
Shapes: kb_v0, kb_v1, or n<batch>_c<in>x<out>_hw<size>_k<kernel>_s<stride>[_p<padding>] (perf/bench.py's sweep names).
"""
import argparse
import hashlib
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
sys.path.insert(0, str(ROOT / "perf"))  # bench.graph_replay_ms
sys.path.append(str(ROOT / "python"))  # after PYTHONPATH: the build under test wins

import fused_convt  # noqa: E402
from reference import KB_V0, KB_V1, Problem, composite, rel_err  # noqa: E402

MODES = {"tf32": (torch.float32, True), "fp32": (torch.float32, False), "bf16": (torch.bfloat16, True),
         "fp16": (torch.float16, True)}
NAMED = re.compile(r"n(\d+)_c(\d+)x(\d+)_hw(\d+)_k(\d+)_s(\d+)(?:_p(\d+))?$")


def parse_shape(name: str) -> Problem:
    """kb_v0, kb_v1 or a sweep-style name; KernelBench's add 0.5 and multiply 2.0, randn data (Problem.tensors)."""
    if name in ("kb_v0", "kb_v1"):
        return KB_V0 if name == "kb_v0" else KB_V1
    match = NAMED.match(name)
    if not match:
        raise ValueError(f"shape {name!r}: expected kb_v0, kb_v1 or n<batch>_c<in>x<out>_hw<size>_k<k>_s<s>[_p<p>]")
    n, cin, cout, hw, k, s, pad = (int(g) if g is not None else 0 for g in match.groups())
    return Problem(n, cin, cout, (hw, hw), (k, k), (s, s), (pad, pad), add_value=0.5, multiply_value=2.0)


def fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:10]


def step_ms(step, device: str) -> float:
    if device == "cpu":
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    import triton.testing

    from bench import graph_replay_ms

    return graph_replay_ms(step, lambda fn: triton.testing.do_bench(fn, return_mode="median", warmup=50, rep=300))


def kernel_lines(step, top: int = 10) -> List[str]:
    from torch.profiler import ProfilerActivity, profile

    old = {k: os.environ.get(k) for k in ("FUSED_CONVT_SERIAL_LAUNCHES", "FUSED_CONVT_SERIAL_BACKWARD")}
    os.environ.update({k: "1" for k in old})
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    rows = sorted(((e.device_time_total / 10, e.key) for e in prof.key_averages() if e.device_time_total > 0),
                  reverse=True)
    lines = [f"    kernels' sum {sum(us for us, _ in rows):.1f} us per step (serial launches)"]
    lines += [f"    {us:8.1f} us  {key[:140]}" for us, key in rows[:top]]
    return lines


def run_case(label: str, name: str, mode: str, device: str, error: bool, kernels: bool) -> List[str]:
    problem = parse_shape(name)
    dtype, tf32 = MODES[mode]
    torch.backends.cudnn.allow_tf32 = tf32
    x, w, b = problem.tensors(dtype, device, requires_grad=True)
    conv = dict(**problem.conv_kwargs(), **problem.epilogue_kwargs())
    forward = lambda: fused_convt.conv_transpose2d_fused(x, w, b, **conv, allow_tf32=tf32)  # noqa: E731
    with torch.no_grad():
        shape = forward().shape
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    step = lambda: torch.autograd.grad(forward(), (x, w, b), grad)  # noqa: E731
    grads = step()

    def inference():
        with torch.no_grad():
            return forward()

    line = (f"{label:8s} {name:24s} {mode} step {step_ms(step, device) * 1e3:9.1f} us  "
            + " ".join(f"{n} {fingerprint(g)}" for n, g in zip(("x", "w", "b"), grads))
            + f"  fwd {step_ms(inference, device) * 1e3:9.1f} us  y {fingerprint(inference())}")
    if error:
        leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
        exact = torch.autograd.grad(composite(*leaves, **conv), leaves, grad.cpu().double())
        line += "  err " + " ".join(f"{n} {rel_err(g, e):.2e}" for n, g, e in zip(("x", "w", "b"), grads, exact))
    lines = [line]
    if kernels and device == "cuda":
        lines += kernel_lines(step)
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label", help="this build's name in the output lines")
    parser.add_argument("--shapes", default="kb_v0,kb_v1")
    parser.add_argument("--modes", default="tf32,bf16", help=f"comma-separated of {', '.join(MODES)}")
    parser.add_argument("--error", action="store_true", help="error against float64 autograd (slow at kb_v1)")
    parser.add_argument("--kernels", action="store_true", help="the step's kernels by their own GPU time (CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; expected some of {sorted(MODES)}")
    for name in args.shapes.split(","):
        try:
            parse_shape(name)  # refuse a bad name before any timing
        except ValueError as exc:
            parser.error(str(exc))
    for name in args.shapes.split(","):
        for mode in modes:
            for line in run_case(args.label, name, mode, args.device, args.error, args.kernels):
                print(line, flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
