"""The executor's view of the machine: the budgeted device tier, copy engines, timing, host buffers.

One code path for CUDA and for a CPU standing in for the GPU:
  - `Meter` accounts every byte the executor places on each tier and enforces the device budget
    (on CUDA the caching allocator is also capped and its own peak reported).
  - `Engine` is one resource of the trace (h2d, d2h, cpu, ssd_read, ssd_write): a worker thread
    that runs submitted jobs in order. On CUDA, copy engines issue their copies on their own
    stream and wait for them, so a finished future means the data is there; on a CPU the copy is
    a memcpy in that thread (torch releases the GIL), overlapping the main thread's compute.
  - `Recorder` collects trace events: perf_counter around work done by a thread that waited for
    it; CUDA events for compute on the GPU, resolved to seconds at the end of each step.
  - `HostPool` hands out host buffers by shape and takes them back: allocated once and reused,
    pinned on CUDA (pinning on the fly costs a cudaHostAlloc per copy and can halve copy speed:
    NVIDIA's CUDA C++ Best Practices Guide, 'Pinned Memory').
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator

import torch

from tiertune.errors import InputError
from tiertune.vocab import TIERS

GiB = 1 << 30
PROMISE_WAIT_S = 60.0       # longest wait for promised memory before an allocation gives up


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class BudgetExceeded(InputError):
    """The device tier would go over its byte budget."""


class Meter:
    """Bytes on each tier now and at peak, sampled over time; a hard budget on `gpu`."""

    def __init__(self, budget: int | None, clock: Callable[[], float], cuda: bool = False):
        self.budget = budget
        self.now = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.samples: list[dict] = []
        self._clock = clock
        self._cuda = cuda
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._promised = dict.fromkeys(TIERS, 0)     # bytes that copies under way will free

    def promise(self, tier: str, n: int) -> None:
        """A copy under way will free n bytes of `tier` (`free(..., promised=True)` when it has)."""
        with self._lock:
            self._promised[tier] += n

    def alloc(self, tier: str, n: int, what: str = "") -> None:
        """Take n bytes; on the budgeted device, first wait for copies under way that will free
        memory (an offload of the previous layer's activations running late behind a busy host,
        as a CUDA executor waits for the copy stream before reusing memory); over budget then, fail."""
        with self._lock:
            new = self.now[tier] + n
            while (tier == "gpu" and self.budget is not None and new > self.budget and self._promised[tier] > 0
                   and self._freed.wait(timeout=PROMISE_WAIT_S)):
                new = self.now[tier] + n
            if tier == "gpu" and self.budget is not None and new > self.budget:
                raise BudgetExceeded(f"device budget {self.budget / GiB:.4g} GiB exceeded by {what or 'an allocation'}: "
                                     f"{self.now[tier] / GiB:.4g} GiB in use + {n / GiB:.4g} GiB needed")
            self._set(tier, new)

    def try_alloc(self, tier: str, n: int) -> bool:
        """Allocate if it fits the budget; a prefetch that does not fit waits for a later try."""
        with self._lock:
            new = self.now[tier] + n
            if tier == "gpu" and self.budget is not None and new > self.budget:
                return False
            self._set(tier, new)
            return True

    def free(self, tier: str, n: int, promised: bool = False) -> None:
        with self._lock:
            self._set(tier, self.now[tier] - n)
            if promised:
                self._promised[tier] -= n
            self._freed.notify_all()

    def set(self, tier: str, n: int) -> None:
        with self._lock:
            self._set(tier, n)

    def _set(self, tier: str, n: int) -> None:
        self.now[tier] = n
        if n > self.peak[tier]:
            self.peak[tier] = n
        self.samples.append({"time_s": self._clock(), "tier": tier, "bytes": n})

    def peak_bytes(self) -> dict[str, int]:
        out = dict(self.peak)
        if self._cuda:       # what the allocator really held: temporaries inside a layer's kernels too
            out["gpu"] = max(out["gpu"], int(torch.cuda.max_memory_allocated()))
        return out


class Recorder:
    """Trace events of a measured run (columns of tiertune.traces.Trace)."""

    def __init__(self, cuda: bool):
        self.t0 = time.perf_counter()
        self.cuda = cuda
        self.events: list[dict] = []
        self._pending: list[tuple] = []       # CUDA: (event row, start event, end event)
        self._ref: tuple | None = None          # CUDA: (event, perf_counter seconds) it was recorded at
        self._lock = threading.Lock()

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, kind: str, layer: int, resource: str, it: int, start: float, end: float, nbytes: int = 0,
            flops: float = 0.0, tag: str = "", mb: int = 0, part: int | None = None) -> None:
        """One event; `part`: which slice of the micro-batch (`PlanGlobals.activation_slices`) it
        worked on, None for work on the whole micro-batch (its task name then has no `:s` part)."""
        t = f".{tag}" if tag else ""
        s = f":s{part}" if part is not None else ""
        row = {"source": "measured", "iteration": it, "task": f"{kind}{t}:L{layer}:it{it}:mb{mb}{s}", "kind": kind,
               "layer": layer, "resource": resource, "start_s": start, "end_s": max(end, start + 1e-9),
               "bytes": int(nbytes), "flops": float(flops)}
        with self._lock:
            self.events.append(row)

    @contextlib.contextmanager
    def timed(self, kind: str, layer: int, resource: str, it: int, nbytes: int = 0, flops: float = 0.0,
              tag: str = "", mb: int = 0, part: int | None = None) -> Iterator[None]:
        """Time work done here. On CUDA, `gpu` work is timed with events on the current stream (the
        host only queues it); other resources run in threads that wait for their work."""
        if self.cuda and resource == "gpu":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if self._ref is None:
                torch.cuda.synchronize()
                ref = torch.cuda.Event(enable_timing=True)
                ref.record()
                self._ref = (ref, self.clock())
            start.record()
            yield
            end.record()
            with self._lock:
                self._pending.append(((kind, layer, resource, it, nbytes, flops, tag, mb, part), start, end))
            return
        s = self.clock()
        yield
        self.add(kind, layer, resource, it, s, self.clock(), nbytes, flops, tag, mb, part)

    def flush(self) -> None:
        """Resolve CUDA events to seconds (call after the step's work is queued; synchronises)."""
        if not self._pending:
            return
        torch.cuda.synchronize()
        ref, ref_s = self._ref
        with self._lock:
            pending, self._pending = self._pending, []
        for (kind, layer, resource, it, nb, fl, tag, mb, part), start, end in pending:
            self.add(kind, layer, resource, it, ref_s + ref.elapsed_time(start) / 1e3,
                     ref_s + ref.elapsed_time(end) / 1e3, nb, fl, tag, mb, part)


class Engine:
    """One resource: a thread running jobs in submission order, each timed into the trace.

    `after` futures are waited for before the job's clock starts (the dependency, not the work).
    Callers keep the dependency graph acyclic across engines: a job only waits for work already
    submitted to other engines (never for work queued behind itself).
    """

    def __init__(self, resource: str, recorder: Recorder, device: torch.device):
        self.resource = resource
        self.rec = recorder
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and resource in ("h2d", "d2h") else None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        # torch's intra-op thread count is per OS thread under OpenMP and MKL: a new thread starts at
        # the machine's core count whatever torch.set_num_threads said in the main thread.
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name=f"tiertune-{resource}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], kind: str, layer: int, it: int, nbytes: int = 0, tag: str = "",
               after: list[Future | None] = (), mb: int = 0, then: Callable[[], None] | None = None,
               part: int | None = None) -> Future:
        """Queue `fn`; `then` runs in the worker once fn's copies are complete (CUDA: after the
        stream sync), before the future is done, so whoever waits sees its effects too."""
        fut: Future = Future()
        # CUDA: the copy must see what the compute stream has queued so far.
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        self._q.put((fn, kind, layer, it, nbytes, tag, [a for a in after if a is not None], mb, part, ready, fut, then))
        return fut

    def _loop(self) -> None:
        # The worker runs its ops with the creator's thread count, as calibrate measured them. Left at
        # the default, each small op that parallelises (MKL's vectorised sqrt of a 32 x 32 Adam moment)
        # waited for a second OpenMP/MKL thread to be scheduled: LSP-Offload's subspace AdamW ran 25-40x
        # its prediction beside the compute thread on a busy 2-core host (24 us per sqrt against 3 us).
        torch.set_num_threads(self._threads)
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, kind, layer, it, nb, tag, after, mb, part, ready, fut, then = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                for a in after:
                    wait(a)
                s = self.rec.clock()
                if self.stream is not None:
                    self.stream.wait_event(ready)
                    with torch.cuda.stream(self.stream):
                        out = fn()
                    self.stream.synchronize()
                else:
                    out = fn()
                self.rec.add(kind, layer, self.resource, it, s, self.rec.clock(), nb, 0.0, tag, mb, part)
                if then is not None:
                    then()
                fut.set_result(out)
            except BaseException as exc:       # surfaced where the future is waited for
                fut.set_exception(exc)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


def wait(x) -> object:
    """Wait for a future, and for futures its result names (a job may hand on follow-up work)."""
    if isinstance(x, Future):
        x = x.result()
    if isinstance(x, (list, tuple)):
        for y in x:
            wait(y)
    return x


def done(x) -> bool:
    if isinstance(x, Future):
        if not x.done():
            return False
        if x.exception() is not None:
            return True
        x = x.result()
    if isinstance(x, (list, tuple)):
        return all(done(y) for y in x)
    return True


class HostPool:
    """Host buffers reused by (shape, dtype), accounted on the `cpu` tier while handed out."""

    def __init__(self, meter: Meter, pin: bool):
        self.meter = meter
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def get(self, shape, dtype: torch.dtype, stride=None) -> torch.Tensor:
        if stride is not None and tuple(stride) == torch.empty(tuple(shape), device="meta").stride():
            stride = None
        key = (tuple(shape), dtype, tuple(stride) if stride is not None else None)
        with self._lock:
            free = self._free.get(key)
            t = free.pop() if free else None
        if t is None:
            if stride is not None:
                t = torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, pin_memory=self.pin)
            else:
                t = torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pin)
            self.allocated += nbytes(t)
        self.meter.alloc("cpu", nbytes(t))
        return t

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A host buffer for a copy of `t`, with its strides when they are dense (autograd kernels
        may expect the layout they saved)."""
        return self.get(t.shape, t.dtype, torch.empty_like(t, device="meta").stride())

    def put(self, t: torch.Tensor) -> None:
        self.meter.free("cpu", nbytes(t))
        canonical = torch.empty(tuple(t.shape), device="meta").stride()
        key = (tuple(t.shape), t.dtype, None if t.stride() == canonical else tuple(t.stride()))
        with self._lock:
            self._free.setdefault(key, []).append(t)
