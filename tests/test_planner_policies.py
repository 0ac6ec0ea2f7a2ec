"""Named policies: each makes the decisions that define the system it is named after
(Fuyou arXiv 2403.06504, LSP-Offload arXiv 2406.10181, LOMO arXiv 2306.09782, ZeRO-Offload arXiv 2101.06840,
ZeRO-Infinity arXiv 2104.07857)."""

import pytest

from tiertune.hardware import load_hardware
from tiertune.planner.policies import POLICIES, PolicyInfeasible, make_policy
from tiertune.errors import InputError
from tiertune.workload import MODEL_PRESETS, TrainSpec

MODEL = MODEL_PRESETS["gpt3-13b"]
HW = load_hardware("fuyou-4090-12ssd")
TRAIN = TrainSpec(seq_len=2048)


def decisions(name, model=MODEL, train=TRAIN, hw=HW):
    plan = make_policy(name, model, train, hw)
    assert plan.n_layers == model.n_layers + 2 and plan.provenance["policy"] == name
    return plan, {(lp.params, lp.optimizer, lp.update) for lp in plan.layers}, {lp.activations for lp in plan.layers}


def test_every_policy_the_design_names_is_registered():
    assert set(POLICIES) >= {"ideal", "gpu-only", "checkpoint", "lomo", "zero-offload", "zero-infinity", "fuyou",
                             "lsp-offload", "megatrain"}


def test_checkpoint_keeps_everything_on_gpu_and_recomputes():
    _, dec, acts = decisions("checkpoint")
    assert dec == {("gpu", "gpu", "after")} and acts == {"recompute"}


def test_lomo_fuses_the_update_and_swaps_adamw_for_adalomo_openly():
    plan, dec, acts = decisions("lomo")
    assert dec == {("gpu", "gpu", "fused")} and acts == {"recompute"}
    assert plan.train.optimizer == "adalomo" and plan.provenance["optimizer_from"] == "adamw"
    sgd_plan, _, _ = decisions("lomo", train=TRAIN.replace(optimizer="sgd"))
    assert sgd_plan.train.optimizer == "sgd" and "optimizer_from" not in sgd_plan.provenance


def test_zero_offload_keeps_weights_on_gpu_and_updates_on_cpu_after_backward():
    _, dec, _ = decisions("zero-offload")
    assert dec == {("gpu", "cpu", "after")}


def test_zero_infinity_uses_host_memory_then_nvme_when_host_memory_is_short():
    _, dec, acts = decisions("zero-infinity")
    assert dec == {("cpu", "cpu", "after")} and acts == {"recompute"}
    # 13B: 18 B/param of host state with weights there (234 GB x 1.5 > 128 GiB); on NVMe the host
    # keeps the fp32 gradient partitions, 52 GB x 1.5 < 128 GiB
    small_host = HW.replace(cpu_mem_bytes=128 << 30)
    _, dec, _ = decisions("zero-infinity", hw=small_host)
    assert {d[1] for d in dec} == {"ssd"}


def test_zero_infinity_reports_the_tier_when_nothing_holds_the_state():
    tiny = HW.replace(cpu_mem_bytes=8 << 30, ssd_count=1, ssd_capacity_bytes=10 << 30)
    with pytest.raises(PolicyInfeasible, match="host memory .* SSD"):
        make_policy("zero-infinity", MODEL, TRAIN, tiny)
    assert issubclass(PolicyInfeasible, InputError)


def test_fuyou_puts_state_on_ssd_overlaps_cpu_adam_and_swaps_cpu_first():
    plan, dec, acts = decisions("fuyou")
    assert dec == {("ssd", "ssd", "overlap")}
    assert "cpu" in acts and "ssd" not in acts          # 768 GB of host memory: no overflow
    small_host = HW.replace(cpu_mem_bytes=12 << 30)
    _, _, acts_small = decisions("fuyou", hw=small_host)
    assert "ssd" in acts_small                          # host memory full: swapped activations overflow to SSD


def test_lsp_offload_compresses_gradients_with_the_papers_ranks():
    plan, dec, _ = decisions("lsp-offload", model=MODEL_PRESETS["gpt3-6.7b"])
    assert dec == {("gpu", "cpu", "overlap")}
    assert {lp.grad_rank for lp in plan.layers} == {2048} and plan.globals.lsp_nnz_per_row == 8
    plan13, _, _ = decisions("lsp-offload", model=MODEL_PRESETS["gpt3-1.3b"])
    assert {lp.grad_rank for lp in plan13.layers} == {1280} and plan13.globals.lsp_nnz_per_row == 4


def test_megatrain_streams_every_layer_from_host_with_double_buffering():
    plan, dec, acts = decisions("megatrain")
    assert dec == {("cpu", "cpu", "overlap")} and acts == {"recompute"}
    assert plan.globals.prefetch_depth == 1


def test_unknown_policy_is_an_input_error():
    with pytest.raises(InputError, match="unknown policy"):
        make_policy("nope", MODEL, TRAIN, HW)
