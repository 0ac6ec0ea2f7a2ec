"""The executor: a real torch training run of any lossless Plan, recorded as a measured Trace.

It runs the model layer by layer (MegaTrain-style) instead of as one autograd graph, so each
layer's state can live where the plan says and move only when needed:

  forward   for each layer: make its weights current on the device (resident, or fetched from
            host memory / SSD ahead of use, `prefetch_depth` layers deep, by the copy engines),
            run it, and per `activations`
              keep       keep its autograd graph on the device
              cpu / ssd  keep the graph but pack every saved tensor to host memory (and on to the
                         SSD) through saved_tensors_hooks; parameters are recognised in the pack
                         hook and saved by reference, since their weights are fetched again
              recompute  run it under no_grad and keep only its input
  backward  in reverse: fetch weights and saved tensors ahead (not when autograd asks), re-run a
            recomputed layer with grad, `torch.autograd.backward(out, grad_out)`; the layer's input
            gradient (caught by a small autograd function at the layer boundary) feeds the layer
            below; the parameter gradients go to the optimizer per `update`
              after      kept until the whole backward is done, then updates in forward order
                         (ZeRO-Offload: so the next step's forward can start on early layers)
              overlap    handed on as soon as the layer is done: copied to the host and updated
                         by CPU AdamW in a worker thread while backward goes on (Fuyou, MegaTrain)
              fused      applied inside backward by a post-accumulate-grad hook on each parameter,
                         the gradient freed at once (LOMO); works with any optimizer, since each
                         update only needs its own parameter's gradient (no clipping: Plan says so)
  optimizer state lives on its `optimizer` tier: the device, host memory, or the SSD (read into
  host memory for the update and written back, Fuyou / ZeRO-Infinity); fp32 master weights beside
  bf16 compute weights when train.dtype is bf16.

A layer with `grad_rank` d (LSP-Offload, compress.py) keeps its weights on the device and its
optimizer on the CPU, but only d x d crosses PCIe per weight matrix: after the layer's backward
(accumulated over micro-batches) the device samples the gradient for the projector fit, checks
and refits per the plan's lsp_* globals, and computes S = P^T G Q (`compress`); S goes to the host
(`grad`, in the compute dtype), the CPU runs AdamW on it in the subspace (`update`), the d x d
update comes back (`writeback`), and the device adds P U Q^T to the weights (`decompress`) when
the layer is next used. Vectors (norms, biases) take the same path uncompressed. As in LSP, there
is no separate fp32 master: the update is added to the device weights in their own dtype (a 7B
model's fp32 master would not fit beside its bf16 weights on LSP's 24 GB card, and a host master
would need the full-size update back); the CPU holds only the subspace moments.

The device is CUDA or, when there is none, the CPU standing in for it through the same code: the
same copies (memcpy in a copy thread instead of a DMA on a copy stream), the same byte budget.
Every task lands in the trace with the simulator's kind and resource names.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tiertune.errors import InputError
from tiertune.executor.compress import LayerCompression
from tiertune.executor.data import loss_weights
from tiertune.executor.device import (GiB, BudgetExceeded, Engine, HostPool, Meter, Recorder, done, nbytes,
                                      wait)
from tiertune.executor.updates import OptimConfig, state_shapes
from tiertune.executor.updates import step as optim_step
from tiertune.schedule import Plan
from tiertune.traces.trace import Trace
from tiertune.vocab import COPY_ENGINES
from tiertune.workload import ModelSpec, layer_costs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The GIL switch interval during a step (Python's default is 5 ms); see Executor.step.
SWITCH_INTERVAL_S = 2e-4


class _Boundary(torch.autograd.Function):
    """Identity at a layer's input that hands the input gradient to `box` in backward.

    The layer's graph then starts here instead of at a leaf, so nothing is accumulated into (and
    nothing keeps alive) the input tensor: with offloaded activations the input's device memory
    is really freed after forward.
    """

    @staticmethod
    def forward(ctx, x, anchor, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.box.append(g)
        return None, None, None


@dataclass
class _ParamRef:
    """A saved tensor that is (a view of) the layer's weights: rebuilt from the current weights."""
    size: tuple
    stride: tuple
    offset: int


@dataclass
class _Slot:
    """A saved activation offloaded to the host (and the SSD); `dev` is its copy fetched back."""
    t: torch.Tensor | None
    host: torch.Tensor | None = None
    dev: torch.Tensor | None = None


@dataclass
class _Ctx:
    """What one layer keeps from forward to backward, for one micro-batch."""
    mode: str
    out: torch.Tensor | None = None          # the graph root (or None when recomputed)
    inp: torch.Tensor | None = None          # the layer input when recomputed
    targets: torch.Tensor | None = None
    box: list = field(default_factory=list)
    kept: dict = field(default_factory=dict)            # storage ptr -> bytes of kept saved tensors
    slots: list = field(default_factory=list)
    dedupe: dict = field(default_factory=dict)
    dev_bytes: int = 0                       # device bytes of fetched-back activations
    bytes: int = 0                           # bytes offloaded
    metas: list = field(default_factory=list)   # (shape, dtype, stride) of each offloaded tensor
    offload: Future | None = None
    written: Future | None = None
    fetch: Future | None = None


class _Layer:
    """One layer's runtime state: where its weights and optimizer state are, and what is in flight."""

    def __init__(self, i: int, name: str, module: nn.Module, lp, dtype: torch.dtype):
        self.i, self.name, self.module, self.lp = i, name, module, lp
        named = list(module.named_parameters())
        if not named:
            raise InputError(f"layer {name} has no parameters")
        self.pnames = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self.wbytes = off * torch.tensor([], dtype=dtype).element_size()
        self.home: torch.Tensor | None = None     # compute-dtype flat weights at home (device or host)
        self.dev: torch.Tensor | None = None      # flat weights on the device while materialised
        self.fetching: torch.Tensor | None = None
        self.fetch: Future | None = None
        self.stage: torch.Tensor | None = None    # host staging buffer of an SSD weight read
        self.opt: dict[str, torch.Tensor] | None = None   # "master" + "<k>.<state>" (None when on SSD)
        self.opt_read: Future | None = None
        self.shared_master = False                # fp32 weights at home are the master (same tier)
        self.pending = None                       # futures until its last update is home
        self.grad_futs: list[Future] = []
        self.ghost: torch.Tensor | None = None    # host fp32 gradient accumulator
        self.gacc: list[torch.Tensor | None] | None = None   # device gradients (device optimizer, LSP)
        # LSP-Offload (grad_rank set): projectors on the device, subspace AdamW on the CPU
        self.lsp: LayerCompression | None = None
        self.lsp_host: dict[str, torch.Tensor] | None = None   # host copies of S until the CPU step
        self.lsp_dev: dict[str, torch.Tensor] | None = None    # device buffers the update lands in
        self.lsp_norms: list[torch.Tensor] | None = None       # full-gradient norms (for clipping)
        self.lsp_apply: tuple[dict, int] | None = None         # (update buffers, iteration) to apply
        self.lsp_sample_bytes = 0                               # device bytes of gradients kept for refits

    def view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        o = self.offsets[k]
        return flat[o:o + self.shapes[k].numel()].view(self.shapes[k])

    def bind(self, flat: torch.Tensor | None, empty: torch.Tensor) -> None:
        """Point the module's parameters at views of `flat` (or at nothing)."""
        for k, p in enumerate(self.params):
            p.data = self.view(flat, k) if flat is not None else empty


class Executor:
    """Trains `layers` (the executor layer interface, see models.py) under `plan`.

    `device` "cpu" (the CPU stands in for the GPU) or "cuda"; `gpu_mem_bytes` the device budget
    (None: unlimited on CPU, the card on CUDA); `offload_dir` holds SSD-homed state (a temporary
    directory when None and a plan needs it).
    """

    def __init__(self, layers: list[nn.Module], spec: ModelSpec, plan: Plan, *, device: str = "cpu",
                 gpu_mem_bytes: int | None = None, offload_dir: str | Path | None = None,
                 optim: OptimConfig | None = None, hardware: str | None = None):
        plan.check_model(len(layers))
        for j, lp in enumerate(plan.layers):
            if lp.grad_rank is None:
                continue
            if lp.params != "gpu" or lp.optimizer != "cpu" or lp.update == "fused":
                raise InputError(f"layers[{j}].grad_rank: the executor runs LSP compression with params gpu, optimizer "
                                 f"cpu, update after/overlap (the device applies P U Q^T to resident weights); got "
                                 f"params {lp.params}, optimizer {lp.optimizer}, update {lp.update}")
            if plan.train.optimizer != "adamw":
                raise InputError(f"layers[{j}].grad_rank: LSP compression runs AdamW in the subspace, "
                                 f"train.optimizer is {plan.train.optimizer!r}")
        if plan.train.grad_clip is not None and any(lp.update != "after" for lp in plan.layers):
            raise InputError("train.grad_clip with overlap/fused updates needs a second backward pass, which the "
                             "executor does not run yet; use update 'after' or no clipping")
        unsupported = [name for name, on in (
            ("global.cpu_checkpointing", plan.globals.cpu_checkpointing),
            ("train.chunked_loss", plan.train.chunked_loss),
            ("train.master_weights false with a 16-bit dtype", not plan.train.master_weights and plan.train.dtype != "fp32"),
        ) if on]
        if unsupported:
            # The cost model can judge these settings; the executor does not run them yet.
            raise InputError(f"the executor does not run {', '.join(unsupported)} yet (simulate-only settings)")
        if device not in ("cpu", "cuda"):
            raise InputError(f"--device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device available (torch.cuda.is_available() is False)")
        self.spec, self.plan, self.train = spec, plan, plan.train
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.dtype = DTYPES[self.train.dtype]
        self.cfg = optim or OptimConfig(name=self.train.optimizer)
        if self.cfg.name != self.train.optimizer:
            raise InputError(f"optimizer config {self.cfg.name!r} differs from plan's train.optimizer {self.train.optimizer!r}")
        self.depth = plan.globals.prefetch_depth
        self.hardware = hardware or ("local-cuda" if self.cuda else "local-cpu")
        if self.cuda and gpu_mem_bytes is None:
            gpu_mem_bytes = torch.cuda.get_device_properties(self.dev).total_memory
        self.budget = gpu_mem_bytes
        self.rec = Recorder(self.cuda)
        self.meter = Meter(gpu_mem_bytes, self.rec.clock, self.cuda)
        self.pool = HostPool(self.meter, pin=self.cuda)
        self.costs = layer_costs(spec, self.train)
        self.layers = [_Layer(i, n, m, lp, self.dtype)
                       for i, (n, m, lp) in enumerate(zip(spec.layer_names, layers, plan.layers))]
        g = plan.globals
        for L in self.layers:
            if L.lp.grad_rank is not None:     # built on the CPU first: the budget check needs its size
                L.lsp = LayerCompression(dict(zip(L.pnames, (tuple(s) for s in L.shapes))), L.lp.grad_rank,
                                         g.lsp_nnz_per_row, g.lsp_check_every, g.lsp_refit_threshold,
                                         g.lsp_fit_samples, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                         weight_decay=self.cfg.weight_decay, seed=L.i)
        self.lsp_log: list[dict] = []     # per projector check: step, layer, error before/after, refit
        self._empty = torch.empty(0, dtype=self.dtype, device=self.dev)
        self._anchor = torch.empty(0, device=self.dev, requires_grad=True)
        self.step_no = 0            # optimizer steps done
        self.it = 0                 # trace iteration of the step in progress
        self.losses: list[float] = []
        self.ctx: dict[tuple[int, int], _Ctx] = {}     # (layer, micro-batch) -> what forward kept
        self.check_budget()

        self._tmpdir = None
        self.store = None
        if any("ssd" in (lp.params, lp.optimizer, lp.activations) for lp in plan.layers):
            from tiertune.executor.ssd import SSDStore
            if offload_dir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="tiertune-offload-")
                offload_dir = self._tmpdir
            self.store = SSDStore(offload_dir)
        if self.cuda and gpu_mem_bytes is not None:
            total = torch.cuda.get_device_properties(self.dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem_bytes / total), self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.eng = {r: Engine(r, self.rec, self.dev) for r in COPY_ENGINES}
        for L in self.layers:
            self._place(L)

    # --- set-up -----------------------------------------------------------------------------------
    def resident_bytes(self) -> dict[str, int]:
        """Device bytes the plan needs before any activation: resident weights, device optimizer
        state and gradient buffers, and the window of streamed layers in flight."""
        e = torch.tensor([], dtype=self.dtype).element_size()
        weights = optim = grads = 0
        streamed = []
        for L in self.layers:
            lp = L.lp
            if lp.params == "gpu":
                weights += L.wbytes
            else:
                streamed.append(L.wbytes)
            if L.lsp is not None:
                # projectors; gradients accumulated over micro-batches stay full-size until compressed
                optim += L.lsp.device_bytes()
                if self.train.grad_accum > 1:
                    grads += L.numel * e
            if lp.optimizer == "gpu":
                master = 0 if (self.dtype == torch.float32 and lp.params == "gpu") else 4 * L.numel
                optim += master + sum(4 * math.prod(s) for shape in L.shapes
                                      for s in state_shapes(self.cfg, shape).values())
                if lp.update != "fused":
                    grads += L.numel * e
        window = sum(sorted(streamed, reverse=True)[:self.depth + 2])    # depth ahead + the one in use + head kept
        return {"weights": weights, "optimizer": optim, "gradients": grads, "streaming": window}

    def check_budget(self) -> None:
        if self.budget is None:
            return
        need = self.resident_bytes()
        total = sum(need.values())
        if total > self.budget:
            parts = ", ".join(f"{k} {v / GiB:.4g}" for k, v in need.items() if v)
            raise InputError(f"plan needs {total / GiB:.4g} GiB on the device before activations ({parts}) but the "
                             f"device budget is {self.budget / GiB:.4g} GiB")

    def _place(self, L: _Layer) -> None:
        lp = L.lp
        m = L.module
        for mod in m.modules():                  # buffers (e.g. HF rotary tables) live on the device
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.to(self.dev)
        flat32 = torch.cat([p.detach().reshape(-1).float().cpu() for p in L.params])
        compute = flat32.to(self.dtype)
        L.shared_master = self.dtype == torch.float32 and lp.optimizer_beside_weights
        if L.lsp is not None:
            self.meter.alloc("gpu", L.wbytes, f"resident weights of {L.name}")
            L.home = compute.to(self.dev, copy=True)
            L.bind(L.home, self._empty)
            L.lsp.to(self.dev)
            self.meter.alloc("gpu", L.lsp.device_bytes(), f"LSP projectors of {L.name}")
            L.opt_bytes = L.lsp.state_bytes()
            self.meter.alloc("cpu", L.opt_bytes)
            return
        if lp.params == "gpu":
            self.meter.alloc("gpu", L.wbytes, f"resident weights of {L.name}")
            L.home = compute.to(self.dev, copy=True)
            L.bind(L.home, self._empty)
        else:
            L.bind(None, self._empty)
            if lp.params == "cpu":
                L.home = self.pool.get((L.numel,), self.dtype)
                L.home.copy_(compute)
            else:
                self._ssd_write_sync(f"w{L.i}", {"w": compute})
        opt = {} if L.shared_master else {"master": flat32.clone()}
        for k, shape in enumerate(L.shapes):
            for s, sh in state_shapes(self.cfg, shape).items():
                opt[f"{k}.{s}"] = torch.zeros(sh)
        L.opt_bytes = sum(nbytes(t) for t in opt.values())
        if lp.optimizer == "gpu":
            self.meter.alloc("gpu", L.opt_bytes, f"optimizer state of {L.name}")
            L.opt = {k: v.to(self.dev) for k, v in opt.items()}
            if lp.update != "fused":
                self.meter.alloc("gpu", L.wbytes, f"gradient buffer of {L.name}")
        elif lp.optimizer == "cpu":
            L.opt = {}
            for k, v in opt.items():
                L.opt[k] = self.pool.get(v.shape, v.dtype)
                L.opt[k].copy_(v)
        else:
            self._ssd_write_sync(f"opt{L.i}", opt)
        if lp.update == "fused":
            for k, p in enumerate(L.params):
                p.register_post_accumulate_grad_hook(lambda p, L=L, k=k: self._fused_hook(L, k, p))

    def _ssd_write_sync(self, key: str, tensors: dict) -> None:
        self.store.write(key, tensors)
        self.meter.set("ssd", self.store.bytes_used())

    # --- weights --------------------------------------------------------------------------------
    def _master(self, L: _Layer, opt: dict, k: int) -> torch.Tensor:
        return L.view(L.home if L.shared_master else opt["master"], k)

    def _issue_fetch(self, i: int, phase: str, force: bool = False) -> None:
        """Start bringing layer i's weights to the device (no-op when resident or under way).
        Not before its last update is home: without `force` this just skips (a later call retries)."""
        if not 0 <= i < len(self.layers):
            return
        L = self.layers[i]
        if L.lp.params == "gpu" or L.dev is not None or L.fetch is not None:
            return
        if not done(L.pending):
            if not force:
                return
            wait(L.pending)
        if force:
            self.meter.alloc("gpu", L.wbytes, f"streamed weights of {L.name}")
        elif not self.meter.try_alloc("gpu", L.wbytes):
            return                           # prefetching is best effort within the budget

        buf = torch.empty(L.numel, dtype=self.dtype, device=self.dev)
        L.fetching = buf
        tag = "w." + phase
        if L.lp.params == "cpu":
            L.fetch = self.eng["h2d"].submit(lambda: buf.copy_(L.home, non_blocking=True), "load", i, self.it,
                                             L.wbytes, tag)
            return
        L.stage = self.pool.get((L.numel,), self.dtype)
        stage = L.stage
        read = self.eng["ssd_read"].submit(lambda: self.store.read(f"w{i}", {"w": stage}), "ssd_read", i,
                                           self.it, L.wbytes, tag)
        L.fetch = self.eng["h2d"].submit(lambda: buf.copy_(stage, non_blocking=True), "load", i, self.it,
                                         L.wbytes, tag, after=[read])

    def _materialise(self, i: int, phase: str) -> None:
        L = self.layers[i]
        if L.lp.params == "gpu":
            wait(L.pending)
            self._lsp_apply(L)
            return
        if L.dev is not None:
            return
        self._issue_fetch(i, phase, force=True)
        wait(L.fetch)
        L.dev, L.fetching, L.fetch = L.fetching, None, None
        if L.stage is not None:
            self.pool.put(L.stage)
            L.stage = None
        L.bind(L.dev, self._empty)

    def _release(self, i: int) -> None:
        L = self.layers[i]
        if L.lp.params != "gpu" and L.dev is not None:
            L.bind(None, self._empty)
            L.dev = None
            self.meter.free("gpu", L.wbytes)

    def _flat(self, L: _Layer) -> torch.Tensor:
        return L.home if L.lp.params == "gpu" else L.dev

    # --- saved tensors ----------------------------------------------------------------------------
    def _hooks(self, L: _Layer, ctx: _Ctx, mode: str):
        flat = self._flat(L)
        wstore = flat.untyped_storage().data_ptr()

        def pack(t: torch.Tensor):
            if t.device == self.dev and t.numel() and t.untyped_storage().data_ptr() == wstore:
                return _ParamRef(tuple(t.shape), tuple(t.stride()), t.storage_offset())
            if mode == "keep" or t.device != self.dev or t.numel() == 0:
                ptr = t.untyped_storage().data_ptr()
                if t.device == self.dev and ptr not in ctx.kept:
                    n = t.untyped_storage().nbytes()
                    self.meter.alloc("gpu", n, f"activations of {L.name}")
                    ctx.kept[ptr] = n
                return t
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            slot = ctx.dedupe.get(key)
            if slot is None:
                self.meter.alloc("gpu", nbytes(t), f"activations of {L.name}")
                slot = ctx.dedupe[key] = _Slot(t)
                ctx.slots.append(slot)
            return slot

        def unpack(x):
            if isinstance(x, _ParamRef):
                return self._flat(L).detach().as_strided(x.size, x.stride, x.offset)
            if isinstance(x, _Slot):
                if x.dev is None:
                    wait(ctx.fetch)
                return x.dev
            return x
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _offload_acts(self, L: _Layer, ctx: _Ctx, mb: int) -> None:
        """Copy the layer's packed tensors to host buffers (and on to the SSD) off the main thread."""
        slots = ctx.slots
        ctx.dedupe = {}
        total = sum(nbytes(s.t) for s in slots)
        for s in slots:
            s.host = self.pool.like(s.t)
        ctx.bytes = total
        ctx.metas = [(s.host.shape, s.host.dtype, s.host.stride()) for s in slots]

        def copy_out():
            for s in slots:
                s.host.copy_(s.t, non_blocking=True)
            return None

        def drop():
            for s in slots:
                s.t = None
            self.meter.free("gpu", total, promised=True)

        self.meter.promise("gpu", total)
        ctx.offload = self.eng["d2h"].submit(copy_out, "offload", L.i, self.it, total, "act", mb=mb, then=drop)
        if L.lp.activations == "ssd":
            key = f"a{L.i}.mb{mb}"

            def write():
                self.store.write(key, {str(j): s.host for j, s in enumerate(slots)})
                self.meter.set("ssd", self.store.bytes_used())
                for s in slots:                     # on the SSD now: the host buffers go back
                    self.pool.put(s.host)
                    s.host = None
            ctx.written = self.eng["ssd_write"].submit(write, "ssd_write", L.i, self.it, total, "act",
                                                       after=[ctx.offload], mb=mb)

    def _fetch_acts(self, i: int, force: bool = False, mb: int = 0) -> None:
        if not 0 <= i < len(self.layers):
            return
        ctx = self.ctx.get((i, mb))
        if ctx is None or ctx.mode not in ("cpu", "ssd") or ctx.fetch is not None:
            return
        slots, total = ctx.slots, ctx.bytes
        if ctx.mode == "ssd" and not force and not done(ctx.written):
            return                           # stays in order behind its write; retried next layer
        if force:
            self.meter.alloc("gpu", total, f"fetched activations of {self.layers[i].name}")
        elif not self.meter.try_alloc("gpu", total):
            return
        if ctx.mode == "ssd":
            stages = [self.pool.get(*m) for m in ctx.metas]
            key = f"a{i}.mb{mb}"
            read = self.eng["ssd_read"].submit(
                lambda: self.store.read(key, {str(j): st for j, st in enumerate(stages)}), "ssd_read", i,
                self.it, total, "act", after=[ctx.written], mb=mb)
            srcs, after = stages, [read]
        else:
            srcs, after = [s.host for s in slots], [ctx.offload]
        ctx.dev_bytes = total
        devs = [torch.empty_like(h, device=self.dev) for h in srcs]

        def copy_in():
            for d, h in zip(devs, srcs):
                d.copy_(h, non_blocking=True)
            return None

        def done_cb():
            for s, d in zip(slots, devs):
                s.dev = d
            for h in srcs:
                self.pool.put(h)
            for s in slots:
                s.host = None
        ctx.fetch = self.eng["h2d"].submit(copy_in, "fetch", i, self.it, total, "act", after=after, mb=mb,
                                           then=done_cb)

    # --- the step -------------------------------------------------------------------------------
    def _run(self, L: _Layer, x: torch.Tensor, ctx: _Ctx, boundary: bool) -> torch.Tensor:
        if boundary and L.i > 0:
            x = _Boundary.apply(x.detach(), self._anchor, ctx.box)
        if L.i == len(self.layers) - 1:
            return L.module(x, ctx.targets)
        return L.module(x)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step; tokens/targets [grad_accum * batch, seq] are split into micro-batches.
        Targets equal to IGNORE (-100) carry no loss (padding, prompts). Returns the mean loss
        over the step's loss-carrying targets, the gradient being that mean's."""
        # The compute thread issues hundreds of small ops per layer, each needing the GIL back from
        # the copy / SSD / optimizer threads; at Python's default 5 ms switch interval it queued
        # behind their Python work (a ZeRO-Offload forward ran 2.4x slower beside CPU Adam than in
        # a gpu-only run, on a CPU standing in for the GPU; 1.1x at 0.2 ms).
        prev = sys.getswitchinterval()
        sys.setswitchinterval(min(prev, SWITCH_INTERVAL_S))
        try:
            return self._step(tokens, targets)
        finally:
            sys.setswitchinterval(prev)

    def _step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        accum = self.train.grad_accum
        if tokens.shape[0] % accum:
            raise InputError(f"batch of {tokens.shape[0]} sequences does not split into {accum} micro-batches")
        self.it = self.step_no
        parts = list(zip(tokens.chunk(accum), targets.chunk(accum)))
        weights = loss_weights([tg for _, tg in parts])
        loss = 0.0
        try:
            for mb, ((tk, tg), w) in enumerate(zip(parts, weights)):
                mb_loss = self._micro_batch(tk.to(self.dev), tg.to(self.dev), mb, accum, w)
                loss += w * mb_loss if w else 0.0
        except torch.OutOfMemoryError as exc:
            # the allocator is capped at the budget: what our accounting does not see (kernel
            # workspaces, fragmentation) ends here, as a budget error rather than a traceback
            raise BudgetExceeded(f"device budget {self.budget / GiB:.4g} GiB exceeded on CUDA: "
                                 f"{str(exc).splitlines()[0]}") from None
        self._after_updates()
        self.step_no += 1
        self.rec.flush()
        self.losses.append(loss)
        return loss

    def _micro_batch(self, tokens, targets, mb: int, accum: int, weight: float) -> float:
        n = len(self.layers)
        self.ctx = {}
        x = tokens
        # ---- forward ----
        for i, L in enumerate(self.layers):
            for j in range(i, i + self.depth + 1):
                self._issue_fetch(j, "fwd")
            self._materialise(i, "fwd")
            mode = L.lp.activations
            ctx = self.ctx[(i, mb)] = _Ctx(mode, targets=targets if i == n - 1 else None)
            c = self.costs[i]
            with self.rec.timed("forward", i, "gpu", self.it, flops=c.fwd_flops, mb=mb):
                if mode == "recompute":
                    with torch.no_grad():
                        out = self._run(L, x, ctx, boundary=False)
                    ctx.inp = x
                    if x.is_floating_point():
                        self.meter.alloc("gpu", nbytes(x), f"checkpoint of {L.name}")
                else:
                    with self._hooks(L, ctx, mode):
                        out = self._run(L, x, ctx, boundary=True)
                    ctx.out = out
            if mode in ("cpu", "ssd"):
                self._offload_acts(L, ctx, mb)
                prev = self.ctx.get((i - 1, mb))
                if prev is not None and prev.out is not None:
                    # its data now lives in this layer's offloaded copy; keep only the graph root
                    prev.out.data = torch.empty(1, dtype=prev.out.dtype, device=self.dev).expand(prev.out.shape)
            if i < n - 1:
                self._release(i)
            x = out
        loss = float(out.detach())
        # ---- backward ----
        grad = torch.tensor(weight, device=self.dev)
        last_mb = mb == accum - 1
        for i in reversed(range(n)):
            L = self.layers[i]
            for j in range(i, i - self.depth - 1, -1):
                self._issue_fetch(j, "bwd")
                self._fetch_acts(j, mb=mb)
                self._prefetch_opt(j, last_mb, force=j == i)
            self._materialise(i, "bwd")
            self._fetch_acts(i, force=True, mb=mb)
            ctx = self.ctx[(i, mb)]
            c = self.costs[i]
            root = ctx.out
            if ctx.mode == "recompute":
                with self.rec.timed("recompute", i, "gpu", self.it, flops=c.fwd_flops, mb=mb):
                    with self._hooks(L, ctx, "keep"):
                        root = self._run(L, ctx.inp, ctx, boundary=True)
            self._fused_ctx = (mb, last_mb)
            with self.rec.timed("backward", i, "gpu", self.it, flops=c.bwd_flops, mb=mb):
                torch.autograd.backward(root, grad)
            self.ctx.pop((i, mb), None)
            grad = ctx.box[0] if i > 0 else None
            self._free_ctx(ctx)
            self._after_backward(L, mb, last_mb)
            self._release(i)
        return loss

    def _free_ctx(self, ctx: _Ctx) -> None:
        freed = sum(ctx.kept.values()) + ctx.dev_bytes
        if ctx.mode == "recompute" and ctx.inp is not None and ctx.inp.is_floating_point():
            freed += nbytes(ctx.inp)
        if freed:
            self.meter.free("gpu", freed)
        for s in ctx.slots:
            s.dev = None
        ctx.kept, ctx.slots, ctx.out, ctx.inp = {}, [], None, None

    # --- gradients and updates ------------------------------------------------------------------
    def _after_backward(self, L: _Layer, mb: int, last_mb: bool) -> None:
        lp = L.lp
        if lp.update == "fused":
            if last_mb:
                L.pending = self._publish(L, L.opt if lp.optimizer != "ssd" else wait(L.opt_read))
                L.opt_read = None
            return
        if L.lsp is not None:
            self._lsp_grads(L, mb, last_mb)
            return
        grads = [p.grad for p in L.params]
        for p in L.params:
            p.grad = None
        if lp.optimizer == "gpu":
            if L.gacc is None:
                L.gacc = grads
            else:
                for a, g in zip(L.gacc, grads):
                    a.add_(g)
            if last_mb and lp.update == "overlap":
                self._gpu_update(L, 1.0)
            return
        gbytes = sum(nbytes(g) for g in grads)
        self.meter.alloc("gpu", gbytes, f"gradients of {L.name}")
        if L.ghost is None:
            L.ghost = self.pool.get((L.numel,), torch.float32)
        ghost, first = L.ghost, mb == 0
        # DeepSpeed's accounting (train.fp32_host_grads): each gradient is cast to fp32 on the
        # device and crosses PCIe as fp32, into the fp32 host accumulator
        fp32_link = self.train.fp32_host_grads
        sent = 4 * sum(g.numel() for g in grads) if fp32_link else gbytes

        def copy_out():
            for k, g in enumerate(grads):
                v = L.view(ghost, k)
                src = g.float() if fp32_link else g
                v.copy_(src, non_blocking=True) if first else v.add_(src.to(ghost.device, torch.float32))
            return None
        self.meter.promise("gpu", gbytes)
        f = self.eng["d2h"].submit(copy_out, "grad", L.i, self.it, sent, "grad", mb=mb,
                                   then=lambda: self.meter.free("gpu", gbytes, promised=True))
        L.grad_futs.append(f)
        if last_mb and lp.update == "overlap":
            self._cpu_update(L, 1.0)

    def _after_updates(self) -> None:
        """ZeRO-style deferred updates, in forward order so the next forward can start early."""
        after = [L for L in self.layers if L.lp.update == "after"]
        if not after:
            return
        coef = 1.0
        if self.train.grad_clip is not None:
            # torch.nn.utils.clip_grad_norm_, the same float32 arithmetic: a norm of per-tensor norms
            norms = []
            for L in after:
                if L.lsp is not None:
                    norms += [n.cpu() for n in L.lsp_norms]
                elif L.lp.optimizer == "gpu":
                    norms += [torch.linalg.vector_norm(g, 2).cpu() for g in L.gacc]
                else:
                    wait(L.grad_futs)
                    norms += [torch.linalg.vector_norm(L.view(L.ghost, k), 2) for k in range(len(L.params))]
            total = torch.linalg.vector_norm(torch.stack(norms), 2)
            if not bool(torch.isfinite(total)):     # stop before the update: the weights stay finite
                raise InputError(f"step {self.step_no + 1}: gradient norm is {float(total)}; stopped")
            coef = float(torch.clamp(self.train.grad_clip / (total + 1e-6), max=1.0))
        for L in after:
            if L.lsp is not None:
                self._lsp_update(L, coef)
            elif L.lp.optimizer == "gpu":
                self._gpu_update(L, coef)
            else:
                self._cpu_update(L, coef)

    def _read_opt(self, L: _Layer) -> Future:
        def read():
            out = self.store.read(f"opt{L.i}")
            self.meter.alloc("cpu", sum(nbytes(t) for t in out.values()))
            return out
        return self.eng["ssd_read"].submit(read, "ssd_read", L.i, self.it, L.opt_bytes, "opt")

    def _prefetch_opt(self, i: int, last_mb: bool, force: bool) -> None:
        """Fused updates on an SSD-resident optimizer need the state in host memory during backward."""
        if not 0 <= i < len(self.layers):
            return
        L = self.layers[i]
        if L.lp.optimizer != "ssd" or L.lp.update != "fused" or not last_mb or L.opt_read is not None:
            return
        if not done(L.pending):
            if not force:
                return
            wait(L.pending)
        L.opt_read = self._read_opt(L)

    def _math(self, L: _Layer, opt: dict, k: int, grad: torch.Tensor, step_no: int) -> None:
        state = {key.split(".", 1)[1]: v for key, v in opt.items() if key.split(".", 1)[0] == str(k)}
        optim_step(self.cfg, step_no, self._master(L, opt, k), grad, state)

    def _gpu_update(self, L: _Layer, coef: float) -> None:
        step_no = self.step_no + 1
        with self.rec.timed("update", L.i, "gpu", self.it), torch.no_grad():
            for k, g in enumerate(L.gacc):
                self._math(L, L.opt, k, g if coef == 1.0 else g * torch.tensor(coef, dtype=torch.float32), step_no)
        L.gacc = None
        L.pending = self._publish(L, L.opt)

    def _cpu_update(self, L: _Layer, coef: float) -> None:
        """CPU optimizer in the worker thread, fed as this layer's gradient arrives."""
        step_no = self.step_no + 1
        read = self._read_opt(L) if L.lp.optimizer == "ssd" else None
        futs, L.grad_futs = L.grad_futs, []
        ghost, L.ghost = L.ghost, None
        it = self.it

        def job():
            opt = read.result() if read is not None else L.opt
            with torch.no_grad():
                g = ghost if coef == 1.0 else ghost * torch.tensor(coef, dtype=torch.float32)
                for k in range(len(L.params)):
                    self._math(L, opt, k, L.view(g, k), step_no)
            self.pool.put(ghost)
            return self._publish(L, opt, it)
        L.pending = self.eng["cpu"].submit(job, "update", L.i, it, after=futs + [read])

    def _fused_hook(self, L: _Layer, k: int, p: torch.Tensor) -> None:
        """LOMO: update this parameter as soon as its gradient is complete, then drop the gradient."""
        g = p.grad
        p.grad = None
        mb, last = self._fused_ctx
        if not last:
            raise InputError("fused updates cannot accumulate gradients over micro-batches (LOMO#4)")
        step_no = self.step_no + 1
        lp = L.lp
        gb = nbytes(g)
        self.meter.alloc("gpu", gb, f"gradient of {L.name}.{L.pnames[k]}")
        with torch.no_grad():
            if lp.optimizer == "gpu":
                with self.rec.timed("update", L.i, "gpu", self.it, tag=L.pnames[k]):
                    self._math(L, L.opt, k, g, step_no)
                self.meter.free("gpu", gb)
                return
            host = self.pool.get(g.shape, torch.float32)
            wait(self.eng["d2h"].submit(lambda: host.copy_(g, non_blocking=True), "grad", L.i, self.it, gb,
                                        "grad." + L.pnames[k]))
            self.meter.free("gpu", gb)
            opt = L.opt if lp.optimizer == "cpu" else wait(L.opt_read)
            with self.rec.timed("update", L.i, "cpu", self.it, tag=L.pnames[k]):
                self._math(L, opt, k, host, step_no)
            self.pool.put(host)

    # --- LSP-Offload: compressed gradients, subspace AdamW on the CPU ---------------------------------
    def _lsp_grads(self, L: _Layer, mb: int, last_mb: bool) -> None:
        """Accumulate the full gradient on the device over micro-batches (S is linear in G, but the
        projector check and fit need G itself); compress and send it after the last one."""
        grads = [p.grad for p in L.params]
        for p in L.params:
            p.grad = None
        if L.gacc is None:
            L.gacc = grads
            self.meter.alloc("gpu", sum(nbytes(g) for g in grads), f"gradients of {L.name}")
        else:
            for a, g in zip(L.gacc, grads):
                a.add_(g)
        if not last_mb:
            return
        self._lsp_compress(L, mb)
        if L.lp.update == "overlap":
            self._lsp_update(L, 1.0)

    def _lsp_compress(self, L: _Layer, mb: int) -> None:
        """Device: sample/check/refit the projectors, S = P^T G Q, then S to the host on the d2h engine."""
        lc = L.lsp
        grads = dict(zip(L.pnames, L.gacc))
        gbytes = sum(nbytes(g) for g in L.gacc)
        with self.rec.timed("compress", L.i, "gpu", self.it, mb=mb), torch.no_grad():
            stats = lc.observe(self.step_no, grads)
            # what crosses PCIe is in the compute dtype, as a lossless gradient would be
            small = {k: s.to(self.dtype) for k, s in lc.compress_grads(grads).items()}
            L.lsp_norms = ([torch.linalg.vector_norm(g, 2) for g in L.gacc]
                           if self.train.grad_clip is not None else None)
        if stats["error"] is not None:
            self.lsp_log.append({"step": self.step_no, "layer": L.i, "error": stats["error"],
                                 "error_after": stats["error_after"], "refit": stats["refit"]})
        kept = sum(nbytes(t) for q in lc.samples.values() for t in q)
        if kept > L.lsp_sample_bytes:
            self.meter.alloc("gpu", kept - L.lsp_sample_bytes, f"gradient samples for LSP refits of {L.name}")
        else:
            self.meter.free("gpu", L.lsp_sample_bytes - kept)
        L.lsp_sample_bytes = kept
        L.gacc = None
        sbytes = sum(nbytes(s) for s in small.values())
        self.meter.alloc("gpu", sbytes, f"compressed gradients of {L.name}")
        self.meter.free("gpu", gbytes)
        # the update's device buffers are allocated here, on the compute stream, and kept until applied
        L.lsp_dev = {k: torch.empty_like(s) for k, s in small.items()}
        self.meter.alloc("gpu", sbytes, f"compressed update of {L.name}")
        host = L.lsp_host = {k: self.pool.get(s.shape, self.dtype) for k, s in small.items()}

        def copy_out():
            for k, s in small.items():
                host[k].copy_(s, non_blocking=True)
            return None
        self.meter.promise("gpu", sbytes)
        L.grad_futs.append(self.eng["d2h"].submit(copy_out, "grad", L.i, self.it, sbytes, "grad", mb=mb,
                                                  then=lambda: self.meter.free("gpu", sbytes, promised=True)))

    def _lsp_update(self, L: _Layer, coef: float) -> None:
        """CPU: AdamW on S in the subspace (worker thread), then the d x d update back on the h2d engine."""
        futs, L.grad_futs = L.grad_futs, []
        host, dev, L.lsp_host, L.lsp_dev = L.lsp_host, L.lsp_dev, None, None
        it = self.it

        def job():
            with torch.no_grad():
                small = {k: h if coef == 1.0 else h * torch.tensor(coef, dtype=torch.float32)
                         for k, h in host.items()}
                upd = L.lsp.cpu_step(small)
            for h in host.values():
                self.pool.put(h)
            out = {k: self.pool.get(u.shape, self.dtype) for k, u in upd.items()}
            for k, u in upd.items():
                out[k].copy_(u)
            ubytes = sum(nbytes(t) for t in out.values())

            def copy_in():
                for k, t in out.items():
                    dev[k].copy_(t, non_blocking=True)
                return None

            def give_back():
                for t in out.values():
                    self.pool.put(t)
            return [self.eng["h2d"].submit(copy_in, "writeback", L.i, it, ubytes, "upd", then=give_back)]
        L.pending = self.eng["cpu"].submit(job, "update", L.i, it, after=futs)
        L.lsp_apply = (dev, it)

    def _lsp_apply(self, L: _Layer) -> None:
        """Device: W += P U Q^T (after decoupled weight decay) once the update is back; run where the
        layer is next needed (its next forward) or at synchronize."""
        if L.lsp_apply is None:
            return
        dev, it = L.lsp_apply
        L.lsp_apply = None
        wait(L.pending)
        with self.rec.timed("decompress", L.i, "gpu", it), torch.no_grad():
            L.lsp.apply({n: L.view(L.home, k) for k, n in enumerate(L.pnames)}, dev)
        self.meter.free("gpu", sum(nbytes(t) for t in dev.values()))

    def _publish(self, L: _Layer, opt: dict, it: int | None = None) -> list:
        """Bring the updated master weights to the compute weights' home; write SSD-resident optimizer
        state back. Returns the futures of the copies still under way."""
        it = self.it if it is None else it
        lp = L.lp
        follow: list[Future] = []
        if lp.optimizer == "ssd":
            def write_opt():
                self.store.write(f"opt{L.i}", opt)
                self.meter.set("ssd", self.store.bytes_used())
                self.meter.free("cpu", sum(nbytes(t) for t in opt.values()))
            follow.append(self.eng["ssd_write"].submit(write_opt, "ssd_write", L.i, it,
                                                       sum(nbytes(t) for t in opt.values()), "opt"))
        if L.shared_master:
            return follow
        master = opt["master"]
        opt_on_dev = lp.optimizer == "gpu"
        if lp.params == "gpu":
            if opt_on_dev:
                with torch.no_grad():
                    L.home.copy_(master)
            else:
                src = master if self.dtype == torch.float32 else master.to(self.dtype)
                follow.append(self.eng["h2d"].submit(lambda: L.home.copy_(src, non_blocking=True), "writeback",
                                                     L.i, it, L.wbytes, "w"))
        elif lp.params == "cpu":
            if opt_on_dev:
                src = master.to(self.dtype)
                follow.append(self.eng["d2h"].submit(lambda: L.home.copy_(src, non_blocking=True), "writeback",
                                                     L.i, it, L.wbytes, "w"))
            else:
                L.home.copy_(master)
        else:   # SSD-homed weights
            if opt_on_dev:
                stage = self.pool.get((L.numel,), self.dtype)
                src = master.to(self.dtype)
                d2h = self.eng["d2h"].submit(lambda: stage.copy_(src, non_blocking=True), "writeback", L.i, it,
                                             L.wbytes, "w")
            else:
                stage, d2h = master.to(self.dtype), None
                self.meter.alloc("cpu", nbytes(stage))

            def write_w():
                self.store.write(f"w{L.i}", {"w": stage})
                self.meter.set("ssd", self.store.bytes_used())
                if opt_on_dev:
                    self.pool.put(stage)
                else:
                    self.meter.free("cpu", nbytes(stage))
            follow.append(self.eng["ssd_write"].submit(write_w, "ssd_write", L.i, it, L.wbytes, "w", after=[d2h]))
        return follow

    # --- results --------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every update still in flight (they overlap the next step's forward otherwise)."""
        for L in self.layers:
            wait(L.pending)
            self._lsp_apply(L)
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            self.rec.flush()

    def master_weights(self) -> list[dict[str, torch.Tensor]]:
        """Every layer's fp32 master weights, by parameter name, on the CPU (for tests and checkpoints)."""
        self.synchronize()
        out = []
        for L in self.layers:
            if L.lsp is not None:
                out.append({n: L.view(L.home, k).detach().float().cpu().clone() for k, n in enumerate(L.pnames)})
                continue
            if L.lp.optimizer == "ssd":
                opt = self.store.read(f"opt{L.i}")
            else:
                opt = L.opt
            if L.shared_master:
                flat = L.home
            else:
                flat = opt["master"]
            out.append({n: L.view(flat, k).detach().float().cpu().clone() for k, n in enumerate(L.pnames)})
        return out

    def state_dict(self) -> dict:
        """Weights, fp32 master weights and optimizer state of every layer, plus the step count; the
        same layout whatever the plan, so a run can resume under another plan."""
        self.synchronize()
        layers = []
        for L in self.layers:
            if L.lsp is not None:     # subspace moments and projectors instead of full-size moments
                layers.append({"w": L.home.detach().cpu().clone(), "master": L.home.detach().float().cpu().clone(),
                               "state": {}, "lsp": L.lsp.state_dict()})
                continue
            opt = self.store.read(f"opt{L.i}") if L.lp.optimizer == "ssd" else L.opt
            w = L.home if L.lp.params != "ssd" else self.store.read(f"w{L.i}")["w"]
            master = L.home if L.shared_master else opt["master"]
            layers.append({"w": w.detach().cpu().clone(), "master": master.detach().float().cpu().clone(),
                           "state": {k: v.detach().cpu().clone() for k, v in opt.items() if k != "master"}})
        return {"step": self.step_no, "losses": list(self.losses), "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        self.synchronize()
        layers = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(layers, list) or len(layers) != len(self.layers):
            raise InputError("checkpoint does not match the model: wrong number of layers")
        for L, s in zip(self.layers, layers):
            try:
                w, master, st = s["w"], s["master"], s["state"]
            except (KeyError, TypeError):
                raise InputError(f"checkpoint layer {L.name}: missing w/master/state") from None
            if (L.lsp is not None) != ("lsp" in s):
                raise InputError(f"checkpoint layer {L.name}: {'subspace (LSP)' if 'lsp' in s else 'full-size'} optimizer "
                                 f"state cannot resume under a {'grad_rank' if L.lsp is not None else 'lossless'} plan; "
                                 f"resume with the plan's grad_rank as saved")
            if L.lsp is not None:
                if w.numel() != L.numel or master.numel() != L.numel:
                    raise InputError(f"checkpoint does not match the model at layer {L.name}")
                try:
                    L.lsp.load_state_dict(s["lsp"])
                except ValueError as exc:
                    raise InputError(f"checkpoint layer {L.name}: LSP state does not match the plan: {exc}") from None
                L.home.copy_(w)
                continue
            want = {f"{k}.{n}" for k, shape in enumerate(L.shapes) for n in state_shapes(self.cfg, shape)}
            if w.numel() != L.numel or master.numel() != L.numel or set(st) != want:
                raise InputError(f"checkpoint does not match the model/optimizer at layer {L.name}")
            opt = dict(st) if L.shared_master else {"master": master.float(), **st}
            if L.lp.params == "ssd":
                self._ssd_write_sync(f"w{L.i}", {"w": w.to(self.dtype)})
            else:
                L.home.copy_(master if L.shared_master else w)
            if L.lp.optimizer == "ssd":
                self._ssd_write_sync(f"opt{L.i}", opt)
            else:
                for k, v in opt.items():
                    L.opt[k].copy_(v)
        self.step_no = int(state["step"])
        self.losses = [float(x) for x in state.get("losses", [])]

    def peak_bytes(self) -> dict[str, int]:
        return self.meter.peak_bytes()

    def trace(self) -> Trace:
        self.synchronize()
        meta = {"source": "measured", "model": self.spec.name, "model_spec": self.spec.to_dict(),
                "hardware": self.hardware, "plan": self.plan.to_dict(), "train": self.train.to_dict(),
                "capacity": self._capacity(), "peak_bytes": self.peak_bytes(),
                "iterations": self.step_no}
        return Trace.from_records(self.rec.events, self.meter.samples, meta)

    def _capacity(self) -> dict[str, int]:
        """Tier sizes of this machine: the device budget (0: none), physical RAM, the offload file system."""
        import os
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        ssd = shutil.disk_usage(self.store.root).total if self.store is not None else 0
        return {"gpu": int(self.budget or 0), "cpu": int(ram), "ssd": int(ssd)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.synchronize()
        for e in getattr(self, "eng", {}).values():
            e.close()
        if self.store is not None:
            self.store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
