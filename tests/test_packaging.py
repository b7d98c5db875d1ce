"""`pip install .` gives one namespace, `blinkflow`, with its data: configs, the demo clip, the record
schema, the weights and their notice. The wheel is built and installed into a folder of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked sources: setuptools builds in its source folder and never cleans its
    build/lib, so a wheel built in the clone could hold modules deleted since (and left build/ behind)."""
    import shutil

    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60)
    for name in tracked.stdout.decode().split("\0"):
        if name and not name.startswith(("tests/", "docs/")) and (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("blinkflow-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_one_namespace_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"blinkflow"}, tops  # no generic top-level pipeline/, stages/ or models/
    for required in ["blinkflow/cli.py", "blinkflow/api.py", "blinkflow/stages/detect.py", "blinkflow/models/yolox.py",
                     "blinkflow/configs/demo.yaml", "blinkflow/configs/synthetic.yaml", "blinkflow/configs/media/bikes.mp4",
                     "blinkflow/configs/train/finetune-detect.yaml", "blinkflow/frame-record.schema.json",
                     "blinkflow/models/weights/manifest.json", "blinkflow/models/weights/NOTICE",
                     "blinkflow/models/weights/detect-yolox_nano.pt", "blinkflow/models/weights/action-i3d.pt",
                     "blinkflow/models/labels/kinetics400.txt", "blinkflow/bench/skip.py",
                     "blinkflow/gate/policy.py", "blinkflow/gate/carry.py"]:
        assert required in names, required
    assert not any(n.startswith("blinkflow/tests") or "/__pycache__/" in n for n in names)
    from blinkflow.version import __version__

    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert f"\nVersion: {__version__}\n" in zipfile.ZipFile(wheel).read(metadata).decode()  # one version, written once
    assert {n.split("/")[-1] for n in names if "/licenses/" in n} >= {"LICENSE", "NOTICE"}


@pytest.mark.slow
def test_the_sdist_carries_the_licence_and_no_half_test_tree(tmp_path):
    """The sdist held tests/test_*.py without their conftest, helpers or data (collecting them failed), and no
    licence text anywhere."""
    import shutil
    import tarfile

    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60)
    for name in tracked.stdout.decode().split("\0"):
        if name and not name.startswith(("docs/", "tests/data/")) and (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    build = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=source, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    names = tarfile.open(tmp_path / build.stdout.strip().splitlines()[-1]).getnames()
    assert not [n for n in names if "/tests/" in n], [n for n in names if "/tests/" in n][:3]
    assert any(n.endswith("/LICENSE") for n in names) and any(n.endswith("/pipeline/cli.py") for n in names)


@pytest.mark.slow
def test_the_installed_wheel_runs_from_any_folder(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import blinkflow, blinkflow.cli as cli, sys; assert blinkflow.__file__.startswith(sys.argv[1]), "
            "blinkflow.__file__; sys.exit(cli.main(['demo', '--out', 'out', '--no-progress', "
            "'--set', 'sources.0.max_frames=2', '--set', 'stages.flow.enabled=false']))")
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "demo.jsonl").read_text().count("\n") == 2
    assert "frames: 2 decoded" in run.stdout
    validate = ("import blinkflow.cli as cli, sys; sys.exit(cli.main(['validate', 'configs/demo.yaml']) "
                "or cli.main(['validate', 'configs/train/reid.yaml']) == 0)")  # the second is a training config: 2
    run = subprocess.run([sys.executable, "-c", validate], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert run.returncode == 0 and "configs/demo.yaml (the shipped " in run.stdout, run.stderr[-2000:]
