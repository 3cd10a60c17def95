#!/usr/bin/env python
"""Benchmark fused_convt against PyTorch on KernelBench level-2 problem 93 (and an optional sweep).

All in one process, on one GPU. For every (shape, mode) case it
  1. checks the forward of every implementation against a float64 reference computed on the device, on two
     data sets: randn inputs and weights with add_value -0.5 (both epilogue branches common; its relative
     error is the record's ``max_rel_err``) and KernelBench's own data (torch.rand inputs, default
     nn.ConvTranspose2d init, add 0.5, mul 2.0: almost every output is exactly 0);
  2. times, on the KernelBench data, the forward (inference, no grad) and forward + backward (gradients
     w.r.t. input, weight and bias for a fixed random output gradient), as medians of
     triton.testing.do_bench (CUDA events without triton, time.perf_counter on the CPU); and the forward on
     the randn data too (``fwd_randn_ms``: fused_convt skips the GELU's erfc where a whole warp's outputs
     are 0, which is nearly everywhere on the KernelBench data and on 22% of the randn data's outputs); and,
     on CUDA, the forward + backward step's GPU time alone (``fwdbwd_gpu_ms``: one step captured in a CUDA
     graph, its replays timed; not for the compiled implementations, and the eager model's step copies a CPU
     scalar, which capture refuses): at small shapes the host's time per step (Python, autograd, launches)
     bounds ``fwdbwd_ms``;
  3. measures the bytes a training forward leaves allocated for the backward, output excluded;
  4. sets each time against a floor from ceilings measured at start: (input + output bytes) / device copy
     bandwidth, and flops / the matching matmul rate.
It prints a table and writes perf/results/<gpu>-<date>.json with a plot beside it (.png).

Implementations: fused_convt (ours), fused_convt_recompute (ours, recompute=True: only the inputs are saved
for backward), fused_convt_channels_last (ours with a channels_last input, as best_tuned gets it), eager (the KernelBench model verbatim), compile (torch.compile of it, default mode) and
best_tuned (channels_last + cudnn.benchmark + torch.compile, the fastest PyTorch setup in
shared/ANCHORS.md). Modes: tf32 (fp32 tensors, cuDNN and cuBLAS TF32 on: PyTorch's default), fp32 (TF32
off), bf16, fp16; fused_convt follows torch.backends.cudnn.allow_tf32 like cuDNN does. The sweep runs in every selected
mode with fused_convt, eager and compile only (~2 minutes per mode on an H100), and compile's error there is measured on the KernelBench data alone (the randn data's add_value would cost a
recompile per point).

  PYTHONPATH=python python perf/bench.py                              # kb_v0, kb_v1 x tf32, bf16
  PYTHONPATH=python python perf/bench.py --modes tf32,bf16,fp32,fp16 --sweep
  PYTHONPATH=python python perf/bench.py --device cpu --quick --out /tmp/bench   # the code paths, on a CPU
"""
import argparse
import dataclasses
import datetime
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch._dynamo
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
sys.path.append(str(ROOT / "python"))  # after PYTHONPATH and site-packages: an installed build wins

from reference import KB_V0, KB_V1, Problem, composite  # noqa: E402

try:
    import fused_convt  # noqa: E402
except ImportError as exc:
    sys.exit(f"bench.py: cannot import fused_convt ({exc}). Build it first (cmake -S . -B build -G Ninja "
             f"-Dpybind11_DIR=$(python -m pybind11 --cmakedir) && cmake --build build) and run with PYTHONPATH=python.")

# mode -> (tensor dtype, TF32 allowed in cuDNN and cuBLAS, which matmul rate bounds its flops)
MODES = {
    "tf32": (torch.float32, True, "tf32"),
    "fp32": (torch.float32, False, "fp32"),
    "bf16": (torch.bfloat16, True, "bf16"),
    "fp16": (torch.float16, True, "bf16"),
}
SHAPES = {"kb_v0": KB_V0, "kb_v1": KB_V1}
MAIN_IMPLS = ["fused_convt", "fused_convt_recompute", "fused_convt_channels_last", "eager", "compile", "best_tuned"]
SWEEP_IMPLS = ["fused_convt", "eager", "compile"]
COMPILED_IMPLS = {"compile", "best_tuned"}
RANDN_ADD_VALUE = -0.5
SEED_RANDN, SEED_KERNELBENCH, SEED_GRAD = 0, 1, 2


def sweep_problems() -> Dict[str, Problem]:
    """~20 modest points around batch 32, 32 -> 32 channels, 32x32, k4 s2: every kernel 2-5 x stride 1-3,
    then batch, channels, input size and padding one at a time. KernelBench's add 0.5 and mul 2.0."""
    base = dict(batch=32, in_channels=32, out_channels=32, in_hw=(32, 32), kernel=(4, 4), stride=(2, 2))
    variants = [dict(kernel=(k, k), stride=(s, s)) for k in (2, 3, 4, 5) for s in (1, 2, 3)]
    variants += [dict(batch=n) for n in (8, 128)]
    variants += [dict(in_channels=ci, out_channels=co) for ci, co in ((16, 16), (64, 32), (32, 64), (128, 128))]
    variants += [dict(in_hw=(64, 64)), dict(padding=(1, 1))]
    problems = {}
    for change in variants:
        p = Problem(**{**base, **change}, add_value=0.5, multiply_value=2.0)
        name = (f"n{p.batch}_c{p.in_channels}x{p.out_channels}_hw{p.in_hw[0]}_k{p.kernel[0]}_s{p.stride[0]}"
                + (f"_p{p.padding[0]}" if p.padding != (0, 0) else ""))
        problems[name] = p
    return problems


def tiny_for_cpu(p: Problem) -> Problem:
    """The same configuration at batch 1, an eighth of the channels, a quarter of the input size: seconds on a
    CPU. (Every planned problem has groups 1.)"""
    return dataclasses.replace(p, batch=1, in_channels=max(1, p.in_channels // 8),
                               out_channels=max(1, p.out_channels // 8), in_hw=tuple(max(1, s // 4) for s in p.in_hw))


def output_shape(p: Problem):
    hw = [(p.in_hw[a] - 1) * p.stride[a] - 2 * p.padding[a] + p.dilation[a] * (p.kernel[a] - 1)
          + p.output_padding[a] + 1 for a in range(2)]
    return (p.batch, p.out_channels, *hw)


@contextmanager
def tf32_allowed(on: bool):
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@contextmanager
def cudnn_benchmark():
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Timer:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA (the same method with CUDA events when
    triton is missing: L2 flushed before every run), time.perf_counter on the CPU."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.warmup_ms, self.rep_ms = (10, 40) if quick else (50, 200)
        self.cpu_warmup, self.cpu_reps = (1, 3) if quick else (2, 10)
        self.do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
                self.do_bench = do_bench
            except ImportError:
                print("bench.py: triton is not installed; timing with CUDA events instead of do_bench")
        self.method = ("triton.testing.do_bench" if self.do_bench else
                       "cuda_events" if device.type == "cuda" else "time.perf_counter")

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.do_bench is not None:
            return float(self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        if self.device.type == "cuda":
            return self._cuda_events(fn)
        for _ in range(self.cpu_warmup):
            fn()
        times_ms = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times_ms)

    def _cuda_events(self, fn) -> float:
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=self.device)
        event = lambda: torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize(self.device)
        start, end = event(), event()
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate_ms))):
            fn()
        pairs = [(event(), event()) for _ in range(max(1, int(self.rep_ms / estimate_ms)))]
        for start, end in pairs:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


def measure_ceilings(device: torch.device, timer: Timer, quick: bool) -> dict:
    """Device copy bandwidth (bytes read + written per second) and matmul rates, measured once."""
    on_gpu = device.type == "cuda"
    copy_bytes = 2**30 if on_gpu else 2**26
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    del src, dst
    n = (4096 if quick else 8192) if on_gpu else 512
    rates = {}
    for name, dtype, tf32 in (("tf32", torch.float32, True), ("fp32", torch.float32, False),
                              ("bf16", torch.bfloat16, True)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        with tf32_allowed(tf32):
            rates[name] = 2 * n**3 / (timer(lambda: a @ b) * 1e-3)
        del a, b
    free_memory(device)
    return {"copy_bytes_per_s": 2 * copy_bytes / (copy_ms * 1e-3), "copy_buffer_bytes": copy_bytes,
            "matmul_flops_per_s": rates, "matmul_n": n}


def floors(p: Problem, dtype: torch.dtype, rate_name: str, ceilings: dict) -> dict:
    """Forward floor: max(input + output bytes over copy bandwidth, conv flops over the matmul rate).
    Forward + backward: 3x the flops (dgrad and wgrad cost what the forward does) and, on top of the
    forward's bytes, the output gradient and the input read once more, the input and parameter gradients
    written once."""
    elt = torch.finfo(dtype).bits // 8
    n, cin, h, w = p.batch, p.in_channels, *p.in_hw
    x_elems, out_elems = n * cin * h * w, math.prod(output_shape(p))
    param_elems = cin * (p.out_channels // p.groups) * p.kernel[0] * p.kernel[1] + (p.out_channels if p.bias else 0)
    fwd_bytes = (x_elems + param_elems + out_elems) * elt
    fwdbwd_bytes = fwd_bytes + (out_elems + 2 * x_elems + param_elems) * elt
    flops = 2 * n * cin * h * w * p.out_channels * p.kernel[0] * p.kernel[1] / p.groups
    bandwidth, rate = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"][rate_name]
    return {"floor_ms": max(fwd_bytes / bandwidth, flops / rate) * 1e3,
            "floor_bytes_ms": fwd_bytes / bandwidth * 1e3, "floor_flops_ms": flops / rate * 1e3,
            "floor_fwdbwd_ms": max(fwdbwd_bytes / bandwidth, 3 * flops / rate) * 1e3,
            "fwd_bytes": fwd_bytes, "flops": flops}


class KernelBenchModel(nn.Module):
    """KernelBench level 2 problem 93, verbatim: the eager baseline, and what torch.compile compiles."""

    def __init__(self, p: Problem, device, dtype):
        super().__init__()
        self.conv_transpose = nn.ConvTranspose2d(p.in_channels, p.out_channels, p.kernel, stride=p.stride,
                                                 padding=p.padding, output_padding=p.output_padding,
                                                 groups=p.groups, bias=p.bias, dilation=p.dilation,
                                                 device=device, dtype=dtype)
        self.add_value, self.multiply_value = p.add_value, p.multiply_value

    def forward(self, x):
        x = self.conv_transpose(x)
        x = x + self.add_value
        x = torch.min(x, torch.tensor(0.0, device=x.device))
        x = torch.nn.functional.gelu(x)
        x = x * self.multiply_value
        return x


@dataclasses.dataclass
class Impl:
    """One implementation: `model` is called, `base` holds the parameters and the epilogue values."""
    name: str
    model: Callable
    base: nn.Module
    channels_last: bool = False
    cudnn_benchmark: bool = False

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t

    def context(self):
        return cudnn_benchmark() if self.cudnn_benchmark else nullcontext()

    def load(self, data: "Data") -> None:
        conv = self.base.conv_transpose if isinstance(self.base, KernelBenchModel) else self.base
        with torch.no_grad():
            conv.weight.copy_(data.weight)
            if data.bias is not None:
                conv.bias.copy_(data.bias)
        self.base.add_value, self.base.multiply_value = data.add_value, data.multiply_value


def build_impls(names: List[str], p: Problem, device, dtype) -> List[Impl]:
    impls, eager = [], None
    for name in names:
        if name.startswith("fused_convt"):
            module = fused_convt.FusedConvTranspose2d(
                p.in_channels, p.out_channels, p.kernel, p.stride, p.padding, p.output_padding, p.groups, p.bias,
                p.dilation, device=device, dtype=dtype, add_value=p.add_value, multiply_value=p.multiply_value,
                recompute=name == "fused_convt_recompute")
            # fused_convt_channels_last: the input arrives channels_last, as for best_tuned.
            impls.append(Impl(name, module, module, channels_last=name == "fused_convt_channels_last"))
        elif name in ("eager", "compile"):
            if eager is None:
                eager = KernelBenchModel(p, device, dtype)
            model = torch.compile(eager, dynamic=False) if name == "compile" else eager
            impls.append(Impl(name, model, eager))
        elif name == "best_tuned":
            tuned = KernelBenchModel(p, device, dtype).to(memory_format=torch.channels_last)
            impls.append(Impl(name, torch.compile(tuned, dynamic=False), tuned, channels_last=True,
                              cudnn_benchmark=True))
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls


@dataclasses.dataclass
class Data:
    name: str
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    add_value: float
    multiply_value: float


def randn_data(p: Problem, device, dtype) -> Data:
    """The tests' data (reference.Problem.tensors): randn, weights scaled by 1/sqrt(fan-in), add -0.5."""
    x, weight, bias = p.tensors(dtype=dtype, device=device, seed=SEED_RANDN)
    return Data("randn", x, weight, bias, RANDN_ADD_VALUE, p.multiply_value)


def kernelbench_data(p: Problem, device, dtype) -> Data:
    """KernelBench's data: torch.rand input, nn.ConvTranspose2d's default initialization, add 0.5, mul 2.0."""
    torch.manual_seed(SEED_KERNELBENCH)
    init = KernelBenchModel(p, device, torch.float32).conv_transpose
    x = torch.rand(p.batch, p.in_channels, *p.in_hw, device=device)
    bias = init.bias.detach().to(dtype) if p.bias else None
    return Data("kernelbench", x.to(dtype), init.weight.detach().to(dtype), bias, p.add_value, p.multiply_value)


def reference_output(p: Problem, data: Data) -> torch.Tensor:
    """The composite in float64 on the data's own device, from the very (rounded) values the impls see."""
    up = lambda t: None if t is None else t.detach().double()
    return composite(up(data.x), up(data.weight), up(data.bias), **p.conv_kwargs(), add_value=data.add_value,
                     multiply_value=data.multiply_value)


def forward_error(out: torch.Tensor, ref: torch.Tensor, ref_norm: float) -> dict:
    """||out - ref|| / ||ref|| (the plain norm where the reference is all zeros) and max |out - ref|."""
    diff = out.detach().double()
    diff.sub_(ref)
    diff_norm = torch.linalg.vector_norm(diff).item()
    return {"rel_err": diff_norm / ref_norm if ref_norm > 0 else diff_norm,
            "max_abs_err": torch.linalg.vector_norm(diff, ord=math.inf).item()}


def graph_replay_ms(step: Callable[[], object], timer: "Timer") -> float:
    """GPU time of step() alone: one call captured in a CUDA graph and its replays timed, which leaves out the
    host's time per call (Python, autograd, launches) that bounds small shapes' eager timings. Warm-up runs on a
    side stream first, as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return timer(graph.replay)


def saved_bytes(forward: Callable[[], torch.Tensor], device: torch.device) -> Optional[int]:
    """Bytes a training forward leaves allocated (kept for backward), the output itself excluded.
    CUDA only: the CPU allocator keeps no count."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = forward()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes()
    del out
    return held


class Case:
    """One (shape, mode) point: its records, filled in phase by phase; a failure (out of memory included)
    is written into the failing implementation's record and the others go on."""

    def __init__(self, shape: str, p: Problem, mode: str, impl_names: List[str], ceilings: dict,
                 compile_randn: bool):
        self.shape, self.problem, self.mode, self.impl_names = shape, p, mode, impl_names
        self.dtype, self.tf32, rate_name = MODES[mode]
        self.compile_randn = compile_randn
        self.floors = floors(p, self.dtype, rate_name, ceilings)
        problem = {**dataclasses.asdict(p), "output_shape": list(output_shape(p)), "flops": self.floors["flops"],
                   "fwd_bytes": self.floors["fwd_bytes"], "randn_add_value": RANDN_ADD_VALUE}
        self.records = {name: {"shape": shape, "mode": mode, "impl": name, "fwd_ms": None, "fwd_randn_ms": None,
                               "fwdbwd_ms": None, "fwdbwd_gpu_ms": None, "saved_bytes": None, "max_rel_err": None,
                               "errors": {}, "data": {},
                               "floor_ms": self.floors["floor_ms"], "floor_bytes_ms": self.floors["floor_bytes_ms"],
                               "floor_flops_ms": self.floors["floor_flops_ms"],
                               "floor_fwdbwd_ms": self.floors["floor_fwdbwd_ms"], "pct_of_floor": None,
                               "problem": problem, "error": None}
                        for name in impl_names}

    def guarded(self, impl_name: str, phase: str, fn: Callable, device) -> object:
        record = self.records[impl_name]
        if record["error"] is not None:
            return None
        failed = False
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- one implementation failing must not stop the benchmark
            failed = True
            record["error"] = f"{phase}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}"
            print(f"  !! {self.shape} {self.mode} {impl_name}: {record['error']}", file=sys.stderr)
            if not isinstance(exc, torch.OutOfMemoryError):
                traceback.print_exc()
        finally:
            if failed:
                free_memory(device)

    def fail_all(self, message: str) -> None:
        for record in self.records.values():
            record["error"] = record["error"] or message

    def run(self, device, timer: Timer, backward: bool) -> List[dict]:
        if any(name in COMPILED_IMPLS for name in self.impl_names):
            torch._dynamo.reset()  # drop the previous case's graphs: no recompile limit, no stale guards
        failed = None
        try:
            with tf32_allowed(self.tf32):
                self._run(device, timer, backward)
        except Exception as exc:  # noqa: BLE001 -- data or reference failed (e.g. OOM): record it, go on
            failed = f"case: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}"
            if not isinstance(exc, torch.OutOfMemoryError):
                traceback.print_exc()
        if failed:
            print(f"  !! {self.shape} {self.mode}: {failed}", file=sys.stderr)
            self.fail_all(failed)
        free_memory(device)
        for record in self.records.values():
            randn = record["errors"].get("randn")
            record["max_rel_err"] = randn["rel_err"] if randn else None
            if record["fwd_ms"]:
                record["pct_of_floor"] = 100 * record["floor_ms"] / record["fwd_ms"]
        return list(self.records.values())

    def _run(self, device, timer: Timer, backward: bool) -> None:
        p = self.problem
        impls = build_impls(self.impl_names, p, device, self.dtype)
        for make_data in (randn_data, kernelbench_data):
            data = make_data(p, device, self.dtype)
            ref = reference_output(p, data)
            ref_norm = torch.linalg.vector_norm(ref).item()
            data_stats = {"nonzero_frac": torch.count_nonzero(ref).item() / max(ref.numel(), 1),
                          "ref_max_abs": torch.linalg.vector_norm(ref, ord=math.inf).item() if ref.numel() else 0.0,
                          "add_value": data.add_value, "multiply_value": data.multiply_value}
            for impl in impls:
                self.records[impl.name]["data"][data.name] = data_stats
                if data.name == "randn" and impl.name in COMPILED_IMPLS and not self.compile_randn:
                    continue

                def check():
                    impl.load(data)
                    with torch.no_grad(), impl.context():
                        out = impl.model(impl.prepare(data.x))
                    return forward_error(out, ref, ref_norm)

                error = self.guarded(impl.name, f"forward check on {data.name} data", check, device)
                if error is not None:
                    self.records[impl.name]["errors"][data.name] = error
                if data.name == "randn":
                    def randn_forward_ms():
                        return self._forward_ms(impl, impl.prepare(data.x), timer)

                    self.records[impl.name]["fwd_randn_ms"] = self.guarded(
                        impl.name, "forward timing on randn data", randn_forward_ms, device)
            del ref
            free_memory(device)
        # `data` is the KernelBench data now, and every impl holds it: time on it.
        for impl in impls:
            impl.load(data)
            self._time(impl, data, device, timer, backward)

    @staticmethod
    def _forward_ms(impl: Impl, x: torch.Tensor, timer: Timer) -> float:
        """Inference forward of x (prepared for impl, whose parameters are already loaded)."""
        with torch.no_grad(), impl.context():
            return timer(lambda: impl.model(x))

    def _time(self, impl: Impl, data: Data, device, timer: Timer, backward: bool) -> None:
        record = self.records[impl.name]
        x = impl.prepare(data.x)
        record["fwd_ms"] = self.guarded(impl.name, "forward timing", lambda: self._forward_ms(impl, x, timer), device)
        if not backward:
            return

        def fwdbwd_ms_and_saved_bytes():
            step, forward = self._training_step(impl, x, device)
            with impl.context():
                return timer(step), saved_bytes(forward, device)

        measured = self.guarded(impl.name, "forward+backward", fwdbwd_ms_and_saved_bytes, device)
        if measured is not None:
            record["fwdbwd_ms"], record["saved_bytes"] = measured
        if measured is not None and device.type == "cuda" and impl.name not in COMPILED_IMPLS:
            record["fwdbwd_gpu_ms"] = self._fwdbwd_gpu_ms(impl, x, device, timer)

    def _training_step(self, impl: Impl, x: torch.Tensor, device):
        """(step, forward): the gradients of x (prepared for impl) and of impl's parameters for a fixed random
        output gradient, and the training forward alone."""
        x_grad = x.detach().clone().requires_grad_()
        leaves = [x_grad, *impl.base.parameters()]
        grad_out = impl.prepare(torch.randn(output_shape(self.problem), device=device,
                                            generator=torch.Generator(device).manual_seed(SEED_GRAD)).to(self.dtype))
        return (lambda: torch.autograd.grad(impl.model(x_grad), leaves, grad_out)), (lambda: impl.model(x_grad))

    def _fwdbwd_gpu_ms(self, impl: Impl, x: torch.Tensor, device, timer: Timer) -> Optional[float]:
        """The forward+backward step's GPU time (graph_replay_ms; compiled implementations are not captured). A
        capture that fails leaves it None and the implementation's other results standing: the eager model's
        step does (KernelBench's torch.min(x, torch.tensor(0.0, device=...)) copies a CPU scalar every call, which
        capture refuses)."""
        step, _ = self._training_step(impl, x, device)
        try:
            with impl.context():
                return graph_replay_ms(step, timer)
        except Exception as exc:  # noqa: BLE001 -- a step that cannot be captured has no GPU-only time
            print(f"  note: {self.shape} {self.mode} {impl.name}: no CUDA graph of the step: {type(exc).__name__}: "
                  f"{str(exc).strip().splitlines()[0][:200]}", file=sys.stderr)
            return None
        finally:
            free_memory(device)


def ratio(base: Optional[float], ours: Optional[float]) -> str:
    return f"{base / ours:.2f}x" if base and ours else "-"


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def print_case(records: List[dict]) -> None:
    first = records[0]
    problem, data = first["problem"], first["data"]
    print(f"\n== {first['shape']} | {first['mode']} | x {problem['batch']}x{problem['in_channels']}x"
          f"{problem['in_hw'][0]}x{problem['in_hw'][1]} k{problem['kernel'][0]} s{problem['stride'][0]} -> "
          f"{'x'.join(map(str, problem['output_shape']))} | floor fwd {first['floor_ms']:.4f} ms "
          f"(bytes {first['floor_bytes_ms']:.4f}, flops {first['floor_flops_ms']:.4f}), "
          f"fwd+bwd {first['floor_fwdbwd_ms']:.4f} ms ==")
    for name, stats in data.items():
        print(f"   {name} data (add {stats['add_value']}, mul {stats['multiply_value']}): "
              f"{100 * stats['nonzero_frac']:.4g}% of reference outputs nonzero, max |y| {stats['ref_max_abs']:.3g}")
    by_impl = {r["impl"]: r for r in records}
    baselines = {label: by_impl.get(name, {}) for label, name in
                 (("eager", "eager"), ("compile", "compile"), ("best", "best_tuned"))}
    header = (f"   {'impl':<25} {'fwd_ms':>9} {'fwd_randn':>10} {'fwdbwd_ms':>10} {'fb_gpu_ms':>10} "
              f"{'eager/x fwd|fb':>16} {'compile/x fwd|fb':>17} "
              f"{'best/x fwd|fb':>15} {'%floor':>7} {'rel_randn':>10} {'rel_kb':>10} {'abs_randn':>10} "
              f"{'saved_MB':>9}")
    print(header)
    for r in records:
        cols = [f"{ratio(b.get('fwd_ms'), r['fwd_ms'])}|{ratio(b.get('fwdbwd_ms'), r['fwdbwd_ms'])}"
                for b in baselines.values()]
        errors = r["errors"]
        saved_mb = r["saved_bytes"] / 1e6 if r["saved_bytes"] is not None else None
        print(f"   {r['impl']:<25} {fmt(r['fwd_ms'], '.4f'):>9} {fmt(r['fwd_randn_ms'], '.4f'):>10} "
              f"{fmt(r['fwdbwd_ms'], '.4f'):>10} {fmt(r['fwdbwd_gpu_ms'], '.4f'):>10} {cols[0]:>16} "
              f"{cols[1]:>17} {cols[2]:>15} {fmt(r['pct_of_floor'], '.1f'):>7} "
              f"{fmt(errors.get('randn', {}).get('rel_err'), '.2e'):>10} "
              f"{fmt(errors.get('kernelbench', {}).get('rel_err'), '.2e'):>10} "
              f"{fmt(errors.get('randn', {}).get('max_abs_err'), '.2e'):>10} {fmt(saved_mb, '.1f'):>9}"
              + (f"   ERROR {r['error']}" if r["error"] else ""))


def print_summary(records: List[dict]) -> None:
    """One line per case: how PyTorch's times compare with ours (baseline time / ours, >1 means ours wins)."""
    print("\n== summary: PyTorch time / fused_convt time (fwd, fwd+bwd); fused_convt's share of the floor ==")
    cases: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        cases.setdefault((r["shape"], r["mode"]), {})[r["impl"]] = r
    width = max((len(shape) for shape, _ in cases), default=0)
    for (shape, mode), by_impl in cases.items():
        ours = by_impl.get("fused_convt")
        if not ours or ours["fwd_ms"] is None:
            continue
        parts = [f"{name}/ours = {ratio(by_impl[name]['fwd_ms'], ours['fwd_ms'])}, "
                 f"{ratio(by_impl[name]['fwdbwd_ms'], ours['fwdbwd_ms'])}"
                 for name in ("eager", "compile", "best_tuned") if name in by_impl]
        if ours["fwdbwd_gpu_ms"] is not None:
            parts.append(f"ours fwd+bwd {fmt(ours['fwdbwd_ms'], '.4f')} ms, GPU alone {ours['fwdbwd_gpu_ms']:.4f}")
        print(f"   {shape:<{width}} {mode:<5} ours {ours['fwd_ms']:.4f} ms "
              f"({fmt(ours['pct_of_floor'], '.0f')}% of floor; "
              f"randn data {fmt(ours['fwd_randn_ms'], '.4f')} ms) | "
              + " | ".join(parts))


def plot(records: List[dict], path: Path) -> None:
    """Bars of each implementation's time per case on a log scale, the case's floor as a dashed line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.py: matplotlib is not installed; no plot written")
        return
    cases = list(dict.fromkeys((r["shape"], r["mode"]) for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lookup = {(r["shape"], r["mode"], r["impl"]): r for r in records}
    panels = [("fwd_ms", "floor_ms", "forward")]
    if any(r["fwdbwd_ms"] for r in records):
        panels.append(("fwdbwd_ms", "floor_fwdbwd_ms", "forward + backward"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.2 * len(cases) + 3), 4.5 * len(panels)),
                             sharex=True, squeeze=False)
    width = 0.8 / len(impls)
    for ax, (key, floor_key, title) in zip(axes[:, 0], panels):
        for j, impl in enumerate(impls):
            points = [(i + (j - (len(impls) - 1) / 2) * width, lookup[(s, m, impl)][key])
                      for i, (s, m) in enumerate(cases) if (s, m, impl) in lookup and lookup[(s, m, impl)][key]]
            if points:
                ax.bar(*zip(*points), width=width, label=impl)
        for i, (s, m) in enumerate(cases):
            floor = next(r[floor_key] for r in records if (r["shape"], r["mode"]) == (s, m))
            ax.hlines(floor, i - 0.45, i + 0.45, colors="black", linestyles="--",
                      label="floor" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title} time, ms (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(len(impls) + 1, 6))
    axes[-1, 0].set_xticks(range(len(cases)), [f"{s}\n{m}" for s, m in cases],
                           rotation=60 if len(cases) > 8 else 0, fontsize=7 if len(cases) > 8 else 9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def git_revision() -> Optional[str]:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def output_stem(out_dir: Path, device_name: str, date: str) -> Path:
    """<device slug>-<date>, with -2, -3, ... when that name is taken: a second run the same day keeps the first."""
    stem = f"{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}-{date}"
    candidate, n = out_dir / stem, 2
    while candidate.with_suffix(".json").exists():
        candidate, n = out_dir / f"{stem}-{n}", n + 1
    return candidate


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="kb_v0,kb_v1",
                        help="comma-separated of kb_v0, kb_v1 (default both); 'none' for the sweep alone")
    parser.add_argument("--modes", default="tf32,bf16", help="comma-separated of tf32, fp32, bf16, fp16")
    parser.add_argument("--sweep", action="store_true", help="add ~20 smaller points, in every selected mode")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only (no saved bytes)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile and best_tuned")
    parser.add_argument("--quick", action="store_true", help="short timing runs, smaller ceiling matmuls")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: tiny shapes, no compile, perf_counter timing (to test this script)")
    parser.add_argument("--out", type=Path, default=ROOT / "perf" / "results", help="directory for JSON and PNG")
    args = parser.parse_args(argv)
    shapes = [] if args.shapes.strip() == "none" else [s.strip() for s in args.shapes.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name, chosen, known in (("--shapes", shapes, SHAPES), ("--modes", modes, MODES)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; expected some of {sorted(known)}")
    if not modes:
        parser.error("--modes: give at least one mode")
    if not shapes and not args.sweep:
        parser.error("nothing to run: --shapes none without --sweep")
    args.shape_list, args.mode_list = shapes, modes
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("bench.py: no CUDA GPU is visible (torch.cuda.is_available() is False). This is a GPU "
                  "benchmark; to exercise its code paths on the CPU run it with --device cpu --quick.",
                  file=sys.stderr)
            return 2
        if not fused_convt.cuda_available():
            print("bench.py: fused_convt was built without CUDA kernels (fused_convt.cuda_available() is "
                  "False); rebuild it with CUDA to benchmark on the GPU.", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = f"cpu {platform.machine()}"
    use_compile = device.type == "cuda" and not args.no_compile
    backward = not args.no_backward

    def impl_names(candidates):
        return [n for n in candidates if (use_compile or n not in COMPILED_IMPLS)
                and (backward or n != "fused_convt_recompute")]

    plan = [(shape, SHAPES[shape], mode, impl_names(MAIN_IMPLS), True)
            for shape in args.shape_list for mode in args.mode_list]
    if args.sweep:
        plan += [(name, p, mode, impl_names(SWEEP_IMPLS), False)
                 for mode in args.mode_list for name, p in sweep_problems().items()]
    if device.type == "cpu":
        plan = [(f"{shape}-cpu-tiny", tiny_for_cpu(p), mode, impls, compile_randn)
                for shape, p, mode, impls, compile_randn in plan]

    timer = Timer(device, args.quick)
    print(f"fused_convt {fused_convt.__version__} ({git_revision()}) | torch {torch.__version__} | "
          f"{device_name} | timing: {timer.method} | {len(plan)} cases")
    ceilings = measure_ceilings(device, timer, args.quick)
    rates = ceilings["matmul_flops_per_s"]
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + write) | matmul "
          f"{ceilings['matmul_n']}^3: tf32 {rates['tf32'] / 1e12:.3g}, bf16 {rates['bf16'] / 1e12:.3g}, "
          f"fp32 {rates['fp32'] / 1e12:.3g} TFLOP/s")

    started = time.perf_counter()
    records: List[dict] = []
    for shape, p, mode, impls, compile_randn in plan:
        case = Case(shape, p, mode, impls, ceilings, compile_randn)
        case_records = case.run(device, timer, backward)
        print_case(case_records)
        records += case_records
    print_summary(records)

    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = output_stem(args.out, device_name, date)
    result = {
        "gpu": device_name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "fused_convt": fused_convt.__version__, "git": git_revision(), "date": date,
        "timing": {"method": timer.method, "statistic": "median", "warmup_ms": timer.warmup_ms, "rep_ms": timer.rep_ms},
        "argv": sys.argv[1:] if argv is None else list(argv), "ceilings": ceilings, "records": records,
    }
    stem.with_suffix(".json").write_text(json.dumps(finite_or_none(result), indent=1) + "\n")
    plot(records, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')} and .png ({time.perf_counter() - started:.0f} s of cases)")
    failures = [r for r in records if r["error"]]
    if failures:
        print(f"bench.py: {len(failures)} record(s) failed:", file=sys.stderr)
        for r in failures:
            print(f"   {r['shape']} {r['mode']} {r['impl']}: {r['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
