#!/usr/bin/env bash
# Run on a machine that reaches the package index, before the GPU run (issue #25): downloads into
# tools/wheels/ the wheels the GPU machine lacks (it has Python 3.12 with torch and torchvision, no index).
# About 37 MB: carry the folder with the command (the device tool's `carry: ["tools/wheels"]`).
# scipy (35 MB, only the track stage needs it) is left out to stay under the 64 MiB a call may carry;
# `WITH_SCIPY=1` adds it when the GPU machine lacks it and nothing else is carried.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p tools/wheels
packages=(av==18.1.0 pyyaml prometheus-client tqdm pycocotools paho-mqtt pytest pytest-timeout pluggy iniconfig)
[ "${WITH_SCIPY:-0}" = 1 ] && packages+=(scipy)
python3 -m pip download --quiet --only-binary=:all: --no-deps --python-version "$PY_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d tools/wheels "${packages[@]}"
du -sh tools/wheels
