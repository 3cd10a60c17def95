#!/usr/bin/env bash
# Runs the sanitize workload (every kernel variant, every dtype, forward and backward) under each
# compute-sanitizer tool; fails on any reported error. Needs a GPU, compute-sanitizer and an installed (or
# PYTHONPATH-visible) fused_convt. Usage: bash tests/gpu/sanitize.sh [tool ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck initcheck synccheck)
status=0
for tool in "${tools[@]}"; do
  echo "== compute-sanitizer --tool $tool"
  # PyTorch's own allocator pools memory, so initcheck / memcheck see our kernels' accesses to it as
  # in-bounds; --error-exitcode makes any report fail the run.
  if ! compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 "$python" "$here/sanitize_workload.py"; then
    echo "!! $tool reported errors"
    status=1
  fi
done
exit $status
