"""The ``blinkflow`` command line.

Exit codes: 0 success; 1 the run finished but some input or frame failed
(see the summary); 2 a user error (bad config, bad input, bad weights), printed
as one line without a traceback; 130 (SIGINT) or 143 (SIGTERM) a run that was
interrupted: a file run stops reading at the first signal, lets the frames in flight
reach the sinks and commits them; a second signal aborts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from blinkflow.version import __version__
from blinkflow.errors import BlinkflowError, ConfigError
from blinkflow.schema import whole_number

log = logging.getLogger("blinkflow")

DEMO_CONFIG = "demo.yaml"  # a shipped config (blinkflow.resources)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except BlinkflowError as exc:
        print(f"blinkflow: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not the code's: a read-only folder, a full disk, a path that is a folder
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"blinkflow: error: {where}{exc.strerror or exc}; check that the path is a writable file in a folder "
              "with free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("blinkflow: interrupted", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))  # 130 for Ctrl-C, 143 for a second SIGTERM


#: argparse types: counts (0 or more) and sizes (1 or more)
_count, _positive = whole_number(0), whole_number(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blinkflow", description="Streaming video understanding on Ray.")
    parser.add_argument("--version", action="version", version=f"blinkflow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a pipeline config")
    _add_config_args(run)
    run.add_argument("--summary-json", type=Path, help="also write the run summary as JSON here")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check a config without running it")
    _add_config_args(validate)
    validate.set_defaults(handler=cmd_validate)

    demo = commands.add_parser("demo", help="run configs/demo.yaml: the real models on a real street clip")
    demo.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value of configs/demo.yaml by its YAML path (repeatable)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(handler=cmd_demo)

    from blinkflow.bench.cli import add_bench_command

    add_bench_command(commands)

    from blinkflow.label import add_label_command

    add_label_command(commands)  # blinkflow label INPUT... --out DIR

    listing = commands.add_parser("list", help="list registered stages, models, sources and sinks")
    listing.set_defaults(handler=cmd_list)
    _add_training_commands(commands)
    _add_weights_commands(commands)
    return parser


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/demo.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set stages.detect.batch=8 (repeatable)",
    )


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from blinkflow.redact import install_log_redaction

    install_log_redaction()  # every log line of every run, not only of runs with streams


def cmd_validate(args: argparse.Namespace) -> int:
    from blinkflow.config import load_config

    from blinkflow.sources import check_stream_ids

    from blinkflow.resources import find_config

    found = find_config(args.config)
    cfg = load_config(found, args.overrides)
    check_stream_ids(cfg.sources)  # derived ids (two synthetic sources, two clip.mp4): the run refuses them
    stages = ", ".join(["gate"] * cfg.gate.enabled + list(cfg.enabled_stages())) or "none"
    shipped = f" (the shipped {found})" if found != Path(args.config) else ""  # none in this folder: say which one
    print(f"{args.config}{shipped}: ok ({len(cfg.sources)} sources, stages: {stages}, {len(cfg.sinks)} sinks)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from blinkflow.config import load_config

    cfg = load_config(args.config, args.overrides)
    return execute(cfg, progress=not args.no_progress, summary_json=args.summary_json)


def cmd_demo(args: argparse.Namespace) -> int:
    from blinkflow.config import load_config

    overrides = [f"sinks.0.path={args.out / 'demo.jsonl'}", f"sinks.1.path={args.out / 'demo.mp4'}", *args.overrides]
    from blinkflow.resources import config_path

    cfg = load_config(config_path(DEMO_CONFIG), overrides)
    code = execute(cfg, progress=not args.no_progress, summary_json=args.out / "demo-summary.json")
    written = [sink.path for sink in cfg.sinks if sink.path]  # --set may have changed or dropped sinks
    print(f"demo outputs: {', '.join(written) or 'none (no sinks)'}")
    return code


def expected_frames(cfg) -> int | None:
    """How many frames the run's sources will give, for the progress bar's total: files whose container
    counts its frames (without fps resampling), synthetic scenes; None when any source cannot say (a folder, a
    stream, the control endpoint)."""
    from blinkflow.label import probe_frame_count

    if cfg.control.enabled:
        return None
    total = 0
    for source in cfg.sources:
        if source.type == "file" and source.path:
            count = probe_frame_count(Path(source.path), source)
        elif source.type == "synthetic":
            count = min(source.options.num_frames, source.max_frames or source.options.num_frames)
        else:
            count = None
        if count is None:
            return None
        total += count
    return total or None


def execute(cfg, progress: bool = True, summary_json: Path | None = None) -> int:
    """Run a resolved config with a progress bar; print the summary; return the exit code."""
    from tqdm import tqdm

    from blinkflow.control import GracefulSignals, live_session
    from blinkflow.metrics import serving_metrics
    from blinkflow.runners import get_runner

    if not cfg.sources and not cfg.control.enabled:  # else the models load for a run of 0 frames that exits 0
        raise ConfigError("sources: none given; add one (or use `blinkflow label` for a label config / enable "
                          "control to add streams at run time)")
    logging.getLogger().setLevel(min(logging.getLogger().level, getattr(logging, cfg.runtime.log_level.upper())))
    if summary_json is not None and summary_json.is_dir():  # found after the whole run otherwise
        raise ConfigError(f"--summary-json {summary_json}: is a folder; give a file's path")
    stop = threading.Event()
    with serving_metrics(cfg.metrics) as metrics:
        with live_session(cfg, metrics) as hub, \
                tqdm(unit="frame", desc="blinkflow", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                     total=expected_frames(cfg) if progress else None) as bar:
            def on_result(result) -> None:
                bar.update(1)
                if hub is not None:
                    hub.observe(result)  # capture-to-sink latency of live streams

            # a file run drains on the first SIGINT/SIGTERM (a live session has installed its own handlers)
            signals = GracefulSignals(stop.set, "stopping: no new frames are decoded, those in flight finish and "
                                                "the outputs are committed (signal again to abort)",
                                      cfg.runtime.drain_timeout_s)
            if hub is None:
                signals.install()
            try:
                runner = _runner_with_sinks(get_runner(cfg.runtime.runner), cfg, on_result=on_result,
                                            metrics=metrics, hub=hub, stop=stop)
                summary = runner.run()
            finally:
                signals.restore()
        # said and written before the metrics endpoint waits for a final scrape (up to 30 s): a container's stop
        # grace period killed the process in that wait, and the summary was never written
        return _report(summary, hub, signals.received, summary_json)


def _runner_with_sinks(runner_cls: Any, cfg: Any, **options: Any) -> Any:
    """The runner, handed the config's sinks, built last: a run that failed before it (a metrics port in use) left
    their partial files and sender threads behind. Once built, the runner commits or discards them."""
    from blinkflow.sinks import build_sinks

    sinks = build_sinks(cfg.sinks)
    try:
        return runner_cls(cfg, sinks=sinks, **options)
    except BaseException:
        for sink in sinks:
            with contextlib.suppress(Exception):
                sink.abort()
        raise


def _report(summary: Any, hub: Any, interrupted: int | None, summary_json: Path | None) -> int:
    """Print the run's summary, write --summary-json; the exit code."""
    from blinkflow.redact import redact_obj, redact_text

    print(redact_text("\n".join(summary.lines() + (hub.summary_lines() if hub is not None else []))), flush=True)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        interruption = {"interrupted": signal.Signals(interrupted).name} if interrupted else {}
        summary_json.write_text(json.dumps(redact_obj(summary.to_dict() | interruption), indent=2) + "\n")
    if interrupted:
        print(f"blinkflow: interrupted by {signal.Signals(interrupted).name}: {summary.totals['decoded']} frames done "
              "and written, outputs committed; the rest of the input was not read", file=sys.stderr)
        return 128 + interrupted
    return 0 if summary.ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    from blinkflow.models.registry import model_names
    from blinkflow.registry import runners, sinks, sources, stages

    print("stages:  " + ", ".join(stages.names()))
    for task in ("detect", "segment", "flow", "action"):
        print(f"models ({task}): " + ", ".join(model_names(task)))
    print("sources: " + ", ".join(sources.names()))
    print("sinks:   " + ", ".join(sinks.names()))
    print("runners: " + ", ".join(runners.names()))
    return 0


# --------------------------------------------------------------------------- training (models.training)

TRAIN_TASKS = ("detect", "segment", "flow", "action", "reid")


def _add_training_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a stage's model (configs/train/<task>.yaml)")
    train.add_argument("task", choices=TRAIN_TASKS, help="which stage's model")
    train.add_argument("--config", type=Path, required=True, help="training YAML, e.g. configs/train/segment.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set epochs=2 (repeatable)")
    train.add_argument("--workers", type=_count, default=0, metavar="N",
                       help="run under Ray Train with N DDP workers (0: in this process, no Ray)")
    train.add_argument("--fresh", action="store_true", help="start over instead of resuming out_dir/checkpoint.pt")
    train.add_argument("--ship", action="store_true", help="also save the weights to models/weights/ with the manifest")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.add_argument("--sideways", action="store_true",
                       help="action: Sideways depth-parallel training, compared with ordinary backprop (models/training/sideways.py)")
    # None, not the default, when not given: cmd_train refuses them without --sideways instead of ignoring them
    train.add_argument("--stages", type=_positive, metavar="K", help="--sideways: depth stages (default 2)")
    train.add_argument("--sideways-executor", choices=["local", "ray", "both"],
                       help="--sideways: stages in this process (default), one Ray actor each, or both side by side")
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a stage's weights (COCO mAP, mIoU, EPE, top-k)")
    evaluate.add_argument("task", choices=TRAIN_TASKS, help="which stage's model")
    evaluate.add_argument("--config", type=Path, required=True, help="the training YAML the weights belong to")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a training config value by its YAML path, e.g. data.val.real_fraction=1 (repeatable)")
    evaluate.add_argument("--weights", help="'shipped' or a .pt file (default: the run's checkpoint, else shipped)")
    evaluate.add_argument("--data", help="a real dataset (COCO JSON, .flo folder, video tree); default: held-out synthetic")
    evaluate.add_argument("--record", action="store_true",
                          help="write the metrics into models/weights/manifest.json (shipped weights trained elsewhere)")
    evaluate.set_defaults(handler=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from blinkflow.models.training.config import load_train_config

    _check_sideways_flags(args)
    cfg = load_train_config(args.config, args.overrides, task=args.task)
    if args.ship:
        from blinkflow.models.training.train import check_ship_target

        check_ship_target(cfg)
    if args.sideways:
        return _train_sideways(cfg, args)
    if args.workers > 0:
        from blinkflow.models.training.distributed import train_distributed

        summary = train_distributed(cfg, workers=args.workers, resume=not args.fresh, ship=args.ship)
    else:
        from blinkflow.models.training.train import Runtime, main as train_main

        runtime = Runtime(device=_torch_device(cfg.device), progress=not args.no_progress)
        summary = train_main(cfg, resume=not args.fresh, ship=args.ship, runtime=runtime)
    print(f"{args.task}: {summary['epochs']} epochs, {summary['steps']} steps, {summary['seconds']} s; "
          f"held-out {_format_metrics(summary['metrics'])}; checkpoint in {summary['out_dir']}")
    if summary.get("shipped"):
        print(f"shipped {summary['shipped']}")
    return 0


def _check_sideways_flags(args: argparse.Namespace) -> None:
    """Flags that mean nothing in the mode asked for are refused, not ignored."""
    if args.sideways:
        # Sideways compares fresh trainings in its own report: no checkpoint to resume, nothing shipped, no DDP
        flags = (("--ship", args.ship), ("--workers", args.workers), ("--fresh", args.fresh))
        given = [flag for flag, on in flags if on]
        if given:
            raise ConfigError(f"--sideways: cannot be combined with {' or '.join(given)}; drop {' and '.join(given)} "
                              "(Sideways starts from a fresh model every run and writes its own report and weights "
                              "to out_dir)")
        return
    for flag, value in (("--stages", args.stages), ("--sideways-executor", args.sideways_executor)):
        if value is not None:
            raise ConfigError(f"{flag}: only with --sideways; add --sideways or drop {flag}")


def _train_sideways(cfg, args: argparse.Namespace) -> int:
    from blinkflow.models.training.sideways import compare, executors_for, format_report

    # compare() refuses the settings Sideways would ignore (the module's own entry point goes through it too)
    print(format_report(compare(cfg, args.stages or 2, executors_for(args.sideways_executor))))
    print(f"report and Sideways weights in {cfg.out_dir}/sideways.json, sideways.pt")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.train import run_eval

    cfg = load_train_config(args.config, args.overrides, task=args.task)
    if args.record:
        _check_recordable(cfg, args)
    result = run_eval(cfg, weights=args.weights, data=args.data)
    print(f"{args.task} weights {result['weights']} on {result['data']} ({result['examples']} examples):")
    print("  " + _format_metrics(result["metrics"]))
    if args.record:
        _record_shipped_metrics(cfg, args, result)
    return 0


#: settings that change where or how fast an evaluation runs, never what it measures
_RECORD_NEUTRAL_KEYS = ("out_dir", "threads", "device")


def _check_recordable(cfg, args: argparse.Namespace) -> None:
    """Before evaluating: the manifest's metrics must be those of the YAML's own held-out split."""
    from blinkflow.models.training.config import load_train_config

    if args.weights != "shipped" or args.data:
        raise ConfigError("--record: only the shipped weights' held-out metrics are recorded; "
                          "use --weights shipped without --data")
    written = _flat(load_train_config(args.config, task=args.task).to_dict())
    given = _flat(cfg.to_dict())
    changed = sorted(k for k in written.keys() | given.keys()
                     if k not in _RECORD_NEUTRAL_KEYS and written.get(k) != given.get(k))
    if changed:
        raise ConfigError(f"--record: the --set overrides change {', '.join(changed)}, so the metrics would not be "
                          f"those of the config the manifest records; drop those overrides (only "
                          f"{', '.join(_RECORD_NEUTRAL_KEYS)} may be set)")
    _check_against_manifest(cfg, given, args.config)


#: the settings an evaluation depends on: the model and its held-out data (training-only keys may differ)
_EVAL_KEYS = ("task", "model", "data.val", "data.width", "data.height", "data.num_objects", "data.input_size",
              "data.clip_len")


def _check_against_manifest(cfg, given: dict, config_file: Path) -> None:
    """The YAML itself must evaluate as the config the shipped weights' entry records (a copy with fewer val
    clips recorded a figure of 8 examples under a config that says 24)."""
    from blinkflow.models.weights import WEIGHTS_DIR, read_manifest

    entries = [e for e in read_manifest(WEIGHTS_DIR)["weights"] if (e.get("stage"), e.get("model")) == (cfg.task, cfg.model)]
    recorded = _flat(entries[0].get("config") or {}) if entries else {}
    if not recorded:
        return  # converted third-party weights: no training config to hold the YAML to
    differ = sorted(k for k in recorded.keys() | given.keys()
                    if k.startswith(_EVAL_KEYS) and recorded.get(k) != given.get(k))
    if differ:
        raise ConfigError(f"--record: {config_file} evaluates differently from the config the manifest records for "
                          f"{cfg.task}/{cfg.model} ({', '.join(differ[:4])}); record with the YAML the weights were "
                          "trained with")


def _flat(data: dict, prefix: str = "") -> dict:
    """{"data": {"val": {"clips": 1}}} -> {"data.val.clips": 1}, so a refusal names the exact key."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _record_shipped_metrics(cfg, args: argparse.Namespace, result: dict) -> None:
    from blinkflow.models.weights import record_metrics

    record_metrics(cfg.task, cfg.model, {**result["metrics"], "evaluated_on": result["data"]})
    print(f"recorded in models/weights/manifest.json ({cfg.task}-{cfg.model})")


def _torch_device(name: str):
    from blinkflow.stages.common import resolve_device

    return resolve_device(name)


def _format_metrics(metrics: dict) -> str:
    return "  ".join(f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, float)) or "(none)"


# --------------------------------------------------------------------------- weights (models.convert)


def _add_weights_commands(commands: argparse._SubParsersAction) -> None:
    weights = commands.add_parser("weights", help="list the shipped weights; import real pretrained originals")
    verbs = weights.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="every weights file with its source, licence and metrics")
    listing.set_defaults(handler=cmd_weights_list)
    importing = verbs.add_parser("import", help="convert an original third-party file into models/weights/")
    importing.add_argument("source", help="an importer name (see `blinkflow weights list`) or the original file's path")
    importing.add_argument("--from", dest="search", type=Path, action="append", default=[], metavar="DIR",
                           help="folder holding the original, for a NAME (repeatable; default: the working directory)")
    importing.add_argument("--out", type=Path, default=None, help="weights folder (default: the shipped models/weights/)")
    importing.set_defaults(handler=cmd_weights_import)


def cmd_weights_list(args: argparse.Namespace) -> int:
    from blinkflow.models.convert import IMPORTERS
    from blinkflow.models.weights import WEIGHTS_DIR, read_manifest

    for entry in read_manifest(WEIGHTS_DIR)["weights"]:
        source, derived = entry.get("source") or {}, entry.get("derived_from") or {}
        origin = source.get("origin") or "trained by Blinkflow (docs/training.md)"
        if derived.get("origin"):  # fine-tuned here from third-party weights: theirs is the origin that counts
            origin = f"fine-tuned by Blinkflow from {derived['origin']}"
        metrics = _format_metrics({k: v for k, v in (entry.get("metrics") or {}).items()})
        print(f"{entry['stage']}/{entry['model']}: {entry['file']} ({entry.get('size', 0) / 1e6:.1f} MB, "
              f"sha256 {entry.get('sha256', '?')[:16]}…)")
        print(f"    source: {origin}; licence: {entry.get('licence') or 'Apache-2.0 (this project)'}")
        print(f"    metrics: {metrics}")
    print("importers: " + ", ".join(f"{i.name} <- {i.source_file}" for i in IMPORTERS.values()))
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    from blinkflow.models.convert import import_weights

    entry = import_weights(args.source, search=args.search or [Path.cwd()], out_dir=args.out)
    print(f"{entry['stage']}/{entry['model']}: {entry['file']} sha256 {entry['sha256']} "
          f"({entry['size'] / 1e6:.1f} MB, stored {(entry.get('storage') or {}).get('stored', 'fp32')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
