"""Replay a recorded trace with what-if changes ("what if PCIe were 2x faster?").

The task graph is rebuilt from the plan the trace recorded (its dependencies and memory), every
task takes the duration the trace measured for it, resources are scaled, and the engine runs the
graph again. Two resources the profile says share a link (half duplex) keep separate slots when
the trace shows they ran at once. Tasks the trace did not record (a measured run may not split
every copy the way the model does) keep the cost model's duration; `coverage` says how much of
the graph was timed from the trace.

A measured trace is replayed as the executor ran it, which the graph alone does not say: the
host time between a task becoming ready and starting (Python on the compute thread, a worker's
wake-up) is kept and not scaled; each resource runs its tasks in the recorded order (the
executor's resources are FIFO queues fed in program order); a copy issued only when the compute
thread got past a device task waits for that task (see _issue_lags, _in_recorded_order).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass

import pandas as pd

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile, load_hardware
from tiertune.limits import SCALE_RANGE
from tiertune.schedule import Plan
from tiertune.simulator import builder
from tiertune.simulator.run import SimResult, run_graph
from tiertune.traces.trace import DUPLEX_SHARE, Trace, overlap_share, own_durations
from tiertune.vocab import D2H, GPU, H2D, RESOURCES, SSD_READ, SSD_WRITE, TIERS
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
        low, high = SCALE_RANGE
        if not low <= factor <= high:
            raise InputError(f"--scale {name}: factor must be positive, between {low:g} and {high:g}; got {factor:g}")
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


def _pools_as_recorded(g: builder.TaskGraph, trace: Trace) -> None:
    """Give two resources that share a slot pool in the graph (a half-duplex link) their own pools
    when the trace shows them running at once: the machine did overlap them, and the recorded
    durations are the durations it took while overlapped, so serialising them again would count
    the contention twice (an executor's ssd_read and ssd_write threads on a CPU host)."""
    ev = trace.events
    for a, b in ((H2D, D2H), (SSD_READ, SSD_WRITE)):
        if g.pool[b] != g.pool[a]:
            continue
        both, lighter = overlap_share(ev, RESOURCES[a], RESOURCES[b])
        if lighter and both > DUPLEX_SHARE * lighter:
            g.pool[b] = b


def _issue_lags(g: builder.TaskGraph, timed: list[tuple | None]) -> tuple[list[float], list[tuple[int, int]]]:
    """Per task, the seconds between the moment it could have started in the measured run and its
    recorded start; and the edges (device task -> task) that say a task was only issued when the
    compute thread got past that device task.

    On a measured run such a gap is host time no event records: the compute thread's Python work
    between device tasks (issuing copies, taking buffers, waking from a wait) or a worker's
    wake-up. It is not work of the task's resource, so a what-if scale leaves it as it is
    (Daydream's CPU-side gaps, likewise). A copy that sat idle waiting longer than that was issued
    late: the compute thread only issues work between device tasks (an optimizer-state read once
    its layer's backward is done), so it waits for the device task that ended last before it
    started, and keeps only the time since then. Negative gaps (the executor started a task
    before a dependency the graph has, e.g. a backward that waits for its activations inside
    autograd) count as none."""
    n = len(g)
    ready = [-math.inf] * n
    for u in range(n):                    # ids are topological: every predecessor comes first
        if timed[u] is not None:
            for v in g.succ[u]:
                ready[v] = max(ready[v], timed[u][2])
    device = sorted((timed[t][2], t) for t in range(n) if timed[t] is not None and g.resource[t] == GPU)
    device_ends = [e for e, _ in device]
    lane_end: dict[int, float] = {}
    lag = [0.0] * n
    issued: list[tuple[int, int]] = []
    for t in sorted((t for t in range(n) if timed[t] is not None), key=lambda t: timed[t][1]):
        _, start, end = timed[t]
        r = g.resource[t]                 # the executor runs each resource in one thread
        at = max(ready[t], lane_end.get(r, -math.inf))
        if r != GPU:
            k = bisect.bisect_right(device_ends, start) - 1
            if k >= 0 and device_ends[k] > at:
                at = device_ends[k]
                issued.append((device[k][1], t))
        if at > -math.inf:
            lag[t] = max(0.0, start - at)
        lane_end[r] = max(lane_end.get(r, end), end)
    return lag, issued


def _in_recorded_order(g: builder.TaskGraph, timed: list[tuple | None],
                       issued: list[tuple[int, int]]) -> builder.TaskGraph:
    """The graph renumbered so that tasks are urgent in the order the trace started them, and each
    resource's tasks chained in that order: the executor feeds every resource one queue, in
    program order, so a task issued later never overtakes one issued earlier (the engine, left to
    its own priorities, would run an optimizer-state read the moment it is ready, ahead of the
    weights the next backward waits for). A task the trace did not time keeps the place right
    after its latest predecessor."""
    n = len(g)
    key = [0.0] * n
    for t in range(n):                    # ids are topological: predecessors are keyed first
        if timed[t] is not None:
            key[t] = max(key[t], timed[t][1])
        for v in g.succ[t]:
            if key[t] > key[v]:
                key[v] = key[t]
    npred = list(g.npred)
    ready = [(key[t], t) for t in range(n) if npred[t] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, t = heapq.heappop(ready)
        order.append(t)
        for v in g.succ[t]:
            npred[v] -= 1
            if npred[v] == 0:
                heapq.heappush(ready, (key[v], v))
    g = g.permuted(order)
    new = [0] * n
    for k, t in enumerate(order):
        new[t] = k
    lanes: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t in range(n):
        if timed[t] is not None:
            lanes[g.resource[new[t]]].append((timed[t][1], new[t]))
    edges = [(new[u], new[v]) for u, v in issued]
    for tasks in lanes.values():
        tasks.sort()
        edges += [(a, b) for (_, a), (_, b) in zip(tasks, tasks[1:])]
    for a, b in edges:
        if a < b:                         # where the executor did start b before a's dependencies, skip
            g.succ[a].append(b)
            g.npred[b] += 1
    return g


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
    rows = list(zip(dur, ev["start_s"], ev["end_s"]))
    by_name = dict(zip(ev["task"], rows))
    def key_of(t: int) -> tuple:
        return g.iteration[t], g.kind[t], g.layer[t], RESOURCES[g.resource[t]]

    by_key: dict[tuple, deque] = defaultdict(deque)
    for key, row in zip(zip(ev["iteration"], ev["kind"], ev["layer"], ev["resource"]), rows):
        by_key[key].append(row)
    # A task the executor records in pieces (LOMO's fused update, one event per parameter) is one
    # task of the graph: where a key has more events than tasks, its tasks share the total.
    tasks_per_key = Counter(key_of(t) for t in range(len(g)))
    for key, q in by_key.items():
        n = tasks_per_key.get(key, 0)
        if n and len(q) > n:
            total = sum(d for d, _, _ in q)
            by_key[key] = deque([(total / n, min(s for _, s, _ in q), max(e for _, _, e in q))] * n)
    names_match = all(g.name(t) in by_name for t in range(min(len(g), 50)))
    timed: list[tuple | None] = []
    for t in range(len(g)):
        row = by_name.get(g.name(t)) if names_match else None
        if row is None:
            q = by_key.get(key_of(t))
            row = q.popleft() if q else None
        timed.append(row)
    measured = trace.source == "measured"
    lag, issued = _issue_lags(g, timed) if measured else ([0.0] * len(g), [])
    for t, row in enumerate(timed):
        if row is not None:
            g.duration[t] = float(row[0])
        g.duration[t] = g.duration[t] / scale.get(RESOURCES[g.resource[t]], 1.0) + lag[t]
    matched = sum(row is not None for row in timed)
    if measured:
        g = _in_recorded_order(g, timed, issued)
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
