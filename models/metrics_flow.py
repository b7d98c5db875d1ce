"""Optical-flow files and metrics: Middlebury ``.flo`` read/write, end-point error, KITTI Fl-all.

Flow arrays here are (H, W, 2) float32, channel 0 = u (x, right), channel 1 =
v (y, down), in pixels — the layout of ``.flo`` files. The flow stage emits
(2, H, W); pass ``layout="chw"`` to the metrics for that.

The ``.flo`` format (little endian): the float32 magic 202021.25 (the bytes
"PIEH"), int32 width, int32 height, then height * width * 2 float32 values,
row by row, u and v interleaved. numpy only, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blinkflow.errors import BlinkflowError

FLO_MAGIC = 202021.25
#: guards against reading a huge allocation from a corrupt header
MAX_FLO_SIDE = 1 << 15
#: KITTI's outlier definition: end-point error above 3 px *and* above 5% of the true flow's length
KITTI_ABS_THRESHOLD = 3.0
KITTI_REL_THRESHOLD = 0.05


class FlowFileError(BlinkflowError):
    """A ``.flo`` file that is missing, malformed or truncated; the message names the file."""


def read_flo(path: str | Path) -> np.ndarray:
    """Read a Middlebury ``.flo`` file into an (H, W, 2) float32 array."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FlowFileError(f"{path}: cannot read flow file ({exc.strerror or exc})") from None
    if len(data) < 12:
        raise FlowFileError(f"{path}: truncated .flo file: {len(data)} bytes, the header alone is 12")
    magic = float(np.frombuffer(data, "<f4", count=1)[0])
    if magic != FLO_MAGIC:
        raise FlowFileError(f"{path}: not a .flo file: magic number {magic!r}, expected {FLO_MAGIC} ('PIEH')")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    if not (0 < width <= MAX_FLO_SIDE and 0 < height <= MAX_FLO_SIDE):
        raise FlowFileError(f"{path}: corrupt .flo header: width {width}, height {height}")
    expected = 12 + width * height * 2 * 4
    if len(data) < expected:
        raise FlowFileError(
            f"{path}: truncated .flo file: {len(data)} bytes, a {width}x{height} flow needs {expected}"
        )
    values = np.frombuffer(data, "<f4", count=width * height * 2, offset=12)
    return values.reshape(height, width, 2).astype(np.float32)


def write_flo(path: str | Path, flow: np.ndarray) -> Path:
    """Write an (H, W, 2) flow as a Middlebury ``.flo`` file; returns the path."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"write_flo expects an (H, W, 2) array, got shape {flow.shape}")
    height, width = flow.shape[:2]
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(np.array([FLO_MAGIC], "<f4").tobytes())
        handle.write(np.array([width, height], "<i4").tobytes())
        handle.write(np.ascontiguousarray(flow, dtype="<f4").tobytes())
    return path


def endpoint_errors(pred: np.ndarray, gt: np.ndarray, layout: str = "hwc") -> np.ndarray:
    """Per-pixel Euclidean distance between predicted and true flow vectors, (H, W)."""
    pred, gt = _as_hwc(pred, layout), _as_hwc(gt, layout)
    if pred.shape != gt.shape:
        raise ValueError(f"flow shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    return np.sqrt(np.sum((pred - gt) ** 2, axis=-1))


def epe(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None, layout: str = "hwc") -> float:
    """Mean end-point error in pixels, over ``valid`` pixels (a boolean (H, W) mask) when given."""
    errors = endpoint_errors(pred, gt, layout)
    return float(_masked_mean(errors, valid))


def fl_all(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None, layout: str = "hwc") -> float:
    """KITTI Fl-all: the fraction of (valid) pixels whose EPE is > 3 px and > 5% of the true flow's length."""
    errors = endpoint_errors(pred, gt, layout)
    magnitude = np.sqrt(np.sum(_as_hwc(gt, layout) ** 2, axis=-1))
    outliers = (errors > KITTI_ABS_THRESHOLD) & (errors > KITTI_REL_THRESHOLD * magnitude)
    return float(_masked_mean(outliers.astype(np.float64), valid))


def _as_hwc(flow: np.ndarray, layout: str) -> np.ndarray:
    flow = np.asarray(flow, dtype=np.float64)
    if layout == "chw":
        flow = np.moveaxis(flow, 0, -1)
    elif layout != "hwc":
        raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"expected flow of shape (H, W, 2) for layout {layout!r}, got {flow.shape}")
    return flow


def _masked_mean(values: np.ndarray, valid: np.ndarray | None) -> np.floating:
    if valid is None:
        return values.mean()
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != values.shape:
        raise ValueError(f"valid mask shape {valid.shape} does not match the flow's {values.shape}")
    if not valid.any():
        raise ValueError("the valid mask selects no pixels")
    return values[valid].mean()
