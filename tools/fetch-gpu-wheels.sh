#!/usr/bin/env bash
# Run on a machine that reaches the package index, before the GPU run (issue #25): packs into
# tools/wheels/wheels.tar.xz the wheels the GPU machine lacks. Its image has Python 3.12 with torch,
# torchvision, numpy, scipy, pyyaml, prometheus-client, tqdm and pytest (the device tool's KINDS.md), no
# index, and no PyAV. PyAV's wheel is 34 MB of shared libraries, already deflated; stored uncompressed in
# its zip and xz'd it takes about 24 MiB, which leaves room in a call's 64 MiB for the repository's files
# without the I3D weights (tools/gpu-travel.sh wheels). tools/gpu-check.sh unpacks them outside its outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
LIMIT_MB=30  # with call 1's tree (tools/gpu-travel.sh wheels) under the device tool's 64 MiB
packages=(av==18.1.0 pycocotools)
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
python3 -m pip download --quiet --only-binary=:all: --no-deps --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$staging/download" "${packages[@]}"
# a wheel is a zip: the same members stored instead of deflated are still that wheel (RECORD hashes the
# files, not their compression), and xz then sees the libraries' bytes
python3 - "$staging/download" "$staging/stored" <<'PYEOF'
import pathlib, sys, zipfile
source, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
target.mkdir()
for wheel in sorted(source.glob("*.whl")):
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(target / wheel.name, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info, old.read(info), compress_type=zipfile.ZIP_STORED)
PYEOF
rm -rf tools/wheels && mkdir -p tools/wheels
tar -C "$staging/stored" -cf - . | xz -9 -T0 > tools/wheels/wheels.tar.xz
size_mb=$(( $(stat -c %s tools/wheels/wheels.tar.xz) / 1048576 ))
echo "tools/wheels/wheels.tar.xz: ${size_mb} MiB ($(ls "$staging/stored" | wc -l) wheels)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "fetch-gpu-wheels: over ${LIMIT_MB} MiB, too big to carry beside the repository; drop a package" >&2
    exit 1
fi
