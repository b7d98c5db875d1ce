"""``blinkflow bench tracking``: IDF1, MOTA and ID switches of the track stage, gate off and on.

Held-out synthetic sequences (seeds from 1,000,000, which no training clip uses; docs/training.md)
with a still camera and the actor sliding across the other objects, so that it passes in front of
them (occlusions) and they cross. The detector is the config's (configs/synthetic.yaml: the shipped
ssdlite320 trained on such scenes), the tracker the track stage with its defaults; the truth is the
scene generator's boxes and instance ids. ``motmetrics`` matches hypotheses to truth at IoU >= 0.5
per frame (distances computed here: motmetrics 1.4's iou_matrix calls np.asfarray,
gone in NumPy 2) and computes the CLEAR-MOT and identity figures over all sequences together. Each
gate setting runs with the track stage's IoU-only association and with appearance embeddings (the
shipped re-ID net, ``APPEARANCE`` options). The section lands in docs/tracking.md.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
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
GATE = {"enabled": True, "motion": "off", "max_reuse": 8}
#: the track stage's options of the "with embeddings" rows (the shipped reid-embed_small.pt)
APPEARANCE = {"appearance_weight": 0.5}
#: "detector gaps" rows: the gate-off run's boxes, retracked with the detector blind over these frames
#: (no detect results, as when it did not run): long skips the tracks must survive
BLIND = (range(20, 36), range(44, 60))


def main(args: argparse.Namespace) -> None:
    quick = args.quick
    config_path = args.config or REPO_ROOT / "configs" / "synthetic.yaml"
    sequences = QUICK_SEQUENCES if quick else SEQUENCES
    frames = args.frames or (QUICK_FRAMES if quick else FRAMES)
    rows, payload = [], {"machine": machine_info(), "sequences": sequences, "frames": frames, "variants": {}}
    variants = [(gate_name, appearance_name, gate, track)
                for gate_name, gate in (("gate off", {"enabled": False}), ("gate on", GATE))
                for appearance_name, track in (("IoU only", {}), ("embeddings", APPEARANCE))]
    runs: dict[str, list] = {}
    for gate_name, appearance_name, gate, track in variants:
        summary = measure(config_path, args.overrides, gate, sequences, frames, track, runs if not gate["enabled"] and not track else None)
        _add_row(rows, payload, gate_name, appearance_name, summary)
    blind = [i for window in BLIND for i in window if i < frames]
    for appearance_name, track in (("IoU only", {}), ("embeddings", APPEARANCE)):
        summary = score({seed: _retrack(results, track, set(blind)) for seed, results in runs.items()}, frames)
        _add_row(rows, payload, f"gate off, detector blind {len(blind)} frames", appearance_name, summary)
    setting = (f"{sequences} held-out synthetic sequences (seeds {FIRST_SEED}..{FIRST_SEED + sequences - 1}), "
               f"{frames} frames each, 320x240, {NUM_OBJECTS} objects, still camera, the actor sliding across the "
               f"others; detector: {Path(config_path).name}'s detect stage; track stage defaults (embeddings: "
               f"{APPEARANCE}, the shipped reid embed_small); motmetrics at IoU 0.5. Detector blind: the gate-off run's "
               f"boxes retracked with no detect results on frames {', '.join(f'{r.start}-{r.stop - 1}' for r in BLIND)} "
               f"(scored on every frame: the blind ones count as misses).")
    body = "\n".join([
        setting,
        "",
        markdown_table(["gate", "association", "IDF1", "MOTA", "ID switches", "fragmentations", "frames reused",
                        "tracks / objects"], rows),
        "",
        machine_line(payload["machine"]),
        "Reproduce: `blinkflow bench tracking` (pip install motmetrics).",
    ])
    print(body)
    if not args.no_write and not quick:
        write_section("tracking", body, DOC)
        save_json("tracking", payload)


def _add_row(rows: list, payload: dict, gate_name: str, appearance_name: str, summary: dict[str, Any]) -> None:
    payload["variants"][f"{gate_name}, {appearance_name}"] = summary
    rows.append([gate_name, appearance_name, f"{summary['idf1']:.3f}", f"{summary['mota']:.3f}",
                 summary["num_switches"], summary["num_fragmentations"], f"{summary['reused']:.0%}",
                 f"{summary['tracks']} / {summary['objects']}"])


def measure(config_path: Path, overrides: list[str], gate: dict[str, Any], sequences: int, frames: int,
            track: dict[str, Any] | None = None, keep: dict[int, list] | None = None) -> dict[str, Any]:
    """Run every sequence through detect + track; return motmetrics' figures over all of them (``keep``:
    also store each sequence's results there, by seed)."""
    results_by_seed = {}
    for i in range(sequences):
        seed, action = FIRST_SEED + i, ACTIONS[i % len(ACTIONS)]
        results_by_seed[seed] = _run(config_path, overrides, gate, seed, action, frames, track or {})
    if keep is not None:
        keep.update(results_by_seed)
    return score(results_by_seed, frames)


def score(results_by_seed: dict[int, list], frames: int) -> dict[str, Any]:
    """motmetrics' figures of every sequence's per-frame results against the scene generator's truth."""
    import motmetrics as mm

    accumulators, names, reused, total, tracks, objects = [], [], 0, 0, 0, 0
    for seed, results in results_by_seed.items():
        truth = _truth(seed, ACTIONS[(seed - FIRST_SEED) % len(ACTIONS)], frames)
        accumulator = mm.MOTAccumulator(auto_id=True)
        seen: set[int] = set()
        for result, (gt_boxes, gt_ids) in zip(results, truth):
            hyp_boxes, hyp_ids = _hypotheses(result)
            seen.update(hyp_ids)
            distances = _iou_distances(gt_boxes, hyp_boxes)
            accumulator.update(list(gt_ids), hyp_ids, distances)
        accumulators.append(accumulator)
        names.append(f"seed{seed}")
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


def _run(config_path: Path, overrides: list[str], gate: dict[str, Any], seed: int, action: str, frames: int,
         track: dict[str, Any]) -> list[Any]:
    from blinkflow.config import load_config
    from blinkflow.runners.local import LocalRunner
    from blinkflow.schema import read_yaml
    from blinkflow.sinks import MemorySink

    raw = read_yaml(config_path)
    raw["sources"] = [{"type": "synthetic", "id": f"seed{seed}", "seed": seed, "width": 320, "height": 240,
                       "num_frames": frames, "num_objects": NUM_OBJECTS, "action": action, "static_camera": True}]
    raw["gate"] = gate
    raw["stages"] = {"detect": raw["stages"]["detect"], "track": {"options": track} if track else {}}
    raw["sinks"] = []
    cfg = load_config(data=raw, overrides=overrides, base_dir=Path(config_path).resolve().parent)
    cfg = replace(cfg, metrics=replace(cfg.metrics, enabled=False))
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    return sink.results


def _retrack(results: list[Any], track: dict[str, Any], blind: set[int]) -> list[Any]:
    """The track stage again on a run's detect results, with none on the ``blind`` frames."""
    from blinkflow.config import StageConfig
    from blinkflow.frame import Frame
    from blinkflow.stages.track import TrackOptions, TrackStage

    stage = TrackStage(StageConfig(options=TrackOptions(**track)))
    stage.setup()
    out = []
    for result in results:
        frame = Frame(result.stream_id, result.index, result.pts, result.image)
        frame.outcome = result.outcome
        detect = result.results.get("detect")
        if detect is not None and result.index not in blind:
            frame.results["detect"] = {k: v for k, v in detect.items() if k != "track_ids"}
        stage.process([frame])
        out.append(frame)
    stage.teardown()
    return out


def _truth(seed: int, action: str, frames: int) -> list[tuple[Any, Any]]:
    from blinkflow.models.training.scenes import SceneGenerator

    generator = SceneGenerator(seed=seed, width=320, height=240, num_objects=NUM_OBJECTS, action=action,
                               background_motion=False)
    return [(frame.boxes, frame.instance_ids) for frame in generator.frames(frames)]


def _hypotheses(result: Any, stage: str = "detect") -> tuple[list[list[float]], list[int]]:
    """The boxes of a frame that carry a track ID, and the IDs."""
    detect = result.results.get(stage) or {}
    pairs = [(box, tid) for box, tid in zip(detect.get("boxes", []), detect.get("track_ids", [])) if tid is not None]
    return [list(b) for b, _ in pairs], [int(t) for _, t in pairs]


def _iou_distances(truth: Any, hypotheses: Any, min_iou: float = 0.5) -> Any:
    """1 - IoU, NaN (no match) below ``min_iou``: motmetrics.distances.iou_matrix's contract (motmetrics 1.4
    calls np.asfarray, gone in NumPy 2)."""
    import numpy as np

    from blinkflow.stages.track import box_iou

    a = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(hypotheses, dtype=np.float64).reshape(-1, 4)
    iou = box_iou(a, b) if len(a) and len(b) else np.zeros((len(a), len(b)))
    return np.where(iou >= min_iou, 1.0 - iou, np.nan)
