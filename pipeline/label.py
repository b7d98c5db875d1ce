"""Archive batch-labelling: ``blinkflow label INPUT... --out DIR``.

Every video is labelled on its own by the local runner (or the threaded one, when
``runtime.runner: threaded``), spread over the Ray
cluster as one task per video (``label.executor: ray``) or one after another in
this process (``local``). A task returns its outputs' bytes, so workers need
no shared file system; only this driver writes into DIR.

Exactly-once and resumable:

1. A finished video's outputs are written as ``.<name>.partial`` files,
   fsynced and renamed into place (an mp4 overlay's name and sha256 are
   first appended to ``.blinkflow-label.outputs``: a lost manifest must not
   make it look like a user's video that label may not write over).
2. Then ``manifest.json`` (rewritten atomically) records the video with the
   sha256 of each output, its frame counts, time and status.

A crash between the two leaves outputs that the manifest does not vouch for:
the re-run labels that video again and replaces them whole, so no record is
ever duplicated or lost. A re-run skips the videos whose recorded outputs are
present with matching checksums; a missing or changed output is redone. A
corrupt or unreadable video is recorded as ``failed`` and the others go on;
the exit code is 1 when any video failed. ``summary.json`` (and the printed
table) give per-video frames, outcomes, time and fps.

Interrupted (SIGINT/SIGTERM): the first signal starts no further video; the
videos in progress finish and are recorded, ``summary.json`` lists the rest as
``not_started`` and the run exits 128 + the signal (130, 143). A re-run goes on
with them. A second signal aborts at once, as a crash would (the re-run redoes
the videos that were in progress).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob as globlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from blinkflow.errors import BlinkflowError, SourceError, first_line
from blinkflow.files import VIDEO_SUFFIXES, left_out, safe_name, sha256_bytes, sha256_file, write_atomic
from blinkflow.redact import redact_obj, redact_text
from blinkflow.sinks import JsonlSink, to_record
from blinkflow.sinks.events import EventsJsonlSink

log = logging.getLogger(__name__)

ARCHIVE_CONFIG = "archive.yaml"  # a shipped config (blinkflow.resources)
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MANIFEST_VERSION = 1
OUTPUT_NAMES = {"jsonl": "{id}.jsonl", "coco": "{id}.coco.json", "mp4": "{id}.mp4"}
#: written beside the others when the config runs the events stage (docs/tracking.md)
EVENTS_OUTPUT = "{id}.events.jsonl"
PROGRESS_EVERY_S = 0.2
#: stage settings that change how a run goes, not what it outputs (left out of the config digest)
RUN_ONLY_STAGE_KEYS = frozenset({"replicas", "resources", "warmup", "max_wait_ms"})
#: more of them, left out since digests of before kept them (such a digest is still accepted: _legacy_digest)
SPEED_ONLY_STAGE_KEYS = frozenset({"batch", "compile", "channels_last", "depth_parallel"})
SPEED_ONLY_SOURCE_KEYS = frozenset({"queue_size", "decode_threads"})


@dataclass
class Video:
    id: str
    path: Path

    def outputs(self, formats: list[str]) -> dict[str, str]:
        """Format to output file name, e.g. {"jsonl": "bikes.jsonl"}."""
        return {fmt: OUTPUT_NAMES[fmt].format(id=self.id) for fmt in formats}


# --------------------------------------------------------------------------- inputs


def find_videos(inputs: list[str], out_dir: Path | None = None) -> list[Video]:
    """Files, directories (recursively) and globs, deduplicated, with unique file-safe ids. Label's own files in
    ``out_dir`` (the outputs its manifest lists, its hidden scratch and partial files) are not inputs: an output
    folder inside an input folder had its overlays labelled on every run."""
    outside = _outside(out_dir)
    paths: list[Path] = []
    others = _OtherRuns(out_dir)
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = [p for p in _files_under(path, others) if outside(p)]
            found = sorted(p for p in files if p.suffix.lower() in VIDEO_SUFFIXES)
            if said := left_out(path, files):
                log.warning("%s", said)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise BlinkflowError(f"{item}: no such file or directory, and no file matches it as a glob")
            # label writes its outputs straight into --out: 'archive/**/*.mp4' matched another run's overlays
            found = [p for p in found if outside(p) and not others.hold(p.parent)]
        paths.extend(found)
    if others.found:
        log.info("left out %d folder(s) of other blinkflow label runs (their outputs are no inputs): %s",
                 len(others.found), ", ".join(map(str, others.found)))
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    if not unique:
        raise BlinkflowError(f"{' '.join(inputs)}: no video files found; pass files, directories or globs")
    return [Video(video_id, path) for video_id, path in zip(_unique_ids(unique), unique)]


class _OtherRuns:
    """Which folders are other label runs' output folders (labelling a/ into a/labels-b labelled a/labels-a's
    overlays as videos, and renamed the real videos' ids); each folder is looked at once, and this run's own
    (``out_dir``, which _outside handles) is none."""

    def __init__(self, out_dir: Path | None) -> None:
        self.own = Path(out_dir).expanduser().resolve() if out_dir is not None else None
        self.checked: dict[Path, bool] = {}

    def hold(self, folder: Path) -> bool:
        if folder not in self.checked:
            self.checked[folder] = folder.resolve() != self.own and _is_label_folder(folder)
        return self.checked[folder]

    @property
    def found(self) -> list[Path]:
        return [folder for folder, is_one in self.checked.items() if is_one]


def _files_under(folder: Path, others: _OtherRuns) -> Iterator[Path]:
    """The files in and under ``folder``, but not in another label run's output folder below it (``folder``
    itself, named as an input, is never left out)."""
    for top, dirs, files in os.walk(folder):
        here = Path(top)
        if here != folder and others.hold(here):
            dirs.clear()
            continue
        yield from (here / name for name in files if (here / name).is_file())


def _is_label_folder(folder: Path) -> bool:
    """Whether ``folder`` is a blinkflow label output folder: it has the run's lock file, or a manifest label
    wrote (a manifest.json of something else, a data set's, does not count)."""
    if (folder / LOCK_NAME).is_file():
        return True
    try:
        document = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and {"config_digest", "videos"} <= document.keys()


def _outside(out_dir: Path | None) -> Callable[[Path], bool]:
    """Whether a found file is not one of label's own in ``out_dir`` (videos may sit in or under it too)."""
    if out_dir is None:
        return lambda path: True
    root = Path(out_dir).expanduser().resolve()
    ours = _ours(root)

    def outside(path: Path) -> bool:
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            return True
        inside = resolved.relative_to(root).parts
        return not (inside[0].startswith(".") or (len(inside) == 1 and ours(inside[0])))

    return outside


def _ours(root: Path) -> Callable[[str], bool]:
    """Whether the file of that name in ``root`` is label's own output: one its manifest lists, or a video label
    wrote there with these very bytes (OUTPUTS_LOG), which a lost manifest (deleted, or an interrupted
    --restart's) does not forget. A video a user put there, under any name, is not."""
    listed, written = _listed_outputs(root), _written_videos(root)

    def ours(name: str) -> bool:
        if name in listed:
            return True
        if name not in written or not (root / name).is_file():
            return False
        return sha256_file(root / name) in written[name]

    return ours


def _listed_outputs(root: Path) -> set[str]:
    """The output files the folder's manifest lists (none when it has no readable one)."""
    try:
        videos = json.loads((root / MANIFEST).read_text())["videos"]
        return {name for entry in videos.values() for key in ("outputs", "kept_outputs") for name in entry.get(key, {})}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


#: in --out, one JSON line per video file (an mp4 overlay) label writes there, with its sha256, appended before the
#: file is: the manifest alone forgot the overlays of an earlier run once it was deleted or an interrupted --restart
#: replaced it, and every later run refused to write over them as if they were someone's videos
OUTPUTS_LOG = ".blinkflow-label.outputs"
#: the digests kept per name when the log is compacted (a crash between the log and the file leaves one extra)
OUTPUTS_LOG_KEEP = 4


def _written_videos(root: Path) -> dict[str, list[str]]:
    """Name -> sha256s (oldest first) of the video files label wrote into ``root``, from OUTPUTS_LOG."""
    try:
        lines = (root / OUTPUTS_LOG).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    written: dict[str, list[str]] = {}
    for line in lines:
        try:
            item = json.loads(line)
            name, digest = item["name"], item["sha256"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash while it was appended
        if isinstance(name, str) and isinstance(digest, str):
            digests = written.setdefault(name, [])
            if digest in digests:
                digests.remove(digest)
            digests.append(digest)
    return written


def _note_written(root: Path, name: str, digest: str) -> None:
    """Append ``name``'s digest to OUTPUTS_LOG, durably, before the file itself is committed."""
    with open(root / OUTPUTS_LOG, "a") as handle:
        handle.write(json.dumps({"name": name, "sha256": digest}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _compact_written(root: Path) -> None:
    """Rewrite OUTPUTS_LOG whole (under the lock, before the run appends): without its torn lines, the names no
    longer on disk, and all but the newest digests of each, so that it does not grow with every run."""
    if not (root / OUTPUTS_LOG).is_file():
        return
    written = _written_videos(root)
    lines = [json.dumps({"name": name, "sha256": digest}) for name, digests in sorted(written.items())
             if (root / name).is_file() for digest in digests[-OUTPUTS_LOG_KEEP:]]
    write_atomic(root / OUTPUTS_LOG, "".join(line + "\n" for line in lines))


def _unique_ids(paths: list[Path]) -> list[str]:
    """The file stem, lengthened with parent folders where stems collide (case aside: one folder may sit on a
    case-insensitive disk), as far as that tells them apart; those no folder tells apart (``clip.mp4`` and
    ``clip.mkv``, ``a b`` and ``a_b``) are numbered instead of spelling out their whole path."""
    depth = {p: 1 for p in paths}

    def name(p: Path, parts: int | None = None) -> str:
        tail = p.with_suffix("").parts[-(parts or depth[p]):]
        return safe_name("-".join(tail), "video")

    def whole(p: Path) -> str:
        return name(p, len(p.parts)).casefold()

    while True:
        names = [name(p).casefold() for p in paths]
        groups: dict[str, list[Path]] = {}
        for p, n in zip(paths, names):
            groups.setdefault(n, []).append(p)
        clashing = {p for group in groups.values() if len(group) > 1 for p in group
                    if depth[p] < len(p.parts) and any(whole(q) != whole(p) for q in group)}
        if not clashing:
            break
        for p in clashing:
            depth[p] += 1
    names = [name(p) for p in paths]
    taken: set[str] = set()
    ids = []
    for n in names:  # still the same (same path tail, other suffix; "a b" and "a_b"): number them, into free names
        candidate, number = n, 1
        while _clashes(candidate, taken):
            number += 1
            candidate = f"{n}-{number}"
        taken.add(candidate.casefold())
        ids.append(candidate)
    return ids


def _clashes(video_id: str, taken: set[str]) -> bool:
    """Whether ``video_id`` or its outputs would be another video's: ``x.events.jsonl`` is both the events of
    ``x`` and the records of ``x.events``."""
    events = EVENTS_OUTPUT.format(id="")[: -len(".jsonl")]  # ".events"
    video_id = video_id.casefold()  # taken holds casefolded ids: Clip and clip are one file on some disks
    return (video_id in taken or f"{video_id}{events}" in taken
            or (video_id.endswith(events) and video_id[: -len(events)] in taken))


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """``DIR/manifest.json``: one entry per video that finished (done or failed)."""

    path: Path
    config_digest: str
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per model stage, the sha256 of the weights the outputs were made with (the config names a path or
    #: "shipped": the file behind it may change)
    weights: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path, config_digest: str, restart: bool, weights: dict[str, str] | None = None,
             legacy_digest: str | None = None) -> "Manifest":
        path = out_dir / MANIFEST
        weights = dict(weights or {})
        if restart or not path.exists():
            return cls(path, config_digest, weights=weights)
        try:
            data = json.loads(path.read_text())
            videos = dict(data["videos"])
            recorded = data["config_digest"]
            recorded_weights = data.get("weights")
            if not all(_entry_ok(entry) for entry in videos.values()):
                raise ValueError("an entry is not what label writes")
        except (OSError, ValueError, KeyError, TypeError):  # a folder, bad bytes, a hand edit
            raise BlinkflowError(
                f"{path}: unreadable manifest; delete it or pass --restart to label everything again"
            ) from None
        if videos and recorded not in (config_digest, legacy_digest):  # legacy: a digest made before this release
            raise BlinkflowError(
                f"{out_dir} was labelled with another config or format; use the same --config/--set/--format, "
                "a new --out, or --restart to label everything again (labelled by a release before 2026-12-05 with "
                "the gate on? its videos exported no motion vectors then: --set label.source.motion_vectors=false)"
            )
        changed = sorted(s for s, digest in (recorded_weights or {}).items() if weights.get(s, digest) != digest)
        if videos and changed:
            raise BlinkflowError(
                f"{out_dir} was labelled with other weights for {', '.join(changed)} (the file behind the config's "
                "weights: changed); label into a new --out, or --restart to label everything again with these")
        return cls(path, config_digest, videos, weights)

    def assign(self, videos: list[Video]) -> list[Video]:
        """Ids that hold across runs: a video the manifest knows keeps the id it was labelled under (whatever the
        other inputs now, or their order); a new one takes its fresh id unless that is, or clashes with, an id
        of the manifest or of this batch (another file's: day1/cam1.mp4 labelled before day2/cam1.mp4 went over
        its labels), and is numbered then."""
        by_source = {entry["source"]: video_id for video_id, entry in self.videos.items()}
        final = {v.path: by_source[str(v.path)] for v in videos if str(v.path) in by_source}
        taken = {video_id.casefold() for video_id in self.videos}
        for video in videos:
            if video.path in final:
                continue
            others = taken | {i.casefold() for i in final.values()} | {
                v.id.casefold() for v in videos if v.path not in final and v.path != video.path}
            video_id, number = video.id, 1
            while _clashes(video_id, others):
                number += 1
                video_id = f"{video.id}-{number}"
            if video_id != video.id:
                log.info("%s: id %s is another video's in %s; labelled as %s", video.path, video.id,
                         self.path.parent, video_id)
            final[video.path] = video_id
        return [Video(final[v.path], v.path) for v in videos]

    def backfill(self, videos: list[Video], fingerprints: dict[str, dict[str, int]]) -> None:
        """Entries of an earlier release, without their source's size and time: recorded now (for the videos
        this run skips), so that a later change of the file is noticed; with the weights, written once."""
        missing = [v for v in videos if v.id in self.videos and not all(k in self.videos[v.id] for k in FINGERPRINT_KEYS)
                   and self.videos[v.id].get("source") == str(v.path)]
        for video in missing:
            self.videos[video.id].update(fingerprints[video.id])
        if missing:
            self.save()

    def finished(self, video: Video, out_dir: Path, retry_failed: bool, fingerprint: dict[str, int] | None = None) -> bool:
        """True when the video needs no work: done (outputs verified), or failed or partial and not to be retried,
        and its source is the file it was labelled from (same size and modification time)."""
        entry = self.videos.get(video.id)
        if entry is None or entry.get("source") != str(video.path):
            return False
        recorded = {key: entry[key] for key in FINGERPRINT_KEYS if key in entry}
        if fingerprint is not None and recorded and recorded != {k: fingerprint[k] for k in recorded}:
            log.warning("%s: %s changed since it was labelled (size or modification time); labelling it again",
                        video.id, video.path)
            return False
        if entry["status"] == "failed" and retry_failed:
            return False
        if entry["status"] == "partial" and (retry_failed or fingerprint is None or not recorded):
            # a truncated file is labelled again when it may have been re-copied whole: when asked to, or when it
            # cannot tell (no size and time recorded); the same size and time are the same truncated file
            return False
        for name, digest in entry["outputs"].items():
            target = out_dir / name
            if not target.is_file() or sha256_file(target) != digest:
                log.warning("%s: output %s is missing or changed; labelling the video again", video.id, name)
                return False
        return True

    def record(self, video_id: str, entry: dict[str, Any]) -> None:
        self.videos[video_id] = entry
        self.save()

    def save(self) -> None:
        document = {"version": MANIFEST_VERSION, "config_digest": self.config_digest, "videos": self.videos}
        if self.weights:
            document["weights"] = self.weights
        write_atomic(self.path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())


_COUNTS = {"frames": int, "outcomes": dict}


def _entry_ok(entry: Any) -> bool:
    """A manifest entry as ``record`` writes it: what resuming and the summary read from it."""
    return (isinstance(entry, dict) and isinstance(entry.get("source"), str)
            and entry.get("status") in ("done", "failed", "partial")
            and isinstance(entry.get("outputs"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in entry["outputs"].items())
            and all(isinstance(entry.get(key), kind) for key, kind in _COUNTS.items())
            and all(isinstance(count, int) for count in entry["outcomes"].values()))


#: what a manifest entry records of its source: a re-copied or grown file is labelled again
FINGERPRINT_KEYS = ("source_size", "source_mtime_ns")


def source_fingerprint(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def config_digest(cfg: Any, formats: list[str], legacy: bool = False) -> str:
    """What determines the outputs: stages, gate, decode settings and formats (not parallelism, placement,
    batching, compilation, warm-up or the decoder's queue, nor the order of the formats: changing those must
    not label an archive again). ``legacy``: the digest of earlier releases, which kept them."""
    stage_skip = RUN_ONLY_STAGE_KEYS if legacy else RUN_ONLY_STAGE_KEYS | SPEED_ONLY_STAGE_KEYS
    source_skip = frozenset() if legacy else SPEED_ONLY_SOURCE_KEYS
    relevant = {
        "gate": {k: v for k, v in dataclasses.asdict(cfg.gate).items() if k not in RUN_ONLY_STAGE_KEYS},
        "stages": {name: {k: v for k, v in dataclasses.asdict(stage).items() if k not in stage_skip}
                   for name, stage in cfg.stages.items()},
        "source": _source_settings(cfg.label.source, source_skip),
        "formats": formats if legacy else sorted(formats),
    }
    return sha256_bytes(json.dumps(relevant, sort_keys=True, default=str).encode())[:16]


def _refuse_writing_over_inputs(videos: list[Video], out_dir: Path, formats: list[str]) -> None:
    """Labelling in place (``--out`` the videos' own folder) with mp4 overlays would write ``<id>.mp4`` over the
    video of that name, an input of this run or any video there that is not label's own output."""
    inputs = {v.path for v in videos}
    ours = _ours(out_dir.expanduser().resolve())
    for video in videos:
        for name in video.outputs(formats).values():
            target = (out_dir / name).resolve()
            if target in inputs:
                raise BlinkflowError(f"--out {out_dir}: {video.id}'s output {name} would be written over the input "
                                     f"{target}; choose another --out, or leave mp4 out of --format")
            if target.suffix.lower() in VIDEO_SUFFIXES and target.is_file() and not ours(name):
                raise BlinkflowError(f"--out {out_dir}: {video.id}'s output {name} would be written over {target}, a "
                                     "video this run does not label; choose another --out, or leave mp4 out of --format")


#: blinkflow.files.atomic_path's temporary name: ".<name>.<pid>.partial<name's suffix>"
_PARTIAL_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.partial(?P<suffix>\.[^.]*)?")


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete the temporary files a crash while committing left in ``out_dir`` (nothing else cleared them). The
    lock is ours, so no label run writes them; one of a live process (another writer's, not label's) is kept."""
    for path in out_dir.iterdir():
        match = _PARTIAL_NAME.fullmatch(path.name)
        if (match is None or (match["suffix"] or "") != Path(match["name"]).suffix or not path.is_file()
                or path.is_symlink()):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            log.info("%s: removed %s, left by a run that crashed while committing it", out_dir, path.name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (a pid out of range is none either)
        return False
    except OSError:
        return True  # someone else's process, or a pid we cannot ask about: keep its file
    return True


def _source_settings(source: Any, skip: frozenset[str]) -> dict[str, Any]:
    settings = dataclasses.asdict(source)
    if skip and isinstance(settings.get("options"), dict):
        settings["options"] = {k: v for k, v in settings["options"].items() if k not in skip}
    return settings


def weights_digests(cfg: Any) -> dict[str, str]:
    """Per enabled model stage, the sha256 of the weights file its ``weights:`` resolves to now (its pin when
    it has one); a value that does not resolve (the run will say why) stands as written."""
    from blinkflow.models.weights import resolve_weights
    from blinkflow.registry import stages as stage_registry

    digests = {}
    for name in cfg.enabled_stages():
        stage = cfg.stages[name]
        options = getattr(stage, "options", None)
        if getattr(stage, "weights", None):
            model = stage.model or getattr(stage_registry.get(name), "default_model", None) or ""
            digests[name] = _weights_digest(resolve_weights, stage.weights, name, model)
        if getattr(options, "reid_weights", None) and getattr(options, "appearance_weight", 0) > 0:  # track's re-id
            digests[f"{name}.reid"] = _weights_digest(resolve_weights, options.reid_weights, "reid", options.reid_model)
    return digests


def _weights_digest(resolve: Callable[..., Any], weights: str, stage: str, model: str) -> str:
    try:
        spec = resolve(weights, stage=stage, model_name=model)
        digest = spec.sha256 or (sha256_file(spec.path) if spec.path is not None and spec.path.is_file() else None)
    except Exception:  # noqa: BLE001 - resolved for real (and refused in one line) when the stage sets up
        digest = None
    return digest or str(weights)


# --------------------------------------------------------------------------- one video (in a worker)


def label_one(job: dict[str, Any], progress: Callable[[int, int | None], None] | None = None) -> dict[str, Any]:
    """Label one video into a private folder with the local runner (the threaded one when ``runtime.runner`` is
    ``threaded``: its stages overlap, which pays with a GPU); return its stats and output bytes.

    Runs inside a Ray task (or in-process for the local executor); never
    raises for a bad video: the failure is in the returned ``error``.
    """
    from blinkflow.config import SinkConfig
    from blinkflow.runners.local import LocalRunner
    from blinkflow.runners.threaded import ThreadedRunner

    cfg, video, formats = job["cfg"], job["video"], job["formats"]
    previous_threads = _limit_torch_threads(job.get("threads", 1))
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="blinkflow-label-", dir=job.get("scratch")) as scratch:
            names = video.outputs(formats)
            if "events" in cfg.enabled_stages():
                names["events"] = EVENTS_OUTPUT.format(id=video.id)
            sinks = [_build_sink(fmt, SinkConfig(type=fmt, path=str(Path(scratch) / name)))
                     for fmt, name in names.items()]
            total = probe_frame_count(video.path, cfg.sources[0])
            done = [0, 0.0]

            def on_result(_result: Any) -> None:
                done[0] += 1
                if progress is not None and time.monotonic() - done[1] >= PROGRESS_EVERY_S:
                    done[1] = time.monotonic()
                    progress(done[0], total)

            runner = ThreadedRunner if cfg.runtime.runner == "threaded" else LocalRunner
            summary = runner(cfg, sinks=sinks, on_result=on_result).run()
            if progress is not None:
                progress(done[0], done[0])
            if summary.accounting.source_errors and not summary.totals["decoded"]:
                # nothing decoded: the source's own words (the mp4 sink writes no file for no frames, and reading
                # it gave a FileNotFoundError traceback instead of "not a readable video")
                return _failed("; ".join(summary.accounting.source_errors), started)
            outputs = {name: (Path(scratch) / name).read_bytes() for name in names.values()}
    except SourceError as exc:
        return _failed(str(exc), started)
    except BlinkflowError:
        raise  # a config, stage or sink problem is the batch's, not this video's: stop with its message
    except Exception as exc:  # noqa: BLE001 - one video's bug must not stop the batch; it is reported
        log.exception("%s: labelling failed", video.id)
        return _failed(f"{type(exc).__name__}: {exc}", started)
    finally:
        _limit_torch_threads(previous_threads)
    return _stats(summary, outputs)


def _stats(summary: Any, outputs: dict[str, bytes]) -> dict[str, Any]:
    totals = summary.totals
    errors = list(summary.accounting.source_errors)
    if totals["failed"]:
        errors.append(f"{totals['failed']} frames failed in a stage (see the records' error field)")
    truncated = bool(summary.accounting.truncated)  # cut short (typed by the source): partial, labelled again
    # frames failed in a stage beside good ones: partial too (written, each failed frame's record saying why;
    # throwing the video's good labels away hid those records and relabelled it on every run for nothing)
    failed, readable = totals["failed"], truncated or not summary.accounting.source_errors
    partial = (truncated and not failed) or (failed and readable and totals["decoded"] > failed)
    status = "done" if summary.ok else "partial" if partial else "failed"
    return {
        "status": status, "error": "; ".join(errors) or None,
        "frames": totals["decoded"], "outcomes": {k: v for k, v in totals.items() if k != "decoded"},
        "seconds": round(summary.elapsed_s, 3), "setup_s": round(summary.setup_s, 3),
        "fps": round(totals["decoded"] / summary.processing_s, 2) if totals["decoded"] else 0.0,
        "outputs": outputs,
    }


def _failed(error: str, started: float) -> dict[str, Any]:
    return {"status": "failed", "error": error, "frames": 0, "outcomes": {},
            "seconds": round(time.perf_counter() - started, 3), "setup_s": 0.0, "fps": 0.0, "outputs": {}}


def _build_sink(fmt: str, cfg: Any) -> Any:
    from blinkflow.sinks import build_sinks

    if fmt == "jsonl":
        return StableJsonlSink(cfg)
    return StableEventsSink(cfg) if fmt == "events" else build_sinks([cfg])[0]


def _limit_torch_threads(threads: int) -> int:
    """Same thread count in every executor, so float reductions, and the outputs, are the same."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return threads
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    return before


def probe_frame_count(path: Path, source: Any) -> int | None:
    """The container's frame count (for the progress bar), or None when unknown or resampled."""
    if source.fps is not None:
        return None
    try:
        import av

        with av.open(str(path), metadata_errors="ignore") as container:
            video = container.streams.best("video")  # the main one, as the source decodes
            count = video.frames if video is not None else 0
    except Exception:  # noqa: BLE001 - only a progress-bar hint; decoding reports real damage
        return None
    if count and source.max_frames:
        count = min(count, source.max_frames)
    return count or None


class StableJsonlSink(JsonlSink):
    """JSONL without the wall-clock latency field, so a re-run gives byte-identical files."""

    def write(self, result: Any) -> None:
        record = to_record(result, self.cfg.include_dense)
        record.pop("latency_ms", None)
        record.pop("ts", None)  # wall clock too
        if isinstance(record.get("events"), list):  # each event's decode time as well
            record["events"] = _without_wall_clock(record["events"])
        self.handle.write(json.dumps(record, separators=(",", ":")))
        self.handle.write("\n")
        self.count += 1


class StableEventsSink(EventsJsonlSink):
    """The events file without the wall clock, reproducible as the records are."""

    def lines(self, result: Any) -> list[dict[str, Any]]:
        return _without_wall_clock(super().lines(result))


def _without_wall_clock(events: list[Any]) -> list[Any]:
    """Events without their ``ts`` (the wall clock of decoding, which differs from run to run and executor to
    executor; ``pts`` places them in the video)."""
    return [{k: v for k, v in event.items() if k != "ts"} if isinstance(event, dict) else event for event in events]


# --------------------------------------------------------------------------- the batch (driver)


@dataclass
class LabelRun:
    """One ``blinkflow label`` invocation."""

    videos: list[Video]
    out_dir: Path
    cfg: Any
    formats: list[str]
    progress: bool = True
    restart: bool = False
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: once set, no further video starts; those in progress finish (a graceful stop, e.g. on SIGTERM)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> dict[str, Any]:
        """Label what is not finished yet; write summary.json; return the summary."""
        if self.cfg.metrics.enabled:  # accepted by the config, served by nothing here: say so, not silently
            log.warning("metrics.enabled: blinkflow label serves no metrics (its progress is in summary.json and "
                        "manifest.json); for a /metrics endpoint over an archive, `blinkflow run` a glob source")
        with output_lock(self.out_dir):
            return self._run()

    def _run(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.scratch = self.out_dir / ".scratch"
        shutil.rmtree(self.scratch, ignore_errors=True)  # the lock is ours: any scratch left is a crashed run's
        self.scratch.mkdir()
        _remove_stale_partials(self.out_dir)
        _compact_written(self.out_dir)
        self.manifest = Manifest.load(self.out_dir, config_digest(self.cfg, self.formats), self.restart,
                                      weights_digests(self.cfg), config_digest(self.cfg, self.formats, legacy=True))
        self.videos = self.manifest.assign(self.videos)
        _refuse_writing_over_inputs(self.videos, self.out_dir, self.formats)
        self.fingerprints = {v.id: source_fingerprint(v.path) for v in self.videos}
        retry = self.cfg.label.retry_failed
        todo = [v for v in self.videos
                if not self.manifest.finished(v, self.out_dir, retry, self.fingerprints[v.id])]
        self.manifest.backfill([v for v in self.videos if v not in todo], self.fingerprints)
        for video in self.videos:
            if video not in todo:
                self.results[video.id] = {**self.manifest.videos[video.id], "skipped": True}
        with _Bars(len(self.videos), len(self.videos) - len(todo), self.progress) as bars:
            if self.cfg.label.executor == "local":
                self._run_local(todo, bars)
            elif todo:
                self._run_ray(todo, bars)
        shutil.rmtree(self.scratch, ignore_errors=True)
        summary = self._summary(time.perf_counter() - started)
        write_atomic(self.out_dir / SUMMARY, (json.dumps(redact_obj(summary), indent=1) + "\n").encode())
        return summary

    def _job(self, video: Video) -> dict[str, Any]:
        from blinkflow.config import SourceConfig

        source = dataclasses.replace(self.cfg.label.source, type="file", path=str(video.path), id=video.id)
        assert isinstance(source, SourceConfig)
        # an archive is labelled in archive mode whatever the config says: live mode drops frames under load,
        # which a label must not (an action stage's hold was settled when the config loaded, and is in the digest)
        runtime = dataclasses.replace(self.cfg.runtime, mode="archive")
        cfg = dataclasses.replace(self.cfg, sources=[source], sinks=[], runtime=runtime)
        job = {"cfg": cfg, "video": video, "formats": self.formats, "threads": max(1, int(self.cfg.label.task_cpus))}
        if self.cfg.label.executor == "local":  # a crash leaves its scratch here, cleared by the next run
            job["scratch"] = str(self.scratch)
        return job

    def _run_local(self, todo: list[Video], bars: "_Bars") -> None:
        for video in todo:
            if self.stop.is_set():
                return
            result = label_one(self._job(video), lambda done, total, v=video.id: bars.video(v, done, total))
            self._finish(video, result, bars)

    def _run_ray(self, todo: list[Video], bars: "_Bars") -> None:
        import ray

        from blinkflow.ray_session import ray_session
        from blinkflow.runners.ray import ray_cluster

        with ray_session(*ray_cluster(self.cfg, [])):
            board = ray.remote(num_cpus=0)(ProgressBoard).remote()
            task = ray.remote(_ray_label_one).options(num_cpus=self.cfg.label.task_cpus, max_retries=1)
            cpus = ray.cluster_resources().get("CPU", 1)
            if self.cfg.label.task_cpus > cpus:  # no node could ever run a task: it waited forever, silently
                raise BlinkflowError(f"label.task_cpus: {self.cfg.label.task_cpus:g} CPUs a video, but the Ray cluster "
                                     f"has {cpus:g}; lower label.task_cpus (or runtime.num_cpus' cap)")
            parallel = self.cfg.label.parallel or max(1, int(cpus // max(self.cfg.label.task_cpus, 1e-3)))
            queue, pending = deque(todo), {}
            while pending or (queue and not self.stop.is_set()):
                while queue and len(pending) < parallel and not self.stop.is_set():
                    video = queue.popleft()
                    pending[task.remote(self._job(video), board)] = video
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S)
                for video_id, (done, total) in ray.get(board.snapshot.remote()).items():
                    bars.video(video_id, done, total)
                for ref in ready:
                    self._finish(pending.pop(ref), _ray_result(ref), bars)

    def _finish(self, video: Video, result: dict[str, Any], bars: "_Bars") -> None:
        """Commit the outputs, then the manifest entry (the order that makes a crash harmless)."""
        outputs = result.pop("outputs")
        if result["status"] == "failed":
            outputs = {}  # empty files of a video that failed must not replace the good ones of an earlier run
        for name, data in outputs.items():
            if Path(name).suffix.lower() in VIDEO_SUFFIXES:  # logged first: a crash after it leaves it ours
                _note_written(self.out_dir, name, sha256_bytes(data))
            write_atomic(self.out_dir / name, data)
        entry = {**result, "source": str(video.path), "outputs": {n: sha256_bytes(d) for n, d in outputs.items()},
                 **self.fingerprints.get(video.id, {})}
        if result["status"] == "failed":  # an earlier run's files stay on disk, and stay ours (not someone's videos)
            before = self.manifest.videos.get(video.id) or {}
            kept = {**before.get("kept_outputs", {}), **before.get("outputs", {})}
            kept = {name: digest for name, digest in kept.items() if (self.out_dir / name).is_file()}
            if kept:
                entry["kept_outputs"] = kept
        self.manifest.record(video.id, entry)
        self.results[video.id] = {**entry, "skipped": False}
        if entry["status"] == "failed":
            log.error("%s: %s", video.id, entry["error"])
        bars.finished(video.id, entry["status"])

    def _summary(self, elapsed: float) -> dict[str, Any]:
        videos = {v.id: _summary_entry(self.results[v.id]) for v in self.videos if v.id in self.results}
        totals: dict[str, int] = {"frames": 0}
        for entry in videos.values():
            totals["frames"] += entry["frames"]
            for outcome, count in entry["outcomes"].items():
                totals[outcome] = totals.get(outcome, 0) + count
        failed = sorted(k for k, v in videos.items() if v["status"] == "failed")
        partial = sorted(k for k, v in videos.items() if v["status"] == "partial")
        not_started = [v.id for v in self.videos if v.id not in self.results]  # a stop came first
        return {"out_dir": str(self.out_dir), "elapsed_s": round(elapsed, 3), "videos": videos, "totals": totals,
                "done": sum(v["status"] == "done" for v in videos.values()), "failed": failed, "partial": partial,
                "skipped": sorted(k for k, v in videos.items() if v["skipped"]),
                "stopped": self.stop.is_set(), "not_started": not_started}


def _summary_entry(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "frames", "outcomes", "seconds", "fps", "error", "skipped", "source")
    return {k: entry.get(k) for k in keys}


class ProgressBoard:
    """A tiny Ray actor the tasks report their frame counts to, for the driver's progress bars."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[int, int | None]] = {}

    def update(self, video_id: str, done: int, total: int | None) -> None:
        self.state[video_id] = (done, total)

    def snapshot(self) -> dict[str, tuple[int, int | None]]:
        state, self.state = self.state, {}
        return state


def _ray_label_one(job: dict[str, Any], board: Any) -> dict[str, Any]:
    video_id = job["video"].id
    return label_one(job, lambda done, total: board.update.remote(video_id, done, total))


def _ray_result(ref: Any) -> dict[str, Any]:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BlinkflowError):
            raise cause from None  # not the video's fault (see label_one): stop the batch with its message
        return _failed(f"labelling raised: {cause or exc}", time.perf_counter())
    except ray.exceptions.RayError as exc:  # the worker died twice (segfault, out of memory): record it, go on
        return _failed(f"the labelling task died: {type(exc).__name__}: {first_line(exc)}", time.perf_counter())


class _Bars:
    """An overall bar (videos) and one bar per video being labelled (frames)."""

    def __init__(self, total: int, skipped: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._tqdm, self.enabled = tqdm, enabled
        self.overall = tqdm(total=total, initial=skipped, unit="video", desc="videos", position=0,
                            disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.bars: dict[str, Any] = {}
        self.done: set[str] = set()

    def video(self, video_id: str, done: int, total: int | None) -> None:
        if video_id in self.done:
            return  # a late report of a video that has finished
        bar = self.bars.get(video_id)
        if bar is None:
            bar = self.bars[video_id] = self._tqdm(total=total, unit="frame", desc=video_id, leave=False,
                                                   position=len(self.bars) + 1, disable=not self.enabled,
                                                   file=sys.stderr, dynamic_ncols=True)
        if total and bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))

    def finished(self, video_id: str, status: str) -> None:
        self.done.add(video_id)
        bar = self.bars.pop(video_id, None)
        if bar is not None:
            bar.close()
        self.overall.set_postfix_str(f"last: {video_id} {status}")
        self.overall.update(1)

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


# --------------------------------------------------------------------------- report and CLI


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"blinkflow label: {len(summary['videos'])} videos in {summary['elapsed_s']:.1f} s: "
             f"{summary['done']} done, {len(summary.get('partial', []))} partial, {len(summary['failed'])} failed, "
             f"{len(summary['skipped'])} skipped (already done)"]
    lines.append(f"  {'video':<28} {'status':<7} {'frames':>7} {'processed':>9} {'reused':>6} {'dropped':>7} "
                 f"{'failed':>6} {'time s':>7} {'fps':>7}")
    for video_id, v in summary["videos"].items():
        o = v["outcomes"] or {}
        status = v["status"] + ("*" if v["skipped"] else "")
        lines.append(f"  {video_id[:28]:<28} {status:<7} {v['frames']:>7} {o.get('processed', 0):>9} "
                     f"{o.get('reused', 0):>6} {o.get('dropped', 0):>7} {o.get('failed', 0):>6} "
                     f"{v['seconds'] or 0:>7.2f} {v['fps'] or 0:>7.1f}")
    lines.extend(f"  failed {video_id}: {summary['videos'][video_id]['error']}" for video_id in summary["failed"])
    lines.extend(f"  partial {video_id}: {summary['videos'][video_id]['error']}"
                 for video_id in summary.get("partial", []))
    if summary.get("not_started"):
        lines.append(f"  not started (stopped before them; a re-run labels them): {', '.join(summary['not_started'])}")
    if summary["skipped"]:
        lines.append("  * skipped: finished by an earlier run (verified against the manifest's checksums)")
    lines.append(f"  outputs, manifest.json and summary.json in {summary['out_dir']}")
    return lines


LOCK_NAME = ".blinkflow-label.lock"


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder for the run: a second run into it stops at once, in one
    line naming the holder's pid, instead of deleting the first one's scratch files."""
    import fcntl

    if out_dir.exists() and not out_dir.is_dir():
        raise BlinkflowError(f"--out {out_dir}: is a file, not a folder; name a folder for the outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BlinkflowError(f"--out {out_dir}: another blinkflow label run (pid {holder}) is writing there; "
                                 "wait for it or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_label_command(commands: Any) -> None:
    """Register ``blinkflow label`` on the CLI's sub-command parser."""
    label = commands.add_parser("label", help="batch-label archived videos: JSONL, COCO, MP4 per video (resumable)")
    label.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, directories and globs (quote globs)")
    label.add_argument("--out", type=_out_folder, required=True, help="output folder (outputs, manifest.json, summary.json)")
    label.add_argument("--config", type=Path, default=None,
                       help="pipeline YAML (default: the shipped configs/archive.yaml)")
    label.add_argument("--format", dest="formats",
                       help="comma-separated outputs: jsonl,coco,mp4 (default: the config's label.formats)")
    label.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set label.executor=local (repeatable)")
    label.add_argument("--restart", action="store_true", help="ignore the manifest and label every video again")
    label.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    label.set_defaults(handler=cmd_label)


def _out_folder(text: str) -> Path:
    """--out as a path; an empty one (Path('') is '.') wrote into the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give the output folder, e.g. --out labels (--out . for this one)")
    return Path(text)


def parse_formats(text: str | None, default: list[str]) -> list[str]:
    if text is None:  # not given; an empty --format is refused like ',,
        return list(dict.fromkeys(default))
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in OUTPUT_NAMES]
    if unknown or not formats:
        raise BlinkflowError(f"--format {text!r}: use a comma-separated list of {', '.join(OUTPUT_NAMES)}")
    return list(dict.fromkeys(formats))


def cmd_label(args: argparse.Namespace) -> int:
    from blinkflow.config import load_config

    from blinkflow.resources import config_path

    cfg = load_config(args.config or config_path(ARCHIVE_CONFIG), args.overrides)
    logging.getLogger().setLevel(min(logging.getLogger().level, getattr(logging, cfg.runtime.log_level.upper())))
    from blinkflow.control import GracefulSignals

    formats = parse_formats(args.formats, cfg.label.formats)  # before the inputs are listed: a typo says so first
    run = LabelRun(find_videos(args.inputs, args.out), args.out, cfg, formats, progress=not args.no_progress,
                   restart=args.restart)
    signals = GracefulSignals(run.stop.set, "stopping: no further video starts, those in progress finish and are "
                                            "recorded (signal again to abort)", cfg.runtime.drain_timeout_s).install()
    try:
        summary = run.run()
    finally:
        signals.restore()
    print(redact_text("\n".join(summary_lines(summary))))
    if signals.received:
        name = signal.Signals(signals.received).name
        print(f"blinkflow label: interrupted by {name}: {summary['done']} videos done and recorded, "
              f"{len(summary['not_started'])} not started; run the same command again to finish", file=sys.stderr)
        return 128 + signals.received
    return 1 if summary["failed"] or summary.get("partial") else 0
