"""Planner benchmark: plan each (model, hardware) row of the matrix and write a CSV with planner wall
time, engine iteration time, speedup over the best fitting (comparable, lossless) baseline, and the
ratios to the analytic lower bound and to `ideal`.

    .venv/bin/python benchmarks/bench_planner.py [--time-limit 45] [--out benchmarks/results/planner.csv]

Targets (project issue 3): each row planned within 60 s on 2 cores; geo-mean speedup over the best
fitting baseline >= 1.10; every row within 1.25x of its lower bound.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

from tiertune.commands.common import default_train
from tiertune.fileio import atomic_write_text
from tiertune.hardware import load_hardware
from tiertune.planner.search import plan_schedule, run_baselines
from tiertune.workload import load_model

MATRIX = [("gpt3-1.3b", "lsp-a1000-laptop"), ("llama2-7b", "lsp-4090"),
          ("gpt3-13b", "fuyou-4090-12ssd"), ("gpt3-13b", "fuyou-4090-1ssd"),
          ("gpt3-175b", "fuyou-4090-12ssd"), ("gpt3-175b", "fuyou-4090-1ssd"),
          ("llama2-70b", "a100-80g")]


def bench_row(model_name: str, hw_name: str, time_limit_s: float) -> dict:
    model, hw = load_model(model_name), load_hardware(hw_name)
    train = default_train(model)
    t0 = time.perf_counter()
    base = run_baselines(model, train, hw)
    res = plan_schedule(model, train, hw, time_limit_s, baselines=base)
    wall = time.perf_counter() - t0
    best = res.best_baseline
    ideal = next(b for b in base if b.name == "ideal")
    return {"model": model_name, "hardware": hw_name, "planner_wall_s": round(wall, 2),
            "iteration_s": res.iteration_s, "best_baseline": best.name if best else None,
            "best_baseline_s": best.iteration_s if best else math.nan,
            "speedup_vs_best_baseline": res.speedup_vs_best_baseline or math.nan,
            "lower_bound_s": res.lower.bound_s, "bound_binding": res.lower.binding,
            "ratio_to_lower_bound": res.lower.ratio(res.iteration_s),
            "ratio_to_ideal": res.iteration_s / ideal.iteration_s,
            "solver_status": res.solver.get("status"), "engine_vs_solver": res.engine_vs_solver,
            "evaluations": res.evaluations, "notes": " | ".join(res.notes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=45.0)
    ap.add_argument("--out", default="benchmarks/results/planner.csv")
    ap.add_argument("--only", default=None, help="run rows whose model:hardware contains this")
    args = ap.parse_args()
    rows = []
    for m, h in MATRIX:
        if args.only and args.only not in f"{m}:{h}":
            continue
        r = bench_row(m, h, args.time_limit)
        rows.append(r)
        print(f"{m:>11} {h:<17} wall {r['planner_wall_s']:6.1f}s  iter {r['iteration_s']:9.3f}s  "
              f"vs {r['best_baseline']} {r['speedup_vs_best_baseline']:.3f}x  LB ratio {r['ratio_to_lower_bound']:.3f}  "
              f"ideal ratio {r['ratio_to_ideal']:.2f}", flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, df.to_csv(index=False))
    sp = df["speedup_vs_best_baseline"].dropna()
    geo = math.exp(sum(math.log(x) for x in sp) / len(sp)) if len(sp) else math.nan
    print(f"geo-mean speedup over best fitting baseline: {geo:.3f} (target >= 1.10)")
    print(f"rows within 1.25x of lower bound: {(df['ratio_to_lower_bound'] <= 1.25).sum()}/{len(df)}")
    print(f"rows planned within 60 s: {(df['planner_wall_s'] <= 60).sum()}/{len(df)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
