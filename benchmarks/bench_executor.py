"""Executor speed on this machine, as ratios measured in one run (the CPU stands in for the GPU).

  (a) overlapped CPU AdamW (update=overlap: a worker thread updates each layer while backward goes
      on, Fuyou / MegaTrain) vs the same placement updating after backward (update=after, ZeRO-Offload)
  (b) the no-offload plan (gpu-only: everything resident, graphs kept) vs a plain torch loop over
      the same layers with torch.optim.AdamW: the executor's own overhead
  (c) a Hugging Face Llama of the same shape (transformers, save_pretrained into a temporary
      directory) through the executor (gpu-only, executor/hf.py's layers) vs the plain HF loop:
      AutoModelForCausalLM.from_pretrained, torch.optim.AdamW, the same batches

Torch runs one compute thread by default (`--threads`): the main thread stands in for the GPU and
must not take the cores a real host would give its CPU optimizer; on a 2-core machine that leaves
one core to the worker thread, as a GPU box leaves its CPU cores to CPU Adam. With both cores on
compute, overlap has no idle core to fill and wins little (measured with --threads 2).

Each variant runs warm-up steps, then timed steps; variants are interleaved in rounds so that
interference from other processes hits them alike, and the median step time is reported.

    .venv/bin/python benchmarks/bench_executor.py [--rounds 3] [--steps 4] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

import torch

from tiertune.executor.data import batches, load_text
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.schedule import LayerPlan, uniform_plan
from tiertune.workload import ModelSpec, TrainSpec

# Wide enough that CPU Adam (~4 x 26M parameters of state traffic) is a visible share of a step,
# small enough for a 2-core machine: ~26M parameters.
SPEC = ModelSpec(name="bench-llama", arch="llama", vocab_size=256, hidden=512, n_layers=8, n_heads=8,
                 n_kv_heads=4, ffn_hidden=1376, max_seq_len=512)
TRAIN = TrainSpec(batch=4, seq_len=64, dtype="fp32", optimizer="adamw")
LR = 1e-4


def make_data(n: int):
    it = batches(load_text(None), TRAIN.batch, TRAIN.seq_len, 0)
    return [next(it) for _ in range(n)]


class PlainLoop:
    """The reference: one autograd graph over the same layers, torch.optim.AdamW."""

    def __init__(self):
        self.layers = build_model(SPEC, 0)
        self.params = [p for m in self.layers for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=LR)

    def loss(self, tk, tg):
        x = tk
        for m in self.layers[:-1]:
            x = m(x)
        return self.layers[-1](x, tg)

    def step(self, tk, tg) -> float:
        loss = self.loss(tk, tg)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def close(self) -> None:
        pass


def hf_dir() -> str:
    """SPEC as a transformers Llama, saved once per run."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=SPEC.vocab_size, hidden_size=SPEC.hidden,
                                   intermediate_size=SPEC.ffn_hidden, num_hidden_layers=SPEC.n_layers,
                                   num_attention_heads=SPEC.n_heads, num_key_value_heads=SPEC.n_kv_heads,
                                   max_position_embeddings=SPEC.max_seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tempfile.mkdtemp(prefix="bench-hf-")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


class HFPlainLoop(PlainLoop):
    """The reference for (c): the model as transformers loads it, one graph, torch.optim.AdamW."""

    def __init__(self, path: str):
        import transformers
        from tiertune.executor.hf import masked_cross_entropy
        self.cross_entropy = masked_cross_entropy
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def loss(self, tk, tg):
        return self.cross_entropy(self.model(input_ids=tk).logits, tg)


def hf_executor(path: str) -> Executor:
    from tiertune.executor.hf import HFSource
    src = HFSource(path)
    plan = uniform_plan(src.spec.name, "local-cpu", TRAIN, src.num_layers, LayerPlan())
    return Executor(src.build_all(), src.spec, plan, optim=OptimConfig(lr=LR))


def executor(layer: LayerPlan) -> Executor:
    plan = uniform_plan(SPEC.name, "local-cpu", TRAIN, SPEC.n_layers + 2, layer)
    return Executor(build_model(SPEC, 0), SPEC, plan, offload_dir=tempfile.mkdtemp(prefix="bench-exec-"),
                    optim=OptimConfig(lr=LR))


VARIANTS = {
    "plain": PlainLoop,
    "gpu-only": lambda: executor(LayerPlan()),
    "cpu-adam-after": lambda: executor(LayerPlan(params="gpu", optimizer="cpu", update="after")),
    "cpu-adam-overlap": lambda: executor(LayerPlan(params="gpu", optimizer="cpu", update="overlap")),
}


def time_steps(runner, data) -> list[float]:
    out = []
    for tk, tg in data:
        t = time.perf_counter()
        runner.step(tk, tg)
        if isinstance(runner, Executor):
            runner.synchronize()      # the step's updates are part of it (else they hide in the next)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads (the stand-in GPU's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = make_data(args.steps + 1)
    runners = {name: make() for name, make in VARIANTS.items()}
    path = hf_dir()
    runners["hf-plain"] = HFPlainLoop(path)
    runners["hf-gpu-only"] = hf_executor(path)
    times: dict[str, list[float]] = {name: [] for name in runners}
    try:
        for name, r in runners.items():                  # warm-up (allocations, thread start)
            time_steps(r, data[:1])
        for _ in range(args.rounds):
            for name, r in runners.items():
                times[name] += time_steps(r, data[1:])
    finally:
        for r in runners.values():
            r.close()
        shutil.rmtree(path, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": SPEC.name, "params_m": round(SPEC.total_params() / 1e6, 1), "batch": TRAIN.batch,
           "seq": TRAIN.seq_len, "torch_threads": torch.get_num_threads(),
           "median_step_s": med,
           "overlap_speedup_vs_after": med["cpu-adam-after"] / med["cpu-adam-overlap"],
           "gpu_only_vs_plain": med["gpu-only"] / med["plain"],
           "hf_gpu_only_vs_hf_plain": med["hf-gpu-only"] / med["hf-plain"],
           "wall_s": time.perf_counter() - t_start}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{SPEC.name}: {res['params_m']}M params, batch {TRAIN.batch} x seq {TRAIN.seq_len}, fp32, "
          f"{res['torch_threads']} torch threads; median of {args.rounds * args.steps} steps each")
    for k, v in med.items():
        print(f"  {k:<18} {v * 1e3:8.1f} ms/step")
    print(f"  (a) overlap vs after: {res['overlap_speedup_vs_after']:.3f}x faster")
    print(f"  (b) gpu-only executor / plain loop: {res['gpu_only_vs_plain']:.3f} "
          f"({(res['gpu_only_vs_plain'] - 1) * 100:+.1f}%)")
    print(f"  (c) HF Llama, gpu-only executor / plain HF loop: {res['hf_gpu_only_vs_hf_plain']:.3f} "
          f"({(res['hf_gpu_only_vs_hf_plain'] - 1) * 100:+.1f}%)")
    print(f"  ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
