"""Where outputs go and how they are written, for every command: nothing of the user's is ever lost.

- `check_output` / `check_output_dir` run before any work, so a bad path fails in a second, not
  after a search or a training run;
- `atomic_write` writes a regular file whole or not at all (temp file beside it, fsync, rename),
  keeps an existing file's permission bits, writes through a symbolic link to its target, and
  writes to a FIFO or a device (`/dev/stdout`) in place instead of replacing it;
- `strict_json` turns results into JSON that every parser reads: a non-finite number becomes
  null and a `null_because` field says which and why.

Nothing here deletes or moves a file the tool did not create. Leaf module (imports nothing of ours
but the error type) so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from tiertune.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Permission bits of a new file, as `open()` would give it (mkstemp's 0600 is for the temp file only).
NEW_FILE_MODE = 0o666 & ~_umask()


def _target(path: str | os.PathLike) -> Path:
    """The file a write to `path` lands in: a symbolic link's target, followed all the way."""
    return Path(os.path.realpath(path))


def _in_place(path: str | os.PathLike) -> bool:
    """Written where it is, not replaced: a FIFO, a device, or anything reached through /dev or
    /proc (`/dev/stdout` is the caller's descriptor, whatever it points at)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return not stat.S_ISREG(st.st_mode) or str(Path(path).absolute()).startswith(("/dev/", "/proc/"))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_dir(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def check_output(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, an unwritable
    file, or a file whose (nearest existing) parent directory is not writable."""
    p = Path(path)
    if str(path) == "":
        raise InputError(f"{flag}: empty path")
    if _in_place(p):
        if not os.access(p, os.W_OK):
            raise InputError(f"{flag} {path}: not writable")
        return p
    target = _target(p)
    if target.is_dir():
        raise InputError(f"{flag} {path} is a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"{flag} {path}: not writable")
    parent = _nearest_existing(target.parent)
    if not _writable_dir(parent):
        raise InputError(f"{flag} {path}: cannot write in {parent}")
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output directory that is a file or cannot be written in."""
    p = Path(path)
    if str(path) == "":
        raise InputError(f"{flag}: empty path")
    target = _target(p)
    if target.exists() and not target.is_dir():
        raise InputError(f"{flag} {path} exists and is not a directory")
    where = _nearest_existing(target)
    if not _writable_dir(where):
        raise InputError(f"{flag} {path}: cannot write in {where}")
    return p


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path`'s target, fsync, then rename over it.

    A crash, an exception or Ctrl-C leaves the previous file (or none) in place, never a half one,
    and removes the temp file. An existing file keeps its permission bits; a symbolic link keeps
    pointing where it did (its target is replaced); a FIFO or device is written in place.
    """
    if _in_place(path):
        with open(path, mode) as f:              # nothing to rename over: a pipe, a terminal, stdout
            yield f
        return
    target = _target(path)
    keep_mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else NEW_FILE_MODE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), keep_mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _plain(obj: Any, where: str, reasons: dict[str, str]) -> Any:
    """obj with numpy scalars as Python ones and non-finite floats as None (noted in `reasons`)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}" if where else str(k), reasons) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", reasons) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if hasattr(obj, "item") and callable(obj.item):   # numpy / torch scalars
        return _plain(obj.item(), where, reasons)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        reasons[where] = "not a number" if math.isnan(obj) else ("+inf" if obj > 0 else "-inf")
        return None
    return str(obj)


def strict_json(obj: Any, indent: int | None = 1) -> str:
    """JSON without NaN/Infinity tokens (which strict parsers reject): each non-finite number is
    null, and a top-level `null_because` maps its path to what it was."""
    reasons: dict[str, str] = {}
    plain = _plain(obj, "", reasons)
    if reasons and isinstance(plain, dict):
        plain["null_because"] = reasons
    return json.dumps(plain, indent=indent, allow_nan=False)
