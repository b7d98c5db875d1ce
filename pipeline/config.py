"""YAML configuration as typed, validated dataclasses.

Loading goes merge (defaults, file, ``--set`` overrides), then structure
(type checks, unknown keys, ranges), then cross-field checks. Every error is a
one-line :class:`ConfigError` that starts with the YAML path, e.g.
``stages.detect.batch: 0 is out of range (1..1024)``.

The driver resolves the config once and ships the resulting objects to the
workers; workers never reread files or the environment.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blinkflow.errors import ConfigError
from blinkflow.schema import (  # noqa: F401 - re-exported: the helpers configs are built with
    _field,
    _join,
    apply_override,
    check_kind,
    field_default,
    read_yaml,
    resolve_path,
    setting,
    structure_dataclass,
    structure_fields,
)


# --------------------------------------------------------------------------- sections


#: the settings every source type takes, at source level in YAML; a type's own settings sit beside them
SOURCE_COMMON = ("type", "id", "path", "url", "fps", "resize", "max_frames")


@dataclass(init=False)
class SourceConfig:
    """One input. The settings all types share are fields here; a type's own settings (decoder threads,
    reconnection, the synthetic scene, ...) are its ``Options``, registered with the source type, in
    ``options``. In YAML both are written flat, side by side: ``{type: synthetic, fps: 10, seed: 3}``."""

    type: str = _field(
        "file", "a registered source type: file, dir, glob, stream, synthetic, or frames (the Python API's own "
        "numpy frames, blinkflow.frames)")
    id: str | None = _field(None, "stream id used in outputs and metrics; defaults to the file name or url host")
    path: str | None = _field(None, "file, directory or glob pattern (file, dir, glob)")
    url: str | None = _field(None, "stream URL: rtsp://, http(s)://, udp://, srt:// or /dev/videoN (stream)")
    fps: float | None = _field(None, "resample to this many frames per second; null keeps the source rate", lo=0.1, hi=1000)
    resize: list[int] | None = _field(None, "resize frames to [width, height]; null keeps the source size")
    max_frames: int | None = _field(None, "stop after this many frames per stream", lo=1, hi=10**9)
    options: Any = _field(None, "the type's own settings (its registered Options), written flat beside these")

    def __init__(self, type: str = "file", id: str | None = None, path: str | None = None, url: str | None = None,
                 fps: float | None = None, resize: list[int] | None = None, max_frames: int | None = None,
                 options: Any = None, **settings: Any) -> None:
        """``settings`` are the type's own (``SourceConfig(type="synthetic", seed=3)``), checked against it."""
        if options is not None and settings:
            raise TypeError(f"pass the {type} source's settings either as options or as keywords, not both")
        self.type, self.id, self.path, self.url = type, id, path, url
        self.fps, self.resize, self.max_frames = fps, resize, max_frames
        self.options = options if options is not None else source_options(type, settings, "source")

    @classmethod
    def from_mapping(cls, data: dict, path: str) -> "SourceConfig":
        """Structure one YAML source entry: the common settings here, the rest against the type's Options."""
        settings = {str(k): v for k, v in data.items()}
        if "options" in settings:
            raise ConfigError(f"{_join(path, 'options')}: write a source's settings flat beside its type, not "
                              "under options")
        common = structure_fields(cls, {k: settings.pop(k) for k in SOURCE_COMMON if k in settings}, path)
        kind = common.get("type", "file")
        return cls(**common, options=source_options(kind, settings, path))


def source_options(kind: str, settings: dict, path: str) -> Any:
    """The ``Options`` of source type ``kind`` from its own ``settings``; a setting it does not take is a
    one-line error naming the YAML path, what the type takes, and which types take it."""
    from blinkflow.registry import sources as source_registry

    if kind not in source_registry:
        raise ConfigError(f"{_join(path, 'type')}: {kind!r} is not one of "
                          f"{' | '.join(repr(n) for n in source_registry.names())}")
    options_cls = source_registry.get(kind).Options
    known = [f.name for f in dataclasses.fields(options_cls)]
    for key in map(str, settings):
        if key not in known:
            takers = [n for n in source_registry.names() if key in _option_names(n)]
            where = f" (a setting of {', '.join(repr(t) for t in takers)} sources)" if takers else ""
            locator = getattr(source_registry.get(kind), "locator", None)  # path or url: the other is not its
            common = [c for c in SOURCE_COMMON if c not in ("path", "url") or c == locator]
            raise ConfigError(f"{_join(path, key)}: not an option of a {kind!r} source{where}; it has: "
                              f"{', '.join(common + known)}")
    return structure_dataclass(options_cls, settings, path)


def _option_names(kind: str) -> list[str]:
    from blinkflow.registry import sources as source_registry

    return [f.name for f in dataclasses.fields(source_registry.get(kind).Options)]


@dataclass
class GateConfig:
    """Temporal-redundancy skipping: reuse results for frames that did not change."""

    enabled: bool = _field(False, "turn the gate on")
    threshold: float = _field(0.01, "changed-pixel fraction below which a frame is reused", lo=0.0, hi=1.0)
    pixel_threshold: int = _field(20, "gray-level difference that counts a pixel as changed", lo=0, hi=255)
    downscale: int = _field(4, "compare frames downscaled by this factor", lo=1, hi=64)
    replicas: int = _field(
        1, "parallel copies of the gate (threaded and ray runners), the streams spread over them, each stream always "
        "on the same one: one copy takes about 200 frames/s of 720p on one core", lo=1, hi=1024)
    blur: int = _field(3, "box-blur kernel on the difference, in downscaled pixels (odd; 1 = off)", lo=1, hi=31)
    max_reuse: int = _field(
        30, "force a fresh frame (an audit) after this many reused frames; bounds how stale a result gets", lo=0, hi=10**6
    )
    cut_threshold: float = _field(0.5, "changed fraction treated as a scene cut (always refresh)", lo=0.0, hi=1.0)
    batch: int = _field(
        4, "frames per gate call; runners cut waves of the largest batch of any stage, so with adaptive keep it "
        "small (e.g. the model stages' batch): the audit feedback arrives between calls", lo=1, hi=1024,
    )
    noise_sigmas: float = _field(
        0.0, "also raise pixel_threshold to this many robust sigmas (1.4826 MAD) of the blurred difference; 0 = off",
        lo=0.0, hi=100.0,
    )
    lighting: bool = _field(
        True, "measure change against the reference under the frame's global lighting (gain and offset fitted on "
        "the pixels that did not change, up to a gain of 1.5): auto exposure or a cloud is then not change; the "
        "audits still judge whether the models' results hold under it",
    )
    relight_patches: bool = _field(
        False, "with lighting and tiles, put the reference under each partial frame's lighting before its tiles are "
        "patched in, so an exposure ramp does not leave a patchwork of exposures that reads as change later "
        "(docs/skipping.md: right about the signal; off because the parking lot's boxes then fall where cars leave)",
    )
    tiles: list[int] | None = _field(
        factory=lambda: [8, 8], doc="[rows, cols]: region-level reuse; a frame whose change stays inside few tiles is "
        "'partial' and the segment stage recomputes only those tiles (plus a halo); null = off",
    )
    tile_margin: int = _field(
        1, "a partial frame also recomputes the tiles this many tiles around each changed one: change just below "
        "pixel_threshold gathers around real change, and the fresh masks reach past the changed pixels; left "
        "alone they go stale in the caches (0 saves compute on a fixed camera, at the masks of the frames where "
        "things move: docs/skipping.md)", lo=0, hi=64,
    )
    tile_min_changed: float = _field(
        0.05, "a tile counts as changed only when at least this fraction of its signal pixels changed; scattered "
        "codec noise then marks no tile (nor its margin), and a frame whose change is all such noise is reused; "
        "0 = any changed pixel", lo=0.0, hi=1.0,
    )
    partial_max: float = _field(
        1.0, "largest fraction of changed tiles (margin included) a partial frame may have; more is a keyframe. The "
        "stages themselves run in full when their crops would cost about as much", lo=0.0, hi=1.0,
    )
    partial_changed: float = _field(
        0.35, "largest changed-pixel fraction a partial frame may have (a hand in the scene: local change); more "
        "is a keyframe", lo=0.0, hi=1.0,
    )
    max_partial: int = _field(30, "force a full keyframe after this many partial frames since the last one (reused frames between "
                           "them do not reset the count: the patches pile up all the same)", lo=0, hi=10**6)
    motion: Literal["off", "mvs", "flow", "auto"] = _field(
        "mvs", "how reused frames move the keyframe's boxes and masks: the decoder's motion vectors (needs "
        "sources.N.motion_vectors), the keyframe's flow extrapolated, auto (vectors, else flow), or off (copy)",
    )
    refresh: dict[str, int] = _field(
        factory=lambda: {"segment": 4, "detect": 8}, doc="per stage, a staleness bound shorter than max_reuse: after this many "
        "frames without a run, that stage alone runs on the next frame the gate would reuse (a 'refresh': the other "
        "stages' results are carried over, and the refresh audits the stage's carry-over). Masks go stale under "
        "drift too slow for the pixel signal to see, which boxes matched at IoU 0.5 tolerate. A mapping replaces the "
        "default, so list every stage to bound; {} = off",
    )
    refresh_pixel_threshold: int = _field(
        6, "with tiles, a refresh recomputes only the tiles (plus tile_margin) where the signal moved by more than "
        "this many gray levels since the stage's results; none: no refresh yet. 0 = the whole frame", lo=0, hi=255,
    )
    refresh_noise_factor: float = _field(
        2.0, "a tile drifted only if its change since the stage's results is this many times the largest "
        "frame-to-frame change seen there meanwhile (or above pixel_threshold): drift adds up from frame to frame, "
        "codec noise does not; 0 = off", lo=0.0, hi=100.0,
    )
    audit_interval: int = _field(
        0, "process every Nth frame the gate would reuse as an audit that measures agreement; 0: only the "
        "max_reuse refreshes are audits", lo=0, hi=10**6,
    )
    audit_uncertain: float = _field(
        0.5, "also audit a frame the gate would reuse when its change is at least this fraction of the threshold "
        "(where the gate is least sure), after at least audit_gap reused frames since the last audit; 0: audits on the clock only",
        lo=0.0, hi=1.0,
    )
    audit_gap: int = _field(8, "audit_uncertain: fewest reused frames between two audits", lo=1, hi=10**6)
    agreement_target: float = _field(0.95, "audit agreement (box F1 at IoU 0.5, mask mIoU) to keep", lo=0.0, hi=1.0)
    adaptive: bool = _field(
        True, "the accuracy budget: audits move the threshold per stream, up while they meet agreement_target (up "
        "to threshold_max), down when they miss (below the configured threshold only for misses at larger change)",
    )
    threshold_min: float = _field(0.001, "adaptive: lowest threshold", lo=0.0, hi=1.0)
    threshold_max: float = _field(0.25, "adaptive: highest threshold", lo=0.0, hi=1.0)
    adapt_up: float = _field(2.0, "adaptive: an audit at or above the target multiplies the threshold by this", lo=1.0, hi=10.0)
    adapt_down: float = _field(
        0.5, "adaptive: an audit below the target sets the threshold to min(threshold, its change) times this", lo=0.01, hi=1.0
    )
    adapt_bounds: bool = _field(
        True, "adaptive: a refresh audit also moves its stages' refresh bounds by a frame, per stream, between 1 and "
        "twice the configured bound (the segmenter's: four times; a small new object reaches the boxes only at the "
        "detector's refresh, the masks on the partial frame it changes): longer while a span one frame longer "
        "would still meet agreement_target on average (drift adds up about linearly from the stage's last run), shorter when the current span does not",
    )
    carry_until: dict[str, float] = _field(
        factory=lambda: {"detect": 3.0}, doc="per stage, a factor: on a frame whose change passes threshold but stays "
        "under factor x the configured threshold (the stream's when audits lowered it; raised, it does not widen "
        "this) and fits a partial frame, that stage is carried over, moved along the motion, "
        "while the others run on the tiles changed since their own results; past it, or past the stage's refresh "
        "bound, everything runs (a stage without a bound in refresh is never carried). For stages whose results "
        "follow the motion well (boxes matched at IoU 0.5). A mapping replaces the default; {} = off",
    )
    object_weight: float = _field(
        1.0, "changed signal pixels on the stream's recent objects (its boxes at least audit_lag frames old, grown "
        "by object_margin) count this many times towards threshold: a person's shift matters more than leaves "
        "or codec noise elsewhere; cut_threshold and partial_changed still see the plain fraction. 1 = off",
        lo=1.0, hi=100.0,
    )
    object_tiles: bool = _field(
        False, "a partial frame's changed tiles grow to every tile of each recent object they touch (the boxes "
        "object_weight uses), so an object whose edge changed is recomputed whole; measured to cost compute for no "
        "agreement on the real clips (docs/skipping.md), so off",
    )
    object_margin: float = _field(
        0.5, "object_weight, object_tiles: each box grows by this fraction of its width and height on every side (objects move "
        "between the frame whose boxes the gate sees and the frame it decides)", lo=0.0, hi=10.0,
    )
    region_budget: bool = _field(
        False, "adaptive: a per-region accuracy budget. Each audit also tells where the carried-over results "
        "disagreed with the fresh ones (per tile of the tiles grid); a tile that changed before an audit that "
        "found it harmless counts half as much towards threshold from then on (down to a quarter), a tile where the "
        "audit found disagreement counts in full again. Reuse is then spent where it costs least (leaves, screens, "
        "rain the models ignore); needs tiles",
    )

    @property
    def uses_objects(self) -> bool:
        """Whether the gate needs the stream's recent boxes (object_weight or object_tiles)."""
        return self.object_weight > 1.0 or self.object_tiles

    audit_lag: int = _field(
        8, "adaptive: frames between an audit and the gate using its agreement (the same in every runner; "
        "the threaded and Ray runners keep at most this many frames of a stream unfinished); at least one wave "
        "(the largest stage batch), which a longer batch raises it to", lo=1, hi=10**6,
    )


@dataclass
class ResourcesConfig:
    """Resources each replica of a stage asks the Ray scheduler for."""

    num_cpus: float = _field(1.0, "CPU cores per replica", lo=0.0, hi=1024)
    num_gpus: float = _field(0.0, "GPUs per replica; fractions share a GPU", lo=0.0, hi=64)
    custom: dict[str, float] = _field(factory=dict, doc="custom Ray resources per replica, e.g. {gpu_node: 1} to pin to labelled nodes")


from blinkflow.devices import DEVICE_PATTERN  # noqa: E402 - the device names a stage accepts


@dataclass
class StageConfig:
    """One model stage. ``options`` is typed by the stage's own ``Options`` dataclass."""

    enabled: bool = _field(True, "run this stage")
    model: str | None = _field(None, "backend name from the model registry; null picks the stage default")
    weights: str | None = _field(
        None, "'shipped' (models/weights), a torchvision enum name like 'DEFAULT', a .pt path, or null (random init)"
    )
    batch: int = _field(4, "max frames per batch", lo=1, hi=1024)
    max_wait_ms: float = _field(20.0, "max time a partial batch waits for more frames", lo=0.0, hi=60000)
    replicas: int = _field(
        1, "parallel copies of the stage: threads (threaded runner) or actors (ray); the local runner runs one. A "
        "stage with per-stream state gets the streams spread over its copies, each stream always on the same one",
        lo=1, hi=1024)
    device: str = _field("cpu", "'cpu', 'cuda:N' or 'auto' (the GPU when the process has one, else the CPU)")
    precision: Literal["fp32", "fp16", "bf16"] = _field("fp32", "inference precision (fp16/bf16 on GPU only)")
    channels_last: bool = _field(False, "use channels_last memory format (GPU)")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = _field(
        "off", "torch.compile the model's forward with this mode (reduce-overhead adds CUDA graphs on a GPU); each new "
        "input shape first pays its compile (tens of seconds, more on a CPU), so fixed batch shapes pay off most. "
        "Methods other than the forward (the segmenter's features/head for tiles and feature reuse) run eagerly",
    )
    warmup: bool | None = _field(
        None, "run one forward on a dummy input at setup, so the first batch does not pay for the GPU's kernel "
        "selection and allocations; null: on GPU only"
    )
    depth_parallel: int = _field(
        1, "split the model into this many depth stages, run pipelined: slice actors (ray), slice threads "
        "(threaded; one GPU each when there are as many), in sequence (local)", lo=1, hi=64)
    resources: ResourcesConfig = _field(factory=ResourcesConfig, doc="Ray resources per replica")
    options: Any = _field(None, "stage-specific options")


@dataclass
class SinkConfig:
    """One output."""

    type: str = _field(
        "jsonl", "a registered sink (`blinkflow list`): jsonl records, an annotated mp4, COCO-style JSON of "
        "detections and masks, memory (tests), or your own (one file in pipeline/sinks/)"
    )
    path: str | None = _field(None, "output file (jsonl, mp4)")
    fps: float | None = _field(None, "mp4 frame rate; null uses the source rate", lo=0.1, hi=1000)
    include_dense: bool = _field(False, "jsonl: include dense flow fields (large); masks are always included")
    live: bool | None = _field(
        None, "jsonl: append and flush every record (visible while the run goes on, kept on errors and signals) "
        "instead of one atomic file at the end; null: on when runtime.mode is live")
    rotate_mb: float | None = _field(None, "jsonl live: start a new file past this size; null never", lo=0.001, hi=10**6)
    keep: int = _field(10, "jsonl live: rotated files kept (<path>.1 is the newest)", lo=1, hi=10**4)
    draw: list[str] = _field(factory=lambda: ["detect", "segment", "flow", "action"], doc="mp4: layers to draw")
    # push sinks (docs/push-sinks.md): mqtt and webhook publish events from a bounded buffer in a thread of their own
    host: str | None = _field(None, "mqtt: broker host name or address")
    port: int | None = _field(None, "mqtt: broker port; null: 1883, or 8883 with tls", lo=1, hi=65535)
    topic_prefix: str = _field("blinkflow", "mqtt: topics are <topic_prefix>/<stream>/events, .../frames and "
                               "<topic_prefix>/status")
    qos: int = _field(1, "mqtt: quality of service; 1 (at least once) survives broker restarts", lo=0, hi=2)
    per_frame: bool = _field(False, "mqtt: also publish every frame's record on <topic_prefix>/<stream>/frames "
                             "(masks and dense fields only with include_dense)")
    client_id: str | None = _field(None, "mqtt: client id (unique per broker); null: blinkflow-<host name>-<pid>-<random>")
    username: str | None = _field(None, "mqtt: user name; the password comes from password_file")
    password_file: str | None = _field(None, "mqtt: a file holding the password (readable by the service user only)")
    tls: bool = _field(False, "mqtt: connect with TLS (the system's CAs, or ca_file)")
    ca_file: str | None = _field(None, "mqtt: a PEM file of the CAs to trust (implies tls)")
    url: str | None = _field(None, "webhook: the http:// or https:// URL events are POSTed to, one event per request")
    token_file: str | None = _field(None, "webhook: a file holding a bearer token for the Authorization header")
    timeout_s: float = _field(5.0, "webhook: one request's time limit; mqtt: connect and keep-alive scale", lo=0.1,
                              hi=600)
    buffer: int = _field(1000, "mqtt, webhook: messages held while the broker or endpoint is slow or down; past "
                         "it the oldest is dropped and counted", lo=1, hi=10**7)
    buffer_mb: float = _field(64.0, "mqtt, webhook: the buffer's bound in megabytes of messages too (a frame record "
                              "with dense fields is megabytes): past it the oldest are dropped and counted",
                              lo=0.001, hi=10**5)
    max_message_kb: float = _field(256.0, "mqtt, webhook: a larger message is dropped and counted (too_large): a "
                                   "broker closes the connection on one over its limit, and it was sent again "
                                   "forever, holding back every later one; AWS IoT Core takes 128", lo=0.1, hi=10**7)
    retries: int = _field(-1, "webhook: failed attempts of one event before it is dropped and counted; -1 retries "
                          "while it stays in the buffer", lo=-1, hi=10**6)
    backoff_initial_s: float = _field(0.5, "mqtt, webhook: wait after the first failure (reconnect or retry)",
                                      lo=0.01, hi=3600)
    backoff_max_s: float = _field(30.0, "mqtt, webhook: longest wait; each failure doubles it up to this", lo=0.01,
                                  hi=3600)
    close_timeout_s: float = _field(5.0, "mqtt, webhook: at the end, time to deliver what is buffered; the rest is "
                                    "reported in one log line", lo=0.0, hi=3600)


@dataclass
class MetricsConfig:
    """Prometheus exporter."""

    enabled: bool = _field(False, "serve /metrics, /healthz and /readyz")
    host: str = _field("127.0.0.1", "bind address; keep 127.0.0.1 unless a scraper elsewhere needs it")
    port: int = _field(9464, "port", lo=0, hi=65535)


@dataclass
class RuntimeConfig:
    """How the graph runs."""

    runner: str = _field("local", "a registered runner: local (in-process, one stage at a time: the reference), "
                         "threaded (in-process, each stage in its own thread, so stages overlap) or ray (actors)")
    mode: Literal["archive", "live"] = _field("archive", "archive never drops frames; live drops the oldest under overload")
    address: str | None = _field(None, "Ray cluster address; null starts a local Ray instance")
    max_in_flight: int = _field(8, "batches in flight per stage before upstream blocks (or live drops)", lo=1, hi=4096)
    num_cpus: int | None = _field(None, "CPUs for a local Ray instance; null uses all", lo=1, hi=4096)
    log_level: Literal["debug", "info", "warning", "error"] = _field("warning", "logging level")
    drain_timeout_s: float | None = _field(
        60.0, "after a first SIGINT/SIGTERM, abort as a second signal would if the run has not drained within this "
        "many seconds (a stuck stage or source; blinkflow label: videos still in progress are redone by the next "
        "run); null waits for the drain however long it takes", lo=0.1, hi=10**6)


@dataclass
class ControlConfig:
    """HTTP control endpoint: list, add and remove live streams while the pipeline runs (docs/streams.md)."""

    enabled: bool = _field(
        False, "serve GET/POST /streams and DELETE /streams/<id>; the run then lasts until POST /stop, SIGTERM or Ctrl-C"
    )
    host: str = _field("127.0.0.1", "bind address; another than loopback needs auth: token (docs/security.md)")
    port: int = _field(9465, "port; 0 picks a free one", lo=0, hi=65535)
    auth: Literal["token", "none"] = _field(
        "token", "token: a bearer token on every mutating route ($BLINKFLOW_CONTROL_TOKEN, token_file, or generated "
        "and printed at start); none: no authentication, only on a loopback host")
    token_file: str | None = _field(None, "a file holding the bearer token (readable by the service user only)")
    allowed_origins: list[str] = _field(factory=list, doc="browser origins allowed to call the endpoint; none by default")
    allow_local: list[str] = _field(factory=list, doc="local files and devices (globs) that POST /streams may open")
    allow_hosts: list[str] = _field(
        factory=list, doc="internal hosts or networks (loopback, private, link-local) POST /streams may stream from, "
        "e.g. [10.20.0.0/16, cam.local]")
    allowed_ffmpeg_options: list[str] = _field(
        factory=lambda: ["rtsp_transport", "timeout", "rw_timeout", "stimeout", "fflags", "probesize", "analyzeduration"],
        doc="FFmpeg options a POST /streams may set")
    max_pixels: int = _field(1920 * 1080, "largest resize (width x height) a POST /streams may ask for", lo=1, hi=10**9)
    max_fps: float = _field(60.0, "largest fps a POST /streams may ask for", lo=0.1, hi=1000)
    max_queue_size: int = _field(256, "largest queue_size a POST /streams may ask for", lo=1, hi=4096)
    max_memory_mb: int | None = _field(
        None, "POST /streams answers 503 when this process's resident memory plus the new stream's buffer "
        "(queue_size x width x height x 3 bytes) would exceed it; null: no budget", lo=1, hi=10**8)
    stream_defaults: dict[str, Any] = _field(
        factory=dict, doc="source settings for streams added at run time (a POST's own keys win), e.g. {resize: [640, 360]}"
    )


@dataclass
class LabelConfig:
    """``blinkflow label``: batch-labelling of archived videos (docs/streams.md)."""

    formats: list[Literal["jsonl", "coco", "mp4"]] = _field(
        factory=lambda: ["jsonl", "coco"], doc="outputs per video; --format overrides"
    )
    source: SourceConfig = _field(
        factory=lambda: SourceConfig(type="file"), doc="decode settings for every video (fps, resize, max_frames, ...)"
    )
    executor: Literal["ray", "local"] = _field("ray", "ray spreads videos over the cluster; local labels them one by one here")
    parallel: int | None = _field(None, "videos labelled at once; null: as many as the cluster's CPUs allow", lo=1, hi=100000)
    task_cpus: float = _field(1.0, "CPUs each video's Ray task reserves", lo=0.0, hi=1024)
    retry_failed: bool = _field(True, "on a re-run, label again the videos the manifest records as failed, and the "
                                "partial ones (truncated, or with frames failed in a stage) whose file did not change")


@dataclass
class Config:
    """A whole pipeline."""

    sources: list[SourceConfig] = _field(factory=list, doc="inputs")
    gate: GateConfig = _field(factory=GateConfig, doc="temporal-redundancy skipping")
    stages: dict[str, StageConfig] = _field(factory=dict, doc="model stages, run in this order")
    sinks: list[SinkConfig] = _field(factory=list, doc="outputs")
    metrics: MetricsConfig = _field(factory=MetricsConfig, doc="Prometheus exporter")
    runtime: RuntimeConfig = _field(factory=RuntimeConfig, doc="runner and cluster")
    control: ControlConfig = _field(factory=ControlConfig, doc="HTTP control endpoint for live streams")
    label: LabelConfig = _field(factory=LabelConfig, doc="batch-labelling (blinkflow label)")

    def enabled_stages(self) -> dict[str, StageConfig]:
        return {name: cfg for name, cfg in self.stages.items() if cfg.enabled}


# --------------------------------------------------------------------------- structuring


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, data: dict | None = None,
                base_dir: str | Path | None = None) -> Config:
    """Load (``path``, or the raw mapping ``data``), override, structure and check a config; raise ConfigError
    on any problem. Relative paths in it are found beside ``path`` (or in ``base_dir``) too."""
    from blinkflow.resources import find_config

    path = find_config(path) if path is not None else None
    raw = read_yaml(path) if path is not None else dict(data or {})
    _not_a_training_config(raw, path)
    for override in overrides or []:
        apply_override(raw, override, _default_at)
    base_dir = Path(path).resolve().parent if path is not None else Path(base_dir or Path.cwd())
    cfg = structure_config(raw)
    check_config(cfg, base_dir)
    return cfg


#: top-level keys of a training config only (blinkflow.models.training.config.TrainConfig, which imports this module)
_TRAINING_KEYS = {"task", "epochs", "batch_size", "optim", "eval_every", "out_dir"}


def _not_a_training_config(raw: Any, path: str | Path | None) -> None:
    name = path or "config"
    task = raw.get("task") if isinstance(raw, dict) and isinstance(raw.get("task"), str) else "TASK"
    check_kind(raw, Config, _TRAINING_KEYS, f"{name}: this is a training config, not a pipeline config; use "
                                            f"`blinkflow train {task} --config {name}`")


def _default_at(parts: list[str]) -> Any:
    """The default of the setting at YAML path ``parts`` (``--set`` starts an index into a list the config leaves
    out from it); a stage's options are typed by its registered Options."""
    from blinkflow.registry import stages as stage_registry

    if len(parts) > 3 and parts[0] == "stages" and parts[2] == "options":
        known = parts[1] in stage_registry
        return field_default(stage_registry.get(parts[1]).Options, parts[3:]) if known else None
    return field_default(Config, parts)


def structure_config(raw: dict) -> Config:
    """Structure the raw mapping; stage options are typed by each stage's Options class."""
    from blinkflow.registry import stages as stage_registry

    raw = dict(raw)
    raw_stages = raw.pop("stages", None) or {}
    cfg = structure_dataclass(Config, raw, "")
    if not isinstance(raw_stages, dict):
        raise ConfigError(f"stages: expected a mapping of stage name to settings, got {raw_stages!r}")
    for name, stage_raw in raw_stages.items():
        if name == "gate":
            raise ConfigError("stages.gate: the gate is configured in the top-level 'gate' section, not under stages")
        if name not in stage_registry:
            valid = ", ".join(n for n in stage_registry.names() if n != "gate")
            raise ConfigError(f"stages.{name}: unknown stage; valid stages: {valid}")
        if stage_raw is not None and not isinstance(stage_raw, dict):
            raise ConfigError(f"stages.{name}: expected a mapping of settings (model, weights, batch, ...), "
                              f"got {stage_raw!r}")
        stage_raw = dict(stage_raw or {})
        options_raw = stage_raw.pop("options", None)
        stage_cfg = structure_dataclass(StageConfig, stage_raw, f"stages.{name}")
        stage_cls = stage_registry.get(name)
        stage_cfg.options = structure_dataclass(stage_cls.Options, options_raw, f"stages.{name}.options")
        if stage_cfg.model is None:
            stage_cfg.model = stage_cls.default_model
        cfg.stages[str(name)] = stage_cfg
    return cfg


def check_config(cfg: Config, base_dir: Path) -> None:
    """Cross-field checks that need more than one value or the file system."""
    from blinkflow.registry import sinks as sink_registry

    _check_registered(cfg)
    for i, source in enumerate(cfg.sources):
        _check_source(source, f"sources.{i}", base_dir)
    for name, stage in cfg.stages.items():
        _check_stage(name, stage, base_dir)
    _check_label_source(cfg.label.source)
    _settle_motion_vectors(cfg)
    _check_stages_across(cfg)
    _check_ray_devices(cfg)
    _check_gate(cfg.gate, cfg.stages)
    for i, sink in enumerate(cfg.sinks):
        sink_cls = sink_registry.get(sink.type)
        if getattr(sink_cls, "needs_path", False) and not sink.path:
            raise ConfigError(f"sinks.{i}.path: a {sink.type} sink needs an output path")
        if sink.path and Path(sink.path).is_dir():  # found only when the run commits, after all the work
            raise ConfigError(f"sinks.{i}.path: {sink.path} is a folder; give the output's file name")
        _check_sink_target(cfg, i)
        _check_sink_settings(sink, sink_cls, f"sinks.{i}")
        check = getattr(sink_cls, "check_config", None)  # a sink's own checks (mqtt: host; webhook: url)
        if check is not None:
            check(sink, f"sinks.{i}", base_dir)
    _check_by_source_type(cfg)
    _check_bind_host("metrics", cfg.metrics.host, cfg.metrics.enabled)
    _check_bind_host("control", cfg.control.host, cfg.control.enabled)
    _check_control(cfg.control)
    for i, sink in enumerate(cfg.sinks):  # what a sink needs of the pipeline (events for the push sinks)
        check_pipeline = getattr(sink_registry.get(sink.type), "check_pipeline", None)
        if check_pipeline is not None:
            check_pipeline(sink, cfg, f"sinks.{i}")
    for i, sink in enumerate(cfg.sinks):
        if sink.live is None:
            sink.live = cfg.runtime.mode == "live"
        if sink.rotate_mb is not None and not sink.live:  # an archive file is written whole: it was ignored
            raise ConfigError(f"sinks.{i}.rotate_mb: rotates a live file only; set live: true (or runtime.mode: "
                              "live), or drop rotate_mb")
    _check_stream_ids(cfg.sources)


def _check_stream_ids(sources: list[SourceConfig]) -> None:
    """Given stream ids are distinct (derived ones are checked where sources are listed: sources.check_stream_ids,
    which the run and `blinkflow validate` call)."""
    ids = [s.id for s in sources if s.id]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"sources: duplicate stream id {duplicates[0]!r}; give each source a unique id")


def _check_sink_target(cfg: Config, i: int) -> None:
    """A sink writes a temporary file and renames it over its path: over a device (``/dev/stdout``, as root
    ``/dev/full``) that replaced the device, over an input video the input, over another sink's file that
    sink's output. All three are refused before any work."""
    path = cfg.sinks[i].path
    if not path:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_file():
        raise ConfigError(f"sinks.{i}.path: {path} is not a regular file (a device, pipe or socket); outputs are "
                          "written to a file and renamed over their path: give a file's path")
    folder = next((p for p in target.absolute().parents if p.exists()), None)  # the sink creates the rest
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"sinks.{i}.path: {path} lies under {folder}, which is a file, not a folder; give a path "
                          "in a folder")
    where = target.resolve()
    for j, other in enumerate(cfg.sinks[:i]):
        if other.path and Path(other.path).expanduser().resolve() == where:
            raise ConfigError(f"sinks.{i}.path: {path} is sinks.{j}'s output too; give each sink its own file")
    for j, source in enumerate(cfg.sources):
        if source.type == "file" and source.path and Path(source.path).resolve() == where:
            raise ConfigError(f"sinks.{i}.path: {path} is sources.{j}'s input video; writing the output would replace "
                              "it: give another path")


def _check_sink_settings(sink: SinkConfig, sink_cls: Any, path: str) -> None:
    """A setting of another sink type, given a value of its own, is an error (retries on an mqtt sink, qos on a
    webhook were accepted and ignored): every sink type shares SinkConfig's keys."""
    allowed = vars(sink_cls).get("settings")  # its own list: a subclass of a built-in sink may read more
    if allowed is None:
        return
    defaults = SinkConfig(type=sink.type)
    for name in (f.name for f in dataclasses.fields(SinkConfig)):
        if name != "type" and name not in allowed and getattr(sink, name) != getattr(defaults, name):
            raise ConfigError(f"{path}.{name}: not a setting of a {sink.type} sink; its settings: "
                              f"{', '.join(sorted(allowed)) or 'none'}")


def _check_label_source(source: SourceConfig) -> None:
    """``label.source`` holds the decode settings of every video label reads: a file source's, without the path
    and id label gives each video (another type failed every video with an internal error, a path was ignored)."""
    if source.type != "file":
        raise ConfigError(f"label.source.type: {source.type!r}; label reads video files, so only 'file' (its settings: "
                          "fps, resize, max_frames, decode_threads, motion_vectors, hwaccel)")
    for key in ("path", "id"):
        if getattr(source, key) is not None:
            raise ConfigError(f"label.source.{key}: label sets it for every video it reads; remove it")
    # the checks every source gets (_check_source): an unchecked resize of [0, 0] or [4] crashed the decoder
    # (a segfault), [100000, 100000] asked for a 30 GB frame; hwaccel: cuda with motion_vectors: true ran
    _check_resize(source.resize, "label.source")
    check_options = getattr(source.options, "check", None)
    if check_options is not None:
        check_options("label.source")


def _why_not(path: Path) -> str:
    """Why ``path`` is not the file or folder a source wants: missing, or something else there (a /dev/zero link said "does not
    exist")."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory; give a video file in it (or use a dir source)"
    if path.is_file():
        return "is a file; give its folder (or use a file source)"
    return "is not a regular file (a device, pipe or socket); give a video file"


def _check_resize(resize: list[int] | None, path: str) -> None:
    """A source's ``resize``: [width, height], each 2 to 16384."""
    if resize is not None and (len(resize) != 2 or min(resize) < 2 or max(resize) > 16384):
        raise ConfigError(f"{path}.resize: expected [width, height] between 2 and 16384, got {resize}; "
                          "e.g. resize: [640, 360], or null to keep the videos' size")


def _settle_motion_vectors(cfg: Config) -> None:
    """``motion_vectors: null`` (the default) on a file source: on when something moves results along the decoder's
    vectors (the gate with motion mvs or auto, the segmenter's feature reuse) and the CPU decodes (CUDA's decoder
    exports none). Off by default, the gate copied results it could have moved, with more keyframes, unlike
    every figure of blinkflow bench skip."""
    segment = cfg.stages.get("segment")
    wanted = bool(cfg.gate.enabled and cfg.gate.motion in ("mvs", "auto")) or bool(
        segment is not None and segment.enabled and getattr(segment.options, "feature_reuse", 0))
    for i, source in enumerate([*cfg.sources, cfg.label.source]):  # label's: every video it labels
        options = source.options
        if getattr(options, "motion_vectors", False) is None:
            cuda = getattr(options, "hwaccel", "none") == "cuda"
            options.motion_vectors = wanted and not cuda
            if wanted and cuda:  # said: on a moving camera the gate then reused nothing, with no word why
                where = f"sources.{i}" if i < len(cfg.sources) else "label.source"
                logging.getLogger(__name__).warning(
                    "%s.hwaccel: cuda decodes without the motion vectors the gate's motion compensation (gate.motion) "
                    "and the segmenter's feature reuse move results along: a moving camera saves little; hwaccel: auto "
                    "decodes on the CPU with them", where)


def _check_stages_across(cfg: Config) -> None:
    """Checks a stage class makes across the config (``check_config(cfg, name)``: what it needs before it, the
    stream ids its options name)."""
    from blinkflow.registry import stages as stage_registry

    for name in cfg.enabled_stages():
        check = getattr(stage_registry.get(name), "check_config", None)
        if check is not None:
            check(cfg, name)


def _check_bind_host(section: str, host: str, enabled: bool) -> None:
    """The address an HTTP endpoint binds: '' would listen on every interface, unsaid; a name that does not
    resolve failed only when the run started the endpoint (resolved as the server does: IPv4, passive)."""
    import socket

    if not host.strip():
        raise ConfigError(f"{section}.host: empty; write 0.0.0.0 to listen on every interface, or keep 127.0.0.1")
    if not enabled:
        return
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(unresolved_host(section, host, getattr(exc, "strerror", None) or exc)) from None


def unresolved_host(section: str, host: str, reason: Any) -> str:
    """The one line for an endpoint host that does not resolve (said at load, and by the server binding it)."""
    return (f"{section}.host: {host!r} is not an IPv4 address or name this machine resolves ({reason}); use "
            "127.0.0.1, 0.0.0.0 or the address of an interface")


def _check_control(control: ControlConfig) -> None:
    import ipaddress

    if not control.enabled:
        return
    try:
        loopback = control.host == "localhost" or ipaddress.ip_address(control.host).is_loopback
    except ValueError:
        loopback = False
    if control.auth == "none" and not loopback:
        raise ConfigError(f"control.auth: none on control.host {control.host}: anyone who reaches it could open "
                          "files and URLs; set control.auth: token or bind 127.0.0.1")
    if control.token_file and not Path(control.token_file).expanduser().is_file():
        what = "is a folder, not a file" if Path(control.token_file).expanduser().is_dir() else "does not exist"
        raise ConfigError(f"control.token_file: {control.token_file!r} {what}; write the token there")
    if control.auth == "token" and control.token_file and not read_token_file(control.token_file).strip():
        raise ConfigError(f"control.token_file: {control.token_file!r} is empty: a blank token would let any request "
                          "through; write the token there")


def read_token_file(path: str) -> str:
    """The token file's text (the guard reads it with this too): one line for a file that cannot be read or is
    not UTF-8 (validate passed it with replacement characters, the run then failed with a traceback)."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"control.token_file: cannot read {path!r} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"control.token_file: {path!r} is not UTF-8 text; write the token there as text") from None



def _check_registered(cfg: Config) -> None:
    """Component names are registry names (a new runner, sink or source is one file, no list to edit)."""
    from blinkflow.registry import runners, sinks, sources

    named = [(f"sources.{i}.type", s.type, sources) for i, s in enumerate(cfg.sources)]
    named += [(f"sinks.{i}.type", s.type, sinks) for i, s in enumerate(cfg.sinks)]
    named += [("runtime.runner", cfg.runtime.runner, runners)]
    for path, name, registry in named:
        if name not in registry:
            raise ConfigError(f"{path}: {name!r} is not one of {' | '.join(repr(n) for n in registry.names())}")


def _check_by_source_type(cfg: Config) -> None:
    """Checks a source type registers for itself (``check_config``; live streams check their URLs and the
    control section's stream defaults), so this module imports no source."""
    from blinkflow.registry import sources as source_registry

    # stream defaults set are checked with control off too: a typo there showed only once control was turned on
    kinds = {s.type for s in cfg.sources} | ({"stream"} if cfg.control.enabled or cfg.control.stream_defaults else set())
    for kind in sorted(kinds):
        check = getattr(source_registry.get(kind), "check_config", None)
        if check is not None:
            check(cfg)


#: a stream id names output files, metric labels and log lines
MAX_STREAM_ID_CHARS = 128


def check_stream_id(stream_id: Any, path: str) -> None:
    """One line naming ``path`` for an id that would split a log line or a label (a newline) or is no text."""
    if stream_id is None:
        return
    if not (isinstance(stream_id, str) and 0 < len(stream_id) <= MAX_STREAM_ID_CHARS and stream_id.isprintable()):
        raise ConfigError(f"{path}.id: {stream_id!r} is not a stream id; use 1 to {MAX_STREAM_ID_CHARS} printable "
                          "characters (no newlines or tabs)")


def _check_source(source: SourceConfig, path: str, base_dir: Path) -> None:
    from blinkflow.registry import sources as source_registry

    check_stream_id(source.id, path)
    locator = getattr(source_registry.get(source.type), "locator", None)  # what the type opens: path, url or none
    if locator and not getattr(source, locator):
        raise ConfigError(f"{path}.{locator}: a {source.type} source needs '{locator}'")
    for other in ("path", "url"):
        if other != locator and getattr(source, other) is not None:
            raise ConfigError(f"{path}.{other}: not an option of a {source.type!r} source; "
                              + (f"it opens its {locator}" if locator else "it opens no file or URL"))
    check_options = getattr(source.options, "check", None)
    if check_options is not None:  # the type's own checks on its settings
        check_options(path)
    if source.type in ("file", "dir"):
        resolved = resolve_path(source.path, base_dir)
        if source.type == "file" and not resolved.is_file():
            raise ConfigError(f"{path}.path: file {source.path!r} " + _why_not(resolved))
        if source.type == "dir" and not resolved.is_dir():
            raise ConfigError(f"{path}.path: directory {source.path!r} " + _why_not(resolved))
        source.path = str(resolved)
    if source.type == "glob":
        source.path = _resolved_glob(source.path, base_dir)
    _check_resize(source.resize, path)


def _resolved_glob(pattern: str, base_dir: Path) -> str:
    """A glob pattern as the file and dir sources' paths are: from the working directory, then from the config's
    folder (where it matches nothing from either, the run says so: a shipped config's pattern is a placeholder)."""
    import glob

    def matches(candidate: str) -> bool:
        return any(Path(p).is_file() for p in glob.iglob(candidate, recursive=True))

    expanded = str(Path(pattern).expanduser())
    if Path(expanded).is_absolute() or matches(expanded):
        return expanded
    beside = str(base_dir / expanded)
    return beside if matches(beside) else expanded


def _check_gate(gate: GateConfig, stages: dict[str, Any]) -> None:
    _check_carry_until(gate, stages)
    for name, bound in list(gate.refresh.items()):
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
            raise ConfigError(f"gate.refresh.{name}: expected a number of frames >= 1, got {bound!r}")
        if name in stages and _is_driver_stage(name):
            raise ConfigError(f"gate.refresh.{name}: the {name} stage runs on every frame (in the driver, after the "
                              "carry-over); nothing to refresh, remove it")
        if name in stages:
            if bound >= gate.max_reuse:
                del gate.refresh[name]  # max_reuse refreshes every stage first: this bound never applies
            continue
        known = _gated_stage_names()
        if name not in known:
            raise ConfigError(f"gate.refresh.{name}: unknown stage {name!r}; valid: {', '.join(known)}")
        del gate.refresh[name]  # a bound for a stage this graph does not run: nothing to refresh
    if gate.tiles is not None and (len(gate.tiles) != 2 or not all(1 <= n <= 64 for n in gate.tiles)):
        raise ConfigError(f"gate.tiles: expected [rows, cols] with both in 1..64, got {gate.tiles}; e.g. tiles: [4, 4], or null")
    if gate.enabled:
        _check_gate_objects(gate, stages)
    if gate.region_budget and not (gate.adaptive and gate.tiles):
        missing = "adaptive: true" if not gate.adaptive else "tiles (e.g. tiles: [8, 8])"
        raise ConfigError(f"gate.region_budget: the per-region budget learns from the audits' feedback per tile; "
                          f"set {missing}, or region_budget: false")
    if gate.blur % 2 == 0:
        raise ConfigError(f"gate.blur: expected an odd kernel size (1 = off), got {gate.blur}; e.g. blur: {gate.blur + 1}")
    if gate.adaptive:
        _check_adaptive_bounds(gate)


def _check_gate_objects(gate: GateConfig, stages: dict[str, Any]) -> None:
    """object_weight and object_tiles weigh change by the stream's boxes, and object_tiles grows tiles: accepted
    without a stage that gives boxes (or without tiles), they silently did nothing."""
    from blinkflow.registry import stages as stage_registry

    asked = "object_weight" if gate.object_weight > 1.0 else "object_tiles" if gate.object_tiles else None
    if asked is None:
        return
    boxed = [n for n, s in stages.items() if s.enabled and getattr(stage_registry.get(n), "gives_boxes", False)]
    if not boxed:
        off = "object_weight: 1" if asked == "object_weight" else "object_tiles: false"
        raise ConfigError(f"gate.{asked}: it weighs change by the stream's boxes, and no stage gives boxes; add a "
                          f"detect stage, or set {off}")
    if gate.object_tiles and not gate.tiles:
        raise ConfigError("gate.object_tiles: it grows a partial frame's changed tiles, and gate.tiles is null; set "
                          "tiles (e.g. tiles: [8, 8]), or object_tiles: false")


def _check_adaptive_bounds(gate: GateConfig) -> None:
    """threshold_min <= threshold <= threshold_max: the budget moves the threshold between the two bounds only."""
    if gate.threshold_min > gate.threshold_max:
        raise ConfigError(f"gate.threshold_min: {gate.threshold_min} is above threshold_max ({gate.threshold_max}); "
                          "the adaptive budget keeps the threshold between the two")
    if gate.threshold > gate.threshold_max:
        raise ConfigError(
            f"gate.threshold: {gate.threshold} is above threshold_max ({gate.threshold_max}), the most the "
            f"adaptive budget may raise it to; raise threshold_max, lower the threshold or set adaptive: false"
        )
    if gate.threshold < gate.threshold_min:
        raise ConfigError(
            f"gate.threshold: {gate.threshold} is below threshold_min ({gate.threshold_min}), the least the adaptive "
            f"budget may lower it to (a missed audit would raise it there); lower threshold_min or raise the threshold"
        )


def _check_carry_until(gate: GateConfig, stages: dict[str, Any]) -> None:
    """Factors of at least 1, for stages that exist; a stage that this graph does not run, or that has no
    refresh bound (what caps a carried stage's staleness), is not carried."""
    for name, factor in list(gate.carry_until.items()):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor < float("inf"):
            raise ConfigError(f"gate.carry_until.{name}: expected a factor >= 1 (times the threshold), got {factor!r}")
        known = _gated_stage_names()
        if name not in known:
            raise ConfigError(f"gate.carry_until.{name}: unknown stage {name!r}; valid: {', '.join(known)}")
        if name not in stages or name not in gate.refresh:
            del gate.carry_until[name]


def _gated_stage_names() -> list[str]:
    """The registered stages the gate can skip: not the gate itself, not the driver's (they run on every frame)."""
    from blinkflow.registry import stages as stage_registry

    return [n for n in stage_registry.names() if n != "gate" and not _is_driver_stage(n)]


def _is_driver_stage(name: str) -> bool:
    from blinkflow.registry import stages as stage_registry

    return bool(stage_registry.get(name).driver)


def _check_ray_devices(cfg: Config) -> None:
    """Under the Ray runner a stage's actor sees only the GPUs Ray grants it (resources.num_gpus), numbered from
    cuda:0: another index names no device there, and a GPU asked for without num_gpus is none at all."""
    import math
    import re

    if cfg.runtime.runner != "ray":
        return
    for name, stage in cfg.stages.items():
        if not stage.enabled or not stage.device.startswith("cuda") or _is_driver_stage(name):
            continue  # a driver stage (track, events) runs in the driver, which sees every GPU
        granted = math.ceil(stage.resources.num_gpus)
        if granted == 0:
            raise ConfigError(f"stages.{name}.device: {stage.device!r}, but resources.num_gpus is 0, so Ray gives its "
                              f"actor no GPU; set stages.{name}.resources.num_gpus (1, or 0.5 to share one)")
        index = re.fullmatch(r"cuda:(\d+)", stage.device)
        if index and int(index.group(1)) >= granted:
            raise ConfigError(f"stages.{name}.device: {stage.device!r}, but its actor sees only the {granted} GPU(s) "
                              f"Ray grants it (resources.num_gpus), as cuda:0..{granted - 1}; use device: cuda "
                              "(Ray picks the GPU)")


def _splits_by_depth(name: str) -> bool:
    """Whether the registered stage runs its model through a depth-parallel executor (``set_model_executor``)."""
    from blinkflow.registry import stages as stage_registry

    return hasattr(stage_registry.get(name), "set_model_executor")


def _check_stage(name: str, stage: StageConfig, base_dir: Path) -> None:
    import re

    from blinkflow.models.registry import get_model_entry
    from blinkflow.errors import RegistryError

    if not re.fullmatch(DEVICE_PATTERN, stage.device):
        raise ConfigError(f"stages.{name}.device: {stage.device!r} is not 'cpu', 'cuda:N' or 'auto'")
    if stage.compile != "off" and stage.depth_parallel > 1:
        raise ConfigError(f"stages.{name}.compile: {stage.compile!r} compiles the whole model, which depth_parallel: "
                          f"{stage.depth_parallel} splits across actors; use one or the other")
    if stage.depth_parallel > 1 and not _splits_by_depth(name):
        raise ConfigError(f"stages.{name}.depth_parallel: {stage.depth_parallel}, but the {name} stage cannot split its "
                          f"model by depth (Ray would hold {stage.depth_parallel} slice actors idle); set depth_parallel: 1")
    if stage.model is not None and name != "gate":
        try:
            get_model_entry(stage.model, task=name)
        except RegistryError as exc:
            raise ConfigError(f"stages.{name}.model: {exc}") from None
    check_options = getattr(stage.options, "check", None)
    if check_options is not None:  # a stage's own cross-field checks on its options
        check_options(f"stages.{name}.options")
    for resource, amount in stage.resources.custom.items():  # Ray refused them only when the actors started
        if not (math.isfinite(amount) and amount >= 0):
            raise ConfigError(f"stages.{name}.resources.custom.{resource}: {amount} is not an amount; give 0 or more "
                              "(e.g. 1 to pin the stage to nodes started with that resource)")
    weights = stage.weights
    if weights is not None and not weights.strip():  # '' resolved to the config's folder, then "file '.'"
        raise ConfigError(f"stages.{name}.weights: {weights!r} names no weights; use null (random init), shipped, "
                          "or the path of a .pt file")
    if weights and (weights.endswith((".pt", ".pth")) or "/" in weights):
        resolved = resolve_path(weights, base_dir)
        if not resolved.is_file():
            raise ConfigError(f"stages.{name}.weights: file {weights!r} does not exist")
        stage.weights = str(resolved)

