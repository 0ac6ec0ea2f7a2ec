"""`train_plan`: train a model for real under a Plan and return losses, timings and the measured trace.

The training loop shared by `tiertune execute` (one run from the command line) and `tiertune
validate` / benchmarks/bench_fidelity.py (runs to compare with the simulator): data, the
Executor, the timed steps, an optional checkpoint to save or resume from.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tiertune.errors import InputError
from tiertune.schedule import Plan
from tiertune.workload import ModelSpec, layer_costs

if TYPE_CHECKING:
    from tiertune.executor.updates import OptimConfig
    from tiertune.executor.hf import HFSource
    from tiertune.traces.trace import Trace


DEFAULT_LR = 1e-3      # the built-in models train from scratch; `execute` fine-tunes HF models at its HF_DEFAULT_LR


@dataclass
class RunResult:
    losses: list[float]              # one per step of this call
    step_times: list[float]          # wall seconds of each step of this call
    iteration_s: float               # median step time after the first (warm-up) step
    tokens_per_s: float | None
    peak_bytes: dict[str, int]       # per tier, as the executor accounted them
    trace: "Trace"                   # the measured trace (every step of this call)
    steps: int                       # optimizer steps done in total (a resumed run counts the earlier ones)
    seed: int
    lr: float
    budget_bytes: int | None = None
    optim: "OptimConfig | None" = None     # the optimizer settings the run used
    extra: dict = field(default_factory=dict)


def steady_median(times: list[float]) -> float:
    """Median step time with the first (warm-up: allocations, first-touch of buffers) left out."""
    steady = times[1:] or times
    return statistics.median(steady)


# What a resumed run must share with the run it continues, or it silently becomes another run.
RESUME_KEEPS = ("batch", "seq_len", "grad_accum", "dtype", "optimizer")


def non_finite(state, path: str = "") -> str | None:
    """The path of the first floating-point tensor in `state` with a NaN or an infinity, or None."""
    import torch

    if isinstance(state, torch.Tensor):
        return path if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, f"{path}.{k}" if isinstance(state, dict) else f"{path}[{k}]")
        if found:
            return found
    return None


def _check_resume(state: dict, spec: ModelSpec, plan: Plan, seed: int | None, data_sha: str, where) -> None:
    """Refuse to resume `state` under settings that would make a different run, naming each one."""
    if not isinstance(state, dict) or state.get("model") != spec.name or "executor" not in state:
        raise InputError(f"checkpoint {where} is not a tiertune execute checkpoint of {spec.name!r}")
    saved_seed = state.get("seed")
    if seed is not None and saved_seed is not None and seed != saved_seed:
        raise InputError(f"--seed {seed} differs from the checkpoint's seed {saved_seed}: a resumed run keeps "
                         f"its seed (drop --seed)")
    saved_train = (state.get("plan") or {}).get("train") or {}
    changed = [f"{k} {getattr(plan.train, k)} (checkpoint: {saved_train[k]})" for k in RESUME_KEEPS
               if k in saved_train and saved_train[k] != getattr(plan.train, k)]
    if changed:
        raise InputError(f"resuming {where} with {', '.join(changed)} would change the run's data or state; "
                         f"resume with the checkpoint's settings")
    if state.get("data_sha256") not in (None, data_sha):
        raise InputError(f"resuming {where} on other training data (text or token ids) than it was trained on "
                         f"(give the same --data and --data-layout)")


def train_plan(spec_or_source: "ModelSpec | HFSource", plan: Plan, steps: int, *, device: str = "cpu",
               gpu_mem_bytes: int | None = None, offload_dir: str | Path | None = None, data: str | None = None,
               lr: float | None = None, seed: int | None = None, progress: bool = True,
               save_dir: str | Path | None = None, resume: "str | Path | dict | None" = None,
               save_every: int | None = None, keep: int = 2, data_dtype: str | None = None,
               data_layout: str = "packed", optim: "OptimConfig | None" = None) -> RunResult:
    """Run `steps` optimizer steps of `plan` on `device`.

    `spec_or_source`: a ModelSpec (the built-in model of that shape, initialised from `seed`,
    default 0) or an HFSource (a local Hugging Face model's weights). `data`: token ids (.bin, of
    `data_dtype`, or .npy), or a text (.txt, .jsonl) tokenized with the HF model's tokenizer or,
    for a built-in model, read as bytes (default: the shipped demo text); batches laid out per
    `data_layout` (executor/data.py). `optim`: the optimizer settings (default: the resumed
    checkpoint's, else AdamW with torch's defaults at DEFAULT_LR); `lr` overrides its lr (default:
    the resumed checkpoint's, else optim's). A linear / cosine schedule without total_steps ends
    at this run's last step. `resume`: a
    checkpoint (directory, or the state `load_checkpoint` read from one) written by an earlier
    `save_dir`; the run continues on the data an uninterrupted run would see, and is refused when
    the seed, training settings, data or layout differ. `save_dir`: checkpoints every `save_every` steps
    (the last `keep` kept) and at the end. A non-finite loss stops the run (InputError naming the
    step), and no checkpoint of non-finite weights or optimizer state is written.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {steps!r}")
    import math
    import shutil
    import tempfile

    import torch

    from tiertune.executor.data import check_layout, open_data
    from tiertune.executor.models import build_model
    from tiertune.executor.runtime import Executor
    from tiertune.executor.updates import OptimConfig

    hf = None if isinstance(spec_or_source, ModelSpec) else spec_or_source
    spec: ModelSpec = spec_or_source if hf is None else hf.spec
    train = plan.train
    if train.seq_len > spec.max_seq_len:
        raise InputError(f"--seq {train.seq_len} exceeds {spec.name}'s context ({spec.max_seq_len})")
    check_layout(data_layout)
    dataset = open_data(data, spec.vocab_size, model_dir=hf.dir if hf is not None else None, dtype=data_dtype,
                        progress=progress)
    data_sha = dataset.fingerprint(data_layout)
    state = None
    resumed_from = None
    if resume is not None:
        from tiertune.executor.checkpoint import load_checkpoint
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        _check_resume(state, spec, plan, seed, data_sha, resume if not isinstance(resume, dict) else "checkpoint")
        seed = int(state.get("seed", 0))
        resumed_from = None if isinstance(resume, dict) else Path(resume)
    seed = 0 if seed is None else seed
    if optim is None and state is not None and "optim" in state:
        optim = OptimConfig.from_dict(state["optim"])
    optim = optim or OptimConfig(name=train.optimizer, lr=DEFAULT_LR)
    lr = lr if lr is not None else float((state or {}).get("lr", optim.lr))
    optim = replace(optim, lr=lr)
    done_before = int(state["executor"]["step"]) if state is not None else 0
    if optim.total_steps is None:       # a schedule ends with this run (a resumed run: counting its earlier steps)
        optim = replace(optim, total_steps=done_before + steps)
    elif optim.schedule != "constant" and done_before + steps > optim.total_steps:
        raise InputError(f"the checkpoint's {optim.schedule} lr schedule reaches 0 at step {optim.total_steps}: "
                         f"resume with at most --steps {optim.total_steps - done_before}, or give --lr-schedule "
                         f"again to stretch it to this run's end")
    if hf is not None and train.seq_len > hf.max_seq_len:
        raise InputError(f"--seq {train.seq_len} exceeds {spec.name}'s sliding attention window ({hf.max_seq_len}): "
                         f"the executor's blocks attend causally without a window mask")
    continues = resumed_from is not None and save_dir is not None and \
        Path(os.path.realpath(resumed_from)) == Path(os.path.realpath(save_dir))
    if not str(device).startswith("cuda"):
        # The CPU standing in for the GPU holds every tier in this machine's memory: the model's
        # state and what one micro-batch saves for backward must fit what is available now, or
        # the OOM killer, not an error, ends the run (a tiny model at batch 100,000 held 18 GB).
        need, available = step_bytes(spec, plan), available_memory_bytes()
        if available is not None and need > available:
            raise InputError(f"batch {plan.train.batch} x seq {plan.train.seq_len}: the model's state and one "
                             f"micro-batch's saved activations need at least {need / 2**30:,.1f} GiB, more "
                             f"than the {available / 2**30:,.1f} GiB of memory available on this machine")
    torch.manual_seed(seed)          # any random init and the dropout masks follow the seed
    layers = hf.build_all() if hf is not None else build_model(spec, seed)
    # The temp offload directory is made (and removed, whatever happens) here, not by the Executor,
    # so a failure while it is being built (a full disk writing the first weights) cannot leak it.
    tmpdir = None
    if offload_dir is None and any("ssd" in (lp.params, lp.optimizer, lp.activations) for lp in plan.layers):
        tmpdir = offload_dir = tempfile.mkdtemp(prefix="tiertune-offload-")
    ex = None
    try:
        ex = Executor(layers, spec, plan, device=device, gpu_mem_bytes=gpu_mem_bytes, offload_dir=offload_dir,
                      optim=optim)
        if state is not None:
            ex.load_state_dict(state["executor"])
        stream = dataset.batches(train.batch * train.grad_accum, train.seq_len, seed, data_layout)
        for _ in range(ex.step_no):                 # the batches the resumed run already saw
            next(stream)
        from tqdm import tqdm

        def save() -> None:
            from tiertune.executor.checkpoint import save_rotating
            nonlocal continues
            executor_state = ex.state_dict()
            bad = non_finite(executor_state)
            if bad:
                raise InputError(f"step {ex.step_no}: non-finite values in the model or optimizer state "
                                 f"(executor{bad}); stopped without saving it, earlier checkpoints in {save_dir} kept")
            save_rotating(save_dir, {"model": spec.name, "seed": seed, "lr": lr, "data_sha256": data_sha,
                                     "optim": optim.to_state(),
                                     "source": str(hf.dir.resolve()) if hf is not None else None,
                                     "plan": plan.to_dict(), "executor": executor_state},
                          ex.step_no, keep, continues=continues)
            continues = True

        losses: list[float] = []
        times: list[float] = []
        tokens = train.batch * train.grad_accum * train.seq_len
        # One micro-batch's fp32 logits alone must fit host memory: a larger request is not an
        # allocation error but, under the kernel's overcommit, the process killed by the OOM killer.
        logits_bytes = train.batch * train.seq_len * spec.vocab_size * 4
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if logits_bytes > host_bytes:
            raise InputError(f"batch {train.batch} x seq {train.seq_len}: one micro-batch's logits need "
                             f"{logits_bytes / 2**30:,.1f} GiB, more than this machine's "
                             f"{host_bytes / 2**30:,.1f} GiB of memory")
        bar = tqdm(range(steps), desc=f"execute {spec.name}", unit="step", file=sys.stderr,
                   disable=None if progress else True, leave=progress)
        saved_at = None
        for _ in bar:
            t = time.perf_counter()
            try:
                tk, tg, _ = next(stream)           # right padding: causal layers need no mask
                t = time.perf_counter()
                losses.append(ex.step(tk, tg))
            except (MemoryError, RuntimeError) as exc:
                if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
                    raise
                raise InputError(f"step {ex.step_no + 1}: out of host memory for batch {train.batch} x seq "
                                 f"{train.seq_len} x grad_accum {train.grad_accum}: {str(exc).splitlines()[0]}") from None
            times.append(time.perf_counter() - t)
            if not math.isfinite(losses[-1]):
                kept = f"; earlier checkpoints in {save_dir} kept" if save_dir else ""
                raise InputError(f"step {ex.step_no}: loss is {losses[-1]} (lower --lr?); stopped{kept}")
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / times[-1]:,.0f}")
            if save_dir and save_every and ex.step_no % save_every == 0:
                save()
                saved_at = ex.step_no
        ex.synchronize()
        iteration_s = steady_median(times)
        trace = ex.trace()
        if save_dir and saved_at != ex.step_no:
            save()
        peak = ex.peak_bytes()
    finally:
        if ex is not None:
            ex.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return RunResult(losses=losses, step_times=times, iteration_s=iteration_s,
                     tokens_per_s=tokens / iteration_s if iteration_s > 0 else None, peak_bytes=peak,
                     trace=trace, steps=ex.step_no, seed=seed, lr=lr, budget_bytes=gpu_mem_bytes,
                     optim=optim)


def step_bytes(spec: ModelSpec, plan: Plan) -> int:
    """A floor on the memory one step holds when every tier is this machine's memory: weights,
    gradients and optimizer state, the activations kept for backward (a checkpoint where the layer
    is recomputed) and, of the layers that do not keep them, the largest one's activations back for
    its own backward."""
    costs = layer_costs(spec, plan.train)
    state = sum(c.weight_bytes + c.grad_bytes + c.optim_bytes for c in costs)
    kept = sum(c.act_bytes if lp.activations == "keep" else c.act_checkpoint_bytes if lp.activations == "recompute"
               else 0 for c, lp in zip(costs, plan.layers))
    return state + kept + max((c.act_bytes for c, lp in zip(costs, plan.layers) if lp.activations != "keep"), default=0)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
