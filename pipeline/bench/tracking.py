"""``blinkflow bench tracking``: IDF1, MOTA and ID switches of the track stage, gate off and on.

Held-out synthetic sequences (seeds from 1,000,000, which no training clip uses; docs/training.md)
with a still camera and the actor sliding across the other objects, so that it passes in front of
them (occlusions) and they cross. The detector is the config's (configs/synthetic.yaml: the shipped
ssdlite320 trained on such scenes), the tracker the track stage with its defaults; the truth is the
scene generator's boxes and instance ids. ``motmetrics`` matches hypotheses to truth at IoU >= 0.5
per frame (distances computed here: motmetrics 1.4's iou_matrix calls np.asfarray,
gone in NumPy 2) and computes the CLEAR-MOT and identity figures over all sequences together. Each
gate setting runs with the track stage's IoU-only association and with appearance embeddings (the
shipped re-ID net, ``APPEARANCE`` options): the detector runs once per gate setting, with the IoU-only
track stage in the pipeline, and the embeddings rows retrack those very boxes (``_retrack`` gives the
pipeline's IDs exactly for the same options).

Three sections land in docs/tracking.md: ``tracking`` (the easy sequences above), ``tracking-hard``
(models/training/tracking_scenes.py's occlusions, exits and re-entries, same-class crossings and fast
objects, on their own held-out seeds, also per pattern) and ``tracking-real`` (ID stability on real
clips: the track count against the objects a person counted).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blinkflow.bench.common import REPO_ROOT, machine_info, machine_line, markdown_table, save_json, write_section

log = logging.getLogger(__name__)

DOC = REPO_ROOT / "docs" / "tracking.md"
FIRST_SEED = 1_000_000
SEQUENCES, QUICK_SEQUENCES = 4, 1
FRAMES, QUICK_FRAMES = 64, 16
NUM_OBJECTS = 4
ACTIONS = ("slide-left", "slide-right")
#: the hard section: ``HARD_PER_PATTERN`` sequences of each tracking pattern (models/training/tracking_scenes.py),
#: on their own held-out seeds
HARD_FIRST_SEED = 1_000_100
HARD_PER_PATTERN, QUICK_HARD_PER_PATTERN = 4, 1
HARD_FRAMES, QUICK_HARD_FRAMES = 96, 64
GATE = {"enabled": True, "motion": "off", "max_reuse": 8}
GATES = (("gate off", {"enabled": False}), ("gate on", GATE))
#: the track stage's options of the "with embeddings" rows (the shipped reid-embed_small.pt)
APPEARANCE = {"appearance_weight": 0.5}
ASSOCIATIONS = (("IoU only", {}), ("embeddings", APPEARANCE))
#: "detector gaps" rows: the gate-off run's boxes, retracked with the detector blind over these frames
#: (no detect results, as when it did not run): long skips the tracks must survive
BLIND = (range(20, 36), range(44, 60))
HEADERS = ["gate", "association", "IDF1", "MOTA", "ID switches", "fragmentations", "frames reused", "tracks / objects"]


@dataclass(frozen=True)
class Sequence:
    """One held-out clip: an easy scene (the actor's ``action``) or a hard one (a tracking ``pattern``)."""

    seed: int
    motion: str  # an action of the base scenes, or a pattern of TrackingScene
    frames: int
    hard: bool = False

    def scene(self) -> Any:
        from blinkflow.models.training.scenes import SceneGenerator
        from blinkflow.models.training.tracking_scenes import TrackingScene

        if self.hard:
            return TrackingScene(self.seed, self.motion, 320, 240, num_frames=self.frames)
        return SceneGenerator(seed=self.seed, width=320, height=240, num_objects=NUM_OBJECTS, action=self.motion,
                              background_motion=False)

    def source(self) -> dict[str, Any]:
        if self.hard:  # the pipeline has no source type for it: its frames, rendered here
            scene = self.scene()
            return {"type": "frames", "id": f"{self.motion}-{self.seed}", "fps": 25.0,
                    "frames": [scene.render_image(t) for t in range(self.frames)]}
        return {"type": "synthetic", "id": f"seed{self.seed}", "seed": self.seed, "width": 320, "height": 240,
                "num_frames": self.frames, "num_objects": NUM_OBJECTS, "action": self.motion, "static_camera": True}

    def truth(self) -> list[tuple[Any, Any]]:
        """Per frame: the visible objects' boxes and instance ids."""
        return [(frame.boxes, frame.instance_ids) for frame in self.scene().frames(self.frames)]


def easy_sequences(quick: bool, frames: int | None = None) -> list[Sequence]:
    count, length = (QUICK_SEQUENCES, QUICK_FRAMES) if quick else (SEQUENCES, FRAMES)
    return [Sequence(FIRST_SEED + i, ACTIONS[i % len(ACTIONS)], frames or length) for i in range(count)]


def hard_sequences(quick: bool, patterns: tuple[str, ...] | None = None) -> list[Sequence]:
    from blinkflow.models.training.tracking_scenes import PATTERNS

    per_pattern, length = (QUICK_HARD_PER_PATTERN, QUICK_HARD_FRAMES) if quick else (HARD_PER_PATTERN, HARD_FRAMES)
    patterns = patterns or PATTERNS
    return [Sequence(HARD_FIRST_SEED + k * len(PATTERNS) + PATTERNS.index(p), p, length, hard=True)
            for k in range(per_pattern) for p in patterns]


def main(args: argparse.Namespace) -> None:
    quick = args.quick
    config_path = args.config or REPO_ROOT / "configs" / "synthetic.yaml"
    payload: dict[str, Any] = {"machine": machine_info()}
    easy = easy_sequences(quick, args.frames)
    easy_rows, easy_runs = _section(config_path, args.overrides, easy, payload.setdefault("easy", {}))
    blind = [i for window in BLIND for i in window if i < easy[0].frames]
    for appearance_name, track in ASSOCIATIONS:
        retracked = {seq: _retrack(results, track, set(blind)) for seq, results in easy_runs["gate off"].items()}
        _add_row(easy_rows, payload["easy"], f"gate off, detector blind {len(blind)} frames", appearance_name,
                 score(retracked))
    hard = hard_sequences(quick)
    hard_rows, hard_runs = _section(config_path, args.overrides, hard, payload.setdefault("hard", {}))
    pattern_rows = _pattern_rows(hard_runs["gate off"], payload.setdefault("hard_patterns", {}))
    machine = machine_line(payload["machine"])
    sections = {"tracking": _easy_body(easy, config_path, easy_rows, machine),
                "tracking-hard": _hard_body(hard, hard_rows, pattern_rows, machine),
                "tracking-real": real_section(quick, [], payload.setdefault("real", {})) + "\n\n" + machine}
    print("\n\n".join(sections.values()))
    if not args.no_write and not quick:
        for name, body in sections.items():
            write_section(name, body, DOC)
        save_json("tracking", payload)


def _section(config_path: Path, overrides: list[str], sequences: list[Sequence],
             payload: dict) -> tuple[list[list[Any]], dict[str, dict[Sequence, list]]]:
    """Gate off and on, IoU only and embeddings: the detector runs once per gate setting (with the IoU-only
    track stage in the pipeline), the embeddings rows retrack its boxes (the same detections for both)."""
    rows, runs = [], {}
    for gate_name, gate in GATES:
        runs[gate_name] = {seq: _run(config_path, overrides, gate, seq) for seq in sequences}
        for appearance_name, track in ASSOCIATIONS:
            results = runs[gate_name] if not track else {seq: _retrack(r, track) for seq, r in runs[gate_name].items()}
            _add_row(rows, payload, gate_name, appearance_name, score(results))
    return rows, runs


def _pattern_rows(runs: dict[Sequence, list], payload: dict) -> list[list[Any]]:
    """Gate off, per pattern: IoU only against embeddings."""
    rows = []
    for pattern in dict.fromkeys(seq.motion for seq in runs):
        subset = {seq: results for seq, results in runs.items() if seq.motion == pattern}
        iou, emb = score(subset), score({seq: _retrack(r, APPEARANCE) for seq, r in subset.items()})
        payload[pattern] = {"IoU only": iou, "embeddings": emb}
        rows.append([pattern, len(subset), f"{iou['idf1']:.3f} / {emb['idf1']:.3f}", f"{iou['mota']:.3f} / {emb['mota']:.3f}",
                     f"{iou['num_switches']} / {emb['num_switches']}",
                     f"{iou['tracks']} / {emb['tracks']} / {iou['objects']}"])
    return rows


def _easy_body(sequences: list[Sequence], config_path: Path, rows: list[list[Any]], machine: str) -> str:
    first, frames = sequences[0].seed, sequences[0].frames
    setting = (f"{len(sequences)} held-out synthetic sequences (seeds {first}..{first + len(sequences) - 1}), "
               f"{frames} frames each, 320x240, {NUM_OBJECTS} objects, still camera, the actor sliding across the "
               f"others; detector: {Path(config_path).name}'s detect stage; track stage defaults (embeddings: "
               f"{APPEARANCE}, the shipped reid embed_small); motmetrics at IoU 0.5. Detector blind: the gate-off run's "
               f"boxes retracked with no detect results on frames {', '.join(f'{r.start}-{r.stop - 1}' for r in BLIND)} "
               f"(scored on every frame: the blind ones count as misses).")
    return "\n".join([setting, "", markdown_table(HEADERS, rows), "", machine,
                      "Reproduce: `blinkflow bench tracking` (pip install motmetrics)."])


def _hard_body(sequences: list[Sequence], rows: list[list[Any]], pattern_rows: list[list[Any]], machine: str) -> str:
    seeds = sorted(seq.seed for seq in sequences)
    setting = (f"**Hard: occlusion / re-entry / crossing / fast.** {len(sequences)} held-out sequences of "
               f"models/training/tracking_scenes.py (seeds {seeds[0]}..{seeds[-1]}, {len(sequences) // max(len(pattern_rows), 1)} "
               f"per pattern), {sequences[0].frames} frames each, 320x240, still camera; same detector, track "
               f"options and scoring as above.")
    per_pattern = markdown_table(["pattern (gate off)", "sequences", "IDF1 (IoU / emb.)", "MOTA (IoU / emb.)",
                                  "ID switches (IoU / emb.)", "tracks (IoU / emb.) / objects"], pattern_rows)
    return "\n".join([setting, "", markdown_table(HEADERS, rows), "", per_pattern, "", machine,
                      "Reproduce: `blinkflow bench tracking` (pip install motmetrics)."])


#: real clips (bench skip's, at the sizes the tracking docs used): the detector of configs/demo.yaml at this
#: letterbox size, and the distinct objects a person counts in the clip (None: not counted)
REAL = {"parking": ((768, 432), 416, 3, "cars"), "people": ((384, 216), 320, 2, "people"),
        # the first 60 frames: an overhead shot (a red car's corner, a head at the edge: the detector sees
        # neither), a cut at frame 32, then a cyclist riding out of view and a car passing in front of the camera
        "moving": ((640, 272), 320, 2, "(the cyclist, a car passing; counted by eye, frames 0-59)")}


def real_section(quick: bool, overrides: list[str], payload: dict) -> str:
    """ID stability on real clips: the tracks (confirmed IDs lasting at least MIN_FRAMES) against the distinct
    objects, IoU only and with embeddings, gate off (no truth boxes: the count and each track's span)."""
    from blinkflow.bench.skip import real_clips

    rows = []
    for clip in real_clips(quick):
        if clip.name not in REAL:
            continue
        size, letterbox, objects, what = REAL[clip.name]
        results = _run_file(REPO_ROOT / "configs" / "demo.yaml", overrides, {**clip.source, "resize": list(size)},
                            letterbox)
        for appearance_name, track in ASSOCIATIONS:
            spans = _track_spans(_retrack(results, track) if track else results)
            long = {tid: span for tid, span in spans.items() if span[1] - span[0] + 1 >= MIN_FRAMES}
            payload[f"{clip.name}, {appearance_name}"] = {"spans": spans, "objects": objects}
            rows.append([f"{clip.what} ({size[0]}x{size[1]}, letterbox {letterbox})", appearance_name,
                         f"{len(long)} / {len(spans)}", "?" if objects is None else f"{objects} {what}",
                         ", ".join(f"#{t} {a}-{b}" for t, (a, b, _) in sorted(long.items())) or "none"])
    return "\n".join([
        f"**Real clips: ID stability.** configs/demo.yaml's detector (YOLOX-nano, shipped weights), the track stage's "
        f"defaults (embeddings: {APPEARANCE}), gate off, every frame. A track is a confirmed ID; 'lasting' ones span at "
        f"least {MIN_FRAMES} frames (first-last frame they are on). The objects were counted by eye; "
        f"bikes.mp4 is a montage of short shots (cuts, a moving camera): its first {60} frames are two shots.",
        "", markdown_table(["clip", "association", "tracks lasting / all", "distinct objects", "lasting tracks (frames)"],
                           rows)])


MIN_FRAMES = 5


def _track_spans(results: list[Any]) -> dict[int, tuple[int, int, int]]:
    """Track ID -> (first frame, last frame, frames matched) over a run's records."""
    spans: dict[int, list[int]] = {}
    for result in results:
        for tid in (result.results.get("detect") or {}).get("track_ids") or []:
            if tid is not None:
                span = spans.setdefault(int(tid), [result.index, result.index, 0])
                span[1], span[2] = result.index, span[2] + 1
    return {tid: tuple(span) for tid, span in spans.items()}


def _run_file(config_path: Path, overrides: list[str], source: dict[str, Any], letterbox: int) -> list[Any]:
    """detect (the config's, at this letterbox size) + track (IoU only) on one real source, gate off."""
    from blinkflow.config import load_config
    from blinkflow.runners.local import LocalRunner
    from blinkflow.schema import read_yaml
    from blinkflow.sinks import MemorySink

    raw = read_yaml(config_path)
    detect = raw["stages"]["detect"]
    detect.setdefault("options", {}).setdefault("model_args", {})["input_size"] = [letterbox, letterbox]
    raw.update(sources=[{**source, "id": Path(source["path"]).stem}], gate={"enabled": False}, sinks=[],
               stages={"detect": detect, "track": {}})
    cfg = load_config(data=raw, overrides=overrides, base_dir=Path(config_path).resolve().parent)
    cfg = replace(cfg, metrics=replace(cfg.metrics, enabled=False))
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    return sink.results


def _add_row(rows: list, payload: dict, gate_name: str, appearance_name: str, summary: dict[str, Any]) -> None:
    payload[f"{gate_name}, {appearance_name}"] = summary
    rows.append([gate_name, appearance_name, f"{summary['idf1']:.3f}", f"{summary['mota']:.3f}",
                 summary["num_switches"], summary["num_fragmentations"], f"{summary['reused']:.0%}",
                 f"{summary['tracks']} / {summary['objects']}"])


def score(results_by_sequence: dict[Sequence, list]) -> dict[str, Any]:
    """motmetrics' figures of every sequence's per-frame results against the scene generator's truth."""
    import motmetrics as mm

    accumulators, names, reused, total, tracks, objects = [], [], 0, 0, 0, 0
    for seq, results in results_by_sequence.items():
        truth = seq.truth()
        accumulator = mm.MOTAccumulator(auto_id=True)
        seen: set[int] = set()
        for result, (gt_boxes, gt_ids) in zip(results, truth):
            hyp_boxes, hyp_ids = _hypotheses(result)
            seen.update(hyp_ids)
            distances = _iou_distances(gt_boxes, hyp_boxes)
            accumulator.update(list(gt_ids), hyp_ids, distances)
        accumulators.append(accumulator)
        names.append(f"{seq.motion}-{seq.seed}")
        reused += sum(r.outcome.value == "reused" for r in results)
        total += len(results)
        tracks += len(seen)
        objects += len({int(i) for _, ids in truth for i in ids})
    metrics = ["idf1", "mota", "num_switches", "num_fragmentations", "precision", "recall"]
    host = mm.metrics.create()
    summary = host.compute_many(accumulators, metrics=metrics, names=names, generate_overall=True)
    overall = summary.loc["OVERALL"]
    return {**{m: float(overall[m]) if m in ("idf1", "mota", "precision", "recall") else int(overall[m]) for m in metrics},
            "reused": reused / max(total, 1), "tracks": tracks, "objects": objects}


def _run(config_path: Path, overrides: list[str], gate: dict[str, Any], seq: Sequence,
         track: dict[str, Any] | None = None) -> list[Any]:
    from blinkflow.config import load_config
    from blinkflow.runners.local import LocalRunner
    from blinkflow.schema import read_yaml
    from blinkflow.sinks import MemorySink

    raw = read_yaml(config_path)
    raw["sources"] = [seq.source()]
    raw["gate"] = gate
    raw["stages"] = {"detect": raw["stages"]["detect"], "track": {"options": track} if track else {}}
    raw["sinks"] = []
    cfg = load_config(data=raw, overrides=overrides, base_dir=Path(config_path).resolve().parent)
    cfg = replace(cfg, metrics=replace(cfg.metrics, enabled=False))
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    return sink.results


def _retrack(results: list[Any], track: dict[str, Any], blind: set[int] = frozenset()) -> list[Any]:
    """The track stage again on a run's detect results (with none on the ``blind`` frames). A reused frame
    stays reused (its boxes count as carried over), so the result equals a pipeline run with these options."""
    from blinkflow.config import StageConfig
    from blinkflow.frame import Frame, GateMark
    from blinkflow.stages.track import TrackOptions, TrackStage

    stage = TrackStage(StageConfig(options=TrackOptions(**track)))
    stage.setup()
    out = []
    for result in results:
        frame = Frame(result.stream_id, result.index, result.pts, result.image)
        frame.outcome = result.outcome
        if result.reuse_of is not None:
            frame.gate = GateMark(reuse_of=result.reuse_of)
        detect = result.results.get("detect")
        if detect is not None and result.index not in blind:
            frame.results["detect"] = {k: v for k, v in detect.items() if k != "track_ids"}
        stage.process([frame])
        out.append(frame)
    stage.teardown()
    return out


def _hypotheses(result: Any, stage: str = "detect") -> tuple[list[list[float]], list[int]]:
    """The boxes of a frame that carry a track ID, and the IDs."""
    detect = result.results.get(stage) or {}
    pairs = [(box, tid) for box, tid in zip(detect.get("boxes", []), detect.get("track_ids", [])) if tid is not None]
    return [list(b) for b, _ in pairs], [int(t) for _, t in pairs]


def _iou_distances(truth: Any, hypotheses: Any, min_iou: float = 0.5) -> Any:
    """1 - IoU, NaN (no match) below ``min_iou``: motmetrics.distances.iou_matrix's contract (motmetrics 1.4
    calls np.asfarray, gone in NumPy 2)."""
    import numpy as np

    from blinkflow.gate.agreement import box_iou

    a = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(hypotheses, dtype=np.float64).reshape(-1, 4)
    iou = box_iou(a, b) if len(a) and len(b) else np.zeros((len(a), len(b)))
    return np.where(iou >= min_iou, 1.0 - iou, np.nan)
