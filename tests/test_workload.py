"""Model shapes and per-layer costs: the arithmetic every budget rests on."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from tiertune.errors import InputError
from tiertune.workload import MODEL_PRESETS, ModelSpec, TrainSpec, layer_costs, load_model, model_flops_per_step


def test_gpt3_175b_has_175b_parameters_and_1_81b_per_layer():
    m = MODEL_PRESETS["gpt3-175b"]
    assert m.block_params() == 12 * 12288**2 + 13 * 12288          # 12h^2 + 13h (Narayanan et al. 2021)
    assert abs(m.total_params() - 174.6e9) < 0.1e9


def test_llama2_param_counts_match_the_released_checkpoints():
    assert abs(MODEL_PRESETS["llama2-7b"].total_params() - 6.738e9) < 1e6
    assert abs(MODEL_PRESETS["llama2-70b"].total_params() - 68.977e9) < 1e7


def test_mixed_precision_adam_costs_16_bytes_per_parameter():
    # ZeRO (Rajbhandari et al. 2020) Sec. 3.1: 2 (fp16 weights) + 2 (fp16 grads) + 12 (fp32 master, m, v).
    m, t = MODEL_PRESETS["gpt3-13b"], TrainSpec(batch=1, seq_len=2048, dtype="bf16", optimizer="adamw")
    costs = layer_costs(m, t)
    total = sum(c.weight_bytes + c.grad_bytes + c.optim_bytes for c in costs)
    assert total == 16 * m.total_params()


def test_fp32_adam_keeps_no_separate_master_copy():
    m, t = MODEL_PRESETS["tiny-llama"], TrainSpec(batch=1, seq_len=16, dtype="fp32")
    for c in layer_costs(m, t):
        assert c.weight_bytes == 4 * c.params and c.optim_bytes == 8 * c.params


def test_sgd_in_bf16_keeps_only_the_fp32_master():
    m, t = MODEL_PRESETS["gpt3-1.3b"], TrainSpec(batch=1, seq_len=2048, optimizer="sgd")
    assert all(c.optim_bytes == 4 * c.params for c in layer_costs(m, t))


def test_gpt_block_activations_follow_korthikanti_34sbh_plus_5as2b():
    # Korthikanti et al. 2022, eq. 1 (16-bit activations, no parallelism, eager attention).
    m = MODEL_PRESETS["gpt3-13b"]
    s, b, h, a = 2048, 2, m.hidden, m.n_heads
    t = TrainSpec(batch=b, seq_len=s, dtype="bf16", flash_attention=False)
    block = layer_costs(m, t)[1]
    assert block.act_bytes == s * b * h * 34 + 5 * a * s * s * b
    assert block.act_checkpoint_bytes == 2 * s * b * h          # recompute keeps the block input only


def test_flash_attention_drops_the_s_squared_term():
    m = MODEL_PRESETS["gpt3-13b"]
    s, b, h, a = 2048, 2, m.hidden, m.n_heads
    block = layer_costs(m, TrainSpec(batch=b, seq_len=s, flash_attention=True))[1]
    assert block.act_bytes == 34 * s * b * h + 4 * a * s * b


def test_llama_block_activations_hand_computed():
    m = MODEL_PRESETS["llama2-7b"]          # h 4096, f 11008, a = kv = 32
    s, b, e = 4096, 1, 2
    block = layer_costs(m, TrainSpec(batch=b, seq_len=s))[1]
    expected = 6 * e * s * b * 4096 + 2 * e * s * b * 4096 + 4 * e * s * b * 11008 + 4 * 32 * s * b
    assert block.act_bytes == expected


def test_backward_is_twice_forward_and_model_flops_are_6_n_tokens_plus_attention():
    m, t = MODEL_PRESETS["gpt3-175b"], TrainSpec(batch=1, seq_len=2048)
    costs = layer_costs(m, t)
    assert all(c.bwd_flops == 2 * c.fwd_flops for c in costs if c.kind != "embed")
    tokens = 2048
    dense = 6 * tokens * (m.n_layers * 12 * m.hidden**2 + m.vocab_size * m.hidden)
    attention = 3 * m.n_layers * 4 * tokens * 2048 * m.hidden
    assert model_flops_per_step(m, t) == pytest.approx(dense + attention, rel=1e-9)


def test_layers_are_embed_blocks_head():
    m = MODEL_PRESETS["tiny-llama"]
    costs = layer_costs(m, TrainSpec(batch=1, seq_len=16))
    assert [c.kind for c in costs] == ["embed"] + ["block"] * m.n_layers + ["head"]
    assert [c.name for c in costs] == m.layer_names


@given(h=st.sampled_from([64, 128, 256]), layers=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]),
       arch=st.sampled_from(["llama", "gpt"]), tied=st.booleans(), batch=st.integers(1, 4), seq=st.integers(1, 128))
@settings(max_examples=40, deadline=None)
def test_per_layer_params_sum_to_the_model(h, layers, heads, arch, tied, batch, seq):
    m = ModelSpec(name="x", arch=arch, vocab_size=300, hidden=h, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                  ffn_hidden=3 * h, max_seq_len=128, tied_embeddings=tied, bias=arch == "gpt")
    costs = layer_costs(m, TrainSpec(batch=batch, seq_len=seq))
    assert sum(c.params for c in costs) == m.total_params()
    assert all(c.act_checkpoint_bytes <= c.act_bytes for c in costs)


def test_hf_configs_of_each_family_load(tmp_path):
    configs = {
        "llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100},
        "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64},
        "opt": {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "ffn_dim": 256, "vocab_size": 100},
        "neox": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 256, "vocab_size": 100},
    }
    for name, cfg in configs.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        m = load_model(str(d))
        assert m.n_layers == 2 and m.hidden == 64


@pytest.mark.parametrize("text, message", [
    ("{not json", "malformed"),
    ('{"model_type": "llama", "num_attention_heads": 4, "vocab_size": 9, "hidden_size": -4}', "hidden_size"),
    ('{"model_type": "bert"}', "unsupported model_type"),
])
def test_malformed_configs_are_refused_with_the_reason(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(InputError, match=message):
        load_model(str(tmp_path))


def test_unknown_model_names_the_presets():
    with pytest.raises(InputError, match="gpt3-175b"):
        load_model("gpt5-ultra")
