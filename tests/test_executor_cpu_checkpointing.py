"""global.cpu_checkpointing in the executor (DeepSpeed's activation_checkpointing.cpu_checkpointing):
a recomputed layer's input checkpoint waits in host memory between its forward and its recompute.

It changes where a tensor waits, never the arithmetic: the losses and weights are the plain loop's.
It frees the checkpoints' device bytes: the device holds less than the same plan without it. And
each checkpoint's trip is the pair of tasks the simulator builds for it (`offload.ckpt` on d2h,
`fetch.ckpt` on h2d, per recomputed layer, micro-batch and slice), with the bytes it charges, so
replay and validate match them task by task.
"""

from __future__ import annotations

import pytest

from test_executor_equivalence import BASELINES, LR, assert_same, data, make_train
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.simulator import builder
from tiertune.hardware import load_hardware
from tiertune.workload import MODEL_PRESETS, TrainSpec, layer_costs

MODEL = "tiny-llama"
N_LAYERS = MODEL_PRESETS[MODEL].n_layers + 2


def plan_of(layers, train: TrainSpec, host_ckpt: bool, slices: int = 1, depth: int = 1) -> Plan:
    return Plan(model=MODEL, hardware="local-cpu", train=train, layers=tuple(layers),
                globals=PlanGlobals(prefetch_depth=depth, activation_slices=slices, cpu_checkpointing=host_ckpt))


@pytest.mark.parametrize("name", ["zero-infinity", "zero-infinity-nvme", "megatrain"])
def test_host_checkpoints_train_like_the_plain_loop(name, tmp_path):
    assert_same(MODEL, plan_of([BASELINES[name]] * N_LAYERS, make_train(), True), tmp_path)


def test_sliced_host_checkpoints_with_accumulation_train_like_the_plain_loop(tmp_path):
    """Two micro-batches, blocks in 2 slices each with its own checkpoint, beside kept and swapped
    layers (SGD: AdamW's normalisation magnifies float rounding in rarely seen embedding rows past
    the tolerance, with or without host checkpoints)."""
    layers = ([LayerPlan(activations="keep")] + [BASELINES["zero-infinity"]] * (N_LAYERS - 3)
              + [LayerPlan(activations="cpu")] + [BASELINES["zero-infinity"]])
    assert_same(MODEL, plan_of(layers, make_train("sgd", accum=2), True, slices=2), tmp_path)


def _run(plan: Plan, tmp_path, steps: int = 2, budget: int | None = None):
    spec = MODEL_PRESETS[MODEL]
    with Executor(build_model(spec, 0), spec, plan, offload_dir=tmp_path / "ssd", gpu_mem_bytes=budget,
                  optim=OptimConfig(name="adamw", lr=LR)) as ex:
        losses = [ex.step(tk, tg) for tk, tg in data(steps, plan.train.batch * plan.train.grad_accum)]
        return losses, ex.peak_bytes()["gpu"], ex.trace().events


def test_the_device_holds_less_with_checkpoints_in_host_memory(tmp_path):
    """Weights and optimizer streamed, every layer recomputed: on the device only one layer's work
    is in use at a time, so the checkpoints of the other layers are most of what it holds at the
    end of the forward. In host memory they leave the device: the peak drops by at least the
    checkpoints of all but the few layers in flight (a layer's, the next one's fetch, the one
    whose copy is under way). The host run gets that as its device budget: a copy running late
    behind a busy host then holds the next allocation back (the meter waits for the bytes it will
    free) instead of raising the peak, so the check does not depend on the machine's load."""
    train = TrainSpec(batch=4, seq_len=32, dtype="fp32", optimizer="adamw")
    layers = [BASELINES["zero-infinity"]] * N_LAYERS
    losses_dev, peak_dev, _ = _run(plan_of(layers, train, False), tmp_path)
    _, _, ev = _run(plan_of(layers, train, True), tmp_path, steps=1)
    ckpt = int(ev[(ev.kind == "offload") & (ev.layer == 1)]["bytes"].iloc[0])     # one block's input
    n_blocks = N_LAYERS - 2
    budget = peak_dev - (n_blocks - 3) * ckpt
    losses_host, peak_host, _ = _run(plan_of(layers, train, True), tmp_path, budget=budget)
    assert losses_host == losses_dev
    assert peak_host <= budget


@pytest.mark.parametrize("slices,accum", [(1, 1), (2, 2)])
def test_each_checkpoint_trip_is_the_simulators_pair_of_tasks(slices, accum, tmp_path):
    train = TrainSpec(batch=4, seq_len=16, dtype="fp32", optimizer="adamw", grad_accum=accum)
    layers = [LayerPlan(activations="keep")] + [BASELINES["megatrain"]] * (N_LAYERS - 1)
    plan = plan_of(layers, train, True, slices=slices)
    _, _, ev = _run(plan, tmp_path)
    measured = ev[ev.kind.isin(["offload", "fetch"])]
    hw = load_hardware("lsp-4090")       # any profile: names and bytes do not depend on it
    graph = builder.build(MODEL_PRESETS[MODEL], train, hw, plan, 2)
    simulated = [graph.name(t) for t in range(len(graph)) if graph.kind[t] in ("offload", "fetch")]
    # the graph's names carry no slice (replay matches a slice's tasks in order)
    assert sorted(measured.task.str.replace(r":s\d+$", "", regex=True)) == sorted(simulated)
    assert all(graph.tag[t] == "ckpt" for t in range(len(graph)) if graph.kind[t] in ("offload", "fetch"))
    assert set(measured.resource[measured.kind == "offload"]) == {"d2h"}
    assert set(measured.resource[measured.kind == "fetch"]) == {"h2d"}
    # the bytes the simulator charges a checkpoint: the layer's input (token ids at the embedding),
    # of one slice where the layer runs in slices (train.batch is the micro-batch)
    for _, row in measured.iterrows():
        per = plan.slices(row.layer)
        want = layer_costs(MODEL_PRESETS[MODEL], train.replace(batch=train.batch // per))[row.layer]
        assert row["bytes"] == want.act_checkpoint_bytes > 0, row.task
