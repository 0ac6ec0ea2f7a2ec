"""Text and prompt/response data tokenized with a model directory's own tokenizer train like a plain
Hugging Face loop: the loss falls on response tokens only, padded rows are masked, and every
bad input ends with one line and exit code 2.

The tokenizer is a word-level one trained offline with `tokenizers` on the sentences of
tests/hf_reference.py and saved beside a tiny random Llama (transformers' save_pretrained):
nothing is downloaded. The reference loop is hf_reference.plain_hf_loop, as for every architecture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # the test extra installs it
from hf_reference import BOS, EOS, PAD, QA, TEXTS, plain_hf_loop, save_tokenizer, write_chat

from tiertune.cli import main
from tiertune.errors import InputError
from tiertune.executor.corpus import tokenize_file
from tiertune.executor.data import IGNORE, TokenData, open_data
from tiertune.executor.updates import OptimConfig

LR, SEQ, STEPS = 1e-2, 16, 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer (BOS added, EOS and pad defined)."""
    path = tmp_path_factory.mktemp("hf") / "tiny-chat"
    vocab = save_tokenizer(path)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(model_dir):
    """A prompt/response file with a few plain texts among the pairs."""
    return write_chat(model_dir.parent / "chat.jsonl")


def words(model_dir, text: str) -> list[int]:
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return [vocab[w] for w in text.split()]


def test_documents_are_bos_prompt_response_eos_with_the_loss_on_the_response(model_dir, chat):
    data = tokenize_file(chat, model_dir, vocab=64)
    assert data.eos == 2 and data.pad == 3 and len(data.ends) == len(QA) + len(TEXTS)
    q, a = QA[0]
    prompt, response = [1] + words(model_dir, q + " answer :"), words(model_dir, a) + [2]
    first = data.ids[:data.ends[0]]
    assert first.tolist() == prompt + response
    assert data.loss[:data.ends[0]].tolist() == [False] * len(prompt) + [True] * len(response)
    b = int(data.ends[len(QA) - 1])                                     # a plain text: all of it is loss
    assert data.ids[b:data.ends[len(QA)]].tolist() == [1] + words(model_dir, TEXTS[0]) + [2]
    assert data.loss[b:data.ends[len(QA)]].all()
    (model_dir.parent / "one.txt").write_text("the cat eats fish .\n")
    txt = tokenize_file(model_dir.parent / "one.txt", model_dir, vocab=64)
    assert txt.ids.tolist() == [1] + words(model_dir, "the cat eats fish .") + [2] and txt.loss is None


def test_padded_targets_are_exactly_the_responses(model_dir, chat):
    data = tokenize_file(chat, model_dir, vocab=64)
    responses = {tuple(words(model_dir, a) + [2]) for _, a in QA} | {tuple(words(model_dir, t) + [2]) for t in TEXTS}
    x, y, m = next(data.batches(len(QA) + len(TEXTS), 24, seed=0, layout="padded"))
    seen = set()
    for row_y, row_m in zip(y, m):
        kept = tuple(row_y[row_y != IGNORE].tolist())
        assert kept in responses                         # an answer (or a text) and nothing of a prompt
        seen.add(kept)
        assert (row_y[row_m == 0] == IGNORE).all()
    assert seen == responses                             # one epoch: every document once


@pytest.mark.parametrize("policy,layout", [("gpu-only", "padded"), ("zero-offload", "padded"),
                                           ("fuyou", "padded"), ("gpu-only", "packed")])
def test_prompt_response_file_trains_like_the_plain_hf_loop(model_dir, chat, tmp_path, policy, layout):
    from tiertune.executor.hf import HFSource
    from tiertune.executor.runtime import Executor
    from tiertune.hardware import load_hardware
    from tiertune.planner.policies import make_policy
    from tiertune.workload import TrainSpec

    src = HFSource(model_dir)
    data = open_data(str(chat), src.spec.vocab_size, model_dir=model_dir)
    stream = data.batches(4, SEQ, seed=0, layout=layout)
    steps = [next(stream) for _ in range(STEPS)]
    if layout == "padded":
        assert any((b.attention_mask == 0).any() for b in steps)        # some rows really are padded
    assert all((b.targets == IGNORE).any() for b in steps)              # and some targets masked
    optim = OptimConfig(lr=LR, weight_decay=0.0)
    want = plain_hf_loop(model_dir, steps, optim, accum=2)
    train = TrainSpec(batch=2, seq_len=SEQ, dtype="fp32", optimizer="adamw", grad_accum=2)
    plan = make_policy(policy, src.spec, train, load_hardware("lsp-4090"))
    with Executor(src.build_all(), src.spec, plan, offload_dir=tmp_path,
                  optim=optim) as ex:
        got = [ex.step(b.tokens, b.targets) for b in steps]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert want[-1] < want[0]


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(["execute", "--policy", "gpu-only", "--steps", "2", "--batch", "2", "--seq", str(SEQ), *args])
    return rc, capsys.readouterr().err


def test_cli_trains_on_a_jsonl_and_on_token_ids(model_dir, chat, capsys, tmp_path):
    for layout in ("padded", "packed"):
        rc = main(["execute", "--model", str(model_dir), "--policy", "gpu-only", "--steps", "2", "--batch", "2",
                   "--seq", str(SEQ), "--data", str(chat), "--data-layout", layout, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and len(out["losses"]) == 2 and all(np.isfinite(out["losses"]))
    ids = tokenize_file(chat, model_dir, vocab=64).ids
    ids.astype(np.uint16).tofile(tmp_path / "chat.bin")
    rc = main(["execute", "--model", str(model_dir), "--policy", "gpu-only", "--steps", "2", "--batch", "2",
               "--seq", str(SEQ), "--data", str(tmp_path / "chat.bin"), "--data-layout", "padded", "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["losses"]) == 2


def test_bad_data_ends_with_one_line_and_exit_2(model_dir, chat, capsys, tmp_path):
    bare = tmp_path / "bare"                            # the same model without its tokenizer files
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((model_dir / f).read_bytes())
    (tmp_path / "empty.jsonl").write_text("\n \n")
    (tmp_path / "partial.jsonl").write_text('{"prompt": "hi", "response": "yo"}\n{"prompt": "no answer"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    np.array([5, 999, 3], np.uint16).tofile(tmp_path / "big.bin")
    cases = [
        ((str(bare), str(chat)), "has no tokenizer"),
        ((str(model_dir), str(tmp_path / "empty.jsonl")), "no documents"),
        ((str(model_dir), str(tmp_path / "partial.jsonl")), "partial.jsonl line 2: needs a string \"text\" field"),
        ((str(model_dir), str(tmp_path / "broken.jsonl")), "broken.jsonl line 2: not JSON"),
        ((str(model_dir), str(tmp_path / "big.bin")), "token id 999 at position 1 is outside the model's vocabulary"),
        ((str(model_dir), str(tmp_path / "missing.jsonl")), "missing.jsonl"),
    ]
    for (model, data), match in cases:
        rc, err = run_cli(capsys, "--model", model, "--data", data)
        assert rc == 2 and match in err and err.count("\n") == 1, (match, err)
    rc, err = run_cli(capsys, "--model", str(model_dir))
    assert rc == 2 and "--data is needed for a Hugging Face model" in err
    rc, err = run_cli(capsys, "--model", str(model_dir), "--data", str(tmp_path / "big.bin"), "--data-dtype", "int4")
    assert rc == 2 and "--data-dtype must be uint16 or uint32" in err
    rc, err = run_cli(capsys, "--model", str(model_dir), "--data", str(chat), "--data-layout", "sliding")
    assert rc == 2 and "data layout must be packed or padded" in err


def test_built_in_models_keep_the_byte_level_text(tmp_path):
    (tmp_path / "t.txt").write_text("hello hello hello hello\n")
    data = open_data(str(tmp_path / "t.txt"), 256)
    assert isinstance(data, TokenData) and bytes(data.ids.tolist()) == b"hello hello hello hello\n"
    with pytest.raises(InputError, match="built-in models read plain text as bytes"):
        open_data(str(tmp_path / "t.jsonl"), 256)
