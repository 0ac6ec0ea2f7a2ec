"""Task-graph builder: (model, train, hardware, plan, K iterations) -> a `TaskGraph` of plain lists.

Every task runs on one resource, lasts a cost-model duration, allocates bytes on memory tiers when
it starts and frees bytes (its own or another task's) when it ends. Task ids are assigned in the
order an executor would issue the work, every edge goes from a smaller id to a larger one, so the
ids are a topological order and double as priorities for the engine (smaller id = more urgent).

The graph is written straight into lists rather than built in networkx and compiled: we
measured networkx construction plus its topological sort at ~30 ms for a 96-layer x 3 graph, more
than the whole engine run, and the planner calls `simulate` many times. `TaskGraph.to_networkx()`
gives the same graph as a DiGraph for analysis (critical path, tests).

Every training step issues the same tasks in the same order, so `build` generates one step and
`TaskGraph.finish` lays it down once per iteration, offsetting ids (copying a step costs a
fraction of generating it, and the planner simulates thousands of plans). What a step waits for from the step before (each layer's last update,
the previous step's last compute, the prefetch window reaching back) is named in the generated
step by a placeholder, a negative id, that `finish` resolves to the task playing that role at the
end of the step; the first step has none of these edges.

Memory model (bytes per layer from workload.layer_costs):
  resident at t=0: GPU-homed weights; GPU optimizer state (+ the gradient buffer unless `fused`);
      CPU-/SSD-homed weights and optimizer state on their tier; a CUDA context reserve.
  transient: streamed weights (GPU copy from `load` to the compute that uses it), saved
      activations (forward -> backward, or their CPU/SSD copy in between), gradients on their way
      to a CPU optimizer, SSD-resident optimizer state while the CPU updates it, updated weights on
      their way home. Host staging buffers are allocated when a copy starts and freed when its
      consumer ends, so their peak is the pinned pool an executor allocates once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, chain

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile
from tiertune.limits import MAX_SIM_TASKS
from tiertune.schedule import Plan
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import keeps_last_weights, passes as recipe_passes, plan_recipes
from tiertune.vocab import LINKS, CPU, D2H, GPU, H2D, RESOURCES, SSD_READ, SSD_WRITE, TIERS
from tiertune.workload import ModelSpec, TrainSpec

MANY_TIERS = -2         # alloc_tier / free_tier of a task that allocates or frees on several tiers


@dataclass
class TaskGraph:
    """Tasks as parallel lists indexed by id (ids are topologically ordered priorities)."""

    kind: list[str] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)        # what a copy moves: w (weights), act, opt, grad
    layer: list[int] = field(default_factory=list)
    iteration: list[int] = field(default_factory=list)
    micro: list[int] = field(default_factory=list)      # micro-batch (gradient accumulation)
    resource: list[int] = field(default_factory=list)   # index into RESOURCES
    duration: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)     # bytes moved (copies) for the trace
    flops: list[float] = field(default_factory=list)
    alloc: tuple[list[int], list[int], list[int]] = field(default_factory=lambda: ([], [], []))  # gpu, cpu, ssd
    free: tuple[list[int], list[int], list[int]] = field(default_factory=lambda: ([], [], []))
    # The same allocations and releases as the engine reads them: the one tier a task allocates
    # (frees) bytes on and how many; -1 where it allocates (frees) nothing, MANY_TIERS where it
    # does on several tiers (then read alloc/free). Every task the builder makes touches one tier.
    alloc_tier: list[int] = field(default_factory=list)
    alloc_bytes: list[int] = field(default_factory=list)
    free_tier: list[int] = field(default_factory=list)
    free_bytes: list[int] = field(default_factory=list)
    npred: list[int] = field(default_factory=list)
    resident: list[int] = field(default_factory=lambda: [0, 0, 0])
    capacity: list[int] = field(default_factory=lambda: [0, 0, 0])
    pool: list[int] = field(default_factory=lambda: list(range(len(RESOURCES))))  # resource -> slot pool
    pool_slots: list[int] = field(default_factory=lambda: [1] * len(RESOURCES))
    # contention[r][s]: a task on resource r slows to 1 / (1 + sum of contention[r][s] over the
    # other resources s busy meanwhile) of its speed; None: resources never slow each other
    contention: list[list[float]] | None = None
    iterations: int = 1
    step_tasks: int = 0          # tasks per step where ids run step by step (finish lays them so); 0: unknown
    _rows: list = field(default_factory=list, repr=False)     # ROW fields per task of one step, flat
    _frees: list[int] = field(default_factory=list, repr=False)   # (task, tier, bytes) per release, flat
    _placeholders: int = field(default=0, repr=False)
    _from_previous: list[int] = field(default_factory=list, repr=False)   # (placeholder, task) per edge, flat
    # Successors: a list per task (`succ`) while the graph is built and run. A graph kept after its
    # run (SimResult.graph) holds them in the compact form `finish` leaves beside them and drops the
    # lists (`pack`): thousands of lists alive per simulated plan cost every `simulate` a garbage
    # collection walking them (6% of its instructions); `succ` makes them again when read.
    _succ: list[list[int]] | None = field(default_factory=list, repr=False)
    _edges: list[int] = field(default_factory=list, repr=False)   # each step's edges by source, step after step
    _ends: list[int] = field(default_factory=list, repr=False)    # step task t's lie at [_ends[t], _ends[t + 1])
    _extra: list[int] = field(default_factory=list, repr=False)   # (u, v) per edge from one step to a later one, flat
    _compact: bool = field(default=False, repr=False)             # _edges/_ends/_extra say all that _succ says

    def __len__(self) -> int:
        return len(self.duration)

    # --- construction: each task's fields go into one flat list and each column is a slice of
    # it at the end. One extend per task costs less than a dozen appends, and, unlike a list of
    # row tuples, leaves no object per task alive for the garbage collector to walk. --------------
    ROW = 13        # fields per task in _rows: add()'s arguments, then alloc_tier and alloc_bytes

    def add(self, kind: str, tag: str, layer: int, mb: int, res: int, dur: float, nbytes: int = 0,
            flops: float = 0.0, gpu: int = 0, cpu: int = 0, ssd: int = 0) -> int:
        succ = self._succ
        t = len(succ)
        tier = (MANY_TIERS if (gpu and (cpu or ssd)) or (cpu and ssd) else
                0 if gpu else 1 if cpu else 2 if ssd else -1)
        self._rows.extend((kind, tag, layer, mb, res, dur, nbytes, flops, gpu, cpu, ssd, tier, gpu or cpu or ssd))
        succ.append([])
        return t

    def placeholder(self) -> int:
        """A stand-in (negative id) for a task of the previous step; `finish` resolves it."""
        self._placeholders += 1
        return -self._placeholders

    def edge(self, u: int | None, v: int) -> None:
        if u is None:
            return
        if u < 0:                       # a task of the previous step: finish() adds one edge per step
            self._from_previous.extend((u, v))
            return
        assert u < v, "task ids must stay topologically ordered"
        self._succ[u].append(v)

    def release(self, t: int, tier: int, nbytes: int) -> None:
        """Task t frees nbytes on tier when it ends."""
        self._frees.extend((t, tier, nbytes))

    def finish(self, previous: dict[int, int] | None = None) -> "TaskGraph":
        """Lay the generated step down `iterations` times and turn its rows into the column lists the
        engine reads. previous[p]: the task (or, when the step is shorter than the prefetch window,
        another placeholder: one more step back) that plays placeholder p's role at the end of a
        step; None where no edge comes from a previous step."""
        rows, w, k = self._rows, self.ROW, self.iterations
        m = self.step_tasks = len(rows) // w                 # tasks per step
        (self.kind, self.tag, self.layer, self.micro, self.resource, self.duration, self.nbytes, self.flops,
         ag, ac, asd, self.alloc_tier, self.alloc_bytes) = (rows[j::w] * k for j in range(w))
        self.alloc = (ag, ac, asd)
        self.iteration = []
        for it in range(k):
            self.iteration += [it] * m
        free = ([0] * m, [0] * m, [0] * m)
        free_tier, free_bytes = [-1] * m, [0] * m
        frees = iter(self._frees)
        for t, tier, b in zip(frees, frees, frees):
            if b:
                free[tier][t] += b
                free_bytes[t] += b
                free_tier[t] = tier if free_tier[t] in (-1, tier) else MANY_TIERS
        self.free = tuple(f * k for f in free)
        self.free_tier, self.free_bytes = free_tier * k, free_bytes * k
        step = self._succ
        flat = list(chain.from_iterable(step))                 # the step's edges, by source
        npred = [0] * m
        for v in flat:
            npred[v] += 1
        npred = self.npred = npred * k
        # Later steps' successor lists: the step's edges, mapped to that step's ids through one
        # shared int per task (adding the offset would make an int object per edge) and cut back
        # into one list per task, all in C-level map and slice (a comprehension per task cost as
        # much as the rest of finish).
        ids = list(range(k * m))
        ends = list(accumulate(map(len, step)))
        cuts = list(map(slice, [0, *ends[:-1]], ends))        # where each task's edges lie in flat
        succ = self._succ = list(step)
        edges = list(flat)
        for off in range(m, k * m, m):
            shifted = list(map(ids[off:off + m].__getitem__, flat))
            succ += map(shifted.__getitem__, cuts)
            edges += shifted
        extra = []
        # Edges from the previous step, `back` steps back once the placeholder chain is followed.
        pairs = iter(self._from_previous)
        for u, v in zip(pairs, pairs):
            back = 0
            while u < 0:
                u, back = previous[u], back + 1
                assert back <= len(previous), "a placeholder must resolve to a task"
            for it in range(back, k):
                succ[u + (it - back) * m].append(v + it * m)
                extra += (u + (it - back) * m, v + it * m)
                npred[v + it * m] += 1
        self._edges, self._ends, self._extra, self._compact = edges, [0, *ends], extra, True
        self._rows, self._frees, self._from_previous = [], [], []
        return self

    def pack(self) -> None:
        """Drop the lists of successors where the compact form says the same (see _succ)."""
        if self._compact:
            self._succ = None

    @property
    def succ(self) -> list[list[int]]:
        """Successors per task, as lists one may add edges to (the engine then runs the edited graph)."""
        succ = self.successor_lists()
        self._compact = False               # they may be edited: the lists are the graph now
        return succ

    def successor_lists(self) -> list[list[int]]:
        """Successors per task, to read (made again from the compact form after `pack`)."""
        if self._succ is None:
            edges, ends = self._edges, self._ends
            cuts = list(zip(ends, ends[1:]))
            succ = self._succ = []
            for off in range(0, self.iterations * ends[-1], ends[-1] or 1):
                succ += [edges[off + a:off + b] for a, b in cuts]
            succ += [[] for _ in range(len(self) - len(succ))]      # steps without edges
            pairs = iter(self._extra)
            for u, v in zip(pairs, pairs):
                succ[u].append(v)
        return self._succ

    def permuted(self, order: list[int]) -> "TaskGraph":
        """The same (finished) graph with task order[k] as task k: other priorities, same work.
        `order` must keep every edge going from a smaller to a larger id."""
        n = len(self)
        new = [0] * n
        for k, t in enumerate(order):
            new[t] = k
        g = TaskGraph(resident=list(self.resident), capacity=list(self.capacity), pool=list(self.pool),
                      pool_slots=list(self.pool_slots), contention=self.contention, iterations=self.iterations)
        for col in ("kind", "tag", "layer", "iteration", "micro", "resource", "duration", "nbytes", "flops"):
            old = getattr(self, col)
            setattr(g, col, [old[t] for t in order])
        g.alloc = tuple([a[t] for t in order] for a in self.alloc)
        g.free = tuple([f[t] for t in order] for f in self.free)
        for col in ("alloc_tier", "alloc_bytes", "free_tier", "free_bytes"):
            old = getattr(self, col)
            setattr(g, col, [old[t] for t in order])
        old_succ = self.successor_lists()
        succ = g._succ = [[new[v] for v in old_succ[t]] for t in order]
        for k, vs in enumerate(succ):
            assert all(v > k for v in vs), "a permutation must keep task ids topologically ordered"
        g.npred = [0] * n
        for k, t in enumerate(order):
            g.npred[k] = self.npred[t]
        return g

    # --- reading -------------------------------------------------------------------------------
    def name(self, t: int) -> str:
        tag = f".{self.tag[t]}" if self.tag[t] else ""
        return f"{self.kind[t]}{tag}:L{self.layer[t]}:it{self.iteration[t]}:mb{self.micro[t]}"

    def to_networkx(self):
        """The same graph as a networkx DiGraph: node attributes kind, layer, iteration, resource, duration."""
        import networkx as nx

        g = nx.DiGraph()
        for t in range(len(self)):
            g.add_node(t, name=self.name(t), kind=self.kind[t], layer=self.layer[t], iteration=self.iteration[t],
                       resource=RESOURCES[self.resource[t]], duration=self.duration[t])
        g.add_edges_from((u, v) for u, vs in enumerate(self.successor_lists()) for v in vs)
        return g


# load_weights' phases: the task tag and the recipe steps of the SSD read and the load
WEIGHT_STEPS = {"fwd": ("w.fwd", "w_ssd_read_fwd", "w_load_fwd"), "bwd": ("w.bwd", "w_ssd_read_bwd", "w_load_bwd"),
                "norm": ("w.norm", "w_ssd_read_bwd", "w_load_bwd")}


def capacities(hw: HardwareProfile, plan: Plan) -> list[int]:
    gpu = plan.globals.gpu_mem_bytes if plan.globals.gpu_mem_bytes is not None else hw.gpu_mem_bytes
    return [int(gpu), int(hw.cpu_mem_bytes), int(hw.ssd_capacity_total_bytes)]


def build(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, plan: Plan, iterations: int,
          cm: CostModel | None = None) -> TaskGraph:
    """The task graph of `iterations` training steps of `plan` (see the module docstring)."""
    cm = cm or CostModel(model, train, hw)
    n = len(cm.layers)
    if plan.n_layers != n:
        raise InputError(f"plan has {plan.n_layers} layers but model {model.name!r} has {n} (embed + blocks + head)")
    if not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"iterations must be a positive integer, got {iterations!r}")
    depth = plan.globals.prefetch_depth
    passes = recipe_passes(train, plan.layers)
    accum = train.grad_accum
    # Every duration and byte count comes from the layers' recipes; this function adds the order.
    rec = plan_recipes(cm, plan)
    # a graph is a few hundred bytes a task: 10**8 tasks would take tens of GB before any answer
    # (a layer runs at most ~16 tasks per micro-batch, pass and slice; checked in O(1), every
    # planner evaluation passes here)
    tasks = 16 * iterations * accum * passes * n * plan.globals.activation_slices
    if tasks > MAX_SIM_TASKS:
        raise InputError(f"simulating {iterations} iteration(s) of {accum} micro-batch(es) x {n} layers "
                         f"x {plan.globals.activation_slices} slice(s) is up to {tasks:,} tasks; at most "
                         f"{MAX_SIM_TASKS:,}")

    g = TaskGraph(iterations=iterations)
    g.capacity = capacities(hw, plan)
    for link, (a, b) in LINKS.items():          # a half-duplex link: both directions in one pool
        if not getattr(hw, f"{link}_duplex"):
            g.pool[RESOURCES.index(b)] = RESOURCES.index(a)
    g.pool_slots[CPU] = max(1, hw.cpu_workers)
    if hw.contention:
        g.contention = [[hw.contention.get(r, {}).get(s, 0.0) if s != r else 0.0 for s in RESOURCES]
                        for r in RESOURCES]

    lp_ = plan.layers
    wb = [r.weight_bytes for r in rec]
    opt_bytes = [r.opt_bytes for r in rec]
    sent_bytes = [r.sent_bytes for r in rec]
    # DeepSpeed's cpu_checkpointing: a recomputed layer's input checkpoint waits in host memory
    # between its forward and its recompute, instead of on the device.
    host_ckpt = plan.globals.cpu_checkpointing
    inline = plan.globals.host_update_inline

    steps = [r.steps for r in rec]
    # Hot (a layer adds up to ~16 tasks, ~25 edges and ~12 releases per micro-batch): bound methods
    # in locals, and TaskGraph.edge/release's work inline where it is one step: succ[u].append(v)
    # is edge(u, v) where u is surely a task of this step (not None, not a placeholder for one of
    # the previous step), drop((t, tier, bytes)) is release(t, tier, bytes).
    add, edge, drop, succ = g.add, g.edge, g._frees.extend, g.succ

    res = g.resident
    res[0] += hw.gpu_reserve_bytes
    for r in rec:
        for k in range(len(TIERS)):
            res[k] += r.home[k]

    # What one step hands the next, as placeholders for the previous step's tasks (module docstring).
    prev_end = g.placeholder()                   # the compute task everything of the next micro-batch follows
    upd_done = [g.placeholder() for _ in range(n)]       # last task making layer i's weights current at home
    opt_written = [g.placeholder() for _ in range(n)]    # last SSD write of layer i's optimizer state
    uses = [g.placeholder() for _ in range(depth + 1)]   # the compute task that ends each layer step, in issue order
    handed_over = [prev_end, *upd_done, *opt_written, *uses]
    # host_update_inline: the next step issues nothing (weight loads, its first forward) before the
    # step's last `after` update is done and its last optimizer-state write to the SSD
    after_done = g.placeholder() if inline and any(lp.update == "after" for lp in lp_) else None
    state_done = g.placeholder() if inline and any(lp.optimizer == "ssd" for lp in lp_) else None
    barrier = [p for p in (after_done, state_done) if p is not None]
    upd_seq: list[int] = []              # this step's CPU updates, in issue order
    swapped_out: list[int] = []          # this step's SSD writes of optimizer state, in issue order

    def window() -> int:
        """A prefetch for the layer step about to be appended may start once the step depth+1 back ended."""
        return uses[-1 - depth]

    def load_weights(i: int, mb: int, first_use: bool, phase: str) -> int | None:
        """Stream layer i's weights to the GPU; returns the h2d task (None when GPU-resident)."""
        home = lp_[i].params
        if home == "gpu":
            return None
        head = None
        tag, read, load = WEIGHT_STEPS[phase]
        if home == "ssd":
            head = add("ssd_read", tag, i, mb, SSD_READ, steps[i][read].duration, wb[i], cpu=wb[i])
        h = add("load", tag, i, mb, H2D, steps[i][load].duration, wb[i], gpu=wb[i])
        if head is not None:
            succ[head].append(h)
            drop((h, 1, wb[i]))
        first = head if head is not None else h
        edge(window(), first)
        if first_use:
            edge(upd_done[i], first)
            for p in barrier:
                edge(p, first)
        return h

    def update(i: int, grad_ready: list[int], gate: int | None, read_after: int | None) -> int:
        """Optimizer step of layer i and the copies that bring its weights home; returns the update task."""
        lp, c = lp_[i], cm.layers[i]
        if lp.optimizer == "gpu":
            out = wb[i] if lp.params != "gpu" else 0      # new compute-dtype weights to send home
            u = add("update", "", i, 0, GPU, steps[i]["update"].duration, gpu=out)
            for x in grad_ready:
                succ[x].append(u)
            edge(gate, u)
            if lp.update == "fused":
                drop((u, 0, c.grad_bytes))
            done = u
            if lp.params != "gpu":
                wbk = add("writeback", "w", i, 0, D2H, steps[i]["writeback"].duration, wb[i],
                            cpu=wb[i] if lp.params == "ssd" else 0)
                succ[u].append(wbk)
                drop((wbk, 0, wb[i]))
                done = wbk
                if lp.params == "ssd":
                    sw = add("ssd_write", "w", i, 0, SSD_WRITE, steps[i]["w_ssd_write"].duration, wb[i])
                    succ[wbk].append(sw)
                    drop((sw, 1, wb[i]))
                    done = sw
            upd_done[i] = done
            return u
        # CPU optimizer (state in host memory, or on SSD and streamed through host memory).
        sr = None
        if lp.optimizer == "ssd":
            sr = add("ssd_read", "opt", i, 0, SSD_READ, steps[i]["opt_ssd_read"].duration, opt_bytes[i],
                       cpu=opt_bytes[i])
            edge(opt_written[i], sr)
            edge(read_after, sr)
            if len(upd_seq) > depth:                  # and no further ahead of the optimizer itself
                succ[upd_seq[-1 - depth]].append(sr)
            if inline and swapped_out:
                # one thread swaps in, steps and swaps out (DeepSpeed's PartitionedOptimizerSwapper
                # without pipeline_read/pipeline_write): no read before the last write is done
                succ[swapped_out[-1]].append(sr)
        rank = lp.grad_rank
        out = sent_bytes[i] if (rank and lp.params == "gpu") else (wb[i] if lp.params != "cpu" else 0)
        u = add("update", "", i, 0, CPU, steps[i]["update"].duration, cpu=out)
        if len(upd_seq) >= g.pool_slots[CPU]:
            # The optimizer's workers take steps in issue order (DeepSpeed's CPU Adam, our executor):
            # one whose gradient is ready early does not jump ahead of the layer the next forward needs first.
            succ[upd_seq[-g.pool_slots[CPU]]].append(u)
        upd_seq.append(u)
        edge(sr, u)
        for x in grad_ready:
            succ[x].append(u)
        edge(gate, u)
        drop((u, 1, sent_bytes[i]))                # the host gradient buffer
        if sr is not None:
            sw = add("ssd_write", "opt", i, 0, SSD_WRITE, steps[i]["opt_ssd_write"].duration, opt_bytes[i])
            succ[u].append(sw)
            drop((sw, 1, opt_bytes[i]))
            opt_written[i] = sw
            swapped_out.append(sw)
        done = u
        if lp.params == "gpu" and rank:
            wbk = add("writeback", "w", i, 0, H2D, steps[i]["writeback"].duration, sent_bytes[i], gpu=sent_bytes[i])
            succ[u].append(wbk)
            drop((wbk, 1, sent_bytes[i]))
            d = add("decompress", "", i, 0, GPU, steps[i]["decompress"].duration)
            succ[wbk].append(d)
            drop((d, 0, sent_bytes[i]))
            done = d
        elif lp.params == "gpu":
            wbk = add("writeback", "w", i, 0, H2D, steps[i]["writeback"].duration, wb[i])
            succ[u].append(wbk)
            drop((wbk, 1, wb[i]))
            done = wbk
        elif lp.params == "ssd":
            sw = add("ssd_write", "w", i, 0, SSD_WRITE, steps[i]["w_ssd_write"].duration, wb[i])
            succ[u].append(sw)
            drop((sw, 1, wb[i]))
            done = sw
        upd_done[i] = done
        return u

    keep_last = keeps_last_weights(n - 1, n, lp_[n - 1], passes)
    # One training step; finish() repeats it.
    grads: list[list[int]] = [[] for _ in range(n)]     # gradient arrivals per layer over micro-batches
    after_layers: list[int] = []
    for mb in range(accum):
        # ---- forward (a sliced layer: slice by slice, each slice's activations leaving alone) ----
        homes: list[list[tuple[int | None, int | None]]] = [[] for _ in range(n)]   # per slice: (d2h, ssd write)
        for i in range(n):
            lp, c, r = lp_[i], cm.layers[i], rec[i]
            S, a, k = r.slices, r.act_slice_bytes, r.ckpt_slice_bytes
            h = load_weights(i, mb, first_use=(mb == 0), phase="fwd")
            for s in range(S):
                f = add("forward", "", i, mb, GPU, steps[i]["forward"].duration, flops=c.fwd_flops / S, gpu=a)
                if s == 0:
                    edge(h, f)
                    if h is None and mb == 0:
                        edge(upd_done[i], f)
                edge(prev_end, f)
                if i == 0 and s == 0 and mb == 0:
                    for p in barrier:
                        edge(p, f)
                if s == S - 1 and h is not None and not (keep_last and i == n - 1):
                    drop((f, 0, wb[i]))
                if lp.activations == "recompute":
                    drop((f, 0, a - k))
                    if host_ckpt:
                        o = add("offload", "ckpt", i, mb, D2H, steps[i]["ckpt_offload"].duration, k, cpu=k)
                        succ[f].append(o)
                        drop((o, 0, k))
                        homes[i].append((o, None))
                elif lp.activations in ("cpu", "ssd"):
                    o = add("offload", "act", i, mb, D2H, steps[i]["act_offload"].duration, a, cpu=a)
                    succ[f].append(o)
                    drop((o, 0, a))
                    w = None
                    if lp.activations == "ssd":
                        w = add("ssd_write", "act", i, mb, SSD_WRITE, steps[i]["act_ssd_write"].duration, a, ssd=a)
                        succ[o].append(w)
                        drop((w, 1, a))
                    homes[i].append((o, w))
                prev_end = f
            uses.append(f)
        # ---- backward (twice when clipping needs the norm before in-backward updates) ----
        for p in range(passes):
            last = p == passes - 1
            tag = "" if last else "norm"
            sfx = "" if last else ".norm"
            for i in reversed(range(n)):
                lp, c, r = lp_[i], cm.layers[i], rec[i]
                S, a, k, ws = r.slices, r.act_slice_bytes, r.ckpt_slice_bytes, r.workspace_slice
                if keep_last and i == n - 1:
                    h = None
                    freed_w = wb[i]
                else:
                    h = load_weights(i, mb, first_use=False, phase="bwd" if last else "norm")
                    freed_w = wb[i] if h is not None else 0
                dyn_grad = c.grad_bytes if (lp.optimizer != "gpu" or lp.update == "fused") else 0
                prefetch = window()
                done_slices: list[int] = []
                for s in range(S):
                    # slices 0 and 1 come ahead with the layer; later ones as earlier ones finish
                    gate = prefetch if s < 2 else done_slices[s - 2]
                    prep = None
                    if lp.activations in ("cpu", "ssd"):
                        o, w = homes[i][s]
                        src = o
                        if lp.activations == "ssd":
                            sr = add("ssd_read", "act" + sfx, i, mb, SSD_READ, steps[i]["act_ssd_read"].duration, a, cpu=a)
                            succ[w].append(sr)
                            edge(gate, sr)
                            if last:
                                drop((sr, 2, a))
                            src = sr
                        prep = add("fetch", "act" + sfx, i, mb, H2D, steps[i]["act_fetch"].duration, a, gpu=a)
                        succ[src].append(prep)
                        if lp.activations == "cpu":
                            edge(gate, prep)
                        if last or lp.activations == "ssd":
                            drop((prep, 1, a))
                    elif lp.activations == "recompute":
                        fetched = None
                        if host_ckpt:
                            fetched = add("fetch", "ckpt" + sfx, i, mb, H2D, steps[i]["ckpt_fetch"].duration, k, gpu=k)
                            succ[homes[i][s][0]].append(fetched)
                            edge(gate, fetched)
                            if last:
                                drop((fetched, 1, k))
                        prep = add("recompute", tag, i, mb, GPU, steps[i]["recompute"].duration, flops=c.fwd_flops / S,
                                     gpu=a - k)
                        edge(h, prep)
                        edge(fetched, prep)
                        succ[prev_end].append(prep)
                    b = add("backward", tag, i, mb, GPU, steps[i]["backward"].duration, flops=c.bwd_flops / S,
                              gpu=ws + (dyn_grad if s == 0 else 0))
                    edge(h, b)
                    edge(prep, b)
                    succ[prev_end].append(b)
                    freed = ws + (freed_w if s == S - 1 else 0)
                    if lp.activations == "keep":
                        freed += a if last else 0
                    elif lp.activations == "recompute":
                        freed += a - k + (k if last or host_ckpt else 0)
                    else:
                        freed += a
                    if not last and s == S - 1:
                        freed += dyn_grad              # the norm pass only keeps a running sum
                    drop((b, 0, freed))
                    done_slices.append(b)
                    prev_end = b
                uses.append(b)
                if not last:
                    continue
                # ---- gradient to the optimizer ----
                if lp.optimizer == "gpu":
                    arrival = b
                else:
                    src = b
                    if lp.grad_rank:
                        cx = add("compress", "grad", i, mb, GPU,
                                   steps[i]["compress"].duration, gpu=sent_bytes[i])
                        succ[b].append(cx)
                        drop((cx, 0, c.grad_bytes))
                        src = cx
                    gd = add("grad", "grad", i, mb, D2H, steps[i]["grad"].duration, sent_bytes[i],
                               cpu=sent_bytes[i] if mb == 0 else 0)   # later micro-batches accumulate into it
                    succ[src].append(gd)
                    drop((gd, 0, sent_bytes[i] if lp.grad_rank else c.grad_bytes))
                    arrival = gd
                grads[i].append(arrival)
                if mb == accum - 1:
                    if lp.update == "after":
                        after_layers.append(i)
                    else:
                        u = update(i, grads[i], None, window() if lp.optimizer == "ssd" else None)
                        if lp.update == "fused" and lp.optimizer == "gpu":
                            prev_end = u          # LOMO: the hook updates before the next layer's backward
                        elif inline and lp.optimizer != "gpu":
                            prev_end = u          # the training thread runs the host step (host_update_inline)
    # ---- deferred (ZeRO-style) updates: in forward order so the next step can start early ----
    gate = prev_end
    order = sorted(after_layers)
    upd_tasks: list[int] = []
    for j, i in enumerate(order):
        read_after = upd_tasks[j - 1 - depth] if j - 1 - depth >= 0 else gate
        upd_tasks.append(update(i, grads[i], gate, read_after))
    previous = dict(zip(handed_over, [prev_end, *upd_done, *opt_written, *uses[-1 - depth:]]))
    if after_done is not None:
        previous[after_done] = upd_done[order[-1]]
    if state_done is not None:
        previous[state_done] = swapped_out[-1]
    return g.finish(previous)
