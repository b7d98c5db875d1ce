"""The shipped ``i3d`` weights (DeepMind's I3D RGB, Kinetics-400) on DeepMind's own sample clip;
small clips; and the restricted unpickler that reads the original, which is a plain Python pickle.

The original (``i3d-kinetics-400.ckpt``, 50 MB) is not in the repository: the converter is tested on
crafted pickles of the same structure, written to ``tmp_path``, and the shipped file is checked
against its pinned sha256 when it loads.
"""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.models.weights import WeightsError
from tests.conftest import load_shipped

log = logging.getLogger(__name__)

TEST_DATA = Path(__file__).resolve().parent / "data"
CRICKET_GIF = TEST_DATA / "originals" / "cricket_rgb.gif"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped_model():
    return load_shipped("action", "i3d")


def gif_clip(path: Path) -> torch.Tensor:
    """All frames of a GIF as a (1, 3, T, H, W) clip in [0, 1]."""
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255


def assert_one_line_naming(error: Exception, path: Path, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert all(part in message for part in parts), message


# --------------------------------------------------------------------------- the shipped weights


@pytest.mark.slow
def test_shipped_weights_recognise_deepminds_cricket_clip(shipped_model):
    from blinkflow.models.classes import kinetics400_classes

    clip = gif_clip(CRICKET_GIF)
    assert clip.shape == (1, 3, 79, 224, 224)  # as DeepMind ran it: 79 frames, 224x224
    start = time.perf_counter()
    with torch.inference_mode():
        probs = shipped_model(clip).softmax(-1)[0]
    top = int(probs.argmax())
    log.info("cricket_rgb.gif: %s %.5f in %.1f s", kinetics400_classes()[top], probs[top], time.perf_counter() - start)
    # DeepMind's 0.999997 is for its .npy of this clip; the GIF is palette-quantised (0.9886 here)
    assert kinetics400_classes()[top] == "playing cricket" and probs[top] > 0.98


def test_short_small_clip_gives_400_logits(shipped_model):
    assert shipped_model.num_classes == 400
    clip = torch.rand(1, 3, 16, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = shipped_model(clip)
    assert logits.shape == (1, 400) and torch.isfinite(logits).all()


def test_head_equals_the_original_fixed_window_at_224():
    """At 7x7 feature maps the clipped head is kinetics-i3d's (2, 7, 7) VALID pool + 1x1x1 conv + time mean."""
    import torch.nn.functional as F

    from blinkflow.models.registry import build_model

    model = build_model("i3d", task="action").eval()
    features = torch.randn(2, 1024, 4, 7, 7)
    model.features = lambda clip: features  # the head alone, on given Mixed_5c activations
    with torch.inference_mode():
        ours = model(torch.zeros(2, 3, 1, 1, 1))
        original = model.logits(F.avg_pool3d(features, (2, 7, 7), stride=1)).squeeze(-1).squeeze(-1).mean(2)
    torch.testing.assert_close(ours, original)


def test_same_padding_max_pool_never_takes_the_padding():
    from blinkflow.models.inception_i3d import SamePadMaxPool3d, same_padding

    assert same_padding((79, 224, 224), (7, 7, 7), (2, 2, 2)) == (2, 3, 2, 3, 3, 3)  # TF: the extra pixel after
    pool = SamePadMaxPool3d((3, 3, 3), stride=(1, 1, 1))
    negative = -torch.rand(1, 2, 3, 4, 5) - 1  # all < 0: a zero pad would win at every border
    assert pool(negative).max() < 0 and pool(negative).shape == negative.shape


# --------------------------------------------------------------------------- the restricted unpickler


class _Exploit:
    """Unpickling this calls ``call(argument)``: what an unrestricted ``pickle.load`` would run."""

    def __init__(self, call, argument: str) -> None:
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["os.system", "builtins.eval"])
def test_unpickler_refuses_code_and_never_runs_it(tmp_path, protocol, attack):
    from blinkflow.models.convert.i3d_pickle import safe_load_numpy_pickle

    witness = tmp_path / "executed"
    if attack == "os.system":
        payload = _Exploit(os.system, f"touch {witness}")
    else:
        payload = _Exploit(builtins.eval, f"open({str(witness)!r}, 'w').close()")
    path = tmp_path / f"evil-{protocol}.ckpt"
    # the payload first: at protocol 2 the array itself needs _codecs.encode, which is refused too
    path.write_bytes(pickle.dumps({"x": payload, "params": {"w": np.zeros(2, np.float32)}}, protocol=protocol))
    with pytest.raises(WeightsError) as refused:
        safe_load_numpy_pickle(path)
    # os.system pickles as posix.system, eval as builtins.eval (__builtin__.eval at protocol 2)
    assert_one_line_naming(refused.value, path, "refusing to unpickle", attack.split(".")[1], "only numpy arrays")
    assert not witness.exists()


def test_unpickler_reads_numpy_arrays_pickled_like_the_original(tmp_path):
    from blinkflow.models.convert.i3d_pickle import flatten, safe_load_numpy_pickle

    kernel = np.random.rand(7, 7, 7, 3, 64).astype(np.float32)
    mean = np.arange(64, dtype=np.float32).reshape(1, 1, 1, 1, 64)
    tree = {
        "params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": kernel}}},
        "batch_stats": {"Conv3d_1a_7x7": {"BatchNorm_0": {"mean": mean}}},
    }
    path = tmp_path / "benign.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=4))  # the original's protocol
    loaded = flatten(safe_load_numpy_pickle(path))
    expected = flatten(tree)
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[key], expected[key]) and loaded[key].dtype == np.float32 for key in expected)


def test_unpickler_refuses_non_arrays_and_broken_files(tmp_path):

    cases = {
        "list.ckpt": (pickle.dumps([np.zeros(2)], protocol=4), "expected a dict of numpy arrays"),
        "text.ckpt": (pickle.dumps({"params": {"w": "weights"}}, protocol=4), "params/w is a str"),
        "truncated.ckpt": (pickle.dumps({"w": np.zeros(99, np.float32)}, protocol=4)[:60], "cannot read it"),
        # numpy pickles protocol-2 bytes through _codecs.encode, which the original never needs
        "protocol2.ckpt": (pickle.dumps({"w": np.zeros(2, np.float32)}, protocol=2), "_codecs.encode"),
    }
    _assert_each_refused(cases, tmp_path)


def _assert_each_refused(cases: dict[str, tuple[bytes, str]], folder: Path) -> None:
    """Each file's bytes refused by the unpickler in one line naming the file and the reason."""
    from blinkflow.models.convert.i3d_pickle import safe_load_numpy_pickle

    for name, (data, reason) in cases.items():
        path = folder / name
        path.write_bytes(data)
        with pytest.raises(WeightsError) as refused:
            safe_load_numpy_pickle(path)
        assert_one_line_naming(refused.value, path, reason)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_unpickler_allocates_nothing_a_crafted_shape_asks_for(tmp_path):
    """110 bytes asking _reconstruct for an object array of 300 M entries took 2.3 GB before any check; numpy's
    own pickles only ever ask for an empty array, then fill it from bytes that must match its shape. Dicts
    nested 200 000 deep were a RecursionError traceback."""

    huge = (b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01" + _global("numpy.core.multiarray", "_reconstruct")
            + _global("numpy", "ndarray") + b"J" + (300_000_000).to_bytes(4, "little") + b"\x85"
            + _global("numpy", "dtype") + b"X\x02\x00\x00\x00f8" + b"K\x00K\x01\x87R" + b"\x87R" + b"s.")
    cases = {"huge.ckpt": (huge, "_reconstruct(ndarray, (300000000,)) asked for"),
             "objects.ckpt": (huge.replace(b"J" + (300_000_000).to_bytes(4, "little"), b"K\x00")
                              .replace(b"f8", b"O8"), "dtype 'O8' asked for"),
             "deep.ckpt": (b"\x80\x02" + b"}X\x01\x00\x00\x00a" * 200_000 + b"}" + b"s" * 200_000 + b".",
                           "nest too deep"),
             # ndarray itself called (a REDUCE on the class, not through _reconstruct): 48 bytes took 0.8 GB
             "constructor.ckpt": (b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01" + _global("numpy", "ndarray")
                                  + b"J" + (100_000_000).to_bytes(4, "little") + b"\x85X\x01\x00\x00\x00O\x86R" + b"s.",
                                  "numpy.ndarray called")}
    _assert_each_refused(cases, tmp_path)


# --------------------------------------------------------------------------- the converter


def test_import_refuses_a_file_that_is_not_the_pinned_original(tmp_path):
    from blinkflow.models.convert import import_weights

    impostor = tmp_path / "i3d-kinetics-400.ckpt"
    impostor.write_bytes(pickle.dumps({"params": {}}, protocol=4))
    with pytest.raises(WeightsError) as refused:
        import_weights(str(impostor), out_dir=tmp_path / "out")
    assert_one_line_naming(refused.value, impostor, "is not a known original")
    assert not (tmp_path / "out").exists()


def fake_original(edit=None) -> dict:
    """Zeros with every name, nesting and shape of the original, optionally edited."""
    from blinkflow.models.convert.i3d_pickle import name_map
    from blinkflow.models.inception_i3d import InceptionI3d

    shapes = {key: tuple(value.shape) for key, value in InceptionI3d(400).state_dict().items()}
    tree: dict = {}
    for key, (name, layout) in name_map().items():
        shape = shapes[key]
        if layout == "kernel":
            shape = (*shape[2:], shape[1], shape[0])  # torch OITHW -> THWIO
        elif name.startswith("batch_stats/"):
            shape = (1, 1, 1, 1, *shape)
        *parents, leaf = original_keys(name)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.zeros(shape, np.float32)
    if edit is not None:
        edit(tree)
    return tree


def original_keys(name: str) -> list[str]:
    """The original's dict keys of a flat name: Flax kept 'Branch_0/Conv3d_0a_1x1' and 'Logits/..' as one key."""
    keys: list[str] = []
    for part in name.split("/"):
        if keys and "/" not in keys[-1] and (keys[-1].startswith("Branch_") or keys[-1] == "Logits"):
            keys[-1] += "/" + part
        else:
            keys.append(part)
    return keys


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda t: t["params"]["Mixed_4b"].pop("Branch_3/Conv3d_0b_1x1"), "missing ['params/Mixed_4b/Branch_3/"),
        (lambda t: t["params"]["Mixed_4b"]["Branch_0/Conv3d_0a_1x1"]["BatchNorm_0"].update(scale=np.ones(192)),
         "unexpected ['params/Mixed_4b/Branch_0/Conv3d_0a_1x1/BatchNorm_0/scale']"),
        (lambda t: t["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"].update(kernel=np.zeros((1, 1, 1, 1024, 600))),
         "params/Logits/Conv3d_0c_1x1/Conv_0/kernel has shape (1, 1, 1, 1024, 600)"),
    ],
)
def test_converter_refuses_missing_extra_and_misshaped_tensors(tmp_path, edit, reason):
    from blinkflow.models.convert.i3d_pickle import convert

    path = tmp_path / "edited.ckpt"
    path.write_bytes(pickle.dumps(fake_original(edit), protocol=4))
    with pytest.raises(WeightsError) as refused:
        convert(path)
    assert_one_line_naming(refused.value, path, reason)


def test_converter_maps_every_tensor_of_the_original_layout(tmp_path):
    from blinkflow.models.convert.i3d_pickle import convert
    from blinkflow.models.inception_i3d import InceptionI3d

    path = tmp_path / "fake.ckpt"
    path.write_bytes(pickle.dumps(fake_original(), protocol=4))
    InceptionI3d(400).load_state_dict(convert(path), strict=True)


def test_unpickler_refuses_a_float_dtype_forged_to_hold_objects(tmp_path):
    """The dtype's pickled flags said 'Python objects inside' on a float64 array: accepted, and freeing it raised
    numpy's internal error (a memory-safety hazard older numpy did not guard)."""
    from blinkflow.models.convert.i3d_pickle import safe_load_numpy_pickle

    data = pickle.dumps({"params": {"w": np.frombuffer(b"\x41" * 16, dtype="<f8").copy()}}, protocol=4)
    honest = b"J\xff\xff\xff\xffK\x00t\x94b"  # the dtype state's flags: 0
    assert data.count(honest) == 1
    path = tmp_path / "forged.ckpt"
    path.write_bytes(data.replace(honest, b"J\xff\xff\xff\xffK\x01t\x94b"))
    with pytest.raises(WeightsError, match="has a forged dtype"):
        safe_load_numpy_pickle(path)
    path.write_bytes(data)
    assert safe_load_numpy_pickle(path)["params"]["w"].dtype == np.float64
