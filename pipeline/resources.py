"""Where the package keeps its data (configs, the demo's media, the frame-record schema), whether it
runs from a clone (an editable install) or from an installed wheel."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The shipped configs: ``configs/`` in the repository, ``blinkflow/configs`` when installed."""
    return Path(str(files("blinkflow.configs")))


def config_path(name: str) -> Path:
    """A shipped config by file name, e.g. ``demo.yaml``."""
    return configs_dir() / name


def record_schema_path() -> Path:
    """The JSON Schema of the frame records the JSONL sink writes."""
    return Path(str(files("blinkflow") / "frame-record.schema.json"))
