"""Tensors a layer saves for backward: kept on the device, or offloaded to host memory (and on to
the SSD) in forward and fetched back ahead of backward.

`Activations.hooks` packs every tensor autograd saves inside a layer's forward:
  - a view of the weights the layer computes with (its own, or a tied matrix it borrows) is
    saved by reference (`ParamRef`) and rebuilt from the weights current at backward, since
    streamed weights are fetched again rather than kept;
  - under `keep` (and for anything not on the device) the tensor itself is kept and its device
    bytes accounted once per storage;
  - under `cpu` / `ssd` it becomes a `Slot`, deduplicated, that `offload` copies to a host buffer
    on the d2h engine (and on to the SSD) and `fetch` brings back on the h2d engine.

A recomputed layer keeps only its input (the checkpoint); under `global.cpu_checkpointing`
(DeepSpeed's `activation_checkpointing.cpu_checkpointing`) that input too goes to a host buffer on
the d2h engine after the forward (`offload_checkpoint`) and comes back on the h2d engine ahead of
the recompute (`fetch`), the simulator's `offload.ckpt` / `fetch.ckpt` tasks.

A layer that runs in slices of the micro-batch (`Plan.slices`) has one `Saved` per slice, each
offloaded, fetched, recomputed and freed on its own, so only a slice or two of the layer's
activations is on the device at once.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tiertune.executor.device import done, nbytes, wait
from tiertune.executor.layer import LayerState
from tiertune.executor.tiers import Machine


@dataclass
class ParamRef:
    """A saved tensor that is (a view of) layer `layer`'s weights: rebuilt from its current weights."""
    layer: int
    size: tuple
    stride: tuple
    offset: int


@dataclass
class Slot:
    """A saved activation offloaded to the host (and the SSD); `dev` is its copy fetched back."""
    t: torch.Tensor | None
    host: torch.Tensor | None = None
    dev: torch.Tensor | None = None


@dataclass
class Saved:
    """What one layer keeps from forward to backward, for one micro-batch (or one slice of it)."""
    mode: str                                # the plan's `activations`: keep, cpu, ssd, recompute
    part: int | None = None                  # which slice of the micro-batch; None: the whole of it
    out: torch.Tensor | None = None          # the graph root (or None when recomputed)
    inp: torch.Tensor | None = None          # the layer input when recomputed (on the device)
    ckpt_host: torch.Tensor | None = None    # that input in host memory (cpu_checkpointing), until fetched
    rng: tuple | None = None                 # RNG states before a recomputed forward (same dropout masks)
    targets: torch.Tensor | None = None
    box: list = field(default_factory=list)  # receives the gradient of the layer's input
    kept: dict = field(default_factory=dict)            # storage ptr -> bytes of kept saved tensors
    slots: list = field(default_factory=list)
    dedupe: dict = field(default_factory=dict)
    dev_bytes: int = 0                       # device bytes of fetched-back activations
    bytes: int = 0                           # bytes offloaded
    metas: list = field(default_factory=list)   # (shape, dtype, stride) of each offloaded tensor
    offload: Future | None = None
    written: Future | None = None
    fetch: Future | None = None


class Activations:
    """Saved tensors of the micro-batch in flight, by (layer, micro-batch): one `Saved` per slice."""

    def __init__(self, m: Machine, layers: list[LayerState]):
        self.m = m
        self.layers = layers
        self.saved: dict[tuple[int, int], list[Saved]] = {}

    def hooks(self, L: LayerState, saved: Saved, mode: str):
        """saved_tensors_hooks for running layer L's forward under `mode`."""
        m = self.m
        used = [L] + ([self.layers[L.borrows]] if L.borrows is not None else [])
        by_storage = {U.flat().untyped_storage().data_ptr(): U.i for U in used if U.numel}

        def pack(t: torch.Tensor):
            if t.device == m.dev and t.numel():
                owner = by_storage.get(t.untyped_storage().data_ptr())
                if owner is not None:
                    return ParamRef(owner, tuple(t.shape), tuple(t.stride()), t.storage_offset())
            if mode == "keep" or t.device != m.dev or t.numel() == 0:
                ptr = t.untyped_storage().data_ptr()
                if t.device == m.dev and ptr not in saved.kept:
                    n = t.untyped_storage().nbytes()
                    m.meter.alloc("gpu", n, f"activations of {L.name}")
                    saved.kept[ptr] = n
                return t
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            slot = saved.dedupe.get(key)
            if slot is None:
                m.meter.alloc("gpu", nbytes(t), f"activations of {L.name}")
                slot = saved.dedupe[key] = Slot(t)
                saved.slots.append(slot)
            return slot

        def unpack(x):
            if isinstance(x, ParamRef):
                return self.layers[x.layer].flat().detach().as_strided(x.size, x.stride, x.offset)
            if isinstance(x, Slot):
                if x.dev is None:
                    wait(saved.fetch)
                return x.dev
            return x
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def offload(self, L: LayerState, saved: Saved, mb: int, it: int) -> None:
        """Copy the layer's packed tensors to host buffers (and on to the SSD) off the main thread."""
        m = self.m
        slots = saved.slots
        saved.dedupe = {}
        total = sum(nbytes(s.t) for s in slots)
        for s in slots:
            s.host = m.pool.like(s.t)
        saved.bytes = total
        saved.metas = [(s.host.shape, s.host.dtype, s.host.stride()) for s in slots]

        def copy_out():
            for s in slots:
                s.host.copy_(s.t, non_blocking=True)
            return None

        def drop():
            for s in slots:
                s.t = None
            m.meter.free("gpu", total, promised=True)

        m.meter.promise("gpu", total)
        saved.offload = m.eng["d2h"].submit(copy_out, "offload", L.i, it, total, "act", mb=mb, then=drop,
                                            part=saved.part)
        if L.lp.activations == "ssd":
            key = _key(L.i, mb, saved.part)

            def write():
                m.store.write(key, {str(j): s.host for j, s in enumerate(slots)})
                m.meter.set("ssd", m.store.bytes_used())
                for s in slots:                     # on the SSD now: the host buffers go back
                    m.pool.put(s.host)
                    s.host = None
            saved.written = m.eng["ssd_write"].submit(write, "ssd_write", L.i, it, total, "act",
                                                      after=[saved.offload], mb=mb, part=saved.part)

    def offload_checkpoint(self, L: LayerState, saved: Saved, mb: int, it: int) -> None:
        """cpu_checkpointing: copy a recomputed layer's input checkpoint to a host buffer on the d2h
        engine; its device bytes are given back once the copy is done."""
        m = self.m
        x = saved.inp
        host = saved.ckpt_host = m.pool.like(x)
        accounted = ckpt_device_bytes(x)

        def copy_out():
            host.copy_(x, non_blocking=True)
            return None

        def drop():
            saved.inp = None
            m.meter.free("gpu", accounted, promised=True)

        m.meter.promise("gpu", accounted)
        saved.offload = m.eng["d2h"].submit(copy_out, "offload", L.i, it, nbytes(x), "ckpt", mb=mb, then=drop,
                                            part=saved.part)

    def fetch(self, i: int, mb: int, it: int, force: bool = False, part: int = 0) -> None:
        """Start bringing slice `part` of layer i's offloaded tensors (or host checkpoint) back to
        the device (the whole layer's when it is not sliced); without `force` only when the budget
        allows it now and (SSD) their write is done, else a later call retries."""
        m = self.m
        if not 0 <= i < len(self.layers):
            return
        parts = self.saved.get((i, mb), ())
        saved = parts[part] if part < len(parts) else None
        if saved is None or saved.fetch is not None:
            return
        if saved.mode == "recompute" and saved.ckpt_host is not None:
            self._fetch_checkpoint(i, saved, mb, it, force)
            return
        if saved.mode not in ("cpu", "ssd"):
            return
        slots, total = saved.slots, saved.bytes
        if saved.mode == "ssd" and not force and not done(saved.written):
            return                           # stays in order behind its write; retried next layer
        if force:
            m.meter.alloc("gpu", total, f"fetched activations of {self.layers[i].name}")
        elif not m.meter.try_alloc("gpu", total):
            return
        if saved.mode == "ssd":
            stages = [m.pool.get(*meta) for meta in saved.metas]
            key = _key(i, mb, saved.part)
            read = m.eng["ssd_read"].submit(
                lambda: m.store.read(key, {str(j): st for j, st in enumerate(stages)}), "ssd_read", i,
                it, total, "act", after=[saved.written], mb=mb, part=saved.part)
            srcs, after = stages, [read]
        else:
            srcs, after = [s.host for s in slots], [saved.offload]
        saved.dev_bytes = total
        devs = [torch.empty_like(h, device=m.dev) for h in srcs]

        def copy_in():
            for d, h in zip(devs, srcs):
                d.copy_(h, non_blocking=True)
            return None

        def done_cb():
            for s, d in zip(slots, devs):
                s.dev = d
            for h in srcs:
                m.pool.put(h)
            for s in slots:
                s.host = None
        saved.fetch = m.eng["h2d"].submit(copy_in, "fetch", i, it, total, "act", after=after, mb=mb, then=done_cb,
                                          part=saved.part)

    def _fetch_checkpoint(self, i: int, saved: Saved, mb: int, it: int, force: bool) -> None:
        """cpu_checkpointing: bring layer i's input checkpoint back for its recompute (`saved.inp`)."""
        m = self.m
        host = saved.ckpt_host
        n = ckpt_device_bytes(host)
        if force:
            m.meter.alloc("gpu", n, f"fetched checkpoint of {self.layers[i].name}")
        elif not m.meter.try_alloc("gpu", n):
            return
        dev = torch.empty_like(host, device=m.dev)

        def copy_in():
            dev.copy_(host, non_blocking=True)
            return None

        def done_cb():
            saved.inp, saved.ckpt_host = dev, None
            m.pool.put(host)
        saved.fetch = m.eng["h2d"].submit(copy_in, "fetch", i, it, nbytes(host), "ckpt", after=[saved.offload],
                                          mb=mb, then=done_cb, part=saved.part)

    def free(self, saved: Saved) -> None:
        """After the layer's backward: give back the device bytes its saved tensors held."""
        freed = sum(saved.kept.values()) + saved.dev_bytes
        if saved.mode == "recompute" and saved.inp is not None:
            freed += ckpt_device_bytes(saved.inp)
        if freed:
            self.m.meter.free("gpu", freed)
        for s in saved.slots:
            s.dev = None
        saved.kept, saved.slots, saved.out, saved.inp = {}, [], None, None


def ckpt_device_bytes(x: torch.Tensor) -> int:
    """Device bytes a recomputed layer's input checkpoint is accounted for: a hidden state's; the
    token ids the embedding recomputes from are not counted (as when they are not checkpointed)."""
    return nbytes(x) if x.is_floating_point() else 0


def _key(layer: int, mb: int, part: int | None) -> str:
    """The SSD file of a layer's (slice's) activations for one micro-batch."""
    return f"a{layer}.mb{mb}" + (f".s{part}" if part is not None else "")
