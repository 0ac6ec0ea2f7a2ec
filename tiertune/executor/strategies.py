"""Update strategies: what happens to a layer's gradients once its backward is done, one class per
(update mode, optimizer tier) family:

  DeviceUpdate   optimizer on the device, update `after` or `overlap`: gradients accumulate on
                 the device over micro-batches; AdamW runs there (ZeRO-0 style)
  HostUpdate     optimizer in host memory or on the SSD, `after` or `overlap`: gradients are
                 copied into a host fp32 accumulator on the d2h engine, the CPU optimizer runs in
                 the worker thread (an SSD state read first and written back after) and the
                 updated weights go home (ZeRO-Offload, ZeRO-Infinity, Fuyou, MegaTrain)
  FusedUpdate    any tier, `fused`: each parameter is updated inside backward by a
                 post-accumulate-grad hook and its gradient freed at once (LOMO, AdaLomo)
  LSPUpdate      `grad_rank` set: the gradient is compressed on the device, AdamW runs in the
                 subspace on the CPU and the device applies the update (LSP-Offload)

Every strategy has the same methods: `place` (device buffers and hooks it needs at set-up),
`after_backward` (per micro-batch), `grad_norms` and `update` (for `after` layers, which update
together once the whole backward is done, so the gradient can be clipped by the global norm),
`prefetch` (state wanted during backward) and `before_use` (work due before the layer's weights
are next used).
"""

from __future__ import annotations


import torch

from tiertune.errors import InputError
from tiertune.executor.device import done, nbytes, wait
from tiertune.executor.layer import LayerState
from tiertune.executor.tiers import DeviceTier, Machine, publish
from tiertune.executor.updates import OptimConfig
from tiertune.executor.updates import step as optim_step


def scaled(g: torch.Tensor, coef: float) -> torch.Tensor:
    """g times a clipping coefficient (untouched at 1, as torch's clip_grad_norm_ leaves it)."""
    return g if coef == 1.0 else g * torch.tensor(coef, dtype=torch.float32)


class UpdateStrategy:
    def __init__(self, m: Machine, tiers: dict[str, DeviceTier], cfg: OptimConfig):
        self.m, self.tiers, self.cfg = m, tiers, cfg

    def math(self, L: LayerState, opt: dict, k: int, grad: torch.Tensor, step_no: int) -> None:
        """The optimizer step of parameter k of L (its state is opt's "<k>.*" entries)."""
        state = {key.split(".", 1)[1]: v for key, v in opt.items() if key.split(".", 1)[0] == str(k)}
        optim_step(self.cfg.for_param(step_no, L.shapes[k]), step_no, L.master(opt, k), grad, state)

    def place(self, L: LayerState) -> None:
        pass

    def prefetch(self, L: LayerState, last_mb: bool, force: bool, it: int) -> None:
        pass

    def before_use(self, L: LayerState) -> None:
        pass

    def after_backward(self, L: LayerState, mb: int, last_mb: bool, step_no: int, it: int) -> None:
        raise NotImplementedError

    def grad_norms(self, L: LayerState) -> list[torch.Tensor]:
        raise NotImplementedError

    def update(self, L: LayerState, coef: float, step_no: int, it: int) -> None:
        raise NotImplementedError


def take_grads(L: LayerState) -> list[torch.Tensor]:
    grads = [p.grad for p in L.params]
    for p in L.params:
        p.grad = None
    return grads


class DeviceUpdate(UpdateStrategy):
    def place(self, L: LayerState) -> None:
        self.m.meter.alloc("gpu", L.wbytes, f"gradient buffer of {L.name}")

    def after_backward(self, L, mb, last_mb, step_no, it):
        grads = take_grads(L)
        if L.gacc is None:
            L.gacc = grads
        else:
            for a, g in zip(L.gacc, grads):
                a.add_(g)
        if last_mb and L.lp.update == "overlap":
            self.update(L, 1.0, step_no, it)

    def grad_norms(self, L):
        return [torch.linalg.vector_norm(g, 2).cpu() for g in L.gacc]

    def update(self, L, coef, step_no, it):
        with self.m.rec.timed("update", L.i, "gpu", it), torch.no_grad():
            for k, g in enumerate(L.gacc):
                self.math(L, L.opt, k, scaled(g, coef), step_no)
        L.gacc = None
        L.pending = publish(self.tiers, L, L.opt, it)


class HostUpdate(UpdateStrategy):
    def __init__(self, m, tiers, cfg, fp32_link: bool = False):
        super().__init__(m, tiers, cfg)
        # DeepSpeed's accounting (train.fp32_host_grads): each gradient is cast to fp32 on the
        # device and crosses PCIe as fp32, into the fp32 host accumulator
        self.fp32_link = fp32_link

    def after_backward(self, L, mb, last_mb, step_no, it):
        m = self.m
        grads = take_grads(L)
        gbytes = sum(nbytes(g) for g in grads)
        m.meter.alloc("gpu", gbytes, f"gradients of {L.name}")
        if L.ghost is None:
            L.ghost = m.pool.get((L.numel,), torch.float32)
        ghost, first = L.ghost, mb == 0
        fp32_link = self.fp32_link
        sent = 4 * sum(g.numel() for g in grads) if fp32_link else gbytes

        def copy_out():
            for k, g in enumerate(grads):
                v = L.view(ghost, k)
                src = g.float() if fp32_link else g
                v.copy_(src, non_blocking=True) if first else v.add_(src.to(ghost.device, torch.float32))
            return None
        m.meter.promise("gpu", gbytes)
        L.grad_futs.append(m.eng["d2h"].submit(copy_out, "grad", L.i, it, sent, "grad", mb=mb,
                                               then=lambda: m.meter.free("gpu", gbytes, promised=True)))
        if last_mb and L.lp.update == "overlap":
            self.update(L, 1.0, step_no, it)

    def grad_norms(self, L):
        wait(L.grad_futs)
        return [torch.linalg.vector_norm(L.view(L.ghost, k), 2) for k in range(len(L.params))]

    def update(self, L, coef, step_no, it):
        """CPU optimizer in the worker thread, fed as this layer's gradient arrives."""
        tier = self.tiers[L.lp.optimizer]
        read = tier.read_state(L, it)
        futs, L.grad_futs = L.grad_futs, []
        ghost, L.ghost = L.ghost, None

        def job():
            opt = tier.state_now(L, read)
            with torch.no_grad():
                g = scaled(ghost, coef)
                for k in range(len(L.params)):
                    self.math(L, opt, k, L.view(g, k), step_no)
            self.m.pool.put(ghost)
            return publish(self.tiers, L, opt, it)
        L.pending = self.m.eng["cpu"].submit(job, "update", L.i, it, after=futs + [read])


class FusedUpdate(UpdateStrategy):
    """LOMO: update each parameter as soon as its gradient is complete, then drop the gradient."""

    def __init__(self, m, tiers, cfg):
        super().__init__(m, tiers, cfg)
        # set by `begin_backward` before each layer's backward, read by the hooks inside it
        self.backward_layer = -1
        self.last_mb = True
        self.step_no = 0
        self.it = 0

    def begin_backward(self, i: int, last_mb: bool, step_no: int, it: int) -> None:
        self.backward_layer, self.last_mb, self.step_no, self.it = i, last_mb, step_no, it

    def place(self, L: LayerState) -> None:
        for k, p in enumerate(L.params):
            p.register_post_accumulate_grad_hook(lambda p, L=L, k=k: self._hook(L, k, p))

    def prefetch(self, L, last_mb, force, it):
        """An SSD-resident optimizer's state must be in host memory during backward."""
        if L.lp.optimizer != "ssd" or not last_mb or L.opt_read is not None:
            return
        if not done(L.pending):
            if not force:
                return
            wait(L.pending)
        L.opt_read = self.tiers["ssd"].read_state(L, it)

    def _hook(self, L: LayerState, k: int, p: torch.Tensor) -> None:
        if k in L.lent and self.backward_layer != L.lent_to:
            return     # a tied matrix: its gradient is complete after the borrowing layer's backward
        g = p.grad
        p.grad = None
        if not self.last_mb:
            raise InputError("fused updates cannot accumulate gradients over micro-batches (LOMO#4)")
        m, lp = self.m, L.lp
        step_no, it = self.step_no, self.it
        gb = nbytes(g)
        m.meter.alloc("gpu", gb, f"gradient of {L.name}.{L.pnames[k]}")
        with torch.no_grad():
            if lp.optimizer == "gpu":
                with m.rec.timed("update", L.i, "gpu", it, tag=L.pnames[k]):
                    self.math(L, L.opt, k, g, step_no)
                m.meter.free("gpu", gb)
                return
            host = m.pool.get(g.shape, torch.float32)
            wait(m.eng["d2h"].submit(lambda: host.copy_(g, non_blocking=True), "grad", L.i, it, gb,
                                     "grad." + L.pnames[k]))
            m.meter.free("gpu", gb)
            opt = L.opt if lp.optimizer == "cpu" else wait(L.opt_read)
            with m.rec.timed("update", L.i, "cpu", it, tag=L.pnames[k]):
                self.math(L, opt, k, host, step_no)
            m.pool.put(host)

    def after_backward(self, L, mb, last_mb, step_no, it):
        if last_mb:
            L.pending = publish(self.tiers, L, L.opt if L.lp.optimizer != "ssd" else wait(L.opt_read), it)
            L.opt_read = None


class LSPUpdate(UpdateStrategy):
    """LSP-Offload: compressed gradients, subspace AdamW on the CPU (see compress.py)."""

    def __init__(self, m, tiers, cfg, grad_clip: float | None, log: list[dict]):
        super().__init__(m, tiers, cfg)
        self.grad_clip = grad_clip
        self.log = log          # per projector check: step, layer, error before/after, refit

    def after_backward(self, L, mb, last_mb, step_no, it):
        """Accumulate the full gradient on the device over micro-batches (S is linear in G, but the
        projector check and fit need G itself); compress and send it after the last one."""
        grads = take_grads(L)
        if L.gacc is None:
            L.gacc = grads
            self.m.meter.alloc("gpu", sum(nbytes(g) for g in grads), f"gradients of {L.name}")
        else:
            for a, g in zip(L.gacc, grads):
                a.add_(g)
        if not last_mb:
            return
        self._compress(L, mb, step_no - 1, it)
        if L.lp.update == "overlap":
            self.update(L, 1.0, step_no, it)

    def grad_norms(self, L):
        return [n.cpu() for n in L.lsp_norms]

    def _compress(self, L: LayerState, mb: int, steps_done: int, it: int) -> None:
        """Device: sample/check/refit the projectors, S = P^T G Q, then S to the host on the d2h engine."""
        m = self.m
        lc = L.lsp
        grads = dict(zip(L.pnames, L.gacc))
        gbytes = sum(nbytes(g) for g in L.gacc)
        with m.rec.timed("compress", L.i, "gpu", it, mb=mb), torch.no_grad():
            stats = lc.observe(steps_done, grads)
            # what crosses PCIe is in the compute dtype, as a lossless gradient would be
            small = {k: s.to(m.dtype) for k, s in lc.compress_grads(grads).items()}
            L.lsp_norms = ([torch.linalg.vector_norm(g, 2) for g in L.gacc]
                           if self.grad_clip is not None else None)
        if stats["error"] is not None:
            self.log.append({"step": steps_done, "layer": L.i, "error": stats["error"],
                             "error_after": stats["error_after"], "refit": stats["refit"]})
        kept = sum(nbytes(t) for q in lc.samples.values() for t in q)
        if kept > L.lsp_sample_bytes:
            m.meter.alloc("gpu", kept - L.lsp_sample_bytes, f"gradient samples for LSP refits of {L.name}")
        else:
            m.meter.free("gpu", L.lsp_sample_bytes - kept)
        L.lsp_sample_bytes = kept
        L.gacc = None
        sbytes = sum(nbytes(s) for s in small.values())
        m.meter.alloc("gpu", sbytes, f"compressed gradients of {L.name}")
        m.meter.free("gpu", gbytes)
        # the update's device buffers are allocated here, on the compute stream, and kept until applied
        L.lsp_dev = {k: torch.empty_like(s) for k, s in small.items()}
        m.meter.alloc("gpu", sbytes, f"compressed update of {L.name}")
        host = L.lsp_host = {k: m.pool.get(s.shape, m.dtype) for k, s in small.items()}

        def copy_out():
            for k, s in small.items():
                host[k].copy_(s, non_blocking=True)
            return None
        m.meter.promise("gpu", sbytes)
        L.grad_futs.append(m.eng["d2h"].submit(copy_out, "grad", L.i, it, sbytes, "grad", mb=mb,
                                               then=lambda: m.meter.free("gpu", sbytes, promised=True)))

    def update(self, L, coef, step_no, it):
        """CPU: AdamW on S in the subspace (worker thread), then the d x d update back on the h2d engine."""
        m = self.m
        futs, L.grad_futs = L.grad_futs, []
        host, dev, L.lsp_host, L.lsp_dev = L.lsp_host, L.lsp_dev, None, None

        def job():
            with torch.no_grad():
                upd = L.lsp.cpu_step({k: scaled(h, coef) for k, h in host.items()})
            for h in host.values():
                m.pool.put(h)
            out = {k: m.pool.get(u.shape, m.dtype) for k, u in upd.items()}
            for k, u in upd.items():
                out[k].copy_(u)
            ubytes = sum(nbytes(t) for t in out.values())

            def copy_in():
                for k, t in out.items():
                    dev[k].copy_(t, non_blocking=True)
                return None

            def give_back():
                for t in out.values():
                    m.pool.put(t)
            # tagged as the weights' writeback, the task the simulator's recipe charges for it
            return [m.eng["h2d"].submit(copy_in, "writeback", L.i, it, ubytes, "w", then=give_back)]
        L.pending = m.eng["cpu"].submit(job, "update", L.i, it, after=futs)
        L.lsp_apply = (dev, it)

    def before_use(self, L: LayerState) -> None:
        """Device: W += P U Q^T (after decoupled weight decay) once the update is back; run where the
        layer is next needed (its next forward) or at synchronize."""
        if L.lsp_apply is None:
            return
        dev, it = L.lsp_apply
        L.lsp_apply = None
        wait(L.pending)
        with self.m.rec.timed("decompress", L.i, "gpu", it), torch.no_grad():
            L.lsp.apply({n: L.view(L.home, k) for k, n in enumerate(L.pnames)}, dev)
        self.m.meter.free("gpu", sum(nbytes(t) for t in dev.values()))
