"""The shipped ``deeplabv3_mobilenet_v2`` weights against their original, the quantised TFLite
DeepLab v3 (PASCAL VOC) run by the TFLite interpreter, on real photos and a video frame; the
segment stage on the darknet dog photo; the converter's refusals and its reproducibility."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.models.weights import WeightsError
from tests.conftest import load_shipped

log = logging.getLogger(__name__)

TEST_DATA = Path(__file__).resolve().parent / "data"
ORIGINAL = TEST_DATA / "originals" / "deeplabv3_mnv2_pascal_quant.tflite"
MODEL = "deeplabv3_mobilenet_v2"
SIZE = 513  # the TFLite graph's fixed input size
#: dequantised float arithmetic and integer inference part ways at class borders only
MIN_AGREEMENT = 0.97


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped_model():
    return load_shipped("segment", "deeplabv3_mobilenet_v2")


def real_images() -> dict[str, np.ndarray]:
    """RGB uint8 images at 513x513: the darknet dog photo, the two COCO photos, a bikes.mp4 frame."""
    import av
    from PIL import Image

    paths = [TEST_DATA / "originals" / "dog.jpg", *sorted((TEST_DATA / "coco").glob("*.jpg"))]
    images = {path.name: Image.open(path).convert("RGB") for path in paths}
    with av.open(str(TEST_DATA / "video" / "bikes.mp4")) as container:
        frames = container.decode(video=0)
        for _ in range(100):  # a frame well into the pan, with cars and bicycles
            frame = next(frames)
        images["bikes.mp4#100"] = frame.to_image()
    return {name: np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR)) for name, image in images.items()}


def torch_class_map(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        return model(x)["out"][0].argmax(0).numpy()


def tflite_class_map(interpreter, image: np.ndarray) -> np.ndarray:
    """The original's class map: it takes the raw uint8 pixels and ends in an argmax."""
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


@pytest.mark.slow
def test_shipped_weights_match_the_quantised_original(shipped_model):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    interpreter = litert.Interpreter(model_path=str(ORIGINAL), num_threads=1)
    interpreter.allocate_tensors()
    agreement = {}
    for name, image in real_images().items():
        reference = tflite_class_map(interpreter, image)
        ours = torch_class_map(shipped_model, image)
        agreement[name] = float((ours == reference).mean())
        log.info("%s: %.4f of pixels agree, classes %s", name, agreement[name], np.unique(reference).tolist())
    assert min(agreement.values()) >= MIN_AGREEMENT, agreement


def test_segment_stage_finds_the_dog_and_the_bicycle():
    from PIL import Image

    from blinkflow.config import StageConfig
    from blinkflow.frame import Frame
    from blinkflow.stages.common import decode_class_map
    from blinkflow.stages.segment import Segment, SegmentOptions

    stage = Segment(StageConfig(model=MODEL, weights="shipped", options=SegmentOptions(input_size=[SIZE, SIZE])))
    stage.setup("cpu")
    image = np.array(Image.open(TEST_DATA / "originals" / "dog.jpg").convert("RGB"))  # 768x576
    frame = Frame(stream_id="dog", index=0, pts=0.0, image=image)
    result = stage.process([frame])[0].results["segment"]
    class_map = decode_class_map(result["mask"]["data"])
    classes = result["classes"]
    assert classes[0] == "__background__" and len(classes) == 21
    # the dog sits bottom left, the bicycle across the middle (x, y boxes around them, in source pixels)
    assert_mostly_inside(class_map == classes.index("dog"), x=(100, 340), y=(200, 576))
    assert_mostly_inside(class_map == classes.index("bicycle"), x=(100, 600), y=(100, 460))


def assert_mostly_inside(mask: np.ndarray, *, x: tuple[int, int], y: tuple[int, int]) -> None:
    """At least 3% of the image, and 90% of it inside the box."""
    total = int(mask.sum())
    assert total >= 0.03 * mask.size, total
    assert mask[y[0]:y[1], x[0]:x[1]].sum() >= 0.9 * total


def test_converter_refuses_a_tampered_copy(tmp_path):
    pytest.importorskip("ai_edge_litert")  # the converter reads the file with its TFLite schema
    from blinkflow.models.convert import deeplab_tflite, import_weights

    renamed = tmp_path / "renamed.tflite"  # a head layer renamed: same size, still a valid flatbuffer
    renamed.write_bytes(ORIGINAL.read_bytes().replace(b"aspp0/Conv2D_Fold", b"aspp9/Conv2D_Fold"))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(ORIGINAL.read_bytes()[:100_000])
    for path, reason in ((renamed, "unexpected layer 'aspp9'"), (truncated, "not a readable TFLite model")):
        with pytest.raises(WeightsError) as refused:
            deeplab_tflite.convert(path)
        assert_one_line_naming(refused.value, path, reason)
        with pytest.raises(WeightsError) as refused:  # the pipeline never gets that far: the sha256 differs
            import_weights(str(path), out_dir=tmp_path / "out")
        assert_one_line_naming(refused.value, path, "is not a known original")
    assert not (tmp_path / "out").exists()


def assert_one_line_naming(error: Exception, path: Path, reason: str) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message and reason in message, message


def test_conversion_is_reproducible_and_gives_the_shipped_tensors(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from blinkflow.models.convert import import_weights
    from blinkflow.models.weights import WEIGHTS_DIR

    digests = []
    for run in ("first", "second"):
        entry = import_weights(str(ORIGINAL), out_dir=tmp_path / run)
        digests.append(hashlib.sha256((tmp_path / run / entry["file"]).read_bytes()).hexdigest())
        assert entry["sha256"] == digests[-1] and entry["storage"]["stored"] == "fp16"
    assert digests[0] == digests[1]
    converted = torch.load(tmp_path / "first" / entry["file"], weights_only=True)
    shipped = torch.load(WEIGHTS_DIR / entry["file"], weights_only=True)
    assert converted.keys() == shipped.keys()
    assert all(torch.equal(converted[key], shipped[key]) for key in shipped)
