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

from tiertune.commands.common import (COUNT, GIB, LEARNING_RATE, SEED, THREADS, THREADS_HELP, number, print_json,
                                      set_compute_threads)
from tiertune.errors import InputError
from tiertune.executor.lr_schedule import SCHEDULES
from tiertune.limits import MAX_COUNT
from tiertune.planner.pick import DEFAULT_HARDWARE, policy_plan

if TYPE_CHECKING:
    from tiertune.hardware import HardwareProfile
    from tiertune.schedule import Plan
    from tiertune.workload import ModelSpec

GiB = 1 << 30
HF_DEFAULT_LR = 2e-5        # a usual full fine-tuning lr for pretrained LLMs (transformers' default is 5e-5)
WARMUP = number(int, 0, MAX_COUNT)
UNIT = number(float, 0, 1)                        # betas, dropout, weight decay: [0, 1]
EPS = number(float, 0, 1, low_open=True)
CLIP = number(float, 0, 1e9, low_open=True)


def register(sub) -> None:
    p = sub.add_parser("execute", help="train for real under a plan and record a measured trace")
    p.add_argument("--model", required=True, help="model preset name or a directory with an HF model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan JSON (tiertune.plan/1)")
    src.add_argument("--policy", help="a named policy (gpu-only, checkpoint, zero-offload, fuyou, megatrain, ...)")
    p.add_argument("--steps", type=COUNT, required=True, help="optimizer steps to run now")
    p.add_argument("--data", default=None,
                   help="token ids (.bin as nanoGPT writes them, .npy) or text (.txt, .jsonl with \"text\" or "
                        "\"prompt\"/\"response\") tokenized with the model directory's tokenizer; built-in "
                        "models read text as bytes (default: the shipped demo text)")
    p.add_argument("--data-dtype", default=None, metavar="uint16|uint32",
                   help="ids of a .bin file (default uint16, uint32 when the vocabulary needs it)")
    p.add_argument("--data-layout", default="packed", metavar="packed|padded",
                   help="packed: random windows of the documents joined by EOS; padded: one document "
                        "per row, right-padded, masked (default packed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--gpu-mem", type=GIB, default=None, metavar="GiB", help="device memory budget")
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, help=f"profile a --policy plans for (default {DEFAULT_HARDWARE})")
    p.add_argument("--offload-dir", default=None, help="directory for SSD-homed state (default: a temporary one)")
    p.add_argument("--trace", default=None, metavar="OUT", help="write the measured trace (.json/.parquet/.csv)")
    p.add_argument("--save-dir", default=None,
                   help="write checkpoints here (at the end, and every --save-every steps); a new or empty "
                        "directory, or one tiertune saved into before")
    p.add_argument("--save-every", type=COUNT, default=None, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--keep", type=COUNT, default=2, metavar="K", help="checkpoints kept in --save-dir (default 2)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint (its seed, batch, seq, dtype and text; a different one is refused)")
    p.add_argument("--batch", type=COUNT, default=None, help="micro-batch size (default 4, or the plan's)")
    p.add_argument("--seq", type=COUNT, default=None, help="sequence length (default 64, or the plan's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--lr", type=LEARNING_RATE, default=None,
                   help=f"peak learning rate (default {HF_DEFAULT_LR:g} to fine-tune an HF model, 1e-3 for a "
                        f"built-in one trained from scratch; a resumed run: the checkpoint's)")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="after warm-up: constant (default), or linear / cosine decay to 0 at the run's last step")
    p.add_argument("--warmup", type=WARMUP, default=None, metavar="STEPS", help="linear lr warm-up from 0 (default 0)")
    p.add_argument("--weight-decay", type=UNIT, default=None,
                   help="AdamW decoupled weight decay of matrices and embeddings (default 0.01; norms and biases "
                        "are never decayed); AdaLomo / SGD: default 0")
    p.add_argument("--betas", type=UNIT, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW betas (default 0.9 0.999)")
    p.add_argument("--eps", type=EPS, default=None, help="AdamW eps (default 1e-8)")
    p.add_argument("--grad-accum", type=COUNT, default=None, help="micro-batches per optimizer step (default: the plan's)")
    p.add_argument("--clip", type=CLIP, default=None, metavar="NORM",
                   help="clip the global gradient norm (needs update 'after' on every layer)")
    p.add_argument("--dropout", type=UNIT, default=None,
                   help="dropout probability of an HF model's layers (default: its config.json)")
    p.add_argument("--seed", type=SEED, default=None,
                   help="seed of the initial weights (built-in models), dropout masks and the data order (default 0)")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def plan_for(spec: "ModelSpec", hw: "HardwareProfile | None", *, plan_path: str | None, policy: str | None,
             batch: int | None = None, seq: int | None = None, dtype: str | None = None,
             grad_accum: int | None = None, grad_clip: float | None = None) -> "Plan":
    """The plan to run: a plan file (its training settings overridden by batch/seq/dtype/grad_accum/
    grad_clip where given) or the named policy made for `hw` (batch 4, seq 64, AdamW unless given)."""
    from tiertune.schedule import Plan

    if plan_path:
        from tiertune.commands.common import check_plan_model
        plan = Plan.load(plan_path)
        check_plan_model(plan, spec, plan_path)
        changes = {k: v for k, v in (("batch", batch), ("seq_len", seq), ("dtype", dtype)) if v}
    elif not policy or hw is None:
        raise InputError("give --plan, or --policy with a hardware profile")
    else:
        plan, changes = policy_plan(spec, hw, policy, batch, seq, dtype), {}
    changes.update((k, v) for k, v in (("grad_accum", grad_accum), ("grad_clip", grad_clip)) if v)
    return plan.replace(train=plan.train.replace(**changes)) if changes else plan


def optim_for(args: argparse.Namespace, optimizer: str, hf: bool):
    """The optimizer settings the flags give (None: a resumed run given none keeps the checkpoint's)."""
    from tiertune.executor.updates import OptimConfig
    given = {k: v for k, v in (("weight_decay", args.weight_decay), ("eps", args.eps),
                               ("betas", tuple(args.betas) if args.betas else None),
                               ("schedule", args.lr_schedule), ("warmup_steps", args.warmup)) if v is not None}
    if args.resume and not given:
        return None
    if optimizer != "adamw":
        given.setdefault("weight_decay", 0.0)
    return OptimConfig(name=optimizer, lr=HF_DEFAULT_LR if hf else 1e-3, decay_vectors=False, **given)


def _resume_defaults(args: argparse.Namespace):
    """The checkpoint to resume (loaded once, before any work) and the --batch/--seq/--dtype it was
    trained with, for flags not given (a resumed run keeps them; train_plan refuses others)."""
    if not args.resume:
        return None
    from tiertune.executor.checkpoint import load_checkpoint
    state = load_checkpoint(args.resume)
    train = ((state.get("plan") or {}).get("train") or {}) if isinstance(state, dict) else {}
    if not args.plan:
        for flag, key in (("batch", "batch"), ("seq", "seq_len"), ("dtype", "dtype")):
            if getattr(args, flag) is None and key in train:
                setattr(args, flag, train[key])
    return state


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tiertune.fileio import check_output
    if args.trace:
        check_output(args.trace, "--trace")
        if Path(args.trace).suffix not in (".json", ".parquet", ".csv"):
            raise InputError(f"--trace must end in .json, .parquet or .csv: {args.trace}")
    if args.save_dir:
        from tiertune.executor.checkpoint import check_save_dir
        check_save_dir(args.save_dir)
    if args.save_every and not args.save_dir:
        raise InputError("--save-every needs --save-dir")
    if args.betas and not all(b < 1 for b in args.betas):
        raise InputError(f"--betas must be below 1, got {args.betas[0]:g} {args.betas[1]:g}")
    if args.dropout is not None and args.dropout >= 1:
        raise InputError(f"--dropout must be below 1, got {args.dropout:g}")
    resume_state = _resume_defaults(args)
    set_compute_threads(args.threads, args.device)

    from tiertune.hardware import load_hardware
    from tiertune.workload import load_model

    hf = None
    if Path(args.model).is_dir():
        from tiertune.executor.hf import HFSource
        hf = HFSource(args.model, dropout=args.dropout)
        spec = hf.spec
    else:
        if args.dropout:
            raise InputError("--dropout applies to HF models; the built-in models have no dropout")
        spec = load_model(args.model)
    hw = load_hardware(args.hardware).with_gpu_mem(args.gpu_mem) if args.policy else None
    plan = plan_for(spec, hw, plan_path=args.plan, policy=args.policy, batch=args.batch, seq=args.seq,
                    dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
                    grad_accum=args.grad_accum, grad_clip=args.clip)
    train = plan.train
    from tiertune.executor.run import train_plan

    budget = int(args.gpu_mem * GiB) if args.gpu_mem is not None else None
    res = train_plan(hf if hf is not None else spec, plan, args.steps, device=args.device, gpu_mem_bytes=budget,
                     offload_dir=args.offload_dir, data=args.data, lr=args.lr, seed=args.seed,
                     save_dir=args.save_dir, resume=resume_state if args.resume else None,
                     save_every=args.save_every, keep=args.keep,
                     data_dtype=args.data_dtype, data_layout=args.data_layout,
                     optim=optim_for(args, train.optimizer, hf is not None))
    trace = None
    if args.trace:
        res.trace.save(args.trace)
        trace = args.trace
    losses, iteration_s, peak = res.losses, res.iteration_s, res.peak_bytes
    out = {"model": spec.name, "plan": plan.provenance.get("policy", args.plan), "device": args.device,
           "steps": res.steps, "losses": losses, "iteration_s": iteration_s,
           "tokens_per_s": res.tokens_per_s, "peak_bytes": peak,
           "budget_bytes": budget, "trace": trace, "seed": res.seed, "lr": res.lr,
           "settings": {**res.optim.to_dict(), "batch": train.batch, "seq_len": train.seq_len,
                        "grad_accum": train.grad_accum, "grad_clip": train.grad_clip, "dtype": train.dtype,
                        "dropout": hf.dropout if hf is not None else 0.0, "seed": res.seed}}
    saved_lr = resume_state.get("lr") if isinstance(resume_state, dict) else None
    if saved_lr is not None and saved_lr != res.lr:
        out["changed"] = {"lr": [saved_lr, res.lr]}
    if args.json:
        print_json(out)
        return 0
    o = res.optim
    print(f"{spec.name}, plan {out['plan']}: {len(losses)} steps (now at step {res.steps}), "
          f"batch {train.batch} x seq {train.seq_len} x accum {train.grad_accum}, {train.dtype}, on {args.device}")
    print(f"  optimizer  {'AdaLomo' if o.name == 'adalomo' else o.name}, lr {o.lr:g} ({o.schedule}, warm-up "
          f"{o.warmup_steps}), weight decay {o.weight_decay:g}" + (f", clip {train.grad_clip:g}" if train.grad_clip else ""))
    print(f"  loss       {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  iteration  {iteration_s * 1e3:.1f} ms   {out['tokens_per_s']:,.0f} tokens/s")
    print("  peak       " + "   ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in peak.items())
          + (f"   (device budget {budget / 2**20:.1f} MiB)" if budget else ""))
    if "changed" in out:
        print(f"  lr changed on resume: {saved_lr:g} -> {res.lr:g}")
    if trace:
        print(f"  trace written to {trace}")
    if args.save_dir:
        print(f"  checkpoint written to {args.save_dir}")
    return 0
