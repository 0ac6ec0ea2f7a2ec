"""`tiertune simulate`: run a plan (from a file or a named policy) through the discrete-event simulator."""

from __future__ import annotations

import argparse
import dataclasses

from tiertune.commands.common import ITERATIONS, add_workload_args, check_plan_model, load_workload, print_json, train_from_plan
from tiertune.errors import InputError
from tiertune.fileio import check_output
from tiertune.hardware import GiB
from tiertune.vocab import RESOURCES



def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate a plan: iteration time, peak memory per tier, bottleneck")
    add_workload_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan JSON (tiertune.plan/1)")
    src.add_argument("--policy", help="a named policy (ideal, gpu-only, ...; see `tiertune plan --help`)")
    p.add_argument("--iterations", type=ITERATIONS, default=None, help="iterations to simulate (default: the plan's)")
    p.add_argument("--trace", default=None, metavar="OUT", help="write the simulated trace (.json/.parquet/.csv)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tiertune.schedule import Plan
    from tiertune.simulator import simulate

    if args.trace:
        check_output(args.trace, "--trace")
    model, train, hw = load_workload(args)
    if args.plan:
        plan = Plan.load(args.plan)
        check_plan_model(plan, model, args.plan)
        train = train_from_plan(plan, args)
        if train != plan.train:
            plan = plan.replace(train=train)
        if args.gpu_mem is not None and plan.globals.gpu_mem_bytes is not None:
            # An explicit --gpu-mem is the budget to check against, not the one the plan was made for.
            plan = plan.replace(globals=dataclasses.replace(plan.globals, gpu_mem_bytes=None))
    else:
        from tiertune.planner.policies import make_policy

        plan = make_policy(args.policy, model, train, hw)
    result = simulate(model, plan.train, hw, plan, iterations=args.iterations)
    # A plan that does not fit is a result (exit 0, with or without --trace), and has no trace.
    if args.trace and result.fits:
        result.trace.save(args.trace)
    if args.json:
        out = result.to_dict()
        if args.trace:
            out["trace"] = args.trace if result.fits else None
        print_json(out)
        return 0
    print(f"{model.name} on {hw.name}, plan {plan.provenance.get('policy', args.plan or args.policy)}: "
          f"batch {plan.train.batch} x seq {plan.train.seq_len}, {plan.train.optimizer}, {plan.train.dtype}")
    if not result.fits:
        print(f"  {result.error}")
        if args.trace:
            print(f"  no trace written to {args.trace}: the plan does not fit")
        return 0
    print(f"  iteration  {result.iteration_s:.4g} s   {result.tokens_per_s:,.0f} tokens/s   "
          f"{result.tflops:.1f} TFLOP/s")
    print("  peak       " + "   ".join(f"{t} {b / GiB:.2f} GiB" for t, b in result.peak_bytes.items()))
    print("  busy/iter  " + "   ".join(f"{r} {result.busy_s[r]:.3g}s" for r in RESOURCES))
    print(f"  bottleneck {result.bottleneck}   ({result.events} tasks simulated in {result.sim_wall_s * 1e3:.1f} ms)")
    for note in plan.notes():
        print(f"  note: {note}")
    if args.trace:
        print(f"  trace written to {args.trace}")
    return 0
