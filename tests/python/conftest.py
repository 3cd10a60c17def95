import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import fused_convt  # noqa: E402

HAS_CUDA = fused_convt.cuda_available() and torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_convt")

# Every test parametrized over `device` runs on the CPU and, where a GPU exists, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def exact_fp32():
    """Tests compare float32 against float64 at float32 tolerance: keep PyTorch's reference math exact."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def load_perf_script(name: str):
    """A perf/ script (not a package) loaded as a module, so that its code paths can run under pytest."""
    path = Path(__file__).resolve().parents[2] / "perf" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fused_convt_perf_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
