#!/usr/bin/env bash
# One-shot check of a GPU node (tools/gpu_check.py says what it runs): the GPU tests, layer and
# whole-step benchmarks at 7B width in bf16 with comm-sparse ZeRO-3 on and off, and a run from an
# HF checkpoint with recompute, document masks, save and resume. Under 9 minutes of parts.
#   tools/gpu_check.sh [--cpu] [--out DIR] [--wheels DIR] [--skip PART ...] [--only PART ...]
# Output: DIR (default gpu_check/) holds PART.log, PART.json, report.json and report.md; exit
# status 1 if any part failed. `--cpu` runs tiny shapes on a machine without a GPU (CI does).
#
# First, if `import deepspeed` or `import megatron.core` fails (a lent GPU node has neither and
# no network), they are installed from a local folder of wheels: --wheels DIR, else
# $SAT_DIST_WHEELS, else ../shared/wheels, else .whl/ (both relative to the checkout).
# /work/shared/tools/device-wheels.sh fills such a folder (flat, one wheel per distribution:
# deepspeed, megatron-core and the pure-Python pieces they need for Python 3.12). They go into
# a folder of their own ($SAT_DIST_SITE, default $TMPDIR/sat_dist_site) put first on
# PYTHONPATH, so the node's own environment is left as it was.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
wheels=${SAT_DIST_WHEELS:-}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) wheels=${1#--wheels=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

deps_error() { "$PY" -c 'import deepspeed, megatron.core' 2>&1 | grep -E 'Error|error' | tail -1; }
say() { echo "[gpu_check] $*"; }

if "$PY" -c 'import deepspeed, megatron.core' >/dev/null 2>&1; then
  deps="deepspeed and megatron-core already import"
else
  why=$(deps_error)
  dir=""
  if [ -n "$wheels" ]; then
    cands=("$wheels")
  else
    cands=("$repo/../shared/wheels" "$repo/.whl")
  fi
  for c in "${cands[@]}"; do
    if compgen -G "$c/deepspeed-*.whl" >/dev/null && compgen -G "$c/megatron_core-*.whl" >/dev/null; then
      dir=$c; break
    fi
  done
  if [ -z "$dir" ]; then
    deps="NOT INSTALLED: deepspeed or megatron-core does not import ($why) and no wheel folder with both"
    deps+=" was found (looked in: ${cands[*]}); make one with /work/shared/tools/device-wheels.sh and pass"
    deps+=" --wheels DIR; the parts that need them will fail"
  else
    site=${SAT_DIST_SITE:-${TMPDIR:-/tmp}/sat_dist_site}
    say "deepspeed or megatron-core missing ($why): installing the wheels of $dir into $site"
    # --no-deps: the folder holds the missing pieces; the rest (torch, numpy, ...) is the node's own
    if log=$("$PY" -m pip install -q --no-index --find-links "$dir" --no-deps --no-compile --no-cache-dir \
               --upgrade --target "$site" "$dir"/*.whl 2>&1); then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
      if "$PY" -c 'import deepspeed, megatron.core' >/dev/null 2>&1; then
        deps="installed from $dir into $site (PYTHONPATH): $(cd "$dir" && ls -- *.whl | tr '\n' ' ')"
      else
        deps="installed from $dir into $site, but the import still fails: $(deps_error)"
      fi
    else
      deps="INSTALL FAILED from $dir (pip --no-index): $(echo "$log" | tail -3 | tr '\n' ' ')"
    fi
  fi
fi
say "dependencies: $deps"
export SAT_DIST_GPU_CHECK_DEPS="$deps"
exec "$PY" "$repo/tools/gpu_check.py" ${args[@]+"${args[@]}"}
