"""A CP-SAT model of the steady-state training step: which LayerPlan each layer takes so that the
period T between two steps is least.

Every task's duration and every byte comes from the layers' recipes (simulator/recipe.py), the
same account the engine builds its task graph from. The step is a pipeline of lanes that each
take their work in a fixed order, as the engine issues it:
  gpu       forward 0..n-1, then (recompute +) backward n-1..0 (with compression, fused and
            overlapped GPU updates), then deferred (`after`) GPU updates 0..n-1;
  h2d       forward loads 0..n-1, then backward loads and activation fetches n-1..0;
  d2h       activation offloads 0..n-1, then gradients n-1..0 (and write-backs of GPU updates);
  ssd_read  forward weight reads, backward weight and activation reads, optimizer state reads;
  cpu       host optimizer steps: overlapped ones n-1..0 during backward, deferred ones 0..n-1
            after it (spread over the CPU's workers);
  ssd_write activation writes in forward, optimizer state and weight writes with the updates.
With a fixed order per lane the schedule is a longest-path (max-plus) system: each task ends no
sooner than its lane's previous task plus its duration, and no sooner than its inputs plus its
duration. The variable part is the durations: sums of the layer's choice literals times their
recipe durations, so the model stays linear and scales to 96+ layers (no interval variables).

It is cyclic: the next step runs the same timeline shifted by T, so every lane's work fits in T,
and the next step's forward of layer i starts no sooner than this step's update of layer i made
its weights current (deferred updates in forward order overlap the next forward; overlapped
updates end with layer 0, which the next forward needs first). Memory: the recipes' floors (home
bytes, what earlier layers keep for their backward, the working set of each backward or forward,
the neighbouring layers' weights and activations in flight) within the GPU budget, and home bytes
within host memory and the SSDs.
The engine confirms every answer; the planner keeps it only when the engine agrees it is faster.
"""

from __future__ import annotations

import dataclasses
import random
import time

from ortools.sat.python import cp_model

from tiertune.planner.cpsat import MIB, STATUS, SolverStats, _solve, _solver
from tiertune.planner.estimate import usable_gpu_bytes
from tiertune.schedule import LayerPlan
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import LayerRecipe, layer_recipe
from tiertune.vocab import CPU_TIER, GPU_TIER, LINKS, SSD_TIER



# The LayerPlan fields a search neighbourhood frees on every layer at once, in the order the search
# tries them: where the largest state lives first.
FIELDS = ("optimizer", "params", "activations", "update")
LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerPlan))

# Which (phase, lane) keys of _phase_lanes load each resource.
LANE_KEYS = {"gpu": ("f_gpu", "b_gpu", "a_gpu", "u_gpu"), "cpu": ("u_cpu", "a_cpu"),
             "h2d": ("f_h2d", "b_h2d", "u_h2d", "a_h2d"), "d2h": ("f_d2h", "b_d2h", "u_d2h", "a_d2h"),
             "ssd_read": ("f_ssdr", "b_ssdr", "u_ssdr", "a_ssdr"), "ssd_write": ("f_ssdw", "u_ssdw", "a_ssdw")}


def _lanes(hw) -> list[tuple[str, ...]]:
    """Resources that share one timeline: each alone, a half-duplex link's two directions together."""
    out = [("gpu",), ("cpu",)]
    for link, pair in LINKS.items():
        out += [(r,) for r in pair] if getattr(hw, f"{link}_duplex") else [pair]
    return out


def _phase_lanes(r: LayerRecipe, lp: LayerPlan, cpu_workers: int) -> dict[str, float]:
    """Seconds of layer work per (phase, lane) key, from the recipe."""
    out: dict[str, float] = {}

    def add(key: str, *names: str, scale: float = 1.0) -> None:
        v = sum(r.steps[n].duration * r.steps[n].count for n in names if n in r.steps) * scale
        if v:
            out[key] = out.get(key, 0.0) + v

    add("f_gpu", "forward")
    add("f_h2d", "w_load_fwd")
    add("f_ssdr", "w_ssd_read_fwd")
    add("f_d2h", "act_offload", "ckpt_offload")
    add("f_ssdw", "act_ssd_write")
    add("b_gpu", "recompute", "backward", "compress")
    add("b_h2d", "w_load_bwd", "act_fetch", "ckpt_fetch")
    add("b_ssdr", "w_ssd_read_bwd", "act_ssd_read")
    add("b_d2h", "grad")
    side = "u" if lp.update != "after" else "a"          # overlapped (u) or deferred (a) update
    if lp.optimizer == "gpu":
        add(f"{side}_gpu", "update")
        add(f"{side}_d2h", "writeback")
    else:
        add(f"{side}_cpu", "update", scale=1.0 / max(1, cpu_workers))
        add(f"{side}_gpu", "decompress")
        add(f"{side}_h2d", "writeback")
        add(f"{side}_ssdr", "opt_ssd_read")
    add(f"{side}_ssdw", "opt_ssd_write", "w_ssd_write")
    if lp.optimizer == "gpu" and lp.update != "after":
        out["b_gpu"] = out.get("b_gpu", 0.0) + out.pop("u_gpu", 0.0)   # fused/overlap: in the backward chain
    return out


class CycleModel:
    """The model for one (cost model, per-layer choices, GPU budget); see the module docstring.

    `choices[i]` are layer i's options; a layer with one option is a constant, so a model whose
    layers are pinned but for a window is small (the large-neighbourhood search builds one per
    window). `unit`: seconds per model time unit (default: 1/20000 of the slowest serial step),
    fixed across the models of one search so that their periods compare."""

    def __init__(self, cm: CostModel, choices: list[list[LayerPlan]], gpu_budget: int, depth: int,
                 host_ckpt: bool = False, nnz_per_row: int = 4, slices: int = 1, unit: float | None = None) -> None:
        hw = cm.hw
        n = len(cm.layers)
        self.cm, self.choices = cm, choices
        recs = [[layer_recipe(cm, i, lp, 1, host_ckpt, nnz_per_row, slices) for lp in choices[i]] for i in range(n)]
        memo: dict = cm.__dict__.setdefault("_phase_lanes_memo", {})   # one search builds many models

        def lanes(i: int, r: LayerRecipe, lp: LayerPlan) -> dict[str, float]:
            key = (i, lp, host_ckpt, nnz_per_row, slices)        # the recipe's own memo key
            if key not in memo:
                memo[key] = _phase_lanes(r, lp, hw.cpu_workers)
            return memo[key]
        work = [[lanes(i, r, lp) for r, lp in zip(recs[i], choices[i])] for i in range(n)]
        worst = sum(max(sum(w.values()) for w in work[i]) for i in range(n))
        self.unit = unit = unit or max(worst, 1e-9) / 20000
        H = int(worst / unit) * 2 + 10
        m = self.m = cp_model.CpModel()
        # a pinned layer's one option is the constant 1
        x = self.x = [[m.new_bool_var(f"x{i}_{k}") for k in range(len(c))] if len(c) > 1 else [1]
                      for i, c in enumerate(choices)]
        # durations in model units, per layer, choice and key: the one rounding both the model and
        # `evaluate` use
        self.units = [[{key: int(round(v / unit)) for key, v in w.items()} for w in work[i]] for i in range(n)]
        self.rules: list = []          # (end var, [dep vars], layer, keys): end >= dep + durations
        self.cyclic: list = []         # (ready var, first-use var or 0, layer, (deferred, params on SSD))
        self.lits: list = []           # (bool var, layer, choice indices that make it true)
        self.kept_mib: list = []       # (running-sum var, layer): MiB layers 0..i keep for backward
        self.kept_host_mib: list = []  # the same for what layers 0..i send to host memory
        for row in x:
            if len(row) > 1:
                m.add_exactly_one(row)

        durs = self.durs = {}

        def dur(i: int, key: str):
            """Layer i's duration of `key` as one variable (constraints stay 3 terms long: with the
            sums over choices inlined, CP-SAT's presolve looped for seconds)."""
            if (i, key) not in durs:
                terms = [(self.units[i][k].get(key, 0), x[i][k]) for k in range(len(choices[i]))]
                terms = [(c, v) for c, v in terms if c > 0]
                if not terms:
                    durs[i, key] = 0
                elif len(choices[i]) == 1:
                    durs[i, key] = terms[0][0]
                else:
                    d = m.new_int_var(0, max(c for c, _ in terms), f"d{i}_{key}")
                    m.add(d == sum(c * v for c, v in terms))
                    durs[i, key] = d
            return durs[i, key]

        def lit(i: int, pred) -> cp_model.IntVar | int:
            """1 when layer i's choice satisfies pred."""
            ks = [k for k, lp in enumerate(choices[i]) if pred(lp)]
            if len(ks) == len(choices[i]):
                return 1
            if not ks:
                return 0
            b = m.new_bool_var(f"p{i}_{len(ks)}")
            m.add(b == sum(x[i][k] for k in ks))
            self.lits.append((b, i, frozenset(ks)))
            return b

        def end(name: str):
            return m.new_int_var(0, H, name)

        def after(v, deps: list, i: int, *keys: str, exact: bool = False) -> None:
            """v ends no sooner than each of deps plus layer i's durations of `keys` (recorded, so
            that `evaluate` computes the same longest paths for a fixed plan). `exact`: no later
            either. The forward's ends are exact: the next step's forward is measured from them
            (T + F[i-1] >= this step's update of i), and a forward delayed on purpose would buy
            the period slack no engine schedule has."""
            deps = [dep for dep in deps if dep is not None]
            d = sum(dur(i, k) for k in keys)
            if exact:
                start = m.new_int_var(0, H, "") if deps else 0
                if deps:
                    m.add_max_equality(start, deps)
                m.add(v == start + d)
            else:
                for dep in deps:
                    m.add(v >= dep + d)
                if not deps:
                    m.add(v >= d)
            self.rules.append((v, deps, i, keys))

        T = self.T = m.new_int_var(0, H, "T")
        # ---- forward ----
        F, LH, SR, D, SW = [], [], [], [], []
        for i in range(n):
            window = F[i - 1 - depth] if i - 1 - depth >= 0 else None     # prefetch window
            sr = end(f"srf{i}")
            after(sr, [SR[-1] if SR else None, window], i, "f_ssdr", exact=True)   # a stream starts at its head
            lh = end(f"lhf{i}")
            after(lh, [LH[-1] if LH else None, sr, window], i, "f_h2d", exact=True)
            f = end(f"f{i}")
            after(f, [F[-1] if F else None, lh], i, "f_gpu", exact=True)
            d = end(f"off{i}")
            after(d, [D[-1] if D else None, f], i, "f_d2h")
            sw = end(f"sw{i}")
            after(sw, [SW[-1] if SW else None, d], i, "f_ssdw")
            F.append(f)
            LH.append(lh)
            SR.append(sr)
            D.append(d)
            SW.append(sw)
        # ---- backward (n-1..0) with overlapped updates ----
        B: list = [None] * n
        G: list = [None] * n              # when layer i's gradient reached the host
        gpu_prev, h2d_prev, ssdr_prev, d2h_prev, ssdw_prev = F[-1], LH[-1], SR[-1], D[-1], SW[-1]
        cpu_prev = None
        upd_done: list = [None] * n       # when an overlapped update made layer i's weights current
        for i in reversed(range(n)):
            window = B[i + 1 + depth] if i + 1 + depth < n else None
            sr = end(f"srb{i}")
            after(sr, [ssdr_prev, SW[i], window], i, "b_ssdr")
            lb = end(f"lhb{i}")
            after(lb, [h2d_prev, sr, D[i], window], i, "b_h2d")
            b = end(f"b{i}")
            after(b, [gpu_prev, lb], i, "b_gpu")
            g = end(f"g{i}")
            after(g, [d2h_prev, b], i, "b_d2h")
            # overlapped host update: state read, CPU step, weights back
            ur = end(f"ur{i}")
            # the optimizer state is read once the backward `depth` layers back has ended (the
            # engine also keeps it within `depth` steps of the optimizer; in a lane taken in fixed
            # order that would hold back the reads of layers with no state on the SSDs)
            after(ur, [sr, B[i + depth] if depth and i + depth < n else None], i, "u_ssdr")
            uc = end(f"uc{i}")
            after(uc, [cpu_prev, g, ur], i, "u_cpu")
            uw = end(f"uw{i}")
            after(uw, [uc], i, "u_h2d", "u_d2h", "u_gpu")
            us = end(f"us{i}")
            after(us, [ssdw_prev, uc], i, "u_ssdw")
            upd_done[i] = (uw, us)
            G[i] = g
            B[i] = b
            gpu_prev, h2d_prev, ssdr_prev, d2h_prev, ssdw_prev, cpu_prev = b, lb, ur, g, us, uc
        # ---- deferred updates, in forward order, after the whole backward ----
        gate = B[0]
        a_prev = {"gpu": gate, "cpu": cpu_prev, "ssdr": ssdr_prev, "ssdw": ssdw_prev, "link": None}
        AC: list = []                     # when layer i's deferred host update ended
        for i in range(n):
            ar = end(f"ar{i}")
            after(ar, [a_prev["ssdr"], gate, AC[i - 1 - depth] if i - 1 - depth >= 0 else None], i, "a_ssdr")
            ag = end(f"ag{i}")
            after(ag, [a_prev["gpu"]], i, "a_gpu")
            ac = end(f"ac{i}")
            after(ac, [a_prev["cpu"], gate, ar, G[i]], i, "a_cpu")
            AC.append(ac)
            aw = end(f"aw{i}")
            after(aw, [a_prev["link"], ac, ag], i, "a_h2d", "a_d2h")
            asw = end(f"asw{i}")
            after(asw, [a_prev["ssdw"], ac, aw], i, "a_ssdw")
            # the next step's forward of layer i (its weights' load, else its compute, which starts
            # no sooner than the previous layer's forward ended) waits for this step's update of i
            # to make its weights current at home: on the SSDs, once written there
            first_use = F[i - 1] if i > 0 else 0
            for deferred, on_ssd, ready in ((True, False, aw), (True, True, asw), (False, False, upd_done[i][0]),
                                            (False, True, upd_done[i][1])):
                on = lit(i, lambda lp: (lp.update == "after") == deferred and (lp.params == "ssd") == on_ssd)
                self.cyclic.append((ready, first_use, i, (deferred, on_ssd)))
                if isinstance(on, int):
                    if on:
                        m.add(T + first_use >= ready)
                else:
                    m.add(T + first_use >= ready).only_enforce_if(on)
            a_prev = {"gpu": ag, "cpu": ac, "ssdr": ar, "ssdw": asw, "link": aw}
        # ---- every lane's work fits in the period ----
        self.lanes = []                            # key groups whose sum must fit in T
        for group in _lanes(hw):
            keys = [k for lane in group for k in LANE_KEYS[lane]]
            self.lanes.append(keys)
            m.add(T >= sum(dur(i, k) for i in range(n) for k in keys))
        m.add(T >= B[0])                           # one step's dependency chain, at the least
        self.chain_end = B[0]
        # ---- memory (MiB) ----
        usable = usable_gpu_bytes(hw, gpu_budget) // MIB
        home_gpu = self.home_gpu = m.new_int_var(0, max(usable, 0), "home_gpu")

        def mib(v: int) -> int:
            return -(-int(v) // MIB)
        self.home_gpu_mib = [[mib(recs[i][k].home[GPU_TIER]) for k in range(len(choices[i]))] for i in range(n)]
        home = [sum(mib(recs[i][k].home[t]) * x[i][k] for i in range(n) for k in range(len(choices[i]))
                    if recs[i][k].home[t]) for t in range(3)]
        prefix = 0                                     # MiB earlier layers keep for their backward
        for i in range(n):
            working = sum(mib(recs[i][k].working_gpu + recs[i][k].kept[GPU_TIER]) * x[i][k]
                          for k in range(len(choices[i])))
            prefetch = 0
            if i > 0 and depth > 0:                    # the next layer's weights arrive meanwhile
                prefetch = sum(mib(recs[i - 1][k].weight_bytes) * x[i - 1][k]
                               for k, lp in enumerate(choices[i - 1]) if lp.params != "gpu")
            m.add(home_gpu + prefix + working + prefetch <= usable)
            # during layer i's forward: its activations being made (a slice's at a time when sliced),
            # its weights, the previous layer's activations still on their way out, the next
            # layer's weights on their way in
            forward = sum(mib(recs[i][k].act_slice_bytes + (recs[i][k].weight_bytes if lp.params != "gpu" else 0))
                          * x[i][k] for k, lp in enumerate(choices[i]))
            if i > 0:
                forward += sum(mib(recs[i - 1][k].act_slice_bytes) * x[i - 1][k]
                               for k, lp in enumerate(choices[i - 1]) if lp.activations in ("cpu", "ssd"))
            if i + 1 < n and depth > 0:
                forward += sum(mib(recs[i + 1][k].weight_bytes) * x[i + 1][k]
                               for k, lp in enumerate(choices[i + 1]) if lp.params != "gpu")
            m.add(home_gpu + prefix + forward <= usable)
            nxt = m.new_int_var(0, max(usable, 0), f"kept{i}")
            self.kept_mib.append((nxt, [mib(recs[i][k].kept[GPU_TIER]) for k in range(len(choices[i]))]))
            m.add(nxt == prefix + sum(mib(recs[i][k].kept[GPU_TIER]) * x[i][k] for k in range(len(choices[i]))
                                      if recs[i][k].kept[GPU_TIER]))
            prefix = nxt
        m.add(home_gpu == home[GPU_TIER])
        m.add(home[CPU_TIER] <= hw.cpu_mem_bytes // MIB)
        # Host memory beyond home bytes, beside what earlier layers sent there for their backward:
        # while a host optimizer steps layer i, the working bytes of that step and of the `depth`
        # steps read ahead; during layer i's forward, the weights read from the SSDs for it and the
        # `depth` layers fetched ahead.
        def per_option(i: int, nbytes, when=lambda lp: True):
            return sum(mib(nbytes(recs[i][k])) * x[i][k] for k, lp in enumerate(choices[i]) if when(lp))
        staged = [per_option(i, lambda r: r.weight_bytes, lambda lp: lp.params == "ssd") for i in range(n)]
        working = [per_option(i, lambda r: r.host_working) for i in range(n)]
        host_cap = hw.cpu_mem_bytes // MIB
        sent_before = 0
        for i in range(n):
            # the optimizer state of the `depth` layers the backward reaches next is read while
            # layer i steps (the engine's window): their working bytes are held too
            for extra in (sum(working[max(0, i - depth):i + 1]), sum(staged[i:i + depth + 1])):
                m.add(home[CPU_TIER] + sent_before + extra <= host_cap)
            nxt = m.new_int_var(0, host_cap, f"sent{i}")      # a running sum keeps each row short
            m.add(nxt == sent_before + per_option(i, lambda r: r.kept[CPU_TIER]))
            self.kept_host_mib.append((nxt, [mib(recs[i][k].kept[CPU_TIER]) for k in range(len(choices[i]))]))
            sent_before = nxt
        m.add(home[SSD_TIER] <= hw.ssd_capacity_total_bytes // MIB)
        m.minimize(T)

    def evaluate(self, layers: list[LayerPlan]) -> tuple[int, list[tuple[object, int]]]:
        """The model's period for fixed decisions (one of its options per layer), computed as the
        longest paths of the same rules, and a full hint: (variable, value) for decisions,
        durations, ends."""
        n = len(self.x)
        choice = [self.choices[i].index(lp) for i, lp in enumerate(layers)]
        u = [self.units[i][choice[i]] for i in range(n)]
        val: dict = {}
        for v, deps, i, keys in self.rules:
            d = sum(u[i].get(k, 0) for k in keys)
            val[v.index] = max((val[dep.index] for dep in deps), default=0) + d
        T = max(sum(u[i].get(k, 0) for i in range(n) for k in keys) for keys in self.lanes)
        T = max(T, val[self.chain_end.index])
        for ready, first_use, i, (deferred, on_ssd) in self.cyclic:
            lp = layers[i]
            if (lp.update == "after") == deferred and (lp.params == "ssd") == on_ssd:
                T = max(T, val[ready.index] - (val[first_use.index] if not isinstance(first_use, int) else 0))
        hint = [(v, int(k == choice[i])) for i, row in enumerate(self.x) for k, v in enumerate(row)
                if not isinstance(v, int)]
        hint += [(d, u[i].get(key, 0)) for (i, key), d in self.durs.items() if not isinstance(d, int)]
        hint += [(v, val[v.index]) for v, *_ in self.rules]
        hint.append((self.T, T))
        hint += [(b, int(choice[i] in ks)) for b, i, ks in self.lits]
        hint.append((self.home_gpu, sum(self.home_gpu_mib[i][choice[i]] for i in range(n))))
        for kept in (self.kept_mib, self.kept_host_mib):
            running = 0
            for i, (var, per_choice) in enumerate(kept):
                running += per_choice[choice[i]]
                hint.append((var, running))
        return T, hint

    def decisions(self, solver: cp_model.CpSolver) -> list[LayerPlan]:
        return [next(c for c, v in zip(self.choices[i], row) if isinstance(v, int) or solver.value(v))
                for i, row in enumerate(self.x)]


def solve_cycle(cm: CostModel, choices: list[LayerPlan], seed: list[LayerPlan] | None, gpu_budget: int,
                depth: int, time_limit_s: float, host_ckpt: bool = False, nnz_per_row: int = 4,
                window: int = 8, seed_rng: int = 0, slices: int = 1) -> tuple[list[list[LayerPlan]], SolverStats]:
    """The least-period schedule of the cyclic model, hinted with `seed` (its choices are added to
    `choices` where missing), every layer costed at the plan's `slices` (activation_slices).
    Returns the solutions found, each better than the last in the model (the last is its best;
    the engine, which may rank them otherwise, picks), and stats.

    With a seed the model is solved by large-neighbourhood search: the seed's period first
    (`CycleModel.evaluate`: the same rules as longest paths), then repeatedly a model whose layers
    are pinned to the incumbent but for a window of 3 to `window` consecutive layers (and two
    random ones), or free in one field on every layer (alternately, the fields in turn), hinted
    with the incumbent's full solution, keeping what lowers T, until 2n windows in a row find
    nothing. On 42 layers x 72 choices the whole model, hinted, did not move
    in 10 s in our trials, while an 8-layer window solved to optimality in 0.01 s of CP-SAT's
    deterministic time. Each window builds its own model, with one option for a pinned layer:
    building the whole model took 2.7 s on gpt3-175b (98 layers x 72 options) and every window
    cloned and presolved it again."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    n = len(cm.layers)

    def build(options: list[list[LayerPlan]], unit: float | None = None) -> CycleModel:
        return CycleModel(cm, options, gpu_budget, depth, host_ckpt, nnz_per_row, slices, unit)
    if not seed:
        model = build([list(choices)] * n)
        extra: dict = {"unit_s": model.unit, "build_s": time.perf_counter() - t0}
        solver = _solver(max(0.5, deadline - time.perf_counter()))
        st = _solve(solver, model.m)
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return [], SolverStats(STATUS.get(st, str(st)), None, None, time.perf_counter() - t0, "cycle", extra)
        return [model.decisions(solver)], SolverStats(STATUS[st], solver.objective_value * model.unit,
                                                    solver.best_objective_bound * model.unit,
                                                    time.perf_counter() - t0, "cycle", extra)
    choices = list(choices) + [lp for lp in dict.fromkeys(seed) if lp not in choices]
    current = list(seed)
    pinned = build([[lp] for lp in current])
    unit = pinned.unit
    best, _ = pinned.evaluate(current)
    extra = {"unit_s": unit, "build_s": time.perf_counter() - t0, "neighbourhoods": 0, "improvements": 0,
             "seed_objective_s": best * unit}
    trail: list[list[LayerPlan]] = []      # every improving incumbent, in order
    rng = random.Random(seed_rng)
    # every layer has been free in several windows by 2n fruitless ones: the time left goes back
    # to the planner's engine-scored stages
    patience, fruitless = 2 * n, 0
    while deadline - time.perf_counter() > 0.3 and fruitless < patience:
        # alternately: one field on every layer (each field in turn), a window of layers
        window_kind = "field" if extra["neighbourhoods"] % 2 == 0 else "layers"
        if window_kind == "layers":
            # a window of layers, each free to take any option
            w = rng.randint(min(3, n), min(window, n))    # small windows move one stretch, large ones trade
            start = rng.randrange(0, n - w + 1)
            free = set(range(start, start + w)) | set(rng.sample(range(n), min(2, n)))
            options = [choices if i in free else [current[i]] for i in range(n)]
        else:
            # every layer, free in one field (where its weights live, its update's timing, ...):
            # the many-layer trades a window of a few layers cannot make
            name = FIELDS[extra["neighbourhoods"] // 2 % len(FIELDS)]
            same = [f for f in LAYER_FIELDS if f != name]
            options = [[lp] + [c for c in choices if c != lp and all(getattr(c, f) == getattr(lp, f) for f in same)]
                       for lp in current]
        sub = build(options, unit)
        _, hint = sub.evaluate(current)
        for var, v in hint:
            sub.m.add_hint(var, v)
        if window_kind == "layers":
            # A window of layers: any better period, the first one found, without the LP and with
            # one presolve pass (proving the window's optimum, its LP and probing took most of a
            # window's wall time in our trials; asked to optimise from the hint instead, CP-SAT
            # often returned nothing within the window's time).
            sub.m.add(sub.T <= best - 1)
            s = _solver(min(1.5, deadline - time.perf_counter()))
            s.parameters.stop_after_first_solution = True
            s.parameters.max_presolve_iterations = 1
            s.parameters.cp_model_probing_level = 0
            s.parameters.symmetry_level = 0
        else:
            # A field on every layer: optimised from the hint, with full presolve and more time.
            # On gpt3-175b from Fuyou's plan, freeing the optimizer's tier reached the window's
            # optimum in 2.1 s (period 10500 -> 7176 units); asked for the first better period
            # with one presolve pass, it found none in 1.5 s.
            s = _solver(min(4.0, deadline - time.perf_counter()))
        s.parameters.linearization_level = 0
        tb = time.perf_counter()
        st = _solve(s, sub.m)
        extra["solve_s"] = extra.get("solve_s", 0.0) + time.perf_counter() - tb
        extra["neighbourhoods"] += 1
        fruitless += 1
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) and s.objective_value < best - 0.5:
            fruitless = 0
            current = sub.decisions(s)
            best, _ = sub.evaluate(current)
            extra["improvements"] += 1
            trail.append(list(current))
    wall = time.perf_counter() - t0
    status = "feasible" if extra["improvements"] else "seed"
    return trail or [list(seed)], SolverStats(status, best * unit, None, wall, "cycle", extra)
