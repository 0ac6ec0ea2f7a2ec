"""Executor behaviour beyond the math: any valid plan runs, the device budget holds, the trace
shows the tasks the plan implies, the CLI (budget errors, resume) works."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_executor_equivalence import LR, data, make_train, plain_loop, uniform
from tiertune.cli import main
from tiertune.errors import InputError
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.traces.trace import Trace
from tiertune.vocab import TIERS
from tiertune.workload import MODEL_PRESETS

N_LAYERS = MODEL_PRESETS["tiny-llama"].n_layers + 2

layer_plans = st.builds(LayerPlan, params=st.sampled_from(TIERS), optimizer=st.sampled_from(TIERS),
                        update=st.sampled_from(("after", "overlap", "fused")),
                        activations=st.sampled_from(("keep", "cpu", "ssd", "recompute")))


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layers=st.lists(layer_plans, min_size=N_LAYERS, max_size=N_LAYERS), depth=st.integers(0, 2),
       optimizer=st.sampled_from(("adamw", "sgd")))
def test_any_lossless_plan_trains_like_the_plain_loop(layers, depth, optimizer, tmp_path_factory):
    """Random per-layer mixes; fused works with AdamW too (each update needs only its own gradient)."""
    train = make_train(optimizer)
    plan = Plan(model="tiny-llama", hardware="local-cpu", train=train, layers=tuple(layers),
                globals=PlanGlobals(prefetch_depth=depth))
    ref_losses, ref_w = plain_loop("tiny-llama", train, steps=3)
    spec = MODEL_PRESETS["tiny-llama"]
    with Executor(build_model(spec, 0), spec, plan, offload_dir=tmp_path_factory.mktemp("ssd"),
                  optim=OptimConfig(name=optimizer, lr=LR)) as ex:
        losses = [ex.step(tk, tg) for tk, tg in data(3)]
        w = ex.master_weights()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for a, b in zip(w, ref_w):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


# --- budget ------------------------------------------------------------------------------------

def executor(plan, tmp_path, budget=None):
    spec = MODEL_PRESETS[plan.model]
    return Executor(build_model(spec, 0), spec, plan, offload_dir=tmp_path / "ssd", gpu_mem_bytes=budget,
                    optim=OptimConfig(lr=LR))


def test_resident_needs_over_budget_fail_before_training(tmp_path):
    plan = uniform("tiny-llama", make_train(), LayerPlan())
    spec = MODEL_PRESETS["tiny-llama"]
    weights = 4 * spec.total_params()
    with pytest.raises(InputError, match=r"plan needs .* GiB on the device .* budget is"):
        executor(plan, tmp_path, budget=weights)          # weights fit, AdamW state and grads do not


def test_streaming_plan_fits_where_resident_does_not_and_stays_under_budget(tmp_path):
    spec = MODEL_PRESETS["tiny-llama"]
    budget = 4 * spec.total_params()                     # less than gpu-only's resident needs
    plan = uniform("tiny-llama", make_train(), LayerPlan(params="cpu", optimizer="cpu", update="overlap",
                                                         activations="cpu"))
    with executor(plan, tmp_path, budget) as ex:
        for tk, tg in data(3):
            ex.step(tk, tg)
        ex.synchronize()
        peak = ex.peak_bytes()
        samples = ex.trace().memory
    assert 0 < peak["gpu"] <= budget
    assert peak["cpu"] > 0
    gpu = samples[samples.tier == "gpu"]["bytes"]
    assert gpu.max() == peak["gpu"] and gpu.min() >= 0
    # every allocation was given back: the device tier ends at 0 (nothing resident in this plan)
    assert int(gpu.iloc[-1]) == 0


def test_budget_between_resident_and_peak_fails_with_one_clear_error(tmp_path):
    plan = uniform("tiny-llama", make_train(), LayerPlan())
    with executor(plan, tmp_path) as ex:                   # unbudgeted: measure the peak
        ex.step(*data(1)[0])
        peak, resident = ex.peak_bytes()["gpu"], sum(ex.resident_bytes().values())
    assert resident < peak
    with executor(plan, tmp_path, budget=(resident + peak) // 2) as ex:
        with pytest.raises(InputError, match="device budget .* exceeded by activations"):
            ex.step(*data(1)[0])


# --- trace -------------------------------------------------------------------------------------

def kinds(trace: Trace) -> set[tuple[str, str]]:
    return set(zip(trace.events["kind"], trace.events["resource"]))


@pytest.mark.parametrize("layer, expect, absent", [
    (LayerPlan(), {("forward", "gpu"), ("backward", "gpu"), ("update", "gpu")},
     {("load", "h2d"), ("offload", "d2h"), ("recompute", "gpu"), ("grad", "d2h")}),
    (LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="ssd"),
     {("ssd_read", "ssd_read"), ("load", "h2d"), ("offload", "d2h"), ("ssd_write", "ssd_write"),
      ("fetch", "h2d"), ("grad", "d2h"), ("update", "cpu")}, {("update", "gpu"), ("recompute", "gpu")}),
    (LayerPlan(params="cpu", optimizer="gpu", activations="cpu"),
     {("load", "h2d"), ("offload", "d2h"), ("fetch", "h2d"), ("update", "gpu"), ("writeback", "d2h")},
     {("ssd_read", "ssd_read"), ("grad", "d2h")}),
    (LayerPlan(params="gpu", optimizer="cpu", activations="recompute"),
     {("recompute", "gpu"), ("grad", "d2h"), ("update", "cpu"), ("writeback", "h2d")},
     {("load", "h2d"), ("offload", "d2h")}),
])
def test_trace_has_the_tasks_the_plan_implies(layer, expect, absent, tmp_path):
    plan = uniform("tiny-llama", make_train(), layer)
    with executor(plan, tmp_path) as ex:
        for tk, tg in data(2):
            ex.step(tk, tg)
        trace = ex.trace()
    got = kinds(trace)
    assert expect <= got, expect - got
    assert not (absent & got), absent & got
    ev = trace.events
    assert (ev["end_s"] > ev["start_s"]).all() and (ev["source"] == "measured").all()
    assert set(ev["iteration"]) == {0, 1}
    assert ev[ev.kind == "forward"].groupby("iteration").size().eq(N_LAYERS).all()
    copies = ev[ev.kind.isin(["load", "offload", "fetch", "grad", "ssd_read", "ssd_write"])]
    assert (copies["bytes"] > 0).all()
    assert trace.meta["hardware"] == "local-cpu" and trace.meta["plan"] == plan.to_dict()
    path = tmp_path / "t.json"
    trace.save(path)
    assert Trace.load(path).equals(trace)


# --- CLI ---------------------------------------------------------------------------------------

def cli_json(capsys, *argv) -> dict:
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_budget_error_is_one_line_exit_2(capsys, tmp_path):
    rc = main(["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--gpu-mem", "0.001",
               "--trace", str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "device budget" in err
    assert not (tmp_path / "t.json").exists()


def test_cli_lossy_plan_on_streamed_weights_is_refused(capsys, tmp_path):
    """LSP compression runs with resident weights only (the device applies P U Q^T to them)."""
    plan = uniform("tiny-llama", make_train(), LayerPlan(params="cpu", optimizer="cpu", grad_rank=8))
    plan.save(tmp_path / "p.json")
    assert main(["execute", "--model", "tiny-llama", "--plan", str(tmp_path / "p.json"), "--steps", "1"]) == 2
    assert "grad_rank" in capsys.readouterr().err


def test_cli_resume_continues_the_same_loss_sequence(capsys, tmp_path):
    common = ["execute", "--model", "tiny-llama", "--batch", "2", "--seq", "16", "--lr", "0.01"]
    whole = cli_json(capsys, *common, "--policy", "gpu-only", "--steps", "4")
    first = cli_json(capsys, *common, "--policy", "fuyou", "--steps", "2", "--save-dir", str(tmp_path / "ck"),
                     "--offload-dir", str(tmp_path / "ssd"), "--trace", str(tmp_path / "t.json"))
    rest = cli_json(capsys, *common, "--policy", "megatrain", "--steps", "2", "--resume", str(tmp_path / "ck"))
    assert rest["steps"] == 4
    torch.testing.assert_close(torch.tensor(first["losses"] + rest["losses"]), torch.tensor(whole["losses"]),
                               rtol=1e-5, atol=0)
    assert first["trace"] == str(tmp_path / "t.json") and Trace.load(tmp_path / "t.json").source == "measured"
    assert first["peak_bytes"]["ssd"] > 0 and whole["peak_bytes"]["ssd"] == 0
    assert whole["iteration_s"] > 0 and whole["tokens_per_s"] > 0


def test_hf_model_dir_trains_like_the_plain_loop(tmp_path):
    """A local HF Llama through executor/hf.py's layers, SSD-homed state and offloaded activations."""
    import transformers  # the test extra installs it

    from tiertune.executor.hf import HFSource

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    src = HFSource(tmp_path / "hf")
    ref = src.build_all()
    params = [p for m in ref for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR)
    ref_losses = []
    for tk, tg in data(3):
        x = tk
        for m in ref[:-1]:
            x = m(x)
        loss = ref[-1](x, tg)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    layers = [LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="cpu"),
              LayerPlan(params="cpu", optimizer="cpu", update="after", activations="ssd"),
              LayerPlan(params="gpu", optimizer="gpu", update="fused", activations="recompute"),
              LayerPlan(params="cpu", optimizer="gpu", update="overlap", activations="keep")]
    plan = Plan(model=src.spec.name, hardware="local-cpu", train=make_train(), layers=tuple(layers))
    with Executor(src.build_all(), src.spec, plan, offload_dir=tmp_path / "ssd", optim=OptimConfig(lr=LR)) as ex:
        losses = [ex.step(tk, tg) for tk, tg in data(3)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)


def test_an_allocation_over_budget_waits_for_copies_that_will_free_memory():
    """A mandatory allocation that only fits once an offload under way has freed its bytes waits
    for it (a late copy thread on a busy host is not an out-of-memory); with nothing promised it
    fails at once."""
    import threading
    import time

    from tiertune.executor.device import BudgetExceeded, Meter

    meter = Meter(budget=100, clock=time.perf_counter)
    meter.alloc("gpu", 80)
    with pytest.raises(BudgetExceeded):
        meter.alloc("gpu", 60, "activations")
    meter.promise("gpu", 50)
    threading.Timer(0.05, lambda: meter.free("gpu", 50, promised=True)).start()
    meter.alloc("gpu", 60, "activations")
    assert meter.now["gpu"] == 90 and meter.peak["gpu"] == 90
