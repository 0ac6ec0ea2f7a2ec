"""`tiertune plan --search local`: a plain local search over the plan vocabulary, with the engine
(`simulate()`) as its only oracle. It is the reference the planner must beat: it knows nothing of
CP-SAT, bounds or estimates, and is written to be as good as a plain search can be, not tuned down.

Start: the fastest fitting baseline in the planner's own space (same training settings, lossless
unless ranks are allowed), else the leanest uniform plan. Moves, tried in this order in each pass:
  - the prefetch depth (0-3);
  - the activation slices (1, 2, 4, 8: those that divide the micro-batch);
  - one field (params, optimizer, update, activations, grad_rank) set to one value on a block of
    layers: the whole model, its halves, quarters, ... down to single layers.
An improving move is kept at once and the pass goes on from there; passes repeat until one finds
nothing or the time is up.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile
from tiertune.schedule import ACTIVATIONS, UPDATES, LayerPlan, Plan
from tiertune.simulator import simulate
from tiertune.vocab import TIERS
from tiertune.workload import ModelSpec, TrainSpec

DEPTHS = (0, 1, 2, 3)      # prefetch depths searched (layers fetched ahead of their use)
SLICES = (1, 2, 4, 8)      # activation slices searched (PlanGlobals.activation_slices)


def slice_choices(train: TrainSpec) -> tuple[int, ...]:
    """The activation slices searched for these settings: those that divide the micro-batch."""
    return tuple(s for s in SLICES if train.batch % s == 0)


@dataclass
class LocalResult:
    plan: Plan
    sim: object                  # SimResult of `plan`
    evaluations: int
    passes: int
    wall_s: float


def layer_ok(lp: LayerPlan, train: TrainSpec) -> bool:
    """What Plan validation and the engine accept: LOMO's fused update needs a GPU optimizer and no
    gradient accumulation or clipping."""
    if lp.update == "fused":
        return lp.optimizer == "gpu" and train.grad_accum == 1 and train.grad_clip is None
    return True


def field_values(ranks: tuple[int, ...]) -> dict[str, tuple]:
    return {"params": TIERS, "optimizer": TIERS, "update": UPDATES, "activations": ACTIVATIONS,
            "grad_rank": (None,) + tuple(ranks)}


def blocks(n: int) -> Iterator[range]:
    """The whole model, then halves, quarters, ... down to single layers."""
    size = n
    while True:
        for start in range(0, n, size):
            yield range(start, min(n, start + size))
        if size == 1:
            return
        size = max(1, size // 2)


def local_search(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, start: Plan, time_limit_s: float,
                 ranks: tuple[int, ...] = (), log: Callable[[str], None] | None = None,
                 allowed: Callable[[LayerPlan], bool] | None = None) -> LocalResult:
    """Improve `start` by the moves of the module docstring until none helps or time is up;
    `allowed` narrows the per-layer choices (default: everything Plan validation accepts)."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    cache: dict[tuple, float] = {}
    fastest: list = [math.inf, None]        # the fastest run's SimResult: the best plan's, returned

    def score(plan: Plan) -> float:
        key = (plan.layers, plan.globals.prefetch_depth, plan.globals.activation_slices)
        # floats only: the SimResults of thousands of runs kept the garbage collector busy
        if key not in cache:
            sim = simulate(model, train, hw, plan)
            cache[key] = float(sim.iteration_s)
            if cache[key] < fastest[0] * (1 - 1e-9):     # as a move is kept: the best plan's run
                fastest[:] = [cache[key], sim]
        return cache[key]

    best = start
    best_s = score(best)
    values = field_values(ranks)
    passes = 0
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        passes += 1
        for move in _moves(len(best.layers), values, slice_choices(train)):
            if time.perf_counter() > deadline:
                break
            cand = apply(best, move, train, allowed)
            if cand is None:
                continue
            s = score(cand)
            if s < best_s * (1 - 1e-9):
                best, best_s, improved = cand, s, True
        if log is not None:
            log(f"[local] pass {passes}: {best_s:.4g} s after {time.perf_counter() - t0:.1f} s, "
                f"{len(cache)} simulations")
    if math.isinf(best_s):
        raise InputError(f"local search found no plan that fits {model.name} on {hw.name}")
    return LocalResult(best, fastest[1], len(cache), passes, time.perf_counter() - t0)


def _moves(n_layers: int, values: dict[str, tuple], slices: tuple[int, ...]) -> Iterator[tuple]:
    """The moves of one pass (see the module docstring), as (what, where, value)."""
    for d in DEPTHS:
        yield ("prefetch_depth", None, d)
    for s in slices:
        yield ("activation_slices", None, s)
    for block in blocks(n_layers):
        for name, vals in values.items():
            for v in vals:
                yield (name, block, v)


def apply(plan: Plan, move: tuple, train: TrainSpec,
          allowed: Callable[[LayerPlan], bool] | None = None) -> Plan | None:
    """`plan` with the move made, or None when it changes nothing valid."""
    name, block, v = move
    if block is None:                  # a plan-wide setting: prefetch_depth, activation_slices
        return None if v == getattr(plan.globals, name) else plan.replace(
            globals=dataclasses.replace(plan.globals, **{name: v}))
    new = list(plan.layers)
    changed = False
    for i in block:
        lp = new[i]
        if getattr(lp, name) == v:
            continue
        extra = {"grad_rank": None} if name == "optimizer" and v == "gpu" else {}   # a rank needs an off-GPU optimizer
        try:
            nl = lp.replace(**{name: v}, **extra)
        except InputError:
            continue
        if layer_ok(nl, train) and (allowed is None or allowed(nl)):
            new[i] = nl
            changed = True
    if not changed:
        return None
    try:
        return plan.with_layers(new)
    except InputError:          # a combination Plan validation refuses
        return None


def plan_local(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, time_limit_s: float,
               grad_ranks: tuple[int, ...] = (), log: Callable[[str], None] | None = None):
    """`plan --search local`: the local search from the fastest fitting baseline in the planner's
    space (else the leanest uniform plan), as a PlanResult like the planner's."""
    from tiertune.planner.bounds import lower_bound
    from tiertune.planner.search import PlanResult, _fits, _mechanics_only, lean_start, run_baselines

    t0 = time.perf_counter()
    base = run_baselines(model, train, hw)
    same = sorted((b for b in base if b.comparable(train, grad_ranks)), key=lambda b: b.iteration_s)
    if not same and not _fits(model, train, hw, grad_ranks, None):
        # as the planner does: the settings of a lossless baseline that fits with mechanics only
        same = sorted((b for b in base if b.fits and b.name != "ideal" and b.plan.lossless
                       and _mechanics_only(b.plan.train, train)), key=lambda b: b.iteration_s)[:1]
        train = same[0].plan.train if same else train
    if same:
        start, origin = same[0].plan, f"baseline {same[0].name}"
    else:
        start, origin = lean_start(model, train, hw, grad_ranks), "leanest uniform plan"
    left = max(0.0, time_limit_s - (time.perf_counter() - t0))
    res = local_search(model, train, hw, start, left, grad_ranks, log)
    stage = {"name": "local", "wall_s": res.wall_s, "iteration_s": float(res.sim.iteration_s),
             "improved": res.plan != start, "evaluations": res.evaluations, "passes": res.passes,
             "start": origin}
    plan = res.plan.replace(provenance={"policy": "local-search", "start": origin, "stages": [stage]})
    return PlanResult(plan=plan, sim=res.sim, lower=lower_bound(model, train, hw, grad_ranks=grad_ranks),
                      baselines=base, solver={}, stages=[stage], notes=[], wall_s=time.perf_counter() - t0,
                      evaluations=res.evaluations, grad_ranks=tuple(grad_ranks),
                      plan_from="local" if stage["improved"] else origin)
