"""The comparison table: every named policy and the planned schedule through the engine, one row
each, with each plan's ratio to `ideal` and to the lower bound of its own space. `tiertune compare`
prints it, reports draw it."""

from __future__ import annotations

import math

from tiertune.errors import InputError
from tiertune.hardware import GiB, HardwareProfile
from tiertune.workload import ModelSpec, TrainSpec


def compare_policies(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, time_limit_s: float = 30.0,
                     grad_ranks: tuple[int, ...] = (), max_compression_error: float | None = None):
    """One row per named policy plus `planner`: fits, iteration time, tokens/s, TFLOP/s, peak GiB per
    tier, bottleneck, ratio to `ideal` and to the lower bound, and why it does not fit."""
    return comparison(model, train, hw, time_limit_s, grad_ranks, max_compression_error)[0]


def comparison(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, time_limit_s: float = 30.0,
               grad_ranks: tuple[int, ...] = (), max_compression_error: float | None = None):
    """`compare_policies`' table and the planner's PlanResult (None when nothing fits)."""
    import pandas as pd

    from tiertune.planner.search import plan_schedule, run_baselines
    base = run_baselines(model, train, hw)
    rows = []
    planned = None
    try:
        planned = plan_schedule(model, train, hw, time_limit_s, grad_ranks=grad_ranks, baselines=base,
                                max_compression_error=max_compression_error)
        lower = planned.lower
    except InputError as exc:
        from tiertune.planner.bounds import lower_bound
        lower = lower_bound(model, train, hw, grad_ranks=grad_ranks)     # (the ranks as asked: a loose bound)
        planner_why = str(exc)
    ideal = next((b for b in base if b.name == "ideal" and b.fits), None)
    for b in base:
        rows.append(_row(b.name, b.plan, b.sim, b.why))
    if planned is not None:
        rows.append(_row("planner", planned.plan, planned.sim, None))
    else:
        rows.append({"policy": "planner", "fits": False, "iteration_s": math.nan, "why_not_fit": planner_why})
    df = pd.DataFrame(rows)
    ideal_s = ideal.iteration_s if ideal else math.nan
    df["ratio_to_ideal"] = df["iteration_s"] / ideal_s
    # each plan against the bound of its own space: its GPU budget, and its gradient ranks if lossy
    plans = {b.name: b.plan for b in base} | ({"planner": planned.plan} if planned else {})
    df["ratio_to_lower_bound"] = [r["iteration_s"] / _bound_for(model, train, hw, plans.get(r["policy"]), lower)
                                  for r in rows]
    df.attrs.update(model=model.name, hardware=hw.name, lower_bound_s=lower.bound_s,
                    lower_bound_binding=lower.binding)
    cols = ["policy", "fits", "iteration_s", "tokens_per_s", "tflops", "peak_gpu_gib", "peak_cpu_gib",
            "peak_ssd_gib", "bottleneck", "ratio_to_ideal", "ratio_to_lower_bound", "lossless", "optimizer",
            "why_not_fit"]
    return df.reindex(columns=cols), planned


def _bound_for(model, train, hw, plan, lower) -> float:
    from tiertune.planner.bounds import lower_bound
    if plan is None:
        return math.nan
    ranks = tuple(sorted({lp.grad_rank for lp in plan.layers if lp.grad_rank is not None}))
    if not ranks and plan.globals.gpu_mem_bytes is None and plan.train == train:
        return lower.bound_s
    return lower_bound(model, plan.train, hw, plan.globals.gpu_mem_bytes, grad_ranks=ranks).bound_s


def _row(name, plan, sim, why) -> dict:
    if sim is None:
        return {"policy": name, "fits": False, "iteration_s": math.nan, "why_not_fit": why,
                "lossless": plan.lossless if plan else None}
    fits = bool(sim.fits)
    peak = sim.peak_bytes or {}
    return {"policy": name, "fits": fits,
            "iteration_s": float(sim.iteration_s) if fits else math.nan,
            "tokens_per_s": float(sim.tokens_per_s) if fits else math.nan,
            "tflops": float(sim.tflops) if fits else math.nan,
            "peak_gpu_gib": peak.get("gpu", 0) / GiB, "peak_cpu_gib": peak.get("cpu", 0) / GiB,
            "peak_ssd_gib": peak.get("ssd", 0) / GiB,
            "bottleneck": sim.bottleneck if fits else None, "lossless": plan.lossless,
            "optimizer": plan.train.optimizer, "why_not_fit": None if fits else (why or sim.error)}
