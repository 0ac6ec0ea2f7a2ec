"""Byte-level training data: the shipped text, file errors, deterministic batches, full eval coverage."""

import pytest
import torch

from tiertune.errors import InputError
from tiertune.executor.data import batches, eval_batches, load_text, split


def test_shipped_text_is_utf8_english_without_its_header():
    t = load_text(None)
    assert 30_000 < len(t) < 60_000
    assert t.startswith(b"First Citizen:") and not t.startswith(b"#")
    t.decode("utf-8")


def test_load_file_and_its_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(p)) == "héllo wörld\n".encode()
    with pytest.raises(InputError, match="missing.txt"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="training text"):
        load_text(str(tmp_path))                       # a directory
    p.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(InputError, match=r"not UTF-8 \(byte 3"):
        load_text(str(p))


def test_split():
    data = bytes(range(100))
    train, val = split(data, 0.1)
    assert train + val == data and len(val) == 10
    assert split(data, 0.0) == (data, b"")
    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match="val_fraction"):
            split(data, bad)


def test_batches_shift_and_determinism():
    data = load_text(None)
    a, b = batches(data, 3, 16, seed=1), batches(data, 3, 16, seed=1)
    for _ in range(5):
        (x, y), (x2, y2) = next(a), next(b)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.long
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
        row = bytes(x[0].tolist()) + bytes([y[0, -1].item()])
        assert row in data                             # a real window of the text
    x3, _ = next(batches(data, 3, 16, seed=2))
    assert not torch.equal(next(batches(data, 3, 16, seed=1))[0], x3)


def test_batches_reach_both_ends():
    data = bytes(range(11))
    seen = set()
    it = batches(data, 4, 9, seed=0)                   # only two windows fit: starts 0 and 1
    for _ in range(20):
        x, _ = next(it)
        seen.update(x[:, 0].tolist())
    assert seen == {0, 1}


def test_too_short_or_bad_sizes_fail_at_the_call():
    with pytest.raises(InputError, match="too short"):
        batches(b"abc", 1, 3, 0)
    with pytest.raises(InputError, match="too short"):
        eval_batches(b"abc", 1, 3)
    with pytest.raises(InputError, match="batch"):
        batches(b"abcdef", 0, 3, 0)


@pytest.mark.parametrize("n,seq,batch", [(101, 10, 3), (107, 10, 4), (11, 10, 2), (250, 7, 64)])
def test_eval_batches_cover_every_target(n, seq, batch):
    data = bytes(range(n))                             # byte value == position
    out = eval_batches(data, batch, seq)
    covered = set()
    for x, y in out:
        assert x.shape[1] == seq and 1 <= x.shape[0] <= batch
        assert torch.equal(y, x + 1)                   # each target is the next byte
        for row in y.tolist():
            covered.update(row)
    assert covered == set(range(1, n))
    assert all(x.shape[0] == batch for x, _ in out[:-1])
