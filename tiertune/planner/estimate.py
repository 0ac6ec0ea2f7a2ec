"""Analytic accounting of a Plan, for the planner's own use: per-resource busy time per iteration,
a memory footprint per tier, and a quick iteration-time estimate.

Policies use the footprint to pick tiers (ZeRO-Infinity: CPU or NVMe; Fuyou: CPU memory first),
bounds.py sums the busy times, and the search scores candidates with `quick_iteration_s` where the
engine (tiertune.simulator.simulate) would be too slow. Every duration comes from CostModel.
These numbers only steer the search: a plan is judged by the engine alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiertune.hardware import HardwareProfile
from tiertune.schedule import LayerPlan, Plan
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import layer_recipe, plan_recipes
from tiertune.vocab import LINKS, RESOURCES, TIERS
from tiertune.workload import ModelSpec, TrainSpec



@dataclass(frozen=True)
class LayerWork:
    """What one layer costs on each resource per iteration, and which phase it lands in."""

    fwd: dict            # resource -> seconds during forward
    bwd: dict            # resource -> seconds during backward (overlappable with backward compute)
    post: dict           # resource -> seconds after backward (update='after')


def _add(d: dict, key: str, v: float) -> None:
    if v > 0:
        d[key] = d.get(key, 0.0) + v


def layer_work(cm: CostModel, i: int, lp: LayerPlan, nnz_per_row: int = 4, cpu_checkpointing: bool = False,
               slices: int = 1) -> LayerWork:
    """Per-resource work of layer i under decisions lp, by phase: its recipe's tasks (the same
    tasks the engine builds). `overlap`/`fused` updates run during backward, `after` ones after it."""
    r = layer_recipe(cm, i, lp, 1, cpu_checkpointing, nnz_per_row, slices)
    bwd = r.phase_busy("backward")
    post: dict = {}
    for k, v in r.phase_busy("update").items():
        _add(post if lp.update == "after" else bwd, k, v)
    return LayerWork(r.phase_busy("forward"), bwd, post)


def busy_s(cm: CostModel, plan: Plan) -> dict[str, float]:
    """Total seconds each resource is busy in one iteration (half-duplex links folded together)."""
    tot = dict.fromkeys(RESOURCES, 0.0)
    for i, lp in enumerate(plan.layers):
        w = layer_work(cm, i, lp, plan.globals.lsp_nnz_per_row, plan.globals.cpu_checkpointing)
        for d in (w.fwd, w.bwd, w.post):
            for k, v in d.items():
                tot[k] += v
    return fold_duplex(tot, cm.hw)


def fold_duplex(tot: dict[str, float], hw: HardwareProfile) -> dict[str, float]:
    out = dict(tot)
    for link, (a, b) in LINKS.items():
        if not getattr(hw, f"{link}_duplex"):
            out[a] = out[b] = tot[a] + tot[b]
    out["cpu"] = tot["cpu"] / max(1, hw.cpu_workers)
    return out


def quick_iteration_s(cm: CostModel, plan: Plan) -> float:
    """A fast estimate of steady-state iteration time: each phase (forward, backward, after) is a
    pipeline whose per-layer step is bound by its busiest resource, plus the resources that run
    beyond it; the iteration is never shorter than any resource's total. For search steering only."""
    hw = cm.hw
    phases = {"fwd": 0.0, "bwd": 0.0, "post": 0.0}
    post_tot: dict = {}
    for i, lp in enumerate(plan.layers):
        w = layer_work(cm, i, lp, plan.globals.lsp_nnz_per_row, plan.globals.cpu_checkpointing)
        phases["fwd"] += max(fold_duplex({**dict.fromkeys(RESOURCES, 0.0), **w.fwd}, hw).values())
        phases["bwd"] += max(fold_duplex({**dict.fromkeys(RESOURCES, 0.0), **w.bwd}, hw).values())
        for k, v in w.post.items():
            post_tot[k] = post_tot.get(k, 0.0) + v
    phases["post"] = max(fold_duplex({**dict.fromkeys(RESOURCES, 0.0), **post_tot}, hw).values())
    # The overlapped CPU optimizer of the first layers in backward order finishes after backward ends:
    # its tail is roughly one layer's update, already inside the sums above.
    return max(sum(phases.values()), max(busy_s(cm, plan).values()))


def footprint(cm: CostModel, plan: Plan) -> dict[str, int]:
    """Peak bytes per tier this plan needs: what every layer's recipe holds at once (home, kept
    activations, host gradients of `after` updates) plus the largest in-flight working set:
    prefetch buffers for streamed weights and swapped activations, one layer's backward working
    set, and host staging for SSD-homed state."""
    held = dict.fromkeys(TIERS, 0)
    stream_w = swap_a = work = staging = 0
    for r, lp in zip(plan_recipes(cm, plan), plan.layers):
        for tier, b in r.held().items():
            held[tier] += b
        if lp.params != "gpu":
            stream_w = max(stream_w, r.weight_bytes)
        if lp.activations in ("cpu", "ssd"):
            swap_a = max(swap_a, r.act_bytes)
        if lp.optimizer == "ssd" or lp.params == "ssd":
            staging = max(staging, r.weight_bytes + r.opt_bytes + r.grad_bytes)
        work = max(work, r.working_gpu)
    depth = plan.globals.prefetch_depth + 1
    held["gpu"] += depth * (stream_w + swap_a) + work
    held["cpu"] += depth * staging
    return {t: int(b) for t, b in held.items()}


def overflow(cm: CostModel, plan: Plan) -> str | None:
    """None when the footprint fits every tier of the plan's budget; else which tier, needed vs available."""
    need = footprint(cm, plan)
    for tier in TIERS:
        cap = capacity(cm.hw, plan, tier)
        if need[tier] > cap:
            return f"{tier} memory: needs {need[tier] / 2**30:.1f} GiB, has {cap / 2**30:.1f} GiB"
    return None


def capacity(hw: HardwareProfile, plan: Plan, tier: str) -> int:
    if tier == "gpu" and plan.globals.gpu_mem_bytes is not None:
        return plan.globals.gpu_mem_bytes
    return hw.capacity(tier)


def usable_gpu_bytes(hw: HardwareProfile, budget: int) -> int:
    """GPU bytes left for tensors: the engine reserves the profile's device reserve out of every budget."""
    return budget - hw.gpu_reserve_bytes


def cost_model(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> CostModel:
    return CostModel(model, train, hw)
