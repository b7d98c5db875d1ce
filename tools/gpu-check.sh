#!/usr/bin/env bash
# The GPU run of issue #25 in one go, on a machine with an NVIDIA GPU and no package index:
#   1. installs what it lacks from tools/wheels/wheels.tar.xz (tools/fetch-gpu-wheels.sh packs it elsewhere);
#   2. makes `blinkflow` importable (an editable install, or a link tree when setuptools is missing);
#   3. runs the needs_cuda tests and `blinkflow bench gpu` (about 8 minutes), which writes
#      docs/benchmarks.md's gpu section;
# and leaves every output under $OUT (default ./gpu-out): nvidia-smi, pip, pytest and bench logs,
# the bench JSON and the updated docs/benchmarks.md. A step that fails is logged; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-480}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
log() { echo "gpu-check: $*" | tee -a "$OUT/steps.log"; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (no driver?)"
$PY - > "$OUT/python.txt" 2>&1 <<'PYEOF'
import sys, importlib
print(sys.version)
for name in ("torch", "torchvision", "numpy", "av", "yaml", "prometheus_client", "tqdm", "scipy", "PIL", "ray"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as exc:
        print(name, "MISSING", exc)
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.device_count())
PYEOF
log "python: $(head -1 "$OUT/python.txt")"

missing=()
for pair in av:av yaml:pyyaml prometheus_client:prometheus-client tqdm:tqdm scipy:scipy pycocotools:pycocotools \
            paho:paho-mqtt pytest:pytest pytest_timeout:pytest-timeout pluggy:pluggy iniconfig:iniconfig \
            packaging:packaging pygments:pygments; do
    $PY -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    wheels=tools/wheels
    if [ -f tools/wheels/wheels.tar.xz ]; then
        # unpacked outside $OUT: the outputs come back to the caller, 70 MB of wheels should not
        wheels=$(mktemp -d)
        trap 'rm -rf "$wheels"' EXIT
        $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            tools/wheels/wheels.tar.xz "$wheels" || log "could not unpack tools/wheels/wheels.tar.xz"
    fi
    log "installing from $wheels: ${missing[*]}"
    $PY -m pip install --no-index --find-links "$wheels" --no-deps "${missing[@]}" > "$OUT/pip.log" 2>&1 \
        || log "some wheels are not in tools/wheels (see pip.log); the sections needing them report it"
fi

# this checkout's blinkflow already importable (a dry run on a CPU machine's venv): leave that install alone
installed=$($PY -c "import blinkflow, pathlib; print(pathlib.Path(blinkflow.__file__).resolve().parent.parent)" 2>/dev/null)
if [ "$installed" = "$(pwd -P)" ]; then
    log "blinkflow already installed from this checkout"
elif $PY -m pip install --no-index --no-deps --no-build-isolation -e . > "$OUT/pip-blinkflow.log" 2>&1; then
    log "blinkflow installed (editable)"
else
    # setuptools missing: the same namespace as pyproject's package-dir, as a tree of links
    shim="$OUT/shim/blinkflow"
    rm -rf "$OUT/shim" && mkdir -p "$shim"
    for entry in pipeline/*; do ln -s "$PWD/$entry" "$shim/"; done
    for sub in stages models configs; do ln -s "$PWD/$sub" "$shim/$sub"; done
    export PYTHONPATH="$OUT/shim${PYTHONPATH:+:$PYTHONPATH}"
    log "blinkflow importable through $OUT/shim (no setuptools for an editable install)"
fi
$PY -c "import blinkflow, sys; print(blinkflow.__file__)" >> "$OUT/steps.log" 2>&1 || log "blinkflow does not import"

if $PY -c "import pytest" 2>/dev/null; then
    # only the files holding needs_cuda tests: the others import test-only packages the GPU machine lacks
    timeout 300 $PY -m pytest -q -rs -m needs_cuda -p no:cacheprovider $(grep -l needs_cuda tests/test_*.py) \
        > "$OUT/pytest-needs-cuda.txt" 2>&1
    log "needs_cuda tests: exit $? ($(tail -1 "$OUT/pytest-needs-cuda.txt"))"
else
    log "pytest missing: needs_cuda tests not run"
fi

BLINKFLOW_BENCH_OUT="$OUT/results" timeout "$BENCH_TIMEOUT" $PY -m blinkflow.cli bench gpu \
    > "$OUT/bench-gpu.txt" 2>&1
log "bench gpu: exit $?"
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
log "done; outputs in $OUT"
