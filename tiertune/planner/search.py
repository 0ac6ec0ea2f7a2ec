"""The search driver: `plan_schedule(model, train, hw, time_limit_s) -> PlanResult`.

Runs the named baselines through the engine, then DESIGN.md's recipe: (1) CP-SAT count model placed
on layers by rule, (2) coordinate descent on the counts with every candidate scored by the engine,
(3) the full CP-SAT interval model seeded with the best schedule, polishing in the remaining time.
The chosen plan is re-checked with `simulate()`; where the engine and CP-SAT disagree by > 5% we say
so and refine by local search (engine in the loop) on the layers the solver changed. Only engine
numbers decide. If nothing fits, InputError names the smallest GPU budget that would.
"""

from __future__ import annotations

from typing import Callable

import itertools
import math
import time
from dataclasses import dataclass, field, replace

from tiertune.errors import InputError
from tiertune.hardware import GiB, HardwareProfile
from tiertune.planner import cpsat
from tiertune.planner.bounds import LowerBound, lower_bound
from tiertune.planner.compression import allowed_ranks, default_ranks
from tiertune.planner.estimate import cost_model
from tiertune.planner.policies import POLICIES, PolicyInfeasible, make_policy
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.workload import ModelSpec, TrainSpec

DISAGREE = 0.05            # engine vs solver beyond this: say so and refine
EXACT_LIMIT = 2048         # enumerate the whole space through the engine when it is this small
MEMORY_LEAN = ("zero-infinity", "megatrain", "fuyou")   # policies that need the least GPU memory


def simulate(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, plan: Plan):
    from tiertune.simulator import simulate as engine       # imported late: the engine is a peer module
    return engine(model, train, hw, plan)


@dataclass
class Baseline:
    name: str
    plan: Plan | None
    sim: object | None             # SimResult
    why: str | None = None         # why it does not fit (or could not be built)

    @property
    def fits(self) -> bool:
        return self.sim is not None and bool(self.sim.fits)

    def comparable(self, train: TrainSpec, grad_ranks: tuple[int, ...]) -> bool:
        """A fitting baseline in the planner's own space: the same training settings (LOMO may swap
        the optimizer) and only gradient ranks the user allowed (lossless unless they did)."""
        return (self.fits and self.name != "ideal" and self.plan.train == train
                and all(lp.grad_rank is None or lp.grad_rank in grad_ranks for lp in self.plan.layers))

    @property
    def iteration_s(self) -> float:
        return float(self.sim.iteration_s) if self.fits else math.inf


@dataclass
class PlanResult:
    plan: Plan
    sim: object                                    # SimResult of `plan`
    lower: LowerBound
    baselines: list[Baseline]
    solver: dict = field(default_factory=dict)     # the interval stage's status/objective/bound/gap/wall
    stages: list[dict] = field(default_factory=list)
    engine_vs_solver: float | None = None          # engine / solver - 1 for the chosen plan
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    evaluations: int = 0
    grad_ranks: tuple[int, ...] = ()

    @property
    def iteration_s(self) -> float:
        return float(self.sim.iteration_s)

    @property
    def best_baseline(self) -> Baseline | None:
        fitting = [b for b in self.baselines if b.comparable(self.plan.train, self.grad_ranks)]
        return min(fitting, key=lambda b: b.iteration_s) if fitting else None

    @property
    def speedup_vs_best_baseline(self) -> float | None:
        b = self.best_baseline
        return b.iteration_s / self.iteration_s if b else None

    def summary(self) -> dict:
        b = self.best_baseline
        return {
            "iteration_s": self.iteration_s,
            "tokens_per_s": float(self.sim.tokens_per_s),
            "lower_bound_s": self.lower.bound_s,
            "ratio_to_lower_bound": self.lower.ratio(self.iteration_s),
            "solver": {k: self.solver.get(k) for k in ("status", "objective_s", "bound_s", "gap", "wall_s")},
            "engine_vs_solver": self.engine_vs_solver,
            "best_baseline": {"policy": b.name, "iteration_s": b.iteration_s} if b else None,
            "speedup_vs_best_baseline": self.speedup_vs_best_baseline,
            "planner_wall_s": self.wall_s,
            "engine_evaluations": self.evaluations,
            "notes": self.notes,
        }


def run_baselines(model: ModelSpec, train: TrainSpec, hw: HardwareProfile,
                  names: tuple[str, ...] | None = None) -> list[Baseline]:
    out = []
    for name in names or tuple(POLICIES):
        try:
            plan = make_policy(name, model, train, hw)
        except PolicyInfeasible as exc:
            out.append(Baseline(name, None, None, str(exc)))
            continue
        sim = simulate(model, plan.train, hw, plan)
        out.append(Baseline(name, plan, sim, None if sim.fits else (sim.error or "does not fit")))
    return out


class _Scorer:
    """Engine-in-the-loop scoring with a cache keyed by the per-layer decisions."""

    def __init__(self, model, train, hw, template: Plan) -> None:
        self.model, self.train, self.hw, self.template = model, train, hw, template
        self.cache: dict[tuple, tuple[float, object]] = {}

    def __call__(self, layers) -> float:
        return self.eval(layers)[0]

    def eval(self, layers) -> tuple[float, object]:
        key = tuple(layers)
        if key not in self.cache:
            sim = simulate(self.model, self.train, self.hw, self.template.with_layers(key))
            self.cache[key] = (float(sim.iteration_s) if sim.fits else math.inf, sim)
        return self.cache[key]


def _neighbours(lp: LayerPlan, choices: list[LayerPlan], reach: int = 1) -> list[LayerPlan]:
    """Choices that differ from lp in at most `reach` of params/optimizer/activations (update and
    grad_rank move with the optimizer), nearest first."""
    dims = ("params", "optimizer", "activations")
    near = [(sum(getattr(c, d) != getattr(lp, d) for d in dims), str(c), c) for c in choices if c != lp]
    return [c for diff, _, c in sorted(near, key=lambda x: x[:2]) if diff <= reach]


def descend(layers: list[LayerPlan], choices: list[LayerPlan], score, groups: list[list[int]],
            deadline: float) -> list[LayerPlan]:
    """Coordinate descent on counts: move k layers of a group from one choice to a neighbouring one
    (k halving from half the group down to 1), keep a move when the engine says it is faster.
    The moved layers are picked evenly spread over the group's layers that hold the choice."""
    best = list(layers)
    best_s = score(best)
    for g in sorted(groups, key=len, reverse=True) * 2:        # a second sweep: groups interact via memory
        k = max(1, len(g) // 2)
        while k >= 1 and time.perf_counter() < deadline:
            improved = False
            for a in sorted({best[i] for i in g}, key=str):
                holders = [i for i in g if best[i] == a]
                if len(holders) < k:
                    continue
                picks = [holders[int(j * len(holders) / k)] for j in range(k)]
                for b in _neighbours(a, choices):
                    if time.perf_counter() > deadline:
                        break
                    cand = list(best)
                    for i in picks:
                        cand[i] = b
                    s = score(cand)
                    if s < best_s * (1 - 1e-6):
                        best, best_s, improved = cand, s, True
                        break
                if improved:
                    break
            if not improved:
                k //= 2
    return best


def local_search(layers: list[LayerPlan], idx: list[int], choices: list[LayerPlan], score,
                 deadline: float, reach: int = 3) -> list[LayerPlan]:
    """Per-layer moves on the layers in idx (to any choice within `reach` dimensions), then pair moves
    (two layers at once: memory freed in one pays for a faster choice in the other), engine in the
    loop, until no move helps or time runs out."""
    best, best_s = list(layers), score(layers)

    def moves():
        for i in idx:
            for b in _neighbours(best[i], choices, reach):
                yield ((i, b),)
        for i, j in itertools.combinations(idx, 2):
            for b in _neighbours(best[i], choices, 2):
                for c in _neighbours(best[j], choices, 2):
                    yield ((i, b), (j, c))

    improved = True
    while improved:
        improved = False
        for mv in moves():
            if time.perf_counter() > deadline:
                return best
            cand = list(best)
            for i, b in mv:
                cand[i] = b
            s = score(cand)
            if s < best_s * (1 - 1e-6):
                best, best_s, improved = cand, s, True
                break
    return best


def plan_schedule(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, time_limit_s: float = 30.0,
                  grad_ranks: tuple[int, ...] = (), baselines: list[Baseline] | None = None,
                  choices: list[LayerPlan] | None = None,
                  max_compression_error: float | None = None,
                  log: Callable[[str], None] | None = None) -> PlanResult:
    """Search a per-layer schedule; return the best engine-verified plan with provenance.
    `choices` narrows the per-layer options (default: every option the training settings allow).
    `grad_ranks`: LSP ranks each layer may use; `max_compression_error` drops those whose estimated
    error (planner/compression.py) exceeds it, and with no ranks given picks from default candidates."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    cap_notes: list[str] = []
    rank_errors: dict[int, float] = {}
    if max_compression_error is not None:
        asked = tuple(grad_ranks) or default_ranks(model)
        grad_ranks, rank_errors = allowed_ranks(model, train, asked, max_compression_error)
        dropped = [r for r in asked if r not in grad_ranks]
        if dropped:
            cap_notes.append("grad_rank " + ", ".join(f"{r} (estimated error {rank_errors[r]:.2f})" for r in dropped)
                             + f" excluded by max_compression_error {max_compression_error:g}")
    cm = cost_model(model, train, hw)
    base = baselines if baselines is not None else run_baselines(model, train, hw)
    lower = lower_bound(model, train, hw, grad_ranks=grad_ranks)
    same = [b for b in base if b.comparable(train, grad_ranks)]
    template = Plan(model=model.name, hardware=hw.name, train=train, layers=(LayerPlan(),) * len(cm.layers),
                    globals=PlanGlobals(prefetch_depth=1, max_compression_error=max_compression_error),
                    provenance={})
    score = _Scorer(model, train, hw, template)
    choices = list(choices) if choices is not None else cpsat.layer_choices(train, grad_ranks)
    groups = cpsat.groups(cm)
    stages: list[dict] = []

    def stage(d: dict) -> None:
        stages.append(d)
        if log is not None:        # long searches show progress (the CLI prints to stderr)
            best_s = d.get("iteration_s", d.get("objective_s"))
            log(f"[plan] {d.get('stage', 'cp-sat')}: {d.get('status', '')} "
                f"{'' if best_s is None else f'{best_s:.4g} s '}after {time.perf_counter() - t0:.1f} s")
    seeds: list[list[LayerPlan]] = []
    for b in sorted(same, key=lambda b: b.iteration_s):
        if b.plan.globals.prefetch_depth == 1 and all(lp in choices for lp in b.plan.layers):
            seeds.append(list(b.plan.layers))
    # (1) count model, placed by rule
    counts, st = cpsat.solve_counts(cm, choices, hw.gpu_mem_bytes, 1, min(5.0, 0.1 * time_limit_s),
                                    hint=seeds[0] if seeds else None)
    stage(st.to_dict())
    if counts is not None:
        seeds.append(cpsat.place(cm, choices, counts))
    # the count model's memory rows are approximate: the leanest uniform layout is always a candidate
    lean = min(choices, key=lambda c: (cpsat.resident(cm, 1, c)["gpu"], c.params != "cpu"))
    seeds.append([lean] * len(cm.layers))
    start = min(seeds, key=score)
    if math.isinf(score(start)):
        raise InputError(no_fit_message(model, train, hw))
    # (0) a space small enough to enumerate (a few thousand engine runs at most) is enumerated
    if len(choices) ** len(cm.layers) <= EXACT_LIMIT:
        t1 = time.perf_counter()
        start = min(itertools.product(choices, repeat=len(cm.layers)), key=score)
        stage({"stage": "enumerate", "wall_s": time.perf_counter() - t1, "evaluations": len(score.cache),
                       "iteration_s": score(start)})
    # (2) coordinate descent on counts, engine-scored
    t1 = time.perf_counter()
    best = descend(start, choices, score, groups, t0 + 0.4 * time_limit_s)
    stage({"stage": "descent", "wall_s": time.perf_counter() - t1, "evaluations": len(score.cache),
                   "iteration_s": score(best)})
    # (2b) per-layer moves, engine in the loop: what counts cannot express (one odd layer)
    t1 = time.perf_counter()
    best = local_search(best, list(range(len(best))), choices, score, t0 + 0.6 * time_limit_s)
    stage({"stage": "local", "wall_s": time.perf_counter() - t1, "evaluations": len(score.cache),
                   "iteration_s": score(best)})
    # (3) the full interval model seeded with the best schedule
    solver: dict = {}
    engine_vs_solver = None
    notes: list[str] = list(cap_notes)
    remaining = deadline - time.perf_counter()
    if remaining > 1.0:
        sol, st = cpsat.solve_intervals(cm, choices, best, hw.gpu_mem_bytes, remaining * 0.8,
                                        template.globals.lsp_nnz_per_row, fallback_seeds=tuple(seeds[:1]))
        solver = st.to_dict()
        stage(solver)
        if sol is not None:
            changed = [i for i, (x, y) in enumerate(zip(sol, best)) if x != y]
            sol_s = score(sol)
            off = sol_s / st.objective_s - 1.0 if st.objective_s else None
            if off is not None and abs(off) > DISAGREE:
                # CP-SAT models one iteration's makespan with approximate memory; the engine runs the
                # steady state. Refine the solver's answer with the engine in the loop.
                what = (f"disagree by {100 * off:+.1f}%" if math.isfinite(off)
                        else "disagree: the engine finds it does not fit")
                notes.append(f"engine and CP-SAT {what} on the solver's schedule; refined by local search on "
                             f"the {len(changed) or len(sol)} layers it changed")
                sol = local_search(sol, changed or list(range(len(sol))), choices, score,
                                   deadline + 0.1 * time_limit_s)
                sol_s = score(sol)
            if sol_s < score(best):
                best, engine_vs_solver = sol, off
            elif st.extra.get("seed_objective_s") and st.extra.get("seed_index") == 0:
                engine_vs_solver = score(best) / st.extra["seed_objective_s"] - 1.0
                if abs(engine_vs_solver) > DISAGREE:
                    notes.append(f"engine and CP-SAT disagree by {100 * engine_vs_solver:+.1f}% on the chosen plan "
                                 f"(CP-SAT: one iteration's makespan from a time-limited solve; engine: steady "
                                 f"state); the plan was already refined with the engine in the loop")
    else:
        solver = {"status": "skipped (no time left)", "objective_s": None, "bound_s": None, "gap": None, "wall_s": 0.0}
    # never return something slower than a baseline the engine already verified
    best_s, sim = score.eval(best)
    if same and min(b.iteration_s for b in same) < best_s:
        b = min(same, key=lambda b: b.iteration_s)
        best, (best_s, sim) = list(b.plan.layers), (b.iteration_s, b.sim)
        notes.append(f"no schedule beat baseline {b.name!r}; returning its decisions")
        template = template.replace(globals=replace(b.plan.globals, max_compression_error=max_compression_error))
    if math.isinf(best_s):
        raise InputError(no_fit_message(model, train, hw))
    wall = time.perf_counter() - t0
    plan = template.with_layers(best).replace(provenance={
        "policy": "planner", "solver": solver, "stages": stages, "lower_bound_s": lower.bound_s,
        "lower_bound_binding": lower.binding, "engine_iteration_s": best_s, "engine_vs_solver": engine_vs_solver,
        "wall_s": wall, "engine_evaluations": len(score.cache),
        **({"grad_ranks": list(grad_ranks), "rank_error_estimates": {str(r): round(e, 4) for r, e in rank_errors.items()}}
           if rank_errors else {})})
    return PlanResult(plan=plan, sim=sim, lower=lower, baselines=base, solver=solver, stages=stages,
                      engine_vs_solver=engine_vs_solver, notes=notes, wall_s=wall, evaluations=len(score.cache),
                      grad_ranks=tuple(grad_ranks))


def smallest_budget(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> tuple[float, str] | None:
    """(GiB, policy): the least GPU memory with which some memory-lean policy fits, by binary search
    over budgets (to 1/8 GiB). None when none fits even with a huge GPU (host memory or SSD short)."""
    def fits(policy: str, gib: float) -> bool:
        h = hw.with_gpu_mem(gib)
        try:
            plan = make_policy(policy, model, train, h)
        except PolicyInfeasible:
            return False
        return bool(simulate(model, plan.train, h, plan).fits)

    best = None
    for name in MEMORY_LEAN:
        hi = max(hw.gpu_mem_bytes / GiB, 1.0)
        while not fits(name, hi):
            hi *= 2
            if hi > 1 << 14:
                break
        else:
            lo = 0.0
            while hi - lo > 0.125:
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if fits(name, mid) else (mid, hi)
            if best is None or hi < best[0]:
                best = (hi, name)
    return best


def no_fit_message(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> str:
    found = smallest_budget(model, train, hw)
    have = hw.gpu_mem_bytes / GiB
    if found is None:
        return (f"no plan fits {model.name} (batch {train.batch}, seq {train.seq_len}) on {hw.name}: host memory "
                f"({hw.cpu_mem_bytes / GiB:.0f} GiB) and SSD ({hw.ssd_capacity_total_bytes / GiB:.0f} GiB) "
                f"cannot hold the state even with a larger GPU")
    gib, policy = found
    return (f"no plan fits {model.name} (batch {train.batch}, seq {train.seq_len}) in {have:g} GiB of GPU memory "
            f"on {hw.name}; the smallest budget that fits is {gib:.2f} GiB (policy {policy})")
