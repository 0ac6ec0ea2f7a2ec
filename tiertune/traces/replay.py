"""Replay a recorded trace with what-if changes ("what if PCIe were 2x faster?").

The task graph is rebuilt from the plan the trace recorded (its dependencies and memory), every
task takes the duration the trace measured for it, resources are scaled, and the engine runs the
graph again. Two resources the profile says share a link (half duplex) keep separate slots when
the trace shows they ran at once. Tasks the trace did not record (a measured run may not split
every copy the way the model does) keep the cost model's duration; `coverage` says how much of
the graph was timed from the trace.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass

import pandas as pd

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile, load_hardware
from tiertune.schedule import Plan
from tiertune.simulator import builder
from tiertune.simulator.builder import RESOURCES, TIERS
from tiertune.simulator.run import SimResult, run_graph
from tiertune.traces.trace import Trace, own_durations
from tiertune.workload import ModelSpec, TrainSpec, load_model

FALLBACK_HARDWARE = "lsp-4090"


@dataclass
class ReplayResult:
    recorded_iteration_s: float
    iteration_s: float
    bottleneck: str
    busy_s: dict[str, float]
    scale: dict[str, float]
    coverage: float                 # fraction of graph tasks whose duration came from the trace
    result: SimResult

    def to_dict(self) -> dict:
        return {"recorded_iteration_s": self.recorded_iteration_s, "iteration_s": self.iteration_s,
                "speedup": self.recorded_iteration_s / self.iteration_s if self.iteration_s > 0 else None,
                "bottleneck": self.bottleneck, "busy_s": self.busy_s, "scale": self.scale,
                "coverage": self.coverage, "fits": self.result.fits, "error": self.result.error}


def parse_scale(items: list[str] | None) -> dict[str, float]:
    """["h2d=2", "ssd_read=0.5"] -> {"h2d": 2.0, "ssd_read": 0.5}; names an unknown resource."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--scale expects RESOURCE=FACTOR, got {item!r}")
        if name not in RESOURCES:
            raise InputError(f"--scale: unknown resource {name!r}; known: {', '.join(RESOURCES)}")
        try:
            factor = float(value)
        except ValueError:
            raise InputError(f"--scale {name}: factor {value!r} is not a number") from None
        if not factor > 0:
            raise InputError(f"--scale {name}: factor must be positive, got {factor}")
        out[name] = factor
    return out


def _inputs(trace: Trace, plan: Plan | None, hardware: HardwareProfile | str | None):
    meta = trace.meta
    if plan is None:
        if "plan" not in meta:
            raise InputError("the trace records no plan; pass --plan")
        plan = Plan.from_dict(meta["plan"])
    if "model_spec" in meta:
        try:
            model = ModelSpec(**meta["model_spec"])
        except TypeError as exc:
            raise InputError(f"trace meta.model_spec is malformed: {exc}") from None
    else:
        model = load_model(str(meta.get("model", plan.model)))
    train = TrainSpec.from_dict(meta["train"]) if "train" in meta else plan.train
    if isinstance(hardware, HardwareProfile):
        hw = hardware
    else:
        name = hardware or meta.get("hardware")
        try:
            hw = load_hardware(str(name)) if name else load_hardware(FALLBACK_HARDWARE)
        except InputError:
            if hardware:                 # the user named it: their error
                raise
            hw = load_hardware(FALLBACK_HARDWARE)   # e.g. "local-cpu": durations come from the trace anyway
    return model, train, hw, plan


def _overlap_s(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Seconds during which an event of `a` and an event of `b` both run (each side's events are
    serial on their resource, so a sweep over the two sorted lists suffices)."""
    a = a.sort_values("start_s")[["start_s", "end_s"]].to_numpy()
    b = b.sort_values("start_s")[["start_s", "end_s"]].to_numpy()
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _pools_as_recorded(g: builder.TaskGraph, trace: Trace) -> None:
    """Give two resources that share a slot pool in the graph (a half-duplex link) their own pools
    when the trace shows them running at once: the machine did overlap them, and the recorded
    durations are the durations it took while overlapped, so serialising them again would count
    the contention twice (an executor's ssd_read and ssd_write threads on a CPU host)."""
    ev = trace.events
    for a, b in ((builder.H2D, builder.D2H), (builder.SSD_READ, builder.SSD_WRITE)):
        if g.pool[b] != g.pool[a]:
            continue
        ea, eb = ev[ev["resource"] == RESOURCES[a]], ev[ev["resource"] == RESOURCES[b]]
        if ea.empty or eb.empty:
            continue
        smaller = min((ea["end_s"] - ea["start_s"]).sum(), (eb["end_s"] - eb["start_s"]).sum())
        if _overlap_s(ea, eb) > 0.05 * smaller:
            g.pool[b] = b


def replay(trace: Trace, scale: dict[str, float] | None = None, plan: Plan | None = None,
           hardware: HardwareProfile | str | None = None) -> ReplayResult:
    scale = dict(scale or {})
    for r in scale:
        parse_scale([f"{r}={scale[r]}"])
    if trace.events.empty:
        raise InputError("the trace has no events to replay")
    model, train, hw, plan = _inputs(trace, plan, hardware)
    iterations = int(trace.events["iteration"].nunique())
    capacity = trace.meta.get("capacity")
    recorded = isinstance(capacity, dict)
    # The recorded durations already are what each task took beside the others (no contention);
    # a recorded budget counts tensor bytes only (the executor's ledger), so no context reserve.
    hw = hw.replace(contention={}, gpu_reserve_bytes=0 if recorded else hw.gpu_reserve_bytes)
    g = builder.build(model, train, hw, plan, iterations)
    if recorded:                        # 0: no budget on that tier (the executor on an unbudgeted CPU)
        g.capacity = [int(capacity.get(t) or c) for t, c in zip(TIERS, g.capacity)]
    _pools_as_recorded(g, trace)

    ev = trace.events.sort_values("start_s", kind="stable")
    dur = own_durations(ev).tolist()
    by_name = dict(zip(ev["task"], dur))
    def key_of(t: int) -> tuple:
        return g.iteration[t], g.kind[t], g.layer[t], RESOURCES[g.resource[t]]

    by_key: dict[tuple, deque] = defaultdict(deque)
    for key, d in zip(zip(ev["iteration"], ev["kind"], ev["layer"], ev["resource"]), dur):
        by_key[key].append(d)
    # A task the executor records in pieces (LOMO's fused update, one event per parameter) is one
    # task of the graph: where a key has more events than tasks, its tasks share the total.
    tasks_per_key = Counter(key_of(t) for t in range(len(g)))
    for key, q in by_key.items():
        n = tasks_per_key.get(key, 0)
        if n and len(q) > n:
            by_key[key] = deque([sum(q) / n] * n)
    matched = 0
    names_match = all(g.name(t) in by_name for t in range(min(len(g), 50)))
    for t in range(len(g)):
        d = by_name.get(g.name(t)) if names_match else None
        if d is None:
            q = by_key.get(key_of(t))
            d = q.popleft() if q else None
        if d is not None:
            g.duration[t] = float(d)
            matched += 1
        g.duration[t] /= scale.get(RESOURCES[g.resource[t]], 1.0)
    res = run_graph(g, model, train, hw, plan)
    return ReplayResult(trace.iteration_s(), res.iteration_s, res.bottleneck, res.busy_s, scale,
                        matched / max(len(g), 1), res)


def whatif(trace: Trace, factors: tuple[float, ...] = (0.5, 2.0), resources: tuple[str, ...] | None = None,
           plan: Plan | None = None, hardware: HardwareProfile | str | None = None) -> pd.DataFrame:
    """Iteration time as each busy resource's speed scales: rows resource, factor, iteration_s
    (factor 1.0 is the unchanged replay) — the input of `analysis.plots.whatif_bars`."""
    base = replay(trace, plan=plan, hardware=hardware)
    busy = base.busy_s
    resources = resources or tuple(r for r in RESOURCES if busy.get(r, 0.0) > 0)
    rows = [{"resource": "baseline", "factor": 1.0, "iteration_s": base.iteration_s, "error": base.result.error}]
    for r in resources:
        for f in factors:
            res = replay(trace, {r: f}, plan=plan, hardware=hardware)
            rows.append({"resource": r, "factor": f, "iteration_s": res.iteration_s, "error": res.result.error})
    return pd.DataFrame(rows)
