"""Memory accounting of the simulator against numbers computed by hand from the layer costs."""

import pytest

from tiertune.hardware import load_hardware
from tiertune.planner.policies import make_policy
from tiertune.schedule import LayerPlan, PlanGlobals, uniform_plan
from tiertune.simulator import engine, simulate
from tiertune.simulator.builder import MANY_TIERS, TaskGraph
from tiertune.vocab import CPU, GPU
from tiertune.hardware import CUDA_CONTEXT_BYTES
from tiertune.workload import TrainSpec, layer_costs, load_model

HW = load_hardware("a100-80g")
TRAIN = TrainSpec(batch=1, seq_len=2048)


def plan_for(model, layer, train=TRAIN, **globals_):
    return uniform_plan(model.name, HW.name, train, model.n_layers + 2, layer, PlanGlobals(**globals_))


def backward_workspace(model, train):
    return 2 * train.elem_bytes * train.seq_len * train.batch * model.hidden


def test_gpu_only_peak_is_16_bytes_per_param_plus_every_activation():
    # Mixed-precision AdamW (ZeRO paper): bf16 weights + bf16 grads + fp32 master, m, v = 16 B/param;
    # all activations are alive when the head's backward starts.
    m = load_model("gpt3-1.3b")
    r = simulate(m, TRAIN, HW, make_policy("gpu-only", m, TRAIN, HW))
    costs = layer_costs(m, TRAIN)
    params = m.total_params()
    acts = sum(c.act_bytes for c in costs)
    assert r.fits
    assert r.peak_bytes["gpu"] >= 16 * params + acts
    assert r.peak_bytes["gpu"] == 16 * params + acts + CUDA_CONTEXT_BYTES + backward_workspace(m, TRAIN)
    assert r.peak_bytes["cpu"] == 0 and r.peak_bytes["ssd"] == 0


def test_recompute_keeps_only_layer_inputs_and_rebuilds_one_layer_at_a_time():
    m = load_model("gpt3-1.3b")
    costs = layer_costs(m, TRAIN)
    r = simulate(m, TRAIN, HW, plan_for(m, LayerPlan(activations="recompute")))
    # During layer i's forward (or its rebuild before backward) the inputs of layers < i are kept
    # and layer i's full activation set is alive.
    transient = max(sum(c.act_checkpoint_bytes for c in costs[:i]) + costs[i].act_bytes for i in range(len(costs)))
    expected = 16 * m.total_params() + CUDA_CONTEXT_BYTES + backward_workspace(m, TRAIN) + transient
    assert r.peak_bytes["gpu"] == expected


def test_cpu_offload_homes_weights_and_optimizer_state_in_host_memory():
    m = load_model("gpt3-1.3b")
    costs = layer_costs(m, TRAIN)
    r = simulate(m, TRAIN, HW, plan_for(m, LayerPlan(params="cpu", optimizer="cpu", activations="cpu")))
    p = m.total_params()
    assert r.fits
    assert r.peak_bytes["cpu"] >= 14 * p + sum(c.act_bytes for c in costs[:-1])   # weights + Adam; offloaded acts
    # The GPU holds at most a few streamed layers, never the model.
    biggest = max(c.weight_bytes + c.act_bytes + c.grad_bytes for c in costs)
    assert r.peak_bytes["gpu"] < CUDA_CONTEXT_BYTES + 4 * biggest
    assert r.peak_bytes["gpu"] < 2 * p


def test_ssd_homed_state_is_counted_on_the_ssd_tier():
    m = load_model("gpt3-1.3b")
    r = simulate(m, TRAIN, HW, plan_for(m, LayerPlan(params="ssd", optimizer="ssd", activations="ssd",
                                                     update="overlap")))
    costs = layer_costs(m, TRAIN)
    assert r.fits
    assert r.peak_bytes["ssd"] >= sum(c.weight_bytes + c.optim_bytes for c in costs)
    assert r.busy_s["ssd_read"] > 0 and r.busy_s["ssd_write"] > 0


def test_fused_updates_keep_at_most_one_layer_gradient_alive():
    m = load_model("gpt3-1.3b")
    train = TRAIN.replace(optimizer="sgd")
    costs = layer_costs(m, train)
    after = simulate(m, train, HW, plan_for(m, LayerPlan(update="after"), train))
    fused = simulate(m, train, HW, plan_for(m, LayerPlan(update="fused"), train))
    all_grads = sum(c.grad_bytes for c in costs)
    assert fused.peak_bytes["gpu"] <= after.peak_bytes["gpu"] - all_grads + max(c.grad_bytes for c in costs)


def test_a_plan_whose_resident_state_exceeds_the_gpu_does_not_fit_and_says_by_how_much():
    m = load_model("gpt3-175b")
    hw = load_hardware("fuyou-4090-12ssd")
    r = simulate(m, TRAIN, hw, make_policy("gpu-only", m, TRAIN, hw))
    assert not r.fits and r.error_tier == "gpu"
    assert "gpu" in r.error and "24.00 GiB" in r.error and r.events > 0
    assert r.to_dict()["iteration_s"] is None and "error" in r.to_dict()


def test_a_layer_too_big_for_the_free_memory_stalls_with_the_task_and_the_bytes():
    m = load_model("gpt3-1.3b")
    costs = layer_costs(m, TRAIN)
    # Resident state fits, but the head's activations (logits) cannot be allocated.
    budget = CUDA_CONTEXT_BYTES + 16 * m.total_params() + costs[-1].act_bytes // 2
    r = simulate(m, TRAIN, HW, plan_for(m, LayerPlan(activations="cpu"), gpu_mem_bytes=budget))
    assert not r.fits and r.error_tier == "gpu"
    assert "forward:L25" in r.error and "needs" in r.error and "free" in r.error


def test_ideal_policy_lifts_the_gpu_limit():
    m = load_model("gpt3-175b")
    hw = load_hardware("fuyou-4090-12ssd")
    r = simulate(m, TRAIN, hw, make_policy("ideal", m, TRAIN, hw))
    assert r.fits and r.peak_bytes["gpu"] > 16 * m.total_params()
    assert r.bottleneck == "gpu"
    assert r.iteration_s == pytest.approx(r.busy_s["gpu"], rel=0.01)    # nothing but compute


def test_a_task_allocating_on_two_tiers_starts_only_when_both_fit_and_blocks_only_the_tier_it_waits_on():
    # Builder tasks touch one tier; a hand-made graph may touch several (the engine's other path).
    # GPU capacity 10: task 0 holds 6 until t=1; task 1 wants 6 GPU + 3 CPU and waits for it;
    # task 2 (CPU only, a later id on another resource) is not held back by task 1's wait.
    g = TaskGraph()
    g.add("forward", "", 0, 0, GPU, 1.0, gpu=6)
    g.add("forward", "", 1, 0, GPU, 1.0, gpu=6, cpu=3)
    g.add("update", "", 2, 0, CPU, 1.0, cpu=3)
    g.release(0, 0, 6)
    g.release(1, 0, 6)
    g.release(1, 1, 3)
    g.release(2, 1, 3)
    g.finish()
    g.capacity = [10, 10, 10]
    assert g.alloc_tier == [0, MANY_TIERS, 1] and g.free_tier == [0, MANY_TIERS, 1]
    run = engine.run(g)
    assert run.start == [0.0, 1.0, 0.0]
    assert run.peak == [6, 3, 0]
    assert list(zip(run.mem_time, run.mem_tier, run.mem_bytes))[3:] == [
        (0.0, 0, 6), (0.0, 1, 3), (1.0, 0, 0), (1.0, 1, 0), (1.0, 0, 6), (1.0, 1, 3), (2.0, 0, 0), (2.0, 1, 0)]
