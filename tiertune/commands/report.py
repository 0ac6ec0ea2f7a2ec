"""`tiertune sweep`, `tiertune report` and `tiertune demo`: results and pictures for people."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("sweep", help="simulate models x hardware x budgets x policies into a parquet table")
    p.add_argument("spec", help="sweep spec TOML (see tiertune/analysis/sweep.py)")
    p.add_argument("-o", "--output", required=True, help="results .parquet (rows already there are skipped)")
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS", help="run on a Ray cluster instead of a local process pool")
    p.add_argument("--workers", type=int, default=None, help="local processes (default: CPU count)")
    p.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tiertune.analysis.sweep import load_spec, run_sweep as sweep
    from tiertune.errors import InputError

    if not args.output.endswith(".parquet"):
        raise InputError(f"sweep output must be a .parquet file: {args.output}")
    spec = load_spec(args.spec)
    bar = lambda it, total: tqdm(it, total=total, desc="sweep", unit="row", file=sys.stderr)
    df = sweep(spec, args.output, ray_address=args.ray, workers=args.workers, progress=bar)
    fits = int(df["fits"].sum())
    print(f"{len(df)} rows ({fits} fit) in {args.output}")
    return 0
