#!/usr/bin/env bash
# The test command (README and .ci/run both call this): build the C++ library and its tests, run ctest,
# install the Python package with pip and run pytest against the installed package.
# FUSED_CONVT_CUDA_ARCHITECTURES picks the GPU targets (default: the library's 80;86;89;90a).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FUSED_CONVT_BUILD_DIR:-$root/build/tests}
python=${PYTHON:-python3}
arch_args=()
if [ -n "${FUSED_CONVT_CUDA_ARCHITECTURES:-}" ]; then
  arch_args=("-DCMAKE_CUDA_ARCHITECTURES=${FUSED_CONVT_CUDA_ARCHITECTURES}")
fi

echo "== C++: configure, build, ctest"
cmake -S "$root" -B "$build" -G Ninja "${arch_args[@]}" \
  -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$python")"
cmake --build "$build"
ctest --test-dir "$build" --output-on-failure

echo "== Python: pip install, pytest"
pip_args=()
for a in "${arch_args[@]}"; do pip_args+=("-Ccmake.define.${a#-D}"); done
"$python" -m pip install --quiet --no-build-isolation --no-deps "${pip_args[@]}" "$root"
cd "$root/tests/python"
"$python" -m pytest -q -p no:cacheprovider "$@" .
