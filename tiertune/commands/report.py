"""`tiertune sweep`, `tiertune report` and `tiertune demo`: results and pictures for people."""

from __future__ import annotations

import argparse
import sys

from tiertune.commands.common import COUNT, SECONDS


def register(sub) -> None:
    register_sweep(sub)
    register_report(sub)
    register_demo(sub)


def register_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="simulate models x hardware x budgets x policies into a parquet table")
    p.add_argument("spec", help="sweep spec TOML (see tiertune/analysis/sweep.py)")
    p.add_argument("-o", "--output", required=True, help="results .parquet (rows already there are skipped)")
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS", help="run on a Ray cluster instead of a local process pool")
    p.add_argument("--workers", type=COUNT, default=None, help="local processes (default: CPU count)")
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tiertune.analysis.sweep import load_spec, run_sweep as sweep
    from tiertune.errors import InputError

    from tiertune.fileio import check_output
    if not args.output.endswith(".parquet"):
        raise InputError(f"sweep output must be a .parquet file: {args.output}")
    check_output(args.output, "-o")
    spec = load_spec(args.spec)
    # a bar on a terminal only (disable=None): piped stderr keeps the one-line error contract
    bar = lambda it, total: tqdm(it, total=total, desc="sweep", unit="row", file=sys.stderr, disable=None)
    df = sweep(spec, args.output, ray_address=args.ray, workers=args.workers, progress=bar)
    fits = int(df["fits"].sum())
    print(f"{len(df)} rows ({fits} fit) in {args.output}")
    return 0


def register_report(sub) -> None:
    p = sub.add_parser("report", help="compare, plot and write index.md/index.html for one model on one machine")
    from tiertune.commands.common import add_workload_args

    add_workload_args(p)
    p.add_argument("--trace", default=None, help="a trace from simulate or execute: adds replay what-ifs (and validation for a measured one)")
    p.add_argument("--profile", default=None, help="hardware profile to predict a measured trace with (default: calibrate --quick)")
    p.add_argument("--time-limit", type=SECONDS, default=10.0, help="planner seconds per planning run")
    p.add_argument("-o", "--output", required=True, help="report directory")
    p.add_argument("--single-file", action="store_true", help="embed the figures in index.html so it can be shared alone")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from tiertune.analysis.report import build_report
    from tiertune.commands.common import load_workload
    from tiertune.fileio import check_output_dir
    check_output_dir(args.output, "-o")
    from tiertune.hardware import load_hardware
    from tiertune.traces.trace import Trace

    model, train, hw = load_workload(args)
    trace = Trace.load(args.trace) if args.trace else None
    profile = None
    if trace is not None and trace.source == "measured":
        profile = load_hardware(args.profile) if args.profile else _quick_profile(args.output)
    md = build_report(model, train, hw, args.output, time_limit_s=args.time_limit, trace=trace,
                      measured_profile=profile, single_file=args.single_file)
    print(f"report written: {md} (and {md.with_suffix('.html').name})")
    return 0


def _quick_profile(out_dir: str):
    """Measure this machine quickly so a measured trace can be predicted with its own numbers."""
    from tiertune.traces.calibrate import calibrate

    return calibrate(device="cpu", quick=True)[0]


def register_demo(sub) -> None:
    p = sub.add_parser("demo", help="simulate, plan, execute a small model, validate and write a report folder")
    p.add_argument("-o", "--output", default="tiertune-demo", help="report directory (default: tiertune-demo)")
    p.add_argument("--time-limit", type=SECONDS, default=10.0, help="planner seconds per planning run")
    p.add_argument("--steps", type=COUNT, default=8, help="steps of the executed small model")
    p.add_argument("--single-file", action="store_true", help="embed the figures in each index.html")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from tiertune.analysis.demo import run_demo as demo
    from tiertune.fileio import check_output_dir
    check_output_dir(args.output, "-o")

    html = demo(args.output, time_limit_s=args.time_limit, steps=args.steps, single_file=args.single_file)
    print(f"report: {html}")
    return 0
