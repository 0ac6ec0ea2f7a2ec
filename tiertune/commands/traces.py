"""`tiertune replay` (what-if on a recorded trace) and `tiertune validate` (executor vs simulator)."""

from __future__ import annotations

import argparse

from tiertune.commands.common import print_json


def register(sub) -> None:
    p = sub.add_parser("replay", help="re-run a recorded trace with resources scaled (what if PCIe were 2x faster?)")
    p.add_argument("trace", help="trace file (.json, .parquet or .csv) written by simulate or execute")
    p.add_argument("--scale", action="append", metavar="RESOURCE=FACTOR",
                   help="speed factor for a resource (gpu, h2d, d2h, cpu, ssd_read, ssd_write); repeatable")
    p.add_argument("--plan", default=None, help="plan to rebuild dependencies from (default: the one the trace recorded)")
    p.add_argument("--hardware", default=None, help="profile for tasks the trace did not time (default: the trace's)")
    p.add_argument("--whatif", default=None, metavar="PLOT", help="also sweep each busy resource x0.5 and x2 and plot it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    from tiertune.schedule import Plan
    from tiertune.traces.replay import parse_scale, replay, whatif
    from tiertune.traces.trace import Trace

    scale = parse_scale(args.scale)
    trace = Trace.load(args.trace)
    plan = Plan.load(args.plan) if args.plan else None
    res = replay(trace, scale, plan=plan, hardware=args.hardware)
    out = res.to_dict()
    if args.whatif:
        from tiertune.analysis import plots

        df = whatif(trace, plan=plan, hardware=args.hardware)
        out["whatif_plot"] = [str(p) for p in plots.save(plots.whatif_bars(df), args.whatif)]
    if args.json:
        print_json(out)
        return 0
    change = ", ".join(f"{k} x{v:g}" for k, v in scale.items()) or "no change"
    print(f"replay of {args.trace} ({change}): {res.recorded_iteration_s:.4g} s -> {res.iteration_s:.4g} s per "
          f"iteration ({res.recorded_iteration_s / res.iteration_s:.2f}x), bottleneck {res.bottleneck}, "
          f"{res.coverage:.0%} of tasks timed from the trace")
    if args.whatif:
        print(f"what-if plot: {', '.join(out['whatif_plot'])}")
    return 0
