"""Simulator fidelity on this machine: predicted vs measured iteration times of real runs.

For two model shapes and six plans (gpu-only, checkpoint, ZeRO-Offload, Fuyou-style SSD, LOMO, and
the planner's own schedule for a device budget that forces offloading), each plan is executed for
real (tiertune.executor.run.train_plan; the CPU stands in for the GPU) and simulated
(tiertune.traces.validate.predict) on

  before  the profile `tiertune calibrate --quick` measures (microbenchmarks only)
  after   that profile refit from measured traces (tiertune.traces.fit.fit_profiles) of the first
          round of runs, evaluated on the second round (other runs of the same plans); and, as
          a harder check, fit on the other model's first-round runs only

and, hardest, fit on the other five plans of the same model only (leave one plan out: the
profile has never seen the plan it predicts),

and reports per run the measured and predicted iteration time, MAPE, and Kendall's tau of the
ranking of plans by time. It also replays each measured trace with no change
(tiertune.traces.replay): the engine, given the measured durations, must reproduce the measured
iteration time (within 5%).

Torch runs one compute thread (`--threads`, as bench_executor.py): the main thread stands in for
the GPU, the copy engines and the CPU optimizer get the other core, as a GPU box leaves its CPU
cores to them. On a shared 2-core machine, torch's second intra-op thread waits a scheduler quantum
(~8 ms) per op whenever another process holds the other core.

    .venv/bin/python benchmarks/bench_fidelity.py [--steps 6] [--rounds 2] [--threads 1] [--out benchmarks/results]
    .venv/bin/python benchmarks/bench_fidelity.py --validate tiny-llama small-llama

The second form runs `tiertune validate` with its default profile (calibrate --quick, no trace of
the plan) for every named policy on each model, and writes fidelity_validate.csv (per run) and
fidelity_validate_kinds.csv (per task kind, summed over the runs).

Writes fidelity.csv, the fitted profile (fidelity_profile.toml) and
fidelity_predicted_vs_measured.{png,svg} under --out; --traces DIR keeps every measured trace.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tiertune.analysis import plots
from tiertune.executor.run import train_plan
from tiertune.hardware import HardwareProfile
from tiertune.planner.policies import make_policy
from tiertune.planner.search import plan_schedule
from tiertune.schedule import Plan
from tiertune.simulator import simulate
from tiertune.traces.calibrate import calibrate
from tiertune.traces.fit import fit_profiles
from tiertune.traces.replay import replay
from tiertune.traces.trace import Trace
from tiertune.traces.validate import compare, predict
from tiertune.workload import ModelSpec, TrainSpec

# Two shapes whose steps take ~50-500 ms on one core: a Llama (RMSNorm, SwiGLU, GQA) and a GPT-2
# (LayerNorm, GELU MLP, biases) of different widths, so a fit on one is a real test on the other.
MODELS = (
    ModelSpec(name="fid-llama", arch="llama", vocab_size=512, hidden=384, n_layers=6, n_heads=6, n_kv_heads=2,
              ffn_hidden=1024, max_seq_len=256),
    ModelSpec(name="fid-gpt2", arch="gpt", vocab_size=512, hidden=256, n_layers=8, n_heads=8, n_kv_heads=8,
              ffn_hidden=1024, max_seq_len=256, bias=True),
)
TRAIN = TrainSpec(batch=4, seq_len=64, dtype="fp32", optimizer="adamw")
POLICIES = ("gpu-only", "checkpoint", "zero-offload", "fuyou", "lomo")
PLANNER_BUDGET = 0.5        # x the gpu-only plan's simulated device peak: the planner must offload


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two rankings (ties in either count as neither concordant nor discordant)."""
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif da == db:
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom else float("nan")


def plans_for(model: ModelSpec, hw: HardwareProfile, planner_s: float) -> list[tuple[str, Plan, int | None]]:
    """(label, plan, device budget in bytes or None) for one model."""
    out = [(name, make_policy(name, model, TRAIN, hw), None) for name in POLICIES]
    gpu_only = out[0][1]
    full = simulate(model, gpu_only.train, hw, gpu_only, iterations=3)     # the policy's own train spec
    budget = int(full.peak_bytes["gpu"] * PLANNER_BUDGET)
    planned = plan_schedule(model, TRAIN, hw.replace(gpu_mem_bytes=budget), time_limit_s=planner_s).plan
    out.append(("planned", planned, budget))
    return out


def run_all(steps: int, rounds: int, planner_s: float, offload_dir: str) -> tuple[HardwareProfile, list[dict]]:
    """Calibrate, then run every (model, plan) `rounds` times back to back: a plan's fit-set run
    and its evaluation run see the same load from other processes (on a shared machine it drifts
    by tens of percent over a minute, which a fit cannot know about)."""
    t = time.perf_counter()
    hw, _ = calibrate("cpu", quick=True, offload_dir=offload_dir, progress=False)
    print(f"calibrate --quick: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    work = [(model, label, plan, budget) for model in MODELS for label, plan, budget in plans_for(model, hw, planner_s)]
    runs = []
    for model, label, plan, budget in work:
        for rnd in range(rounds):
            t = time.perf_counter()
            res = train_plan(model, plan, steps, gpu_mem_bytes=budget, offload_dir=offload_dir, progress=False)
            runs.append({"round": rnd, "model": model.name, "plan": label, "trace": res.trace})
            print(f"  round {rnd} {model.name:<10} {label:<13} {measured_s(res.trace) * 1e3:8.1f} ms/step "
                  f"({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    return hw, runs


def measured_s(trace: Trace) -> float:
    """Median gap between consecutive iteration ends after the first: one step slowed by another
    process does not move it (the mean gap, Trace.iteration_s, is what replay reproduces)."""
    ends = trace.iteration_ends().to_numpy(float)
    return float(np.median(np.diff(ends))) if len(ends) > 1 else trace.iteration_s()


def per_kind(runs: list[dict], profile_for) -> pd.DataFrame:
    """Measured and predicted seconds per task kind and resource, summed over every run's steady
    iterations: where the cost model is off."""
    frames = []
    for r in runs:
        val = compare(r["trace"], predict(r["trace"], profile_for(r["model"])).trace)
        frames.append(val.per_kind.assign(model=r["model"]))
    df = pd.concat(frames).groupby(["kind", "resource"])[["measured_s", "predicted_s"]].sum()
    df["error"] = (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    return df.sort_values("measured_s", ascending=False).reset_index()


def evaluate(runs: list[dict], profile_for) -> pd.DataFrame:
    rows = []
    for r in runs:
        trace: Trace = r["trace"]
        sim = predict(trace, profile_for(r["model"]))
        rows.append({"model": r["model"], "plan": r["plan"], "measured_s": measured_s(trace),
                     "predicted_s": sim.iteration_s if sim.fits else float("nan"), "sim_error": sim.error})
    df = pd.DataFrame(rows)
    df["error"] = (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    return df


def summary(df: pd.DataFrame) -> dict:
    taus = {m: kendall_tau(list(g["measured_s"]), list(g["predicted_s"])) for m, g in df.groupby("model")}
    return {"mape": plots.mape(df["predicted_s"], df["measured_s"]), "tau": taus,
            "tau_all": kendall_tau(list(df["measured_s"]), list(df["predicted_s"]))}


def validate_policies(models: list[str], steps: int, out: Path, traces: Path | None = None) -> int:
    """`tiertune validate --model M --policy P --steps N` for every named policy on each model, as a
    user runs it: the default profile (`calibrate --quick` measured at the start of each run, no
    trace of the plan). Prints and writes fidelity_validate.csv: measured and predicted iteration
    time and the error; a policy the executor cannot run is listed with its reason. Then, summed
    over every run, measured and predicted seconds per task kind and resource (which kinds the
    default profile predicts short), into fidelity_validate_kinds.csv."""
    import contextlib
    import io
    import json

    from tiertune.cli import main as cli
    from tiertune.planner.policies import POLICIES

    rows, kinds = [], []
    for model in models:
        for policy in POLICIES:
            stdout, stderr = io.StringIO(), io.StringIO()
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory(prefix="tiertune-validate-") as tmp, \
                    contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = cli(["validate", "--model", model, "--policy", policy, "--steps", str(steps), "--json",
                          "--trace-dir", tmp])
                if rc == 0:
                    meas, pred = Trace.load(Path(tmp) / "measured.json"), Trace.load(Path(tmp) / "predicted.json")
                    kinds.append(compare(meas, pred).per_kind.assign(model=model, policy=policy))
                    if traces is not None:
                        traces.mkdir(parents=True, exist_ok=True)
                        meas.save(traces / f"{model}-{policy}-measured.json")
                        pred.save(traces / f"{model}-{policy}-predicted.json")
            row = {"model": model, "policy": policy, "load": load}
            if rc == 0:
                res = json.loads(stdout.getvalue())
                row.update(measured_s=res["measured_s"], predicted_s=res["predicted_s"], error=res["iteration_error"])
            else:
                row.update(note=stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {rc}")
            rows.append(row)
            print(f"  {model:<12} {policy:<14} " + (f"measured {row['measured_s'] * 1e3:8.1f} ms  predicted "
                  f"{row['predicted_s'] * 1e3:8.1f} ms  {row['error']:+7.1%}" if rc == 0 else row["note"])
                  + f"  (load {load:.1f})", file=sys.stderr)
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "fidelity_validate.csv", index=False)
    ok = df.dropna(subset=["error"]) if "error" in df else df.iloc[0:0]
    print(f"\ntiertune validate, default profile, {steps} steps: {len(ok)} of {len(df)} runs executed; "
          f"|error| median {ok['error'].abs().median():.1%}, max {ok['error'].abs().max():.1%}, "
          f"{int((ok['error'].abs() <= 0.2).sum())} within 20%; wrote {out / 'fidelity_validate.csv'}")
    if kinds:
        per = pd.concat(kinds).groupby(["model", "kind", "resource"])[["measured_s", "predicted_s"]].sum()
        per["error"] = (per["predicted_s"] - per["measured_s"]) / per["measured_s"]
        per = per.sort_values("measured_s", ascending=False).reset_index()
        per.to_csv(out / "fidelity_validate_kinds.csv", index=False)
        print("\nper task kind, summed over the runs above (seconds per steady iteration):")
        print(per.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every plan; the first round is the fit set")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--planner-s", type=float, default=10.0, help="time limit of the planner per model")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--traces", metavar="DIR", help="also write every measured trace here (Perfetto JSON); with --validate, each run's "
                    "measured and predicted trace")
    ap.add_argument("--validate", nargs="+", metavar="MODEL",
                    help="instead: `tiertune validate` with the default profile, every named policy on each model")
    args = ap.parse_args()
    if args.validate:
        torch.set_num_threads(args.threads)
        return validate_policies(args.validate, args.steps, Path(args.out),
                                     Path(args.traces) if args.traces else None)
    if args.rounds < 2 or args.steps < 3:
        ap.error("--rounds must be >= 2 (fit on one, evaluate on another) and --steps >= 3")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tiertune-fidelity-") as tmp:
        hw, runs = run_all(args.steps, args.rounds, args.planner_s, tmp)
    if args.traces:
        Path(args.traces).mkdir(parents=True, exist_ok=True)
        for r in runs:
            r["trace"].save(Path(args.traces) / f"{r['model']}-{r['plan']}-round{r['round']}.json")
    fit_set = [r for r in runs if r["round"] == 0]
    test_set = [r for r in runs if r["round"] > 0]
    before = evaluate(test_set, lambda m: hw)
    # Held out twice over: fit on the first round's runs, evaluate on the later rounds' runs;
    # and, harder, fit on the first round's runs of the other model only.
    fit_runs = fit_profiles([r["trace"] for r in fit_set], hw)
    print(f"\nprofile fit on round 0 (all runs):\n{fit_runs.table()}", file=sys.stderr)
    after = evaluate(test_set, lambda m: fit_runs.profile)
    cross = {m.name: fit_profiles([r["trace"] for r in fit_set if r["model"] != m.name], hw).profile for m in MODELS}
    other = evaluate(test_set, lambda m: cross[m])
    # Leave one plan out: for each (model, plan), fit on round 0 of that model's other plans and
    # predict this plan's evaluation runs, so the profile has never seen the plan it predicts.
    held = []
    for (mname, label), runs_of in itertools.groupby(test_set, key=lambda r: (r["model"], r["plan"])):
        fit = fit_profiles([r["trace"] for r in fit_set if r["model"] == mname and r["plan"] != label], hw).profile
        held.append(evaluate(list(runs_of), lambda m, fit=fit: fit))
    loo = pd.concat(held, ignore_index=True)
    table = before[["model", "plan", "measured_s"]].assign(
        predicted_before_s=before["predicted_s"], error_before=before["error"],
        predicted_after_s=after["predicted_s"], error_after=after["error"],
        error_other_model_fit=other["error"], predicted_loo_s=loo["predicted_s"], error_loo=loo["error"])
    replays = []
    for r in test_set:
        rep = replay(r["trace"], hardware=hw)
        replays.append((rep.iteration_s - rep.recorded_iteration_s) / rep.recorded_iteration_s)
    table["replay_error"] = replays
    table = table.groupby(["model", "plan"], sort=False).median().reset_index()   # over evaluation rounds

    pd.set_option("display.width", 200)
    print(f"\nload average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; torch threads {args.threads}; "
          f"{args.steps} steps per run, {args.rounds} rounds (fit on round 0, evaluated on the rest)\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for name, col in (("before (calibrate --quick)", "predicted_before_s"),
                      ("after (fit on round 0, all runs)", "predicted_after_s"),
                      ("leave one plan out (fit on the other 5)", "predicted_loo_s")):
        s = summary(table.rename(columns={col: "predicted_s"}))
        taus = ", ".join(f"{m} {t:.2f}" for m, t in s["tau"].items())
        print(f"{name:<42} MAPE {s['mape']:5.1f}%   Kendall tau {taus}; all runs {s['tau_all']:.2f}")
    o = summary(other.groupby(["model", "plan"], sort=False)[["measured_s", "predicted_s"]].median().reset_index())
    print(f"{'after (fit on the other model, round 0)':<42} MAPE {o['mape']:5.1f}%   Kendall tau "
          + ", ".join(f"{m} {t:.2f}" for m, t in o["tau"].items()) + f"; all runs {o['tau_all']:.2f}")
    for name, fn in (("before", lambda m: hw), ("after", lambda m: fit_runs.profile)):
        print(f"\nper task kind, evaluation runs, {name}:")
        print(per_kind(test_set, fn).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    rep = np.abs(np.array(replays))
    print(f"\n{'replay with no change':<42} |error| median {np.median(rep):.1%}, max {rep.max():.1%} "
          f"({int((rep <= 0.05).sum())} of {len(rep)} within 5%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "fidelity.csv", index=False)
    (out / "fidelity_profile.toml").write_text(fit_runs.profile.to_toml())
    pv = table.assign(label=table["model"].str.replace("fid-", "") + " " + table["plan"],
                      predicted_s=table["predicted_after_s"])
    files = plots.save(plots.predicted_vs_measured(pv), out / "fidelity_predicted_vs_measured")
    print(f"wrote {out / 'fidelity.csv'}, {out / 'fidelity_profile.toml'}, {', '.join(map(str, files))} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
