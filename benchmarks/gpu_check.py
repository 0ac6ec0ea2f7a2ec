"""One command for a machine with a GPU: calibrate it, run the executor on CUDA for five plans, and
check the simulator against those runs (the profile as calibrated, and refit from traces with each
plan left out of its own fit); every figure goes to one JSON file.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json] [--device cuda] [--toy]

Sized for <= 8 minutes on one H100/H200-class GPU: a 24-layer Llama of hidden 2048 (~1.3 B
parameters) at batch 4 x 1024 tokens in bf16, 6 steps per plan; `--toy` runs a tiny Llama for 3
steps on the CPU (what CI runs, so the script cannot rot; a toy run's figures mean nothing). Each
stage records its error instead of stopping the others: the CUDA paths of calibrate and the
executor have run on a GPU only through this script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import kendall_tau, measured_s  # noqa: E402  (a sibling benchmark script)

from tiertune.executor.run import train_plan  # noqa: E402
from tiertune.fileio import atomic_write_text  # noqa: E402
from tiertune.planner.policies import make_policy  # noqa: E402
from tiertune.traces.calibrate import calibrate  # noqa: E402
from tiertune.traces.fit import fit_profiles  # noqa: E402
from tiertune.traces.validate import predict  # noqa: E402
from tiertune.workload import ModelSpec, TrainSpec, load_model  # noqa: E402

POLICIES = ("gpu-only", "checkpoint", "zero-offload", "fuyou", "lomo")
FULL = (ModelSpec(name="check-1.3b", arch="llama", vocab_size=32000, hidden=2048, n_layers=24, n_heads=16,
                  n_kv_heads=16, ffn_hidden=5504, max_seq_len=2048),
        TrainSpec(batch=4, seq_len=1024, dtype="bf16", optimizer="adamw"), 6)
TOY = (load_model("tiny-llama"), TrainSpec(batch=2, seq_len=32, dtype="fp32", optimizer="adamw"), 3)


def _stage(report: dict, name: str, fn):
    """Run one stage; its result, or its error and traceback, lands in report[name]."""
    t = time.perf_counter()
    try:
        out = fn()
        report[name] = {"ok": True, "wall_s": time.perf_counter() - t, **(out or {})}
    except Exception as exc:        # noqa: BLE001  (a stage's failure is a finding, not the end)
        report[name] = {"ok": False, "wall_s": time.perf_counter() - t, "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(limit=8)}
    print(f"{name}: {'ok' if report[name]['ok'] else report[name]['error']} "
          f"({report[name]['wall_s']:.1f} s)", file=sys.stderr)


def _mape(pairs: list[tuple[float, float]]) -> float:
    errs = [abs(p - m) / m for p, m in pairs if m > 0 and math.isfinite(p)]
    return 100.0 * sum(errs) / len(errs) if errs else math.nan


def check(device: str, toy: bool, offload_dir: str) -> dict:
    model, train, steps = TOY if toy else FULL
    report: dict = {"device": device, "toy": toy, "model": model.name, "train": train.to_dict(), "steps": steps,
                    "host": platform.node()}
    state: dict = {}

    def do_calibrate():
        hw, _ = calibrate(device, quick=toy, offload_dir=offload_dir, progress=False)
        state["hw"] = hw
        return {"profile": hw.summary(), "backward_factor": hw.backward_factor,
                "task_overheads_us": {k: {lk: v * 1e6 for lk, v in row.items()} for k, row in hw.task_overheads.items()}}

    def do_execute():
        hw = state["hw"]
        runs = {}
        for name in POLICIES:
            plan = make_policy(name, model, train, hw)
            res = train_plan(model, plan, steps, device=device, offload_dir=offload_dir, progress=False)
            runs[name] = res.trace
        state["traces"] = runs
        return {"measured_s": {k: measured_s(t) for k, t in runs.items()},
                "losses_finite": all(math.isfinite(float(v)) for t in runs.values()
                                     for v in t.meta.get("losses", []) or [0.0])}

    def do_fidelity():
        hw, traces = state["hw"], state["traces"]
        names = list(traces)
        measured = [measured_s(traces[k]) for k in names]
        before = [predict(traces[k], hw).iteration_s for k in names]
        # leave one plan out: fit on the other plans' traces, predict the plan left out
        held_out = [predict(traces[k], fit_profiles([traces[j] for j in names if j != k], hw).profile).iteration_s
                    for k in names]
        return {"plans": names, "measured_s": measured, "predicted_calibrated_s": before,
                "predicted_leave_one_plan_out_s": held_out,
                "mape_calibrated_pct": _mape(list(zip(before, measured))),
                "mape_leave_one_plan_out_pct": _mape(list(zip(held_out, measured))),
                "kendall_tau_calibrated": kendall_tau(measured, before),
                "kendall_tau_leave_one_plan_out": kendall_tau(measured, held_out)}

    _stage(report, "calibrate", do_calibrate)
    if report["calibrate"]["ok"]:
        _stage(report, "executor", do_execute)
    if report.get("executor", {}).get("ok"):
        _stage(report, "fidelity", do_fidelity)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the one file every figure goes to")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--toy", action="store_true", help="tiny model, 3 steps, on the CPU (CI)")
    args = ap.parse_args(argv)
    device = "cpu" if args.toy else args.device
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA device (use --toy for the CPU check)", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiertune-gpu-check-") as tmp:
        report = check(device, args.toy, tmp)
    report["wall_s"] = time.perf_counter() - t0
    atomic_write_text(args.out, json.dumps(report, indent=1, default=str) + "\n")
    ok = all(report.get(s, {}).get("ok") for s in ("calibrate", "executor", "fidelity"))
    print(f"wrote {args.out} in {report['wall_s']:.0f} s; {'all stages ran' if ok else 'a stage failed: see the file'}",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
