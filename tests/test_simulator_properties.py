"""The engine keeps the rules of the machine for any model, hardware and per-layer plan:
resources never run more tasks than they have slots, dependencies hold, memory never exceeds a
tier and every transient byte is freed, and the reported times are consistent with the graph."""

import networkx as nx
from hypothesis import HealthCheck, given, settings, strategies as st

from tiertune.hardware import load_hardware
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.simulator import simulate
from tiertune.simulator.builder import MANY_TIERS
from tiertune.hardware import CUDA_CONTEXT_BYTES
from tiertune.vocab import RESOURCES, TIERS
from tiertune.traces import Trace
from strategies import model_and_train

BASE_HW = load_hardware("lsp-4090")


@st.composite
def layer_plans(draw, fused_ok: bool):
    optimizer = draw(st.sampled_from(["gpu", "cpu", "ssd"]))
    rank = draw(st.one_of(st.none(), st.integers(1, 48))) if optimizer != "gpu" else None
    return LayerPlan(params=draw(st.sampled_from(["gpu", "cpu", "ssd"])), optimizer=optimizer,
                     update=draw(st.sampled_from(["after", "overlap", "fused"] if fused_ok else ["after", "overlap"])),
                     activations=draw(st.sampled_from(["keep", "cpu", "ssd", "recompute"])), grad_rank=rank)


@st.composite
def cases(draw):
    model, train = draw(model_and_train())
    accum = train.grad_accum
    hw = BASE_HW.replace(pcie_duplex=draw(st.booleans()), ssd_duplex=draw(st.booleans()),
                         cpu_workers=draw(st.integers(1, 3)), ssd_count=draw(st.integers(1, 4)),
                         cpu_mem_bytes=draw(st.sampled_from([BASE_HW.cpu_mem_bytes, 1 << 20, 3 << 20])))
    layers = [draw(layer_plans(fused_ok=accum == 1)) for _ in range(model.n_layers + 2)]
    # Tight budgets (a few MiB above the CUDA context reserve) exercise memory waits and stalls; a
    # prefetch depth of 9 reaches back past the whole previous step of a small model.
    gpu_mem = draw(st.sampled_from([None, CUDA_CONTEXT_BYTES + (1 << 20), CUDA_CONTEXT_BYTES + (6 << 20)]))
    plan = Plan(model=model.name, hardware=hw.name, train=train, layers=layers,
                globals=PlanGlobals(prefetch_depth=draw(st.sampled_from([0, 1, 2, 3, 9])), gpu_mem_bytes=gpu_mem,
                                    activation_slices=draw(st.sampled_from(
                                        [d for d in (1, 2, 3, 4) if train.batch % d == 0]))))
    return model, train, hw, plan, draw(st.integers(1, 3))


def _max_concurrency(intervals):
    points = sorted([(e, -1) for s, e in intervals] + [(s, 1) for s, e in intervals])  # ends first on ties
    live = best = 0
    for _, d in points:
        live += d
        best = max(best, live)
    return best


@given(cases())
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_simulated_runs_obey_resources_dependencies_and_memory(case):
    model, train, hw, plan, k = case
    r = simulate(model, train, hw, plan, iterations=k)
    g = r.graph
    if not r.fits:
        # Not fitting is an answer, not a crash: it names a tier and the bytes.
        assert r.error and r.error_tier in TIERS and "GiB" in r.error
        return
    run = r.run
    start, end = run.start, run.end

    # The engine's one-tier view of what each task allocates and frees agrees with the per-tier lists.
    for per_tier, tier, nbytes in ((g.alloc, g.alloc_tier, g.alloc_bytes), (g.free, g.free_tier, g.free_bytes)):
        for t in range(len(g)):
            on = [k for k in range(3) if per_tier[k][t]]
            assert tier[t] == (on[0] if len(on) == 1 else -1 if not on else MANY_TIERS)
            assert len(on) != 1 or nbytes[t] == per_tier[on[0]][t]

    # Every edge goes from a smaller id to a larger one (ids are a topological order and the
    # engine's priorities); every task starts after all its predecessors ended and lasts its
    # cost-model duration.
    for u, succs in enumerate(g.succ):
        for v in succs:
            assert u < v
            assert start[v] >= end[u]
    for t in range(len(g)):
        assert abs((end[t] - start[t]) - g.duration[t]) <= 1e-9 * max(1.0, end[t])

    # No slot pool (a resource, or two sharing a half-duplex link) runs more tasks than it has slots.
    by_pool = {}
    for t in range(len(g)):
        if g.duration[t] > 0:
            by_pool.setdefault(g.pool[g.resource[t]], []).append((start[t], end[t]))
    for p, iv in by_pool.items():
        assert _max_concurrency(iv) <= g.pool_slots[p], RESOURCES[p]

    # Memory never exceeds a tier, never goes negative, and every transient byte is freed again.
    last = {}
    for tm, tier, b in zip(run.mem_time, run.mem_tier, run.mem_bytes):
        assert 0 <= b <= g.capacity[tier], TIERS[tier]
        last[tier] = b
    assert [last[i] for i in range(3)] == g.resident
    assert [max(b for tier, b in zip(run.mem_tier, run.mem_bytes) if tier == i) for i in range(3)] == \
        [r.peak_bytes[t] for t in TIERS]

    # Times agree with the graph: the run is no shorter than its critical path, and no slot pool is
    # busier than the time it had (per iteration for one iteration; over the steady window otherwise).
    dag = g.to_networkx()
    longest = {}
    for t in nx.topological_sort(dag):
        longest[t] = max((longest[u] for u in dag.predecessors(t)), default=0.0) + g.duration[t]
    makespan = max(end)
    assert makespan >= max(longest.values()) * (1 - 1e-9)
    steady_iters = [t for t in range(len(g)) if g.iteration[t] >= (1 if k > 1 else 0)]
    window = makespan - min(start[t] for t in steady_iters)
    busy = {}
    for t in steady_iters:
        busy[g.pool[g.resource[t]]] = busy.get(g.pool[g.resource[t]], 0.0) + g.duration[t]
    for p, b in busy.items():
        assert b <= window * g.pool_slots[p] * (1 + 1e-9) + 1e-12
    if k == 1:
        assert r.iteration_s >= max(longest.values()) * (1 - 1e-9)
        for p, b in busy.items():
            assert r.iteration_s * g.pool_slots[p] >= b * (1 - 1e-9)


@given(cases())
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_trace_json_round_trip_is_lossless_and_agrees_with_the_summary(tmp_path_factory, case):
    model, train, hw, plan, k = case
    r = simulate(model, train, hw, plan.replace(globals=PlanGlobals(gpu_mem_bytes=None)), iterations=k)
    if not r.fits:
        return
    path = tmp_path_factory.mktemp("trace") / "sim.json"
    r.trace.save(path)
    back = Trace.load(path)
    assert back.equals(r.trace)
    assert back.source == "simulated" and back.meta["capacity"]["gpu"] == hw.gpu_mem_bytes
    assert back.peak_bytes() == r.peak_bytes
    assert abs(back.iteration_s() - r.iteration_s) <= 1e-9 * max(r.iteration_s, 1e-9)
    assert set(back.events["task"]) and back.events["task"].is_unique
    for res, s in r.busy_s.items():
        assert abs(back.busy_s()[res] - s) <= 1e-9 * max(s, 1e-9)
