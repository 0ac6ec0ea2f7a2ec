"""Named baseline policies: (model, train, hardware) -> Plan, each following its paper or code.

The planner must beat these; `tiertune compare` runs them all. Registry: `POLICIES`; build one
with `make_policy(name, model, train, hw)`. A policy always returns its plan, fitting or not (the
engine says whether it fits); it raises `PolicyInfeasible` only when its own rules leave no tier
that could hold the state (e.g. ZeRO-Infinity with neither host memory nor SSD space enough).
Numbers quoted in docstrings come from each system's paper and released code, named where used.
"""

from __future__ import annotations

from typing import Callable

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile
from tiertune.planner.estimate import capacity, cost_model, footprint, overflow
from tiertune.schedule import LayerPlan, Plan, PlanGlobals, uniform_plan
from tiertune.workload import ModelSpec, TrainSpec

UNLIMITED = 1 << 62

PolicyFn = Callable[[ModelSpec, TrainSpec, HardwareProfile], Plan]
POLICIES: dict[str, PolicyFn] = {}


class PolicyInfeasible(InputError):
    """A policy's rules leave no placement that fits: the message names the tier, needed vs available."""


def policy(name: str):
    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn
    return deco


def _uniform(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, layer: LayerPlan, name: str,
             **globals_) -> Plan:
    return uniform_plan(model.name, hw.name, train, model.n_layers + 2, layer, PlanGlobals(**globals_),
                        {"policy": name})


def _flag(policy_name: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{policy_name}: {name} must be true or false, got {v!r}")
    return v


def _fits(model: ModelSpec, plan: Plan, hw: HardwareProfile) -> bool:
    return overflow(cost_model(model, plan.train, hw), plan) is None


@policy("ideal")
def ideal(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Unlimited GPU memory, everything resident, nothing moved: native speed, the reference."""
    return _uniform(model, train, hw, LayerPlan(), "ideal", gpu_mem_bytes=UNLIMITED)


@policy("gpu-only")
def gpu_only(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Plain PyTorch training on the real GPU: everything resident; does not fit when the model is big."""
    return _uniform(model, train, hw, LayerPlan(), "gpu-only")


@policy("checkpoint")
def checkpoint(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Everything resident on the GPU with activation checkpointing (torch.utils.checkpoint per block):
    only each layer's input is kept, the rest is recomputed in backward."""
    return _uniform(model, train, hw, LayerPlan(activations="recompute"), "checkpoint")


@policy("lomo")
def lomo(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """LOMO (OpenLMLab/LOMO): weights on the GPU, the update fused into each parameter's backward hook
    so at most one gradient is alive, activations recomputed (the paper trains with checkpointing).

    Optimizer: LOMO is SGD without state; AdaLomo is its adaptive variant (factored second moment,
    LOMO's README). A user who asked for AdamW gets AdaLomo, the closest to Adam that LOMO offers; we
    record the substitution in provenance (`optimizer_from`) rather than silently training with SGD.
    Fused updates cannot accumulate gradients, and clipping needs a second backward (LOMO#4, #34):
    Plan validation and `Plan.needs_second_backward` handle both. No fp32 master copy (the hook
    updates the 16-bit weights in place), so llama2-7b fits LOMO's 24 GB RTX 3090.
    """
    prov_from = None
    if train.optimizer == "adamw":
        prov_from, train = "adamw", train.replace(optimizer="adalomo")
    # LOMO and AdaLomo update the weights in place in their training dtype: no fp32 master.
    train = train.replace(master_weights=False)
    plan = _uniform(model, train, hw, LayerPlan(update="fused", activations="recompute"), "lomo")
    if prov_from:
        plan = plan.replace(provenance={**plan.provenance, "optimizer_from": prov_from})
    return plan


def _keep_or_recompute(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, layer: LayerPlan, name: str,
                       **globals_) -> Plan:
    """DeepSpeed users switch on activation checkpointing when activations do not fit: so do we."""
    plan = _uniform(model, train, hw, layer, name, **globals_)
    if _fits(model, plan, hw):
        return plan
    return _uniform(model, train, hw, layer.replace(activations="recompute"), name, **globals_)


# DeepSpeed's memory estimators (deepspeed.runtime.zero.stage_1_and_2 / stage3
# estimate_zero*_model_states_mem_needs) multiply host model-state memory by
# additional_buffer_factor = 1.5 for its pinned buffers; the ZeRO policies keep that margin when
# they decide whether host memory holds the state.
DEEPSPEED_HOST_BUFFER_FACTOR = 1.5


@policy("zero-offload")
def zero_offload(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, host_update_inline: bool = False) -> Plan:
    """DeepSpeed ZeRO-Offload: fp16 weights on the GPU, gradients and Adam states on the CPU, CPU Adam
    after the whole backward, updated weights copied back (ZeRO-Offload, arXiv 2101.06840, with no delayed parameter update).
    DeepSpeed's accounting: each gradient is cast to fp32 on the device and copied into fp32
    partitions kept in host memory until the step (16 bytes per parameter on the host with Adam).

    `host_update_inline=True`: the step as DeepSpeed's training loop runs it, `engine.step()`
    between the backward and the next forward (PlanGlobals.host_update_inline); by default the next
    forward starts as each layer's weights come home, as tiertune's executor runs the plan."""
    train = train.replace(fp32_host_grads=True)
    return _keep_or_recompute(model, train, hw, LayerPlan(params="gpu", optimizer="cpu", update="after"),
                              "zero-offload", host_update_inline=_flag("zero-offload", "host_update_inline",
                                                                       host_update_inline))


@policy("zero-infinity")
def zero_infinity(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, host_update_inline: bool = False) -> Plan:
    """DeepSpeed ZeRO-Infinity (stage 3 + offload_param/offload_optimizer): weights and optimizer in host
    memory, or on NVMe when host memory does not suffice (optimizer first, then weights, as users set
    `offload_optimizer.device: nvme` before `offload_param.device: nvme`); one layer prefetched;
    update after backward; activation checkpointing with `cpu_checkpointing` (the layer-input
    checkpoints wait in host memory), the best configuration Fuyou compares against. Host state
    follows DeepSpeed's accounting: fp32 gradient partitions, and the estimators' 1.5x buffer margin
    when deciding whether host memory holds it. `host_update_inline`: as in zero-offload."""
    inline = _flag("zero-infinity", "host_update_inline", host_update_inline)
    train = train.replace(fp32_host_grads=True)
    cm = cost_model(model, train, hw)
    for params, optim in (("cpu", "cpu"), ("cpu", "ssd"), ("ssd", "ssd")):
        plan = _uniform(model, train, hw, LayerPlan(params=params, optimizer=optim, update="after",
                                                    activations="recompute"), "zero-infinity", prefetch_depth=1,
                        cpu_checkpointing=True, host_update_inline=inline)
        need = footprint(cm, plan)
        if need["cpu"] * DEEPSPEED_HOST_BUFFER_FACTOR <= hw.cpu_mem_bytes and need["ssd"] <= hw.ssd_capacity_total_bytes:
            return plan
    raise PolicyInfeasible(f"zero-infinity: host memory ({hw.cpu_mem_bytes / 2**30:.0f} GiB) plus SSD "
                           f"({hw.ssd_capacity_total_bytes / 2**30:.0f} GiB) cannot hold the state "
                           f"(needs {need['cpu'] / 2**30:.0f} GiB host, {need['ssd'] / 2**30:.0f} GiB SSD)")


FUYOU_SWAP_RATIO = 1.0   # Fuyou's --swap_ratio: swap while swap time <= ratio x forward time


@policy("fuyou")
def fuyou(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Fuyou (arXiv 2403.06504, Crispig/Ratel): weights, optimizer states on the SSD (offload_param and
    offload_optimizer both `nvme`), CPU Adam run layer by layer during backward (update='overlap').

    Activations: ranked by FLOPs per byte (recomputing those costs the most per byte saved), swapped in
    that order while the estimated swap time stays under swap_ratio x forward time and the device
    has room to bring them back; swapped activations fill host memory first and overflow to the
    SSD; the rest are recomputed, their checkpoints in host memory and each block checkpointed at
    its attention and MLP halves when the device cannot hold whole-block checkpoints.

    Device memory: the released gradient hook (RC4ML/LoHan ratel_optimizer.py, partition_grads)
    copies each gradient and takes its norm in fp64 chunks on the device (grad_copy_fp64_norm); at
    175B that holds 3.2 GB beside a block's backward, which is why batch 32 (seq 1024) runs out of
    memory in Fuyou's Fig. 7b while batch 16 trains.
    """
    train = train.replace(grad_copy_fp64_norm=True)
    cm = cost_model(model, train, hw)
    base = LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="recompute")
    n = model.n_layers + 2
    plan = _uniform(model, train, hw, base, "fuyou")
    if overflow(cm, plan) is not None:
        # The released code (RC4ML/LoHan gpt_model.py) checkpoints the attention and the MLP half of
        # each block separately and keeps the checkpoints in host memory (save_on_cpu); we do both
        # when the device cannot hold the checkpoints (the executor runs host checkpoints, not halves).
        train = train.replace(checkpoint_halves=True)
        cm = cost_model(model, train, hw)
        plan = _uniform(model, train, hw, base, "fuyou", cpu_checkpointing=True)
    fwd_total = sum(cm.forward_s(i) for i in range(n))
    need = footprint(cm, plan)
    cpu_free = hw.cpu_mem_bytes - need["cpu"]
    # GPU-aware: a swapped layer's activations are on the device up to depth + 2 times at once (in
    # use, prefetched, being offloaded); a layer whose activations do not fit that is recomputed.
    gpu_room = (capacity(hw, plan, "gpu") - need["gpu"]) // (plan.globals.prefetch_depth + 2)
    order = sorted(range(n), key=lambda i: (-cm.layers[i].fwd_flops / max(cm.layers[i].act_bytes, 1), -i))
    layers = [base] * n
    swap_s = 0.0
    for i in order:
        lc = cm.layers[i]
        t = cm.d2h_s(lc.act_bytes)
        if lc.fwd_flops <= 0 or swap_s + t > FUYOU_SWAP_RATIO * fwd_total or lc.act_bytes > gpu_room:
            continue
        swap_s += t
        if lc.act_bytes <= cpu_free:
            layers[i], cpu_free = base.replace(activations="cpu"), cpu_free - lc.act_bytes
        else:
            layers[i] = base.replace(activations="ssd")
    plan = plan.with_layers(layers).replace(provenance={"policy": "fuyou", "swap_ratio": FUYOU_SWAP_RATIO})
    need = footprint(cm, plan)
    if need["ssd"] > hw.ssd_capacity_total_bytes:
        raise PolicyInfeasible(f"fuyou: SSD needs {need['ssd'] / 2**30:.0f} GiB, has "
                               f"{hw.ssd_capacity_total_bytes / 2**30:.0f} GiB")
    return plan


def lsp_rank(model: ModelSpec) -> tuple[int, int]:
    """(d, r) as LSP-Offload sets them: 6.7B (hidden 4096) d=2048, r=8; 1.3B (hidden 2048) d=1280, r=4;
    otherwise d about n/2 (the paper: hides communication), r=4 up to hidden 2048 and 8 above."""
    known = {4096: (2048, 8), 2048: (1280, 4)}
    if model.hidden in known:
        return known[model.hidden]
    return max(1, model.hidden // 2), (4 if model.hidden <= 2048 else 8)


@policy("lsp-offload")
def lsp_offload(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, d: int | None = None,
                r: int | None = None, host_update_inline: bool = False) -> Plan:
    """LSP-Offload (arXiv 2406.10181, gulang2019/LSP-Offload): ZeRO-Offload's placement (weights on GPU,
    CPU Adam), but each gradient crosses PCIe as the d x d projection P^T G Q and the d x d delta comes
    back; layer-wise schedule, deep layers update on the CPU while shallow ones are still in backward.
    d (projection size) and r (non-zeros per projector row) are chosen per run, as the paper's
    scripts do; unset, `lsp_rank` picks them.

    `host_update_inline=True` is the released profiling script (para_offload_modules.py): its
    Scheduler puts each module's CPU Adam (`_process`: wait for the gradient's copy, then
    `optim.step`) in the module hooks, which the training thread runs between one module's backward
    and the next, so the GPU gets no new work meanwhile (PlanGlobals.host_update_inline); with
    `--zero` the hooks of every module run at the first module's next forward."""
    d0, r0 = lsp_rank(model)
    d, r = d or d0, r or r0
    for name, v in (("d", d), ("r", r)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"lsp-offload: {name} must be a positive integer, got {v!r}")
    return _keep_or_recompute(model, train, hw, LayerPlan(params="gpu", optimizer="cpu", update="overlap",
                                                          grad_rank=d),
                              "lsp-offload", lsp_nnz_per_row=r,
                              host_update_inline=_flag("lsp-offload", "host_update_inline", host_update_inline))


@policy("megatrain")
def megatrain(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """MegaTrain (arXiv 2604.05091): host memory holds weights, gradients and Adam moments; every layer
    is streamed through two GPU buffers (prefetch_depth 1 = double buffering), backward recomputes
    block-locally, and CPU Adam consumes gradients as they stream back (update='overlap').

    Host bytes per parameter: ours are 14 (16-bit weights, fp32 master, fp32 m and v). MegaTrain's
    released code (DLYuanGod/MegaTrain: examples/sft/train.py, infinity/model/cpu_master.py) also
    holds 14, made differently: the model loaded in bf16 and updated in place by DeepSpeed's CPU
    Adam (fp32 m and v, no fp32 master), a pinned bf16 copy of every layer for single-GPU runs,
    and bf16 CPU gradients. Its resource calculator (scripts/calc_resource.py) counts 12 (fp32
    master + m + v), the figure under which 120B fits a 1.5 TB host; at 14 it needs 1.68 TB."""
    return _uniform(model, train, hw, LayerPlan(params="cpu", optimizer="cpu", update="overlap",
                                                activations="recompute"), "megatrain", prefetch_depth=1)


def make_policy(name: str, model: ModelSpec, train: TrainSpec, hw: HardwareProfile, **options) -> Plan:
    """The named policy's plan; `options` are that policy's own settings (lsp-offload: d, r)."""
    try:
        fn = POLICIES[name]
    except KeyError:
        raise InputError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    try:
        return fn(model, train, hw, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise InputError(f"policy {name!r} takes no option(s) {sorted(options)}") from None
        raise
