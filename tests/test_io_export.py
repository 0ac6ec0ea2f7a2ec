"""`tiertune export`: a checkpoint of an HF model back in HF form, loadable by from_pretrained, with
the logits of the executor's final model (fp32, max abs diff <= 1e-5), the source's dtype and ties;
bad input ends with one line and exit 2, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the test extra installs it
from hf_reference import ARCHS, BOS, EOS, PAD, VOCAB, save_model, save_tokenizer, write_chat

from tiertune.cli import main
from tiertune.executor.checkpoint import load_checkpoint
from tiertune.executor.hf import HFSource
from tiertune.executor.layer import build_layers
from tiertune.executor.run import train_plan
from tiertune.hardware import load_hardware
from tiertune.planner.policies import make_policy
from tiertune.workload import TrainSpec

def hf_model(path, dtype=torch.float32) -> str:
    """A tiny Llama saved in `dtype`, with the tokenizer."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    assert save_tokenizer(path) <= VOCAB
    return str(path)


def trained(src_dir: str, tmp_path, policy="fuyou"):
    src = HFSource(src_dir)
    plan = make_policy(policy, src.spec, TrainSpec(batch=2, seq_len=16, dtype="fp32", optimizer="adamw"),
                       load_hardware("lsp-4090"))
    chat = write_chat(tmp_path / "chat.jsonl")
    train_plan(src, plan, 3, offload_dir=tmp_path / "ssd", lr=1e-2, progress=False, save_dir=tmp_path / "ckpt",
               data=str(chat), data_layout="padded")
    return plan, tmp_path / "ckpt"


def final_logits(src_dir: str, plan, ckpt, tokens):
    """The executor's final model: its layers holding the checkpoint's fp32 master weights."""
    modules = HFSource(src_dir).build_all()
    states = build_layers(modules, HFSource(src_dir).spec.layer_names, plan.layers, torch.float32)
    for L, saved in zip(states, load_checkpoint(ckpt)["executor"]["layers"]):
        L.bind(saved["master"], None)
    with torch.no_grad():
        x = tokens
        for m in modules[:-1]:
            x = m(x)
        return modules[-1].logits(x)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_round_trip(tmp_path, arch):
    """Trained under the Fuyou policy and exported: from_pretrained gives the
    executor's final model, tied where the source was, with its tokenizer and config."""
    src_dir = save_model(arch, tmp_path / "src")
    plan, ckpt = trained(src_dir, tmp_path)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    want = final_logits(src_dir, plan, ckpt, tokens)
    assert (got - want).abs().max().item() <= 1e-5
    before = transformers.AutoModelForCausalLM.from_pretrained(src_dir)
    assert not torch.equal(before.get_input_embeddings().weight, model.get_input_embeddings().weight)  # it trained
    tied = json.loads((tmp_path / "src" / "config.json").read_text()).get("tie_word_embeddings", True)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied == (arch in ("llama-tied", "gpt2", "opt"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "</s>"
    assert (tmp_path / "out" / "config.json").read_text() == (tmp_path / "src" / "config.json").read_text()


def test_export_keeps_the_source_dtype(tmp_path):
    src_dir = hf_model(tmp_path / "src", dtype=torch.bfloat16)
    _, ckpt = trained(src_dir, tmp_path, policy="gpu-only")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_export_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, capsys):
    def refused(args, match):
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err

    assert main(["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--batch", "1",
                 "--seq", "16", "--save-dir", str(tmp_path / "builtin")]) == 0
    capsys.readouterr()
    refused([str(tmp_path / "builtin"), "-o", str(tmp_path / "out")], "not of a Hugging Face model")
    refused([str(tmp_path / "missing"), "-o", str(tmp_path / "out")], "not found")
    assert not (tmp_path / "out").exists()

    src_dir = hf_model(tmp_path / "src")
    _, ckpt = trained(src_dir, tmp_path, policy="gpu-only")
    capsys.readouterr()                                  # transformers' progress bars
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused([str(ckpt), "-o", str(tmp_path / "mine")], "holds files tiertune export did not write")
    refused([str(ckpt), "-o", src_dir], "holds files tiertune export did not write")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    refused([str(ckpt), "-o", str(tmp_path / "file")], "is not a directory")

    assert main(["export", str(ckpt), "-o", str(tmp_path / "out")]) == 0
    assert main(["export", str(ckpt), "-o", str(tmp_path / "out"), "--dtype", "bf16"]) == 0    # ours: replaced
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto").dtype == torch.bfloat16
    capsys.readouterr()
    (tmp_path / "src").rename(tmp_path / "moved")
    refused([str(ckpt), "-o", str(tmp_path / "out2")], "is gone")
    assert not (tmp_path / "out2").exists()
