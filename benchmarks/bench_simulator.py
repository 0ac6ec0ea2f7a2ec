"""Simulator speed: 3 iterations of GPT-3 175B (96 blocks) with an SSD-offloading plan.

Prints build and engine time, tasks/s and wall time per simulated iteration (target: <= 5 ms per
96-layer iteration, the planner calls `simulate` many times), as the minimum and the median of
--repeat runs (on a shared machine one run can take twice the minimum; the median says what a
planner sees), then runs the same compiled graph
through a naive reference loop (task objects, dicts, re-sorting the ready set at every step: how
one writes a simulator first) and prints the ratio. The reference must produce the same schedule,
so the benchmark doubles as a cross-check of the engine.

    .venv/bin/python benchmarks/bench_simulator.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from tiertune.hardware import load_hardware
from tiertune.schedule import LayerPlan, PlanGlobals, uniform_plan
from tiertune.simulator import builder, engine, simulate
from tiertune.simulator.run import cost_model
from tiertune.workload import TrainSpec, load_model

ITERATIONS = 3


@dataclass
class RefTask:
    id: int
    pool: int
    duration: float
    alloc: dict
    free: dict
    succ: list
    waiting_on: set
    start: float = -1.0
    end: float = -1.0


def reference_run(g: builder.TaskGraph) -> list[float]:
    """Same rules as engine.run, written plainly: objects, dicts, sort the ready list each round."""
    tasks = {t: RefTask(t, g.pool[g.resource[t]], g.duration[t],
                        {k: g.alloc[k][t] for k in range(3)}, {k: g.free[k][t] for k in range(3)},
                        list(g.succ[t]), set()) for t in range(len(g))}
    for t, task in tasks.items():
        for s in task.succ:
            tasks[s].waiting_on.add(t)
    used = {k: g.resident[k] for k in range(3)}
    slots = dict(enumerate(g.pool_slots))
    ready = [t for t in tasks.values() if not t.waiting_on]
    running: list[RefTask] = []
    now = 0.0
    while ready or running:
        ready.sort(key=lambda x: x.id)
        blocked, busy_pools = set(), set()
        for task in list(ready):
            if task.pool in busy_pools or slots[task.pool] == 0:
                continue
            fail = {k for k in range(3) if task.alloc[k] and (k in blocked or used[k] + task.alloc[k] > g.capacity[k])}
            if fail:
                blocked |= fail
                busy_pools.add(task.pool)
                continue
            for k in range(3):
                used[k] += task.alloc[k]
            slots[task.pool] -= 1
            task.start, task.end = now, now + task.duration
            ready.remove(task)
            running.append(task)
        if not running:
            raise RuntimeError("reference loop stalled")
        running.sort(key=lambda x: (x.end, x.id))
        task = running.pop(0)
        now = task.end
        slots[task.pool] += 1
        for k in range(3):
            used[k] -= task.free[k]
        for s in task.succ:
            tasks[s].waiting_on.discard(task.id)
            if not tasks[s].waiting_on:
                ready.append(tasks[s])
    return [tasks[t].start for t in range(len(g))]


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Minimum and median wall time of `repeat` calls, and the last call's result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()

    model, hw = load_model("gpt3-175b"), load_hardware("fuyou-4090-12ssd")
    train = TrainSpec(batch=1, seq_len=2048)
    n = model.n_layers + 2
    ssd = LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="recompute")
    plan = uniform_plan(model.name, hw.name, train, n, ssd, PlanGlobals(iterations=ITERATIONS)).with_layers(
        [ssd] * (n - 1) + [ssd.replace(activations="cpu")])
    cm = cost_model(model, train, hw)

    simulate(model, train, hw, plan)                   # warm the cost-model cache
    t_sim, med_sim, result = timed(lambda: simulate(model, train, hw, plan), args.repeat)
    t_build, med_build, g = timed(lambda: builder.build(model, train, hw, plan, ITERATIONS, cm), args.repeat)
    t_engine, med_engine, run = timed(lambda: engine.run(g), args.repeat)
    t_ref, _, ref_start = timed(lambda: reference_run(g), max(1, args.repeat // 10))
    same = all(abs(a - b) <= 1e-9 * max(1.0, abs(a)) for a, b in zip(run.start, ref_start))

    tasks = len(g)
    print(f"gpt3-175b on {hw.name}, {ITERATIONS} iterations, {tasks} tasks "
          f"(simulated iteration {result.iteration_s:.2f} s, bottleneck {result.bottleneck}); "
          f"min / median of {args.repeat} runs")
    print(f"  simulate() total   {t_sim * 1e3:7.2f} / {med_sim * 1e3:6.2f} ms   per 96-layer iteration "
          f"{t_sim / ITERATIONS * 1e3:5.2f} / {med_sim / ITERATIONS * 1e3:5.2f} ms (target <= 5)   "
          f"{tasks / t_sim / 1e6:.2f} M tasks/s")
    print(f"    build graph      {t_build * 1e3:7.2f} / {med_build * 1e3:6.2f} ms")
    print(f"    engine loop      {t_engine * 1e3:7.2f} / {med_engine * 1e3:6.2f} ms   {tasks / t_engine / 1e6:.2f} M tasks/s")
    print(f"  reference loop     {t_ref * 1e3:7.2f} ms   {tasks / t_ref / 1e6:.3f} M tasks/s   same schedule: {same}")
    print(f"  engine speed-up over the reference loop: {t_ref / t_engine:.1f}x")

if __name__ == "__main__":
    main()
