"""Where the package keeps its data (configs, the demo's media, the frame-record schema), whether it
runs from a clone (an editable install) or from an installed wheel."""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The shipped configs: ``configs/`` in the repository, ``blinkflow/configs`` when installed."""
    return Path(str(files("blinkflow.configs")))


def config_path(name: str) -> Path:
    """A shipped config by file name, e.g. ``demo.yaml``."""
    return configs_dir() / name


def find_config(path: str | Path) -> Path:
    """``path`` as given; where no such file exists, a relative ``configs/NAME`` or ``NAME`` (``train/NAME``
    too) naming a shipped config is that one: the README's commands then work from any folder once installed."""
    given = Path(path)
    if given.is_absolute() or os.path.lexists(given):  # a broken link of the user's is theirs to fix, not ours
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    if parts and ".." not in parts:
        shipped = configs_dir().joinpath(*parts)
        if shipped.is_file():
            logging.getLogger(__name__).info("%s: none here; the shipped %s", given, shipped)
            return shipped
    return given


def is_shipped(folder: Path) -> bool:
    """Whether ``folder`` is the shipped configs' folder or one under it."""
    try:
        folder.resolve().relative_to(configs_dir().resolve())
    except ValueError:
        return False
    return True


def record_schema_path() -> Path:
    """The JSON Schema of the frame records the JSONL sink writes."""
    return Path(str(files("blinkflow") / "frame-record.schema.json"))
