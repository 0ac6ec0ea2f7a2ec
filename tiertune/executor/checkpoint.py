"""Training checkpoints: a directory holding `tensors.safetensors` and a JSON manifest.

The state is any nesting of dicts, lists and tuples over tensors and plain JSON values (step,
losses, RNG states as uint8 tensors, optimizer state dicts with int keys). The manifest keeps the
structure, each tensor replaced by a reference into the safetensors file, so loading rebuilds it
exactly.

Saving is atomic at the directory level: everything is written and fsynced in `.NAME.tmp` beside
the checkpoint, then the old checkpoint is renamed to `.NAME.old`, the new one into place, and the
old one removed. A crash at any point leaves a complete checkpoint: the old one (at NAME, or at
`.NAME.old` during the swap, where `load_checkpoint` looks for it) or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tiertune.errors import InputError

FORMAT = "tiertune.checkpoint/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


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


def save_checkpoint(dir: str | Path, state: dict) -> None:
    """Write `state` to checkpoint directory `dir`, replacing any previous one atomically."""
    dir = Path(dir)
    tmp, old = _side(dir, "tmp"), _side(dir, "old")
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "state": _encode(state, tensors, {}, "")}
    try:
        dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)                  # what a crashed save left
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        _fsync(tmp / TENSORS)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
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


def load_checkpoint(dir: str | Path) -> dict:
    """The state saved in `dir`, tensors on the CPU; a missing or damaged checkpoint is an InputError."""
    dir = Path(dir)
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
