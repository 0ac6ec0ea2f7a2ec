"""`simulate(model, train, hw, plan)`: build the task graph, run the engine, summarise as a `SimResult`.

The planner calls this many times, so the summary is computed from the engine's lists directly
and the `Trace` (a pandas table) is only built when someone reads `SimResult.trace`.
"""

from __future__ import annotations

import gc
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from tiertune.hardware import HardwareProfile
from tiertune.schedule import Plan, steady_iteration_s
from tiertune.simulator import builder, engine
from tiertune.simulator.builder import TaskGraph
from tiertune.simulator.costs import CostModel
from tiertune.vocab import RESOURCES, TIERS
from tiertune.workload import ModelSpec, TrainSpec, model_flops_per_step

GiB = float(1 << 30)
_COST_CACHE: dict[tuple, tuple[CostModel, float]] = {}


def _cached(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> tuple[CostModel, float]:
    """One CostModel (and model FLOPs per step) per (model, train, hardware): the planner simulates
    many plans of one workload, and durations are memoised on the CostModel."""
    key = (model, train, repr(hw))
    hit = _COST_CACHE.get(key)
    if hit is None:
        if len(_COST_CACHE) > 64:
            _COST_CACHE.clear()
        hit = _COST_CACHE[key] = (CostModel(model, train, hw), model_flops_per_step(model, train))
    return hit


def cost_model(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> CostModel:
    return _cached(model, train, hw)[0]


@dataclass
class SimResult:
    fits: bool
    iteration_s: float                       # steady state (schedule.steady_iteration_s); inf when not fitting
    tokens_per_s: float
    tflops: float                            # model FLOPs per step / iteration_s, in TFLOP/s
    peak_bytes: dict[str, int]
    busy_s: dict[str, float]                 # per resource, seconds per steady iteration
    bottleneck: str                          # resource with the highest utilisation (busy / slots)
    events: int                              # tasks simulated
    sim_wall_s: float
    error: str | None = None                 # why it does not fit: tier, needed vs available
    error_tier: str | None = None
    graph: TaskGraph | None = field(default=None, repr=False)
    run: engine.EngineRun | None = field(default=None, repr=False)
    inputs: tuple | None = field(default=None, repr=False)      # (model, train, hw, plan)
    _trace: object = field(default=None, repr=False)
    error_short_bytes: int = 0               # how many bytes the task that could not start lacked

    @property
    def meta(self) -> dict:
        """Trace metadata: what was simulated (built on demand; plan.to_dict is not free)."""
        if self.inputs is None:
            return {"source": "simulated"}
        model, train, hw, plan = self.inputs
        cap = self.graph.capacity if self.graph is not None else [0, 0, 0]
        return {"source": "simulated", "model": model.name, "model_spec": model.to_dict(), "hardware": hw.name,
                "hardware_summary": hw.summary(), "plan": plan.to_dict(), "train": train.to_dict(),
                "capacity": dict(zip(TIERS, cap)), "iterations": self.graph.iterations if self.graph else 0}

    @property
    def trace(self):
        """The run as a `tiertune.traces.Trace` (source "simulated"), built on first access."""
        if self._trace is None:
            self._trace = to_trace(self)
        return self._trace

    def to_dict(self) -> dict:
        d = {"fits": self.fits,
             "iteration_s": self.iteration_s if math.isfinite(self.iteration_s) else None,
             "tokens_per_s": self.tokens_per_s, "tflops": self.tflops, "peak_bytes": dict(self.peak_bytes),
             "busy_s": dict(self.busy_s), "bottleneck": self.bottleneck, "events": self.events,
             "sim_wall_s": self.sim_wall_s}
        if self.error is not None:
            d["error"] = self.error
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def simulate(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, plan: Plan,
             iterations: int | None = None) -> SimResult:
    """Simulate `iterations` steps (default: the plan's) of `plan`; steady state excludes the first."""
    t0 = time.perf_counter()
    k = plan.globals.iterations if iterations is None else iterations
    cm, flops = _cached(model, train, hw)
    with _collector_paused():
        g = builder.build(model, train, hw, plan, k, cm)
        return run_graph(g, model, train, hw, plan, flops, t0)


@contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector while one plan is simulated. A simulation makes
    thousands of lists and builds no reference cycles, so a collection in the middle finds
    nothing to free; it only walks (and promotes to older generations) the graph being built,
    and in a planner process a full collection also walks every module loaded (ortools, pandas).
    Reference counting frees the graph as usual once the result is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_graph(g: TaskGraph, model: ModelSpec, train: TrainSpec, hw: HardwareProfile, plan: Plan,
              flops: float | None = None, t0: float | None = None) -> SimResult:
    """Run a built task graph through the engine and summarise it; `replay` calls this with
    durations taken from a recorded trace."""
    t0 = time.perf_counter() if t0 is None else t0
    flops = model_flops_per_step(model, train) if flops is None else flops
    k = g.iterations
    inputs = (model, train, hw, plan)

    def failed(msg: str, tier: str | None, peak: list[int], short: int = 0) -> SimResult:
        g.pack()
        return SimResult(False, math.inf, 0.0, 0.0, dict(zip(TIERS, peak)), {r: 0.0 for r in RESOURCES}, "none",
                         len(g), time.perf_counter() - t0, msg, tier, g, None, inputs, error_short_bytes=short)

    for tier, need, cap in zip(TIERS, g.resident, g.capacity):
        if need > cap:
            what = "GPU-resident state" if tier == "gpu" else f"state homed on {tier}"
            return failed(f"does not fit in {tier} memory: {what} needs {need / GiB:.2f} GiB "
                          f"but the capacity is {cap / GiB:.2f} GiB", tier, list(g.resident), need - cap)
    try:
        run = engine.run(g)
    except engine.SimStall as exc:
        return failed(str(exc), exc.tier, list(g.resident), exc.needed - exc.available)

    g.pack()                               # the result keeps the graph: no list per task outlives the run
    ends = [0.0] * k                       # when each iteration's last task ends
    busy = [0.0] * len(RESOURCES)          # work per resource over the steady iterations
    first_steady = 1 if k > 1 else 0
    m = g.step_tasks
    if m:                                  # ids run step by step: an iteration is a slice of ids
        for it in range(k):
            ends[it] = max(0.0, *run.end[it * m:(it + 1) * m])
        for r, d in zip(g.resource[first_steady * m:], g.duration[first_steady * m:]):
            busy[r] += d
    else:
        for it, e, r, d in zip(g.iteration, run.end, g.resource, g.duration):
            if e > ends[it]:
                ends[it] = e
            if it >= first_steady:
                busy[r] += d
    iteration_s = steady_iteration_s(ends)
    steady = max(k - first_steady, 1)
    busy_s = {r: busy[i] / steady for i, r in enumerate(RESOURCES)}
    # Utilisation per slot pool (h2d/d2h or SSD read/write share one when half duplex).
    pool_busy: dict[int, float] = {}
    for i in range(len(RESOURCES)):
        pool_busy[g.pool[i]] = pool_busy.get(g.pool[i], 0.0) + busy_s[RESOURCES[i]]
    util = {r: pool_busy[g.pool[i]] / g.pool_slots[g.pool[i]] for i, r in enumerate(RESOURCES)}
    bottleneck = max(RESOURCES, key=lambda r: (util[r], busy_s[r]))
    return SimResult(True, iteration_s, train.tokens / iteration_s if iteration_s > 0 else math.inf,
                     flops / iteration_s / 1e12 if iteration_s > 0 else math.inf,
                     dict(zip(TIERS, run.peak)), busy_s, bottleneck, len(g), time.perf_counter() - t0,
                     None, None, g, run, inputs)


def to_trace(result: SimResult):
    """The task starts/ends and memory samples of a simulated run as a Trace."""
    from tiertune.traces.trace import Trace      # pandas: only when a trace is wanted

    g, r = result.graph, result.run
    events, memory = [], []
    if g is not None and r is not None:
        for t in range(len(g)):
            events.append({"source": "simulated", "iteration": g.iteration[t], "task": g.name(t),
                           "kind": g.kind[t], "layer": g.layer[t], "resource": RESOURCES[g.resource[t]],
                           "start_s": r.start[t], "end_s": r.end[t], "bytes": g.nbytes[t], "flops": g.flops[t]})
        memory = [{"time_s": tm, "tier": TIERS[k], "bytes": b}
                  for tm, k, b in zip(r.mem_time, r.mem_tier, r.mem_bytes)]
    return Trace.from_records(events, memory, result.meta)
