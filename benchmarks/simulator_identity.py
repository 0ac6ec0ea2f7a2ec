"""Does this checkout simulate exactly what a git revision does? A check for speed work on the
builder and engine, which must not change what is simulated.

Simulates 110 random plans (small random models under tight memory, contention, deep prefetch
and gradient accumulation; preset models on preset hardware) with this checkout and with REV
(default: main), each in its own process, and compares every task's start and end, every memory
sample, the summary and the task graph (successor order aside), exactly.

    .venv/bin/python benchmarks/simulator_identity.py [REV]
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = 110
COLUMNS = ("kind", "tag", "layer", "iteration", "micro", "resource", "duration", "nbytes", "flops", "npred",
           "resident", "capacity", "pool", "pool_slots", "contention", "iterations")


def random_cases(rng: random.Random):
    """(model, train, hardware, plan) tuples; the same ones in every process (a seeded generator)."""
    from tiertune.hardware import CUDA_CONTEXT_BYTES, hardware_presets, load_hardware
    from tiertune.schedule import LayerPlan, Plan, PlanGlobals
    from tiertune.workload import MODEL_PRESETS, ModelSpec, TrainSpec, load_model

    def layer(fused_ok: bool, offloaded: bool) -> LayerPlan:
        optimizer = rng.choice(["cpu", "ssd", "ssd"] if offloaded else ["gpu", "cpu", "ssd"])
        return LayerPlan(params=rng.choice(["cpu", "ssd"] if offloaded else ["gpu", "cpu", "ssd"]), optimizer=optimizer,
                         update=rng.choice(["after", "overlap", "fused"] if fused_ok else ["after", "overlap"]),
                         activations=rng.choice(["keep", "cpu", "ssd", "recompute"]),
                         grad_rank=rng.choice([None, rng.randint(1, 48)]) if optimizer != "gpu" else None)

    base = load_hardware("lsp-4090")
    for case in range(CASES):
        if case < 70:                      # small random models: memory waits, stalls, odd settings
            heads = rng.choice([2, 4])
            model = ModelSpec(name="rand", arch=rng.choice(["llama", "gpt"]), vocab_size=rng.randint(64, 512),
                              hidden=heads * rng.choice([8, 16, 32]), n_layers=rng.randint(1, 5), n_heads=heads,
                              n_kv_heads=heads, ffn_hidden=rng.choice([64, 128, 256]), max_seq_len=256)
            train = TrainSpec(batch=rng.choice([1, 2, 3, 4]), seq_len=rng.choice([16, 64, 128]),
                              optimizer=rng.choice(["adamw", "sgd", "adalomo"]), grad_accum=rng.randint(1, 3),
                              grad_clip=rng.choice([None, 1.0]))
            hw = base.replace(pcie_duplex=rng.random() < .5, ssd_duplex=rng.random() < .5,
                              cpu_workers=rng.randint(1, 3), ssd_count=rng.randint(1, 4),
                              cpu_mem_bytes=rng.choice([base.cpu_mem_bytes, 1 << 20, 3 << 20]),
                              contention=rng.choice([{}, {}, {"gpu": {"cpu": 0.5, "h2d": 0.2}, "cpu": {"gpu": 0.3}}]))
            layers = [layer(train.grad_accum == 1, False) for _ in range(model.n_layers + 2)]
            glob = PlanGlobals(prefetch_depth=rng.choice([0, 1, 2, 3, 5, 9, 20]), iterations=rng.randint(1, 5),
                               gpu_mem_bytes=rng.choice([None, None, CUDA_CONTEXT_BYTES + (1 << 20),
                                                         CUDA_CONTEXT_BYTES + (6 << 20)]),
                               activation_slices=rng.choice([d for d in (1, 2, 3, 4) if train.batch % d == 0]),
                               cpu_checkpointing=rng.random() < .3)
        else:                              # preset models on preset hardware, mostly one offloading choice
            model = load_model(rng.choice(sorted(MODEL_PRESETS)))
            hw = load_hardware(rng.choice(hardware_presets()))
            train = TrainSpec(batch=rng.choice([1, 2, 4, 8]), seq_len=min(model.max_seq_len, rng.choice([512, 2048])),
                              grad_accum=rng.choice([1, 1, 2]), grad_clip=rng.choice([None, 1.0]))
            common = layer(train.grad_accum == 1, True)
            layers = [common if rng.random() < .8 else layer(train.grad_accum == 1, True)
                      for _ in range(model.n_layers + 2)]
            glob = PlanGlobals(prefetch_depth=rng.choice([0, 1, 2, 3]), iterations=rng.randint(1, 4),
                               activation_slices=rng.choice([d for d in (1, 2, 4) if train.batch % d == 0]),
                               cpu_checkpointing=rng.random() < .3)
        yield model, train, hw, Plan(model=model.name, hardware=hw.name, train=train, layers=layers, globals=glob)


def dump(out: str) -> None:
    """Simulate every case with the tiertune found on sys.path and pickle what it produced."""
    from tiertune.errors import InputError
    from tiertune.simulator import simulate

    records = []
    for model, train, hw, plan in random_cases(random.Random(13)):
        try:
            r = simulate(model, train, hw, plan)
        except InputError as exc:
            records.append({"input_error": str(exc)})
            continue
        summary = r.to_dict()
        summary.pop("sim_wall_s")
        rec = {"summary": summary}
        if r.graph is not None:
            g = r.graph
            rec["graph"] = {c: getattr(g, c) for c in COLUMNS}
            rec["graph"].update(alloc=[list(a) for a in g.alloc], free=[list(f) for f in g.free],
                                succ=[sorted(s) for s in g.succ])      # the engine does not read their order
        if r.run is not None:
            rec["run"] = (r.run.start, r.run.end, r.run.mem_time, r.run.mem_tier, r.run.mem_bytes, r.run.peak)
        records.append(rec)
    import tiertune
    with open(out, "wb") as f:
        pickle.dump((tiertune.__file__, records), f)


def simulate_with(tree: Path, out: Path) -> list:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, __file__, "--dump", str(out)], env=env, check=True, cwd=tree)
    with open(out, "rb") as f:
        source, records = pickle.load(f)
    assert Path(source).is_relative_to(tree), f"simulated with {source}, not {tree}"
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="main")
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.dump)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "rev"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev], capture_output=True)
        if archive.returncode:
            print(f"error: git revision {args.rev!r} not found", file=sys.stderr)
            sys.exit(2)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        print(f"simulating {CASES} random plans with {args.rev} and with this checkout ...", flush=True)
        old, new = simulate_with(base, Path(tmp) / "old.pkl"), simulate_with(ROOT, Path(tmp) / "new.pkl")
    differ = 0
    for i, (a, b) in enumerate(zip(old, new)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                what = key
                if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                    what += ": " + ", ".join(c for c in a[key] if a[key][c] != b[key].get(c))
                print(f"  case {i}: {what} differs")
                differ += 1
    runs = [r for r in new if "run" in r]
    print(f"{len(new)} plans, {len(runs)} ran ({sum(len(r['run'][0]) for r in runs)} tasks, "
          f"{sum(len(r['run'][2]) for r in runs)} memory samples): "
          + ("identical to " + args.rev if not differ else f"{differ} differences from {args.rev}"))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
