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
              recompute  run it under no_grad and keep only its input (in host memory under
                         global.cpu_checkpointing, copied out and back like activations)
  slices    a block whose activations move or are recomputed runs its forward and backward in
            `Plan.slices(i)` slices of the micro-batch (global.activation_slices), each with its own
            saved tensors, input checkpoint and RNG state: a slice's offload runs while the next
            slice computes, its fetch while the previous one's backward runs, so about two slices
            of the layer's activations are on the device, not the whole layer's
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

Where things are: this module is the set-up and the step loop; tiers.py the device / host / SSD
stores of weights and optimizer state; activations.py the saved-tensor hooks, activation offload
and fetch; strategies.py the update strategies (device, host, fused, LSP); layer.py one layer's
state; device.py the meter, copy engines, recorder and host buffers.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from tiertune.errors import InputError
from tiertune.executor.activations import Activations, Saved, ckpt_device_bytes
from tiertune.executor.compress import LayerCompression
from tiertune.executor.data import loss_weights
from tiertune.executor.device import GiB, BudgetExceeded, Engine, HostPool, Meter, Recorder, done, nbytes, wait
from tiertune.executor.layer import LayerState, build_layers
from tiertune.executor.strategies import DeviceUpdate, FusedUpdate, HostUpdate, LSPUpdate, UpdateStrategy
from tiertune.executor.tiers import Machine, make_tiers
from tiertune.executor.updates import OptimConfig, state_shapes
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


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """One element standing for t's data: a graph root kept for backward needs its shape, not its data."""
    return torch.empty(1, dtype=t.dtype, device=t.device).expand(t.shape)


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
            if optim is not None and (optim.schedule != "constant" or optim.warmup_steps):
                raise InputError(f"layers[{j}].grad_rank: LSP's subspace AdamW runs at a constant lr; "
                                 f"use --lr-schedule constant and no warm-up")
        if plan.train.grad_clip is not None and any(lp.update != "after" for lp in plan.layers):
            raise InputError("train.grad_clip with overlap/fused updates needs a second backward pass, which the "
                             "executor does not run yet; use update 'after' or no clipping")
        unsupported = [name for name, on in (
            ("train.chunked_loss", plan.train.chunked_loss),
            ("train.checkpoint_halves", plan.train.checkpoint_halves),
            ("train.master_weights false with a 16-bit dtype", not plan.train.master_weights and plan.train.dtype != "fp32"),
            ("global.host_update_inline", plan.globals.host_update_inline),
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
        self.layers = build_layers(layers, spec.layer_names, plan.layers, self.dtype)
        g = plan.globals
        for L in self.layers:
            if L.lp.grad_rank is not None:     # built on the CPU first: the budget check needs its size
                L.lsp = LayerCompression(dict(zip(L.pnames, (tuple(s) for s in L.shapes))), L.lp.grad_rank,
                                         g.lsp_nnz_per_row, g.lsp_check_every, g.lsp_refit_threshold,
                                         g.lsp_fit_samples, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                         weight_decay=self.cfg.weight_decay, seed=L.i,
                                         decay_vectors=self.cfg.decay_vectors)
        self.lsp_log: list[dict] = []     # per projector check: step, layer, error before/after, refit
        self._anchor = torch.empty(0, device=self.dev, requires_grad=True)
        self.step_no = 0            # optimizer steps done
        self.it = 0                 # trace iteration of the step in progress
        self.losses: list[float] = []
        self.check_budget()

        self._tmpdir = None
        store = None
        if any("ssd" in (lp.params, lp.optimizer, lp.activations) for lp in plan.layers):
            from tiertune.executor.ssd import SSDStore
            if offload_dir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="tiertune-offload-")
                offload_dir = self._tmpdir
            store = SSDStore(offload_dir)
        self.store = store
        if self.cuda and gpu_mem_bytes is not None:
            total = torch.cuda.get_device_properties(self.dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_mem_bytes / total), self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.eng = {r: Engine(r, self.rec, self.dev) for r in COPY_ENGINES}
        self.m = Machine(self.dev, self.dtype, self.rec, self.meter, self.pool, self.eng, store,
                         torch.empty(0, dtype=self.dtype, device=self.dev))
        self.tiers = make_tiers(self.m)
        self.acts = Activations(self.m, self.layers)
        self.fused = FusedUpdate(self.m, self.tiers, self.cfg)
        device_update = DeviceUpdate(self.m, self.tiers, self.cfg)
        host_update = HostUpdate(self.m, self.tiers, self.cfg, fp32_link=self.train.fp32_host_grads)
        lsp_update = LSPUpdate(self.m, self.tiers, self.cfg, self.train.grad_clip, self.lsp_log)
        self.strategy: list[UpdateStrategy] = [
            lsp_update if L.lsp is not None else self.fused if L.lp.update == "fused"
            else device_update if L.lp.optimizer == "gpu" else host_update for L in self.layers]
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

    def _place(self, L: LayerState) -> None:
        lp = L.lp
        for mod in L.module.modules():           # buffers (e.g. HF rotary tables) live on the device
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.to(self.dev)
        flat32 = (torch.cat([p.detach().reshape(-1).float().cpu() for p in L.params]) if L.params
                  else torch.zeros(0))
        compute = flat32.to(self.dtype)
        L.shared_master = self.dtype == torch.float32 and lp.optimizer_beside_weights
        if L.lsp is not None:
            self.tiers["gpu"].place_weights(L, compute)
            L.lsp.to(self.dev)
            self.meter.alloc("gpu", L.lsp.device_bytes(), f"LSP projectors of {L.name}")
            L.opt_bytes = L.lsp.state_bytes()
            self.meter.alloc("cpu", L.opt_bytes)
            return
        self.tiers[lp.params].place_weights(L, compute)
        opt = {} if L.shared_master else {"master": flat32.clone()}
        for k, shape in enumerate(L.shapes):
            for s, sh in state_shapes(self.cfg, shape).items():
                opt[f"{k}.{s}"] = torch.zeros(sh)
        L.opt_bytes = sum(nbytes(t) for t in opt.values())
        self.tiers[lp.optimizer].place_state(L, opt)
        self.strategy[L.i].place(L)

    # --- weights --------------------------------------------------------------------------------
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
        L.fetching = torch.empty(L.numel, dtype=self.dtype, device=self.dev)
        L.fetch = self.tiers[L.lp.params].fetch_weights(L, L.fetching, self.it, "w." + phase)

    def _materialise(self, i: int, phase: str) -> None:
        """Layer i's weights (and a tied matrix it borrows) current on the device."""
        L = self.layers[i]
        if L.borrows is not None:
            self._materialise(L.borrows, phase)
        if L.lp.params == "gpu":
            wait(L.pending)
            self.strategy[i].before_use(L)
            return
        if L.dev is not None:
            return
        self._issue_fetch(i, phase, force=True)
        wait(L.fetch)
        L.dev, L.fetching, L.fetch = L.fetching, None, None
        if L.stage is not None:
            self.pool.put(L.stage)
            L.stage = None
        L.bind(L.dev, self.m.empty)

    def _release(self, i: int) -> None:
        L = self.layers[i]
        if L.lp.params != "gpu" and L.dev is not None:
            L.bind(None, self.m.empty)
            L.dev = None
            self.meter.free("gpu", L.wbytes)

    # --- the step -------------------------------------------------------------------------------
    def _run(self, L: LayerState, x: torch.Tensor, saved: Saved, boundary: bool) -> torch.Tensor:
        if boundary and L.i > 0:
            x = _Boundary.apply(x.detach(), self._anchor, saved.box)
        if L.i == len(self.layers) - 1:
            return L.module(x, saved.targets)
        return L.module(x)

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step; tokens/targets [grad_accum * batch, seq] are split into micro-batches
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
                mb_loss = self._forward(tk.to(self.dev), tg.to(self.dev), mb)
                self._backward(mb, accum, w)
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

    def _forward(self, tokens: torch.Tensor, targets: torch.Tensor, mb: int) -> float:
        """Layer by layer: weights fetched ahead, each layer's saved tensors kept / offloaded /
        dropped for recompute, slice by slice where the plan slices it; returns the micro-batch's loss."""
        n = len(self.layers)
        self.acts.saved = {}
        x = tokens
        for i, L in enumerate(self.layers):
            for j in range(i, i + self.depth + 1):
                self._issue_fetch(j, "fwd")
            self._materialise(i, "fwd")
            mode = L.lp.activations
            s = self.plan.slices(i)
            if s == 1:
                saved = Saved(mode, targets=targets if i == n - 1 else None)
                self.acts.saved[(i, mb)] = [saved]
                out = self._forward_part(L, x, saved, mb, 1)
            else:
                out = self._forward_sliced(L, x, mb, s)
            if mode in ("cpu", "ssd"):
                for prev in self.acts.saved.get((i - 1, mb), ()):
                    if prev.out is not None:
                        # its data now lives in this layer's offloaded copy; keep only the graph root
                        prev.out.data = _placeholder(prev.out)
            if i < n - 1:
                self._release_after(i)
            x = out
        return float(out.detach())

    def _forward_part(self, L: LayerState, x: torch.Tensor, saved: Saved, mb: int, slices: int) -> torch.Tensor:
        """Layer L's forward on x (the micro-batch, or one of its `slices` slices), its saved
        tensors kept, offloaded (the copy starts at once, overlapping what runs next) or dropped."""
        mode = saved.mode
        with self.rec.timed("forward", L.i, "gpu", self.it, flops=self.costs[L.i].fwd_flops / slices, mb=mb,
                            part=saved.part):
            if mode == "recompute":
                saved.rng = self._rng_state()
                with torch.no_grad():
                    out = self._run(L, x, saved, boundary=False)
                saved.inp = x
                self.meter.alloc("gpu", ckpt_device_bytes(x), f"checkpoint of {L.name}")
            else:
                with self.acts.hooks(L, saved, mode):
                    out = self._run(L, x, saved, boundary=True)
                saved.out = out
        if mode in ("cpu", "ssd"):
            self.acts.offload(L, saved, mb, self.it)
        elif mode == "recompute" and self.plan.globals.cpu_checkpointing:
            self.acts.offload_checkpoint(L, saved, mb, self.it)
        return out

    def _forward_sliced(self, L: LayerState, x: torch.Tensor, mb: int, slices: int) -> torch.Tensor:
        """Layer L's forward in `slices` slices of the micro-batch (`Plan.slices`), each with its own
        saved tensors (offloaded as soon as its forward is done, while the next slice computes),
        input-gradient box and, when recomputed, its own input checkpoint and RNG state; the
        output is the slices' outputs concatenated."""
        parts = self.acts.saved[(L.i, mb)] = []
        outs, roots = [], []
        for k, xk in enumerate(x.chunk(slices)):
            saved = Saved(L.lp.activations, part=k)
            parts.append(saved)
            if saved.mode == "recompute":
                xk = xk.clone()       # its own storage: each slice's checkpoint is freed with its backward
            outs.append(self._forward_part(L, xk, saved, mb, slices))
            if saved.out is not None:
                # a root whose storage no saved tensor of its own slice shares can give its data up
                # once concatenated (one that does keeps it, as an unsliced layer's root does)
                packed = {sl.t.untyped_storage().data_ptr() for sl in saved.slots if sl.t is not None}
                if saved.out.untyped_storage().data_ptr() not in packed | set(saved.kept):
                    roots.append(saved.out)
        out = torch.cat(outs)
        for r in roots:
            r.data = _placeholder(r)
        return out

    def _backward(self, mb: int, accum: int, weight: float) -> None:
        """In reverse: weights, saved tensors and (fused, SSD) optimizer state fetched ahead, a
        recomputed layer re-run, the layer's backward (slice by slice where it was sliced: each
        slice fetched or recomputed, run with its share of the output gradient and freed, the next
        one's fetch under way meanwhile), its gradients handed to its strategy once."""
        grad = torch.tensor(weight, device=self.dev)     # the micro-batch's share of the step's loss
        last_mb = mb == accum - 1
        step_no = self.step_no + 1
        for i in reversed(range(len(self.layers))):
            L = self.layers[i]
            for j in range(i, i - self.depth - 1, -1):
                self._issue_fetch(j, "bwd")
                for k in range(min(2, self.plan.slices(j) if 0 <= j else 1)):
                    self.acts.fetch(j, mb, self.it, part=k)     # a sliced layer's first two slices
                if 0 <= j:
                    self.strategy[j].prefetch(self.layers[j], last_mb, j == i, self.it)
            self._materialise(i, "bwd")
            parts = self.acts.saved[(i, mb)]
            s = self.plan.slices(i)
            grads = grad.chunk(s) if s > 1 else [grad]     # as forward split the input: the same rows
            in_grads = []
            for k, (saved, g) in enumerate(zip(parts, grads)):
                self.acts.fetch(i, mb, self.it, force=True, part=k)
                self.acts.fetch(i, mb, self.it, part=k + 1)     # the next slice's copy overlaps this one
                # (slice k+1 comes once slice k-1 is done: the simulator's builder gates it the same way)
                self._backward_part(L, saved, g, mb, last_mb, step_no, s)
                if i > 0:
                    in_grads.append(saved.box[0])
                self.acts.free(saved)
            del self.acts.saved[(i, mb)]
            grad = (in_grads[0] if len(in_grads) == 1 else torch.cat(in_grads)) if i > 0 else None
            if L.lent_to is None:     # a tied matrix's gradient is complete after its borrower's backward
                self.strategy[i].after_backward(L, mb, last_mb, step_no, self.it)
            if L.borrows is not None:
                owner = self.layers[L.borrows]
                self.strategy[owner.i].after_backward(owner, mb, last_mb, step_no, self.it)
            self._release_after(i)

    def _backward_part(self, L: LayerState, saved: Saved, grad: torch.Tensor, mb: int, last_mb: bool,
                       step_no: int, slices: int) -> None:
        """Layer L's backward for one micro-batch (or one of its `slices` slices): recompute first
        where the plan says; parameter gradients accumulate in .grad over the slices."""
        c = self.costs[L.i]
        root = saved.out
        if saved.mode == "recompute":
            wait(saved.fetch)            # cpu_checkpointing: the input checkpoint back from the host
            with self.rec.timed("recompute", L.i, "gpu", self.it, flops=c.fwd_flops / slices, mb=mb, part=saved.part), \
                    torch.random.fork_rng(devices=[self.dev] if self.cuda else []):
                self._set_rng_state(saved.rng)
                with self.acts.hooks(L, saved, "keep"):
                    root = self._run(L, saved.inp, saved, boundary=True)
        self.fused.begin_backward(L.i, last_mb, step_no, self.it)
        with self.rec.timed("backward", L.i, "gpu", self.it, flops=c.bwd_flops / slices, mb=mb, part=saved.part):
            torch.autograd.backward(root, grad)

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.dev) if self.cuda else None

    def _set_rng_state(self, state: tuple) -> None:
        """As the layer's first forward saw it: a recomputed dropout mask is the first one."""
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1], self.dev)

    def _release_after(self, i: int) -> None:
        """Layer i is done for now: release its streamed weights, and a tied matrix it borrowed."""
        self._release(i)
        L = self.layers[i]
        if L.borrows is not None:
            self._release(L.borrows)

    def _after_updates(self) -> None:
        """ZeRO-style deferred updates, in forward order so the next forward can start early."""
        after = [L for L in self.layers if L.lp.update == "after"]
        if not after:
            return
        coef = 1.0
        if self.train.grad_clip is not None:
            # torch.nn.utils.clip_grad_norm_, the same float32 arithmetic: a norm of per-tensor norms
            norms = [n for L in after for n in self.strategy[L.i].grad_norms(L)]
            total = torch.linalg.vector_norm(torch.stack(norms), 2)
            if not bool(torch.isfinite(total)):     # stop before the update: the weights stay finite
                raise InputError(f"step {self.step_no + 1}: gradient norm is {float(total)}; stopped")
            coef = float(torch.clamp(self.train.grad_clip / (total + 1e-6), max=1.0))
        for L in after:
            self.strategy[L.i].update(L, coef, self.step_no + 1, self.it)

    # --- results --------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every update still in flight (they overlap the next step's forward otherwise)."""
        for L in self.layers:
            wait(L.pending)
            self.strategy[L.i].before_use(L)
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
            opt = self.tiers[L.lp.optimizer].read_state_sync(L)
            flat = L.home if L.shared_master else opt["master"]
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
            opt = self.tiers[L.lp.optimizer].read_state_sync(L)
            w = self.tiers[L.lp.params].read_weights(L)
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
            self.tiers[L.lp.params].load_weights(L, master if L.shared_master else w)
            self.tiers[L.lp.optimizer].load_state(L, opt)
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
