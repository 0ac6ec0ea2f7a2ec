"""SSD tier: round trips in both I/O modes, ordering of async operations, full disk and bad roots."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiertune.errors import InputError
from tiertune.executor.ssd import ALIGN, SSDStore


def layer(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 70, generator=g),                       # spans several small blocks
        "b": torch.randn(70, generator=g).to(torch.bfloat16),
        "t": torch.randn(5, 7, generator=g).t(),                     # non-contiguous
        "step": torch.tensor(7, dtype=torch.int64),                  # scalar
        "mask": torch.rand(13, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
    }


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(params=["probe", "page cache"])
def store(request, tmp_path, monkeypatch):
    if request.param == "page cache":
        monkeypatch.setattr(SSDStore, "_probe_direct", lambda self: False)
    s = SSDStore(tmp_path / "ssd", threads=3, block_bytes=2 * ALIGN)
    yield s
    s.close()


def test_round_trip_and_header_describes_file(store):
    t = layer()
    n = store.write("block0", t)
    assert n % ALIGN == 0 and n >= sum(x.numel() * x.element_size() for x in t.values())
    assert store.bytes_used() == n
    assert_same(store.read("block0"), t)
    # a fresh store on the same directory reads it with no side information
    again = SSDStore(store.root)
    assert again.keys() == ["block0"] and again.bytes_used() == n
    assert_same(again.read("block0"), t)
    again.close()


def test_read_into_preallocated(store):
    t = layer(1)
    store.write("k", t)
    into = {k: torch.zeros_like(v) for k, v in t.items()}
    ptrs = {k: v.data_ptr() for k, v in into.items()}
    out = store.read("k", into=into)
    assert_same(out, {k: v.contiguous() for k, v in t.items()})
    assert all(out[k] is into[k] and out[k].data_ptr() == ptrs[k] for k in t)
    with pytest.raises(ValueError, match="into"):
        store.read("k", into={**into, "w": torch.zeros(3)})


def test_async_operations_on_one_key_keep_their_order(store):
    futures = []
    for i in range(6):
        futures.append(store.write_async("x", {"v": torch.full((1000,), float(i))}))
        futures.append(store.read_async("x"))
    for i in range(6):
        assert futures[2 * i].result() > 0
        assert torch.all(futures[2 * i + 1].result()["v"] == i)
    store.delete("x")
    assert store.bytes_used() == 0 and not list(store.root.iterdir())
    with pytest.raises(KeyError):
        store.read("x")


def test_overwrite_and_odd_keys(store):
    store.write("a/b", {"v": torch.ones(10)})
    store.write("a/b", {"v": torch.zeros(20)})
    assert torch.equal(store.read("a/b")["v"], torch.zeros(20))
    store.write("..", {"v": torch.ones(1)})
    assert sorted(store.keys()) == ["..", "a/b"]
    assert all(p.parent == store.root for p in store.root.iterdir())


def test_mode_is_reported(tmp_path, caplog):
    caplog.set_level("INFO", logger="tiertune.executor.ssd")
    s = SSDStore(tmp_path)
    assert s.mode == ("O_DIRECT" if s.direct else "page cache")
    assert s.mode in caplog.text
    s.close()


def test_unusable_root(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="cannot create"):
        SSDStore(f / "sub")


def test_enospc_from_the_writer(store, monkeypatch):
    store.write("keep", {"v": torch.ones(4)})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SSDStore, "_pwrite_all", staticmethod(full))
    with pytest.raises(InputError, match=r"no space left \(needed \d+ bytes\)"):
        store.write("new", {"v": torch.randn(5000)})
    with pytest.raises(InputError, match="no space left"):
        store.write("keep", {"v": torch.randn(5000)})
    monkeypatch.undo()
    assert [p.name for p in store.root.iterdir()] == ["keep.tt"]   # no temp, no half file
    assert torch.equal(store.read("keep")["v"], torch.ones(4))     # the old version survives
    assert store.keys() == ["keep"]


# A disk that fills up, without root: the file size limit (`ulimit -f`, RLIMIT_FSIZE) caps every
# file at 1 MiB, and the kernel fails the write that crosses it (EFBIG) as a full disk would. It is
# set in a child process so the test run's own files are not capped.
FULL_DISK = """
import os, resource, signal, sys, torch
from tiertune.errors import InputError
from tiertune.executor.ssd import SSDStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # else the kernel kills the writer
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
s = SSDStore(sys.argv[1])
s.write("fits", {"v": torch.ones(100_000)})                     # 400 KB of 1 MiB
try:
    s.write("too-big", {"v": torch.ones(300_000)})               # 1.2 MB
    print("no error")
except InputError as exc:
    print(exc)
print(sorted(os.listdir(sys.argv[1])))
print(torch.equal(s.read("fits")["v"], torch.ones(100_000)))
s.close()
"""


def test_real_full_disk(tmp_path):
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    error, listing, read_back = r.stdout.splitlines()
    assert re.search(rf"offload dir {tmp_path}: no space left \(needed \d+ bytes\)", error), error
    assert listing == str(["fits.tt"])
    assert read_back == "True"


def test_corrupt_file(tmp_path):
    s = SSDStore(tmp_path)
    s.write("k", {"v": torch.ones(3)})
    p = Path(tmp_path) / "k.tt"
    p.write_bytes(b"\0" * ALIGN)
    with pytest.raises(InputError, match="bad magic"):
        s.read("k")
    p.write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt"):
        s.read("k")
    s.close()


def test_blocks_use_the_pool(tmp_path, monkeypatch):
    calls = []
    real = SSDStore._pread_all

    def spy(fd, view, offset):
        calls.append((offset, len(view)))
        real(fd, view, offset)

    s = SSDStore(tmp_path, block_bytes=ALIGN)
    n = s.write("k", {"v": torch.zeros(10 * ALIGN // 4)})
    monkeypatch.setattr(SSDStore, "_pread_all", staticmethod(spy))
    s.read("k")
    assert sorted(calls) == [(o, ALIGN) for o in range(0, n, ALIGN)]
    s.close()

