#!/usr/bin/env bash
# One-shot check of a fresh GPU node: environment and ops, the GPU tests, layer and step
# benchmarks in bf16, and a 1-GPU run with save and resume. Writes one JSON report and prints
# a summary; exit status 1 if any part failed. `--cpu` runs the parts a CPU can (CI runs it).
#   tools/gpu_check.sh [--cpu] [--out gpu_check.json] [--skip PART ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec "$PY" tools/gpu_check.py "$@"
