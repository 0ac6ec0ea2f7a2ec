"""Hypothesis strategies shared by the property tests: a small random model and its training settings."""

from hypothesis import strategies as st

from tiertune.workload import ModelSpec, TrainSpec


@st.composite
def model_and_train(draw, dtypes: tuple[str, ...] = ("bf16",)) -> tuple[ModelSpec, TrainSpec]:
    heads = draw(st.sampled_from([2, 4]))
    model = ModelSpec(name="rand", arch=draw(st.sampled_from(["llama", "gpt"])), vocab_size=draw(st.integers(64, 512)),
                      hidden=heads * draw(st.sampled_from([8, 16, 32])), n_layers=draw(st.integers(1, 4)),
                      n_heads=heads, n_kv_heads=heads, ffn_hidden=draw(st.sampled_from([64, 128, 256])),
                      max_seq_len=256)
    train = TrainSpec(batch=draw(st.sampled_from([1, 2, 3, 4])), seq_len=draw(st.sampled_from([16, 64, 128])),
                      dtype=draw(st.sampled_from(dtypes)),
                      optimizer=draw(st.sampled_from(["adamw", "sgd", "adalomo"])), grad_accum=draw(st.integers(1, 2)),
                      grad_clip=draw(st.sampled_from([None, 1.0])))
    return model, train
