"""The executor does not change the math: lossless plans train like a plain torch loop (rtol 1e-5).

Each plan runs N steps of tiny-llama (or tiny-gpt2) in fp32 and is compared, loss by loss and
weight by weight, with a plain loop over the same layers: one autograd graph, torch.optim.AdamW
(or SGD), nothing offloaded.
"""

from __future__ import annotations

import pytest
import torch

from tiertune.executor.data import batches, load_text
from tiertune.executor.models import build_model
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.executor.updates import step as optim_step
from tiertune.schedule import LayerPlan, Plan, PlanGlobals
from tiertune.workload import MODEL_PRESETS, TrainSpec

STEPS = 5
LR = 1e-2          # large enough that every step visibly moves the weights


def make_train(optimizer="adamw", accum=1, clip=None) -> TrainSpec:
    return TrainSpec(batch=2, seq_len=16, dtype="fp32", optimizer=optimizer, grad_accum=accum, grad_clip=clip)


def data(steps=STEPS, rows=2, seed=0):
    """Batches of the shipped demo text (real text: the loss falls within a few steps)."""
    it = batches(load_text(None), rows, 16, seed)
    return [next(it) for _ in range(steps)]


def plain_loop(model: str, train: TrainSpec, steps=STEPS, seed=0):
    """The reference: the same layers as one graph, torch.optim, no offloading."""
    spec = MODEL_PRESETS[model]
    layers = build_model(spec, seed)
    params = [p for m in layers for p in m.parameters()]
    if train.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=LR)
    elif train.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=LR)
    else:
        opt = None
        states = {}
    losses = []
    for n, (tk, tg) in enumerate(data(steps, train.batch * train.grad_accum)):
        total = 0.0
        for mtk, mtg in zip(tk.chunk(train.grad_accum), tg.chunk(train.grad_accum)):
            x = mtk
            for m in layers[:-1]:
                x = m(x)
            loss = layers[-1](x, mtg)
            (loss / train.grad_accum).backward()
            total += loss.item()
        losses.append(total / train.grad_accum)
        if train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:                                      # AdaLomo has no torch.optim form: our step, plainly
            from tiertune.executor.updates import state_shapes
            cfg = OptimConfig(name=train.optimizer, lr=LR)
            with torch.no_grad():
                for p in params:
                    st = states.setdefault(p, {k: torch.zeros(s) for k, s in state_shapes(cfg, p.shape).items()})
                    optim_step(cfg, n + 1, p, p.grad, st)
                    p.grad = None
    return losses, [{n: p.detach().clone() for n, p in m.named_parameters()} for m in layers]


_REF: dict = {}


def reference(model, train):
    key = (model, train)
    if key not in _REF:
        _REF[key] = plain_loop(model, train)
    return _REF[key]


def run_plan(model: str, plan: Plan, tmp_path, seed=0, **kw):
    spec = MODEL_PRESETS[model]
    ex = Executor(build_model(spec, seed), spec, plan, offload_dir=tmp_path / "ssd",
                  optim=OptimConfig(name=plan.train.optimizer, lr=LR), **kw)
    try:
        losses = [ex.step(tk, tg) for tk, tg in data(STEPS, plan.train.batch * plan.train.grad_accum)]
        return losses, ex.master_weights(), ex
    finally:
        ex.close()


def assert_same(model, plan, tmp_path, **kw):
    ref_losses, ref_w = reference(model, plan.train)
    losses, w, ex = run_plan(model, plan, tmp_path, **kw)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for layer, (a, b) in enumerate(zip(w, ref_w)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=f"layer {layer} {name}")
    assert losses[-1] < losses[0]
    return ex


def uniform(model, train, layer: LayerPlan, depth=1) -> Plan:
    n = MODEL_PRESETS[model].n_layers + 2
    return Plan(model=model, hardware="local-cpu", train=train, layers=(layer,) * n,
                globals=PlanGlobals(prefetch_depth=depth))


# The lossless baselines, as their policies build them (planner/policies.py), written out by hand
# so the test does not depend on a hardware preset's memory deciding keep-vs-recompute.
BASELINES = {
    "gpu-only": LayerPlan(),
    "checkpoint": LayerPlan(activations="recompute"),
    "zero-offload": LayerPlan(params="gpu", optimizer="cpu", update="after"),
    "zero-infinity": LayerPlan(params="cpu", optimizer="cpu", update="after", activations="recompute"),
    "zero-infinity-nvme": LayerPlan(params="ssd", optimizer="ssd", update="after", activations="recompute"),
    "fuyou-cpu-acts": LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="cpu"),
    "fuyou-ssd-acts": LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="ssd"),
    "megatrain": LayerPlan(params="cpu", optimizer="cpu", update="overlap", activations="recompute"),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_matches_plain_adamw(name, tmp_path):
    assert_same("tiny-llama", uniform("tiny-llama", make_train(), BASELINES[name]), tmp_path)


def test_lomo_matches_plain_sgd(tmp_path):
    plan = uniform("tiny-llama", make_train("sgd"), LayerPlan(update="fused", activations="recompute"))
    assert_same("tiny-llama", plan, tmp_path)


# tiny-gpt2 (4 blocks + embedding + head), a different decision on every layer
GPT2_MIX = (LayerPlan(params="cpu", optimizer="gpu", activations="ssd"),
            LayerPlan(params="ssd", optimizer="cpu", update="overlap", activations="cpu"),
            LayerPlan(params="gpu", optimizer="ssd", update="after", activations="recompute"),
            LayerPlan(params="cpu", optimizer="cpu", update="after", activations="keep"),
            LayerPlan(params="ssd", optimizer="gpu", update="overlap", activations="keep"),
            LayerPlan(params="gpu", optimizer="cpu", update="overlap", activations="ssd"))


def test_gpt2_mixed_plan_with_accumulation(tmp_path):
    """GPT-2 family, two micro-batches accumulated, a different decision on every layer."""
    spec = MODEL_PRESETS["tiny-gpt2"]
    mix = GPT2_MIX
    assert len(mix) == spec.n_layers + 2
    plan = Plan(model="tiny-gpt2", hardware="local-cpu", train=make_train(accum=2), layers=tuple(mix),
                globals=PlanGlobals(prefetch_depth=2))
    assert_same("tiny-gpt2", plan, tmp_path)


def test_clipping_after_backward(tmp_path):
    plan = uniform("tiny-llama", make_train(clip=0.5), LayerPlan(params="cpu", optimizer="cpu"))
    assert_same("tiny-llama", plan, tmp_path)


def test_adalomo_fused_on_every_tier(tmp_path):
    """AdaLomo (factored second moment) fused in backward, optimizer on the device, host and SSD,
    against the same AdaLomo step applied in a plain loop."""
    layers = [LayerPlan(update="fused", optimizer=o, params=p, activations=a)
              for o, p, a in (("gpu", "gpu", "recompute"), ("cpu", "gpu", "keep"), ("ssd", "ssd", "cpu"),
                              ("gpu", "cpu", "ssd"), ("cpu", "cpu", "recompute"), ("ssd", "gpu", "keep"))]
    plan = Plan(model="tiny-llama", hardware="local-cpu", train=make_train("adalomo"), layers=tuple(layers))
    assert_same("tiny-llama", plan, tmp_path)


def test_bf16_compute_with_fp32_master_tracks_fp32(tmp_path):
    """bf16 weights and activations, fp32 master weights: close to the fp32 run, not equal."""
    train = TrainSpec(batch=2, seq_len=16, dtype="bf16", optimizer="adamw")
    plan = uniform("tiny-llama", train, LayerPlan(params="cpu", optimizer="cpu", update="overlap"))
    losses, w, _ = run_plan("tiny-llama", plan, tmp_path)
    ref_losses, ref_w = reference("tiny-llama", make_train())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    assert w[1]["attn.q.weight"].dtype == torch.float32
    assert not torch.equal(w[1]["attn.q.weight"], ref_w[1]["attn.q.weight"])
