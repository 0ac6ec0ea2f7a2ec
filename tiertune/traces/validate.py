"""Compare a measured trace with the simulator's prediction of the same plan.

`compare(measured, predicted)` works on any two Traces (pandas groupby on the tidy tables):
iteration time, busy time per resource, mean duration per task kind, peak bytes per tier.
`predict(measured, hw)` simulates the plan a measured trace recorded, on a given profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from tiertune.hardware import HardwareProfile
from tiertune.schedule import Plan
from tiertune.simulator import simulate
from tiertune.simulator.run import SimResult
from tiertune.traces.trace import Trace, own_durations
from tiertune.vocab import TIERS
from tiertune.errors import InputError
from tiertune.workload import ModelSpec, TrainSpec, load_model


def _rel(pred: float, meas: float) -> float | None:
    return None if meas == 0 else (pred - meas) / meas


@dataclass
class Validation:
    measured_s: float
    predicted_s: float
    per_kind: pd.DataFrame          # kind, resource, measured_s, predicted_s, error (per steady iteration)
    per_resource: pd.DataFrame      # resource, measured_s, predicted_s, error
    peaks: pd.DataFrame             # tier, measured_bytes, predicted_bytes, error

    @property
    def iteration_error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s

    def to_dict(self) -> dict:
        def errs(df, key):
            return {str(k): (None if pd.isna(e) else float(e)) for k, e in zip(df[key], df["error"])}
        kinds = self.per_kind.groupby("kind")[["measured_s", "predicted_s"]].sum()
        return {"measured_s": self.measured_s, "predicted_s": self.predicted_s,
                "iteration_error": self.iteration_error,
                "per_kind_error": {k: _rel(r.predicted_s, r.measured_s) for k, r in kinds.iterrows()},
                "busy_error": errs(self.per_resource, "resource"),
                "peak_error": errs(self.peaks, "tier")}


def _per_iteration(trace: Trace, by: list[str]) -> pd.DataFrame:
    ev = trace.steady_events()
    n = max(ev["iteration"].nunique(), 1)
    return (own_durations(ev).groupby([ev[c] for c in by]).sum() / n).rename("s")


def compare(measured: Trace, predicted: Trace) -> Validation:
    kinds = pd.concat([_per_iteration(measured, ["kind", "resource"]).rename("measured_s"),
                       _per_iteration(predicted, ["kind", "resource"]).rename("predicted_s")], axis=1).fillna(0.0)
    kinds["error"] = [(p - m) / m if m > 0 else float("nan") for m, p in zip(kinds.measured_s, kinds.predicted_s)]
    res = pd.concat([_per_iteration(measured, ["resource"]).rename("measured_s"),
                     _per_iteration(predicted, ["resource"]).rename("predicted_s")], axis=1).fillna(0.0)
    res["error"] = [(p - m) / m if m > 0 else float("nan") for m, p in zip(res.measured_s, res.predicted_s)]
    mp, pp = measured.peak_bytes(), predicted.peak_bytes()
    peaks = pd.DataFrame({"tier": list(TIERS), "measured_bytes": [mp[t] for t in TIERS],
                          "predicted_bytes": [pp[t] for t in TIERS]})
    peaks["error"] = [(p - m) / m if m > 0 else float("nan") for m, p in zip(peaks.measured_bytes, peaks.predicted_bytes)]
    return Validation(measured.iteration_s(), predicted.iteration_s(), kinds.reset_index(),
                      res.reset_index(), peaks)


def workload_of(trace: Trace) -> tuple[ModelSpec, TrainSpec, Plan]:
    meta = trace.meta
    if "plan" not in meta:
        raise InputError("the trace records no plan to predict")
    plan = Plan.from_dict(meta["plan"])
    model = ModelSpec(**meta["model_spec"]) if "model_spec" in meta else load_model(str(meta.get("model", plan.model)))
    train = TrainSpec.from_dict(meta["train"]) if "train" in meta else plan.train
    return model, train, plan


def predict(measured: Trace, hw: HardwareProfile) -> SimResult:
    """The simulator's prediction of the run a measured trace recorded, with the run's own budgets."""
    model, train, plan = workload_of(measured)
    cap = measured.meta.get("capacity", {})
    if cap.get("gpu"):
        hw = hw.replace(gpu_mem_bytes=int(cap["gpu"]))
        plan = plan.replace(globals=plan.globals.__class__(**{**plan.globals.__dict__, "gpu_mem_bytes": int(cap["gpu"])}))
    iterations = max(int(measured.events["iteration"].nunique()), 2)
    return simulate(model, train, hw, plan, iterations=iterations)
