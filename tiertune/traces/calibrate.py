"""Microbenchmarks of the machine at hand -> a `HardwareProfile` (`tiertune calibrate`).

Each constant the cost model reads is measured over a range of sizes, so the profile carries
measured size-dependent efficiency tables (Calculon's form) besides the peaks:

- matmul FLOP/s per dtype at transformer-layer shapes (tokens x hidden x {hidden, 4*hidden});
- host<->device copies (pinned and pageable) from 64 KiB to 256 MiB, each between buffers the
  last copies did not touch (as the executor's copies move another layer's tensors every time);
- device memory bandwidth (a large elementwise add);
- SSD read/write under an offload directory, with the page cache bypassed (O_DIRECT) or dropped;
- CPU AdamW / SGD throughput in params/s of the executor's own per-parameter update;
- a layer's forward and backward: the executor's own transformer block of each architecture at a
  few widths, at the executor's shapes (batch 4 x 64 tokens in --quick): what its operations other
  than the matmuls take per activation byte (HardwareProfile.activation_bps) and its backward over
  its forward (backward_factor), each net of the matmul time the profile's own tables charge and
  of a fixed cost per task (the probe below measures that one in the executor);
- LSP-Offload's sparse projections (CSR x dense) with the executor's own compressor (sparse_flops);
- contention: how much the device's compute and the CPU optimizer slow each other down when they
  run at once (a block's forward and backward beside the executor's CPU AdamW thread, and the
  reverse; on a CPU standing in for the GPU they share cores, caches and the GIL);
- the runtime's fixed cost of every kind of task (HardwareProfile.task_overheads): the executor
  itself, its copy engines, hooks and SSD store, running a model too small for its arithmetic or
  bytes to count, under plans that between them run every kind of task (`probe_overheads`).
  Without it a fresh profile predicted every task of a small model 60-95% short on a CPU standing
  in for the GPU: Python issuing each op and each copy, and the hand-offs between threads, cost more
  there than the arithmetic.

With `device="cpu"` the CPU plays the GPU: "copies" are host memcpys between two buffers through
the same `copy_` call, and there is no pinned memory. The profile's description says so, and
says how the SSD cache was handled. Every compute and copy timing is the mean of repeats after a
warm-up (`mean_time`); the SSD's, the median.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from tiertune.errors import InputError
from tiertune.hardware import CUDA_CONTEXT_BYTES, GiB, Curve, HardwareProfile
from tiertune.schedule import LayerPlan, Plan
from tiertune.simulator.costs import COPY_LATENCY_S, SSD_LATENCY_S
from tiertune.traces.trace import Trace, own_durations
from tiertune.workload import ModelSpec, TrainSpec, layer_costs

KiB, MiB = 1 << 10, 1 << 20
ALIGN = 4096                      # O_DIRECT needs buffers, offsets and lengths aligned to the block size
SSD_CHUNK = 8 * MiB               # one request of a request stream (DeepSpeed AIO uses 1-8 MiB blocks)
COPY_WORKING_SET = 256 * MiB      # copies cycle through this many bytes: more than a server CPU's last-level cache
LAYER_BATCH = 4                   # sequences per block in the layer benchmark (tiertune validate's default batch)


@dataclass(frozen=True)
class Settings:
    """How much to measure: the full run (~2 min on 2 cores) or --quick (a few seconds)."""

    hiddens: tuple[int, ...]
    tokens: int
    copy_sizes: tuple[int, ...]
    membw_bytes: int
    ssd_sizes: tuple[int, ...]
    optim_params: int
    layer_hiddens: tuple[int, ...]  # widths of the blocks timed for the activation rate and backward factor
    layer_seq: int                  # their sequence length (batch LAYER_BATCH)
    layer_budget_s: float           # rounds of the layer benchmark stop after this (at least `repeats`)
    probe_steps: int              # steady steps of each probe plan (the runtime's per-task costs)
    contention_rounds: int        # alternations of alone / beside in the contention benchmark
    repeats: int
    call_budget_s: float          # skip a benchmark size whose single call would take longer


def settings_for(device: str, quick: bool) -> Settings:
    pow2 = lambda lo, hi, step=2: tuple(1 << k for k in range(lo, hi + 1, step))   # noqa: E731
    if quick:
        # Up to a 256-token x 512 x 2048 matmul and 32 MiB copies: the sizes small models' layers
        # run at. Smaller sizes alone leave the peak to a cache-resident matmul and copy, and the
        # simulator then misjudged layer times by 10-20% in either direction (bench_fidelity.py).
        return Settings(hiddens=(128, 256, 512), tokens=256, copy_sizes=pow2(16, 25, 3), membw_bytes=64 * MiB,
                        ssd_sizes=(256 * KiB, 4 * MiB), optim_params=1 << 20, layer_hiddens=(32, 128, 256),
                        layer_seq=64, layer_budget_s=1.0, probe_steps=8, contention_rounds=3, repeats=3, call_budget_s=0.05)
    gpu = device == "cuda"
    return Settings(hiddens=(1024, 2048, 4096, 8192) if gpu else (256, 512, 1024, 2048),
                    tokens=4096 if gpu else 512, copy_sizes=pow2(16, 28), membw_bytes=(1 << 30) if gpu else 256 * MiB,
                    ssd_sizes=(256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB),
                    optim_params=16 << 20, layer_hiddens=(64, 1024, 2048) if gpu else (32, 256, 512),
                    layer_seq=1024 if gpu else 128, layer_budget_s=5.0, probe_steps=12, contention_rounds=5, repeats=5, call_budget_s=1.0)


@dataclass
class Measurements:
    """Raw results, kept so tests and reports can see what the profile was built from."""

    matmul: list[tuple[str, float, float]] = field(default_factory=list)     # (dtype, flops, seconds)
    copies: list[tuple[str, bool, int, float]] = field(default_factory=list)  # (direction, pinned, bytes, s)
    membw_bps: float = 0.0
    ssd: list[tuple[str, int, float]] = field(default_factory=list)          # (read|write, bytes, seconds)
    ssd_method: str = ""
    ssd_duplex: bool = False        # a read and a write on two threads overlap
    adam_params_per_s: float = 0.0
    sgd_params_per_s: float = 0.0
    # (ModelSpec, TrainSpec, d, r, seconds) of compressing a block's gradients and adding its update (mean of the two)
    sparse: list[tuple[ModelSpec, TrainSpec, int, int, float]] = field(default_factory=list)
    # (ModelSpec, TrainSpec, forward seconds, backward seconds) of one block per architecture and width
    layers: list[tuple[ModelSpec, TrainSpec, float, float]] = field(default_factory=list)
    # the executor's fixed cost per task: {"<kind>.<resource>[.<what>]": {layer kind: seconds}}
    task_overheads: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_steps: int = 0                # steady steps each probe plan ran
    # HardwareProfile.contention: {victim: {busy resource: factor}} from `Bench.contention`
    contention: dict[str, dict[str, float]] = field(default_factory=dict)
    handoff_s: float = 0.0              # one hand-off to or from a worker thread
    notes: list[str] = field(default_factory=list)


# --- timing ------------------------------------------------------------------------------------------
def mean_time(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int = 1,
              budget_s: float = float("inf"), cheap_s: float = 0.2, max_repeats: int = 25) -> float:
    """Mean wall time of `fn` after `warmup` calls.

    Runs `repeats` times but stops early once `budget_s` is spent (>= 1 run); cheap calls go on up
    to `max_repeats` while under `cheap_s`. The mean, not the median, for the reason the probe's
    per-task costs are means: a step's time is the sum of its tasks' expected times, and on a
    machine shared with other work a task's expected time includes the time slices it waits out,
    which the median of short calls leaves out. On this 2-core machine at load 7.9, 200 calls of
    one 256 x 512 x 512 matmul on one thread: median 2.23 ms, mean 6.92 ms (the process got a fifth
    of a core), and the executor's steps are slowed as the mean says, not the median. (With one
    compute thread, `set_compute_threads`, no OpenMP barrier multiplies a lost time slice.)"""
    for _ in range(warmup):
        fn()
    sync()
    times, spent = [], 0.0
    while len(times) < max_repeats:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > budget_s or (len(times) >= repeats and spent > min(cheap_s, budget_s)):
            break
    return float(np.mean(times))


def isotonic(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators).

    Efficiency tables model 'bigger requests are no less efficient' (Calculon); on a CPU the
    caches make small copies look faster, and noise makes neighbours swap: pooling keeps the
    table's shape honest without inventing points.
    """
    blocks: list[list[float]] = []                   # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2 = blocks.pop()
            m1, w1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for m, w in blocks:
        out += [m] * int(w)
    return out


def efficiency_curve(sizes: list[float], effs: list[float]) -> Curve:
    """A step table from (size, efficiency) samples: median per size, sorted, isotonic, capped at 1,
    first step from size 0 (so every size has an entry)."""
    by_size: dict[float, list[float]] = {}
    for size, eff in zip(sizes, effs):
        by_size.setdefault(float(size), []).append(min(max(float(eff), 0.01), 1.0))
    sizes = sorted(by_size)
    effs = isotonic([float(np.median(by_size[size])) for size in sizes])
    points = [(0.0 if k == 0 else s, round(e, 4)) for k, (s, e) in enumerate(zip(sizes, effs))]
    return Curve(tuple(points))


def transfer_table(samples: list[tuple[int, float]], latency_s: float) -> tuple[float, Curve]:
    """Peak bandwidth and efficiency table from (bytes, seconds) samples.

    The peak is the median bandwidth of the two largest sizes (what layer-sized transfers see,
    not cache-resident ones); efficiency at each size is chosen so that the cost model's
    `latency + bytes / (peak * eff)` reproduces the measured time (capped at 1).
    """
    samples = sorted(samples)
    peak = float(np.median([b / t for b, t in samples[-2:]]))
    effs = [b / (peak * (t - latency_s)) if t > latency_s else 1.0 for b, t in samples]
    return peak, efficiency_curve([b for b, _ in samples], effs)


# --- host facts -----------------------------------------------------------------------------------------
def host_memory_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


# --- benchmarks -------------------------------------------------------------------------------------------
class Bench:
    """The benchmarks for one device; each appends to `self.m`."""

    def __init__(self, device: str, settings: Settings) -> None:
        import torch

        self.torch, self.device, self.s = torch, device, settings
        self.cuda = device == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.m = Measurements()

    def time(self, fn: Callable[[], object], budget_s: float | None = None) -> float:
        return mean_time(fn, self.sync, self.s.repeats, budget_s=budget_s or self.s.call_budget_s * self.s.repeats)

    def dtypes(self) -> list[str]:
        """fp32 and bf16 always; fp16 where a matmul in it runs on this device."""
        torch = self.torch
        out = ["fp32", "bf16"]
        with contextlib.suppress(RuntimeError):
            x = torch.ones(8, 8, dtype=torch.float16, device=self.device)
            (x @ x).sum().item()
            out.append("fp16")
        return out

    def matmul(self, dtype: str) -> None:
        """tokens x hidden @ hidden x {hidden, 4*hidden}, ascending in FLOPs; stops before a size
        whose single call is predicted to exceed the budget (bf16 on a CPU without AVX512-BF16
        runs ~200x slower than fp32)."""
        torch = self.torch
        tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        t = self.s.tokens
        shapes = sorted({(h, n) for h in self.s.hiddens for n in (h, 4 * h)}, key=lambda hn: hn[0] * hn[1])
        rate = None
        for i, (h, n) in enumerate(shapes):
            flops = 2.0 * t * h * n
            if i > 1 and rate and flops / rate > self.s.call_budget_s:     # >= 2 sizes: one noisy first call must not end the sweep
                self.m.notes.append(f"{dtype} matmul measured up to {shapes[i - 1][0]}x{shapes[i - 1][1]} (slow)")
                break
            a = torch.randn(t, h, device=self.device).to(tdt)
            b = torch.randn(h, n, device=self.device).to(tdt)
            out = torch.empty(t, n, device=self.device, dtype=tdt)
            secs = self.time(lambda: torch.matmul(a, b, out=out))
            rate = flops / secs
            self.m.matmul.append((dtype, flops, secs))

    def copies(self) -> None:
        """h2d/d2h with `copy_(non_blocking=True)`, pinned (reused buffers) and pageable. Each call
        copies the next slice of a COPY_WORKING_SET-byte pair of buffers, so that neither end is in
        the caches from the call before: the executor's copies move a different layer's weights,
        gradients or activations every time. Copying one buffer over and over measured 16-20 GB/s
        on a 2-core EPYC with a 32 MiB L3, where the executor's activation copies of 5 MB got 3-8."""
        torch = self.torch
        span = max(COPY_WORKING_SET, 2 * max(self.s.copy_sizes))
        dev = torch.empty(span, dtype=torch.uint8, device=self.device)
        dev.fill_(1)
        hosts = {False: torch.ones(span, dtype=torch.uint8)}
        if self.cuda:
            hosts[True] = torch.ones(span, dtype=torch.uint8, pin_memory=True)   # allocated once, reused
        for pinned, host in hosts.items():
            for n in self.s.copy_sizes:
                offsets = itertools.cycle(range(0, span - n + 1, n))

                def copy(src: torch.Tensor, dst: torch.Tensor) -> None:
                    at = next(offsets)
                    dst[at:at + n].copy_(src[at:at + n], non_blocking=True)
                self.m.copies.append(("h2d", pinned, n, self.time(lambda: copy(host, dev))))
                self.m.copies.append(("d2h", pinned, n, self.time(lambda: copy(dev, host))))
                yield

    def duplex(self) -> bool:
        """CUDA: do an h2d and a d2h on two streams overlap (separate copy engines)? CPU: no,
        both memcpy directions share one memory bus."""
        if not self.cuda:
            return False
        torch = self.torch
        n = 64 * MiB
        h1, h2 = torch.ones(n, dtype=torch.uint8, pin_memory=True), torch.ones(n, dtype=torch.uint8, pin_memory=True)
        d1, d2 = torch.ones(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8, device="cuda")
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def both() -> None:
            with torch.cuda.stream(s1):
                d1.copy_(h1, non_blocking=True)
            with torch.cuda.stream(s2):
                h2.copy_(d2, non_blocking=True)

        one = self.time(lambda: d1.copy_(h1, non_blocking=True)) + self.time(lambda: h2.copy_(d2, non_blocking=True))
        return self.time(both) < 0.75 * one

    def memory_bandwidth(self) -> None:
        """c = a + b over a large array: 3 x bytes move through device memory."""
        torch = self.torch
        n = self.s.membw_bytes // 4
        a, b, c = (torch.ones(n, device=self.device) for _ in range(3))
        secs = self.time(lambda: torch.add(a, b, out=c), budget_s=10.0)
        self.m.membw_bps = 3 * n * 4 / secs

    def optimizers(self) -> None:
        """CPU AdamW and SGD throughput of the update the executor runs (tiertune.executor.updates.step:
        one parameter at a time, torch's single-tensor operation order) on fp32 tensors of ~n/4
        params each, with torch's current thread count. Not torch's fused optimizer: the executor
        does not use it, and on a CPU it runs ~5x faster than the per-parameter update, which made
        the simulator under-predict every CPU update."""
        from tiertune.executor.updates import OptimConfig, state_shapes
        from tiertune.executor.updates import step as optim_step

        torch = self.torch
        n = self.s.optim_params
        params = [torch.randn(n // 4) for _ in range(4)]
        grads = [torch.randn_like(p) for p in params]
        for name in ("adamw", "sgd"):
            cfg = OptimConfig(name=name, lr=1e-4)
            states = [{k: torch.zeros(shape) for k, shape in state_shapes(cfg, p.shape).items()} for p in params]
            counter = iter(range(1, 1 << 30))

            def run() -> None:
                t = next(counter)
                for p, g, st in zip(params, grads, states):
                    optim_step(cfg, t, p, g, st)
            secs = self.time(run, budget_s=5.0)
            setattr(self.m, f"{'adam' if name == 'adamw' else name}_params_per_s", n / secs)
        self.m.notes.append(f"CPU adamw/sgd: the executor's per-parameter update on {torch.get_num_threads()} threads")


    def layers(self) -> None:
        """The executor's own block (executor/models.py) of each architecture at the widths
        `layer_hiddens`, LAYER_BATCH x `layer_seq` tokens, in the executor's compute dtype: mean
        seconds of its forward with autograd recording (as the executor runs it) and of its backward
        to the input and weight gradients. Widths alternate within each round, so load that drifts
        over the benchmark reaches all of them alike. `layer_constants` turns them into the profile's
        activation rate and backward factor."""
        from tiertune.executor.models import build_model

        torch, sync = self.torch, self.sync
        dtype = "bf16" if self.cuda else "fp32"
        cases = []
        for arch in ARCHS:
            for h in self.s.layer_hiddens:
                spec, train = layer_bench_spec(arch, h, self.s.layer_seq, dtype)
                block = build_model(spec, 0)[1].to(self.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
                x = torch.randn(LAYER_BATCH, self.s.layer_seq, h, device=self.device, dtype=block.norm1.weight.dtype,
                                requires_grad=True)
                cases.append((spec, train, block, x, [], []))

        def once(block, x, fwd: list, bwd: list | None) -> None:
            t0 = time.perf_counter()
            y = block(x)
            sync()
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            sync()
            if bwd is not None:
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)
            x.grad = None
            block.zero_grad(set_to_none=True)

        for _ in range(2):                                   # warm-up
            for _, _, block, x, f, b in cases:
                once(block, x, f, None)
        end = time.perf_counter() + self.s.layer_budget_s
        for k in range(self.s.repeats * 4):
            for _, _, block, x, f, b in cases:
                once(block, x, f, b)
            if k >= self.s.repeats and time.perf_counter() > end:
                break
        self.m.layers = [(spec, train, float(np.mean(f)), float(np.mean(b))) for spec, train, _, _, f, b in cases]
        self.m.notes.append(f"activation rate and backward factor: the executor's {'/'.join(ARCHS)} blocks "
                            f"{'/'.join(map(str, self.s.layer_hiddens))} wide, {LAYER_BATCH}x{self.s.layer_seq} tokens")

    def sparse_products(self) -> None:
        """LSP-Offload's device work as the executor does it (executor/compress.py): a Llama block's
        gradients compressed to d x d (S = P^T G Q) and a d x d update added to its weights in place
        (W += P U Q^T), d = width / 2 and r = 4 non-zeros per projector row (the lsp-offload
        policy's choice), at the two largest `layer_hiddens` widths. `sparse_rate` turns them into
        the profile's sparse-product FLOP/s."""
        from tiertune.executor.compress import LayerCompression
        from tiertune.executor.models import build_model

        torch = self.torch
        for h in self.s.layer_hiddens[-2:]:
            spec, train = layer_bench_spec("llama", h, self.s.layer_seq, "fp32")
            named = {n: p for n, p in build_model(spec, 0)[1].to(self.device).named_parameters()}
            rank, nnz = max(1, h // 2), 4
            lc = LayerCompression({n: tuple(p.shape) for n, p in named.items()}, rank, nnz, device=self.device,
                                  cpu_device=self.device)
            grads = {n: torch.randn_like(p) for n, p in named.items()}
            small = lc.compress_grads(grads)
            weights = {n: p.detach() for n, p in named.items()}
            both = self.time(lambda: lc.compress_grads(grads), budget_s=0.5) \
                + self.time(lambda: lc.apply(weights, small), budget_s=0.5)
            self.m.sparse.append((spec, train, rank, nnz, both / 2))
        self.m.notes.append(f"sparse products: the executor's LSP compressor on Llama blocks "
                            f"{'/'.join(map(str, self.s.layer_hiddens[-2:]))} wide, d = width / 2, r = 4")

    def contention(self) -> None:
        """How much the device's compute, the CPU optimizer and the copies slow each other down when
        they run at once (HardwareProfile.contention). Each is the executor's own work on its own
        thread: a block's forward and backward on the device thread, the executor's AdamW step in a
        `cpu` Engine, an 8 MiB copy in an `h2d` Engine. A victim is timed alone and while an
        aggressor runs back to back, alternating over `contention_rounds` rounds (a shared machine's
        load drifts); the factor is the ratio of the medians less 1 (the engine runs a task at
        1 / (1 + factor) of its speed while the other is busy). Copies both ways share one factor
        (the same copy in either direction). On a CPU standing in for the GPU they share cores,
        caches, memory bandwidth and the GIL: without it a fresh profile predicted ZeRO-Offload and
        LSP-Offload, whose CPU update runs beside the next forward, 30-40% short."""
        import threading
        from concurrent.futures import Future

        from tiertune.executor.device import Engine, Recorder
        from tiertune.executor.models import build_model
        from tiertune.executor.runtime import SWITCH_INTERVAL_S
        from tiertune.executor.updates import OptimConfig, state_shapes
        from tiertune.executor.updates import step as optim_step

        torch, sync = self.torch, self.sync
        block = build_model(CONTENTION_MODEL, 0)[1].to(self.device)
        x = torch.randn(CONTENTION_TRAIN.batch, CONTENTION_TRAIN.seq_len, CONTENTION_MODEL.hidden,
                        device=self.device, requires_grad=True)
        cfg = OptimConfig(name="adamw", lr=1e-4)
        n = self.s.optim_params
        params = [torch.randn(n // 4) for _ in range(4)]
        grads = [torch.randn_like(p) for p in params]
        states = [{k: torch.zeros(shape) for k, shape in state_shapes(cfg, p.shape).items()} for p in params]
        counter = iter(range(1, 1 << 30))
        host = torch.ones(CONTENTION_COPY_BYTES, dtype=torch.uint8, pin_memory=self.cuda)
        dev = torch.empty(CONTENTION_COPY_BYTES, dtype=torch.uint8, device=self.device)

        def device_step() -> None:
            block(x).sum().backward()
            sync()

        def cpu_step() -> None:
            t = next(counter)
            for p, g, st in zip(params, grads, states):
                optim_step(cfg, t, p, g, st)

        def copy_step() -> None:
            dev.copy_(host, non_blocking=True)
            if self.cuda:                                  # the Engine's stream: wait for the copy itself
                torch.cuda.current_stream().synchronize()

        work = {"gpu": device_step, "cpu": cpu_step, "h2d": copy_step}
        reps = {"gpu": 8, "cpu": 4, "h2d": 8}

        def timed(r: str) -> list[float]:
            out = []
            for _ in range(reps[r]):
                t0 = time.perf_counter()
                work[r]()
                out.append(time.perf_counter() - t0)
            return out

        engines = {r: Engine(r, Recorder(cuda=False), torch.device(self.device)) for r in ("cpu", "h2d")}

        def victim(r: str) -> list[float] | Future:
            """Time r where it runs: the device thread here, else its Engine (a future)."""
            return timed(r) if r == "gpu" else engines[r].submit(lambda: timed(r), "contention", 0, 0)

        def result(out: list[float] | Future) -> list[float]:
            return out if isinstance(out, list) else out.result()

        def beside(v: str, a: str) -> list[float]:
            if a == "gpu":                                  # the device thread is the aggressor
                fut = victim(v)
                while not fut.done():
                    device_step()
                return fut.result()
            stop = threading.Event()
            busy = engines[a].submit(lambda: [work[a]() for _ in iter(stop.is_set, True)], "contention", 0, 0)
            try:
                return result(victim(v))
            finally:
                stop.set()
                busy.result()

        pairs = (("gpu", "cpu"), ("cpu", "gpu"), ("h2d", "gpu"), ("h2d", "cpu"))
        alone: dict[str, list[float]] = {r: [] for r in work}
        with_: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
        prev = sys.getswitchinterval()
        sys.setswitchinterval(min(prev, SWITCH_INTERVAL_S))       # as the executor steps
        try:
            for r in work:                                          # warm-up
                result(victim(r))
            for _ in range(self.s.contention_rounds):
                for r in work:
                    alone[r] += result(victim(r))
                for v, a in pairs:
                    with_[v, a] += beside(v, a)
        finally:
            sys.setswitchinterval(prev)
            for eng in engines.values():
                eng.close()

        def factor(v: str, a: str) -> float:
            x = float(np.median(with_[v, a]) / np.median(alone[v])) - 1.0
            return round(min(max(x, 0.0), MAX_CONTENTION), 4)
        table: dict[str, dict[str, float]] = {}
        for v, a in pairs:
            table.setdefault(v, {})[a] = factor(v, a)
        table["d2h"] = dict(table["h2d"])
        self.m.contention = table
        self.m.notes.append("contention: the device's block, the executor's CPU AdamW and a copy, each beside "
                            f"the others, {self.s.contention_rounds} rounds")

    def overheads(self, base: HardwareProfile, offload_dir: Path) -> None:
        """The runtime's fixed cost per task (HardwareProfile.task_overheads), see probe_overheads."""
        self.m.handoff_s = handoff_s(self.device)
        self.m.task_overheads = probe_overheads(base, executor_probe(offload_dir, self.s.probe_steps, self.device),
                                                self.m.handoff_s)
        self.m.probe_steps = self.s.probe_steps
        self.m.notes.append(f"per-task fixed costs: the executor on a {PROBE_MODEL.hidden}-wide "
                            f"{PROBE_MODEL.n_layers}-block {PROBE_MODEL.arch}, {len(PROBE_PLANS)} plans, "
                            f"{self.s.probe_steps} steps each")


# --- a layer's activation rate and backward factor -----------------------------------------------------
ARCHS = ("llama", "gpt")          # ModelSpec.arch: the block families the executor builds


def layer_bench_spec(arch: str, hidden: int, seq: int, dtype: str) -> tuple[ModelSpec, TrainSpec]:
    """One block of `arch`, `hidden` wide, in the executor's layouts: heads of 32 (at least 2), a
    Llama's kv heads half of them and its SwiGLU 8/3 x hidden (a multiple of 8), a GPT's MLP 4 x."""
    heads = max(2, hidden // 32)
    llama = arch == "llama"
    spec = ModelSpec(name=f"calibrate-{arch}-{hidden}", arch=arch, vocab_size=256, hidden=hidden, n_layers=1,
                     n_heads=heads, n_kv_heads=heads // 2 if llama else heads,
                     ffn_hidden=(8 * hidden // 3 + 7) // 8 * 8 if llama else 4 * hidden, max_seq_len=seq, bias=not llama)
    return spec, TrainSpec(batch=LAYER_BATCH, seq_len=seq, dtype=dtype, optimizer="adamw")


def layer_constants(layers: list[tuple[ModelSpec, TrainSpec, float, float]],
                    hw: HardwareProfile) -> tuple[dict[str, float], float | None, list[str]]:
    """(activation_bps per arch, backward_factor, notes) from the layer benchmark's timings.

    Per arch, least squares over the widths of forward - matmul part = a + act_bytes / rate, the
    matmul part as `hw`'s cost model charges it and `a` a fixed cost per task (the probe measures
    the executor's own); then backward = b + factor x (matmul part + act_bytes / rate), the cost
    model's backward. The factor is the mean over the archs. An arch whose timings do not grow with
    its activations (rate not positive) keeps memory bandwidth, and says so."""
    from tiertune.simulator.costs import CostModel

    rates: dict[str, float] = {}
    factors: list[float] = []
    notes: list[str] = []
    for arch in ARCHS:
        rows = [(CostModel(spec, train, hw), fwd, bwd) for spec, train, fwd, bwd in layers if spec.arch == arch]
        if len(rows) < 2:
            continue
        mats = np.array([cm.matmul_part_s(cm.layers[1]) for cm, _, _ in rows])
        acts = np.array([float(cm.layers[1].act_bytes) for cm, _, _ in rows])
        fwd = np.array([f for _, f, _ in rows])
        bwd = np.array([b for _, _, b in rows])
        _, inv = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), acts]), fwd - mats, rcond=None)[0]
        if inv <= 0:
            notes.append(f"{arch} block: forward time did not grow with activations beyond its matmuls; "
                         f"activations at memory bandwidth")
            continue
        rates[arch] = 1.0 / float(inv)
        _, factor = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), mats + acts * inv]), bwd, rcond=None)[0]
        if factor > 0:
            factors.append(float(factor))
    if rates:
        notes.append("activations GB/s " + ", ".join(f"{a} {r / 1e9:.3g}" for a, r in rates.items()))
    factor = float(np.mean(factors)) if factors else None
    if factor is not None:
        notes.append(f"backward {factor:.3g} x forward")
    return rates, factor, notes


def sparse_rate(samples: list[tuple[ModelSpec, TrainSpec, int, int, float]], hw: HardwareProfile) -> float | None:
    """FLOP/s of the sparse products from the benchmark's widths: seconds = a + compress_flops / rate
    (CostModel.compress_flops, `a` a fixed cost per task, which the probe measures in the executor);
    None when the time did not grow with the FLOPs."""
    from tiertune.simulator.costs import CostModel

    if len(samples) < 2:
        return None
    flops = np.array([CostModel(spec, train, hw).compress_flops(1, rank, nnz) for spec, train, rank, nnz, _ in samples])
    secs = np.array([t for *_, t in samples])
    _, inv = np.linalg.lstsq(np.column_stack([np.ones(len(flops)), flops]), secs, rcond=None)[0]
    return 1.0 / float(inv) if inv > 0 else None


# --- the runtime's fixed cost per task -------------------------------------------------------------------
# A Llama so small (2 blocks 32 wide, a byte vocabulary, one sequence of 8 tokens) that its arithmetic
# and bytes cost next to nothing: what each of its tasks takes in the executor, less the little the
# cost model charges for its size, is the runtime's own cost of that kind of task (Python issuing it,
# saved-tensor and gradient hooks, the SSD store's file calls), which no run of a real model can
# tell apart from the arithmetic.
PROBE_MODEL = ModelSpec(name="probe-llama", arch="llama", vocab_size=256, hidden=32, n_layers=2, n_heads=2,
                        n_kv_heads=1, ffn_hidden=64, max_seq_len=8)
PROBE_TRAIN = TrainSpec(batch=1, seq_len=8, dtype="fp32", optimizer="adamw")
# The contention benchmark's device work: one block big enough that its arithmetic counts (a few ms
# on one CPU core), small enough to repeat within the benchmark's second or two.
CONTENTION_MODEL = ModelSpec(name="contention-llama", arch="llama", vocab_size=256, hidden=128, n_layers=1,
                             n_heads=4, n_kv_heads=2, ffn_hidden=352, max_seq_len=64)
CONTENTION_TRAIN = TrainSpec(batch=4, seq_len=64, dtype="fp32", optimizer="adamw")
CONTENTION_COPY_BYTES = 8 * MiB   # a layer's weights or activations of the small models this runs
MAX_CONTENTION = 9.0              # a resource slows another 10x at most (as traces.fit caps it)
# Between them the executor's every kind of task, on each of its paths.
PROBE_PLANS = (
    LayerPlan(),                                                           # compute, device update
    LayerPlan(activations="recompute", update="fused"),                    # recompute, hook updates (LOMO)
    LayerPlan(optimizer="cpu"),                                            # grad, host update, writeback h2d
    LayerPlan(params="cpu", optimizer="cpu", activations="cpu", update="overlap"),   # load, offload, fetch
    LayerPlan(params="cpu", optimizer="gpu"),                              # writeback d2h
    LayerPlan(params="ssd", optimizer="ssd", activations="ssd", update="overlap"),   # SSD reads and writes
    LayerPlan(optimizer="cpu", update="overlap", grad_rank=8),             # LSP: compress, subspace update, decompress
)


def task_key(kind: str, resource: str, what: str) -> str:
    return f"{kind}.{resource}.{what}" if what else f"{kind}.{resource}"


def _probe_tasks(trace: Trace, plan: Plan, kinds: list[str],
                 contention: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """Per kind of task (key, see HardwareProfile.task_overheads) and layer kind: the mean seconds
    of one task over a trace's steady iterations. The executor records an update in the gradient
    hooks per parameter and the simulator one per layer: there, the mean per parameter times the
    parameters per layer. Means, not medians: what adds up to a step's expected time is each task's
    expected time, and on a machine shared with other work that includes the time slices a task
    now and then waits out (the two agree on a quiet machine). With `contention` (the profile's),
    each task's duration is taken back to what it would have been with nothing beside it, the
    inverse of what the engine does: d (1 - sum over busy s of f_s c_s / (1 + c_s)), f_s the share
    of its time s was busy; otherwise the engine would slow it down twice."""
    from tiertune.traces.fit import task_whats, with_overlaps

    ev = trace.steady_events()
    what = task_whats(ev, plan)
    d = own_durations(ev)
    if contention:
        busy = with_overlaps(trace.events).loc[ev.index]       # what ran beside it, from any iteration
        alone = np.ones(len(ev))
        for victim, row in contention.items():
            mine = (ev["resource"] == victim).to_numpy()
            for r, c in row.items():
                alone -= np.where(mine, busy[f"busy_{r}"].to_numpy(float) * c / (1.0 + c), 0.0)
        d = d * np.clip(alone, 0.0, 1.0)
    ev = ev.assign(d=d, key=[task_key(k, r, w) for k, r, w in zip(ev["kind"], ev["resource"], what)],
                   layer_kind=[kinds[int(i)] for i in ev["layer"]])
    per = ev.groupby(["key", "layer_kind"])["d"].mean()
    per_layer = ev.groupby(["key", "layer_kind", "layer", "iteration"]).size().groupby(["key", "layer_kind"]).median()
    many = per.index.get_level_values("key").str.endswith(".fused")
    return (per * per_layer.where(many, 1.0)).rename("d").reset_index()


# The device thread's own tasks: the time it spends between them (issuing the next layer's work,
# releasing the last one's) is charged to them.
ISSUED_BY_DEVICE = ("forward.gpu", "backward.gpu", "recompute.gpu", "update.gpu", "compress.gpu", "decompress.gpu")


def issue_gap_s(trace: Trace) -> float:
    """The device thread's time between its tasks, per task: over each steady iteration, the time
    from its first device task to the next iteration's less the device tasks' own time, divided by
    their number (mean over iterations). In a plan where it never waits for a copy, this is the
    Python that issues and retires each task outside its timed region."""
    ev = trace.events[trace.events["resource"] == "gpu"]
    ev = ev.assign(d=own_durations(ev))
    by_it = ev.groupby("iteration").agg(start=("start_s", "min"), busy=("d", "sum"), n=("d", "size")).sort_index()
    span = by_it["start"].diff().shift(-1)
    gaps = ((span - by_it["busy"]) / by_it["n"]).iloc[1:-1].dropna()
    return max(float(gaps.mean()), 0.0) if len(gaps) else 0.0


def handoff_s(device: str, repeats: int = 60, budget_s: float = 0.5) -> float:
    """One hand-off between the device thread and one of the executor's worker threads: half the
    round trip of an empty job submitted to an Engine (tiertune.executor.device) and waited for,
    at the GIL switch interval the executor steps with (mean). Every task a worker thread runs is
    handed to it and its result handed on, and a task's recorded time starts after the first."""
    import torch

    from tiertune.executor.device import Engine, Recorder
    from tiertune.executor.runtime import SWITCH_INTERVAL_S

    eng = Engine("h2d", Recorder(cuda=False), torch.device(device))
    prev = sys.getswitchinterval()
    sys.setswitchinterval(min(prev, SWITCH_INTERVAL_S))
    try:
        times: list[float] = []
        end = time.perf_counter() + budget_s
        for k in range(repeats + 5):
            t0 = time.perf_counter()
            eng.submit(lambda: None, "load", 0, 0).result()
            if k >= 5:
                times.append(time.perf_counter() - t0)
            if t0 > end and len(times) >= 5:
                break
    finally:
        sys.setswitchinterval(prev)
        eng.close()
    return float(np.mean(times)) / 2


def probe_overheads(base: HardwareProfile, run: Callable[[Plan], Trace], handoff: float = 0.0) -> dict[str, dict[str, float]]:
    """Run each probe plan (`run`: the executor, `executor_probe`) and take, per kind of task and
    layer kind, the mean measured duration less the mean the cost model of `base` predicts for
    the same task (its per-task terms set to 0): the fixed cost the size-dependent terms do not
    charge. Negative differences (noise around a cost the model already charges) are 0. The device
    thread's time between its tasks in the first plan (everything resident: it never waits for a
    copy) is added to each of its tasks (issue_gap_s), and `handoff` (handoff_s) to each task a
    worker thread runs."""
    from tiertune.simulator import simulate

    bare = base.replace(gpu_task_overhead_s=0.0, update_overhead_s=0.0, task_overheads={}, contention={})
    kinds = [c.kind for c in layer_costs(PROBE_MODEL, PROBE_TRAIN)]
    measured, predicted = [], []
    gap = 0.0
    for k, lp in enumerate(PROBE_PLANS):
        plan = Plan(model=PROBE_MODEL.name, hardware="probe", train=PROBE_TRAIN, layers=(lp,) * len(kinds))
        trace = run(plan)
        if k == 0:
            gap = issue_gap_s(trace)
        measured.append(_probe_tasks(trace, plan, kinds, base.contention))
        predicted.append(_probe_tasks(simulate(PROBE_MODEL, PROBE_TRAIN, bare, plan, iterations=2).trace, plan, kinds))
    meas = pd.concat(measured).groupby(["key", "layer_kind"])["d"].mean()   # over the plans that run it
    pred = pd.concat(predicted).groupby(["key", "layer_kind"])["d"].mean()
    out: dict[str, dict[str, float]] = {}
    for (key, lk), d in meas.items():
        device = key.split(".")[1] == "gpu"
        issued = (gap if key.startswith(ISSUED_BY_DEVICE) and not key.endswith(".fused") else 0.0) if device else handoff
        out.setdefault(key, {})[lk] = round(max(float(d) - float(pred.get((key, lk), 0.0)), 0.0) + issued, 9)
    return out


def executor_probe(offload_dir: Path, steps: int, device: str = "cpu") -> Callable[[Plan], Trace]:
    """A probe plan run for real: `steps` steady steps after one warm-up, SSD state under offload_dir."""
    from tiertune.executor.run import train_plan

    def run(plan: Plan) -> Trace:
        return train_plan(PROBE_MODEL, plan, steps + 1, device=device, offload_dir=offload_dir, seed=0,
                          progress=False).trace
    return run


# --- SSD ------------------------------------------------------------------------------------------------
def _aligned(nbytes: int) -> mmap.mmap:
    """An anonymous mapping: page-aligned, as O_DIRECT requires."""
    return mmap.mmap(-1, max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN))


def _open(path: Path, flags: int, direct: bool) -> int:
    return os.open(path, flags | (getattr(os, "O_DIRECT", 0) if direct else 0), 0o600)


def _stream(path: Path, view: memoryview, size: int, write: bool, direct: bool) -> float:
    """Seconds to write (and fsync) or read `size` bytes in SSD_CHUNK requests; a buffered write
    is fsync'ed and its pages dropped (posix_fadvise DONTNEED) so the next read hits the device."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY
    fd = _open(path, flags, direct)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, SSD_CHUNK):
            chunk = view[:min(SSD_CHUNK, size - off)]
            os.pwrite(fd, chunk, off) if write else os.preadv(fd, [chunk], off)
        if write:
            os.fsync(fd)
        secs = time.perf_counter() - t0
        if write and not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return secs
    finally:
        os.close(fd)


def _direct_works(path: Path, view: memoryview) -> bool:
    """O_DIRECT where the OS and filesystem take it (tmpfs, macOS and some overlays do not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        _stream(path, view, ALIGN, write=True, direct=True)
        _stream(path, view, ALIGN, write=False, direct=True)
        return True
    except OSError:
        return False


def ssd_bench(directory: Path, sizes: tuple[int, ...], repeats: int, m: Measurements):
    """Write then read one file per size in SSD_CHUNK requests; median of repeats; yields per size.

    O_DIRECT bypasses the page cache; without it, the write is fsync'ed and its pages dropped
    before the read, so the read comes from the device."""
    free = shutil.disk_usage(directory).free
    if free < 2 * max(sizes):
        raise InputError(f"--offload-dir {directory}: {free / MiB:.0f} MiB free, "
                         f"the SSD test needs {2 * max(sizes) / MiB:.0f} MiB")
    buf = _aligned(min(max(sizes), SSD_CHUNK))
    block = os.urandom(min(len(buf), MiB))          # incompressible, in case the device compresses
    buf.write(block * (len(buf) // len(block)))
    view = memoryview(buf)
    path = directory / f"tiertune-calibrate-{os.getpid()}.bin"
    try:
        direct = _direct_works(path, view)
        if direct:
            m.ssd_method = "O_DIRECT (page cache bypassed)"
        elif hasattr(os, "posix_fadvise"):
            m.ssd_method = "buffered: fsync + posix_fadvise DONTNEED before each read"
        else:
            m.ssd_method = "buffered, page cache NOT dropped (reads may be optimistic)"
        for size in sizes:
            writes, reads = [], []
            for _ in range(repeats):
                writes.append(_stream(path, view, size, write=True, direct=direct))
                reads.append(_stream(path, view, size, write=False, direct=direct))
            m.ssd += [("write", size, float(np.median(writes))), ("read", size, float(np.median(reads)))]
            yield
        m.ssd_duplex = _ssd_duplex(path, view, min(max(sizes), 64 * MiB), repeats, direct)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        view.release()
        buf.close()


def _ssd_duplex(path: Path, view: memoryview, size: int, repeats: int, direct: bool) -> bool:
    """Do a read and a write on two threads overlap (the executor's ssd_read and ssd_write engines
    are two threads)? Compares a read of `path` beside a write of a second file with the two one
    after the other; median of repeats. The first file holds `size` bytes from the sweep."""
    import threading

    other = path.with_name(path.name + ".w")
    wbuf = _aligned(len(view))
    wview = memoryview(wbuf)
    try:
        alone, both = [], []
        for _ in range(repeats):
            alone.append(_stream(path, view, size, write=False, direct=direct)
                         + _stream(other, wview, size, write=True, direct=direct))
            t0 = time.perf_counter()
            th = threading.Thread(target=_stream, args=(other, wview, size, True, direct))
            th.start()
            _stream(path, view, size, write=False, direct=direct)
            th.join()
            both.append(time.perf_counter() - t0)
        return float(np.median(both)) < 0.75 * float(np.median(alone))
    finally:
        with contextlib.suppress(FileNotFoundError):
            other.unlink()
        wview.release()
        wbuf.close()


# --- driver -------------------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: this torch build sees no CUDA GPU (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    return device


def calibrate(device: str | None = None, offload_dir: str | Path | None = None, quick: bool = False,
              device_mem_gib: float | None = None, name: str | None = None,
              progress: bool = True) -> tuple[HardwareProfile, Measurements]:
    """Run every microbenchmark and build the profile (nothing is written here)."""
    from tqdm import tqdm

    device = resolve_device(device)
    if device_mem_gib is not None and device_mem_gib <= 0:
        raise InputError(f"--device-mem must be positive, got {device_mem_gib}")
    if offload_dir is not None and not Path(offload_dir).is_dir():
        raise InputError(f"--offload-dir {offload_dir} is not a directory")
    s = settings_for(device, quick)
    bench = Bench(device, s)
    m = bench.m
    dtypes = bench.dtypes()
    steps = len(dtypes) + len(s.copy_sizes) * (2 if device == "cuda" else 1) + 1 + len(s.ssd_sizes) + 3
    with tqdm(total=steps, desc="calibrate", file=sys.stderr, disable=not progress, leave=False) as bar:
        for dt in dtypes:
            bar.set_postfix_str(f"matmul {dt}")
            bench.matmul(dt)
            bar.update()
        bar.set_postfix_str("copies")
        for _ in bench.copies():
            bar.update()
        duplex = bench.duplex()
        bar.set_postfix_str("memory bandwidth")
        bench.memory_bandwidth()
        bar.update()
        bar.set_postfix_str("ssd")
        with contextlib.ExitStack() as stack:
            where = Path(offload_dir) if offload_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiertune-ssd-")))
            for _ in ssd_bench(where, s.ssd_sizes, s.repeats, m):
                bar.update()
            ssd_capacity = shutil.disk_usage(where).free
            bar.set_postfix_str("cpu optimizers")
            bench.optimizers()
            bar.set_postfix_str("layers")
            bench.layers()
            bench.sparse_products()
            bar.update()
            bar.set_postfix_str("contention")
            bench.contention()
            bar.update()
            bar.set_postfix_str("per-task costs")
            profile = build_profile(m, device, duplex, ssd_capacity, device_mem_gib, name, bench)
            bench.overheads(profile, where)
            bar.update()
    # The probe measured every task's fixed cost, the per-layer task and update overheads included.
    return profile.replace(task_overheads=m.task_overheads, gpu_task_overhead_s=0.0, update_overhead_s=0.0,
                           description=_plain(profile.description + "; " + m.notes[-1])), m


def _plain(text: str) -> str:
    """to_toml writes strings between double quotes without escaping: keep quotes and backslashes out."""
    return text.replace('"', "").replace("'", "").replace("\\", "/")


def build_profile(m: Measurements, device: str, duplex: bool, ssd_capacity: int, device_mem_gib: float | None,
                  name: str | None, bench: Bench) -> HardwareProfile:
    torch = bench.torch
    host_mem = host_memory_bytes()
    notes = []
    # matmul: peak per dtype; efficiency per FLOPs is the median over dtypes of rate / that dtype's peak
    peaks: dict[str, float] = {}
    for dt, flops, secs in m.matmul:
        peaks[dt] = max(peaks.get(dt, 0.0), flops / secs)
    matmul_eff = efficiency_curve([f for _, f, _ in m.matmul], [f / t / peaks[dt] for dt, f, t in m.matmul])

    def copies(direction: str, pinned: bool) -> list[tuple[int, float]]:
        return [(n, t) for d, p, n, t in m.copies if d == direction and p == pinned]

    pinned = device == "cuda"
    _, pcie_eff = transfer_table(copies("h2d", pinned) + copies("d2h", pinned), COPY_LATENCY_S)
    h2d_bps, _ = transfer_table(copies("h2d", pinned), COPY_LATENCY_S)
    d2h_bps, _ = transfer_table(copies("d2h", pinned), COPY_LATENCY_S)
    if pinned:
        pageable = (transfer_table(copies("h2d", False), COPY_LATENCY_S)[0]
                    + transfer_table(copies("d2h", False), COPY_LATENCY_S)[0]) / (h2d_bps + d2h_bps)
    else:
        pageable = 1.0
        notes.append("CPU as device: h2d/d2h are host memcpys (tensor.copy_) between two buffers; "
                     "no pinned memory without CUDA, so pageable_factor = 1")
    ssd_read, ssd_eff = transfer_table([(n, t) for k, n, t in m.ssd if k == "read"], SSD_LATENCY_S)
    ssd_write, _ = transfer_table([(n, t) for k, n, t in m.ssd if k == "write"], SSD_LATENCY_S)
    notes.append(f"SSD: {m.ssd_method}")

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu_name, gpu_mem = props.name, props.total_memory
        if device_mem_gib is not None:
            gpu_mem = int(device_mem_gib * GiB)
            notes.append(f"GPU memory budget {device_mem_gib:g} GiB of {props.total_memory / GiB:.1f}")
    else:
        gpu_name = f"CPU as device ({cpu_name()})"
        gpu_mem = int(device_mem_gib * GiB) if device_mem_gib is not None else host_mem // 4
        notes.append(f"device memory budget {gpu_mem / GiB:.3g} GiB "
                     f"({'--device-mem' if device_mem_gib is not None else 'default: a quarter of host RAM'})")
    notes += m.notes
    desc = f"measured by tiertune calibrate on {platform.node() or 'this machine'}, {time.strftime('%Y-%m-%d')}; " + "; ".join(notes)
    prof = HardwareProfile(
        name=name or f"local-{device}",
        description=_plain(desc),
        gpu_name=_plain(gpu_name),
        gpu_mem_bytes=gpu_mem,
        gpu_mem_bw_bps=m.membw_bps,
        gpu_flops=peaks,
        matmul_efficiency=matmul_eff,
        gpu_reserve_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,   # a CUDA context; none on a CPU
        h2d_bps=h2d_bps, d2h_bps=d2h_bps, pcie_duplex=duplex,
        pageable_factor=round(min(max(pageable, 0.01), 1.0), 4),
        pcie_efficiency=pcie_eff,
        cpu_name=_plain(cpu_name()),
        cpu_cores=os.cpu_count() or 1,
        cpu_mem_bytes=host_mem,
        cpu_adam_params_per_s=m.adam_params_per_s,
        cpu_sgd_params_per_s=m.sgd_params_per_s,
        cpu_workers=1,                                  # one torch optimizer step uses all threads
        ssd_count=1,
        ssd_read_bps=ssd_read, ssd_write_bps=ssd_write,
        ssd_capacity_bytes=ssd_capacity,
        ssd_duplex=m.ssd_duplex,
        ssd_efficiency=ssd_eff,
        contention=m.contention,
        source="calibrated",
    )
    # the layer's non-matmul rate and backward factor, net of the matmul time this profile charges
    rates, factor, layer_notes = layer_constants(m.layers, prof)
    sparse = sparse_rate(m.sparse, prof)
    if sparse:
        layer_notes.append(f"sparse products {sparse / 1e9:.3g} GFLOP/s")
    return prof.replace(activation_bps=rates, backward_factor=factor or prof.backward_factor, sparse_flops=sparse or 0.0,
                        description=_plain("; ".join([desc, *layer_notes])))
