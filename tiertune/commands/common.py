"""Arguments and loading shared by several verbs: model, hardware, training settings, plan."""

from __future__ import annotations

import argparse
import json
import sys

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile, load_hardware
from tiertune.schedule import Plan
from tiertune.workload import ModelSpec, TrainSpec, load_model


def add_workload_args(p: argparse.ArgumentParser, hardware: bool = True, default_seq: int | None = None) -> None:
    p.add_argument("--model", required=True, help="model preset name or a directory with an HF config.json")
    if hardware:
        p.add_argument("--hardware", required=True, help="hardware preset name or a profile .toml")
        p.add_argument("--gpu-mem", type=float, default=None, metavar="GiB", help="override the GPU memory budget")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (sequences)")
    p.add_argument("--seq", type=int, default=default_seq, help="sequence length")
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


def default_train(model: ModelSpec) -> TrainSpec:
    """Defaults a user of the field would pick: bf16, AdamW, the model's context up to 2048."""
    return TrainSpec(batch=1, seq_len=min(2048, model.max_seq_len), dtype="bf16", optimizer="adamw")


def train_from_plan(plan: Plan, args: argparse.Namespace) -> TrainSpec:
    """A plan carries its training settings; command-line flags override them."""
    changes = {k: v for k, v in (("batch", getattr(args, "batch", None)), ("seq_len", getattr(args, "seq", None)),
                                 ("dtype", getattr(args, "dtype", None)),
                                 ("optimizer", getattr(args, "optimizer", None))) if v is not None}
    return plan.train.replace(**changes)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, default=float)
    sys.stdout.write("\n")
