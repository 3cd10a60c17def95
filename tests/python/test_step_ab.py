"""perf/step_ab.py on the CPU: its shape names, its lines (a time, the gradients' fingerprints, their error against
float64), and fingerprints that repeat for the same build and data."""
import re

import pytest

from conftest import load_perf_script

LINE = re.compile(r"^(\S+) +(\S+) +(\S+) step +([\d.]+) us  x (\w{10}) w (\w{10}) b (\w{10})"
                  r"  fwd +([\d.]+) us  y (\w{10})(?:  err x (\S+) w (\S+) b (\S+))?$")


def run(capsys, *argv):
    step_ab = load_perf_script("step_ab")
    assert step_ab.main([*argv, "--device", "cpu"]) == 0
    return [LINE.match(line) for line in capsys.readouterr().out.splitlines()]


def test_lines_fingerprints_and_errors(capsys):
    shape = "n1_c4x6_hw5_k4_s2_p1"
    first = run(capsys, "A", "--shapes", shape, "--modes", "fp32,bf16", "--error")
    again = run(capsys, "B", "--shapes", shape, "--modes", "fp32,bf16")
    assert len(first) == 2 and all(first) and len(again) == 2 and all(again)
    for m, mode, tol in zip(first, ("fp32", "bf16"), (1e-5, 3e-2)):
        assert m.group(1) == "A" and m.group(2) == shape and m.group(3) == mode and float(m.group(4)) > 0
        assert float(m.group(8)) > 0
        errors = [float(e) for e in m.group(10, 11, 12)]
        assert all(0 <= e < tol for e in errors), errors
    # the same build and data: the same bits, gradients and forward output
    assert [m.group(5, 6, 7, 9) for m in first] == [m.group(5, 6, 7, 9) for m in again]


def test_shape_names():
    step_ab = load_perf_script("step_ab")
    p = step_ab.parse_shape("n32_c64x16_hw64_k4_s2")
    assert (p.batch, p.in_channels, p.out_channels, p.in_hw, p.kernel, p.stride, p.padding) == (
        32, 64, 16, (64, 64), (4, 4), (2, 2), (0, 0))
    assert step_ab.parse_shape("n2_c3x5_hw7_k3_s3_p1").padding == (1, 1)
    assert step_ab.parse_shape("kb_v1").out_channels == 128
    with pytest.raises(ValueError, match="shape 'n32_c64'"):
        step_ab.parse_shape("n32_c64")
