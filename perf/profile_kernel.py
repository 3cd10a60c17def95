"""Nsight Compute at the instruction level for the implicit-GEMM kernels (the forward, the training forward
that also stores d out / d pre-activation, grad_input) at kb_v1.

Two subcommands:
  run        one call of the op, twice (profile the second: --launch-skip 1), on KernelBench's data or randn:
               ncu --kernel-name regex:implicit_gemm --launch-skip 1 --launch-count 1 --set full \\
                   --import-source yes --page source --print-source sass --csv \\
                   python perf/profile_kernel.py run forward --dtype bf16 > forward.csv
             (whether half-written output sectors reach DRAM as read-modify-writes, perf/NOTES.md's first open
             item: --metrics dram__bytes_read.sum,dram__bytes_write.sum with `run train_forward --dtype tf32`)
  summarize  reads that CSV: executed warp instructions, stall samples (with the top stall reasons) and every
             per-instruction counter whose name holds "Sectors" (L2 / L1 traffic), by region (before the first
             HMMA, from the first to the last HMMA, after the last) and by memory opcode (LDGSTS = the cp.async
             copies, LDG, STG = the epilogue's stores, LDL / STL = spills, LDS / STS, LDSM = ldmatrix):
               python perf/profile_kernel.py summarize forward.csv
perf/NOTES.md's profiles (instructions per region, the L2 split of the forward) come from these two steps.
"""
import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
MEMORY_OPCODES = ("LDGSTS", "LDG", "STG", "LDL", "STL", "LDS", "STS", "LDSM")


def run(kind: str, dtype_name: str, data_name: str, device_name: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "tests" / "python"))
    import bench  # noqa: E402 (perf/bench.py: the same problems and data as the benchmark)
    import fused_convt  # noqa: E402

    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(device_name)
    problem = bench.SHAPES["kb_v1"]
    if device.type == "cpu":
        problem = bench.tiny_for_cpu(problem)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype_name]
    make = bench.kernelbench_data if data_name == "kernelbench" else bench.randn_data
    data = make(problem, device, dtype)
    conv = [list(problem.stride), list(problem.padding), list(problem.output_padding), list(problem.dilation),
            problem.groups]
    epilogue = (data.add_value, data.multiply_value, True)
    op = torch.ops.fused_convt
    with torch.no_grad():
        for _ in range(2):
            if kind in ("forward", "train_forward"):  # the training forward also stores d out / d pre-activation
                op.conv_transpose2d_fused(data.x, data.weight, data.bias, *conv, *epilogue, kind == "train_forward",
                                          True)
            else:
                _, factor = op.conv_transpose2d_fused(data.x, data.weight, data.bias, *conv, *epilogue, True, True)
                grad = torch.randn(factor.shape, dtype=dtype, device=device)
                op.conv_transpose2d_fused_backward(grad, data.x, data.weight, data.bias, factor, *conv, *epilogue,
                                                   True, [True, False, False])
    if device.type == "cuda":
        torch.cuda.synchronize()


def number(text: str) -> float:
    text = text.replace(",", "").strip()
    return float(text) if text else 0.0


def read_source_csv(path: Path) -> Tuple[List[str], List[List[str]]]:
    """The header row (the one naming a "Source" column) and the instruction rows after it (rows whose
    counters parse as numbers; a units row, if present, does not)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    start = next(i for i, row in enumerate(rows) if "Source" in row)
    header = rows[start]
    executed = header.index("Instructions Executed")
    instructions = []
    for row in rows[start + 1:]:
        if len(row) != len(header):
            continue
        try:
            number(row[executed])
        except ValueError:
            continue
        instructions.append(row)
    return header, instructions


def opcode_of(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # predicate
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def summarize(path: Path) -> Dict[str, Dict[str, float]]:
    """Totals per region and per memory opcode: {"region:<name>" | "opcode:<op>": {counter: total}}."""
    header, instructions = read_source_csv(path)
    source = header.index("Source")
    counters = [name for name in header if name == "Instructions Executed" or "Sectors" in name
                or name == "Warp Stall Sampling (All Samples)" or name.startswith("stall_")]
    columns = {name: header.index(name) for name in counters}
    opcodes = [opcode_of(row[source]) for row in instructions]
    mma = [i for i, op in enumerate(opcodes) if op == "HMMA"]
    first, last = (mma[0], mma[-1]) if mma else (len(opcodes), len(opcodes) - 1)
    totals: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for i, (row, op) in enumerate(zip(instructions, opcodes)):
        region = "before the first HMMA" if i < first else "HMMA loop" if i <= last else "after the last HMMA"
        keys = ["region:" + region, "total"] + (["opcode:" + op] if op in MEMORY_OPCODES else [])
        for name, column in columns.items():
            value = number(row[column])
            for key in keys:
                totals[key][name] += value
    return totals


def print_summary(totals: Dict[str, Dict[str, float]]) -> None:
    everything = totals["total"]
    shown = ["Instructions Executed", "Warp Stall Sampling (All Samples)"] + sorted(
        name for name in everything if "Sectors" in name)
    stalls = sorted((name for name in everything if name.startswith("stall_")), key=lambda n: -everything[n])
    for key in sorted(totals, key=lambda k: (k != "total", k)):
        part = totals[key]
        cells = []
        for name in shown:
            if name in part:
                share = 100 * part[name] / everything[name] if everything[name] else 0.0
                cells.append(f"{name} {part[name]:.4g} ({share:.0f}%)")
        top = ", ".join(f"{n[len('stall_'):]} {part[n]:.0f}" for n in stalls[:3] if part.get(n))
        print(f"{key}: " + "; ".join(cells) + (f"; top stalls: {top}" if top else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="one op call, twice, for ncu")
    run_parser.add_argument("kind", choices=("forward", "train_forward", "grad_input"))
    run_parser.add_argument("--dtype", choices=("bf16", "fp16", "tf32"), default="bf16")
    run_parser.add_argument("--data", choices=("kernelbench", "randn"), default="kernelbench")
    run_parser.add_argument("--device", default="cuda", help="cpu: a tiny problem, to test this script")
    summary_parser = sub.add_parser("summarize", help="totals of an ncu source-page CSV")
    summary_parser.add_argument("csv", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.kind, args.dtype, args.data, args.device)
    else:
        print_summary(summarize(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
