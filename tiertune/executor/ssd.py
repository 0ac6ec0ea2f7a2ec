"""The SSD tier: one file per key (a layer's tensors), written and read in large aligned blocks.

Each file holds a small JSON header (names, dtypes, shapes, byte offsets) followed by the raw
tensor bytes, so a read needs no side information:

    [magic 8 B][header length u64][header JSON][pad to ALIGN] [tensor bytes, 64 B aligned]... [pad to ALIGN]

Blocks of `block_bytes` go to the disk in parallel from a thread pool (os.pwrite / os.preadv
release the GIL). When the file system accepts O_DIRECT the page cache is bypassed, as Fuyou and
DeepSpeed's AIO do, so offloaded state does not evict the host memory the CPU tier is counting
on; O_DIRECT needs block-aligned buffers, offsets and sizes, hence the aligned staging buffers and
padded files. The choice is probed once per store (`direct`, `mode`) and logged.

Writes go to a temp file renamed over the key's file when complete: a full disk or a crash leaves
the previous version (or none), never a half file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import threading
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tiertune.errors import InputError

log = logging.getLogger(__name__)

ALIGN = 4096                    # O_DIRECT alignment: the largest logical block size in common use
TENSOR_ALIGN = 64               # in-file alignment of each tensor (any dtype view is then legal)
MAGIC = b"TTSSD\x00\x01\x00"
SUFFIX = ".tt"
_O_DIRECT = getattr(os, "O_DIRECT", 0)   # absent on macOS: page cache only
# a full disk, a full quota, or the per-file size limit: all "the write does not fit"
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _dtype_from_str(s: str) -> torch.dtype:
    dt = getattr(torch, s.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {s!r}")
    return dt


class _Buffers:
    """Page-aligned uint8 host buffers, reused by size: a store moves same-sized layers over and
    over, and fresh large allocations cost page faults on every first touch."""

    def __init__(self, keep_per_size: int = 2):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._keep = keep_per_size
        self._lock = threading.Lock()

    @staticmethod
    def aligned(nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        skip = (-raw.data_ptr()) % ALIGN
        return raw[skip:skip + nbytes]

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return self.aligned(nbytes)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            free = self._free.setdefault(buf.numel(), [])
            if len(free) < self._keep:
                free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class SSDStore:
    """Tensors-by-key on a directory (an NVMe SSD's file system), read and written in parallel blocks.

    Operations on one key run in the order they were submitted (a read after a write_async of the
    same key sees the new data); different keys run concurrently. Tensors handed to `write_async`
    must not be changed until its future is done.
    """

    def __init__(self, root: str | Path, threads: int = 4, block_bytes: int = 1 << 20):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if block_bytes < ALIGN or block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a positive multiple of {ALIGN}, got {block_bytes}")
        self.root = Path(root)
        self.block_bytes = block_bytes
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"offload dir {self.root}: cannot create it ({exc.strerror or exc})") from None
        self.direct = self._probe_direct()
        self.mode = "O_DIRECT" if self.direct else "page cache"
        log.info("SSD store %s: %s, %d threads, %d KiB blocks", self.root, self.mode, threads, block_bytes >> 10)

        self._io = ThreadPoolExecutor(threads, thread_name_prefix="ssd-io")
        # Whole operations get their own pool: an operation waits on its blocks, and sharing one
        # pool could fill it with waiting operations and deadlock. Two lets one prefetch read run
        # beside one write-back.
        self._ops = ThreadPoolExecutor(2, thread_name_prefix="ssd-op")
        self._buffers = _Buffers()
        self._lock = threading.Lock()
        self._last: dict[str, Future] = {}     # per key: the latest submitted operation
        self._sizes: dict[str, int] = {}       # per key: bytes its file takes
        self._index_existing()

    # --- set-up -------------------------------------------------------------------------

    def _probe_direct(self) -> bool:
        """Try one aligned O_DIRECT write + read in root; any refusal means page cache."""
        probe = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"
        buf = _Buffers.aligned(ALIGN)
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and _O_DIRECT:
                return False           # the file system refuses O_DIRECT: use the page cache
            raise InputError(f"offload dir {self.root}: not writable ({exc.strerror or exc})") from None
        try:
            if not _O_DIRECT:
                return False
            os.pwrite(fd, buf.numpy(), 0)
            os.preadv(fd, [buf.numpy()], 0)
            return True
        except OSError as exc:
            if exc.errno in OUT_OF_SPACE:
                raise self._no_space(exc, ALIGN) from None
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)

    def _no_space(self, exc: OSError, needed: int) -> InputError:
        why = {errno.EDQUOT: ": disk quota reached", errno.EFBIG: ": file size limit (ulimit -f) reached"}
        return InputError(f"offload dir {self.root}: no space left (needed {needed} bytes){why.get(exc.errno, '')}")

    def _index_existing(self) -> None:
        """Adopt files a previous store left (headers make them readable); drop stale temp files."""
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    p.unlink()
            elif p.suffix == SUFFIX and p.is_file():
                self._sizes[urllib.parse.unquote(p.name[:-len(SUFFIX)])] = p.stat().st_size

    def _path(self, key: str) -> Path:
        # quote() keeps any key (even "a/b" or "..") a single plain file name inside root
        return self.root / (urllib.parse.quote(key, safe="") + SUFFIX)

    # --- block I/O --------------------------------------------------------------------------

    def _flags(self) -> int:
        return _O_DIRECT if self.direct else 0

    def _blocks(self, fn, fd: int, buf: torch.Tensor) -> None:
        """Run fn(fd, view, offset) over buf in block_bytes pieces on the I/O pool."""
        n, b = buf.numel(), self.block_bytes
        view = buf.numpy()
        if n <= b:
            fn(fd, view, 0)
            return
        futures = [self._io.submit(fn, fd, view[o:o + b], o) for o in range(0, n, b)]
        for f in futures:
            f.result()

    @staticmethod
    def _pwrite_all(fd: int, view, offset: int) -> None:
        done = 0
        while done < len(view):         # pwrite may write less than asked (signals, some FSes)
            done += os.pwrite(fd, view[done:], offset + done)

    @staticmethod
    def _pread_all(fd: int, view, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise EOFError(f"file ends at {offset + done}, expected {offset + len(view)}")
            done += got

    # --- operations -------------------------------------------------------------------------

    def _submit(self, key: str, fn, *args) -> Future:
        with self._lock:
            prev = self._last.get(key)

            def job():
                if prev is not None:
                    with contextlib.suppress(Exception):   # its caller sees its error, not us
                        prev.result()
                return fn(*args)

            fut = self._ops.submit(job)
            self._last[key] = fut
        fut.add_done_callback(lambda f: self._forget(key, f))
        return fut

    def _forget(self, key: str, fut: Future) -> None:
        with self._lock:
            if self._last.get(key) is fut:
                del self._last[key]

    def write_async(self, key: str, tensors: dict[str, torch.Tensor]) -> Future:
        """Future of the bytes the key's file takes on disk (header and padding included)."""
        return self._submit(key, self._write, key, dict(tensors))

    def read_async(self, key: str, into: dict[str, torch.Tensor] | None = None) -> Future:
        """Future of {name: tensor}; with `into`, its tensors are filled and returned."""
        return self._submit(key, self._read, key, into)

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        return self.write_async(key, tensors).result()

    def read(self, key: str, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return self.read_async(key, into).result()

    def delete(self, key: str) -> None:
        self._submit(key, self._delete, key).result()

    def bytes_used(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._sizes)

    def close(self) -> None:
        """Finish pending operations and stop the threads; the files stay."""
        self._ops.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._buffers.clear()

    def __enter__(self) -> "SSDStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the work, on the ops pool ------------------------------------------------------------

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        entries, offset = [], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            entries.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "offset": offset,
                            "nbytes": nbytes})
            offset = _round_up(offset + nbytes, TENSOR_ALIGN)
        header = json.dumps({"tensors": entries}).encode()
        data_start = _round_up(16 + len(header), ALIGN)
        total = _round_up(data_start + offset, ALIGN)

        buf = self._buffers.get(total)
        try:
            prefix = MAGIC + struct.pack("<Q", len(header)) + header
            buf.numpy()[:len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
            for e, t in zip(entries, tensors.values()):
                if e["nbytes"]:
                    start = data_start + e["offset"]
                    dst = buf[start:start + e["nbytes"]].view(t.dtype).view(t.shape)
                    dst.copy_(t.detach())      # also gathers non-contiguous and device tensors
            self._write_file(key, buf, total)
        finally:
            self._buffers.put(buf)
        with self._lock:
            self._sizes[key] = total
        return total

    def _write_file(self, key: str, buf: torch.Tensor, total: int) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self._flags(), 0o644)
            # Reserve the space first: a full disk fails here at once instead of after a
            # layer's worth of writes (file systems without fallocate just skip this).
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                if exc.errno in OUT_OF_SPACE:
                    raise
            self._blocks(self._pwrite_all, fd, buf)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                if exc.errno in OUT_OF_SPACE:
                    raise self._no_space(exc, total) from None
                raise InputError(f"offload dir {self.root}: cannot write {path.name} "
                                 f"({exc.strerror or exc})") from None
            raise

    def _read(self, key: str, into: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | self._flags())
        except FileNotFoundError:
            raise KeyError(f"SSD store {self.root}: no key {key!r}") from None
        except OSError as exc:
            raise InputError(f"offload dir {self.root}: cannot read {path.name} ({exc.strerror or exc})") from None
        try:
            total = os.fstat(fd).st_size
            if total < ALIGN or total % ALIGN:
                raise InputError(f"offload file {path}: corrupt (size {total} is not a multiple of {ALIGN})")
            # With `into` the bytes land in a reused staging buffer and are copied once; without,
            # the returned tensors are views of a fresh buffer (no copy).
            buf = self._buffers.get(total) if into is not None else _Buffers.aligned(total)
            try:
                self._blocks(self._pread_all, fd, buf)
            except (OSError, EOFError) as exc:
                raise InputError(f"offload file {path}: read failed ({exc})") from None
        finally:
            os.close(fd)
        try:
            entries, data_start = self._parse_header(path, buf)
            out = {}
            for e in entries:
                dtype, shape = _dtype_from_str(e["dtype"]), tuple(e["shape"])
                start = data_start + e["offset"]
                if start + e["nbytes"] > total:
                    raise InputError(f"offload file {path}: corrupt (tensor {e['name']!r} runs past the end)")
                src = buf[start:start + e["nbytes"]].view(dtype).view(shape)
                if into is None:
                    out[e["name"]] = src
                    continue
                dst = into.get(e["name"])
                if dst is None or dst.dtype != dtype or tuple(dst.shape) != shape:
                    got = None if dst is None else f"{dst.dtype} {tuple(dst.shape)}"
                    raise ValueError(f"read {key!r}: into[{e['name']!r}] is {got}, file has {dtype} {shape}")
                dst.copy_(src)
                out[e["name"]] = dst
            return out
        finally:
            if into is not None:
                self._buffers.put(buf)

    @staticmethod
    def _parse_header(path: Path, buf: torch.Tensor) -> tuple[list[dict], int]:
        raw = buf[:ALIGN].numpy().tobytes()
        if raw[:8] != MAGIC:
            raise InputError(f"offload file {path}: not a tiertune SSD file (bad magic)")
        (n,) = struct.unpack("<Q", raw[8:16])
        if 16 + n > buf.numel():
            raise InputError(f"offload file {path}: corrupt header length {n}")
        try:
            header = json.loads(buf[16:16 + n].numpy().tobytes())
            return header["tensors"], _round_up(16 + n, ALIGN)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"offload file {path}: corrupt header ({exc})") from None

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
        with self._lock:
            self._sizes.pop(key, None)
