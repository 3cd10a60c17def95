"""``python -m fused_convt``: check the fused op against PyTorch on KernelBench level 2, problem 93, and time it.

For each shape it compares fused_convt and PyTorch's own composite with a float64 reference computed on the same
device, on two data sets: KernelBench's (torch.rand inputs, nn.ConvTranspose2d's default initialization, add 0.5,
mul 2.0: almost every output is exactly 0) and randn data with add -0.5, where both branches of min(., 0) are
common. fp32 runs under PyTorch's default settings (cuDNN convolutions in TF32), bf16 as is. It then times both
against eager PyTorch and torch.compile. Without a CUDA device (or a CUDA build) it runs the CPU path on kb_v0
at batch 2, without torch.compile. perf/bench.py is the full benchmark.
"""
import argparse
import importlib.util
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fused_convt

# The two published shape sets of KernelBench level 2, problem 93 (kernel 4, stride 2, padding 0, bias).
SHAPES = {
    "kb_v0": dict(batch=128, in_channels=32, out_channels=16, size=32, kernel=4, stride=2),
    "kb_v1": dict(batch=128, in_channels=64, out_channels=128, size=64, kernel=4, stride=2),
}
CPU_BATCH = 2
DATA_SETS = {"kernelbench": (0.5, 2.0), "randn": (-0.5, 2.0)}  # (add_value, multiply_value)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A row is ok when ours' ||y - ref|| / ||ref|| is under REL_TOL or within 2x PyTorch's, or its max |y - ref| is
# under ABS_TOL (outputs are O(1)). The absolute test is for KernelBench's data: its few nonzero outputs come from
# cancellation in y + 0.5, which magnifies rounding relative to their size.
# On CUDA with cudnn.allow_tf32 (the default) fp32 convolutions, PyTorch's and ours, round inputs to TF32's
# 10-bit mantissa, so fp32 is held to TF32's tolerance there.
REL_TOL = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2}
ABS_TOL = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 4e-3}


def pytorch_op(x, weight, bias, stride, add_value, multiply_value):
    """The KernelBench model's forward."""
    y = F.conv_transpose2d(x, weight, bias, stride=stride)
    y = torch.min(y + add_value, torch.tensor(0.0, device=y.device))
    return F.gelu(y) * multiply_value


def fused_op(x, weight, bias, stride, add_value, multiply_value):
    return fused_convt.conv_transpose2d_fused(x, weight, bias, stride, add_value=add_value,
                                              multiply_value=multiply_value)


def make_data(shape, data_set, device):
    """(x, weight, bias) in float32 on `device`."""
    n, cin, cout, size, k = (shape[key] for key in ("batch", "in_channels", "out_channels", "size", "kernel"))
    torch.manual_seed(0)
    if data_set == "kernelbench":
        conv = torch.nn.ConvTranspose2d(cin, cout, k, shape["stride"], device=device)
        return torch.rand(n, cin, size, size, device=device), conv.weight.detach(), conv.bias.detach()
    weight = torch.randn(cin, cout, k, k, device=device) / (cin * k * k) ** 0.5
    return torch.randn(n, cin, size, size, device=device), weight, 0.5 * torch.randn(cout, device=device)


def error(y, ref, ref_norm):
    """(||y - ref|| / ||ref||, max |y - ref|); the plain norm where the reference is all zeros."""
    diff = y.double()
    diff.sub_(ref)
    norm = torch.linalg.vector_norm(diff).item()
    return norm / ref_norm if ref_norm > 0 else norm, torch.linalg.vector_norm(diff, ord=float("inf")).item()


def timer_name(device):
    if device.type != "cuda":
        return "time.perf_counter median"
    if importlib.util.find_spec("triton") is not None:
        return "triton do_bench median"
    return "CUDA-event median (triton is not installed)"


def median_ms(fn, device):
    """triton.testing.do_bench's median on CUDA (CUDA events without triton); time.perf_counter on the CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        except ImportError:
            pass
    fn()
    times_ms = []
    for _ in range(20 if device.type == "cuda" else 5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times_ms)


def check(name, shape, device):
    """Print one row per (data set, dtype); return True when every fused_convt error is acceptable."""
    all_ok = True
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    for data_set, (add_value, multiply_value) in DATA_SETS.items():
        x32, w32, b32 = make_data(shape, data_set, device)
        for dtype_name, dtype in DTYPES.items():
            args = tuple(t.to(dtype) for t in (x32, w32, b32)) + (shape["stride"], add_value, multiply_value)
            ref = pytorch_op(*(t.double() for t in args[:3]), *args[3:])
            ref_norm = torch.linalg.vector_norm(ref).item()
            nonzero = torch.count_nonzero(ref).item() / ref.numel()
            ours, theirs = fused_op(*args), pytorch_op(*args)
            ours_err, theirs_err = error(ours, ref, ref_norm), error(theirs, ref, ref_norm)
            precision = "tf32" if dtype_name == "fp32" and tf32 else dtype_name
            ok = ours_err[0] <= max(REL_TOL[precision], 2 * theirs_err[0]) or ours_err[1] <= ABS_TOL[precision]
            kernelbench_check = "-"
            if dtype == torch.float32:  # KernelBench's own test: allclose to the fp32 model, atol = rtol = 1e-2
                kernelbench_check = "pass" if torch.allclose(ours, theirs, atol=1e-2, rtol=1e-2) else "FAIL"
                ok = ok and kernelbench_check == "pass"
            all_ok = all_ok and ok
            print(f"{name:<6} {data_set:<12} {dtype_name:<5} {100 * nonzero:>9.4g}%  "
                  f"{ours_err[0]:>9.2e} ({ours_err[1]:.1e})  {theirs_err[0]:>9.2e} ({theirs_err[1]:.1e})  "
                  f"{kernelbench_check:>11}  {'ok' if ok else 'WORSE THAN EXPECTED'}")
            del ref, ours, theirs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return all_ok


def time_shape(name, shape, device, use_compile):
    x32, w32, b32 = make_data(shape, "kernelbench", device)
    add_value, multiply_value = DATA_SETS["kernelbench"]
    compiled = torch.compile(pytorch_op, dynamic=False) if use_compile else None
    for dtype_name, dtype in DTYPES.items():
        args = tuple(t.to(dtype) for t in (x32, w32, b32)) + (shape["stride"], add_value, multiply_value)
        ours_ms = median_ms(lambda: fused_op(*args), device)
        eager_ms = median_ms(lambda: pytorch_op(*args), device)
        compile_ms = median_ms(lambda: compiled(*args), device) if compiled else None
        compile_cols = (f"{compile_ms:>11.4f}  {compile_ms / ours_ms:>11.2f}x" if compile_ms is not None
                        else f"{'-':>11}  {'-':>12}")
        print(f"{name:<6} {dtype_name:<5} {ours_ms:>11.4f} {eager_ms:>10.4f} {compile_cols}  {eager_ms / ours_ms:>9.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_convt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma-separated of kb_v0, kb_v1 (default: both on CUDA, kb_v0 on a CPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the timing")
    args = parser.parse_args(argv)

    on_cuda = fused_convt.cuda_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    names = args.shapes.split(",") if args.shapes else (list(SHAPES) if on_cuda else ["kb_v0"])
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected some of {list(SHAPES)}")
    shapes = {n: SHAPES[n] if on_cuda else {**SHAPES[n], "batch": CPU_BATCH} for n in names}
    use_compile = on_cuda and not args.no_compile

    if on_cuda:
        print(f"fused_convt {fused_convt.__version__} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        why = "fused_convt was built without CUDA" if torch.cuda.is_available() else "no CUDA device is visible"
        print(f"fused_convt {fused_convt.__version__}, torch {torch.__version__}: {why}, so this runs the CPU path "
              f"at batch {CPU_BATCH} (not the KernelBench batch of 128), without torch.compile.")
    print(f"fp32 settings as found: cudnn.allow_tf32={torch.backends.cudnn.allow_tf32} (True, PyTorch's default, "
          f"runs fp32 convolutions in TF32 on CUDA; fused_convt follows the same flag).")
    print("\nErrors against the same op in float64 on the device: ||y - ref|| / ||ref|| (max |y - ref|); ok: ours "
          "under the precision's tolerance or within 2x PyTorch's error.")
    print(f"{'shape':<6} {'data':<12} {'dtype':<5} {'nonzero':>10}  {'fused_convt':>20}  {'PyTorch':>20}  "
          f"{'KB allclose':>11}")
    all_ok = True
    with torch.no_grad():
        for name, shape in shapes.items():
            all_ok = check(name, shape, device) and all_ok

        print(f"\nTime on KernelBench data, ms ({timer_name(device)}); ratio = PyTorch time / fused_convt time.")
        print(f"{'shape':<6} {'dtype':<5} {'fused_convt':>11} {'eager':>10} {'compile':>11}  {'compile/ours':>12}  "
              f"{'eager/ours':>10}")
        for name, shape in shapes.items():
            time_shape(name, shape, device, use_compile)
    print("\nall checks passed" if all_ok else "\nSOME CHECKS FAILED (see rows above)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
