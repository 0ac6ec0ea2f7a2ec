"""HF models layer by layer: the chained layers give transformers' own loss; bad files fail by name."""

import json

import pytest
import torch
import transformers  # the test extra installs it

from tiertune.errors import InputError
from tiertune.executor.hf import HFSource

VOCAB, SEQ = 96, 12


def llama(tmp_path, tied=False, shard=None):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return save(transformers.LlamaForCausalLM(cfg), tmp_path / "llama", shard)


def gpt2(tmp_path, shard=None):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return save(transformers.GPT2LMHeadModel(cfg), tmp_path / "gpt2", shard)


def save(model, path, shard):
    torch.manual_seed(0)
    with torch.no_grad():                       # break the init's symmetries (zero biases, unit norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return model.eval(), path


def chain_loss(src: HFSource, tokens: torch.Tensor) -> torch.Tensor:
    """The layers chained (dropout off: the configs' default dropout is what a run trains with)."""
    layers = [layer.eval() for layer in src.build_all()]
    x = layers[0](tokens[:, :-1])
    for block in layers[1:-1]:
        x = block(x)
    return layers[-1](x, tokens[:, 1:])         # our head gets targets already shifted


@pytest.mark.parametrize("make", [
    lambda p: llama(p),
    lambda p: llama(p, tied=True),
    lambda p: llama(p, shard="20KB"),
    lambda p: gpt2(p),
    lambda p: gpt2(p, shard="20KB"),
], ids=["llama", "llama-tied", "llama-sharded", "gpt2", "gpt2-sharded"])
def test_chained_layers_match_transformers_loss(tmp_path, make):
    model, path = make(tmp_path)
    src = HFSource(path)
    assert src.num_layers == model.config.num_hidden_layers + 2 == src.spec.n_layers + 2
    assert src.spec.vocab_size == VOCAB and src.spec.hidden == 32
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=tokens, labels=tokens).loss     # transformers shifts the labels itself
        got = chain_loss(src, tokens)
    assert got.shape == () and abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())


def test_layers_own_their_parameters_and_train(tmp_path):
    model, path = gpt2(tmp_path)                                 # tied: one matrix, embed and head share it
    src = HFSource(path)
    layers = src.build_all()
    assert layers[0].parts["embed"].weight is layers[-1].lm
    assert torch.equal(layers[-1].lm, model.transformer.wte.weight)
    unique = {id(p): p for layer in layers for p in layer.parameters()}
    n_params = sum(p.numel() for p in unique.values())
    assert n_params == src.spec.total_params() == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    x = layers[0](tokens[:, :-1])
    for block in layers[1:-1]:
        x = block(x)
    layers[-1](x, tokens[:, 1:]).backward()
    assert all(p.grad is not None for layer in layers for p in layer.parameters())


def test_causal(tmp_path):
    # changing a later token must not change earlier positions' outputs
    _, path = llama(tmp_path)
    block = HFSource(path).build_layer(1)
    x = torch.randn(1, SEQ, 32)
    y = x.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        assert torch.allclose(block(x)[0, :-1], block(y)[0, :-1], atol=1e-6)
        assert not torch.allclose(block(x)[0, -1], block(y)[0, -1])


def test_bf16_layers(tmp_path):
    _, path = llama(tmp_path)
    src = HFSource(path, dtype=torch.bfloat16)
    layers = src.build_all()
    assert all(p.dtype == torch.bfloat16 for layer in layers for p in layer.parameters())
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        x = layers[0](tokens)
        for block in layers[1:-1]:
            x = block(x)
        assert x.dtype == torch.bfloat16
        assert torch.isfinite(layers[-1](x, tokens))


def test_bad_directories(tmp_path):
    with pytest.raises(InputError, match="cannot read config.json"):
        HFSource(tmp_path)
    _, path = llama(tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()

    f.write_bytes(data[: len(data) // 2])                        # truncated
    with pytest.raises(InputError, match=r"model\.safetensors: unreadable safetensors"):
        HFSource(path)
    f.write_bytes(b"\xff" * 64)                                  # garbage header
    with pytest.raises(InputError, match=r"model\.safetensors"):
        HFSource(path)
    f.unlink()
    with pytest.raises(InputError, match="no \\*.safetensors"):
        HFSource(path)

    _, path = llama(tmp_path / "again")
    f = path / "model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    src = HFSource(path)
    src.build_layer(1)                                           # block 0 is complete
    with pytest.raises(InputError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        src.build_layer(2)

    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 81
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="do not fit config.json"):
        HFSource(path).build_layer(1)

    cfg["model_type"] = "gemma"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="unsupported model_type 'gemma'"):
        HFSource(path)


def test_missing_transformers(tmp_path, monkeypatch):
    _, path = llama(tmp_path)
    import builtins
    real = builtins.__import__

    def no_transformers(name, *a, **k):
        if name.startswith("transformers"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(InputError, match=r"pip install tiertune\[hf\]"):
        HFSource(path)
