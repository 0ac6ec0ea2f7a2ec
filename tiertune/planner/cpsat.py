"""CP-SAT models of the per-layer schedule (OR-Tools `cp_model`), in two stages (a full interval model
with no hint found no feasible schedule from 16 layers up in 60 s in our trials; counts first, then
intervals seeded with the best plan, did):

1. `solve_counts`: a count model. Layers with the same shape (all blocks; embed and head alone) form
   a group; integer counts say how many layers of a group take each decision tuple. Steady-state
   per-resource sums <= T, memory of each tier as a sum, minimise T. `place` then puts the counts on
   layers by rule (GPU-resident first, kept activations last, everything else spread evenly).
2. `solve_intervals`: the full model. Per layer, literals for all five LayerPlan dimensions; optional
   intervals on every resource (gpu, h2d, d2h, cpu, ssd_read, ssd_write) whose sizes follow the
   literals; no-overlap per resource; precedence along forward and backward; GPU memory as
   AddCumulative over optional intervals (resident data as full-horizon rectangles); host and SSD
   memory as sums; objective = iteration makespan. Seeded with a complete hint: the seed plan's
   literals plus start times from the same model solved with those decisions fixed.

Time is in coarse integer units (about 1 ms, scaled up for long iterations: 1 us units left the
same model without a feasible solution within the time limit in our trials). Every duration comes from CostModel; the engine re-checks the answer.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from tiertune.hardware import HardwareProfile
from tiertune.planner.estimate import (fold_duplex, layer_work, optimizer_state_bytes,
                                       usable_gpu_bytes)
from tiertune.schedule import ACTIVATIONS, LayerPlan, Plan
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import layer_recipe
from tiertune.vocab import LINKS, RESOURCES, TIERS

MIB = 1 << 20
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


def working_set(cm: CostModel, depth: int) -> int:
    """GPU bytes a layer's backward holds beyond what stays resident, at worst (a streamed layer
    whose activations come back): the largest recipe working set. Prefetches (`depth` layers
    ahead) are not reserved: the engine starts a copy only once its bytes fit, so a tight budget
    delays them instead of failing. Activations kept for earlier layers are in `resident`."""
    worst = LayerPlan(params="cpu", optimizer="cpu", activations="cpu")
    return max(layer_recipe(cm, i, worst).working_gpu for i in range(len(cm.layers)))


# --- stage 1: the count model ---------------------------------------------------------------------

def solve_counts(cm: CostModel, choices: list[LayerPlan], gpu_budget: int, depth: int, time_limit_s: float,
                 nnz_per_row: int = 4, hint: list[LayerPlan] | None = None) -> tuple[list[dict] | None, SolverStats]:
    """How many layers of each group take each choice, minimising the largest per-resource sum.
    Returns one {choice index: count} per group (None if nothing fits) and the solver's stats."""
    t0 = time.perf_counter()
    hw = cm.hw
    grp = groups(cm)
    works = {}
    for g in grp:
        i = g[0]
        for k, lp in enumerate(choices):
            w = layer_work(cm, i, lp, nnz_per_row)
            tot = dict.fromkeys(RESOURCES, 0.0)
            for d in (w.fwd, w.bwd, w.post):
                for r, v in d.items():
                    tot[r] += v
            works[i, k] = (fold_duplex(tot, hw), resident(cm, i, lp))
    horizon = sum(max(works[g[0], k][0].values()) * len(g) for g in grp for k in [0]) * 50 + 1.0
    unit = horizon / 2e6
    m = cp_model.CpModel()
    counts = []
    for gi, g in enumerate(grp):
        cs = {k: m.new_int_var(0, len(g), f"n{gi}_{k}") for k in range(len(choices))}
        m.add(sum(cs.values()) == len(g))
        counts.append(cs)
    T = m.new_int_var(0, int(horizon / unit) + 1, "T")
    for r in RESOURCES:
        m.add(T * 1000 >= sum(int(round(works[g[0], k][0][r] / unit * 1000)) * counts[gi][k]
                              for gi, g in enumerate(grp) for k in range(len(choices))))
    cap = {"gpu": usable_gpu_bytes(hw, gpu_budget) - working_set(cm, depth), "cpu": hw.cpu_mem_bytes, "ssd": hw.ssd_capacity_total_bytes}
    if cap["gpu"] < 0:
        return None, SolverStats("infeasible", None, None, time.perf_counter() - t0, "counts")
    for tier in TIERS:
        m.add(sum((works[g[0], k][1][tier] // MIB) * counts[gi][k]
                  for gi, g in enumerate(grp) for k in range(len(choices))) <= cap[tier] // MIB)
    m.minimize(T)
    if hint is not None:
        for gi, g in enumerate(grp):
            for k, lp in enumerate(choices):
                m.add_hint(counts[gi][k], sum(1 for i in g if hint[i] == lp))
    solver = _solver(time_limit_s)
    st = _solve(solver, m)
    wall = time.perf_counter() - t0
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, SolverStats(STATUS.get(st, str(st)), None, None, wall, "counts")
    out = [{k: solver.value(v) for k, v in cs.items() if solver.value(v)} for cs in counts]
    return out, SolverStats(STATUS[st], solver.objective_value * unit, solver.best_objective_bound * unit, wall,
                            "counts")


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


# --- stage 3: the full interval model -------------------------------------------------------------

class IntervalModel:
    """Per-layer literals + optional intervals for one iteration; see the module docstring."""

    def __init__(self, cm: CostModel, choices: list[LayerPlan], gpu_budget: int, unit_s: float,
                 nnz_per_row: int = 4) -> None:
        self.cm, self.choices, self.unit = cm, choices, unit_s
        hw = cm.hw
        n = len(cm.layers)
        m = self.m = cp_model.CpModel()
        u = lambda s: max(0, int(math.ceil(s / unit_s))) if s > 0 else 0     # noqa: E731
        opts = {dim: sorted({getattr(c, dim) for c in choices}, key=str)
                for dim in ("params", "optimizer", "update", "activations", "grad_rank")}
        self.lit: list[dict] = []
        horizon = 0
        for i in range(n):
            lc = cm.layers[i]
            worst = sum(max(layer_work(cm, i, c, nnz_per_row).__dict__[ph].get(r, 0.0) for c in choices)
                        for ph in ("fwd", "bwd", "post") for r in RESOURCES)
            horizon += u(worst) + 1
        H = self.H = horizon
        self.makespan = m.new_int_var(0, H, "makespan")
        res_iv: dict[str, list] = {r: [] for r in RESOURCES}
        gpu_mem_iv, gpu_mem_dem = [], []
        static = {"cpu": [], "ssd": []}
        self.starts = []
        prev_f = prev_b_end = None
        self.b_end = []
        tasks_per_layer = []
        for i in range(n):
            lc = cm.layers[i]
            L = {}
            for dim, vals in opts.items():
                L[dim] = {v: m.new_bool_var(f"{dim}{i}_{v}") for v in vals}
                m.add_exactly_one(L[dim].values())
            # only combinations that are in `choices`
            combo = {c: m.new_bool_var(f"c{i}_{k}") for k, c in enumerate(choices)}
            m.add_exactly_one(combo.values())
            for c, b in combo.items():
                for dim in opts:
                    m.add_implication(b, L[dim][getattr(c, dim)])
            L["combo"] = combo
            self.lit.append(L)
            e = cm.train.elem_bytes
            P, O, A, U, R = L["params"], L["optimizer"], L["activations"], L["update"], L["grad_rank"]

            def lin(pairs):
                return sum(b * d for b, d in pairs if d)

            def task(name, res, dur_expr, present, dur_max):
                s = m.new_int_var(0, H, f"s_{name}{i}")
                d = m.new_int_var(0, dur_max, f"d_{name}{i}")
                m.add(d == dur_expr)
                en = m.new_int_var(0, H, f"e_{name}{i}")
                iv = (m.new_optional_interval_var(s, d, en, present, f"{name}{i}") if present is not True
                      else m.new_interval_var(s, d, en, f"{name}{i}"))
                if res:
                    res_iv[res].append(iv)
                m.add(en <= self.makespan)
                self.starts.append((s, en, d, name, i))
                return s, en, iv

            def any_of(vals, dim_lits):
                b = m.new_bool_var(f"any{i}_{len(self.starts)}")
                ls = [dim_lits[v] for v in vals if v in dim_lits]
                m.add_bool_or(ls).only_enforce_if(b)
                for x in ls:
                    m.add_implication(x, b)
                return b

            def both(a, b):
                x = m.new_bool_var(f"and{i}_{len(self.starts)}")
                m.add_bool_and([a, b]).only_enforce_if(x)
                m.add_bool_or([a.Not(), b.Not()]).only_enforce_if(x.Not())
                return x

            f_d = u(cm.forward_s(i))
            fs, fe, _ = task("F", "gpu", f_d, True, f_d)
            comp = {r: (2 * u(cm.compress_s(i, r, nnz_per_row)) if r is not None else 0) for r in R}
            b_expr = u(cm.backward_s(i)) + lin([(A.get("recompute"), u(cm.recompute_s(i)))] if "recompute" in A else []) \
                + lin([(R[r], comp[r]) for r in R])
            b_max = u(cm.backward_s(i)) + u(cm.recompute_s(i)) + max(comp.values())
            bs, be, _ = task("B", "gpu", b_expr, True, b_max)
            if prev_f is not None:
                m.add(fs >= prev_f)
            prev_f = fe
            self.b_end.append((bs, be))
            streamed = any_of([t for t in TIERS if t != "gpu"], P)
            w_h2d = u(cm.h2d_s(lc.weight_bytes))
            pfs, pfe, _ = task("PF", "h2d", w_h2d, streamed, w_h2d)
            m.add(pfe <= fs)
            pbs, pbe, _ = task("PB", "h2d", w_h2d, streamed, w_h2d)
            m.add(pbe <= bs)
            m.add(pbs >= fe)
            if "ssd" in P:
                sr = u(cm.ssd_read_s(lc.weight_bytes))
                _, e1, _ = task("SRF", "ssd_read", sr, P["ssd"], sr)
                m.add(pfs >= e1).only_enforce_if(P["ssd"])
                _, e2, _ = task("SRB", "ssd_read", sr, P["ssd"], sr)
                m.add(pbs >= e2).only_enforce_if(P["ssd"])
            off = any_of(["cpu", "ssd"], A)
            a_d2h, a_h2d = u(cm.d2h_s(lc.act_bytes)), u(cm.h2d_s(lc.act_bytes))
            aos, aoe, _ = task("AO", "d2h", a_d2h, off, a_d2h)
            m.add(aos >= fe)
            ais, aie, _ = task("AI", "h2d", a_h2d, off, a_h2d)
            m.add(aie <= bs)
            m.add(ais >= aoe)
            if "ssd" in A:
                aw, ar = u(cm.ssd_write_s(lc.act_bytes)), u(cm.ssd_read_s(lc.act_bytes))
                ws_, we_, _ = task("AW", "ssd_write", aw, A["ssd"], aw)
                m.add(ws_ >= aoe).only_enforce_if(A["ssd"])
                rs_, re_, _ = task("AR", "ssd_read", ar, A["ssd"], ar)
                m.add(rs_ >= we_).only_enforce_if(A["ssd"])
                m.add(ais >= re_).only_enforce_if(A["ssd"])
            # gradients and the update
            gpu_opt = O.get("gpu", None)
            host_opt = any_of(["cpu", "ssd"], O)
            ugd = u(cm.gpu_update_s(i))
            ugs, uge, _ = task("UG", "gpu", ugd, gpu_opt if gpu_opt is not None else False, ugd)
            m.add(ugs >= be)
            nparams = {r: (cm.compressed_params(i, r) if r is not None else lc.params) for r in R}
            g_expr = lin([(R[r], u(cm.d2h_s(nparams[r] * e))) for r in R])
            gmax = max(u(cm.d2h_s(nparams[r] * e)) for r in R)
            gs, ge, _ = task("G", "d2h", g_expr, host_opt, gmax)
            m.add(gs >= be)
            c_expr = lin([(R[r], u(cm.cpu_update_s(nparams[r]))) for r in R])
            cmax = max(u(cm.cpu_update_s(nparams[r])) for r in R)
            ucs, uce, _ = task("UC", "cpu", c_expr, host_opt, cmax)
            m.add(ucs >= ge)
            if "after" in U:
                self._after_lits = getattr(self, "_after_lits", [])
                self._after_lits.append((U["after"], ugs, ucs))
            if "ssd" in O:
                ob = optimizer_state_bytes(cm, i, LayerPlan(optimizer="ssd"))
                orr = u(cm.ssd_read_s(ob))
                _, ore, _ = task("OR", "ssd_read", orr, O["ssd"], orr)
                m.add(ucs >= ore).only_enforce_if(O["ssd"])
                ow = u(cm.ssd_write_s(ob + lc.weight_bytes))
                ows, _, _ = task("OW", "ssd_write", ow, O["ssd"], ow)
                m.add(ows >= uce).only_enforce_if(O["ssd"])
            if "gpu" in P:
                wb = both(P["gpu"], host_opt)
                wbd = lin([(R[r], u(cm.h2d_s(nparams[r] * e if r is not None else lc.weight_bytes))) for r in R])
                wbmax = u(cm.h2d_s(lc.weight_bytes))
                wbs, _, _ = task("WB", "h2d", wbd, wb, wbmax)
                m.add(wbs >= uce)
            # GPU memory (MiB): resident rectangles over the whole horizon, in-flight intervals
            def mem(start, end, demand_mib, present):
                if demand_mib <= 0:
                    return
                size = m.new_int_var(0, H, f"ms{i}_{len(gpu_mem_iv)}")
                iv = m.new_optional_interval_var(start, size, end, present, f"mem{i}_{len(gpu_mem_iv)}")
                gpu_mem_iv.append(iv)
                gpu_mem_dem.append(demand_mib)

            mb = lambda x: int(math.ceil(x / MIB))                  # noqa: E731
            if "gpu" in P:
                mem(0, H, mb(lc.weight_bytes), P["gpu"])
            if gpu_opt is not None:
                mem(0, H, mb(optimizer_state_bytes(cm, i, LayerPlan())), gpu_opt)
            mem(pfs, fe, mb(lc.weight_bytes), streamed)
            mem(pbs, be, mb(lc.weight_bytes), streamed)
            if "keep" in A:
                mem(fs, be, mb(lc.act_bytes), A["keep"])
            if "recompute" in A:
                mem(fs, be, mb(lc.act_checkpoint_bytes), A["recompute"])
                mem(bs, be, mb(lc.act_bytes), A["recompute"])
            mem(fs, aoe, mb(lc.act_bytes), off)
            mem(ais, be, mb(lc.act_bytes), off)
            if gpu_opt is not None:
                mem(bs, uge, mb(lc.grad_bytes), gpu_opt)
            mem(bs, ge, mb(lc.grad_bytes), host_opt)
            # host and SSD memory: what lives there all iteration
            for tier in ("cpu", "ssd"):
                terms = []
                if tier in P:
                    terms.append(P[tier] * mb(lc.weight_bytes))
                if tier in O:
                    terms.append(O[tier] * mb(optimizer_state_bytes(cm, i, LayerPlan(optimizer=tier))))
                if tier in A:
                    terms.append(A[tier] * mb(lc.act_bytes))
                static[tier].extend(terms)
            tasks_per_layer.append((fs, fe, bs, be))
        # backward runs in reverse layer order, after the whole forward
        for i in range(n - 1, -1, -1):
            bs, be = self.b_end[i]
            m.add(bs >= (tasks_per_layer[-1][1] if i == n - 1 else self.b_end[i + 1][1]))
        last_b = self.b_end[0][1]
        for lit, ugs, ucs in getattr(self, "_after_lits", []):
            m.add(ugs >= last_b).only_enforce_if(lit)
            m.add(ucs >= last_b).only_enforce_if(lit)
        # one task at a time per resource; half-duplex links share one timeline
        lanes = [["gpu"]]
        for link, pair in LINKS.items():
            lanes += [[r] for r in pair] if getattr(hw, f"{link}_duplex") else [list(pair)]
        for lane in lanes:
            m.add_no_overlap([iv for r in lane for iv in res_iv[r]])
        if hw.cpu_workers > 1:
            m.add_cumulative(res_iv["cpu"], [1] * len(res_iv["cpu"]), hw.cpu_workers)
        else:
            m.add_no_overlap(res_iv["cpu"])
        m.add_cumulative(gpu_mem_iv, gpu_mem_dem, max(0, usable_gpu_bytes(hw, gpu_budget) // MIB))
        self.n_intervals = len(self.starts) + len(gpu_mem_iv)
        m.add(sum(static["cpu"]) <= hw.cpu_mem_bytes // MIB)
        m.add(sum(static["ssd"]) <= hw.ssd_capacity_total_bytes // MIB)
        m.minimize(self.makespan)

    def fix(self, layers: list[LayerPlan]) -> None:
        """Constraints pinning the decisions to `layers` (to get start times for a complete hint)."""
        for L, lp in zip(self.lit, layers):
            self.m.add(L["combo"][lp] == 1)

    def hint_from(self, solver: cp_model.CpSolver) -> None:
        self.m.clear_hints()
        for idx in range(len(self.m.proto.variables)):
            var = self.m.get_int_var_from_proto_index(idx)
            self.m.add_hint(var, solver.value(var))

    def decisions(self, solver: cp_model.CpSolver) -> list[LayerPlan]:
        return [next(c for c, b in L["combo"].items() if solver.boolean_value(b)) for L in self.lit]


def solve_intervals(cm: CostModel, choices: list[LayerPlan], seed: list[LayerPlan], gpu_budget: int,
                    time_limit_s: float, nnz_per_row: int = 4, unit_s: float | None = None,
                    fallback_seeds: tuple[list[LayerPlan], ...] = ()) -> tuple[list[LayerPlan] | None, SolverStats]:
    """Stage 3: the full model seeded with `seed` (added to `choices` where missing). When this model
    finds no schedule for `seed` in its share of time (its memory rows differ from the engine's), the
    next of `fallback_seeds` provides the hint instead."""
    t0 = time.perf_counter()
    seeds = [seed, *fallback_seeds]
    for sd in seeds:
        for lp in sd:
            if lp not in choices:
                choices = choices + [lp]
    if unit_s is None:
        est = sum(cm.forward_s(i) + cm.backward_s(i) for i in range(len(cm.layers)))
        unit_s = est / 2000                    # ~1 ms at 2 s of compute; scaled with the model
    model = IntervalModel(cm, choices, gpu_budget, unit_s, nnz_per_row)
    extra = {"unit_s": unit_s, "intervals": model.n_intervals}
    # (a) start times for a seed: the model with its decisions pinned. Pinning adds constraints only,
    # so the variables of the free copy have the same indices and take the hint 1:1.
    for k, sd in enumerate(seeds):
        pinned = IntervalModel(cm, choices, gpu_budget, unit_s, nnz_per_row)
        pinned.fix(sd)
        s1 = _solver(max(0.5, time_limit_s * 0.3 / len(seeds)))
        st1 = _solve(s1, pinned.m)
        extra.update(seed_status=STATUS.get(st1, str(st1)), seed_index=k)
        if st1 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            extra["seed_objective_s"] = s1.objective_value * unit_s
            model.hint_from(s1)
            break
    # (b) the free model from that complete hint, polishing in the remaining time
    remaining = max(0.5, time_limit_s - (time.perf_counter() - t0))
    s2 = _solver(remaining)
    st2 = _solve(s2, model.m)
    wall = time.perf_counter() - t0
    if st2 not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, SolverStats(STATUS.get(st2, str(st2)), None, None, wall, "intervals", extra)
    return model.decisions(s2), SolverStats(STATUS[st2], s2.objective_value * unit_s,
                                            s2.best_objective_bound * unit_s, wall, "intervals", extra)


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
