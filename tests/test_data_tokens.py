"""Token-id training data: .bin / .npy round trips and their errors, packed and padded batches with
their loss and attention masks, and a step's loss as the mean over its loss-carrying targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiertune.errors import InputError
from tiertune.executor.data import IGNORE, TokenData, loss_weights, open_data, read_ids


def test_bin_round_trip_uint16_by_default_uint32_for_large_vocabularies(tmp_path):
    ids = np.arange(1000) * 37 % 50257                 # GPT-2's vocabulary, as nanoGPT writes it
    ids.astype(np.uint16).tofile(tmp_path / "train.bin")
    got = read_ids(tmp_path / "train.bin", vocab=50257)
    assert got.ids.dtype == np.uint16 and np.array_equal(got.ids, ids)
    big = np.array([0, 70_000, 151_000, 5])            # Qwen2-size vocabulary needs 32 bits
    big.astype(np.uint32).tofile(tmp_path / "big.bin")
    assert np.array_equal(read_ids(tmp_path / "big.bin", vocab=151_936).ids, big)
    small = np.array([1, 2, 3, 4], dtype=np.uint32)
    small.tofile(tmp_path / "stated.bin")              # uint32 ids for a small vocabulary, stated
    assert np.array_equal(read_ids(tmp_path / "stated.bin", vocab=100, dtype="uint32").ids, small)


def test_npy_round_trip(tmp_path):
    ids = np.array([5, 0, 9, 3, 3, 1], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    got = read_ids(tmp_path / "ids.npy", vocab=10)
    assert np.array_equal(got.ids, ids)
    x, y, m = next(got.batches(2, 5, seed=0))          # one window fits: the whole file
    assert torch.equal(x[0], torch.tensor(ids[:5])) and torch.equal(y[0], torch.tensor(ids[1:]))
    assert m.all()


@pytest.mark.parametrize("write,kw,match", [
    (lambda p: np.array([1, 2, 300], np.uint16).tofile(p / "a.bin"), {}, r"token id 300 at position 2 .* vocabulary of 256"),
    (lambda p: np.array([1, 2, 3], np.uint16).tofile(p / "a.bin"), {"dtype": "uint32"}, "not a whole number of uint32"),
    (lambda p: np.array([1, 2], np.uint16).tofile(p / "a.bin"), {"dtype": "int8"}, "uint16 or uint32"),
    (lambda p: (p / "a.bin").write_bytes(b""), {}, "empty"),
    (lambda p: np.save(p / "a.npy", np.array([0.5, 1.0])), {}, "must be integers"),
    (lambda p: np.save(p / "a.npy", np.zeros((2, 3), np.int32)), {}, "1-D"),
    (lambda p: np.save(p / "a.npy", np.array([3, -1, 2])), {}, "token id -1 at position 1"),
    (lambda p: np.save(p / "a.npy", np.array([], np.int32)), {}, "empty"),
    (lambda p: (p / "a.npy").write_bytes(b"not numpy"), {}, "not a .npy"),
], ids=["over-vocab", "size-vs-dtype", "bad-dtype", "empty-bin", "float-npy", "2d-npy", "negative", "empty-npy",
        "not-npy"])
def test_bad_token_files_fail_with_one_line(tmp_path, write, kw, match):
    write(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=match) as info:
        read_ids(path, vocab=256, **kw)
    assert "\n" not in str(info.value)


def test_open_data_rules(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(50) % 7)
    with pytest.raises(InputError, match="--data-dtype applies to .bin"):
        open_data(str(tmp_path / "ids.npy"), 256, dtype="uint16")
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(InputError, match="a .jsonl is tokenized with a model directory's tokenizer"):
        open_data(str(tmp_path / "d.jsonl"), 256)
    assert open_data(None, 256).name == "the demo text"


def masked(n: int, seed: int) -> TokenData:
    """Documents of random lengths, each a 'prompt' (no loss) then a 'response' and its end (loss).
    Every id is its position + 1, so a window tells where it came from; 0 is the pad."""
    rng = np.random.default_rng(seed)
    loss, ends = [], []
    while len(loss) < n:
        p, r = int(rng.integers(1, 6)), int(rng.integers(0, 4))
        loss += [False] * p + [True] * (r + 1)
        ends.append(len(loss))
    return TokenData(np.arange(1, len(loss) + 1), loss=np.array(loss), ends=np.array(ends), pad=0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(20, 200), seq=st.integers(1, 16), seed=st.integers(0, 3))
def test_packed_windows_mask_exactly_the_prompts(n, seq, seed):
    data = masked(n, seed)
    it = data.batches(4, seq, seed)
    for _ in range(3):
        x, y, m = next(it)
        assert x.shape == y.shape == m.shape == (4, seq) and m.all()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            s = int(row_x[0]) - 1
            assert np.array_equal(row_x, data.ids[s:s + seq])     # a real window of the stream
            truth = data.ids[s + 1:s + seq + 1]
            keep = data.loss[s + 1:s + seq + 1]
            assert np.array_equal(row_y[keep], truth[keep]) and (row_y[~keep] == IGNORE).all()
            assert keep.any()                                     # every row carries some loss


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(20, 200), seq=st.integers(2, 12), seed=st.integers(0, 3))
def test_padded_rows_are_documents_from_their_start(n, seq, seed):
    data = masked(n, seed)
    begins = set(np.concatenate(([0], data.ends[:-1])).tolist())
    x, y, m = next(data.batches(6, seq, seed, layout="padded"))
    for row_x, row_y, row_m in zip(x.numpy(), y.numpy(), m.numpy()):
        k = int(row_m.sum())
        assert row_m[:k].all() and not row_m[k:].any()           # right padding
        assert (row_x[k:] == data.pad).all() and (row_y[k:] == IGNORE).all()
        b = int(row_x[0]) - 1
        assert b in begins                                        # from a document's start
        e = int(data.ends[data.ends > b][0])
        assert k == min(e - b, seq + 1) - 1                       # all of it, cut to seq + 1 ids
        assert np.array_equal(row_x[:k], data.ids[b:b + k])
        keep = data.loss[b + 1:b + k + 1]
        truth = data.ids[b + 1:b + k + 1]
        assert np.array_equal(row_y[:k][keep], truth[keep]) and (row_y[:k][~keep] == IGNORE).all()
        assert keep.any()


def test_padded_epochs_visit_every_document_once():
    ids = np.array([5, 6, 2, 7, 2, 8, 9, 2])                     # three documents ended by EOS = 2
    data = TokenData(ids, eos=2, pad=0)
    it = data.batches(1, 4, seed=3, layout="padded")
    firsts = [int(next(it).tokens[0, 0]) for _ in range(6)]
    assert sorted(firsts[:3]) == sorted(firsts[3:]) == [5, 7, 8]


def test_documents_without_a_loss_token_within_seq_are_refused():
    data = TokenData(np.array([3, 4, 5, 6, 7, 2]), loss=np.array([False] * 5 + [True]), eos=2)
    with pytest.raises(InputError, match="no document has a loss-carrying token within its first 4"):
        data.batches(1, 3, 0, layout="padded")
    with pytest.raises(InputError, match="no window of 3 tokens"):
        TokenData(np.array([3, 4, 5, 6, 2]), loss=np.array([True, False, False, False, False])).batches(1, 2, 0)
    with pytest.raises(InputError, match="data layout must be packed or padded"):
        data.batches(1, 3, 0, layout="sliding")


def test_loss_weights():
    full = [torch.zeros(2, 8, dtype=torch.long)] * 3
    assert loss_weights(full) == [1 / 3] * 3                    # the executor's old 1 / grad_accum, exactly
    a = torch.tensor([[1, IGNORE, IGNORE, IGNORE]])
    b = torch.tensor([[1, 2, 3, IGNORE]])
    assert loss_weights([a, b]) == [0.25, 0.75]
    with pytest.raises(InputError, match="no target in this step carries a loss"):
        loss_weights([torch.full((1, 3), IGNORE)])


def test_split_steps_give_the_mean_over_all_loss_carrying_targets():
    """Masked targets spread unevenly over micro-batches: accumulating 2 x 2 rows trains exactly
    like one batch of 4 rows (the loss is the mean over the step's response tokens, not a mean of
    per-micro-batch means)."""
    from tiertune.executor.models import build_model
    from tiertune.executor.runtime import Executor
    from tiertune.executor.updates import OptimConfig
    from tiertune.schedule import LayerPlan, Plan
    from tiertune.workload import MODEL_PRESETS, TrainSpec

    spec = MODEL_PRESETS["tiny-llama"]
    data = masked(400, 0)
    data.ids = data.ids % spec.vocab_size
    stream = data.batches(4, 16, seed=1)
    steps = [next(stream) for _ in range(3)]
    assert len({int((b.targets[:2] != IGNORE).sum()) - int((b.targets[2:] != IGNORE).sum()) for b in steps}) > 1
    runs = []
    for accum in (1, 2):
        train = TrainSpec(batch=4 // accum, seq_len=16, dtype="fp32", optimizer="adamw", grad_accum=accum)
        plan = Plan(model=spec.name, hardware="local-cpu", train=train,
                    layers=(LayerPlan(),) * (spec.n_layers + 2))
        with Executor(build_model(spec, 0), spec, plan, optim=OptimConfig(lr=1e-2)) as ex:
            runs.append([ex.step(b.tokens, b.targets) for b in steps])
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-5, atol=0)
