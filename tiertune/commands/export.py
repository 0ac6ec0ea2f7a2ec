"""`tiertune export CHECKPOINT -o DIR`: a checkpoint of a Hugging Face model back in HF form.

DIR then loads with `AutoModelForCausalLM.from_pretrained(DIR)`: the trained weights in the
source model's dtype (or --dtype), tied where the source was, config and tokenizer files copied
from the source directory the checkpoint was trained from (executor/export.py).
"""

from __future__ import annotations

import argparse

from tiertune.commands.common import print_json

DTYPES = ("fp32", "bf16", "fp16")


def register(sub) -> None:
    p = sub.add_parser("export", help="write an `execute --save-dir` checkpoint of an HF model as an HF model directory")
    p.add_argument("checkpoint", help="checkpoint directory written by `tiertune execute --save-dir`")
    p.add_argument("-o", "--out", required=True, help="output directory: new, empty, or an earlier export (replaced)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default: the source model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tiertune.executor.export import export
    from tiertune.executor.runtime import DTYPES as TORCH_DTYPES

    out = export(args.checkpoint, args.out, TORCH_DTYPES[args.dtype] if args.dtype else None)
    if args.json:
        print_json({"checkpoint": args.checkpoint, "out": str(out)})
    else:
        print(f"HF model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
