#!/usr/bin/env bash
# The GPU run of issue #25, on a machine with an NVIDIA GPU and no package index:
#   install: installs what it lacks from tools/wheels/wheels.tar.xz (tools/fetch-gpu-wheels.sh packs it
#            elsewhere) and makes `blinkflow` importable (an editable install, or a link tree when
#            setuptools is missing);
#   tests:   the needs_cuda tests;
#   bench:   `blinkflow bench gpu`, which writes docs/benchmarks.md's gpu section, within the time left;
# and leaves every output under $OUT (default ./gpu-out), 7 files (the device tool brings back 8 at most):
# machine.txt (nvidia-smi, Python and packages), steps.log, install.log, pytest-needs-cuda.txt,
# bench-gpu.txt, results/bench-gpu.json and the updated benchmarks.md. A step that fails is logged; the
# others still run.
# STEPS picks steps (default "install tests bench"): the wheels and the repository do not fit one call of
# the device tool together, so call 1 runs STEPS=install and call 2 the rest (tools/gpu-travel.sh).
# Everything ends within DEADLINE_S seconds of the start (default 560: a call may run 600).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-install tests bench}
DEADLINE_S=${DEADLINE_S:-560}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-180}
started=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - started) )); }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# the carried wheels install into .gpu-site (ignored by git, so the device tool keeps it between calls, and
# nothing asks the image's Python environment to be writable)
SITE="$PWD/.gpu-site"
site_on_path() {  # once, and only when a call (this one or an earlier) installed something there
    if [ -d "$SITE" ]; then
        case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    fi
}
site_on_path
log() { echo "gpu-check: $*" | tee -a "$OUT/steps.log"; }

nvidia-smi > "$OUT/machine.txt" 2>&1 || log "nvidia-smi failed (no driver?)"
$PY - >> "$OUT/machine.txt" 2>&1 <<'PYEOF'
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
log "python: $($PY -c 'import sys; print(sys.version)' 2>&1 | head -1)"

missing=()
for pair in av:av yaml:pyyaml prometheus_client:prometheus-client tqdm:tqdm scipy:scipy pycocotools:pycocotools \
            paho:paho-mqtt pytest:pytest pytest_timeout:pytest-timeout pluggy:pluggy iniconfig:iniconfig \
            packaging:packaging pygments:pygments; do
    $PY -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ "${#missing[@]}" -gt 0 ] && ! wants install; then
    log "missing: ${missing[*]} (STEPS has no install)"
elif [ "${#missing[@]}" -gt 0 ]; then
    wheels=tools/wheels
    if [ -f tools/wheels/wheels.tar.xz ]; then
        # unpacked outside $OUT: the outputs come back to the caller, the wheels should not
        wheels=$(mktemp -d)
        trap 'rm -rf "$wheels"' EXIT
        $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
            tools/wheels/wheels.tar.xz "$wheels" || log "could not unpack tools/wheels/wheels.tar.xz"
    fi
    # one at a time: pip installs none of a list when one of it has no wheel here
    got=() absent=()
    for package in "${missing[@]}"; do
        if $PY -m pip install --no-index --find-links "$wheels" --no-deps --target "$SITE" "$package" \
                >> "$OUT/install.log" 2>&1; then
            got+=("$package")
        else
            absent+=("$package")
        fi
    done
    log "installed from $wheels: ${got[*]:-nothing}; not there: ${absent[*]:-nothing} (tests needing those skip)"
    site_on_path
fi

# this checkout's blinkflow already importable (a dry run on a CPU machine's venv): leave that install alone
installed=$($PY -c "import blinkflow, pathlib; print(pathlib.Path(blinkflow.__file__).resolve().parent.parent)" 2>/dev/null)
if [ "$installed" = "$(pwd -P)" ]; then
    log "blinkflow already installed from this checkout"
elif $PY -m pip install --no-index --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1; then
    log "blinkflow installed (editable)"
else
    # setuptools missing: the same namespace as pyproject's package-dir, as a tree of links (ignored by git,
    # outside $OUT: links do not come back)
    shim="$PWD/.gpu-shim/blinkflow"
    rm -rf .gpu-shim && mkdir -p "$shim"
    for entry in pipeline/*; do ln -s "$PWD/$entry" "$shim/"; done
    for sub in stages models configs; do ln -s "$PWD/$sub" "$shim/$sub"; done
    export PYTHONPATH="$PWD/.gpu-shim${PYTHONPATH:+:$PYTHONPATH}"
    log "blinkflow importable through .gpu-shim (no setuptools for an editable install)"
fi
$PY -c "import blinkflow, sys; print(blinkflow.__file__)" >> "$OUT/steps.log" 2>&1 || log "blinkflow does not import"

if ! wants tests; then
    :
elif $PY -c "import pytest" 2>/dev/null; then
    # only the files holding needs_cuda tests: the others import test-only packages the GPU machine lacks;
    # at most TESTS_TIMEOUT, and never into the bench's last 4 minutes
    tests_s=$(( $(left) - 240 < TESTS_TIMEOUT ? $(left) - 240 : TESTS_TIMEOUT ))
    timeout $(( tests_s > 30 ? tests_s : 30 )) $PY -m pytest -q -rs -m needs_cuda -p no:cacheprovider $(grep -l needs_cuda tests/test_*.py) \
        > "$OUT/pytest-needs-cuda.txt" 2>&1
    log "needs_cuda tests: exit $? ($(tail -1 "$OUT/pytest-needs-cuda.txt"))"
else
    log "pytest missing: needs_cuda tests not run"
fi

if wants bench; then
    # the bench keeps to its budget and writes each section as it ends; the timeout only catches a hang
    budget=$(( $(left) - 30 ))
    BLINKFLOW_BENCH_OUT="$OUT/results" timeout "${BENCH_TIMEOUT:-$(( budget + 20 ))}" \
        $PY -m blinkflow.cli bench gpu --budget-s "$(( budget > 0 ? budget : 0 ))" > "$OUT/bench-gpu.txt" 2>&1
    log "bench gpu: exit $? (budget ${budget} s)"
    cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
fi
log "done; outputs in $OUT"
