"""Training checkpoints: a directory holding `tensors.safetensors` and a JSON manifest.

The state is any nesting of dicts, lists and tuples over tensors and plain JSON values (step,
losses, RNG states as uint8 tensors, optimizer state dicts with int keys). The manifest keeps the
structure, each tensor replaced by a reference into the safetensors file, so loading rebuilds it
exactly.

Saving is atomic at the directory level: everything is written and fsynced in `.NAME.tmp` beside
the checkpoint, then the old checkpoint is renamed to `.NAME.old`, the new one into place, and the
old one removed. A crash at any point leaves a complete checkpoint: the old one (at NAME, or at
`.NAME.old` during the swap, where `load_checkpoint` looks for it) or the new one. A directory
that is not a checkpoint is never replaced.

A run's save directory (`execute --save-dir`, `save_rotating`) holds the last K checkpoints as
`step-NNNNNNNN-XXXX/` subdirectories and `tiertune-run.json`, the manifest that names them, oldest
first. Each save writes a new subdirectory under a temp name, renames it in, then rewrites the
manifest atomically: a kill at any moment leaves the manifest naming complete checkpoints only.
A directory is the tool's to save into only when it is new, empty, or holds that manifest (or a
single checkpoint's); anything else is refused, and only entries the tool wrote are ever removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tiertune.errors import InputError
from tiertune.fileio import atomic_write_text

FORMAT = "tiertune.checkpoint/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
RUN_FORMAT = "tiertune.run/1"
RUN_MANIFEST = "tiertune-run.json"
_STEP_DIR = re.compile(r"step-\d{8,}-[0-9a-f]{4}")
# what a save killed half-way leaves: a checkpoint being written, the manifest's temp file
_TMP_DIR = re.compile(r"\.step-\d{8,}-[0-9a-f]{4}\.tmp|\.tiertune-run\.json\.\w+\.tmp")


def _encode(obj, tensors: dict[str, torch.Tensor], seen: dict[int, str], path: str):
    """JSON-able form of obj; tensors go to `tensors` and are replaced by {"__tensor__": key}."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        # safetensors refuses two entries on one storage (views of one buffer): copy the later ones
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen[ptr] = path
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen, f"{path}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, seen, f"{path}.key"), _encode(v, tensors, seen, f"{path}[{k!r}]")]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state{path}: cannot store {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entry list is what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _side(dir: Path, what: str) -> Path:
    return dir.with_name(f".{dir.name}.{what}")


def _is_checkpoint(dir: Path) -> bool:
    """A directory holding a checkpoint's manifest (what `save_checkpoint` may replace)."""
    return dir.is_dir() and not dir.is_symlink() and _manifest_format(dir / MANIFEST) == FORMAT


def _manifest_format(path: Path) -> str | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return d.get("format") if isinstance(d, dict) else None


def _write(dir: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Tensors and manifest into the new directory `dir`, each fsynced, then the directory."""
    save_file(tensors, str(dir / TENSORS))
    _fsync(dir / TENSORS)
    with open(dir / MANIFEST, "w") as f:
        json.dump(manifest, f, allow_nan=True)   # a loss history may hold inf; it is read back by us
        f.flush()
        os.fsync(f.fileno())
    _fsync(dir)


def save_checkpoint(dir: str | Path, state: dict) -> None:
    """Write `state` to checkpoint directory `dir`, replacing any previous one atomically."""
    dir = Path(dir)
    if dir.exists() and not _is_checkpoint(dir):
        raise InputError(f"checkpoint {dir}: exists and is not a checkpoint; not replacing it")
    tmp, old = _side(dir, "tmp"), _side(dir, "old")
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "state": _encode(state, tensors, {}, "")}
    try:
        dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)                  # what a crashed save left
        tmp.mkdir()
        _write(tmp, tensors, manifest)
        if dir.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(dir, old)
        os.rename(tmp, dir)
        _fsync(dir.parent)
    except BaseException as exc:
        if old.exists() and not dir.exists():
            os.rename(old, dir)                 # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise InputError(f"checkpoint {dir}: cannot save ({getattr(exc, 'strerror', None) or exc})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _run_list(dir: Path) -> list[str] | None:
    """The checkpoints a run directory's manifest names, oldest first (None: no run manifest)."""
    path = dir / RUN_MANIFEST
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"checkpoint {dir}: unreadable {RUN_MANIFEST} ({exc})") from None
    names = d.get("checkpoints") if isinstance(d, dict) and d.get("format") == RUN_FORMAT else None
    if not isinstance(names, list) or not all(isinstance(n, str) and _STEP_DIR.fullmatch(n) for n in names):
        raise InputError(f"checkpoint {dir}: {RUN_MANIFEST} is not a {RUN_FORMAT} manifest")
    return names


def check_save_dir(dir: str | Path, flag: str = "--save-dir") -> Path:
    """Refuse, before any work, a save directory that is not the tool's: one that exists and is not
    empty and holds neither a run manifest nor a checkpoint. One line names what is in it."""
    from tiertune.fileio import check_output_dir

    dir = Path(dir)
    check_output_dir(dir, flag)
    if not dir.exists():
        return dir
    entries = sorted(os.listdir(dir))
    if _is_checkpoint(dir) or all(_STEP_DIR.fullmatch(e) or _TMP_DIR.fullmatch(e) for e in entries):
        return dir                              # empty, a checkpoint, or what a killed first save left
    if (dir / RUN_MANIFEST).exists():
        _run_list(dir)                          # a damaged manifest is refused here, not after training
        return dir
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise InputError(f"{flag} {dir} holds files tiertune did not write ({shown}); give a new or empty directory")


def save_rotating(dir: str | Path, state: dict, step: int, keep: int, continues: bool = True) -> Path:
    """Add `state` as step `step`'s checkpoint to run directory `dir`, keeping the last `keep`.

    `continues=False` (a run that did not resume from `dir`): the checkpoints of an earlier run in
    `dir` are dropped once this one is safely in place. Returns the new checkpoint's directory.
    """
    dir = check_save_dir(dir)
    if keep < 1:
        raise InputError(f"keep at least one checkpoint, got {keep}")
    name = f"step-{step:08d}-{secrets.token_hex(2)}"
    tmp = dir / f".{name}.tmp"
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "state": _encode(state, tensors, {}, "")}
    earlier = (_run_list(dir) or []) if continues else []
    names = earlier[len(earlier) - keep + 1:] if keep > 1 else []
    names.append(name)
    try:
        dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write(tmp, tensors, manifest)
        os.rename(tmp, dir / name)
        _fsync(dir)
        atomic_write_text(dir / RUN_MANIFEST, json.dumps({"format": RUN_FORMAT, "checkpoints": names}) + "\n")
        _fsync(dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dir / name).exists() and name not in (_run_list(dir) or []):
            shutil.rmtree(dir / name, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise InputError(f"checkpoint {dir}: cannot save ({getattr(exc, 'strerror', None) or exc})") from None
        raise
    for entry in os.listdir(dir):               # only what this tool wrote and the manifest no longer names
        if (_STEP_DIR.fullmatch(entry) and entry not in names) or _TMP_DIR.fullmatch(entry):
            if (dir / entry).is_dir():
                shutil.rmtree(dir / entry, ignore_errors=True)
            else:
                (dir / entry).unlink(missing_ok=True)
    return dir / name


def load_checkpoint(dir: str | Path) -> dict:
    """The state saved in `dir` (a checkpoint, or a run directory: its latest checkpoint), tensors on
    the CPU; a missing or damaged checkpoint is an InputError."""
    dir = Path(dir)
    names = _run_list(dir) if dir.is_dir() else None
    if names:
        dir = dir / names[-1]
    if not dir.is_dir() and _side(dir, "old").is_dir():
        dir = _side(dir, "old")                 # a save crashed between its two renames
    if not dir.is_dir():
        raise InputError(f"checkpoint {dir}: not found")
    try:
        manifest = json.loads((dir / MANIFEST).read_text())
    except OSError as exc:
        raise InputError(f"checkpoint {dir}: cannot read {MANIFEST} ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"checkpoint {dir}: corrupt {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"checkpoint {dir}: {MANIFEST} is not a {FORMAT} manifest")
    try:
        tensors = load_file(str(dir / TENSORS))
    except FileNotFoundError:
        raise InputError(f"checkpoint {dir}: {TENSORS} is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"checkpoint {dir}: corrupt {TENSORS} ({exc})") from None
    try:
        return _decode(manifest["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"checkpoint {dir}: manifest and {TENSORS} disagree ({exc!r})") from None
