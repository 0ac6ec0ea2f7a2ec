"""The planner's decision space and its CP-SAT count model (OR-Tools `cp_model`), plus the solver
set-up every CP-SAT stage shares (the cyclic steady-state model is planner/cycle.py).

`solve_counts`: layers with the same shape (all blocks; embed and head alone) form a group;
integer counts say how many layers of a group take each decision tuple. Per-resource sums of the
layers' recipes <= T, memory of each tier as a sum, minimise T. `place` then puts the counts on
layers by rule (GPU-resident first, kept activations last, everything else spread evenly).

Time is in coarse integer units; every duration comes from the layers' recipes (CostModel); the
engine re-checks every answer.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from tiertune.planner.estimate import fold_duplex, layer_work, usable_gpu_bytes
from tiertune.schedule import ACTIVATIONS, LayerPlan
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import layer_recipe
from tiertune.vocab import RESOURCES, TIERS

MIB = 1 << 20
STOPPED_BY_CTRL_C = threading.Event()      # a solve was stopped part-way (the CLI exits at once then)
STATUS = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible",
          cp_model.MODEL_INVALID: "invalid", cp_model.UNKNOWN: "unknown"}


@dataclass
class SolverStats:
    status: str
    objective_s: float | None
    bound_s: float | None
    wall_s: float
    stage: str
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        if self.objective_s is None or self.bound_s is None or self.objective_s <= 0:
            return None
        return max(0.0, (self.objective_s - self.bound_s) / self.objective_s)

    def to_dict(self) -> dict:
        return {"status": self.status, "objective_s": self.objective_s, "bound_s": self.bound_s, "gap": self.gap,
                "wall_s": self.wall_s, "stage": self.stage, **self.extra}


# --- the decision space --------------------------------------------------------------------------

def allowed_updates(plan_train, optimizer: str) -> tuple[str, ...]:
    """`fused` (LOMO) frees each gradient in its hook: only for a GPU-side update, with no gradient
    accumulation (Plan validation) and no clipping (it would need a second backward: LOMO, arXiv 2306.09782).
    A CPU/SSD optimizer's `after` is not dominated by `overlap`: the engine runs `after` updates in
    forward order, overlapping the next iteration's forward, while `overlap` updates end with
    layer 0, which the next forward needs first."""
    if optimizer == "gpu":
        fused_ok = plan_train.grad_accum == 1 and plan_train.grad_clip is None
        return ("overlap", "fused") if fused_ok else ("overlap", "after")
    return ("overlap", "after")


def layer_choices(train, ranks: tuple[int, ...] = (), full: bool = False) -> list[LayerPlan]:
    """Every LayerPlan the search may give a layer. `full` adds dominated options ('after' updates)
    for enumeration tests; `ranks` are the LSP ranks allowed (empty: lossless only)."""
    out = []
    for p, o, a in itertools.product(TIERS, TIERS, ACTIVATIONS):
        updates = ("after", "overlap", "fused") if full else allowed_updates(train, o)
        for u in updates:
            if u == "fused" and (o != "gpu" or train.grad_accum > 1):
                continue
            for r in ((None,) + tuple(ranks) if o != "gpu" else (None,)):
                out.append(LayerPlan(params=p, optimizer=o, update=u, activations=a, grad_rank=r))
    return out


def groups(cm: CostModel) -> list[list[int]]:
    """Layers with identical costs (the blocks), and each odd layer (embed, head) alone."""
    by: dict = {}
    for lc in cm.layers:
        key = (lc.kind, lc.params, lc.act_bytes, lc.fwd_flops)
        by.setdefault(key, []).append(lc.index)
    return sorted(by.values(), key=lambda g: g[0])


def resident(cm: CostModel, i: int, lp: LayerPlan) -> dict[str, int]:
    """Bytes layer i holds in each tier through the iteration (the count model's memory rows): its
    recipe's home, kept activations and host gradient."""
    return layer_recipe(cm, i, lp).held()


def working_set(cm: CostModel, depth: int, slices: int = 1) -> int:
    """GPU bytes a layer's backward holds beyond what stays resident, at worst (a streamed layer
    whose activations come back): the largest recipe working set. Prefetches (`depth` layers
    ahead) are not reserved: the engine starts a copy only once its bytes fit, so a tight budget
    delays them instead of failing. Activations kept for earlier layers are in `resident`."""
    worst = LayerPlan(params="cpu", optimizer="cpu", activations="cpu")
    return max(layer_recipe(cm, i, worst, slices=slices).working_gpu for i in range(len(cm.layers)))


# --- stage 1: the count model ---------------------------------------------------------------------

def solve_counts(cm: CostModel, choices: list[LayerPlan], gpu_budget: int, depth: int, time_limit_s: float,
                 nnz_per_row: int = 4, hint: list[LayerPlan] | None = None,
                 margin: dict[str, int] | None = None, slices: int = 1) -> tuple[list[dict] | None, SolverStats]:
    """How many layers of each group take each choice, minimising the largest per-resource sum.
    Returns one {choice index: count} per group (None if nothing fits) and the solver's stats.
    `margin`: bytes per tier kept free beyond the model's own rows (what the engine found missing
    when an earlier answer was placed: prefetches in flight, a host step's working bytes).
    `slices`: the plan's activation_slices, at which every layer's recipe is costed."""
    t0 = time.perf_counter()
    hw = cm.hw
    grp = groups(cm)
    works = {}
    for g in grp:
        i = g[0]
        for k, lp in enumerate(choices):
            w = layer_work(cm, i, lp, nnz_per_row, slices=slices)
            tot = dict.fromkeys(RESOURCES, 0.0)
            for d in (w.fwd, w.bwd, w.post):
                for r, v in d.items():
                    tot[r] += v
            r = layer_recipe(cm, i, lp, slices=slices)
            works[i, k] = (fold_duplex(tot, hw), r.held(), r.host_working)
    horizon = sum(max(works[g[0], k][0].values()) * len(g) for g in grp for k in [0]) * 50 + 1.0
    unit = horizon / 2e6
    m = cp_model.CpModel()
    counts = []
    for gi, g in enumerate(grp):
        cs = {k: m.new_int_var(0, len(g), f"n{gi}_{k}") for k in range(len(choices))}
        m.add(sum(cs.values()) == len(g))
        counts.append(cs)
    T = m.new_int_var(0, int(horizon / unit) + 1, "T")
    busy = [sum(int(round(works[g[0], k][0][r] / unit * 1000)) * counts[gi][k]
                for gi, g in enumerate(grp) for k in range(len(choices))) for r in RESOURCES]
    for b in busy:
        m.add(T * 1000 >= b)
    cap = {"gpu": usable_gpu_bytes(hw, gpu_budget) - working_set(cm, depth, slices), "cpu": hw.cpu_mem_bytes, "ssd": hw.ssd_capacity_total_bytes}
    for tier, b in (margin or {}).items():
        cap[tier] -= b
    if min(cap.values()) < 0:
        return None, SolverStats("infeasible", None, None, time.perf_counter() - t0, "counts")
    held = {tier: sum((works[g[0], k][1][tier] // MIB) * counts[gi][k]
                      for gi, g in enumerate(grp) for k in range(len(choices))) for tier in TIERS}
    for tier in TIERS:
        m.add(held[tier] <= cap[tier] // MIB)
    # A host optimizer's step holds its gradient and the state read from the SSDs beyond home
    # bytes, and the engine reads the state of up to depth + 1 layers ahead: host memory keeps
    # room for that many of the largest such step any layer takes. A row only where it can bind
    # (the most any composition holds leaves no room for it): each costs CP-SAT a boolean it
    # could not always settle in time.
    most_held = sum(max(works[g[0], k][1]["cpu"] for k in range(len(choices))) * len(g) for g in grp) // MIB
    for gi, g in enumerate(grp):
        for k in range(len(choices)):
            working = works[g[0], k][2] * (depth + 1) // MIB
            if working and most_held + working > cap["cpu"] // MIB:
                used = m.new_bool_var(f"u{gi}_{k}")
                m.add(counts[gi][k] <= len(g) * used)
                m.add(held["cpu"] + working * used <= cap["cpu"] // MIB)
    m.minimize(T)
    if hint is not None:
        for gi, g in enumerate(grp):
            for k, lp in enumerate(choices):
                m.add_hint(counts[gi][k], sum(1 for i in g if hint[i] == lp))
    solver = _solver(time_limit_s)
    st = _solve(solver, m)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, SolverStats(STATUS.get(st, str(st)), None, None, time.perf_counter() - t0, "counts")
    stats = SolverStats(STATUS[st], solver.objective_value * unit, solver.best_objective_bound * unit, 0.0, "counts")
    out = [{k: solver.value(v) for k, v in cs.items() if solver.value(v)} for cs in counts]
    # Then, at that period, the least work over all resources. Many compositions tie on the
    # bottleneck, and the engine runs the one with slack elsewhere faster: on gpt3-175b at batch 16
    # the tie the solver returned put every layer's weights on the SSDs beside its activations
    # (the engine: 390 s against the planner's 232 s with the weights in host memory).
    left = time_limit_s - (time.perf_counter() - t0)
    if left > 0.05:
        m.add(T <= solver.value(T))
        m.minimize(sum(busy))
        m.clear_hints()
        for cs in counts:
            for v in cs.values():
                m.add_hint(v, solver.value(v))
        second = _solver(left)
        if _solve(second, m) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            out = [{k: second.value(v) for k, v in cs.items() if second.value(v)} for cs in counts]
    stats.wall_s = time.perf_counter() - t0
    return out, stats


def place(cm: CostModel, choices: list[LayerPlan], counts: list[dict]) -> list[LayerPlan]:
    """Counts -> one LayerPlan per layer. Within a group: GPU-resident weights on the first layers
    (they are needed first in forward and are never waited for), kept activations on the last ones
    (their backward comes first, so they are held the shortest), and every other choice spread evenly
    (interleaved by largest remainder) so streams and recompute load every stretch of the pipeline alike."""
    layers: list[LayerPlan | None] = [None] * len(cm.layers)
    for g, cs in zip(groups(cm), counts):
        items = [(choices[k], n) for k, n in cs.items()]
        first = [(lp, n) for lp, n in items if lp.params == "gpu" and lp.activations != "keep"]
        last = [(lp, n) for lp, n in items if lp.activations == "keep"]
        middle = [(lp, n) for lp, n in items if (lp, n) not in first and (lp, n) not in last]
        seq = _interleave(first) + _interleave(middle) + _interleave(last)
        for i, lp in zip(g, seq):
            layers[i] = lp
    return layers                                                   # type: ignore[return-value]


def _interleave(items: list[tuple[LayerPlan, int]]) -> list[LayerPlan]:
    total = sum(n for _, n in items)
    placed = [0] * len(items)
    out = []
    for step in range(1, total + 1):
        # the choice furthest behind its even share goes next
        k = max(range(len(items)), key=lambda j: items[j][1] * step / total - placed[j])
        placed[k] += 1
        out.append(items[k][0])
    return out


def _solve(solver: cp_model.CpSolver, m: cp_model.CpModel) -> int:
    """solver.solve(m) on a worker thread, so that Ctrl-C (a KeyboardInterrupt in the main thread)
    stops the search at once and propagates, as everywhere else in the CLI."""
    out: dict = {}

    def run() -> None:
        try:
            out["status"] = solver.solve(m)
        except BaseException as exc:             # re-raised in the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=run, name="cp-sat", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
    except KeyboardInterrupt:
        solver.stop_search()
        worker.join()
        STOPPED_BY_CTRL_C.set()
        raise
    if "error" in out:
        raise out["error"]
    return out["status"]


def _solver(time_limit_s: float) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    # OR-Tools' own Ctrl-C catching leaves SIGINT at its default after a solve (the next Ctrl-C
    # killed the process silently); _solve stops the search on Ctrl-C instead.
    s.parameters.catch_sigint_signal = False
    s.parameters.max_time_in_seconds = float(time_limit_s)
    s.parameters.num_workers = 2                 # the project's machines share 2 cores
    s.parameters.relative_gap_limit = 0.005
    return s
