"""The change signal: where a frame differs from the reference the caches represent, robust to codec
noise and to global lighting.

The signal is the frame's grayscale, block-averaged (:func:`gray_signal`); the absolute difference
to the reference is box-blurred (:func:`blurred_difference`) and thresholded (:func:`changed_mask`),
optionally after fitting the reference to the frame's lighting (:func:`relit`). numpy only at import
time (scipy where a component is measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from blinkflow.config import GateConfig


#: ITU-R BT.601 luma weights (made once: the gate makes a signal on every frame)
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def gray_signal(image: np.ndarray, downscale: int) -> np.ndarray:
    """Grayscale, block-averaged by ``downscale`` (float32).

    Both steps are linear, so the blocks are summed first (in integers) and the
    grey weights applied to the few block sums: the same signal for a fraction
    of the arithmetic (the gate runs on every frame). The sums are separable:
    strided adds of rows, then of columns of the row sums, in the narrowest
    integer type that holds them (3-4x faster than adding every offset of a block).
    """
    weights = _GRAY_WEIGHTS
    d = min(downscale, image.shape[0], image.shape[1])  # a frame smaller than a block is one block
    if d <= 1:
        return image.astype(np.float32) @ weights
    height, width = image.shape[:2]
    partial = height % d or width % d
    if partial:  # the strip past the whole blocks is blocks of its own pixels (cut off, its change went unseen)
        image = np.pad(image, ((0, -height % d), (0, -width % d), (0, 0)))
    h, w = image.shape[:2]
    dtype = np.uint16 if d * d * 255 <= 0xFFFF else np.uint32
    rows = image[0:h:d, :w].astype(dtype)
    for dy in range(1, d):
        rows += image[dy:h:d, :w]
    # the columns channel-major: each add then runs along a row (along a pixel's 3 channels it is 2x slower)
    planes = rows.transpose(2, 0, 1)
    sums = np.empty((planes.shape[0], h // d, w // d), dtype)
    np.add(planes[:, :, 0:w:d], planes[:, :, 1:w:d], out=sums)
    for dx in range(2, d):
        np.add(sums, planes[:, :, dx:w:d], out=sums)
    gray = sums.transpose(1, 2, 0).astype(np.float32) @ weights
    if partial:  # each block's mean over the pixels it has
        rows_in = np.minimum(d, height - np.arange(0, h, d)).astype(np.float32)
        cols_in = np.minimum(d, width - np.arange(0, w, d)).astype(np.float32)
        return gray / (rows_in[:, None] * cols_in[None, :])
    return gray / float(d * d)


def box_blur(image: np.ndarray, size: int) -> np.ndarray:
    """Mean filter with an odd ``size`` window (edges replicated): scipy's C passes, a third of the time of
    summed-area tables in numpy on the gate's small signals (the gate blurs every frame, twice with motion).
    The two 1-D passes are what ``uniform_filter`` runs, called without its generic set-up (14 against 17 µs
    on the gate's 80x34 signals)."""
    if size <= 1:
        return image
    from scipy import ndimage  # lazy: only the gate needs it

    rows = ndimage.uniform_filter1d(image, size, axis=0, mode="nearest")
    return ndimage.uniform_filter1d(rows, size, axis=1, output=rows, mode="nearest")


def blurred_difference(reference: np.ndarray, current: np.ndarray, blur: int) -> np.ndarray:
    """|current - reference|, box-blurred: the change signal before any threshold."""
    return box_blur(np.abs(current - reference), blur | 1)


#: lighting: the largest global gain a fit may explain away (exposure steps, clouds); a larger one is change
MAX_LIGHT_GAIN = 1.5


def relit(reference: np.ndarray, current: np.ndarray, inlier: float, max_gain: float = MAX_LIGHT_GAIN) -> np.ndarray:
    """``reference`` under ``current``'s global lighting: ``gain * reference + offset``, fitted by least squares
    on the pixels that agree within ``inlier`` gray levels after a first fit (so a moving object does not bend
    the fit). A gain outside ``1 / max_gain .. max_gain`` is not lighting: the reference comes back unchanged."""
    x, y = reference.ravel(), current.ravel()
    gain, offset = _light_fit(x, y)
    keep = np.abs(gain * x + offset - y) <= inlier
    if keep.sum() < max(16, x.size // 4):
        return reference
    gain, offset = _light_fit(x[keep], y[keep])
    if not 1.0 / max_gain <= gain <= max_gain:
        return reference
    return (gain * reference + offset).astype(np.float32)


def _light_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y = gain * x + offset``; a flat ``x`` gets gain 1 (gain and offset cannot be told apart)."""
    n = float(x.size)
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    sxx, sxy = float(np.dot(x, x)), float(np.dot(x, y))
    spread = sxx - sx * sx / n
    if spread <= 1e-6 * n:
        return 1.0, (sy - sx) / n
    gain = (sxy - sx * sy / n) / spread
    return gain, (sy - gain * sx) / n


def lit(reference: np.ndarray, current: np.ndarray, cfg: GateConfig) -> np.ndarray:
    """``reference`` under ``current``'s global lighting with ``cfg.lighting`` (an exposure change or a cloud is
    not change; pixels off the fit by more than ``pixel_threshold``, real change, do not bend it), else as is."""
    return relit(reference, current, float(max(1, cfg.pixel_threshold))) if cfg.lighting else reference


def measured_change(reference: np.ndarray, current: np.ndarray, cfg: GateConfig,
                    motion: np.ndarray | None = None) -> np.ndarray:
    """The gate's mask of changed signal pixels: ``current`` against ``reference`` (first moved along the
    backward ``motion`` in frame pixels, when given), under its lighting, blurred and thresholded per ``cfg``."""
    if motion is not None:
        from blinkflow.gate.motion import warp_backward

        reference = warp_backward(reference, motion / float(cfg.downscale))
    return changed_mask(lit(reference, current, cfg), current, cfg.pixel_threshold, cfg.blur, cfg.noise_sigmas)


def changed_mask(reference: np.ndarray, current: np.ndarray, pixel_threshold: float, blur: int,
                 noise_sigmas: float = 0.0) -> np.ndarray:
    """Boolean mask of changed signal pixels: blurred |difference| above the pixel threshold.

    Block averaging (the signal's downscale) and the blur remove isolated codec
    noise. With ``noise_sigmas > 0`` the threshold also rises to that many
    robust standard deviations (1.4826 x MAD) of the blurred difference, so a
    noisy camera does not read as change everywhere.
    """
    diff = blurred_difference(reference, current, blur)
    threshold = float(pixel_threshold)
    if noise_sigmas > 0:
        median = float(np.median(diff))
        sigma = 1.4826 * float(np.median(np.abs(diff - median)))
        threshold = max(threshold, median + noise_sigmas * sigma)
    return diff > threshold


def largest_component(mask: np.ndarray) -> int:
    """Pixel count of the largest 4-connected component of ``mask``."""
    if not mask.any():
        return 0
    from scipy import ndimage  # lazy: only the gate needs it

    labels, count = ndimage.label(mask, structure=_FOUR_CONNECTED)
    return int(np.bincount(labels.ravel(), minlength=count + 1)[1:].max())


#: scipy's default structure for a 2-D label (4-connectivity), made once: label would build it on every call
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def changed_fraction(previous: np.ndarray, current: np.ndarray, cfg: GateConfig) -> tuple[float, float]:
    """Fraction of changed signal pixels, and the largest connected changed area as a fraction."""
    mask = changed_mask(previous, current, cfg.pixel_threshold, cfg.blur, cfg.noise_sigmas)
    return float(mask.mean()), largest_component(mask) / mask.size
