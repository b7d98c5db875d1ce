"""The real YOLOX-nano detector: the shipped weights against the original ONNX file,
the detect stage on a real photo, and the converter's refusals and reproducibility."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinkflow.models.classes import coco_categories
from blinkflow.models.convert import import_weights, serialize_state
from blinkflow.models.convert import yolox_onnx
from blinkflow.models.weights import WeightsError, resolve_weights, sha256_file
from blinkflow.config import StageConfig
from blinkflow.frame import Frame
from blinkflow.stages.detect import Detect, DetectOptions
from tests.conftest import load_shipped

DATA = Path(__file__).resolve().parent / "data"
ORIGINAL = DATA / "originals" / "yolox_nano.onnx"
DOG = DATA / "originals" / "dog.jpg"
PHOTOS = [DOG, *sorted((DATA / "coco").glob("*.jpg"))]
#: the objects in dog.jpg (768x576), source pixels, as onnxruntime's run of the original finds them
DOG_OBJECTS = {
    "dog": [133, 207, 326, 543],
    "bicycle": [54, 137, 572, 423],
    "car": [466, 78, 692, 171],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shipped_model():
    return load_shipped("detect", "yolox_nano")


def read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only


def as_model_input(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0


def iou(a: list[float], b: list[float]) -> float:
    from torchvision.ops import box_iou

    return float(box_iou(torch.tensor([a], dtype=torch.float32), torch.tensor([b], dtype=torch.float32))[0, 0])


def one_line_error(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


# ---------------------------------------------------------------------- the shipped weights are the original


@pytest.fixture
def square_model(shipped_model):
    """The shipped model letterboxing to its whole input_size, as the ONNX export does."""
    shipped_model.rect = False
    yield shipped_model
    shipped_model.rect = True


def test_shipped_weights_match_onnxruntime_on_real_photos(square_model):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ORIGINAL), options, providers=["CPUExecutionProvider"])
    shipped_model = square_model
    for photo in PHOTOS:
        with torch.inference_mode():
            batch, _ = shipped_model.letterbox([as_model_input(read_rgb(photo))])
            ours = shipped_model.raw(batch).numpy()
        theirs = session.run(None, {"images": batch.numpy()})[0]
        assert ours.shape == theirs.shape == (1, 3549, 85)
        difference = np.abs(ours - theirs)
        box, obj, cls = difference[..., :4].max(), difference[..., 4].max(), difference[..., 5:].max()
        assert max(box, obj, cls) <= 1e-3, f"{photo.name}: box {box:.2e}, objectness {obj:.2e}, classes {cls:.2e}"


def test_model_contract_boxes_in_each_images_own_pixels(shipped_model):
    dog = as_model_input(read_rgb(DOG))
    half = torch.nn.functional.interpolate(dog[None], scale_factor=0.5, mode="bilinear", align_corners=False)[0]
    with torch.inference_mode():
        full, small = shipped_model([dog, half])
    names = coco_categories()
    for output, scale in ((full, 1.0), (small, 0.5)):
        assert output["boxes"].dtype == torch.float32 and output["labels"].dtype == torch.int64
        best = output["scores"].argmax()
        assert names[int(output["labels"][best])] == "dog"
        assert iou(output["boxes"][best].tolist(), [v * scale for v in DOG_OBJECTS["dog"]]) >= 0.9


def _detections(model, image: torch.Tensor, rect: bool) -> tuple[dict, tuple[int, ...]]:
    model.rect = rect
    try:
        with torch.inference_mode():
            return model([image])[0], tuple(model.letterbox([image])[0].shape)
    finally:
        model.rect = True


def test_a_rect_letterbox_runs_on_the_frame_shape_and_finds_what_the_square_one_finds(shipped_model):
    """rect (the registry's default): the same scale as the square letterbox, padded only to the stride, so a
    16:9 frame costs about half; the real photos' boxes are the square's: every box scoring 0.3 is found again
    (IoU >= 0.5, the agreement judge's match, score within 0.05), those scoring 0.5 at IoU >= 0.9."""
    assert shipped_model.rect and shipped_model.input_size == (416, 416)
    assert shipped_model.input_for(216, 384) == (256, 416)  # 234 rows of frame, padded to 256
    assert shipped_model.input_for(416, 200) == (416, 224)
    assert shipped_model.input_for(100, 100) == (416, 416)  # a square image fills the square
    for photo in PHOTOS:
        image = as_model_input(read_rgb(photo))
        square, square_shape = _detections(shipped_model, image, rect=False)
        rect, rect_shape = _detections(shipped_model, image, rect=True)
        assert square_shape[-2:] == (416, 416) and rect_shape[-2:] == shipped_model.input_for(*image.shape[-2:])
        confident = square["scores"] >= 0.3
        assert int(confident.sum()) >= 1, photo.name
        for box, label, score in zip(square["boxes"][confident], square["labels"][confident], square["scores"][confident]):
            same = rect["labels"] == label
            overlaps = [iou(box.tolist(), other.tolist()) for other in rect["boxes"][same]]
            best = int(np.argmax(overlaps)) if overlaps else None
            assert best is not None and overlaps[best] >= (0.9 if score >= 0.5 else 0.5), (photo.name, label, overlaps)
            assert abs(float(rect["scores"][same][best]) - float(score)) <= 0.05, (photo.name, label)


# ---------------------------------------------------------------------- the detect stage on a real photo


def test_detect_stage_finds_the_dog_the_bicycle_and_the_car():
    cfg = StageConfig(model="yolox_nano", weights="shipped", options=DetectOptions(score_threshold=0.5))
    stage = Detect(cfg)
    stage.setup("cpu")
    frame = Frame("s", 0, 0.0, read_rgb(DOG))
    result = stage.process([frame])[0].results["detect"]
    assert stage.classes == coco_categories()
    found = dict(zip(result["classes"], result["boxes"]))
    assert {"dog", "bicycle"} <= set(found) and found.keys() & {"car", "truck"}, result
    vehicle = found.get("car") or found["truck"]
    assert iou(found["dog"], DOG_OBJECTS["dog"]) >= 0.8
    assert iou(found["bicycle"], DOG_OBJECTS["bicycle"]) >= 0.8
    assert iou(vehicle, DOG_OBJECTS["car"]) >= 0.8
    assert min(result["scores"]) >= 0.5


# ---------------------------------------------------------------------- the converter


def test_a_letterboxed_canvas_sees_a_real_object_at_its_full_frame_scale():
    """crop_reuse: letterbox on a partial frame whose change touches the car: the region grows around the car's
    previous box, one call on a canvas under a quarter of the square input finds it where the full frame does."""
    from blinkflow.frame import GateMark

    cfg = StageConfig(model="yolox_nano", weights="shipped",
                      options=DetectOptions(score_threshold=0.5, crop_reuse="letterbox"))
    stage = Detect(cfg)
    stage.setup("cpu")
    image = read_rgb(DOG)
    first = Frame("s", 0, 0.0, image)
    first.gate = GateMark(tiles={"grid": [8, 8], "changed": None, "base": 0})
    full = stage.process([first])[0].results["detect"]
    partial = Frame("s", 1, 0.0, image.copy())
    partial.gate = GateMark(tiles={"grid": [8, 8], "changed": [14], "base": 0})  # one tile on the car's back half
    result = stage.process([partial])[0].results["detect"]
    # area is the canvas's share of the full-frame input (rect: 320x416); the canvas under a quarter of 416x416
    assert 0 < result["crop"]["area"] * 320 * 416 < 0.25 * 416 * 416 and len(result["crop"]["regions"]) == 1
    x0, _, x1, _ = result["crop"]["regions"][0]
    assert x0 < DOG_OBJECTS["car"][0] and x1 == 768  # the whole car, not only the changed tile
    assert result["classes"] == full["classes"]
    for fresh, carried in zip(result["boxes"], full["boxes"]):
        assert iou(fresh, carried) >= 0.9


def test_import_refuses_a_tampered_copy(tmp_path):
    tampered = tmp_path / "yolox_nano.onnx"
    data = bytearray(ORIGINAL.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte amid the weights: same size and layout, another sha256
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as by_path:
        import_weights(str(tampered), out_dir=tmp_path / "out")
    assert "not a known original" in one_line_error(by_path, tampered)
    with pytest.raises(WeightsError) as by_name:
        import_weights("yolox_nano", search=[tmp_path], out_dir=tmp_path / "out")
    assert "not the pinned original" in one_line_error(by_name, tampered)
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_file_with_a_wrong_sha256(tmp_path):
    other = tmp_path / "yolox_nano.onnx"
    shutil.copyfile(DOG, other)
    with pytest.raises(WeightsError) as error:
        import_weights("yolox_nano", search=[tmp_path], out_dir=tmp_path / "out")
    assert sha256_file(other) in one_line_error(error, other)


@pytest.mark.parametrize("change", ["misshaped", "extra", "missing"])
def test_converter_refuses_a_different_graph(tmp_path, change):
    import onnx  # a test dependency, as the converter needs it
    from onnx import numpy_helper

    model = onnx.load(str(ORIGINAL))
    graph = model.graph
    if change == "misshaped":
        index = next(i for i, init in enumerate(graph.initializer) if init.name == "head.cls_preds.2.weight")
        misshaped = numpy_helper.from_array(np.zeros((79, 64, 1, 1), np.float32), "head.cls_preds.2.weight")
        graph.initializer[index].CopyFrom(misshaped)
    elif change == "extra":
        graph.initializer.append(numpy_helper.from_array(np.zeros((8, 8, 1, 1), np.float32), "head.extra.weight"))
    else:
        last_conv = max(i for i, node in enumerate(graph.node) if node.op_type == "Conv")
        del graph.node[last_conv]
    changed = tmp_path / f"{change}.onnx"
    onnx.save(model, str(changed))
    with pytest.raises(WeightsError) as error:
        yolox_onnx.convert(changed)
    one_line_error(error, changed)


def test_import_keeps_metrics_only_for_the_same_file_and_checks_the_manifest_before_writing(tmp_path):
    """Metrics measured on another file were copied onto the new one; and an invalid manifest failed the import
    after the .pt was already replaced (file and manifest then disagreed)."""
    import json

    out = tmp_path / "out"
    out.mkdir()
    stale = {"stage": "detect", "model": "yolox_nano", "file": "detect-yolox_nano.pt", "sha256": "0" * 64,
             "metrics": {"mAP": 0.99}}
    (out / "manifest.json").write_text(json.dumps({"weights": [stale]}))
    entry = import_weights(str(ORIGINAL), out_dir=out)
    assert not entry.get("metrics") and not json.loads((out / "manifest.json").read_text())["weights"][0].get("metrics")
    again = import_weights(str(ORIGINAL), out_dir=out)  # the same file: its metrics would stay
    assert again["sha256"] == entry["sha256"]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({"weights": [{"classes": "oops"}]}))
    (broken / "detect-yolox_nano.pt").write_bytes(b"the old file")
    with pytest.raises(WeightsError, match="classes must be a list"):
        import_weights(str(ORIGINAL), out_dir=broken)
    assert (broken / "detect-yolox_nano.pt").read_bytes() == b"the old file"


def test_import_converts_the_bytes_it_verified(tmp_path, monkeypatch):
    """The original was hashed on one read and converted from a second: a file replaced in between was
    converted unchecked (a swap right after the check goes unseen now: the checked bytes are converted)."""
    from blinkflow.models import convert as conversion

    copy = tmp_path / ORIGINAL.name
    shutil.copyfile(ORIGINAL, copy)
    check = conversion.verify_source

    def check_then_swap(*args):
        check(*args)
        copy.write_bytes(b"not the original any more")

    monkeypatch.setattr(conversion, "verify_source", check_then_swap)
    entry = import_weights(str(copy), out_dir=tmp_path / "out")
    assert entry["sha256"] == resolve_weights("shipped", stage="detect", model_name="yolox_nano").sha256


def test_conversion_is_reproducible_and_gives_the_shipped_file(tmp_path):
    first = import_weights(str(ORIGINAL), out_dir=tmp_path / "a")
    second = import_weights(str(ORIGINAL), out_dir=tmp_path / "b")
    assert (tmp_path / "a" / first["file"]).read_bytes() == (tmp_path / "b" / second["file"]).read_bytes()
    assert serialize_state(yolox_onnx.convert(ORIGINAL)) == (tmp_path / "a" / first["file"]).read_bytes()
    shipped = resolve_weights("shipped", stage="detect", model_name="yolox_nano")
    assert first["sha256"] == shipped.sha256 == sha256_file(shipped.path)
    assert first["storage"]["stored"] == "fp32"  # fp16 moves the raw outputs past the onnxruntime tolerance


def test_a_frames_boxes_do_not_depend_on_the_sizes_of_its_batch_mates():
    """YOLOX pads a batch to its largest input: a 432x768 frame ran at 192x320 alone and at 256x320 beside a
    256x340 one (a truck 0.6384 alone, 0.6494 beside it), so a box near the threshold came and went with batch,
    max_wait_ms or the runner."""
    import av

    def frame_of(path: Path, index: int) -> np.ndarray:
        with av.open(str(path)) as container:
            for i, decoded in enumerate(container.decode(video=0)):
                if i == index:
                    return decoded.to_ndarray(format="rgb24")
        raise AssertionError(path)

    parking = frame_of(DATA / "static" / "car-detection-19s.mp4", 100)
    arm = frame_of(DATA / "video" / "arm_wrestling.mp4", 4)
    stage = Detect(StageConfig(model="yolox_nano", weights="shipped",
                               options=DetectOptions(score_threshold=0.3, model_args={"input_size": [320, 320]})))
    stage.setup("cpu")

    def scores(*images: np.ndarray) -> list[list[float]]:
        frames = [Frame(f"s{i}", 0, 0.0, image.copy()) for i, image in enumerate(images)]
        stage.process(frames)
        return [f.results["detect"]["scores"] for f in frames]

    assert scores(parking, arm) == scores(parking) + scores(arm)


def test_a_nan_box_from_the_net_is_dropped_not_kept_by_nms(shipped_model):
    """NMS with a NaN box kept every box (23 instead of 5 on dog.jpg) and the records got NaN."""
    model = shipped_model
    image = as_model_input(read_rgb(DOG))
    raw = model.raw if hasattr(model, "raw") else None
    assert raw is not None
    with torch.inference_mode():
        clean = model([image])[0]
        original = model.raw

        def poisoned(*args, **kwargs):
            out = original(*args, **kwargs)
            best = (out[..., 4:5] * out[..., 5:]).max(dim=-1).values.argmax(dim=-1)
            out[torch.arange(out.shape[0]), best, 0] = float("nan")
            return out

        model.raw = poisoned
        try:
            dirty = model([image])[0]
        finally:
            model.raw = original
    assert torch.isfinite(dirty["boxes"]).all() and len(dirty["boxes"]) <= len(clean["boxes"])


@pytest.mark.parametrize("model_args, message", [
    ({"input_size": [32000, 32000]}, r"model_args: yolox_nano rejected \['input_size'\] .*multiples of 32 in 32\.\.8192"),
    ({"rect": "false"}, r"model_args: yolox_nano rejected \['rect'\] .*rect must be true or false; got 'false'"),
    ({"num_classes": 10}, r"^stages\.detect\.options\.model_args\.num_classes: set by the stage itself"),
])
def test_yolox_model_args_that_would_exhaust_memory_or_mean_otherwise_are_one_line_errors(model_args, message):
    """input_size 32000 was built, and the first batch asked for gigabytes (the out-of-memory killer, no message);
    rect "false" (a quoted YAML string) was bool("false"): True; num_classes named an internal call."""
    from blinkflow.errors import StageError

    stage = Detect(StageConfig(model="yolox_nano", weights=None, options=DetectOptions(model_args=model_args)))
    with pytest.raises(StageError, match=message):
        stage.setup("cpu")


def test_weights_of_another_model_say_the_setting_and_which_model_the_file_is_for():
    """A shipped file given to another model listed key names only, not stages.detect.weights nor the fix."""
    from blinkflow.models.weights import WEIGHTS_DIR

    stage = Detect(StageConfig(model="yolox_nano", weights=str(WEIGHTS_DIR / "detect-ssdlite320_mobilenet_v3_large.pt")))
    with pytest.raises(WeightsError, match=r"^stages\.detect\.weights: .*do not fit this model architecture.*"
                                           r"the manifest lists this file as detect model 'ssdlite320_mobilenet_v3_large': "
                                           r"set stages\.detect\.model: ssdlite320_mobilenet_v3_large to use it"):
        stage.setup("cpu")
