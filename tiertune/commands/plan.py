"""`tiertune plan` (search a per-layer schedule, write plan.json) and `tiertune compare` (every named
policy plus the planned schedule through the engine, one row each; CSV and a bar chart).

The comparison table itself is planner/compare.py's (reports build it too).
"""

from __future__ import annotations

import argparse
import math
import sys

from tiertune.commands.common import COUNT, FRACTION, SECONDS, add_workload_args, load_workload, print_json, stamp_model
from tiertune.errors import InputError
from tiertune.fileio import atomic_write, atomic_write_text, check_output
from tiertune.planner.compare import compare_policies


def register(sub) -> None:
    p = sub.add_parser("plan", help="search a per-layer offloading schedule (CP-SAT + engine)")
    add_workload_args(p)
    p.add_argument("--time-limit", type=SECONDS, default=30.0, metavar="S", help="planner time limit (seconds)")
    p.add_argument("--search", choices=("planner", "local"), default="planner",
                   help="planner: CP-SAT and engine-scored stages; local: a plain local search with the "
                        "simulator as its only oracle (the reference the planner must beat)")
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
    if args.search == "local":
        from tiertune.planner.local import plan_local
        res = plan_local(model, train, hw, args.time_limit, _ranks(args), log=_stderr)
    else:
        res = plan_schedule(model, train, hw, args.time_limit, grad_ranks=_ranks(args), log=_stderr,
                            max_compression_error=args.max_compression_error)
    if args.output:
        stamp_model(res.plan, model).save(args.output)
    s = res.summary()
    if args.json:
        print_json(s)
        return 0
    b = s["best_baseline"]
    bound = (f"{s['ratio_to_lower_bound']:.3f}x the lower bound {s['lower_bound_s']:.3f} s"
             if s["lower_bound_s"] is not None else f"no finite lower bound: {s['lower_bound_reason']}")
    print(f"plan for {model.name} on {hw.name}: {s['iteration_s']:.3f} s/iteration "
          f"({s['tokens_per_s']:.0f} tokens/s), {bound}; from {s['plan_from']}, prefetch depth {s['prefetch_depth']}"
          + (f", activations in {s['activation_slices']} slices" if s["activation_slices"] > 1 else ""))
    if b:
        print(f"best baseline {b['policy']}: {b['iteration_s']:.3f} s -> speedup {s['speedup_vs_best_baseline']:.2f}x")
    sv = s["solver"]
    if sv.get("status") is not None:
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
        lb = df.attrs["lower_bound_s"]
        print_json({"model": model.name, "hardware": hw.name, "lower_bound_s": lb if math.isfinite(lb) else None,
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
