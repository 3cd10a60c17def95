#!/usr/bin/env bash
# Everything a GPU machine should confirm, in one call (device time is scarce): build and install for one
# architecture, the C++ tests (CUDA vs CPU included), the CUDA pytest cases (fuzz, > 2^31 elements, graphs,
# streams), compute-sanitizer, the per-gradient backward timing and perf/bench.py. Logs and results go to
# $OUT (default ./gpu-check). Stops at the first failing stage; timing stages run only on a correct build.
# Usage: OUT=/some/dir bash tests/gpu/check_all.sh [arch, default 90a: the H100 kernels, wgmma included]
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$root/gpu-check}
arch=${1:-90a}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$root"
stage() { echo "== $1 ($(date +%T))"; }

stage "build and install (sm_$arch)"
"$python" -m pip install --quiet --no-build-isolation --no-deps -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" . \
  > "$out/pip.log" 2>&1 || { tail -30 "$out/pip.log"; exit 1; }

stage "ctest"
{ cmake -S . -B build/gpu-check -G Ninja -DCMAKE_CUDA_ARCHITECTURES="$arch" -DFUSED_CONVT_TESTS=ON \
    -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" && cmake --build build/gpu-check \
    && ctest --test-dir build/gpu-check --output-on-failure; } > "$out/ctest.log" 2>&1
status=$?
grep -E "tests passed|Failed|checks" "$out/ctest.log" | tail -8
[ $status -eq 0 ] || exit 1

stage "pytest (CUDA cases)"
(cd tests/python && "$python" -m pytest -q -p no:cacheprovider -rs -k "cuda or large or multi_device or streams" .) \
  > "$out/pytest_cuda.log" 2>&1
status=$?
tail -5 "$out/pytest_cuda.log"
[ $status -eq 0 ] || exit 1

stage "compute-sanitizer"
bash tests/gpu/sanitize.sh > "$out/sanitize.log" 2>&1
status=$?
grep -E "SUMMARY|workload" "$out/sanitize.log"
[ $status -eq 0 ] || exit 1

stage "backward breakdown"
"$python" perf/backward_breakdown.py 2>&1 | tee "$out/breakdown.txt" | tail -5

stage "perf/bench.py"
"$python" perf/bench.py --modes tf32,bf16 --out "$out/results" > "$out/bench.txt" 2>&1
tail -8 "$out/bench.txt"
stage "done"
