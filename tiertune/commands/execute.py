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
from typing import TYPE_CHECKING

from tiertune.commands.common import print_json
from tiertune.errors import InputError

if TYPE_CHECKING:
    from tiertune.hardware import HardwareProfile
    from tiertune.schedule import Plan
    from tiertune.workload import ModelSpec

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


def plan_for(spec: "ModelSpec", hw: "HardwareProfile | None", *, plan_path: str | None, policy: str | None,
             batch: int | None = None, seq: int | None = None, dtype: str | None = None) -> "Plan":
    """The plan to run: a plan file (its training settings overridden by batch/seq/dtype where
    given) or the named policy made for `hw` (batch 4, seq 64, AdamW unless given)."""
    from tiertune.schedule import Plan
    from tiertune.workload import TrainSpec

    if plan_path:
        plan = Plan.load(plan_path)
        plan.check_model(spec.n_layers + 2)
        changes = {k: v for k, v in (("batch", batch), ("seq_len", seq), ("dtype", dtype)) if v}
        return plan.replace(train=plan.train.replace(**changes)) if changes else plan
    if not policy or hw is None:
        raise InputError("give --plan, or --policy with a hardware profile")
    from tiertune.planner.policies import make_policy
    train = TrainSpec(batch=batch or 4, seq_len=seq or 64, dtype=dtype or "fp32", optimizer="adamw")
    return make_policy(policy, spec, train, hw)


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch", "seq", "lr", "gpu_mem"):
        _positive(name.replace("_", "-"), getattr(args, name))
    from pathlib import Path

    from tiertune.hardware import load_hardware
    from tiertune.workload import load_model

    hf = None
    if Path(args.model).is_dir():
        from tiertune.executor.hf import HFSource
        hf = HFSource(args.model)
        spec = hf.spec
    else:
        spec = load_model(args.model)
    hw = load_hardware(args.hardware).with_gpu_mem(args.gpu_mem) if args.policy else None
    plan = plan_for(spec, hw, plan_path=args.plan, policy=args.policy, batch=args.batch, seq=args.seq,
                    dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"))
    train = plan.train
    from tiertune.executor.run import train_plan

    budget = int(args.gpu_mem * GiB) if args.gpu_mem is not None else None
    res = train_plan(hf if hf is not None else spec, plan, args.steps, device=args.device, gpu_mem_bytes=budget,
                     offload_dir=args.offload_dir, data=args.data, lr=args.lr, seed=args.seed,
                     save_dir=args.save_dir, resume=args.resume)
    trace = None
    if args.trace:
        res.trace.save(args.trace)
        trace = args.trace
    losses, iteration_s, peak = res.losses, res.iteration_s, res.peak_bytes
    out = {"model": spec.name, "plan": plan.provenance.get("policy", args.plan), "device": args.device,
           "steps": res.steps, "losses": losses, "iteration_s": iteration_s,
           "tokens_per_s": res.tokens_per_s, "peak_bytes": peak,
           "budget_bytes": budget, "trace": trace}
    if args.json:
        print_json(out)
        return 0
    print(f"{spec.name}, plan {out['plan']}: {len(losses)} steps (now at step {res.steps}), "
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
