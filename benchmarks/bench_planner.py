"""Planner benchmark: plan each (model, hardware, batch) row of the matrix and write a CSV with the
lower bound, the planned iteration time and its ratio to the bound, the plain local search's result
(`plan --search local`, the reference the planner must beat) and the planner's ratio to it, the
stage that produced the returned plan, the planner's wall time, its speedup over the best fitting
(comparable, lossless) baseline and its ratio to `ideal`.

    .venv/bin/python benchmarks/bench_planner.py [--time-limit 30] [--local-limit 120] [--out ...]

Targets (issue 13): every row within 1.10x of its finite lower bound; planner at 30 s at least as
fast as the local search at 120 s; a CP-SAT stage produced or improved the returned plan; planner
wall time <= 30 s; geo-mean speedup over the best lossless baseline >= 1.20.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

from tiertune.fileio import atomic_write_text
from tiertune.hardware import load_hardware
from tiertune.planner.local import plan_local
from tiertune.planner.search import plan_schedule, run_baselines
from tiertune.workload import default_train, load_model

# (model, hardware, batch); gpt3-1.3b on the laptop at batch 1 is also one of issue 13's rows
MATRIX = [("gpt3-1.3b", "lsp-a1000-laptop", 1), ("llama2-7b", "lsp-4090", 1),
          ("gpt3-13b", "fuyou-4090-12ssd", 1), ("gpt3-13b", "fuyou-4090-1ssd", 1),
          ("gpt3-175b", "fuyou-4090-12ssd", 1), ("gpt3-175b", "fuyou-4090-1ssd", 1),
          ("llama2-70b", "a100-80g", 1),
          ("gpt3-13b", "fuyou-4090-12ssd", 8), ("gpt3-175b", "fuyou-4090-12ssd", 16),
          ("llama2-7b", "lsp-4090", 4)]


def bench_row(model_name: str, hw_name: str, batch: int, time_limit_s: float, local_limit_s: float) -> dict:
    model, hw = load_model(model_name), load_hardware(hw_name)
    train = default_train(model).replace(batch=batch)
    base = run_baselines(model, train, hw)
    t0 = time.perf_counter()
    res = plan_schedule(model, train, hw, time_limit_s, baselines=base)
    wall = time.perf_counter() - t0
    local = plan_local(model, train, hw, local_limit_s) if local_limit_s > 0 else None
    best = res.best_baseline
    ideal = next(b for b in base if b.name == "ideal")
    gpu_busy = res.sim.busy_s["gpu"] / res.iteration_s
    return {"model": model_name, "hardware": hw_name, "batch": batch, "planner_wall_s": round(wall, 2),
            "lower_bound_s": res.lower.bound_s if res.lower.feasible else math.nan,
            "iteration_s": res.iteration_s, "ratio_to_lower_bound": res.lower.ratio(res.iteration_s),
            "local_search_s": local.iteration_s if local else math.nan,
            "ratio_to_local_search": res.iteration_s / local.iteration_s if local else math.nan,
            "plan_from": res.plan_from,
            "cpsat_improved": any(st["name"].startswith("cpsat") and st["improved"] for st in res.stages),
            "prefetch_depth": res.plan.globals.prefetch_depth,
            "gpu_busy_share": gpu_busy, "best_baseline": best.name if best else None,
            "best_baseline_s": best.iteration_s if best else math.nan,
            "speedup_vs_best_baseline": res.speedup_vs_best_baseline or math.nan,
            "bound_binding": res.lower.binding,
            "ratio_to_ideal": res.iteration_s / ideal.iteration_s,
            "solver_status": res.solver.get("status"), "engine_vs_solver": res.engine_vs_solver,
            "evaluations": res.evaluations, "notes": " | ".join(res.notes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--local-limit", type=float, default=120.0, help="seconds for the local search (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/planner.csv")
    ap.add_argument("--only", default=None, help="run rows whose model:hardware contains this")
    args = ap.parse_args()
    rows = []
    for m, h, b in MATRIX:
        if args.only and args.only not in f"{m}:{h}:{b}":
            continue
        r = bench_row(m, h, b, args.time_limit, args.local_limit)
        rows.append(r)
        print(f"{m:>11} {h:<17} b{b:<3} wall {r['planner_wall_s']:6.1f}s  iter {r['iteration_s']:9.3f}s  "
              f"LB ratio {r['ratio_to_lower_bound']:.3f}  vs local {r['ratio_to_local_search']:.3f}  "
              f"from {r['plan_from']}  vs {r['best_baseline']} {r['speedup_vs_best_baseline']:.3f}x  "
              f"GPU busy {r['gpu_busy_share']:.0%}", flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, df.to_csv(index=False))
    sp = df["speedup_vs_best_baseline"].dropna()
    geo = math.exp(sum(math.log(x) for x in sp) / len(sp)) if len(sp) else math.nan
    print(f"geo-mean speedup over best fitting baseline: {geo:.3f} (target >= 1.20)")
    print(f"rows with a finite bound: {df['lower_bound_s'].notna().sum()}/{len(df)}")
    print(f"rows within 1.10x of lower bound: {(df['ratio_to_lower_bound'] <= 1.10).sum()}/{len(df)}")
    print(f"rows at least as fast as the local search: {(df['ratio_to_local_search'] <= 1 + 1e-9).sum()}/{len(df)}")
    print(f"rows where a CP-SAT stage produced or improved the plan: {df['cpsat_improved'].sum()}/{len(df)}")
    print(f"rows planned within 30 s: {(df['planner_wall_s'] <= 30).sum()}/{len(df)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
