"""The exception hierarchy of the engine.

A :class:`BlinkflowError` is a user-facing problem: the CLI prints its message
on one line, without a traceback. Anything else is a bug and keeps its traceback.
"""


def first_line(reason: object) -> str:
    """An exception's (or any reason's) first line of text, for a one-line message; its type's name when it has
    no text (FFmpeg, Ray and torch errors span lines)."""
    text = str(reason).strip()
    return text.splitlines()[0] if text else type(reason).__name__


class BlinkflowError(Exception):
    """Base of every error that a user can fix (bad config, bad input, bad weights)."""


class ConfigError(BlinkflowError):
    """An invalid configuration; the message starts with the YAML path."""


class SourceError(BlinkflowError):
    """A video input that cannot be opened or decoded; the message names the input."""


class TruncatedVideoError(SourceError):
    """A video whose data ended before its container's index did; the frames before the cut were delivered."""


class SinkError(BlinkflowError):
    """An output that cannot be written; the message names the output."""


class StageError(BlinkflowError):
    """A stage that cannot be set up (unknown backend, missing weights, bad device)."""


class StageSetupFailed(StageError):
    """A call reached a stage actor that came back from a restart and could not set its stage up."""


class RegistryError(BlinkflowError):
    """An unknown or duplicate component name."""


def missing_dependency(module: str, extra: str | None = None) -> BlinkflowError:
    """Name the pip package or extra that provides a missing optional module."""
    hint = f"pip install 'blinkflow[{extra}]'" if extra else f"pip install {module}"
    return BlinkflowError(f"the optional module {module!r} is not installed; run: {hint}")


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM (or one while Ray starts): abort at once; the exit code is 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
