"""Benchmark: LSP-Offload gradient compression vs uncompressed CPU Adam, on the shipped text.

Fine-tunes a built-in byte-level model (tiertune.executor.models, default tiny-llama) on the demo
text (tiertune.executor.data): a starting checkpoint is pretrained with plain AdamW on the first 60%
of the training text, then fine-tuned on the other 40% for a fixed number of steps, once with full
gradients and once per LSP rank d (LSP-Offload targets fine-tuning, where updates are low rank;
from random init, rank-d updates are a much harsher restriction). It records validation loss,
the bytes that would cross PCIe each way, and the time per iteration. Writes
<out>/compression.csv (one row per run per evaluation point), <out>/summary.csv (one row per run)
and <out>/compression.png (validation loss vs step and vs wall time).

Offload-free emulation, by design: the executor runtime that runs a Plan with grad_rank layers on
a real GPU was not available when this was written, so this loop runs the LSP *math* on one
machine: every layer's gradient goes through LayerCompression exactly as the runtime would call
it (observe -> compress_grads on the "device" -> cpu_step on CPU tensors -> apply on the "device"),
and the uncompressed run is the same path with identity projectors (which equals torch AdamW,
see tests/test_compress.py). Bytes are what LayerCompression.bytes_on_wire says would cross PCIe
(fp32 elements), not measured copies; times are CPU wall times, including the projector refits.
Loss numbers are real. Every layer (embedding, blocks, head) gets the same grad_rank, as the
`lsp-offload` policy plans it.

    .venv/bin/python benchmarks/bench_compression.py --steps 200 --ranks 8 16
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import time
from pathlib import Path

import torch

from tiertune.executor.compress import LayerCompression
from tiertune.executor.data import batches, eval_batches, load_text, split
from tiertune.executor.models import build_model
from tiertune.workload import load_model


def forward_loss(layers: list[torch.nn.Module], tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = layers[0](tokens)
    for block in layers[1:-1]:
        x = block(x)
    return layers[-1](x, targets)


@torch.no_grad()
def evaluate(layers: list[torch.nn.Module], val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy over every validation target (batches weighted by their size)."""
    total, count = 0.0, 0
    for tokens, targets in val:
        total += forward_loss(layers, tokens, targets).item() * targets.numel()
        count += targets.numel()
    return total / count


def texts() -> tuple[bytes, bytes, bytes]:
    """(pretrain, fine-tune, validation): the first 60% of the training split, the rest, the last 10%."""
    train_text, val_text = split(load_text(None), 0.1)
    cut = int(len(train_text) * 0.6)
    return train_text[:cut], train_text[cut:], val_text


def pretrain(args: argparse.Namespace) -> list[dict]:
    """The starting checkpoint every run fine-tunes: plain torch AdamW on the pretraining text."""
    layers = build_model(load_model(args.model), seed=args.seed)
    params = [p for layer in layers for p in layer.parameters()]
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = batches(texts()[0], args.batch, args.seq, seed=args.seed + 1)
    for _ in range(args.pretrain_steps):
        opt.zero_grad(set_to_none=True)
        forward_loss(layers, *next(data)).backward()
        opt.step()
    return [copy.deepcopy(layer.state_dict()) for layer in layers]


def run(name: str, rank: int | None, start: list[dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Fine-tune one configuration from `start`; rank None: uncompressed (identity projectors = AdamW)."""
    layers = build_model(load_model(args.model), seed=args.seed)
    for layer, sd in zip(layers, start):
        layer.load_state_dict(sd)
    _, tune_text, val_text = texts()
    val = eval_batches(val_text, args.batch, args.seq)
    data = batches(tune_text, args.batch, args.seq, seed=args.seed)
    lr = args.lr if rank is None else args.lsp_lr or args.lr
    comps = []
    for i, layer in enumerate(layers):
        shapes = {k: tuple(p.shape) for k, p in layer.named_parameters()}
        # rank >= every dimension gives identity projectors: exactly uncompressed AdamW.
        d = rank if rank is not None else max(max(s) for s in shapes.values())
        comps.append(LayerCompression(shapes, rank=d, nnz_per_row=args.nnz, check_every=args.check_every,
                                      threshold=args.threshold, fit_samples=args.fit_samples, lr=lr,
                                      betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay,
                                      seed=args.seed + i, fit_steps=args.fit_steps, fit_lr=args.fit_lr))
    d2h = sum(c.bytes_on_wire()[0] for c in comps)
    h2d = sum(c.bytes_on_wire()[1] for c in comps)
    rows, wall, refits, errors = [], 0.0, 0, []
    rows.append({"run": name, "rank": rank or "", "step": 0, "wall_s": 0.0, "train_loss": "",
                 "val_loss": evaluate(layers, val)})
    for step in range(1, args.steps + 1):
        tokens, targets = next(data)
        t0 = time.perf_counter()
        # cosine decay after a short warm-up, the same for every run
        frac = step / args.steps
        sched = min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        loss = forward_loss(layers, tokens, targets)
        loss.backward()
        for layer, comp in zip(layers, comps):
            comp.lr = lr * sched
            params = dict(layer.named_parameters())
            grads = {k: p.grad for k, p in params.items()}
            stats = comp.observe(step - 1, grads)                  # device: sample, check, maybe refit
            refits += stats["refit"]
            if stats["error"] is not None:
                errors.append(stats["error_after"])
            small = comp.compress_grads(grads)                     # device: P^T G Q
            small = {k: v.detach().to("cpu", copy=True) for k, v in small.items()}     # "D2H"
            updates = comp.cpu_step(small)                         # CPU: Adam in the subspace
            comp.apply({k: p.data for k, p in params.items()}, updates)                # "H2D" + apply
        wall += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            rows.append({"run": name, "rank": rank or "", "step": step, "wall_s": round(wall, 4),
                         "train_loss": round(loss.item(), 5), "val_loss": round(evaluate(layers, val), 5)})
            print(f"{name:>14} step {step:4d}  train {loss.item():.4f}  val {rows[-1]['val_loss']:.4f}  "
                  f"{wall / step * 1e3:.1f} ms/it", flush=True)
    # Final and best: a small text overfits, so the final loss alone can flatter the restricted runs.
    summary = {"run": name, "rank": rank or "", "final_val_loss": rows[-1]["val_loss"],
               "best_val_loss": min(r["val_loss"] for r in rows[1:]),
               "d2h_bytes_per_step": d2h, "h2d_bytes_per_step": h2d,
               "ms_per_iter": round(wall / args.steps * 1e3, 2), "refits": refits,
               "mean_error_at_checks": round(sum(errors) / len(errors), 4) if errors else "", "lr": lr}
    return rows, summary


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colors = {"uncompressed": "#1f77b4"}
    oranges = ["#ff7f0e", "#d62728", "#8c564b", "#e377c2"]
    for i, name in enumerate(runs):
        rs = [r for r in rows if r["run"] == name]
        c = colors.get(name, oranges[i % len(oranges)])
        a.plot([r["step"] for r in rs], [r["val_loss"] for r in rs], label=name, color=c)
        b.plot([r["wall_s"] for r in rs], [r["val_loss"] for r in rs], label=name, color=c)
    a.set_xlabel("step"), b.set_xlabel("wall time (s, CPU emulation)")
    a.set_ylabel("validation loss (nats/byte)")
    a.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("LSP-Offload compression vs uncompressed CPU Adam (offload-free emulation)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lsp-lr", type=float, default=None, help="learning rate of the LSP runs (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--nnz", type=int, default=4)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--fit-samples", type=int, default=8)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/bench_compression"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    start = pretrain(args)
    print(f"pretrained {args.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, summaries = [], []
    for name, rank in [("uncompressed", None)] + [(f"lsp d={d}", d) for d in args.ranks]:
        r, s = run(name, rank, start, args)
        rows += r
        summaries.append(s)
    base = summaries[0]
    for s in summaries:
        s["bytes_reduction"] = round(base["d2h_bytes_per_step"] / s["d2h_bytes_per_step"], 2)
        s["val_loss_vs_uncompressed_pct"] = round(100 * (s["final_val_loss"] / base["final_val_loss"] - 1), 2)
        s["best_val_vs_uncompressed_pct"] = round(100 * (s["best_val_loss"] / base["best_val_loss"] - 1), 2)
    for path, table in ((args.out / "compression.csv", rows), (args.out / "summary.csv", summaries)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    plot(rows, args.out / "compression.png")
    print()
    for s in summaries:
        print(f"{s['run']:>14}: final val {s['final_val_loss']:.4f} ({s['val_loss_vs_uncompressed_pct']:+.2f}%), "
              f"best {s['best_val_loss']:.4f} ({s['best_val_vs_uncompressed_pct']:+.2f}%), "
              f"{s['d2h_bytes_per_step'] / 1e3:.1f} kB D2H + {s['h2d_bytes_per_step'] / 1e3:.1f} kB H2D per step "
              f"({s['bytes_reduction']}x less), {s['ms_per_iter']} ms/it, refits {s['refits']}")
    print(f"wrote {args.out}/compression.csv, summary.csv, compression.png")


if __name__ == "__main__":
    main()
