"""Lower bounds on iteration time that no plan can beat, for (model, train, hardware, GPU budget).

A linear relaxation of the per-layer decisions, read from the layers' recipes (simulator/recipe.py),
the same account of work the engine's task graph is built from. Each layer takes a convex mix of
every LayerPlan (lambda_ik >= 0, sum_k lambda_ik = 1, `cpu_checkpointing` either way, at every
activation_slices the planner searches); for a real plan the lambdas are 0 or 1. Then:
  - time: for every resource (half-duplex links folded, the CPU's work split over its workers),
    the mixed recipes' busy seconds are at most T; the engine's iteration is never shorter than
    any resource's work, since contention only slows tasks down and a second backward pass only
    adds work;
  - memory: on the GPU, during layer i's backward the device holds the reserve, every layer's home
    bytes, what each earlier layer kept for its backward and layer i's working set; host memory
    holds its home bytes and, while a host optimizer steps layer i, that step's gradient and
    optimizer state read from the SSDs; the SSDs hold their home bytes. Activations sent to the
    host are freed on the device once copied, as the engine frees them (tests/test_recipe.py
    checks these floors against the engine's peaks).
The least such T (GLOP, OR-Tools' LP solver) bounds the engine; plans are reported as a ratio to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp

from tiertune.hardware import HardwareProfile
from tiertune.planner.estimate import usable_gpu_bytes
from tiertune.planner.cpsat import groups, layer_choices
from tiertune.planner.local import slice_choices
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import layer_recipe
from tiertune.vocab import CPU_TIER, GPU_TIER, LINKS, RESOURCES, TIERS
from tiertune.workload import ModelSpec, TrainSpec

MIB = float(1 << 20)


@dataclass(frozen=True)
class LowerBound:
    bound_s: float                          # inf when no placement fits the budget
    binding: str                            # resource that sets the bound ("memory" when none fits)
    parts: dict = field(default_factory=dict)   # resource -> busy seconds at the relaxed optimum
    compute_s: float = 0.0                  # forward + backward alone: the `ideal` floor
    reason: str | None = None               # why there is no finite bound

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.bound_s)

    def ratio(self, iteration_s: float) -> float:
        return iteration_s / self.bound_s if self.feasible and self.bound_s > 0 else math.inf

    def to_dict(self) -> dict:
        """JSON-safe: an infinite bound is null with the reason beside it."""
        return {"bound_s": self.bound_s if self.feasible else None, "binding": self.binding,
                "parts": dict(self.parts), "compute_s": self.compute_s, "reason": self.reason}


def lower_bound(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, gpu_budget: int | None = None,
                grad_ranks: tuple[int, ...] = ()) -> LowerBound:
    """The bound for plans within `gpu_budget` bytes of GPU memory (default: the hardware's).

    `grad_ranks`: LSP ranks the plans may use; compressed gradients lower PCIe and CPU work, so a
    bound for lossy plans must know the ranks allowed. Empty: lossless plans only.
    """
    cm = CostModel(model, train, hw)
    budget = hw.gpu_mem_bytes if gpu_budget is None else gpu_budget
    n = len(cm.layers)
    slices = slice_choices(train)
    options = [(lp, host) for lp in layer_choices(train, tuple(grad_ranks), full=True)
               for host in ((False, True) if lp.activations == "recompute" else (False,))]
    rep = {}                                         # identical blocks share their recipes
    for grp in groups(cm):
        for i in grp:
            rep[i] = i if i == n - 1 else grp[0]

    solver = pywraplp.Solver.CreateSolver("GLOP")
    inf = solver.infinity()
    T = solver.NumVar(0, inf, "T")
    # Rows are filled coefficient by coefficient (building pywraplp expressions term by term took
    # seconds on 96 layers x 130 options). Memory is in MiB: GLOP fails on byte-sized coefficients.
    lanes = {"gpu": ("gpu",), "cpu": ("cpu",)}
    for link, (a, b) in LINKS.items():
        lanes.update({a: (a,), b: (b,)} if getattr(hw, f"{link}_duplex") else {link: (a, b)})
    scale = {r: 1.0 / max(1, hw.cpu_workers) if r == "cpu" else 1.0 for r in RESOURCES}
    time_rows = {}
    lane_terms: dict[str, list] = {lane: [] for lane in lanes}
    for lane, members in lanes.items():              # T - sum(busy) >= 0
        time_rows[lane] = (solver.Constraint(0, inf), members)
        time_rows[lane][0].SetCoefficient(T, 1.0)
    home_rows = [solver.Constraint(-inf, cap / MIB) for cap in
                 (inf * MIB, hw.cpu_mem_bytes, hw.ssd_capacity_total_bytes)]
    gpu_home = solver.NumVar(0, inf, "gpu_home")
    home_rows[GPU_TIER].SetBounds(0, 0)              # gpu_home = sum of GPU home bytes
    home_rows[GPU_TIER].SetCoefficient(gpu_home, -1.0)
    host_cap = hw.cpu_mem_bytes / MIB
    cpu_home = solver.NumVar(0, host_cap, "cpu_home")
    home_rows[CPU_TIER].SetBounds(0, 0)              # cpu_home = sum of host home bytes
    home_rows[CPU_TIER].SetCoefficient(cpu_home, -1.0)
    usable = usable_gpu_bytes(hw, budget) / MIB
    prefix = []                                      # kept variables of the layers before
    compute = 0.0
    for i in range(n):
        # a layer that runs whole gets the same (memoised) recipe at every slice count: once
        recipes = list({id(r): r for r in (layer_recipe(cm, rep[i], lp, 1, host, 4, sl) for lp, host in options
                                           for sl in slices)}.values())
        lam = [solver.NumVar(0, 1, f"l{i}_{k}") for k in range(len(recipes))]
        one = solver.Constraint(1, 1)
        kept = solver.NumVar(0, inf, f"kept{i}")
        kept_row = solver.Constraint(0, 0)
        kept_row.SetCoefficient(kept, -1.0)
        mem_row = solver.Constraint(-inf, usable)   # during layer i's backward
        mem_row.SetCoefficient(gpu_home, 1.0)
        host_row = solver.Constraint(-inf, host_cap)   # while a host optimizer steps layer i
        host_row.SetCoefficient(cpu_home, 1.0)
        for v in prefix:
            mem_row.SetCoefficient(v, 1.0)
        for x, rc in zip(lam, recipes):
            one.SetCoefficient(x, 1.0)
            busy = rc.busy()
            for lane, (row, members) in time_rows.items():
                c = sum(busy[RESOURCES.index(m)] * scale[m] for m in members)
                if c:
                    row.SetCoefficient(x, -c)
                    lane_terms[lane].append((x, c))
            for k in range(len(TIERS)):
                if rc.home[k]:
                    home_rows[k].SetCoefficient(x, rc.home[k] / MIB)
            if rc.kept[GPU_TIER]:
                kept_row.SetCoefficient(x, rc.kept[GPU_TIER] / MIB)
            mem_row.SetCoefficient(x, (rc.working_gpu + rc.kept[GPU_TIER]) / MIB)
            if rc.host_working:
                host_row.SetCoefficient(x, rc.host_working / MIB)
        prefix.append(kept)
        fwd, bwd = recipes[0].steps["forward"], recipes[0].steps["backward"]
        compute += fwd.count * fwd.duration + bwd.count * bwd.duration
    solver.Minimize(T)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return LowerBound(math.inf, "memory", {}, compute,
                          f"no placement, even fractional, fits {budget / 2**30:.2f} GiB of GPU memory "
                          f"({hw.gpu_reserve_bytes / 2**20:.0f} MiB reserved), {hw.cpu_mem_bytes / 2**30:.0f} GiB "
                          f"of host memory and {hw.ssd_capacity_total_bytes / 2**30:.0f} GiB of SSD")
    parts = {lane: sum(c * x.solution_value() for x, c in terms) for lane, terms in lane_terms.items()}
    binding = max(parts, key=parts.get)
    return LowerBound(T.solution_value(), binding, parts, compute)
