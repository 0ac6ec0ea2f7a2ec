"""One layer's cost recipe: every task a layer runs in one training step under one `LayerPlan`
(resource, duration, bytes moved, how many times per step) and the bytes it holds on each tier.

This is the single place where a plan's decisions turn into work. The builder (builder.py) turns
recipes into the task graph, adding only the order between tasks; the planner's estimates, its
CP-SAT models and the lower bound read the same recipes, so none of them can drift from what the
engine simulates. Durations come from the CostModel alone.

A step's `count` is how often the task runs per training step: per micro-batch (gradient
accumulation), per backward pass (a second, norm-only backward when clipping meets in-backward
updates, LOMO), per slice of the micro-batch (`PlanGlobals.activation_slices`: a sliced layer's
forward, backward, recompute and activation copies run once per slice, each costed at the slice's
batch) or once per step (the optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from tiertune.schedule import LayerPlan, sliceable
from tiertune.simulator.costs import CostModel
from tiertune.vocab import CPU, CPU_TIER, D2H, GPU, GPU_TIER, H2D, RESOURCES, SSD_READ, SSD_TIER, SSD_WRITE, TIERS
from tiertune.workload import grad_hook_bytes

PHASES = ("forward", "backward", "update")
# Each step as the trace names its task: (kind, what it moves), for the profile's measured fixed
# cost per task (HardwareProfile.task_overheads; forward and backward are qualified by the layer's
# activation mode instead, an update in the gradient hooks by "fused").
STEP_TASK = {
    "w_ssd_read_fwd": ("ssd_read", "w"), "w_ssd_read_bwd": ("ssd_read", "w"), "w_load_fwd": ("load", "w"),
    "w_load_bwd": ("load", "w"), "forward": ("forward", ""), "ckpt_offload": ("offload", "ckpt"),
    "ckpt_fetch": ("fetch", "ckpt"), "act_offload": ("offload", "act"), "act_fetch": ("fetch", "act"),
    "act_ssd_write": ("ssd_write", "act"), "act_ssd_read": ("ssd_read", "act"), "recompute": ("recompute", ""),
    "backward": ("backward", ""), "compress": ("compress", ""), "grad": ("grad", "grad"), "update": ("update", ""),
    "writeback": ("writeback", "w"), "w_ssd_write": ("ssd_write", "w"), "opt_ssd_read": ("ssd_read", "opt"),
    "opt_ssd_write": ("ssd_write", "opt"), "decompress": ("decompress", ""),
}


@dataclass(frozen=True)
class Step:
    """One kind of task of a layer: where it runs, how long one takes, what it moves, how often."""

    resource: int        # index into vocab.RESOURCES
    duration: float      # seconds, one task
    nbytes: int          # bytes one task moves (copies; 0 for compute)
    phase: str           # forward | backward | update
    count: int           # tasks per training step


@dataclass(frozen=True)
class LayerRecipe:
    """Layer i's work and memory under one LayerPlan (see the module docstring).

    Memory, per tier in vocab.TIERS order:
      home:     held all the time (weights and optimizer state on their tiers, a GPU optimizer's
                .grad buffer);
      kept:     held from the layer's forward to its backward (activations or their checkpoint, on
                the device or where they were sent);
      working:  what the layer's backward adds on the device while it runs (its activations back
                in place, streamed weights, the dY/dX workspace, a gradient bound for the host or a
                fused update);
      host_grad_held: the gradient a host optimizer finds in host memory at the step's end
                (`after` updates run only then; `overlap` ones consume it during backward);
      host_working: what a host optimizer's step holds in host memory beyond home bytes while it
                runs: the gradient, and the optimizer state read from the SSDs.
    """

    steps: dict[str, Step]
    weight_bytes: int
    act_bytes: int
    ckpt_bytes: int
    grad_bytes: int
    opt_bytes: int
    sent_bytes: int          # gradient bytes that cross PCIe to a host optimizer
    sent_params: int         # parameters the host optimizer updates (d x d per matrix under LSP)
    workspace: int
    slices: int              # slices of the micro-batch the layer's forward and backward run in
    act_slice_bytes: int     # act_bytes of one slice (act_bytes = slices x act_slice_bytes)
    ckpt_slice_bytes: int
    workspace_slice: int     # the backward workspace of one slice
    home: tuple[int, int, int]
    kept: tuple[int, int, int]
    working_gpu: int
    host_grad_held: int
    host_working: int

    def get(self, name: str) -> Step | None:
        return self.steps.get(name)

    def busy(self) -> list[float]:
        """Seconds each resource works for this layer per training step."""
        out = [0.0] * len(RESOURCES)
        for s in self.steps.values():
            out[s.resource] += s.duration * s.count
        return out

    def phase_busy(self, phase: str) -> dict[str, float]:
        """Seconds per resource (by name) in one phase of the step."""
        out: dict[str, float] = {}
        for s in self.steps.values():
            if s.phase == phase and s.count:
                r = RESOURCES[s.resource]
                out[r] = out.get(r, 0.0) + s.duration * s.count
        return out

    def held(self) -> dict[str, int]:
        """Bytes per tier this layer holds at some point of every step beyond its working set:
        home + kept + the host gradient of an `after` update."""
        out = {t: self.home[k] + self.kept[k] for k, t in enumerate(TIERS)}
        out["cpu"] += self.host_grad_held
        return out


def workspace_bytes(cm: CostModel) -> int:
    """dY in, dX out of one layer's backward, and what the gradient hook holds beside it
    (workload.grad_hook_bytes): transient device workspace."""
    t = cm.train
    return 2 * t.elem_bytes * t.seq_len * t.batch * cm.model.hidden + grad_hook_bytes(cm.model, t)


def passes(train, layers) -> int:
    """Backward passes per micro-batch: two when clipping needs the norm before in-backward updates."""
    return 2 if train.grad_clip is not None and any(lp.update in ("fused", "overlap") for lp in layers) else 1


def keeps_last_weights(i: int, n_layers: int, lp: LayerPlan, n_passes: int) -> bool:
    """The last layer's streamed weights stay on the device from its forward to its backward (our
    executor, Fuyou, MegaTrain) instead of leaving and coming back."""
    return i == n_layers - 1 and lp.params != "gpu" and n_passes == 1


def slice_model(cm: CostModel, slices: int) -> CostModel:
    """The cost model of one slice of the micro-batch (batch / slices sequences). Memoised on `cm`."""
    if slices == 1:
        return cm
    memo: dict = cm.__dict__.setdefault("_slice_memo", {})
    s = memo.get(slices)
    if s is None:
        s = memo[slices] = CostModel(cm.model, cm.train.replace(batch=cm.train.batch // slices), cm.hw)
    return s


def layer_recipe(cm: CostModel, i: int, lp: LayerPlan, n_passes: int = 1, host_ckpt: bool = False,
                 nnz_per_row: int = 4, slices: int = 1) -> LayerRecipe:
    """The recipe of layer i under lp. `host_ckpt`: DeepSpeed's cpu_checkpointing (a recomputed
    layer's input checkpoint waits in host memory); `nnz_per_row`: LSP's r; `slices`: the plan's
    activation_slices (ignored where the layer runs whole). Memoised on `cm`."""
    if slices > 1 and not sliceable(i, len(cm.layers), lp):
        slices = 1
    memo: dict = cm.__dict__.setdefault("_recipe_memo", {})
    key = (i, lp, n_passes, host_ckpt, nnz_per_row, slices)
    r = memo.get(key)
    if r is None:
        r = memo[key] = _recipe(cm, i, lp, n_passes, host_ckpt, nnz_per_row, slices)
    return r


def _recipe(cm: CostModel, i: int, lp: LayerPlan, n_passes: int, host_ckpt: bool, nnz: int,
            slices: int) -> LayerRecipe:
    c = cm.layers[i]
    n = len(cm.layers)
    accum = cm.train.grad_accum
    # A sliced layer's compute and activation copies are those of one slice, `slices` times.
    sm = slice_model(cm, slices)
    cs = sm.layers[i]
    # A recomputed layer holds at most act_recompute_bytes at once (less than act_bytes when it is
    # checkpointed in parts, TrainSpec.checkpoint_halves); a kept or swapped one holds all of them.
    wb, grad = c.weight_bytes, c.grad_bytes
    act_s = cs.act_recompute_bytes if lp.activations == "recompute" else cs.act_bytes
    ckpt_s = min(cs.act_checkpoint_bytes, act_s)
    act, ckpt = act_s * slices, ckpt_s * slices
    rank = lp.grad_rank
    opt_bytes = cm.optim_state_bytes(i, rank, lp.optimizer_beside_weights)
    sent_bytes = cm.host_grad_bytes(i, rank)
    sent_params = cm.compressed_params(i, rank) if rank else c.params
    host_ckpt = host_ckpt and lp.activations == "recompute"
    steps: dict[str, Step] = {}

    def add(name: str, res: int, dur: float, nbytes: int, phase: str, count: int) -> None:
        if count > 0:
            kind, what = STEP_TASK[name]
            if kind in ("forward", "backward"):
                what = lp.activations                 # the saved-tensor hooks differ by mode
            elif kind == "update" and lp.update == "fused":
                what = "fused"
            dur += cm.task_overhead_s(kind, RESOURCES[res], i, what)
            steps[name] = Step(res, float(dur), int(nbytes), phase, count)

    # ---- forward, per micro-batch ----
    streamed = lp.params != "gpu"
    bwd_loads = 0 if keeps_last_weights(i, n, lp, n_passes) else accum * n_passes
    per_slice = accum * slices
    if lp.params == "ssd":
        add("w_ssd_read_fwd", SSD_READ, cm.ssd_read_s(wb), wb, "forward", accum)
        add("w_ssd_read_bwd", SSD_READ, cm.ssd_read_s(wb), wb, "backward", bwd_loads)
    if streamed:
        add("w_load_fwd", H2D, cm.h2d_s(wb), wb, "forward", accum)
        add("w_load_bwd", H2D, cm.h2d_s(wb), wb, "backward", bwd_loads)
    add("forward", GPU, sm.forward_s(i), 0, "forward", per_slice)
    if host_ckpt:
        add("ckpt_offload", D2H, cm.d2h_s(ckpt_s), ckpt_s, "forward", per_slice)
        add("ckpt_fetch", H2D, cm.h2d_s(ckpt_s), ckpt_s, "backward", per_slice * n_passes)
    if lp.activations in ("cpu", "ssd"):
        add("act_offload", D2H, cm.d2h_s(act_s), act_s, "forward", per_slice)
        add("act_fetch", H2D, cm.h2d_s(act_s), act_s, "backward", per_slice * n_passes)
        if lp.activations == "ssd":
            add("act_ssd_write", SSD_WRITE, cm.ssd_write_s(act_s), act_s, "forward", per_slice)
            add("act_ssd_read", SSD_READ, cm.ssd_read_s(act_s), act_s, "backward", per_slice * n_passes)
    # ---- backward, per micro-batch and pass (and slice) ----
    if lp.activations == "recompute":
        add("recompute", GPU, sm.recompute_s(i), 0, "backward", per_slice * n_passes)
    add("backward", GPU, sm.backward_s(i), 0, "backward", per_slice * n_passes)
    if lp.optimizer != "gpu":
        if rank:
            add("compress", GPU, cm.compress_s(i, rank, nnz), 0, "backward", accum)
        add("grad", D2H, cm.d2h_s(sent_bytes), sent_bytes, "backward", accum)
    # ---- the optimizer step, once per step ----
    if lp.optimizer == "gpu":
        add("update", GPU, cm.gpu_update_s(i), 0, "update", 1)
        if streamed:
            add("writeback", D2H, cm.d2h_s(wb), wb, "update", 1)
            if lp.params == "ssd":
                add("w_ssd_write", SSD_WRITE, cm.ssd_write_s(wb), wb, "update", 1)
    else:
        if lp.optimizer == "ssd":
            add("opt_ssd_read", SSD_READ, cm.ssd_read_s(opt_bytes), opt_bytes, "update", 1)
            add("opt_ssd_write", SSD_WRITE, cm.ssd_write_s(opt_bytes), opt_bytes, "update", 1)
        dur = cm.cpu_update_s(sent_params)
        if rank and lp.params != "gpu":
            dur += cm.cpu_apply_s(c.params)          # the dense weights absorb P U Q^T on the host
        add("update", CPU, dur, 0, "update", 1)
        if lp.params == "gpu" and rank:
            add("writeback", H2D, cm.h2d_s(sent_bytes), sent_bytes, "update", 1)
            add("decompress", GPU, cm.decompress_s(i, rank, nnz), 0, "update", 1)
        elif lp.params == "gpu":
            add("writeback", H2D, cm.h2d_s(wb), wb, "update", 1)
        elif lp.params == "ssd":
            add("w_ssd_write", SSD_WRITE, cm.ssd_write_s(wb), wb, "update", 1)

    home = [0, 0, 0]
    home[TIERS.index(lp.params)] += wb
    home[TIERS.index(lp.optimizer)] += opt_bytes
    if lp.optimizer == "gpu" and lp.update != "fused":
        home[GPU_TIER] += grad                       # persistent .grad buffer (zeroed, not freed, per step)
    kept = [0, 0, 0]
    if lp.activations == "keep":
        kept[GPU_TIER] += act
    elif lp.activations == "recompute":
        kept[CPU_TIER if host_ckpt else GPU_TIER] += ckpt
    else:
        kept[CPU_TIER if lp.activations == "cpu" else SSD_TIER] += act
    workspace = workspace_bytes(cm)
    ws_s = workspace_bytes(sm)
    dyn_grad = grad if (lp.optimizer != "gpu" or lp.update == "fused") else 0
    # A sliced layer's backward has one slice's activations and workspace on the device at least
    # (the engine may hold a second, prefetched slice; this is a floor).
    working = act_s + ws_s + dyn_grad + (wb if streamed else 0)
    if lp.activations in ("keep",) or (lp.activations == "recompute" and not host_ckpt):
        working -= kept[GPU_TIER] // slices         # already counted as kept
    host_grad_held = sent_bytes if lp.optimizer != "gpu" and lp.update == "after" else 0
    host_working = 0 if lp.optimizer == "gpu" else sent_bytes + (opt_bytes if lp.optimizer == "ssd" else 0)
    return LayerRecipe(steps=steps, weight_bytes=wb, act_bytes=act, ckpt_bytes=ckpt, grad_bytes=grad,
                       opt_bytes=opt_bytes, sent_bytes=sent_bytes, sent_params=sent_params, workspace=workspace,
                       slices=slices, act_slice_bytes=act_s, ckpt_slice_bytes=ckpt_s, workspace_slice=ws_s,
                       home=tuple(home), kept=tuple(kept), working_gpu=working, host_grad_held=host_grad_held,
                       host_working=host_working)


def plan_recipes(cm: CostModel, plan) -> list[LayerRecipe]:
    """The recipe of every layer of a Plan."""
    p = passes(cm.train, plan.layers)
    g = plan.globals
    return [layer_recipe(cm, i, lp, p, g.cpu_checkpointing, g.lsp_nnz_per_row, plan.slices(i))
            for i, lp in enumerate(plan.layers)]


def busy_per_step(recipes: list[LayerRecipe]) -> dict[str, float]:
    """Seconds each resource works per training step, summed over layers (the engine's busy time)."""
    tot = [0.0] * len(RESOURCES)
    for r in recipes:
        for k, v in enumerate(r.busy()):
            tot[k] += v
    return dict(zip(RESOURCES, tot))


