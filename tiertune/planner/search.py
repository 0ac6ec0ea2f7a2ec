"""The search driver: `plan_schedule(model, train, hw, time_limit_s) -> PlanResult`.

Stages, each recorded as {name, wall_s, iteration_s (engine), improved}; only engine numbers decide:
  seeds        the named baselines in the planner's space and the leanest uniform plan;
  slices       the seeds again at each activation_slices: the one the next stages search at;
  cpsat-counts CP-SAT count model (how many layers of each kind take each choice), placed by rule,
               solved again with what the engine found short kept free;
  cpsat-cycle  CP-SAT model of the steady-state step (planner/cycle.py), hinted with the best so far;
  descent      coordinate descent on those counts, from the best so far and from the other of the
               seeds' best and the count model's placement;
  depth        the prefetch depth (0-3) and the activation slices (1-8), together;
  local        per-layer and pair moves;
  cpsat-cycle-refine  the cyclic model again at the chosen prefetch depth, hinted with the best;
  polish       the plain local search of planner/local.py (`--search local`) from the best so far;
  restarts     iterated local search: a few layers moved at random, polished again, in the time left.
`plan_from` names the stage (or baseline) whose solution is returned. If nothing fits, InputError
names the smallest GPU budget that would.
"""
from __future__ import annotations

from typing import Callable

import itertools
import random
import math
import time
from dataclasses import dataclass, field, replace

from tiertune.errors import InputError
from tiertune.hardware import GiB, HardwareProfile
from tiertune.planner import cpsat
from tiertune.planner.bounds import LowerBound, lower_bound
from tiertune.planner.cycle import solve_cycle
from tiertune.planner.compression import allowed_ranks, default_ranks
from tiertune.planner.estimate import cost_model
from tiertune.planner.local import slice_choices
from tiertune.simulator.recipe import layer_recipe
from tiertune.planner.policies import POLICIES, PolicyInfeasible, make_policy
from tiertune.schedule import ACTIVATIONS, LayerPlan, Plan, PlanGlobals
from tiertune.vocab import TIERS
from tiertune.workload import ModelSpec, TrainSpec

DISAGREE = 0.05            # engine vs solver beyond this: say so and refine
EXACT_LIMIT = 2048         # enumerate the whole space through the engine when it is this small
SECOND_START = 1.25        # the descent's second start, if at most this much slower than the best
COUNTS_ROUNDS = 6          # count-model solves, each with the engine's shortfall kept free
REFINE_SHARE = 0.15        # of the time limit, kept for the last stage (the cyclic model from the best)
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

    def comparable(self, train: TrainSpec, grad_ranks: tuple[int, ...], mechanics: bool = False) -> bool:
        """A fitting baseline in the planner's own space: the same training settings (LOMO may swap
        the optimizer) and only gradient ranks the user allowed (lossless unless they did).
        `mechanics`: also one whose settings differ only in how a step runs, not in what it
        computes (MECHANICS: Fuyou's half-block checkpoints, a chunked loss): it trains the same."""
        same_math = self.fits and (self.plan.train == train or (mechanics and _mechanics_only(self.plan.train, train)))
        return (same_math and self.name != "ideal"
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
    plan_from: str = ""                            # the stage (or baseline) whose solution is returned

    @property
    def iteration_s(self) -> float:
        return float(self.sim.iteration_s)

    @property
    def best_baseline(self) -> Baseline | None:
        fitting = [b for b in self.baselines if b.comparable(self.plan.train, self.grad_ranks, mechanics=True)]
        return min(fitting, key=lambda b: b.iteration_s) if fitting else None

    @property
    def speedup_vs_best_baseline(self) -> float | None:
        b = self.best_baseline
        return b.iteration_s / self.iteration_s if b else None

    def summary(self) -> dict:
        b = self.best_baseline
        finite = self.lower.feasible
        return {
            "iteration_s": self.iteration_s,
            "tokens_per_s": float(self.sim.tokens_per_s),
            "lower_bound_s": self.lower.bound_s if finite else None,
            "lower_bound_reason": self.lower.reason,
            "ratio_to_lower_bound": self.lower.ratio(self.iteration_s) if finite else None,
            "prefetch_depth": self.plan.globals.prefetch_depth,
            "activation_slices": self.plan.globals.activation_slices,
            "stages": [_json_safe(st) for st in self.stages],
            "plan_from": self.plan_from,
            "solver": {k: self.solver.get(k) for k in ("status", "objective_s", "bound_s", "gap", "wall_s")},
            "engine_vs_solver": (self.engine_vs_solver if self.engine_vs_solver is None
                                 or math.isfinite(self.engine_vs_solver) else None),
            "best_baseline": {"policy": b.name, "iteration_s": b.iteration_s} if b else None,
            "speedup_vs_best_baseline": self.speedup_vs_best_baseline,
            "planner_wall_s": self.wall_s,
            "engine_evaluations": self.evaluations,
            "notes": self.notes,
        }


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


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
    """Engine-in-the-loop scoring with a cache keyed by the plan-wide settings and per-layer decisions.
    `depth` and `slices` are the prefetch depth and activation slices the scored plans use (the
    slices and depth stages set them)."""

    def __init__(self, model, train, hw, template: Plan) -> None:
        self.model, self.train, self.hw, self.template = model, train, hw, template
        self.depth = template.globals.prefetch_depth
        self.slices = template.globals.activation_slices
        self.cache: dict[tuple, float] = {}
        self.best_key: tuple | None = None
        self.best_sim = None
        self.slowest_s = 0.0             # the longest engine run so far (the planner's deadline keeps room for it)

    def __call__(self, layers) -> float:
        key = (self.depth, self.slices, tuple(layers))
        return self.cache[key] if key in self.cache else self.eval(layers)[0]

    def plan(self, layers, depth: int | None = None, slices: int | None = None) -> Plan:
        g = replace(self.template.globals, prefetch_depth=self.depth if depth is None else depth,
                    activation_slices=self.slices if slices is None else slices)
        return self.template.replace(globals=g).with_layers(tuple(layers))

    def at_depth(self, layers, depth: int) -> tuple[float, object]:
        """eval() at prefetch depth `depth`, leaving the scorer's own depth as it was."""
        kept, self.depth = self.depth, depth
        try:
            return self.eval(layers)
        finally:
            self.depth = kept

    def set(self, plan: Plan) -> None:
        """Score at `plan`'s plan-wide settings from now on."""
        self.depth, self.slices = plan.globals.prefetch_depth, plan.globals.activation_slices

    def eval(self, layers) -> tuple[float, object]:
        """(iteration seconds, SimResult). Only the fastest run's SimResult is kept: thousands of
        them (task graphs, schedules) made the garbage collector take 17% of a 30 s search, in
        pauses of up to 0.8 s; another run's is simulated again when asked for."""
        key = (self.depth, self.slices, tuple(layers))
        s = self.cache.get(key)
        if s is None or (key != self.best_key and not math.isinf(s)):
            t0 = time.perf_counter()
            sim = simulate(self.model, self.train, self.hw, self.plan(layers))
            self.slowest_s = max(self.slowest_s, time.perf_counter() - t0)
            s = self.cache[key] = float(sim.iteration_s) if sim.fits else math.inf
            if self.best_key is None or s < self.cache[self.best_key]:
                self.best_key, self.best_sim = key, sim
            return s, sim
        return s, self.best_sim if key == self.best_key else None


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


def lean_start(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, grad_ranks: tuple[int, ...] = (),
               choices: list[LayerPlan] | None = None) -> Plan:
    """The uniform plan that holds the least on the GPU (host weights before SSD ones), at the
    thinnest activation slices, among those whose layers' host and SSD bytes fit: what fits when
    anything does."""
    cm = cost_model(model, train, hw)
    choices = choices if choices is not None else cpsat.layer_choices(train, grad_ranks)
    n, thinnest = len(cm.layers), max(slice_choices(train))

    def leanness(c: LayerPlan) -> tuple:
        held = cpsat.resident(cm, 1, c)
        beyond_host = held["cpu"] * n > hw.cpu_mem_bytes or held["ssd"] * n > hw.ssd_capacity_total_bytes
        backward = layer_recipe(cm, 1, c, 1, False, PlanGlobals().lsp_nnz_per_row, thinnest).working_gpu
        return beyond_host, held["gpu"], backward, c.params != "cpu", str(c)
    lean = min(choices, key=leanness)
    return Plan(model=model.name, hardware=hw.name, train=train, layers=(lean,) * n,
                globals=PlanGlobals(prefetch_depth=1, activation_slices=thinnest), provenance={})


def plan_schedule(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, time_limit_s: float = 30.0,
                  grad_ranks: tuple[int, ...] = (), baselines: list[Baseline] | None = None,
                  choices: list[LayerPlan] | None = None,
                  max_compression_error: float | None = None,
                  log: Callable[[str], None] | None = None, cpu_checkpointing: bool = False) -> PlanResult:
    """Search a per-layer schedule; return the best engine-verified plan with provenance.
    `choices` narrows the per-layer options (default: every option the training settings allow).
    `grad_ranks`: LSP ranks each layer may use; `max_compression_error` drops those whose estimated
    error (planner/compression.py) exceeds it, and with no ranks given picks from default candidates.

    Every stage is recorded as {name, wall_s, iteration_s (engine), improved}; `plan_from` names the
    stage (or baseline) whose solution is returned. CP-SAT stages are named cpsat-*."""
    from tiertune.planner.local import DEPTHS, local_search as plain_local_search   # late: it imports the engine
    t0 = time.perf_counter()
    # the stages stop 3% early: an engine run or a solve already started finishes past its deadline,
    # and the planner's wall time, not the stages', is what the user set
    deadline = t0 + 0.97 * time_limit_s
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
    if not same and not _fits(model, train, hw, grad_ranks, choices):
        # Nothing in the planner's space fits these settings, but a baseline fits with execution
        # mechanics that change no number (half-block checkpoints, a chunked loss; Fuyou uses both):
        # plan in that baseline's settings, with its host checkpoints, and say so.
        for b in sorted(base, key=lambda b: b.iteration_s):
            if b.fits and b.name != "ideal" and _mechanics_only(b.plan.train, train) and b.plan.lossless:
                # LoHan's gradient-hook copies are its code's cost, not a setting our plans need
                theirs = b.plan.train.replace(grad_copy_fp64_norm=train.grad_copy_fp64_norm)
                res = plan_schedule(model, theirs, hw, time_limit_s - (time.perf_counter() - t0), grad_ranks,
                                    base, choices, max_compression_error, log, b.plan.globals.cpu_checkpointing)
                res.notes.insert(0, f"nothing fits the given settings; planned with {b.name}'s "
                                    f"{_mechanics_diff(theirs, train)} (simulated; the executor does not run them)")
                return res
    template = Plan(model=model.name, hardware=hw.name, train=train, layers=(LayerPlan(),) * len(cm.layers),
                    globals=PlanGlobals(prefetch_depth=1, max_compression_error=max_compression_error,
                                        cpu_checkpointing=cpu_checkpointing),
                    provenance={})
    score = _Scorer(model, train, hw, template)
    allowed = set(choices).__contains__ if choices is not None else None     # the caller narrowed the space
    choices = list(choices) if choices is not None else cpsat.layer_choices(train, grad_ranks)
    groups = cpsat.groups(cm)
    stages: list[dict] = []
    best: list[LayerPlan] = []
    best_s = math.inf
    best_from = ""

    def stage(name: str, t1: float, cand: list[LayerPlan] | None, **extra) -> None:
        """Record a stage; its candidate becomes the best when the engine finds it faster."""
        nonlocal best, best_s, best_from
        s = score(cand) if cand is not None else math.inf
        improved = s < best_s * (1 - 1e-9)
        if improved:
            best, best_s, best_from = list(cand), s, name
        stages.append({"name": name, "wall_s": time.perf_counter() - t1, "iteration_s": s, "improved": improved,
                       "evaluations": len(score.cache), **extra})
        if log is not None:        # long searches show progress (the CLI prints to stderr)
            log(f"[plan] {name}: {'' if math.isinf(s) else f'{s:.4g} s '}"
                f"{'(improved) ' if improved else ''}after {time.perf_counter() - t0:.1f} s")

    # (0) seeds: the baselines in this space, the leanest uniform plan
    seeds: list[tuple[list[LayerPlan], str]] = []
    for b in sorted(same, key=lambda b: b.iteration_s):
        seeds.append((list(b.plan.layers), f"baseline {b.name}"))
    lean = lean_start(model, train, hw, grad_ranks, choices).layers
    seeds.append((list(lean), "lean"))
    # the same placement with each treatment of the blocks' activations; the head's backward
    # follows its forward at once, so it keeps them or recomputes them, never sends them away
    for mode, head in itertools.product(ACTIVATIONS, ("keep", "recompute")):
        alt, alt_head = lean[1].replace(activations=mode), lean[-1].replace(activations=head)
        cand = [lean[0]] + [alt] * (len(lean) - 2) + [alt_head]
        if cand != list(lean) and alt in choices and alt_head in choices:
            seeds.append((cand, f"lean, activations {mode}, head {head}"))
    for layers, origin in seeds:
        stage(origin, time.perf_counter(), layers)
    def stop_at() -> float:
        """When the stages stop: early enough for the engine runs already started then (a few of the
        slowest seen so far: a run of a 96-layer model in thin slices takes half a second, one that
        does not fit a hundredth) to end in time. Read again before each stage."""
        return min(deadline, t0 + time_limit_s - 3 * score.slowest_s)
    # (0a) activation slices: the seeds at each; the stages below search at the best one
    t1 = time.perf_counter()
    at_slices = {}
    for sl in slice_choices(train):
        score.slices = sl
        at_slices[sl] = min((score(layers), k) for k, (layers, _) in enumerate(seeds))
    score.slices = min(at_slices, key=lambda sl: (at_slices[sl], sl))
    stage("slices", t1, seeds[at_slices[score.slices][1]][0], activation_slices=score.slices)
    # (1) CP-SAT count model, placed on layers by rule, at the prefetch depth the engine runs it
    # fastest. Its memory rows are sums: where the engine finds a placement short of memory (a
    # prefetch in flight, the head's logits, a host step's working bytes), the shortfall is kept
    # free and the model solved again.
    t1 = time.perf_counter()
    seeded = (list(best), score.depth)       # the seeds' best: the descent's other start
    margin = dict.fromkeys(TIERS, 0)
    placed, placed_s, placed_depth = None, math.inf, score.depth
    for rounds in range(1, COUNTS_ROUNDS + 1):
        left = min(t1 + 0.1 * time_limit_s, stop_at()) - time.perf_counter()
        if rounds > 1 and left < 0.1:
            break
        counts, st = cpsat.solve_counts(cm, choices, hw.gpu_mem_bytes, score.depth, min(5.0, max(0.1, left)),
                                        hint=best or None, margin=margin, slices=score.slices)
        if counts is None:
            break
        layers = cpsat.place(cm, choices, counts)
        runs = {d: score.at_depth(layers, d) for d in DEPTHS}
        depth = min(runs, key=lambda d: (runs[d][0], d))
        if runs[depth][0] < placed_s:
            placed, placed_s, placed_depth = layers, runs[depth][0], depth
        # the shortest prefetch that does not fit says what the engine needs beyond the model's rows
        short = next((sim for d, (s, sim) in sorted(runs.items()) if d and math.isinf(s)), None)
        if short is None or short.error_tier is None:
            break
        # doubled: the model fills whatever it is given again, so a margin grown by the
        # shortfall alone was used up by the next answer (gpt3-175b: 4 rounds of 0.35 GiB each)
        margin[short.error_tier] = 2 * (margin[short.error_tier] + max(short.error_short_bytes, 0) + cpsat.MIB)
    if math.isfinite(placed_s) and placed_s < best_s and placed_depth != score.depth:
        score.depth = placed_depth             # the stages below search at the depth it runs best at
        best_s = score(best)
    stage("cpsat-counts", t1, placed, prefetch_depth=score.depth, rounds=rounds,
          kept_free_mib={t: b // cpsat.MIB for t, b in margin.items() if b}, **_solver_fields(st))
    # (1a) the cyclic steady-state model over every choice, hinted with the best so far
    solver: dict = {}
    engine_vs_solver = None
    notes: list[str] = list(cap_notes)

    def cycle(name: str, share: float) -> None:
        nonlocal solver, engine_vs_solver
        t1 = time.perf_counter()
        # the model's last improving solutions are judged by the engine (the model's best is not
        # always its); each costs an engine run, half a second on a 96-layer model in thin slices,
        # taken from the stage's share
        judged = 3
        budget = min(share * time_limit_s, max(0.5, stop_at() - t1 - 0.2))
        found, st = solve_cycle(cm, choices, best or None, hw.gpu_mem_bytes, score.depth,
                                max(0.3, budget - judged * score.slowest_s),
                                host_ckpt=cpu_checkpointing, nnz_per_row=template.globals.lsp_nnz_per_row,
                                slices=score.slices)
        solver = st.to_dict()
        if found and st.objective_s:
            engine_vs_solver = score(found[-1]) / st.objective_s - 1.0
        sol = min(found[-judged:], key=score) if found else None
        stage(name, t1, sol, **_solver_fields(st))
    cycle("cpsat-cycle", 0.10)
    if math.isinf(best_s):
        raise InputError(no_fit_message(model, train, hw))
    # (1b) a space small enough to enumerate (a few thousand engine runs at most) is enumerated
    if len(choices) ** len(cm.layers) <= EXACT_LIMIT:
        t1 = time.perf_counter()
        stage("enumerate", t1, list(min(itertools.product(choices, repeat=len(cm.layers)), key=score)))
    # (2) coordinate descent on counts, engine-scored, from two starts: the best so far, and the
    # seeds' best or the count model's placement, whichever that is not. They often lie in
    # different basins (gpt3-13b at batch 1: weights resident and recomputed activations against
    # weights streamed and activations kept), which single-layer moves do not cross.
    t1 = time.perf_counter()
    other, other_depth = (seeded if best_from.startswith("cpsat") else (placed, placed_depth))
    starts = [(list(best), score.depth)]
    # a start far behind rarely wins in half the time (gpt3-175b at batch 16: a placement at 390 s
    # beside a seed at 292 s cost the descent from the seed half its time, 232 -> 250 s)
    if other is not None and other != best and score.at_depth(other, other_depth)[0] <= SECOND_START * best_s:
        starts.append((list(other), other_depth))
    end = min(t0 + 0.45 * time_limit_s, stop_at())
    results = []
    for k, (layers, depth) in enumerate(starts):
        score.depth = depth
        share = (end - time.perf_counter()) / (len(starts) - k)
        found = descend(layers, choices, score, groups, time.perf_counter() + share)
        results.append((score(found), k, found, depth))
    _, _, found, score.depth = min(results)
    best_s = score(best)                        # at the depth the descent's result runs best at
    stage("descent", t1, found, starts=len(starts))
    # (3) prefetch depth (how far streamed weights and activations run ahead of their use) and
    # activation slices, together: a deeper prefetch needs room that thinner slices free
    def settings(name: str) -> None:
        t1 = time.perf_counter()
        by_setting = {}
        for d in DEPTHS:
            for sl in slice_choices(train):
                score.depth, score.slices = d, sl
                by_setting[d, sl] = score(best)
        score.depth, score.slices = min(by_setting, key=lambda k: (by_setting[k], k[0] != 1, k[1]))
        stage(name, t1, best, prefetch_depth=score.depth, activation_slices=score.slices)
    settings("depth")
    # (4) per-layer moves, engine in the loop: what counts cannot express (one odd layer); layers
    # unlike any other (the embedding, the head) first, then the settings again for what they freed
    t1 = time.perf_counter()
    by_kind = sorted(range(len(best)), key=lambda i: next(len(g) for g in groups if i in g))
    stage("local", t1, local_search(best, by_kind, choices, score, min(t0 + 0.55 * time_limit_s, stop_at())))
    settings("depth-refine")
    # the last stage, the cyclic model from the best schedule, keeps its share of the time
    refine_s = REFINE_SHARE * time_limit_s
    # (5) the plain local search (planner/local.py, `--search local`) from the best so far, in the
    # time left: every field and the prefetch depth on blocks of layers
    left = stop_at() - refine_s - time.perf_counter()
    if left > 0.2:
        t1 = time.perf_counter()
        polished = plain_local_search(model, train, hw, score.plan(best), left, tuple(grad_ranks),
                                      allowed=allowed).plan
        kept = score.plan(best)
        score.set(polished)
        stage("polish", t1, list(polished.layers))
        if not stages[-1]["improved"]:
            score.set(kept)
    # (6) iterated local search in the time left: move a few random layers to random choices,
    # polish again, keep what the engine finds faster (several layers must often change at once:
    # memory one gives up pays for another's faster choice)
    t1 = time.perf_counter()
    rng = random.Random(0)
    run, run_s, run_plan = list(best), best_s, score.plan(best)
    while stop_at() - refine_s - time.perf_counter() > 0.2:
        cand = list(run)
        for i in rng.sample(range(len(cand)), min(len(cand), 3)):
            cand[i] = rng.choice(choices)
        left = stop_at() - refine_s - time.perf_counter()
        try:
            res = plain_local_search(model, train, hw, run_plan.with_layers(cand),
                                     min(left, max(1.0, 0.1 * time_limit_s)), tuple(grad_ranks), allowed=allowed)
        except InputError:
            continue
        if res.sim.iteration_s < run_s * (1 - 1e-9):
            run, run_s, run_plan = list(res.plan.layers), float(res.sim.iteration_s), res.plan
    if run_s < best_s:
        kept = score.plan(best)
        score.set(run_plan)
        stage("restarts", t1, run)
        if not stages[-1]["improved"]:
            score.set(kept)
    # (7) the cyclic model again, at the chosen prefetch depth and slices, from the best schedule:
    # it moves many layers at once where the engine-scored stages move one or a few
    if stop_at() - time.perf_counter() > 1.0:
        cycle("cpsat-cycle-refine", REFINE_SHARE)
    if engine_vs_solver is not None and abs(engine_vs_solver) > DISAGREE:
        what = (f"disagree by {100 * engine_vs_solver:+.1f}%" if math.isfinite(engine_vs_solver)
                else "disagree: the engine finds it does not fit")
        notes.append(f"engine and CP-SAT {what} on the solver's last schedule (CP-SAT: fixed issue order per "
                     f"resource and memory floors; engine: priorities and memory as allocated)")
    best_s, sim = score.eval(best)
    if math.isinf(best_s):
        raise InputError(no_fit_message(model, train, hw))
    result = score.plan(best)
    # never return something slower than a baseline the engine already verified (one whose depth or
    # per-layer choices lie outside the searched space)
    if same and min(b.iteration_s for b in same) < best_s:
        b = min(same, key=lambda b: b.iteration_s)
        result = b.plan.replace(globals=replace(b.plan.globals, max_compression_error=max_compression_error))
        best_s, sim, best_from = b.iteration_s, b.sim, f"baseline {b.name}"
        notes.append(f"no schedule beat baseline {b.name!r}; returning its decisions")
    wall = time.perf_counter() - t0
    plan = result.replace(provenance={
        "policy": "planner", "solver": solver, "stages": [_json_safe(s) for s in stages], "plan_from": best_from,
        "lower_bound_s": lower.bound_s if lower.feasible else None,
        "lower_bound_binding": lower.binding, "engine_iteration_s": best_s, "engine_vs_solver": engine_vs_solver,
        "wall_s": wall, "engine_evaluations": len(score.cache),
        **({"grad_ranks": list(grad_ranks), "rank_error_estimates": {str(r): round(e, 4) for r, e in rank_errors.items()}}
           if rank_errors else {})})
    return PlanResult(plan=plan, sim=sim, lower=lower, baselines=base, solver=solver, stages=stages,
                      engine_vs_solver=engine_vs_solver, notes=notes, wall_s=wall, evaluations=len(score.cache),
                      grad_ranks=tuple(grad_ranks), plan_from=best_from)


# TrainSpec fields that change how a step runs, not what it computes
MECHANICS = ("chunked_loss", "checkpoint_halves", "grad_copy_fp64_norm")


def _mechanics_only(other: TrainSpec, train: TrainSpec) -> bool:
    return other != train and other.replace(**{f: getattr(train, f) for f in MECHANICS}) == train


def _mechanics_diff(other: TrainSpec, train: TrainSpec) -> str:
    return ", ".join(f"{f}={getattr(other, f)}" for f in MECHANICS if getattr(other, f) != getattr(train, f))


def _fits(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, grad_ranks, choices) -> bool:
    """The leanest uniform plan of the planner's space fits (the search then has a start)."""
    return simulate(model, train, hw, lean_start(model, train, hw, grad_ranks, choices)).fits


def _solver_fields(st) -> dict:
    return {"status": st.status, "objective_s": st.objective_s, "bound_s": st.bound_s}


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
