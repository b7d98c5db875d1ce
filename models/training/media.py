"""Reading the media that datasets and backgrounds share: file suffixes, images, video frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blinkflow.errors import BlinkflowError
from blinkflow.files import VIDEO_SUFFIXES as _PIPELINE_VIDEO_SUFFIXES

#: what the pipeline's sources read (.m4v, .ts, .mts...): a tree for training skipped those silently
VIDEO_SUFFIXES = tuple(sorted(_PIPELINE_VIDEO_SUFFIXES))
IMAGE_SUFFIXES = (".png", ".ppm", ".jpg", ".jpeg", ".bmp")


class DatasetError(BlinkflowError):
    """A dataset path or file that cannot be read; the message names it and the fix."""


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only arrays
    except Image.DecompressionBombError as exc:  # not an OSError: it was a traceback
        raise DatasetError(f"{path}: the image is too large to train on ({exc}); downscale it") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc}); check the dataset's file names") from None


def read_video_frames(path: Path, max_frames: int, step: int = 1) -> list[np.ndarray]:
    """Every ``step``-th of the first ``max_frames`` frames as RGB arrays (PyAV)."""
    import av

    from blinkflow.frame import av_to_rgb

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.best("video")  # the main one, upright, as the pipeline decodes it
            if stream is None:
                raise DatasetError(f"{path}: the file has no video stream; replace the file or drop it")
            for index, frame in enumerate(container.decode(stream)):
                if index >= max_frames:
                    break
                if index % step == 0:
                    frames.append(av_to_rgb(frame, None))
    except (av.error.FFmpegError, OSError) as exc:
        raise DatasetError(f"{path}: cannot decode the video ({exc}); replace the file or drop it") from None
    return frames
