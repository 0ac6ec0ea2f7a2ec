"""Discrete-event engine: runs a compiled `TaskGraph` and returns when each task started and ended,
plus a memory sample per tier on every change.

A task starts when its predecessors are done, its resource's slot pool has a free slot and its
allocation fits on every tier. Ready tasks are considered in id order (ids are topologically
ordered priorities) across all resources; a task that does not fit blocks the tiers it waits on
for every later id in that round, so a low-priority prefetch cannot take the memory a more
urgent task is waiting for (the classic deadlock of greedy prefetching). Within one resource the
most urgent ready task goes first, like work issued in order on a CUDA stream.

Contention (`TaskGraph.contention`, from `HardwareProfile.contention`): where resources share a
machine part (a CPU standing in for the GPU shares its cores and memory bandwidth with the copy
and optimizer threads; CPU Adam shares DRAM bandwidth with DMA), a task's speed falls while the
other resources are busy. A task then carries its remaining work (seconds at full speed) and its
end is re-planned whenever the set of busy resources changes; an end event that was re-planned
is stale and skipped. Without contention none of this runs.

Speed: one function, plain lists of ints/floats, heaps of ints, locals only in the
hot loop; no numpy element reads, no SimPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import compress
from operator import not_

from tiertune.simulator.builder import MANY_TIERS, TaskGraph
from tiertune.vocab import TIERS

GiB = float(1 << 30)


class SimStall(RuntimeError):
    """No task can ever start again although some have not run: the plan does not fit."""

    def __init__(self, message: str, tier: str | None = None, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.tier, self.needed, self.available = tier, needed, available


@dataclass
class EngineRun:
    start: list[float]
    end: list[float]
    mem_time: list[float]        # memory samples: time, tier index, bytes in use after the change
    mem_tier: list[int]
    mem_bytes: list[int]
    peak: list[int]              # per tier


def run(g: TaskGraph) -> EngineRun:
    n = len(g.duration)
    dur = g.duration
    pool = list(map(g.pool.__getitem__, g.resource))     # slot pool of each task
    # What each task allocates and frees, on one tier (almost every task; MANY_TIERS: read the
    # per-tier lists): one branch per task instead of one per tier.
    atier, abytes, ftier, fbytes = g.alloc_tier, g.alloc_bytes, g.free_tier, g.free_bytes
    succ = g.successor_lists()
    npred = list(g.npred)
    slots = list(g.pool_slots)
    ready: list[list[int]] = [[] for _ in slots]     # per slot pool, a heap of ready task ids
    for t in compress(range(n), map(not_, npred)):
        ready[pool[t]].append(t)                    # ascending ids: already valid heaps
    # cand: a heap holding the most urgent ready task of every pool with a free slot, and stale
    # entries (a task since started or overtaken by a more urgent one, or whose pool has no free
    # slot now) skipped when popped. A task goes in when it becomes the most urgent of its pool
    # with a slot free, or a slot comes free under it; a round pops what is there in id order.
    cand = [q[0] for q, free in zip(ready, slots) if q and free]
    heapify(cand)
    held: list[int] = []                            # tasks waiting for memory: looked at again next round
    cap = list(g.capacity)
    used = list(g.resident)                         # bytes in use per tier
    peak = list(used)
    start = [0.0] * n
    end = [0.0] * n
    mem = [0.0, 0, used[0], 0.0, 1, used[1], 0.0, 2, used[2]]    # (time, tier, bytes in use) per change
    sample = mem.extend
    events: list[tuple[float, int]] = []
    now = 0.0
    cont = g.contention
    if cont:
        res_of = g.resource
        nres = len(cont)
        busy = [0] * nres                # running tasks per resource
        mask = 0                         # bit r: resource r runs something
        running: list[int] = []
        left = [0.0] * n                 # work left, in seconds at full speed
        speed = [0.0] * n
        since = [0.0] * n                # when left/speed were last brought up to date
        due = [-1.0] * n                 # the end event that counts (-1: not planned yet)
        busy_set = -1
        fresh = False                    # a task started since the last re-plan

    while True:
        # --- start whatever can start now, most urgent id first across resources ---
        blocked = 0                                  # bit per tier: an earlier task waits for memory there
        while cand:
            t = heappop(cand)
            p = pool[t]
            q = ready[p]
            if not slots[p] or not q or q[0] != t:
                continue                             # stale
            k = atier[t]
            if k >= 0:
                b = used[k] + abytes[t]
                if blocked >> k & 1 or b > cap[k]:
                    blocked |= 1 << k                # only the tier it waits on is reserved for it
                    held.append(t)
                    continue                         # this resource waits for its most urgent task
                used[k] = b
                if b > peak[k]:
                    peak[k] = b
                sample((now, k, b))
            elif k == MANY_TIERS and not _alloc_many(g.alloc, t, used, cap, peak, blocked, now, sample):
                # Only the tiers it waits on are reserved for it: reserving all of its tiers
                # could block the very task whose end frees what it waits for.
                blocked |= _fails(g.alloc, t, used, cap, blocked)
                held.append(t)
                continue
            heappop(q)
            slots[p] -= 1
            start[t] = now
            if cont:
                r = res_of[t]
                busy[r] += 1
                mask |= 1 << r
                running.append(t)
                left[t] = dur[t]
                since[t] = now
                fresh = True
            else:
                heappush(events, (now + dur[t], t))
            if slots[p] and q:
                heappush(cand, q[0])
        if held:                                     # popped in id order: a valid heap
            cand, held = held, cand
        if cont:
            if mask != busy_set or fresh:
                busy_set, fresh = mask, False
                for x in running:
                    row = cont[res_of[x]]
                    slow = 1.0
                    for r in range(nres):
                        if busy[r]:
                            slow += row[r]
                    v = 1.0 / slow
                    if v != speed[x] or due[x] < 0:
                        left[x] = max(0.0, left[x] - (now - since[x]) * speed[x])
                        since[x] = now
                        speed[x] = v
                        due[x] = now + left[x] / v
                        heappush(events, (due[x], x))
            while events and due[events[0][1]] != events[0][0]:
                heappop(events)                  # re-planned or finished: stale
        if not events:
            break
        # --- every task ending at the next event time, then one dispatch round ---
        now, t = heappop(events)
        while True:
            end[t] = now
            p = pool[t]
            slots[p] += 1
            q = ready[p]
            if q:
                heappush(cand, q[0])
            k = ftier[t]
            if k >= 0:
                b = used[k] - fbytes[t]
                used[k] = b
                sample((now, k, b))
            elif k == MANY_TIERS:
                for k, f in enumerate(g.free):
                    if f[t]:
                        used[k] -= f[t]
                        sample((now, k, used[k]))
            for s in succ[t]:
                k = npred[s] - 1
                npred[s] = k
                if not k:
                    p = pool[s]
                    q = ready[p]
                    heappush(q, s)
                    if q[0] == s and slots[p]:
                        heappush(cand, s)
            if cont:
                due[t] = -2.0
                r = res_of[t]
                busy[r] -= 1
                if not busy[r]:
                    mask &= ~(1 << r)
                running.remove(t)
                while events and due[events[0][1]] != events[0][0]:
                    heappop(events)
            if not events or events[0][0] != now:
                break
            t = heappop(events)[1]

    if any(ready) or any(npred):                 # something never ran
        raise _stall(g, ready, npred, used)
    return EngineRun(start, end, mem[0::3], mem[1::3], mem[2::3], peak)


def _fails(alloc: tuple, t: int, used: list[int], cap: list[int], blocked: int) -> int:
    """Bit per tier on which task t's allocation does not fit now (or an earlier task waits)."""
    fail = 0
    for k, a in enumerate(alloc):
        if a[t] and (blocked >> k & 1 or used[k] + a[t] > cap[k]):
            fail |= 1 << k
    return fail


def _alloc_many(alloc: tuple, t: int, used: list[int], cap: list[int], peak: list[int], blocked: int,
                now: float, sample) -> bool:
    """Allocate task t's bytes on several tiers if all fit (tier by tier, a sample each); False if not."""
    if _fails(alloc, t, used, cap, blocked):
        return False
    for k, a in enumerate(alloc):
        if a[t]:
            used[k] += a[t]
            if used[k] > peak[k]:
                peak[k] = used[k]
            sample((now, k, used[k]))
    return True


def _stall(g: TaskGraph, ready: list[list[int]], npred: list[int], used: list[int]) -> SimStall:
    """Explain why nothing can start: the waiting tasks and the tier they do not fit on."""
    waiting = sorted(t for q in ready for t in q)
    if not waiting:                                  # cannot happen with topological ids; say so if it does
        stuck = [g.name(t) for t in range(len(npred)) if npred[t]][:3]
        return SimStall(f"task graph has a cycle around {', '.join(stuck)}")
    for t in waiting:
        for k in range(3):
            need = g.alloc[k][t]
            avail = g.capacity[k] - used[k]
            if need > avail:
                names = ", ".join(g.name(x) for x in waiting[:3])
                msg = (f"does not fit in {TIERS[k]} memory: {g.name(t)} needs {need / GiB:.2f} GiB but only "
                       f"{avail / GiB:.2f} GiB of {g.capacity[k] / GiB:.2f} GiB is free "
                       f"({used[k] / GiB:.2f} GiB held); waiting: {names}")
                return SimStall(msg, TIERS[k], need, avail)
    names = ", ".join(g.name(x) for x in waiting[:3])
    return SimStall(f"simulation stalled with tasks waiting: {names}")
