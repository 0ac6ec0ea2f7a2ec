"""Lower bounds on iteration time that no plan can beat, for (model, train, hardware, GPU budget).

A linear relaxation of the per-layer decisions: for each layer, the fractions of its weights and
optimizer state that leave the GPU (and of those, the fractions on the SSD), and of its activations
that are recomputed or sent to the host. For any real plan (fractions 0 or 1) every term below is
at most what the engine's task graph (simulator/builder.py) does, so the least T with every
resource's work <= T is a bound on the engine's iteration time (solved with GLOP, OR-Tools' LP):
  - durations are the cost model's own task durations (CostModel: one copy, one update, one
    layer's forward), the same the builder gives its tasks; contention only slows tasks down;
  - compute: forward + backward per micro-batch, recompute of what is recomputed, GPU optimizer
    steps of what stays on the GPU;
  - PCIe: a streamed layer's weights cross for forward and for backward, except the last layer's,
    which stay on the device from its forward to its backward; activations sent to the host cross
    twice; an off-GPU optimizer takes the gradient down and sends new weights up to GPU-homed
    weights; a GPU optimizer sends streamed weights home;
  - SSD: weights read per crossing and written back once, optimizer state read and written,
    activations written and read;
  - CPU: the optimizer work of every state off the GPU.
Memory: host and SSD hold what is homed there (the least optimizer state: no extra fp32 master);
on the GPU, besides the profile's reserve and what stays resident, the backward of each layer i
holds i's activations, weights, gradient and workspace while every earlier layer keeps its
activations (or their checkpoint when recomputed). Activations sent to the host are freed once
copied, as the engine frees them, so they cost the GPU nothing while away.
Plans are reported as a ratio to this bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp

from tiertune.hardware import HardwareProfile
from tiertune.planner.estimate import usable_gpu_bytes
from tiertune.simulator.costs import CostModel
from tiertune.vocab import LINKS, RESOURCES
from tiertune.workload import ModelSpec, TrainSpec


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


def weight_crossings(layer: int, n_layers: int) -> int:
    """How often a streamed layer's weights reach the GPU per micro-batch in the engine's task graph:
    for forward and for backward, except the last layer's, kept from its forward to its backward."""
    return 1 if layer == n_layers - 1 else 2


def lower_bound(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, gpu_budget: int | None = None,
                grad_ranks: tuple[int, ...] = ()) -> LowerBound:
    """The bound for plans within `gpu_budget` bytes of GPU memory (default: the hardware's).

    `grad_ranks`: LSP ranks the plans may use; compressed gradients lower PCIe and CPU work, so a
    bound for lossy plans must know the smallest rank allowed. Empty: lossless plans only.
    """
    cm = CostModel(model, train, hw)
    budget = hw.gpu_mem_bytes if gpu_budget is None else gpu_budget
    e = train.elem_bytes
    mb = train.grad_accum                           # forward, backward and their copies run per micro-batch
    workspace = 2 * e * train.seq_len * train.batch * model.hidden     # dY in, dX out (builder.py)
    n = len(cm.layers)

    solver = pywraplp.Solver.CreateSolver("GLOP")
    T = solver.NumVar(0, solver.infinity(), "T")
    resident = cpu_mem = ssd_mem = 0
    t = dict.fromkeys(RESOURCES, 0)
    compute = 0.0
    kept_before = 0                                 # activations earlier layers hold during a backward
    transient = []                                  # per layer: what its backward adds on the GPU
    rank = min(grad_ranks) if grad_ranks else None
    for i, lc in enumerate(cm.layers):
        v = lambda name: solver.NumVar(0, 1, f"{name}{i}")              # noqa: E731
        o, w, ar, ao, so, sw, sa, up, down = (v(x) for x in ("o", "w", "ar", "ao", "so", "sw", "sa", "up", "dn"))
        c = v("c") if rank is not None else 0
        solver.Add(o + c <= 1)                      # optimizer off the GPU: lossless (o) or compressed (c)
        solver.Add(ar + ao <= 1)
        solver.Add(so <= o + c)
        solver.Add(sw <= w)
        solver.Add(sa <= ao)
        solver.Add(up >= o - w)                     # off-GPU optimizer, GPU-homed weights: new weights go up
        solver.Add(down >= w - o - c)               # GPU optimizer, streamed weights: new weights go home
        fb = cm.forward_s(i) + cm.backward_s(i)
        compute += mb * fb
        ckpt = min(lc.act_checkpoint_bytes, lc.act_bytes)
        keep = 1 - ar - ao
        resident += lc.weight_bytes * (1 - w) + lc.optim_bytes * (1 - o - c)
        transient.append(kept_before + lc.act_bytes + workspace + lc.grad_bytes + lc.weight_bytes * w)
        kept_before = kept_before + lc.act_bytes * keep + ckpt * ar
        cpu_mem += lc.weight_bytes * (w - sw) + lc.optim_bytes * (o - so) + lc.act_bytes * (ao - sa)
        ssd_mem += lc.weight_bytes * sw + lc.optim_bytes * so + lc.act_bytes * sa
        cross = mb * weight_crossings(i, n)
        t["gpu"] += mb * (fb + cm.recompute_s(i) * ar) + cm.gpu_update_s(i) * (1 - o - c)
        t["h2d"] += (cross * cm.h2d_s(lc.weight_bytes) * w + cm.h2d_s(lc.weight_bytes) * up
                     + mb * cm.h2d_s(lc.act_bytes) * ao)
        t["d2h"] += mb * (cm.d2h_s(lc.grad_bytes) * o + cm.d2h_s(lc.act_bytes) * ao) + cm.d2h_s(lc.weight_bytes) * down
        t["cpu"] += cm.cpu_update_s(lc.params) * o
        t["ssd_read"] += (cm.ssd_read_s(lc.optim_bytes) * so + cross * cm.ssd_read_s(lc.weight_bytes) * sw
                          + mb * cm.ssd_read_s(lc.act_bytes) * sa)
        t["ssd_write"] += (cm.ssd_write_s(lc.optim_bytes) * so + cm.ssd_write_s(lc.weight_bytes) * sw
                           + mb * cm.ssd_write_s(lc.act_bytes) * sa)
        if rank is not None:
            comp_p = cm.compressed_params(i, rank)
            cpu_mem += cm.optim_state_bytes(i, rank) * c
            t["gpu"] += mb * cm.compress_s(i, rank, 1) * c      # P^T G Q of each micro-batch's gradient
            t["d2h"] += mb * cm.d2h_s(comp_p * e) * c
            t["cpu"] += cm.cpu_update_s(comp_p) * c
    usable = usable_gpu_bytes(hw, budget)
    for extra in transient:
        solver.Add(resident + extra <= usable)
    solver.Add(cpu_mem <= hw.cpu_mem_bytes)
    solver.Add(ssd_mem <= hw.ssd_capacity_total_bytes)
    t["cpu"] = t["cpu"] * (1.0 / max(1, hw.cpu_workers))
    terms = {"gpu": t["gpu"], "cpu": t["cpu"]}
    for link, (a, b) in LINKS.items():
        if getattr(hw, f"{link}_duplex"):
            terms.update({a: t[a], b: t[b]})
        else:
            terms[link] = t[a] + t[b]
    for expr in terms.values():
        solver.Add(T >= expr)
    solver.Minimize(T)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return LowerBound(math.inf, "memory", {}, compute,
                          f"no placement, even fractional, fits {budget / 2**30:.2f} GiB of GPU memory "
                          f"({hw.gpu_reserve_bytes / 2**20:.0f} MiB reserved), {hw.cpu_mem_bytes / 2**30:.0f} GiB "
                          f"of host memory and {hw.ssd_capacity_total_bytes / 2**30:.0f} GiB of SSD")
    parts = {k: _value(x) for k, x in terms.items()}
    binding = max(parts, key=parts.get)
    return LowerBound(T.solution_value(), binding, parts, compute)


def _value(expr) -> float:
    return float(expr.solution_value()) if hasattr(expr, "solution_value") else float(expr)
