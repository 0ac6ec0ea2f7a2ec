"""Benchmark: LSP-Offload gradient compression vs uncompressed CPU Adam, run by the Executor.

Fine-tunes a built-in byte-level model (tiertune.executor.models, default tiny-llama) on the demo
text (tiertune.executor.data): a starting checkpoint is pretrained with plain torch AdamW on the
first 60% of the training text, then fine-tuned on the other 40% for a fixed number of steps by the
Executor (tiertune.executor.runtime, the CPU standing in for the device), once per plan:

  uncompressed   ZeRO-Offload style: weights on the device, AdamW on the CPU, update after backward;
                 the full gradient goes D2H and the updated weights come back H2D
  lsp d=<d>      LSP-Offload style (the `lsp-offload` policy's layers): the same placement, update
                 overlapping backward, every layer at grad_rank d: d x d per matrix each way

LSP-Offload targets fine-tuning, where updates are low rank; from random init, rank-d updates are a
much harsher restriction. Validation loss is real; the bytes moved D2H and H2D are summed from the
executor's measured trace (what its copy engines really sent); iteration time is wall time of the
steps (evaluation excluded), projector checks and refits included. On a CPU the "copies" are
memcpys, so the time column shows the compression's compute cost, not a PCIe saving. Writes
<out>/compression.csv (one row per run per evaluation point), <out>/summary.csv (one row per run)
and <out>/compression.png (validation loss vs step and vs wall time).

    .venv/bin/python benchmarks/bench_compression.py --steps 150 --ranks 8 16
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch

from tiertune.executor.data import batches, eval_batches, load_text, split
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.workload import TrainSpec, load_model

BETAS = (0.9, 0.95)


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
    opt = torch.optim.AdamW(params, lr=args.pretrain_lr, betas=BETAS, weight_decay=0.0)
    data = batches(texts()[0], args.batch, args.seq, seed=args.seed + 1)
    for _ in range(args.pretrain_steps):
        opt.zero_grad(set_to_none=True)
        forward_loss(layers, *next(data)).backward()
        opt.step()
    return [copy.deepcopy(layer.state_dict()) for layer in layers]


def make_plan(args: argparse.Namespace, rank: int | None) -> Plan:
    """ZeRO-Offload's placement, or LSP-Offload's: the same, update overlapping backward, grad_rank d."""
    spec = load_model(args.model)
    train = TrainSpec(batch=args.batch, seq_len=args.seq, dtype="fp32", optimizer="adamw")
    layer = (LayerPlan(params="gpu", optimizer="cpu", update="after") if rank is None else
             LayerPlan(params="gpu", optimizer="cpu", update="overlap", grad_rank=rank))
    glob = PlanGlobals(lsp_nnz_per_row=args.nnz, lsp_check_every=args.check_every,
                       lsp_refit_threshold=args.threshold, lsp_fit_samples=args.fit_samples)
    return Plan(model=spec.name, hardware="local-cpu", train=train, layers=(layer,) * (spec.n_layers + 2),
                globals=glob, provenance={"policy": "zero-offload" if rank is None else "lsp-offload"})


def run(name: str, rank: int | None, start: list[dict], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Fine-tune one plan from `start` through the Executor; evaluate a copy of its master weights."""
    spec = load_model(args.model)
    layers = build_model(spec, seed=args.seed)
    for layer, sd in zip(layers, start):
        layer.load_state_dict(sd)
    judge = build_model(spec, seed=args.seed)          # evaluation copy: the executor's modules stay its own
    _, tune_text, val_text = texts()
    val = eval_batches(val_text, args.batch, args.seq)
    data = batches(tune_text, args.batch, args.seq, seed=args.seed)
    plan = make_plan(args, rank)
    optim = OptimConfig(lr=args.lr, betas=BETAS, weight_decay=args.weight_decay)

    def validate(ex: Executor) -> float:
        for layer, w in zip(judge, ex.master_weights()):
            layer.load_state_dict(w)
        return evaluate(judge, val)

    rows, wall = [], 0.0
    with Executor(layers, spec, plan, optim=optim) as ex:
        rows.append({"run": name, "rank": rank or "", "step": 0, "wall_s": 0.0, "train_loss": "",
                     "val_loss": round(validate(ex), 5)})
        for step in range(1, args.steps + 1):
            tokens, targets = next(data)
            t0 = time.perf_counter()
            loss = ex.step(tokens, targets)
            if step % args.eval_every == 0 or step == args.steps:
                ex.synchronize()                            # the updates still in flight belong to this step
                wall += time.perf_counter() - t0
                rows.append({"run": name, "rank": rank or "", "step": step, "wall_s": round(wall, 4),
                             "train_loss": round(loss, 5), "val_loss": round(validate(ex), 5)})
                print(f"{name:>14} step {step:4d}  train {loss:.4f}  val {rows[-1]['val_loss']:.4f}  "
                      f"{wall / step * 1e3:.1f} ms/it", flush=True)
            else:
                wall += time.perf_counter() - t0
        ev = ex.trace().events
        log = ex.lsp_log
    moved = ev.groupby("resource")["bytes"].sum()
    # Final and best: a small text overfits, so the final loss alone can flatter the restricted runs.
    summary = {"run": name, "rank": rank or "", "final_val_loss": rows[-1]["val_loss"],
               "best_val_loss": min(r["val_loss"] for r in rows[1:]),
               "d2h_bytes_per_step": int(moved.get("d2h", 0)) // args.steps,
               "h2d_bytes_per_step": int(moved.get("h2d", 0)) // args.steps,
               "ms_per_iter": round(wall / args.steps * 1e3, 2), "refits": sum(e["refit"] for e in log),
               "mean_error_at_checks": round(sum(e["error_after"] for e in log) / len(log), 4) if log else "",
               "lr": args.lr}
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
    a.set_xlabel("step"), b.set_xlabel("wall time (s, executor on the CPU)")
    a.set_ylabel("validation loss (nats/byte)")
    a.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle("LSP-Offload compression vs uncompressed CPU Adam (Executor, CPU as device)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--nnz", type=int, default=4)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.2)
    ap.add_argument("--fit-samples", type=int, default=8)
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
