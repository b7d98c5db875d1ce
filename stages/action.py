"""Action recognition on sliding clips of each stream.

Windows: per stream, every ``sampling_rate``-th active frame is *sampled*;
a window is ``clip_len`` consecutive samples, and windows start every
``stride`` samples (sample 0, stride, 2*stride, ...). When a window's last
sample arrives, the window is complete; all windows completed in one
``process`` call, across streams, run as one batched forward (in chunks of
``batch`` clips).

Holding (``hold: true``, the default in ``archive`` mode): a frame (active, reused or failed, sampled or
not) is held until the first window that covers it completes, then released in stream order with that
window's result. With overlapping windows (stride < clip_len) every frame lies
inside its window's span. With stride >= clip_len, frames after a window and
before the next window's first sample lie in no window: they carry the result
of the window before them and are released at once. Held frames per stream
stay within clip_len * sampling_rate + stride active frames (plus any reused
frames in between).

Not holding (``hold: false``, the default in ``live`` mode): a clip of 16 frames at 10 fps would hold its
first frame 1.5 s, and longer while the gate skips frames, so every frame leaves at once with the latest
window completed at or before it (the window it completes, if any); frames before the first window leave
without a result. A window's frames stay referenced until it runs; nothing else changes.

A restart (a frame index at or before the stream's last) or a new frame size (a camera back at another
resolution) ends the stream's clips as its end does, below: no clip mixes them.

End of a stream (``end_stream``) or of the run (``flush``): if frames are held
and at least one of them is active, a final window runs on the samples of the
pending window (plus the last active frame if it was not sampled), reaching back
to the samples before it for a whole ``clip_len`` (padded by repeating its last
frame only when the stream has fewer samples); without an
active frame the held frames carry the previous window's result. Everything
is released and the stream's state dropped; if that final forward raises,
the frames it would have labelled are released failed (no later call could
retry them), never lost.

Result per frame, ``frame.results["action"]`` (failed frames get none)::

    {"window": [first_index, last_index],  # frame indices of the first and last (unpadded) clip frame
     "top": [{"label": str, "score": float}, ...]}  # top_k classes by softmax probability, best first
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from blinkflow.models.classes import SYNTHETIC_ACTIONS
from blinkflow.config import StageConfig, _field
from blinkflow.errors import StageError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.stages.model_stage import ModelStage, checked_input_size, pick_classes

log = logging.getLogger(__name__)

TASK = "action"


@dataclass
class ActionOptions:
    """Options of the action stage (``stages.action.options``)."""

    clip_len: int = _field(8, "sampled frames per clip (mvit_v2_s needs 16, s3d at least 5)", lo=1, hi=512)
    stride: int = _field(4, "a new window starts every this many sampled frames", lo=1, hi=512)
    sampling_rate: int = _field(1, "sample every n-th active frame", lo=1, hi=64)
    top_k: int = _field(3, "classes reported per window, best first", lo=1, hi=1000)
    input_size: list[int] = _field(
        factory=lambda: [112, 112], doc="[height, width] of the clip frames (mvit_v2_s needs [224, 224])"
    )
    classes: list[str] | None = _field(None, "class names for random or own weights without a class list")
    model_args: dict[str, Any] | None = _field(None, "extra builder arguments, e.g. {widths: [32, 64, 96, 128]}")
    hold: bool | None = _field(
        None, "true: a frame waits until the first clip covering it completes and gets that clip's label; false: "
        "every frame leaves at once with the latest completed clip's label (no added latency; the label lags); "
        "null: true in archive mode, false in live mode")


@dataclass
class _Window:
    """One clip: its frames (padded to clip_len), its span, and its result once computed."""

    frames: list[Frame]
    first_index: int
    last_index: int
    result: dict[str, Any] | None = None


@dataclass
class _Held:
    frame: Frame
    window: _Window | None = None  # the first window covering the frame, once known


@dataclass
class _StreamState:
    held: list[_Held] = field(default_factory=list)
    samples: list[tuple[int, Frame]] = field(default_factory=list)  # (sample number, frame) of pending windows
    recent: list[Frame] = field(default_factory=list)  # the latest clip_len samples: a final window reaches back
    active_seen: int = 0
    samples_seen: int = 0
    next_start: int = 0  # sample number of the earliest window not yet complete
    last_window: _Window | None = None
    last_index: int = -1  # the stream's latest frame, and its (height, width): a clip never spans a restart or
    size: tuple[int, int] | None = None  # a new frame size (a camera back at another resolution)

    def breaks_at(self, frame: Frame) -> bool:
        """``frame`` cannot continue this state's clips: the stream restarted (index back) or changed size."""
        size = tuple(frame.image.shape[:2]) if frame.image is not None else None
        return frame.index <= self.last_index or (size is not None and self.size is not None and size != self.size)

    def snapshot(self) -> "_StreamState":
        """A copy that later mutation of this state does not touch (frames are shared, not copied)."""
        clone = copy.copy(self)
        clone.held = [copy.copy(entry) for entry in self.held]
        clone.samples = list(self.samples)
        clone.recent = list(self.recent)
        return clone


@register_stage(TASK)
class Action(ModelStage):
    """Top-k action classes per sliding clip, attached to every frame the clip covers."""

    name = TASK
    temporal = True
    Options = ActionOptions
    default_model = "causal3d_small"
    memory_format = "channels_last_3d"  # clips are 5D

    @classmethod
    def held_frames(cls, cfg: Any) -> int:
        options = cfg.options
        if options is None or options.hold is False:
            return 0
        return options.clip_len * options.sampling_rate + options.stride  # the bound above, reused frames aside

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        """``hold: null`` follows the run's mode: a live stream must not wait for clips to complete."""
        super().check_config(cfg, name)
        options = cfg.stages[name].options
        if options.hold is None:
            options.hold = cfg.runtime.mode != "live"

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg)
        self.hold = self.options.hold is not False
        self.input_size = checked_input_size(self.name, self.options.input_size, "[112, 112]")
        self.classes: list[str] = []
        self._streams: dict[str, _StreamState] = {}
        self._executor: Any = None  # runs the model on a list of clip batches when depth_parallel > 1
        self._executor_factory: Any = None

    def build_model(self, spec: Any) -> Any:
        self.classes = pick_classes(self.name, spec.classes, self.options.classes, SYNTHETIC_ACTIONS,
                                    what="at least two classes")
        return self.build_backend(num_classes=len(self.classes))

    def check_model(self, model: Any) -> None:
        self._check_clip_shape(model)
        _check_depth_parallel(model, self.model_name, self.cfg.depth_parallel)
        reach = getattr(model, "receptive_field", None)
        if isinstance(reach, int) and self.options.clip_len > reach:  # the causal net sees only its last frames
            log.warning("stages.%s.options.clip_len: %d frames, but %s sees only the last %d of a clip: the first %d "
                        "do not change its label; a clip_len of %d costs less for the same result", self.name,
                        self.options.clip_len, self.model_name, reach, self.options.clip_len - reach, reach)

    def describe(self) -> str:
        return f", {len(self.classes)} classes"

    def warmup_inputs(self) -> tuple | None:
        import torch

        return (torch.zeros(1, 3, self.options.clip_len, *self.input_size, device=self._device),)

    def process(self, frames: list[Frame]) -> list[Frame]:
        touched = list(dict.fromkeys(f.stream_id for f in frames))
        before = {sid: self._streams[sid].snapshot() for sid in touched if sid in self._streams}
        ended: list[Frame] = []  # frames of clips a restart or a new frame size closed, released first
        try:
            completed = []
            for frame in frames:
                state = self._streams.get(frame.stream_id)
                if state is not None and state.breaks_at(frame):  # as at the stream's end: its tail's window runs
                    ended += self._finish([self._streams.pop(frame.stream_id)])
                completed += self._add(frame)
            self._run_windows(completed)
        except BaseException:
            # leave the state as it was, so the runner's frame-by-frame retry starts clean
            for sid in touched:
                self._streams.pop(sid, None)
            self._streams.update(before)
            raise
        return ended + [f for sid in touched for f in self._release(self._streams[sid], everything=not self.hold)]

    def end_stream(self, stream_id: str) -> list[Frame]:
        state = self._streams.pop(stream_id, None)
        return self._finish([state]) if state is not None else []

    def flush(self) -> list[Frame]:
        states = list(self._streams.values())
        self._streams.clear()
        return self._finish(states)

    def teardown(self) -> None:
        if hasattr(self._executor, "close"):
            self._executor.close()
        self._executor = None
        super().teardown()

    def set_model_executor(self, factory: Any) -> None:
        """Run the model depth-parallel through ``factory(model, k, example_clip)`` (``depth_parallel`` > 1).

        The factory returns a callable from a list of clip batches to their
        logits. The Ray runner injects one that places the K depth stages on K
        actors (:mod:`pipeline.depth_parallel`); without one the stage splits the
        model in-process (:func:`models.depth.split_model`) and runs the slices
        in sequence, with the same results.
        """
        self._executor_factory = factory
        if self.model is not None and self.cfg.depth_parallel > 1:
            self._executor = self._make_executor()

    def held_count(self, stream_id: str) -> int:
        """Frames of ``stream_id`` held back now (for tests and metrics)."""
        state = self._streams.get(stream_id)
        return len(state.held) if state is not None else 0

    # ------------------------------------------------------------------ windows

    def _add(self, frame: Frame) -> list[_Window]:
        """Hold ``frame``; return the window it completes, if any."""
        state = self._streams.setdefault(frame.stream_id, _StreamState())
        state.last_index = frame.index
        if frame.image is not None:
            state.size = tuple(frame.image.shape[:2])
        entry = _Held(frame)
        state.held.append(entry)
        completed = []
        if frame.runs(self.name):
            if state.active_seen % self.options.sampling_rate == 0:
                window = self._add_sample(state, frame)
                completed = [window] if window is not None else []
            state.active_seen += 1
        if not self.hold:  # the latest window so far (the one this frame completes, if any), or none yet
            entry.window = state.last_window
        elif entry.window is None and state.samples_seen <= state.next_start and state.last_window is not None:
            entry.window = state.last_window  # between windows: carry the previous result, hold nothing
        return completed

    def _add_sample(self, state: _StreamState, frame: Frame) -> _Window | None:
        number = state.samples_seen
        state.samples_seen += 1
        state.recent = (state.recent + [frame])[-self.options.clip_len:]
        if number < state.next_start:
            return None  # stride > clip_len: a sample in the gap between windows
        state.samples.append((number, frame))
        if number != state.next_start + self.options.clip_len - 1:
            return None
        clip = [f for n, f in state.samples if n >= state.next_start]
        window = _Window(clip, clip[0].index, clip[-1].index)
        self._assign(state, window)
        state.next_start += self.options.stride
        state.samples = [(n, f) for n, f in state.samples if n >= state.next_start]
        return window

    def _close(self, state: _StreamState) -> list[_Window]:
        """The partial window of a stream's uncovered tail (see the module docstring), if it needs one."""
        waiting = [entry.frame for entry in state.held if entry.window is None]
        active = [f for f in waiting if f.runs(self.name)]
        if not active:
            if state.last_window is not None:
                self._assign(state, state.last_window)
            return []
        clip = [f for n, f in state.samples if n >= state.next_start]
        if not clip or clip[-1] is not active[-1]:
            clip.append(active[-1])
        # reach back: the samples before the tail fill the clip, padded only when the stream has too few (padding with
        # the last frame read the end of a rotation as a bounce on 3 of 18 synthetic clips; its last 8 frames, 18 of 18)
        earlier = [f for f in state.recent if f.index < clip[0].index]
        clip = (earlier + clip)[-self.options.clip_len:]
        window = _Window(clip + [clip[-1]] * (self.options.clip_len - len(clip)), clip[0].index, clip[-1].index)
        self._assign(state, window)
        return [window]

    def _assign(self, state: _StreamState, window: _Window) -> None:
        """Every held frame still waiting gets ``window``: the first window to complete wins. Without holding,
        a frame's window was fixed when it came (the latest then), and a later one does not replace it."""
        if self.hold:
            for entry in state.held:
                if entry.window is None:
                    entry.window = window
        state.last_window = window

    def _release(self, state: _StreamState, everything: bool = False) -> list[Frame]:
        """Pop the held frames whose window has a result, in order (``everything``: all of them).

        Each released frame that is not failed gets its own copy of its window's result.
        """
        count = 0
        for entry in state.held:
            result = entry.window.result if entry.window is not None else None
            if result is None and not everything:
                break
            if result is not None and not entry.frame.is_failed:
                entry.frame.results[self.name] = _copy_result(result)
            count += 1
        released, state.held = state.held[:count], state.held[count:]
        return [entry.frame for entry in released]

    def _finish(self, states: list[_StreamState]) -> list[Frame]:
        """Run the ended streams' partial windows and release every frame they hold."""
        errors = self._run_final([w for state in states for w in self._close(state)])
        for entry in (e for state in states for e in state.held):  # no later call can retry an ended stream:
            if entry.window is not None and id(entry.window) in errors:  # fail its tail, never lose it
                entry.frame.fail(self.name, errors[id(entry.window)])
        # frames of a stream that never had an active frame leave without a result
        return [f for state in states for f in self._release(state, everything=True)]

    def _run_final(self, windows: list[_Window]) -> dict[int, Exception]:
        """The final windows in one forward, or, when that fails, each alone, so that one stream's bad clip fails
        only its own tail; the errors by window (``id``)."""
        try:
            self._run_windows(windows)
            return {}
        except Exception as exc:  # noqa: BLE001 - a model failure becomes the frames' error
            if len(windows) == 1:
                log.warning("%s: final window failed: %s", self.name, exc)
                return {id(windows[0]): exc}
        errors = {}
        for window in windows:
            try:
                self._run_windows([window])
            except Exception as exc:  # noqa: BLE001 - as above, for this window's frames only
                log.warning("%s: final window %s failed: %s", self.name, [window.first_index, window.last_index], exc)
                errors[id(window)] = exc
        return errors

    # ------------------------------------------------------------------ model

    def _run_windows(self, windows: list[_Window]) -> None:
        """One batched forward (in chunks of ``batch`` clips) over the windows; fills ``window.result``."""
        if not windows:
            return
        import torch

        clips = self._clips(windows)
        chunk = max(1, self.cfg.batch)
        with self.inference():
            batches = [clips[i : i + chunk] for i in range(0, len(windows), chunk)]
            logits = torch.cat([out.float() for out in self._forward(batches)])
        scores, labels = torch.softmax(logits, dim=1).topk(min(self.options.top_k, len(self.classes)), dim=1)
        for window, top_scores, top_labels in zip(windows, scores.tolist(), labels.tolist()):
            window.result = {
                "window": [window.first_index, window.last_index],
                "top": [{"label": self.classes[c], "score": round(s, 4)} for c, s in zip(top_labels, top_scores)],
            }

    def _forward(self, batches: list[Any]) -> list[Any]:
        """The model on each clip batch; depth-parallel through the executor when configured."""
        if self.cfg.depth_parallel <= 1:
            return [self.model(batch) for batch in batches]
        if self._executor is None:
            self._executor = self._make_executor()
        return list(self._executor(batches))

    def _make_executor(self) -> Any:
        import torch

        from blinkflow.models.depth import split_model

        example = torch.zeros(1, 3, self.options.clip_len, *self.input_size, device=self._device)
        if self._executor_factory is not None:
            return self._executor_factory(self.model, self.cfg.depth_parallel, example)
        split = split_model(self.model, self.cfg.depth_parallel, example_input=example)
        return lambda batches: [split(batch) for batch in batches]

    def _clips(self, windows: list[_Window]) -> Any:
        """(N, 3, T, h, w) float clips in [0, 1]; each distinct frame is resized once."""
        import torch

        from blinkflow.stages.common import frames_to_batch

        unique = list({id(f): f for w in windows for f in w.frames}.values())
        position = {id(f): i for i, f in enumerate(unique)}
        pixels = frames_to_batch(unique, self._device, size=self.input_size)
        clips = torch.stack([pixels[[position[id(f)] for f in w.frames]] for w in windows])
        return clips.transpose(1, 2)  # (N, T, 3, h, w) -> (N, 3, T, h, w)

    def _check_clip_shape(self, model: Any) -> None:
        """Models with a fixed or minimum clip shape say so; a mismatch is the user's to fix."""
        shape = (self.options.clip_len, *self.input_size)
        got = f"got clip_len {shape[0]} and input_size {list(self.input_size)}"
        required = getattr(model, "required_clip_shape", None)
        minimum = getattr(model, "min_clip_shape", None)
        if required is not None and tuple(required) != shape:
            raise StageError(
                f"stages.{self.name}.options: {self.model_name} needs clip_len {required[0]} and "
                f"input_size [{required[1]}, {required[2]}], {got}; set them"
            )
        if minimum is not None and any(have < need for have, need in zip(shape, minimum)):
            raise StageError(
                f"stages.{self.name}.options: {self.model_name} needs clip_len >= {minimum[0]} and "
                f"input_size >= [{minimum[1]}, {minimum[2]}], {got}; raise them"
            )


# ---------------------------------------------------------------------- helpers


def _check_depth_parallel(model: Any, model_name: str, stages: int) -> None:
    """depth_parallel > 1 needs a model that splits into at least that many depth units."""
    if stages <= 1:
        return
    from blinkflow.models.depth import DepthSplitError, depth_units

    try:
        units = len(depth_units(model)[0])
    except DepthSplitError as exc:
        raise StageError(f"stages.{TASK}.depth_parallel: {exc}; set depth_parallel: 1 or pick another model") from None
    if stages > units:
        raise StageError(
            f"stages.{TASK}.depth_parallel: {model_name} has {units} depth units, {stages} stages asked for; "
            f"use 1..{units}"
        )


def _copy_result(result: dict[str, Any]) -> dict[str, Any]:
    """Each frame gets its own copy, so editing one frame's result never changes another's."""
    return {"window": list(result["window"]), "top": [dict(t) for t in result["top"]]}
