"""Shared fixtures: the real media in tests/data (see its SOURCES.md), tiny generated clips,
RNG isolation, and the needs_cuda marker."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = REPO_ROOT / "tests" / "data"


def _hypothesis_out_of_the_tree() -> None:
    """Hypothesis keeps its folder in the current directory (the clone) from collection on: a temporary one
    instead, removed at exit (the fuzz tests are derandomized, so nothing there is worth keeping)."""
    import atexit
    import shutil
    import tempfile

    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # pragma: no cover - the test extras bring it
        return
    folder = tempfile.mkdtemp(prefix="blinkflow-hypothesis-")
    set_hypothesis_home_dir(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


_hypothesis_out_of_the_tree()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available here")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate_rng():
    """Every test starts from the same seeds and leaves no RNG state behind."""
    state = (random.getstate(), np.random.get_state())
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch_state = torch.random.get_rng_state()
        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        torch_state = None
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    if torch_state is not None:
        torch.random.set_rng_state(torch_state)


@pytest.fixture(scope="session")
def real_media() -> Path:
    """The real third-party media the tests use, kept in the repository."""
    return TEST_DATA


def write_test_video(path: Path, frames: int = 12, width: int = 64, height: int = 48, fps: int = 10, codec: str = "libx264") -> Path:
    """Encode a tiny clip whose frame i has a bright square at x = 4*i (easy to check)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 40, dtype=np.uint8)
            x = (4 * i) % (width - 8)
            image[8:16, x : x + 8] = 230
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture
def tiny_video(tmp_path) -> Path:
    return write_test_video(tmp_path / "tiny.mp4")


@pytest.fixture
def one_torch_thread():
    """Timing-insensitive model tests on a small shared machine: one torch thread, restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_shipped(stage: str, name: str):
    """A backend with its shipped weights (sha256-checked), in eval mode."""
    from blinkflow.models.weights import load_shipped as load

    return load(stage, name)[0]
