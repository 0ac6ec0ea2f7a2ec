"""`tiertune plan` (search a per-layer schedule, write plan.json) and `tiertune compare` (every named
policy plus the planned schedule through the engine, one row each; CSV and a bar chart).

`compare_policies` builds the comparison table; reports and plots call it too.
"""

from __future__ import annotations

import argparse
import math
import sys

from tiertune.commands.common import COUNT, FRACTION, SECONDS, add_workload_args, load_workload, print_json, stamp_model
from tiertune.errors import InputError
from tiertune.fileio import atomic_write, atomic_write_text, check_output
from tiertune.hardware import GiB, HardwareProfile
from tiertune.workload import ModelSpec, TrainSpec


def register(sub) -> None:
    p = sub.add_parser("plan", help="search a per-layer offloading schedule (CP-SAT + engine)")
    add_workload_args(p)
    p.add_argument("--time-limit", type=SECONDS, default=30.0, metavar="S", help="planner time limit (seconds)")
    _add_rank_args(p)
    p.add_argument("-o", "--output", default=None, help="write the plan JSON here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_plan)

    c = sub.add_parser("compare", help="every policy and the planned schedule through the simulator")
    add_workload_args(c)
    c.add_argument("--time-limit", type=SECONDS, default=30.0, metavar="S", help="planner time limit (seconds)")
    _add_rank_args(c)
    c.add_argument("--csv", default=None, help="write the table as CSV")
    c.add_argument("--plot", default=None, help="write a bar chart of iteration time per policy (PNG)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_compare)


def _add_rank_args(p) -> None:
    p.add_argument("--grad-rank", type=COUNT, action="append", default=None, metavar="D",
                   help="allow LSP gradient compression at rank D (repeatable); lossless when omitted")
    p.add_argument("--max-compression-error", type=FRACTION, default=None, metavar="E",
                   help="drop ranks whose estimated relative compression error exceeds E (0 < E <= 1; the "
                        "estimate is planner/compression.py's); alone, picks among hidden/8 .. hidden")


def _ranks(args) -> tuple[int, ...]:
    ranks = tuple(args.grad_rank or ())
    if any(r <= 0 for r in ranks):
        raise InputError(f"--grad-rank must be positive, got {ranks}")
    cap = args.max_compression_error
    if cap is not None and not 0 < cap <= 1:
        raise InputError(f"--max-compression-error must be in (0, 1], got {cap}")
    return ranks


def run_plan(args: argparse.Namespace) -> int:
    from tiertune.planner.search import plan_schedule
    if args.output:
        check_output(args.output, "-o")
    model, train, hw = load_workload(args)
    res = plan_schedule(model, train, hw, args.time_limit, grad_ranks=_ranks(args), log=_stderr,
                        max_compression_error=args.max_compression_error)
    if args.output:
        stamp_model(res.plan, model).save(args.output)
    s = res.summary()
    if args.json:
        print_json(s)
        return 0
    b = s["best_baseline"]
    print(f"plan for {model.name} on {hw.name}: {s['iteration_s']:.3f} s/iteration "
          f"({s['tokens_per_s']:.0f} tokens/s), {s['ratio_to_lower_bound']:.3f}x the lower bound "
          f"{s['lower_bound_s']:.3f} s")
    if b:
        print(f"best baseline {b['policy']}: {b['iteration_s']:.3f} s -> speedup {s['speedup_vs_best_baseline']:.2f}x")
    sv = s["solver"]
    print(f"CP-SAT: {sv['status']}, objective {_fmt(sv['objective_s'])} s, bound {_fmt(sv['bound_s'])} s, "
          f"wall {sv['wall_s']:.1f} s; engine vs solver {_fmt(s['engine_vs_solver'], pct=True)}")
    for n in s["notes"]:
        print(f"note: {n}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _stderr(msg: str) -> None:
    """Progress for a person watching (like tqdm's bars, only on a terminal): piped stderr keeps
    the one-line-error contract."""
    if sys.stderr.isatty():
        print(msg, file=sys.stderr, flush=True)


def _fmt(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:+.1f}%" if pct else f"{x:.3f}"


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


def plot_compare(df, path: str) -> None:
    """Horizontal bars of iteration time per policy, one fixed colour per policy; non-fitting
    policies get a hatched stub and their reason."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tiertune.analysis.style import policy_color
    d = df.iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(d) + 1.2))
    fitting = d["iteration_s"].dropna()
    stub = fitting.max() * 0.04 if len(fitting) else 1.0
    for y, (_, r) in enumerate(d.iterrows()):
        if r["fits"]:
            ax.barh(y, r["iteration_s"], color=policy_color(r["policy"]))
            ax.text(r["iteration_s"], y, f" {r['iteration_s']:.2f} s", va="center", fontsize=8)
        else:
            ax.barh(y, stub, color="white", edgecolor=policy_color(r["policy"]), hatch="///")
            ax.text(stub, y, " does not fit", va="center", fontsize=8, color="#555555")
    ax.set_yticks(range(len(d)), d["policy"])
    ax.set_xlabel("iteration time (s, engine)")
    lb = df.attrs.get("lower_bound_s")
    if lb and math.isfinite(lb):
        ax.axvline(lb, color="black", linestyle=":", linewidth=1)
        ax.text(lb, len(d) - 0.5, " lower bound", fontsize=8)
    ax.set_title(f"{df.attrs.get('model', '')} on {df.attrs.get('hardware', '')}")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def run_compare(args: argparse.Namespace) -> int:
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path:
            check_output(path, flag)
    model, train, hw = load_workload(args)
    df = compare_policies(model, train, hw, args.time_limit, _ranks(args), args.max_compression_error)
    if args.csv:
        atomic_write_text(args.csv, df.to_csv(index=False))
    if args.plot:
        plot_compare(df, args.plot)
    if args.json:
        print_json({"model": model.name, "hardware": hw.name, "lower_bound_s": df.attrs["lower_bound_s"],
                    "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                             for r in df.to_dict("records")]})
        return 0
    with_nan = df.copy()
    show = ["policy", "fits", "iteration_s", "tokens_per_s", "tflops", "peak_gpu_gib", "peak_cpu_gib",
            "peak_ssd_gib", "bottleneck", "ratio_to_ideal", "ratio_to_lower_bound", "lossless"]
    sys.stdout.write(with_nan[show].to_string(index=False, float_format=lambda x: f"{x:.3f}") + "\n")
    for _, r in df[~df["fits"].astype(bool)].iterrows():
        print(f"{r['policy']}: {r['why_not_fit']}")
    lossy = df[df["fits"].astype(bool) & df["lossless"].eq(False)]      # None: unknown
    if len(lossy) and not _ranks(args) and args.max_compression_error is None:
        print(f"note: {', '.join(lossy['policy'])} compress(es) gradients (lossy); the planner searched lossless "
              f"schedules only: --grad-rank D or --max-compression-error E lets it compress too")
    return 0
