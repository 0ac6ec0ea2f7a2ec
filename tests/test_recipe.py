"""A layer's recipe is the one account of its work: for any model, hardware and per-layer plan,
the recipes' task counts and durations add up to exactly what the engine's task graph runs per
resource, and the bytes the recipes say are held are a floor under the engine's peak per tier."""

import math

from hypothesis import HealthCheck, given, settings

from tiertune.simulator import simulate
from tiertune.simulator.builder import build
from tiertune.simulator.costs import CostModel
from tiertune.simulator.recipe import busy_per_step, plan_recipes
from tiertune.vocab import CPU_TIER, GPU_TIER, RESOURCES, TIERS
from test_simulator_properties import cases


@given(cases())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_recipes_add_up_to_the_engines_work_and_floor_its_memory(case):
    model, train, hw, plan, k = case
    cm = CostModel(model, train, hw)
    rec = plan_recipes(cm, plan)
    want = busy_per_step(rec)

    # The task graph runs exactly the recipes' tasks, every iteration.
    g = build(model, train, hw, plan, k, cm)
    for it in range(k):
        got = dict.fromkeys(RESOURCES, 0.0)
        for t in range(len(g)):
            if g.iteration[t] == it:
                got[RESOURCES[g.resource[t]]] += g.duration[t]
        for r in RESOURCES:
            assert math.isclose(got[r], want[r], rel_tol=1e-9, abs_tol=1e-12), (r, it)
    counts = sum(s.count for r_ in rec for s in r_.steps.values() if s.duration > 0)
    assert counts == sum(1 for t in range(len(g)) if g.iteration[t] == 0 and g.duration[t] > 0)

    r = simulate(model, train, hw, plan, iterations=k)
    if not r.fits:
        return
    for res in RESOURCES:
        assert math.isclose(r.busy_s[res], want[res], rel_tol=1e-9, abs_tol=1e-12), res
    # Home bytes are held from the start; during layer i's backward the device also holds what
    # every earlier layer kept for its own backward and layer i's working set.
    for k_, tier in enumerate(TIERS):
        home = sum(x.home[k_] for x in rec) + (hw.gpu_reserve_bytes if k_ == GPU_TIER else 0)
        assert r.peak_bytes[tier] >= home, tier
    gpu_home = hw.gpu_reserve_bytes + sum(x.home[GPU_TIER] for x in rec)
    kept_before = 0
    for x in rec:
        assert r.peak_bytes["gpu"] >= gpu_home + kept_before + x.working_gpu + x.kept[GPU_TIER]
        kept_before += x.kept[GPU_TIER]
    # and while a host optimizer steps a layer, host memory holds that step's working bytes too
    cpu_home = sum(x.home[CPU_TIER] for x in rec)
    for x in rec:
        assert r.peak_bytes["cpu"] >= cpu_home + x.host_working
