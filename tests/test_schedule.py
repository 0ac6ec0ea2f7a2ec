"""Plans: validation names the bad field, and JSON round trips are exact."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from tiertune.errors import InputError
from tiertune.schedule import ACTIVATIONS, TIERS, UPDATES, LayerPlan, Plan, PlanGlobals
from tiertune.workload import TrainSpec

layer_plans = st.builds(
    LayerPlan, params=st.sampled_from(TIERS), optimizer=st.sampled_from(("cpu", "ssd")),
    update=st.sampled_from(UPDATES), activations=st.sampled_from(ACTIVATIONS),
    grad_rank=st.one_of(st.none(), st.integers(1, 4096)))
plans = st.builds(
    Plan, model=st.text(min_size=1, max_size=8), hardware=st.sampled_from(["lsp-4090", "fuyou-4090-12ssd"]),
    train=st.builds(TrainSpec, batch=st.integers(1, 8), seq_len=st.integers(1, 4096),
                    dtype=st.sampled_from(["fp32", "bf16"]), optimizer=st.sampled_from(["adamw", "sgd"])),
    layers=st.lists(layer_plans, min_size=1, max_size=10).map(tuple),
    globals=st.builds(PlanGlobals, prefetch_depth=st.integers(0, 4), iterations=st.integers(1, 5)),
    provenance=st.fixed_dictionaries({"policy": st.sampled_from(["fuyou", "planner"])}))


@given(plans)
@settings(max_examples=60, deadline=None)
def test_plan_survives_a_json_round_trip_unchanged(plan):
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.provenance == plan.provenance


def _plan_dict():
    return Plan(model="tiny-llama", hardware="lsp-4090", train=TrainSpec(seq_len=16),
                layers=(LayerPlan(),) * 3).to_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"][1].update(activations="disk"), r"layers\[1\]\.activations"),
    (lambda d: d["layers"][2].update(params="nvme"), r"layers\[2\]\.params"),
    (lambda d: d["layers"][0].update(grad_rank=-3), r"layers\[0\].*grad_rank"),
    (lambda d: d["layers"][0].update(grad_rank=8), "optimizer cpu or ssd"),
    (lambda d: d["train"].update(batch=0), r"train\.batch"),
    (lambda d: d["global"].update(prefetch_depth=-1), r"global\.prefetch_depth"),
    (lambda d: d.update(format="tiertune.plan/0"), "format"),
    (lambda d: d.pop("layers"), "missing 'layers'"),
    (lambda d: d["layers"][0].update(colour="red"), "unknown field"),
])
def test_validation_names_the_bad_field(edit, message):
    d = _plan_dict()
    edit(d)
    with pytest.raises(InputError, match=message):
        Plan.from_dict(d)


def test_fused_update_refuses_gradient_accumulation_with_the_reason():
    d = _plan_dict()
    d["train"]["grad_accum"] = 4
    d["layers"][1]["update"] = "fused"
    with pytest.raises(InputError, match="cannot accumulate"):
        Plan.from_dict(d)


def test_clipping_with_in_backward_updates_is_said_to_need_a_second_pass():
    d = _plan_dict()
    d["train"]["grad_clip"] = 1.0
    d["layers"][1]["update"] = "fused"
    plan = Plan.from_dict(d)
    assert plan.needs_second_backward and "backward twice" in plan.notes()[0]


def test_malformed_json_is_one_clear_error(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(_plan_dict())[:-20])
    with pytest.raises(InputError, match="malformed plan JSON"):
        Plan.load(p)


def test_plan_for_another_model_is_refused():
    plan = Plan.from_dict(_plan_dict())
    with pytest.raises(InputError, match="has 3 layers"):
        plan.check_model(6, "tiny-llama")
