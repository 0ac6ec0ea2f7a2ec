"""Where a layer's weights and optimizer state live: the device, host memory or the SSD, behind one
small interface the executor and the update strategies use without asking which tier it is.

  place_weights(L, compute)   put the compute-dtype flat weights at home (set-up, synchronous)
  fetch_weights(L, buf, ...)  start the copy of the weights into a device buffer (streamed tiers)
  publish_weights(L, master)  bring updated fp32 master weights home, in the compute dtype
  read_weights(L)             the weights at home, read back (checkpoints)
  load_weights(L, w)          overwrite them (resume)
  place_state(L, opt)         put the optimizer state (fp32 master + moments) on this tier
  read_state(L) / state_now   the state for an update: start its read (SSD), then the tensors
  read_state_sync(L)          the state, read back (checkpoints)
  write_back_state(L, opt)    after an update: the copies that put it back (SSD write)
  load_state(L, opt)          overwrite it (resume)

Copies run on the machine's copy engines (device.py) and are recorded in the trace; every byte
placed on a tier is accounted on the machine's meter.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tiertune.executor.device import Engine, HostPool, Meter, Recorder, nbytes
from tiertune.executor.layer import LayerState


@dataclass
class Machine:
    """What every part of the executor shares: the device, compute dtype, accounting, trace
    recorder, host buffers, copy engines and the SSD store (None when no plan layer uses it)."""
    dev: torch.device
    dtype: torch.dtype
    rec: Recorder
    meter: Meter
    pool: HostPool
    eng: dict[str, Engine]
    store: object | None        # tiertune.executor.ssd.SSDStore
    empty: torch.Tensor         # what an unmaterialised parameter points at

    def ssd_write_sync(self, key: str, tensors: dict) -> None:
        self.store.write(key, tensors)
        self.meter.set("ssd", self.store.bytes_used())


class DeviceTier:
    name = "gpu"

    def __init__(self, m: Machine):
        self.m = m

    def place_weights(self, L: LayerState, compute: torch.Tensor) -> None:
        self.m.meter.alloc("gpu", L.wbytes, f"resident weights of {L.name}")
        L.home = compute.to(self.m.dev, copy=True)
        L.bind(L.home, self.m.empty)

    def fetch_weights(self, L: LayerState, buf: torch.Tensor, it: int, tag: str) -> Future:
        raise AssertionError("resident weights are never fetched")

    def publish_weights(self, L: LayerState, master: torch.Tensor, from_device: bool, it: int) -> list[Future]:
        if from_device:
            with torch.no_grad():
                L.home.copy_(master)
            return []
        src = master if self.m.dtype == torch.float32 else master.to(self.m.dtype)
        return [self.m.eng["h2d"].submit(lambda: L.home.copy_(src, non_blocking=True), "writeback", L.i, it,
                                         L.wbytes, "w")]

    def read_weights(self, L: LayerState) -> torch.Tensor:
        return L.home

    def load_weights(self, L: LayerState, w: torch.Tensor) -> None:
        L.home.copy_(w)

    def place_state(self, L: LayerState, opt: dict[str, torch.Tensor]) -> None:
        self.m.meter.alloc("gpu", L.opt_bytes, f"optimizer state of {L.name}")
        L.opt = {k: v.to(self.m.dev) for k, v in opt.items()}

    def read_state(self, L: LayerState, it: int) -> Future | None:
        return None

    def state_now(self, L: LayerState, read: Future | None) -> dict[str, torch.Tensor]:
        return L.opt

    def read_state_sync(self, L: LayerState) -> dict[str, torch.Tensor]:
        return L.opt

    def write_back_state(self, L: LayerState, opt: dict, it: int) -> list[Future]:
        return []

    def load_state(self, L: LayerState, opt: dict[str, torch.Tensor]) -> None:
        for k, v in opt.items():
            L.opt[k].copy_(v)


class HostTier(DeviceTier):
    name = "cpu"

    def place_weights(self, L: LayerState, compute: torch.Tensor) -> None:
        L.bind(None, self.m.empty)
        L.home = self.m.pool.get((L.numel,), self.m.dtype)
        L.home.copy_(compute)

    def fetch_weights(self, L: LayerState, buf: torch.Tensor, it: int, tag: str) -> Future:
        return self.m.eng["h2d"].submit(lambda: buf.copy_(L.home, non_blocking=True), "load", L.i, it, L.wbytes, tag)

    def publish_weights(self, L: LayerState, master: torch.Tensor, from_device: bool, it: int) -> list[Future]:
        if not from_device:
            L.home.copy_(master)
            return []
        src = master.to(self.m.dtype)
        return [self.m.eng["d2h"].submit(lambda: L.home.copy_(src, non_blocking=True), "writeback", L.i, it,
                                         L.wbytes, "w")]

    def place_state(self, L: LayerState, opt: dict[str, torch.Tensor]) -> None:
        L.opt = {}
        for k, v in opt.items():
            L.opt[k] = self.m.pool.get(v.shape, v.dtype)
            L.opt[k].copy_(v)


class SSDTier(HostTier):
    """Files on the offload directory, read into and written from host staging buffers."""
    name = "ssd"

    def place_weights(self, L: LayerState, compute: torch.Tensor) -> None:
        L.bind(None, self.m.empty)
        self.m.ssd_write_sync(f"w{L.i}", {"w": compute})

    def fetch_weights(self, L: LayerState, buf: torch.Tensor, it: int, tag: str) -> Future:
        m = self.m
        L.stage = m.pool.get((L.numel,), m.dtype)
        stage = L.stage
        read = m.eng["ssd_read"].submit(lambda: m.store.read(f"w{L.i}", {"w": stage}), "ssd_read", L.i, it,
                                        L.wbytes, tag)
        return m.eng["h2d"].submit(lambda: buf.copy_(stage, non_blocking=True), "load", L.i, it, L.wbytes, tag,
                                   after=[read])

    def publish_weights(self, L: LayerState, master: torch.Tensor, from_device: bool, it: int) -> list[Future]:
        m = self.m
        if from_device:
            stage = m.pool.get((L.numel,), m.dtype)
            src = master.to(m.dtype)
            d2h = m.eng["d2h"].submit(lambda: stage.copy_(src, non_blocking=True), "writeback", L.i, it, L.wbytes, "w")
        else:
            stage, d2h = master.to(m.dtype), None
            m.meter.alloc("cpu", nbytes(stage))

        def write_w():
            m.store.write(f"w{L.i}", {"w": stage})
            m.meter.set("ssd", m.store.bytes_used())
            if from_device:
                m.pool.put(stage)
            else:
                m.meter.free("cpu", nbytes(stage))
        return [m.eng["ssd_write"].submit(write_w, "ssd_write", L.i, it, L.wbytes, "w", after=[d2h])]

    def read_weights(self, L: LayerState) -> torch.Tensor:
        return self.m.store.read(f"w{L.i}")["w"]

    def load_weights(self, L: LayerState, w: torch.Tensor) -> None:
        self.m.ssd_write_sync(f"w{L.i}", {"w": w.to(self.m.dtype)})

    def place_state(self, L: LayerState, opt: dict[str, torch.Tensor]) -> None:
        self.m.ssd_write_sync(f"opt{L.i}", opt)

    def read_state(self, L: LayerState, it: int) -> Future:
        m = self.m

        def read():
            out = m.store.read(f"opt{L.i}")
            m.meter.alloc("cpu", sum(nbytes(t) for t in out.values()))
            return out
        return m.eng["ssd_read"].submit(read, "ssd_read", L.i, it, L.opt_bytes, "opt")

    def state_now(self, L: LayerState, read: Future | None) -> dict[str, torch.Tensor]:
        return read.result()

    def write_back_state(self, L: LayerState, opt: dict, it: int) -> list[Future]:
        m = self.m

        def write_opt():
            m.store.write(f"opt{L.i}", opt)
            m.meter.set("ssd", m.store.bytes_used())
            m.meter.free("cpu", sum(nbytes(t) for t in opt.values()))
        return [m.eng["ssd_write"].submit(write_opt, "ssd_write", L.i, it, sum(nbytes(t) for t in opt.values()),
                                          "opt")]

    def load_state(self, L: LayerState, opt: dict[str, torch.Tensor]) -> None:
        self.m.ssd_write_sync(f"opt{L.i}", opt)

    def read_state_sync(self, L: LayerState) -> dict[str, torch.Tensor]:
        return self.m.store.read(f"opt{L.i}")


def make_tiers(m: Machine) -> dict[str, DeviceTier]:
    return {"gpu": DeviceTier(m), "cpu": HostTier(m), "ssd": SSDTier(m)}


def publish(tiers: dict[str, DeviceTier], L: LayerState, opt: dict, it: int) -> list[Future]:
    """After an update: put the optimizer state back where it lives and bring the updated master
    weights to the compute weights' home. Returns the copies still under way."""
    lp = L.lp
    follow = tiers[lp.optimizer].write_back_state(L, opt, it)
    if L.shared_master:
        return follow
    return follow + tiers[lp.params].publish_weights(L, opt["master"], lp.optimizer == "gpu", it)
