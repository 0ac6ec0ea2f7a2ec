"""A block run in slices of the micro-batch (`PlanGlobals.activation_slices`) trains exactly as
one run whole, holds only a slice or two of its activations on the device, and shows each slice's
forward, backward and copies as tasks of their own in the trace.

Runs are tiny-llama / tiny-gpt2 in fp32 at batch 4 (so 2 and 4 slices divide it), compared with
the plain torch loop of test_executor_equivalence to rtol 1e-5: losses and weights under SGD,
losses under AdamW. (A sliced backward sums each parameter gradient over the slices, a rounding
apart from the whole batch's; AdamW's m / sqrt(v) turns that into weight differences up to ~1e-4
where a gradient is near zero, while SGD's weights stay within 1e-9.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_executor_equivalence import GPT2_MIX, LR, assert_same, data, make_train, plain_loop
from tiertune.errors import InputError
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.workload import MODEL_PRESETS, TrainSpec

BATCH = 4
N_LAYERS = MODEL_PRESETS["tiny-llama"].n_layers + 2


def train(accum=1, optimizer="adamw") -> TrainSpec:
    return make_train(optimizer, accum).replace(batch=BATCH)


def plan_of(layers, slices: int, model="tiny-llama", accum=1, optimizer="adamw", depth=1) -> Plan:
    return Plan(model=model, hardware="local-cpu", train=train(accum, optimizer), layers=tuple(layers),
                globals=PlanGlobals(prefetch_depth=depth, activation_slices=slices))


def executor(plan: Plan, tmp_path, budget: int | None = None) -> Executor:
    spec = MODEL_PRESETS[plan.model]
    return Executor(build_model(spec, 0), spec, plan, offload_dir=tmp_path / "ssd", gpu_mem_bytes=budget,
                    optim=OptimConfig(name=plan.train.optimizer, lr=LR))


STREAMED = dict(params="cpu", optimizer="cpu", update="after")


# --- the math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("slices", [2, 4])
@pytest.mark.parametrize("activations", ["cpu", "ssd", "recompute"])
def test_sliced_blocks_train_like_the_plain_loop(activations, slices, tmp_path):
    layers = [LayerPlan(**STREAMED, activations=activations)] * N_LAYERS
    assert_same("tiny-llama", plan_of(layers, slices, optimizer="sgd"), tmp_path)


@pytest.mark.parametrize("slices", [2, 4])
def test_mixed_plan_with_accumulation_sliced(slices, tmp_path):
    """GPT-2, two micro-batches, keep / cpu / ssd / recompute blocks with after and overlap updates
    on every tier: the sliced blocks accumulate their gradients over slices and micro-batches."""
    mix = list(GPT2_MIX)        # the equivalence test's plan, the last block swapping to the SSDs
    mix[4] = mix[4].replace(activations="ssd")
    mix[5] = mix[5].replace(activations="cpu")       # the head runs whole
    plan = plan_of(mix, slices, model="tiny-gpt2", accum=2, optimizer="sgd", depth=2)
    assert [plan.slices(i) for i in range(len(mix))] == [1, slices, slices, 1, slices, 1]
    assert_same("tiny-gpt2", plan, tmp_path)


def test_fused_blocks_run_whole_beside_sliced_ones(tmp_path):
    """LOMO layers update inside their backward hooks, so they never slice; their neighbours do."""
    layers = ([LayerPlan(activations="cpu")]
              + [LayerPlan(update="fused", activations="recompute"), LayerPlan(**STREAMED, activations="cpu")] * 2
              + [LayerPlan(activations="cpu")])
    plan = plan_of(layers, 2, optimizer="sgd")
    ex = assert_same("tiny-llama", plan, tmp_path)
    ev = ex.trace().events
    forwards = ev[ev.kind == "forward"].groupby(["iteration", "layer"]).size()
    assert forwards.groupby("layer").max().tolist() == [1, 1, 2, 1, 2, 1]


def test_recomputed_slices_replay_their_own_dropout_masks(tmp_path):
    """Dropout after every block: each recomputed slice restores the RNG state its first forward
    saw, so 2-slice recompute trains exactly as 2-slice offload (which never recomputes); a slice
    that drew another slice's masks, or fresh ones, would not."""
    spec = MODEL_PRESETS["tiny-llama"]

    def run(activations, p):
        layers = build_model(spec, 0)
        layers[1:-1] = [torch.nn.Sequential(b, torch.nn.Dropout(p)) for b in layers[1:-1]]
        plan = plan_of([LayerPlan(**STREAMED, activations=activations)] * N_LAYERS, 2)
        torch.manual_seed(0)
        with Executor(layers, spec, plan, optim=OptimConfig(lr=LR)) as ex:
            return [ex.step(tk, tg) for tk, tg in data(3, BATCH)]

    offloaded, recomputed = run("cpu", 0.3), run("recompute", 0.3)
    torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(offloaded), rtol=1e-6, atol=0)
    assert offloaded != run("cpu", 0.0)


lossless = st.builds(LayerPlan, params=st.sampled_from(("gpu", "cpu", "ssd")),
                     optimizer=st.sampled_from(("gpu", "cpu", "ssd")), update=st.sampled_from(("after", "overlap")),
                     activations=st.sampled_from(("keep", "cpu", "ssd", "recompute")))


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layers=st.lists(lossless, min_size=N_LAYERS, max_size=N_LAYERS), slices=st.sampled_from((2, 4)),
       depth=st.integers(0, 2))
def test_slicing_never_changes_the_losses(layers, slices, depth, tmp_path_factory):
    plan = plan_of(layers, slices, depth=depth)
    ref, _ = plain_loop("tiny-llama", plan.train, steps=2)
    with executor(plan, tmp_path_factory.mktemp("run")) as ex:
        losses = [ex.step(tk, tg) for tk, tg in data(2, BATCH)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=0)


# --- the device memory ---------------------------------------------------------------------------

def test_a_sliced_block_needs_a_fraction_of_its_activations_on_the_device(tmp_path):
    """Weights and optimizer resident (nothing else comes and goes), blocks offload to the host.

    Unsliced, a block's saved tensors A are all on the device when its forward ends (their copy
    starts only then): the device needs resident + A. In 4 slices each slice's A/4 leaves while the
    next slice computes, and backward holds the slice in use and the next one coming: resident +
    2 * A/4 = resident + A/2 is enough. A device budget of resident + A/2 (and 4 KiB for the token
    ids the embedding keeps) runs the 4-slice plan, to the same losses, and refuses the unsliced one."""
    ends, block = LayerPlan(activations="keep"), LayerPlan(activations="cpu")
    layers = [ends] + [block] * (N_LAYERS - 2) + [ends]
    whole, sliced = plan_of(layers, 1, depth=0), plan_of(layers, 4, depth=0)
    batches = data(2, BATCH)

    with executor(whole, tmp_path) as ex:                  # unbudgeted: what it holds
        whole_losses = [ex.step(tk, tg) for tk, tg in batches]
        need, whole_peak = sum(ex.resident_bytes().values()), ex.peak_bytes()["gpu"]
        ev = ex.trace().events
    acts = int(ev[(ev.kind == "offload") & (ev.layer == 1)]["bytes"].iloc[0])    # A
    assert whole_peak >= need + acts

    with executor(sliced, tmp_path) as ex:
        ex.step(*batches[0])
        ev = ex.trace().events
    slice_bytes = ev[(ev.kind == "offload") & (ev.layer == 1)]["bytes"]
    assert len(slice_bytes) == 4 and slice_bytes.max() < acts / 4 * 1.01    # A/4 each (1%: per-slice odds)

    budget = need + 2 * int(slice_bytes.max()) + 4096
    assert budget < need + acts                           # about A/2 less than the unsliced plan needs
    with executor(sliced, tmp_path, budget) as ex:
        losses = [ex.step(tk, tg) for tk, tg in batches]
        peak = ex.peak_bytes()["gpu"]
    assert peak <= budget < whole_peak
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(whole_losses), rtol=1e-5, atol=0)
    with executor(whole, tmp_path, budget) as ex:
        with pytest.raises(InputError, match="device budget .* exceeded by activations"):
            ex.step(*batches[0])


# --- the trace ------------------------------------------------------------------------------------

def test_each_slice_is_its_own_task_in_the_trace(tmp_path):
    """Per sliced block and micro-batch: S forwards and S backwards, and per slice its offload and
    fetch (cpu), its SSD write and read (ssd) or its recompute; unsliced layers keep one of each."""
    s = 2
    layers = ([LayerPlan(activations="cpu")]
              + [LayerPlan(**STREAMED, activations=a) for a in ("cpu", "ssd", "recompute", "keep")]
              + [LayerPlan(activations="cpu")])
    plan = plan_of(layers, s, accum=2)
    with executor(plan, tmp_path) as ex:
        for tk, tg in data(2, 2 * BATCH):
            ex.step(tk, tg)
        ev = ex.trace().events
    per_slice = ev[ev.kind.isin(["forward", "backward", "recompute", "offload", "fetch", "ssd_write", "ssd_read"])]
    assert per_slice["task"].is_unique
    ev = ev.assign(mb=ev.task.str.extract(r":mb(\d+)")[0].astype(int))
    count = ev.groupby(["kind", "layer", "iteration", "mb"]).size()
    for i, lp in enumerate(layers):
        per = plan.slices(i)
        assert per == (s if lp.activations != "keep" and 0 < i < N_LAYERS - 1 else 1)
        kinds = ["forward", "backward"] + {"cpu": ["offload", "fetch"], "ssd": ["offload", "ssd_write", "ssd_read",
                                                                              "fetch"],
                                           "recompute": ["recompute"], "keep": []}[lp.activations]
        for kind in kinds:
            got = count.loc[kind, i]
            assert len(got) == 4 and (got == per).all(), (kind, i, got.tolist())
    sliced = ev[(ev.layer == 1) & (ev.kind == "forward")]
    assert sliced.task.str.endswith((":s0", ":s1")).all()
    whole = ev[(ev.layer == 4) & (ev.kind == "forward")]
    assert not whole.task.str.contains(":s").any()
    # each slice's forward is its share of the layer's FLOPs (every block of tiny-llama is alike)
    assert sliced.flops.iloc[0] == pytest.approx(whole.flops.iloc[0] / s)
