"""Lower bounds on iteration time that no plan can beat, for (model, train, hardware, GPU budget).

A linear relaxation of the placement problem: per layer, fractions of its optimizer state, weights and
activations that leave the GPU (and of those, the fractions on the SSD). Memory of each tier must hold
what stays; every resource must do the work the placement implies, at its best efficiency and with no
latency. The bound is the least T with every resource's work <= T (solved with GLOP, OR-Tools' LP).
Its parts, each a bound by itself:
  - compute: forward + backward at the cost model's speed (plus what the placement forces: recompute,
    GPU optimizer steps);
  - PCIe: bytes that cannot stay resident cross at least as often as the engine's task graph needs
    them (weights: forward and backward; off-GPU optimizer: gradient down, new weights up);
  - SSD: what must leave the GPU but does not fit in host memory is read (and, for optimizer state,
    written back) each iteration;
  - CPU: the optimizer work of every state that cannot stay on the GPU.
Plans are reported as a ratio to this bound (DESIGN.md: CP-SAT's own bound was 1-16% looser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp

from tiertune.hardware import HardwareProfile
from tiertune.planner.estimate import usable_gpu_bytes
from tiertune.simulator.costs import CostModel
from tiertune.workload import ModelSpec, TrainSpec

WEIGHT_CROSSINGS = 2   # a streamed layer is fetched for forward and again for backward (engine task graph)


@dataclass(frozen=True)
class LowerBound:
    bound_s: float                          # inf when no placement fits the budget
    binding: str                            # resource that sets the bound
    parts: dict = field(default_factory=dict)   # resource -> busy seconds at the relaxed optimum
    compute_s: float = 0.0                  # forward + backward alone: the `ideal` floor

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.bound_s)

    def ratio(self, iteration_s: float) -> float:
        return iteration_s / self.bound_s if self.feasible and self.bound_s > 0 else math.inf


def lower_bound(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, gpu_budget: int | None = None,
                grad_ranks: tuple[int, ...] = ()) -> LowerBound:
    """The bound for plans within `gpu_budget` bytes of GPU memory (default: the hardware's).

    `grad_ranks`: LSP ranks the plans may use; compressed gradients lower PCIe and CPU work, so a
    bound for lossy plans must know the smallest rank allowed. Empty: lossless plans only.
    """
    cm = CostModel(model, train, hw)
    budget = hw.gpu_mem_bytes if gpu_budget is None else gpu_budget
    e = train.elem_bytes
    peak_eff = lambda curve: max(p[1] for p in curve.points)          # noqa: E731
    h2d = hw.h2d_bps * peak_eff(hw.pcie_efficiency)
    d2h = hw.d2h_bps * peak_eff(hw.pcie_efficiency)
    ssd_r = hw.ssd_read_total_bps * peak_eff(hw.ssd_efficiency)
    ssd_w = hw.ssd_write_total_bps * peak_eff(hw.ssd_efficiency)
    cpu_rate = (hw.cpu_sgd_params_per_s if train.optimizer == "sgd" else hw.cpu_adam_params_per_s) * hw.cpu_workers

    solver = pywraplp.Solver.CreateSolver("GLOP")
    T = solver.NumVar(0, solver.infinity(), "T")
    gpu_mem = cpu_mem = ssd_mem = 0
    t_gpu = t_h2d = t_d2h = t_cpu = t_sr = t_sw = 0
    compute = 0.0
    work = max(lc.act_bytes for lc in cm.layers) + max(lc.grad_bytes for lc in cm.layers)
    rank = min(grad_ranks) if grad_ranks else None
    for i, lc in enumerate(cm.layers):
        v = lambda name: solver.NumVar(0, 1, f"{name}{i}")              # noqa: E731
        o, w, ar, ao, so, sw, sa, u = (v(n) for n in ("o", "w", "ar", "ao", "so", "sw", "sa", "u"))
        c = v("c") if rank is not None else 0
        solver.Add(o + c <= 1)
        solver.Add(ar + ao <= 1)
        solver.Add(so <= o + c)
        solver.Add(sw <= w)
        solver.Add(sa <= ao)
        solver.Add(u >= o - w)                       # off-GPU optimizer with resident weights: new weights go up
        comp_p = cm.compressed_params(i, rank) if rank is not None else lc.params
        fb = cm.forward_s(i) + cm.backward_s(i)
        compute += fb
        freed_act = lc.act_bytes - lc.act_checkpoint_bytes
        gpu_mem += lc.weight_bytes * (1 - w) + lc.optim_bytes * (1 - o - c) + lc.act_bytes - freed_act * (ar + ao)
        cpu_mem += lc.weight_bytes * (w - sw) + lc.optim_bytes * (o - so) + lc.act_bytes * (ao - sa)
        if rank is not None:
            cpu_mem += cm.optim_state_bytes(i, rank) * c
        ssd_mem += lc.weight_bytes * sw + lc.optim_bytes * so + lc.act_bytes * sa
        t_gpu += fb + cm.recompute_s(i) * ar + cm.gpu_update_s(i) * (1 - o - c)
        if rank is not None:
            t_gpu += 2 * cm.compress_s(i, rank, 1) * c
        t_h2d += (WEIGHT_CROSSINGS * lc.weight_bytes * w + lc.weight_bytes * u + lc.act_bytes * ao) / h2d
        t_d2h += (lc.grad_bytes * o + lc.act_bytes * ao) / d2h
        t_cpu += lc.params * o / cpu_rate
        if rank is not None:
            t_h2d += comp_p * e * c / h2d                # the d x d delta goes up instead of the weights
            t_d2h += comp_p * e * c / d2h
            t_cpu += comp_p * c / cpu_rate
        t_sr += (lc.optim_bytes * so + WEIGHT_CROSSINGS * lc.weight_bytes * sw + lc.act_bytes * sa) / ssd_r
        t_sw += (lc.optim_bytes * so + lc.act_bytes * sa) / ssd_w
    solver.Add(gpu_mem + work <= usable_gpu_bytes(budget))
    solver.Add(cpu_mem <= hw.cpu_mem_bytes)
    solver.Add(ssd_mem <= hw.ssd_capacity_total_bytes)
    terms = {"gpu": t_gpu, "cpu": t_cpu}
    if hw.pcie_duplex:
        terms.update(h2d=t_h2d, d2h=t_d2h)
    else:
        terms["pcie"] = t_h2d + t_d2h
    if hw.ssd_duplex:
        terms.update(ssd_read=t_sr, ssd_write=t_sw)
    else:
        terms["ssd"] = t_sr + t_sw
    for expr in terms.values():
        solver.Add(T >= expr)
    solver.Minimize(T)
    if solver.Solve() != pywraplp.Solver.OPTIMAL:
        return LowerBound(math.inf, "memory", {}, compute)
    parts = {k: _value(x) for k, x in terms.items()}
    binding = max(parts, key=parts.get)
    return LowerBound(T.solution_value(), binding, parts, compute)


def _value(expr) -> float:
    return float(expr.solution_value()) if hasattr(expr, "solution_value") else float(expr)
