"""Every architecture `simulate` accepts trains through the executor like a plain Hugging Face loop.

Tiny random models made with transformers and save_pretrained, each with a word-level tokenizer
trained offline (tests/hf_reference.py), trained on a prompt/response .jsonl tokenized with it
(the loss on the responses only, rows right-padded); the reference is the plain transformers loop
of hf_reference.py (`from_pretrained`, torch.optim.AdamW with the no-decay group of norms and
biases, transformers' warm-up + cosine schedule, the same batches); losses match to rtol 1e-5
over 10 steps for the gpu-only, ZeRO-Offload and Fuyou plans, a tied Llama among them.
"""

from __future__ import annotations

import pytest
import torch
import transformers  # the test extra installs it
from hypothesis import given, settings
from hypothesis import strategies as st
from hf_reference import ARCHS, VOCAB, plain_hf_loop, save_model, write_chat

from tiertune.executor.data import IGNORE, open_data
from tiertune.executor.hf import HFSource
from tiertune.executor.runtime import Executor
from tiertune.executor.updates import OptimConfig
from tiertune.hardware import load_hardware
from tiertune.planner.policies import make_policy
from tiertune.workload import TrainSpec

SEQ, BATCH, STEPS = 12, 4, 10
OPTIM = OptimConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1, schedule="cosine", warmup_steps=3,
                    total_steps=STEPS, decay_vectors=False)
def batches(model_dir: str, chat) -> list:
    """STEPS padded batches of the prompt/response file, as `execute --data` makes them."""
    data = open_data(str(chat), VOCAB, model_dir=model_dir, progress=False)
    stream = data.batches(BATCH, SEQ, seed=0, layout="padded")
    steps = [next(stream) for _ in range(STEPS)]
    assert all((b.targets == IGNORE).any() and (b.targets != IGNORE).any() for b in steps)   # prompts masked
    return steps


def executor_losses(path: str, policy: str, steps, tmp_path) -> list[float]:
    src = HFSource(path)
    train = TrainSpec(batch=BATCH // 2, seq_len=SEQ, dtype="fp32", optimizer="adamw", grad_accum=2)
    plan = make_policy(policy, src.spec, train, load_hardware("lsp-4090"))
    with Executor(src.build_all(), src.spec, plan, offload_dir=tmp_path / "ssd", optim=OPTIM) as ex:
        return [ex.step(b.tokens, b.targets) for b in steps]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_model(name, root / name) for name in ARCHS}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_trains_like_the_hf_loop(arch, model_dirs, chat, tmp_path):
    path = model_dirs[arch]
    steps = batches(path, chat)
    want = plain_hf_loop(path, steps, OPTIM, accum=2)
    assert want[-1] < want[0]
    for policy in ("gpu-only", "zero-offload", "fuyou"):
        got = executor_losses(path, policy, steps, tmp_path / policy)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0,
                                   msg=lambda m: f"{arch} under {policy}: {m}")


def test_a_tied_matrix_is_one_parameter_trained_once(model_dirs):
    src = HFSource(model_dirs["llama-tied"])
    layers = src.build_all()
    assert layers[0].parts["embed"].weight is layers[-1].lm
    assert not list(layers[0].parameters(recurse=False))
    owned = {id(p): p for layer in layers for p in layer.parameters()}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama-tied"])
    assert sum(p.numel() for p in owned.values()) == sum(p.numel() for p in model.parameters())


def test_dropout_from_the_config_and_recompute_replays_its_masks(model_dirs, chat):
    """Dropout on (as the config or --dropout says): a recomputed layer draws the masks of its first
    forward, so recompute and keep train alike; with dropout off the losses differ."""
    from tiertune.schedule import LayerPlan, uniform_plan

    train = TrainSpec(batch=BATCH, seq_len=SEQ, dtype="fp32", optimizer="adamw")
    data = batches(model_dirs["gpt2"], chat)[:3]

    def run(dropout, activations):
        src = HFSource(model_dirs["gpt2"], dropout=dropout)
        plan = uniform_plan(src.spec.name, "local-cpu", train, src.num_layers, LayerPlan(activations=activations))
        torch.manual_seed(0)
        with Executor(src.build_all(), src.spec, plan, optim=OPTIM) as ex:
            return [ex.step(b.tokens, b.targets) for b in data]

    kept, recomputed, off = run(0.3, "keep"), run(0.3, "recompute"), run(0.0, "keep")
    torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(kept), rtol=1e-6, atol=0)
    assert kept != off


def test_cli_training_controls_and_what_json_reports(model_dirs, chat, capsys):
    import json

    from tiertune.cli import main

    base = ["execute", "--model", "tiny-llama", "--steps", "2", "--batch", "1", "--seq", "16", "--json"]
    assert main(base + ["--policy", "gpu-only", "--lr-schedule", "cosine", "--warmup", "1", "--weight-decay",
                        "0.05", "--betas", "0.8", "0.9", "--eps", "1e-6", "--grad-accum", "2", "--clip", "1.0"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["optimizer"], s["schedule"], s["warmup_steps"], s["total_steps"]) == ("adamw", "cosine", 1, 2)
    assert (s["weight_decay"], s["betas"], s["eps"], s["grad_accum"], s["grad_clip"]) == (0.05, [0.8, 0.9], 1e-6, 2, 1.0)
    assert s["lr"] == 1e-3 and "norms" in s["no_decay"]
    assert main(base + ["--policy", "lomo"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert s["optimizer"] == "adalomo" and "AdaLomo" in s["note"]
    for bad in (["--betas", "1.5", "0.9"], ["--dropout", "0.1"], ["--warmup", "-1"], ["--clip", "0"]):
        assert main(base + ["--policy", "gpu-only"] + bad) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    hf = ["execute", "--model", model_dirs["gpt2"], "--data", str(chat), "--steps", "1", "--batch", "2", "--seq",
          str(SEQ), "--policy", "gpu-only", "--json"]
    assert main(hf) == 0                                   # a fine-tune's defaults, dropout from the config (0)
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["lr"], s["dropout"], s["weight_decay"], s["seed"]) == (2e-5, 0.0, 0.01, 0)
    assert main(hf + ["--dropout", "0.2", "--seed", "5"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["dropout"], s["seed"]) == (0.2, 5)


def test_a_resumed_run_keeps_its_schedule_and_optimizer_settings(tmp_path, capsys):
    """Killed after 2 of 4 cosine steps and resumed with the flags left out: the losses of the
    uninterrupted run (the schedule still ends at step 4); past that end the resume is refused."""
    import json

    from tiertune.cli import main

    flags = ["--lr-schedule", "cosine", "--warmup", "1", "--weight-decay", "0.1", "--betas", "0.8", "0.95"]
    run = ["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--batch", "1", "--seq", "16", "--json"]
    assert main(run + flags + ["--steps", "4", "--save-dir", str(tmp_path / "a"), "--save-every", "2"]) == 0
    whole = json.loads(capsys.readouterr().out)["losses"]
    at_2 = sorted((tmp_path / "a").glob("step-00000002-*"))[0]
    assert main(run + ["--steps", "2", "--resume", str(at_2)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["losses"] == whole[2:]
    assert (out["settings"]["total_steps"], out["settings"]["betas"]) == (4, [0.8, 0.95])
    assert main(run + ["--steps", "3", "--resume", str(at_2)]) == 2
    assert "reaches 0 at step 4: resume with at most --steps 2" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["constant", "linear", "cosine"]), warmup=st.integers(0, 20),
       total=st.integers(1, 60))
def test_every_lr_schedule_is_transformers_own(schedule, warmup, total):
    """For any warm-up and length, each step's lr factor is the one transformers' scheduler gives."""
    from hf_reference import SCHEDULER_NAMES

    from tiertune.executor.lr_schedule import lr_factor

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = transformers.get_scheduler(SCHEDULER_NAMES[schedule], opt, num_warmup_steps=warmup,
                                       num_training_steps=total)
    for step_no in range(1, total + 1):
        assert lr_factor(schedule, warmup, total, step_no) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
