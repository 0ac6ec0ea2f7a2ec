"""`tiertune execute`: train for real under a plan (a file or a named policy), record a measured trace.

The plan's policy is made for a hardware profile (`--hardware`, default `lsp-4090`: a 24 GB
consumer card, the kind these policies were written for); `--gpu-mem` both shrinks that profile
for the policy and is the byte budget the executor enforces on the device. Without `--gpu-mem`
the device is unbudgeted on a CPU and the whole card on CUDA. `--steps` counts the steps of this
invocation: `--resume DIR --steps 3` continues a saved run with its next three steps, on the same
data as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tiertune.commands.common import print_json
from tiertune.errors import InputError

GiB = 1 << 30
DEFAULT_HARDWARE = "lsp-4090"


def register(sub) -> None:
    p = sub.add_parser("execute", help="train for real under a plan and record a measured trace")
    p.add_argument("--model", required=True, help="model preset name or a directory with an HF model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan JSON (tiertune.plan/1)")
    src.add_argument("--policy", help="a named policy (gpu-only, checkpoint, zero-offload, fuyou, megatrain, ...)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to run now")
    p.add_argument("--data", default=None, help="training text file (default: the shipped demo text)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB", help="device memory budget")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help=f"profile a --policy plans for (default {DEFAULT_HARDWARE})")
    p.add_argument("--offload-dir", default=None, help="directory for SSD-homed state (default: a temporary one)")
    p.add_argument("--trace", default=None, metavar="OUT", help="write the measured trace (.json/.parquet/.csv)")
    p.add_argument("--save-dir", default=None, help="write a checkpoint here at the end")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue from a checkpoint")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 4, or the plan's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 64, or the plan's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the data order")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _positive(name: str, v) -> None:
    if v is not None and not v > 0:
        raise InputError(f"--{name} must be positive, got {v}")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch", "seq", "lr", "gpu_mem"):
        _positive(name.replace("_", "-"), getattr(args, name))
    from pathlib import Path

    from tiertune.hardware import load_hardware
    from tiertune.schedule import Plan
    from tiertune.workload import TrainSpec, load_model

    hf = None
    if Path(args.model).is_dir():
        from tiertune.executor.hf import HFSource
        hf = HFSource(args.model)
        spec = hf.spec
    else:
        spec = load_model(args.model)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.plan:
        plan = Plan.load(args.plan)
        plan.check_model(spec.n_layers + 2)
        changes = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq), ("dtype", args.dtype)) if v}
        if changes:
            plan = plan.replace(train=plan.train.replace(**changes))
    else:
        from tiertune.planner.policies import make_policy
        train = TrainSpec(batch=args.batch or 4, seq_len=args.seq or 64, dtype=dtype, optimizer="adamw")
        hw = load_hardware(args.hardware).with_gpu_mem(args.gpu_mem)
        plan = make_policy(args.policy, spec, train, hw)
    train = plan.train
    if train.seq_len > spec.max_seq_len:
        raise InputError(f"--seq {train.seq_len} exceeds {spec.name}'s context ({spec.max_seq_len})")

    import torch

    from tiertune.executor.data import batches, load_text
    from tiertune.executor.models import build_model
    from tiertune.executor.runtime import Executor
    from tiertune.executor.updates import OptimConfig

    text = load_text(args.data)
    state = None
    if args.resume:
        from tiertune.executor.checkpoint import load_checkpoint
        state = load_checkpoint(args.resume)
        if not isinstance(state, dict) or state.get("model") != spec.name or "executor" not in state:
            raise InputError(f"checkpoint {args.resume} is not a tiertune execute checkpoint of {spec.name!r}")
        args.seed = int(state.get("seed", args.seed))
    lr = args.lr if args.lr is not None else (state or {}).get("lr", 1e-3)
    torch.manual_seed(args.seed)
    layers = hf.build_all() if hf is not None else build_model(spec, args.seed)
    budget = int(args.gpu_mem * GiB) if args.gpu_mem is not None else None
    ex = Executor(layers, spec, plan, device=args.device, gpu_mem_bytes=budget, offload_dir=args.offload_dir,
                  optim=OptimConfig(name=train.optimizer, lr=lr))
    try:
        if state is not None:
            ex.load_state_dict(state["executor"])
        data = batches(text, train.batch * train.grad_accum, train.seq_len, args.seed)
        for _ in range(ex.step_no):                 # the batches the resumed run already saw
            next(data)
        from tqdm import tqdm

        losses, times = [], []
        tokens = train.batch * train.grad_accum * train.seq_len
        bar = tqdm(range(args.steps), desc=f"execute {spec.name}", unit="step", file=sys.stderr, disable=None)
        for _ in bar:
            tk, tg = next(data)
            t = time.perf_counter()
            losses.append(ex.step(tk, tg))
            times.append(time.perf_counter() - t)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / times[-1]:,.0f}")
        ex.synchronize()
        steady = times[1:] or times
        iteration_s = statistics.median(steady)
        trace = None
        if args.trace:
            ex.trace().save(args.trace)
            trace = args.trace
        if args.save_dir:
            from tiertune.executor.checkpoint import save_checkpoint
            save_checkpoint(args.save_dir, {"model": spec.name, "seed": args.seed, "lr": lr,
                                            "plan": plan.to_dict(), "executor": ex.state_dict()})
        peak = ex.peak_bytes()
    finally:
        ex.close()
    out = {"model": spec.name, "plan": plan.provenance.get("policy", args.plan), "device": args.device,
           "steps": ex.step_no, "losses": losses, "iteration_s": iteration_s,
           "tokens_per_s": tokens / iteration_s if iteration_s > 0 else None, "peak_bytes": peak,
           "budget_bytes": budget, "trace": trace}
    if args.json:
        print_json(out)
        return 0
    print(f"{spec.name}, plan {out['plan']}: {len(losses)} steps (now at step {ex.step_no}), "
          f"batch {train.batch} x seq {train.seq_len}, {train.optimizer}, {train.dtype}, on {args.device}")
    print(f"  loss       {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  iteration  {iteration_s * 1e3:.1f} ms   {out['tokens_per_s']:,.0f} tokens/s")
    print("  peak       " + "   ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peak.items())
          + (f"   (device budget {budget / 2**20:.1f} MiB)" if budget else ""))
    if trace:
        print(f"  trace written to {trace}")
    if args.save_dir:
        print(f"  checkpoint written to {args.save_dir}")
    return 0
