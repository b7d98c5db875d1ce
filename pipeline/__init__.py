"""Blinkflow: streaming video understanding as a pipelined graph of stages.

Importing this package is cheap: torch, torchvision, PyAV and Ray are imported
lazily by the modules that need them.
"""

__version__ = "0.1.0"

from pipeline.errors import BlinkflowError, ConfigError, SourceError, StageError  # noqa: F401
