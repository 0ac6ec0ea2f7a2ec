"""The cyclic CP-SAT model of a training step: its Python longest-path evaluation and CP-SAT agree
on the period of any fixed plan (also in a model with every layer pinned), its search never returns a plan it rates worse than its seed, and
its period for the named baselines is close to what the engine simulates."""

import random

from ortools.sat.python import cp_model

from tiertune.hardware import load_hardware
from tiertune.planner import cpsat
from tiertune.planner.cycle import CycleModel, solve_cycle
from tiertune.planner.search import run_baselines
from tiertune.simulator.costs import CostModel
from tiertune.workload import ModelSpec, TrainSpec

HW = load_hardware("lsp-4090")
MODEL = ModelSpec(name="m", arch="llama", vocab_size=32000, hidden=1024, n_layers=6, n_heads=8, n_kv_heads=8,
                  ffn_hidden=2816, max_seq_len=1024)
TRAIN = TrainSpec(batch=4, seq_len=1024)


def test_evaluate_equals_cp_sat_on_a_pinned_plan():
    cm = CostModel(MODEL, TRAIN, HW)
    choices = cpsat.layer_choices(TRAIN)
    model = CycleModel(cm, [choices] * len(cm.layers), HW.gpu_mem_bytes * 100, depth=1)
    rng = random.Random(1)
    for _ in range(3):
        pick = [rng.randrange(len(choices)) for _ in model.x]
        period, _ = model.evaluate([choices[k] for k in pick])
        pinned = model.m.clone()
        for i, k in enumerate(pick):
            pinned.add(model.x[i][k] == 1)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 2
        assert solver.solve(pinned) == cp_model.OPTIMAL
        assert solver.objective_value == period
        # a model with every layer pinned to the plan (as each search window pins all but a few)
        # rates it the same
        plan = [choices[k] for k in pick]
        alone = CycleModel(cm, [[lp] for lp in plan], HW.gpu_mem_bytes * 100, depth=1, unit=model.unit)
        assert alone.evaluate(plan)[0] == period
        # and evaluate's hint is a solution of the model (the search starts every window from it)
        _, hint = model.evaluate(plan)
        hinted = model.m.clone()
        for var, v in hint:
            hinted.add_hint(var, v)
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        assert solver.solve(hinted) == cp_model.OPTIMAL and solver.objective_value == period


def test_the_search_never_returns_worse_than_its_seed_and_tracks_the_engine():
    for b in run_baselines(MODEL, TRAIN, HW, ("zero-offload", "megatrain", "fuyou")):
        assert b.fits
        cm = CostModel(MODEL, b.plan.train, HW)          # the policy's own settings (fp32 host gradients)
        found, st = solve_cycle(cm, cpsat.layer_choices(TRAIN), list(b.plan.layers), HW.gpu_mem_bytes, 1, 3.0)
        assert found and all(len(layers) == len(b.plan.layers) for layers in found)
        assert st.objective_s <= st.extra["seed_objective_s"] * (1 + 1e-9)
        # the model's period of the seed is within 5% of the engine's iteration time
        assert abs(st.extra["seed_objective_s"] / b.iteration_s - 1) < 0.05, (b.name, st.extra, b.iteration_s)
