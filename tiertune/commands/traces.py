"""`tiertune replay` (what-if on a recorded trace) and `tiertune validate` (executor vs simulator)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tiertune.commands.common import COUNT, GIB, THREADS, THREADS_HELP, print_json, set_compute_threads
from tiertune.errors import InputError
from tiertune.fileio import check_output, check_output_dir

GiB = 1 << 30


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

    v = sub.add_parser("validate", help="execute a plan, simulate the same plan, and compare the two")
    v.add_argument("--model", required=True, help="model preset name")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan JSON (tiertune.plan/1)")
    src.add_argument("--policy", help="a named policy, made for the profile")
    v.add_argument("--profile", default=None,
                   help="hardware profile to simulate with (default: `calibrate --quick` of this machine, measured now)")
    v.add_argument("--gpu-mem", type=GIB, default=None, metavar="GiB", help="device memory budget")
    v.add_argument("--batch", type=COUNT, default=None, help="micro-batch size (default 4, or the plan's)")
    v.add_argument("--seq", type=COUNT, default=None, help="sequence length (default 64, or the plan's)")
    v.add_argument("--steps", type=COUNT, required=True, help="steps to execute (>= 2: the first is warm-up)")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    v.add_argument("--offload-dir", default=None, help="directory for SSD-homed state (default: a temporary one)")
    v.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    v.add_argument("--trace-dir", default=None, help="write measured.json and predicted.json here")
    v.add_argument("--plot", default=None, metavar="OUT", help="side-by-side timeline (OUT.png and OUT.svg)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=run_validate)


def run_replay(args: argparse.Namespace) -> int:
    from tiertune.schedule import Plan
    from tiertune.traces.replay import parse_scale, replay, whatif
    from tiertune.traces.trace import Trace

    scale = parse_scale(args.scale)
    if args.whatif:
        for suffix in (".png", ".svg"):
            check_output(_plot_base(args.whatif) + suffix, "--whatif")
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


def _plot_base(path: str) -> str:
    """Where plots.save writes OUT.png and OUT.svg (a trailing .png/.svg dropped)."""
    p = Path(path)
    return str(p.with_suffix("") if p.suffix in (".png", ".svg") else p)


def run_validate(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise InputError(f"--steps must be at least 2 (the first step is warm-up), got {args.steps}")
    if args.trace_dir:
        check_output_dir(args.trace_dir, "--trace-dir")
    if args.plot:
        for suffix in (".png", ".svg"):
            check_output(_plot_base(args.plot) + suffix, "--plot")
    from tiertune.commands.execute import plan_for
    from tiertune.hardware import load_hardware
    from tiertune.workload import load_model

    spec = load_model(args.model)
    # On a CPU standing in for the GPU, a second intra-op thread fights the executor's copy and
    # optimizer threads for the cores (and on a shared machine waits a scheduler quantum per op
    # while another process holds a core): timings then say more about the load than the plan.
    set_compute_threads(args.threads, args.device)
    trace_dir = Path(args.trace_dir) if args.trace_dir else None
    if args.profile:
        hw = load_hardware(args.profile)
    else:
        from tiertune.traces.calibrate import calibrate
        hw, _ = calibrate(args.device, quick=True, progress=False)
    hw = hw.with_gpu_mem(args.gpu_mem)
    plan = plan_for(spec, hw, plan_path=args.plan, policy=args.policy, batch=args.batch, seq=args.seq,
                    dtype="bf16" if args.device == "cuda" and not args.plan else None)

    from tiertune.executor.run import train_plan
    from tiertune.traces.validate import compare, predict

    budget = int(args.gpu_mem * GiB) if args.gpu_mem is not None else None
    run = train_plan(spec, plan, args.steps, device=args.device, gpu_mem_bytes=budget,
                     offload_dir=args.offload_dir, progress=not args.json)
    measured = run.trace
    sim = predict(measured, hw)
    if not sim.fits:
        raise InputError(f"the simulator says the plan does not run on profile {hw.name}: {sim.error}")
    predicted = sim.trace
    val = compare(measured, predicted)
    out = val.to_dict()
    out.update({"model": spec.name, "plan": plan.provenance.get("policy", args.plan), "profile": hw.name,
                "steps": args.steps})
    for k in ("iteration_error",):
        if not math.isfinite(out[k]):
            raise InputError(f"{k} is not finite: measured {val.measured_s} s, predicted {val.predicted_s} s")
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        measured.save(trace_dir / "measured.json")
        predicted.save(trace_dir / "predicted.json")
        out["traces"] = [str(trace_dir / "measured.json"), str(trace_dir / "predicted.json")]
    if args.plot:
        from tiertune.analysis import plots

        out["plot"] = [str(p) for p in plots.save(plots.timeline(predicted, measured=measured), args.plot)]
    if args.json:
        print_json(out)
        return 0
    print(f"validate {spec.name}, plan {out['plan']}, profile {hw.name}: measured {val.measured_s * 1e3:.1f} ms, "
          f"predicted {val.predicted_s * 1e3:.1f} ms per iteration ({val.iteration_error:+.1%})")
    print(_table(val))
    for key, what in (("traces", "traces"), ("plot", "plot")):
        if key in out:
            print(f"{what}: {', '.join(out[key])}")
    return 0


def _table(val) -> str:
    """Per task kind, per resource (busy) and per tier (peak): measured, predicted, error."""
    def pct(e) -> str:
        return "    -" if e is None or not math.isfinite(e) else f"{e:+6.1%}"

    lines = [f"  {'kind':<12}{'resource':<11}{'measured ms':>12}{'predicted ms':>13}{'error':>9}"]
    for r in val.per_kind.sort_values("measured_s", ascending=False).itertuples(index=False):
        lines.append(f"  {r.kind:<12}{r.resource:<11}{r.measured_s * 1e3:>12.2f}{r.predicted_s * 1e3:>13.2f}{pct(r.error):>9}")
    lines.append(f"  {'busy':<12}{'resource':<11}")
    for r in val.per_resource.itertuples(index=False):
        lines.append(f"  {'':<12}{r.resource:<11}{r.measured_s * 1e3:>12.2f}{r.predicted_s * 1e3:>13.2f}{pct(r.error):>9}")
    lines.append(f"  {'peak':<12}{'tier':<11}{'measured MiB':>12}{'predicted MiB':>13}")
    for r in val.peaks.itertuples(index=False):
        lines.append(f"  {'':<12}{r.tier:<11}{r.measured_bytes / 2**20:>12.1f}{r.predicted_bytes / 2**20:>13.1f}{pct(r.error):>9}")
    return "\n".join(lines)
