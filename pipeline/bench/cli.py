"""The ``blinkflow bench`` subcommand: one table of benchmarks, dispatched lazily."""

from __future__ import annotations

import argparse
import importlib
import math
from pathlib import Path

from blinkflow.resources import config_path
from blinkflow.schema import whole_number

REPO_ROOT = Path(__file__).resolve().parents[2]
#: the benchmarks' default pipeline: the synthetic scene with the small self-trained models, so that
#: figures stay comparable across releases (`--config configs/demo.yaml` measures the real models)
BENCH_CONFIG = config_path("synthetic.yaml")

#: name -> (module, function); each function takes the parsed args and returns nothing
BENCHMARKS: dict[str, tuple[str, str]] = {
    "decode": ("blinkflow.bench.cli", "run_decode"),
    "stages": ("blinkflow.bench.cli", "run_stages"),
    "pipeline": ("blinkflow.bench.cli", "run_pipeline"),
    "overhead": ("blinkflow.bench.cli", "run_overhead"),
    "skip": ("blinkflow.bench.cli", "run_skip"),
    "depth": ("blinkflow.bench.cli", "run_depth"),
    "models": ("blinkflow.bench.cli", "run_models"),
    "tracking": ("blinkflow.bench.tracking", "main"),  # IDF1/MOTA/ID switches, gate off/on (docs/tracking.md)
    "gpu": ("blinkflow.bench.gpu", "main"),  # needs CUDA (--quick: its code paths on the CPU); tools/gpu-check.sh
}
ALL_ORDER = ["decode", "stages", "pipeline", "overhead", "skip", "depth", "models"]


#: 0 repetitions or frames measured nothing and said so nowhere
_positive_int = whole_number(1)


def _positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (nan or -1 passed every comparison or skipped every part)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a time; give a number of seconds above 0, e.g. 400")
    return value


def _config_file(value: str) -> Path:
    from blinkflow.resources import find_config

    return find_config(value)  # configs/demo.yaml from any folder once installed: the shipped one


def add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="side-by-side benchmarks (writes docs/benchmarks.md)")
    bench.add_argument("what", choices=[*BENCHMARKS, "all"], help="which benchmark ('all' runs every one)")
    bench.add_argument("--quick", action="store_true", help="a small, fast version (for CI); does not rewrite the docs")
    bench.add_argument("--config", type=_config_file, default=None,
                       help="pipeline config (default: configs/synthetic.yaml; skip: configs/demo.yaml, the real models)")
    bench.add_argument("--frames", type=_positive_int, default=None, help="frames per run (default: pipeline 96, depth 48; skip --video: 300 of each video)")
    bench.add_argument("--repetitions", type=_positive_int, default=3, help="repetitions per variant")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by its YAML path (skip: gate.* for the gate-on runs only; repeatable)")
    bench.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    bench.add_argument("--gate-from-config", action="store_true",
                       help="skip: start the gate-on runs from the config's gate section, not GateConfig's defaults")
    bench.add_argument("--budget-s", type=_positive_seconds, default=None,
                       help="gpu: seconds the run may take; what would not fit is marked skipped (default 400)")
    bench.add_argument("--clips", choices=["real", "synthetic", "all"], default=None,
                       help="skip: the real clips (the default), the synthetic scenes, or both")
    bench.add_argument("--video", type=Path, action="append", default=[], metavar="PATH",
                       help="skip: measure on this video instead of the shipped clips (repeatable; your own camera, "
                            "judged by the config's models; prints only); --frames caps each (default 300)")
    bench.add_argument("--resize", metavar="WxH", default=None,
                       help="skip --video: decode at this size (default: the video's own)")
    bench.set_defaults(handler=cmd_bench)


#: options that only one benchmark reads (each defaults to None, False or []: given at all, it was given): given to
#: another they were ignored (bench decode --video measured the shipped clips and rewrote docs/benchmarks.md)
ONLY_FOR = {"video": "skip", "resize": "skip", "gate_from_config": "skip", "clips": "skip", "budget_s": "gpu"}


def cmd_bench(args: argparse.Namespace) -> int:
    from blinkflow.errors import ConfigError

    for option, owner in ONLY_FOR.items():
        given = getattr(args, option)
        if args.what != owner and given not in (None, False, []):
            raise ConfigError(f"--{option.replace('_', '-')}: an option of `blinkflow bench {owner}`, not of "
                              f"{args.what}; drop it")
    if args.resize is not None and not args.video:  # the shipped clips decode at their own size: it was ignored
        raise ConfigError("--resize: sizes the decode of --video only; add --video PATH, or drop --resize")
    names = ALL_ORDER if args.what == "all" else [args.what]
    if not (args.what == "skip" and args.video) and not checkout_present():
        from blinkflow.errors import BlinkflowError

        raise BlinkflowError(f"blinkflow bench {args.what}: needs a source checkout (its clips in tests/data, its "
                             "results in docs/); clone the repository and `pip install -e .` there, or measure your "
                             "own footage with `blinkflow bench skip --video PATH`")
    for name in names:
        module, function = BENCHMARKS[name]
        getattr(importlib.import_module(module), function)(args)
    if args.what == "all" and not args.no_write and not args.quick:
        from blinkflow.bench.plot import plot_throughput

        plot_throughput()
    return 0


def checkout_present() -> bool:
    """Whether this is a clone (an editable install): the benches' data and docs are not package data."""
    return (REPO_ROOT / "tests" / "data").is_dir() and (REPO_ROOT / "docs").is_dir()


def _write(args: argparse.Namespace) -> bool:
    return not args.no_write and not args.quick


def run_decode(args: argparse.Namespace) -> None:
    from blinkflow.bench.decode import bench_decode

    bench_decode(quick=args.quick, repetitions=args.repetitions, write=_write(args))


def run_stages(args: argparse.Namespace) -> None:
    from blinkflow.bench.stages import bench_demo_stages, bench_stages

    bench_stages(quick=args.quick, repetitions=args.repetitions, write=_write(args))
    bench_demo_stages(quick=args.quick, write=_write(args))


def run_pipeline(args: argparse.Namespace) -> None:
    from blinkflow.bench.pipeline import DEFAULT_FRAMES, bench_pipeline

    frames = args.frames or DEFAULT_FRAMES
    frames = min(frames, 8) if args.quick else frames
    bench_pipeline(args.config or BENCH_CONFIG, frames, 1 if args.quick else args.repetitions, args.overrides, write=_write(args))


def run_overhead(args: argparse.Namespace) -> None:
    from blinkflow.bench.overhead import bench_overhead

    bench_overhead(iterations=20 if args.quick else 200, write=_write(args))


def run_skip(args: argparse.Namespace) -> None:
    from blinkflow.bench import skip as bench_skip

    bench_skip.main(args)


def run_depth(args: argparse.Namespace) -> None:
    from blinkflow.bench.depth import DEFAULT_FRAMES, bench_depth

    bench_depth(frames=args.frames or DEFAULT_FRAMES, repetitions=args.repetitions, write=_write(args), quick=args.quick)


def run_models(args: argparse.Namespace) -> None:
    from blinkflow.bench.models import bench_models

    bench_models(quick=args.quick, write=_write(args))
