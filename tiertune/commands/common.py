"""Arguments and loading shared by several verbs: model, hardware, training settings, plan."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from tiertune.errors import InputError
from tiertune.fileio import strict_json
from tiertune.hardware import HardwareProfile, load_hardware
from tiertune.limits import (MAX_COUNT, MAX_GIB, MAX_ITERATIONS, MAX_LEARNING_RATE, MAX_SECONDS, MAX_SEED,
                             MAX_THREADS)
from tiertune.schedule import Plan
from tiertune.workload import ModelSpec, TrainSpec, default_train, load_model


def number(kind: type, low: float | None = None, high: float | None = None, *,
           low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type`: the text as a finite int (kind=int) or float in [low, high] (low
    excluded with low_open). Anything else is argparse's one-line error, exit 2."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low:.10g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high:.10g}")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


COUNT = number(int, 1, MAX_COUNT)                  # a positive count
ITERATIONS = number(int, 1, MAX_ITERATIONS)
THREADS = number(int, 1, MAX_THREADS)
SEED = number(int, 0, MAX_SEED)
GIB = number(float, 0, MAX_GIB, low_open=True)     # a positive memory size
SECONDS = number(float, 0, MAX_SECONDS, low_open=True)
FRACTION = number(float, 0, 1, low_open=True)      # (0, 1]
LEARNING_RATE = number(float, 0, MAX_LEARNING_RATE, low_open=True)


THREADS_HELP = ("torch compute threads (default 1 on cpu: the main thread is the GPU, the copy and optimizer "
                "threads get the other cores; torch's default on cuda). calibrate, execute and validate must "
                "measure and run alike: a profile measured on another count mispredicts every task")


def set_compute_threads(threads: int | None, device: str | None) -> None:
    """torch's intra-op thread count for a command that times or runs work: `threads`, else 1 when
    the CPU stands in for the GPU (device "cpu", or none given and torch sees no GPU), else torch's
    default. One rule for calibrate, execute and validate, so a profile is measured the way the
    executor then runs."""
    import torch

    if threads is None and (device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())):
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def add_workload_args(p: argparse.ArgumentParser, hardware: bool = True, default_seq: int | None = None) -> None:
    p.add_argument("--model", required=True, help="model preset name or a directory with an HF config.json")
    if hardware:
        p.add_argument("--hardware", required=True, help="hardware preset name or a profile .toml")
        p.add_argument("--gpu-mem", type=GIB, default=None, metavar="GiB", help="override the GPU memory budget")
    p.add_argument("--batch", type=COUNT, default=None, help="micro-batch size (sequences)")
    p.add_argument("--seq", type=COUNT, default=default_seq, help="sequence length")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--optimizer", choices=("adamw", "sgd", "adalomo"), default=None)


def load_workload(args: argparse.Namespace) -> tuple[ModelSpec, TrainSpec, HardwareProfile | None]:
    model = load_model(args.model)
    hw = None
    if getattr(args, "hardware", None):
        hw = load_hardware(args.hardware).with_gpu_mem(getattr(args, "gpu_mem", None))
    train = default_train(model)
    changes = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq), ("dtype", args.dtype),
                                 ("optimizer", args.optimizer)) if v is not None}
    for k, v in changes.items():
        if isinstance(v, int) and v <= 0:
            raise InputError(f"--{'seq' if k == 'seq_len' else k} must be positive, got {v}")
    return model, train.replace(**changes), hw


def train_from_plan(plan: Plan, args: argparse.Namespace) -> TrainSpec:
    """A plan carries its training settings; command-line flags override them."""
    changes = {k: v for k, v in (("batch", getattr(args, "batch", None)), ("seq_len", getattr(args, "seq", None)),
                                 ("dtype", getattr(args, "dtype", None)),
                                 ("optimizer", getattr(args, "optimizer", None))) if v is not None}
    return plan.train.replace(**changes)


def model_identity(spec: ModelSpec) -> dict:
    """What makes a plan fit a model: every shape field of its spec (the name may differ: a preset
    and its config directory are the same model)."""
    return {k: v for k, v in spec.to_dict().items() if k != "name"}


def _describe(name: str, ident: dict) -> str:
    return (f"{name} ({ident.get('arch')}, {ident.get('n_layers')} blocks, hidden {ident.get('hidden')}, "
            f"heads {ident.get('n_heads')}/{ident.get('n_kv_heads')}, ffn {ident.get('ffn_hidden')}, "
            f"vocab {ident.get('vocab_size')})")


def stamp_model(plan: Plan, spec: ModelSpec) -> Plan:
    """The plan with the identity of the model it was made for, saved in its provenance."""
    return plan.replace(provenance={**plan.provenance, "model_identity": model_identity(spec)})


def check_plan_model(plan: Plan, spec: ModelSpec, where: str) -> None:
    """Refuse a plan made for another model, naming both. A plan file that records no model
    identity (written before plans carried one) is checked by its layer count only."""
    ident = plan.provenance.get("model_identity")
    if isinstance(ident, dict):
        mine = model_identity(spec)
        if {k: ident.get(k) for k in mine} != mine:
            raise InputError(f"plan {where} was made for {_describe(plan.model, ident)}, "
                             f"not {_describe(spec.name, mine)}")
    if plan.n_layers != spec.n_layers + 2:
        raise InputError(f"plan {where} has {plan.n_layers} layers (made for {plan.model!r}) but "
                         f"{spec.name!r} has {spec.n_layers + 2} (embed + blocks + head)")


def print_json(obj) -> None:
    """Strict JSON on stdout: a non-finite number is null, its reason in `null_because`."""
    sys.stdout.write(strict_json(obj) + "\n")
