"""Checkpoints: exact round trip of nested state, atomic replacement under crashes, damaged files."""

import os

import pytest
import torch

from tiertune.errors import InputError
from tiertune.executor import checkpoint
from tiertune.executor.checkpoint import load_checkpoint, save_checkpoint


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(8, 4, generator=g)
    return {
        "step": step,
        "losses": [5.5, 4.25, float("inf")],
        "name": "run",
        "done": False,
        "extra": None,
        "model": {"embed.weight": w, "head.bias": torch.randn(4, generator=g).to(torch.bfloat16)},
        "views": [w[:2], w[2:], w.t()],                         # share w's storage
        "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(8, 4)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
        "rng": {"cpu": torch.get_rng_state(), "seed_tuple": (1, "a", None)},
        "mask": torch.tensor([True, False]),
        "empty": [torch.empty(0), torch.empty(0, 3, dtype=torch.int64)],
        "__odd": 1,
    }


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path):
    s = state(1)
    save_checkpoint(tmp_path / "ck", s)
    assert_same(load_checkpoint(tmp_path / "ck"), s)
    save_checkpoint(tmp_path / "ck", state(2))                  # replaces
    assert_same(load_checkpoint(tmp_path / "ck"), state(2))
    assert sorted(os.listdir(tmp_path)) == ["ck"]               # no temp or old directory left


def test_unstorable_value_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"state\.x"):
        save_checkpoint(tmp_path / "ck", {"x": object()})
    assert not (tmp_path / "ck").exists()


def test_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", state(1))

    def crash(*a, **k):
        raise KeyboardInterrupt                                 # e.g. Ctrl-C mid-save

    monkeypatch.setattr(checkpoint.json, "dump", crash)         # after the tensors file is written
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", state(2))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same(load_checkpoint(tmp_path / "ck"), state(1))


def test_crash_between_renames(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", state(1))
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:                                     # old moved aside, new not yet in
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(InputError, match="cannot save"):
        save_checkpoint(tmp_path / "ck", state(2))
    monkeypatch.undo()
    assert_same(load_checkpoint(tmp_path / "ck"), state(1))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_hard_crash_between_renames_is_recovered_on_load(tmp_path):
    # what a killed process leaves: the previous checkpoint moved aside, the new one still in tmp
    save_checkpoint(tmp_path / "ck", state(1))
    os.rename(tmp_path / "ck", tmp_path / ".ck.old")
    (tmp_path / ".ck.tmp").mkdir()
    assert_same(load_checkpoint(tmp_path / "ck"), state(1))
    save_checkpoint(tmp_path / "ck", state(3))
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same(load_checkpoint(tmp_path / "ck"), state(3))


def test_missing_or_damaged(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "ck", state(1))
    t = tmp_path / "ck" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:-10])
    with pytest.raises(InputError, match="corrupt tensors.safetensors"):
        load_checkpoint(tmp_path / "ck")
    t.unlink()
    with pytest.raises(InputError, match="tensors.safetensors is missing"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt manifest.json"):
        load_checkpoint(tmp_path / "ck")
