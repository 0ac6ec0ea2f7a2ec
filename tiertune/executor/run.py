"""`train_plan`: train a model for real under a Plan and return losses, timings and the measured trace.

The training loop shared by `tiertune execute` (one run from the command line) and `tiertune
validate` / benchmarks/bench_fidelity.py (runs to compare with the simulator): data, the
Executor, the timed steps, an optional checkpoint to save or resume from.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tiertune.errors import InputError
from tiertune.schedule import Plan
from tiertune.workload import ModelSpec

if TYPE_CHECKING:
    from tiertune.executor.hf import HFSource
    from tiertune.traces.trace import Trace


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
    extra: dict = field(default_factory=dict)


def steady_median(times: list[float]) -> float:
    """Median step time with the first (warm-up: allocations, first-touch of buffers) left out."""
    steady = times[1:] or times
    return statistics.median(steady)


def train_plan(spec_or_source: "ModelSpec | HFSource", plan: Plan, steps: int, *, device: str = "cpu",
               gpu_mem_bytes: int | None = None, offload_dir: str | Path | None = None, data: str | None = None,
               lr: float | None = None, seed: int = 0, progress: bool = True, save_dir: str | Path | None = None,
               resume: str | Path | None = None) -> RunResult:
    """Run `steps` optimizer steps of `plan` on `device`.

    `spec_or_source`: a ModelSpec (the built-in model of that shape, initialised from `seed`) or an
    HFSource (a local Hugging Face model's weights). `data`: a text file (default: the shipped demo
    text). `lr`: default the resumed checkpoint's, else 1e-3. `resume`: a checkpoint directory
    written by an earlier `save_dir`; the run continues on the data an uninterrupted run would see.
    """
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {steps!r}")
    import torch

    from tiertune.executor.data import batches, load_text
    from tiertune.executor.models import build_model
    from tiertune.executor.runtime import Executor
    from tiertune.executor.updates import OptimConfig

    hf = None if isinstance(spec_or_source, ModelSpec) else spec_or_source
    spec: ModelSpec = spec_or_source if hf is None else hf.spec
    train = plan.train
    if train.seq_len > spec.max_seq_len:
        raise InputError(f"--seq {train.seq_len} exceeds {spec.name}'s context ({spec.max_seq_len})")
    text = load_text(data)
    state = None
    if resume:
        from tiertune.executor.checkpoint import load_checkpoint
        state = load_checkpoint(resume)
        if not isinstance(state, dict) or state.get("model") != spec.name or "executor" not in state:
            raise InputError(f"checkpoint {resume} is not a tiertune execute checkpoint of {spec.name!r}")
        seed = int(state.get("seed", seed))
    lr = lr if lr is not None else float((state or {}).get("lr", 1e-3))
    torch.manual_seed(seed)
    layers = hf.build_all() if hf is not None else build_model(spec, seed)
    ex = Executor(layers, spec, plan, device=device, gpu_mem_bytes=gpu_mem_bytes, offload_dir=offload_dir,
                  optim=OptimConfig(name=train.optimizer, lr=lr))
    try:
        if state is not None:
            ex.load_state_dict(state["executor"])
        stream = batches(text, train.batch * train.grad_accum, train.seq_len, seed)
        for _ in range(ex.step_no):                 # the batches the resumed run already saw
            next(stream)
        from tqdm import tqdm

        losses: list[float] = []
        times: list[float] = []
        tokens = train.batch * train.grad_accum * train.seq_len
        bar = tqdm(range(steps), desc=f"execute {spec.name}", unit="step", file=sys.stderr,
                   disable=None if progress else True, leave=progress)
        for _ in bar:
            tk, tg = next(stream)
            t = time.perf_counter()
            losses.append(ex.step(tk, tg))
            times.append(time.perf_counter() - t)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / times[-1]:,.0f}")
        ex.synchronize()
        iteration_s = steady_median(times)
        trace = ex.trace()
        if save_dir:
            from tiertune.executor.checkpoint import save_checkpoint
            save_checkpoint(save_dir, {"model": spec.name, "seed": seed, "lr": lr,
                                       "plan": plan.to_dict(), "executor": ex.state_dict()})
        peak = ex.peak_bytes()
    finally:
        ex.close()
    return RunResult(losses=losses, step_times=times, iteration_s=iteration_s,
                     tokens_per_s=tokens / iteration_s if iteration_s > 0 else None, peak_bytes=peak,
                     trace=trace, steps=ex.step_no, seed=seed, lr=lr, budget_bytes=gpu_mem_bytes)
