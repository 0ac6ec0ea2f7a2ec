"""Training text for the executor: byte-level tokens (vocab 256), train/validation split, batches.

With no file given, the demo text is the first act of Shakespeare's Coriolanus (public domain),
shipped as tiertune/data/coriolanus.txt: the opening ~32 KB of the tinyshakespeare data set of
Karpathy's char-rnn. Bytes are the tokens, so any UTF-8 text works with no tokenizer and the
models' vocab_size is 256.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from tiertune.errors import InputError

VOCAB_SIZE = 256
DEMO_TEXT = "coriolanus.txt"


def load_text(path: str | None) -> bytes:
    """The UTF-8 text at `path` as bytes; None: the shipped demo text (its header line dropped)."""
    if path is None:
        raw = (resources.files("tiertune") / "data" / DEMO_TEXT).read_bytes()
        return raw.split(b"\n", 1)[1]           # the first line says where the text is from
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"training text {p}: {exc.strerror or exc}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"training text {p}: not UTF-8 (byte {exc.start}: {exc.reason})") from None
    return raw


def split(data: bytes, val_fraction: float = 0.1) -> tuple[bytes, bytes]:
    """(train, validation): the validation text is the last `val_fraction` of the bytes."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    cut = len(data) - int(len(data) * val_fraction)
    return data[:cut], data[cut:]


def _check(data: bytes, batch: int, seq: int) -> torch.Tensor:
    for name, v in (("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if len(data) < seq + 1:
        raise InputError(f"text of {len(data)} bytes is too short for sequences of {seq} tokens "
                         f"(needs at least {seq + 1})")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(data: bytes, batch: int, seq: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens, targets) pairs, each LongTensor [batch, seq], targets = tokens shifted by one.

    Windows start at uniform random offsets drawn from a generator seeded with `seed`, so a run
    (and a resumed run that skips as many batches) sees the same data. Checks happen here, at the
    call, not at the first next().
    """
    ids = _check(data, batch, seq)
    return _sample(ids, batch, seq, seed)


def _sample(ids: torch.Tensor, batch: int, seq: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(seq + 1)
    while True:
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=g)
        windows = ids[starts[:, None] + span]
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(data: bytes, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, targets) batches whose windows cover every target byte of `data`, in order.

    Windows step by `seq`; when the text does not divide evenly, one last window ends at the
    text's end (overlapping its neighbour). The last batch may hold fewer than `batch` rows.
    """
    ids = _check(data, batch, seq)
    last = len(ids) - seq - 1
    starts = list(range(0, last + 1, seq))
    if starts[-1] != last:
        starts.append(last)
    span = torch.arange(seq + 1)
    out = []
    for i in range(0, len(starts), batch):
        windows = ids[torch.tensor(starts[i:i + batch])[:, None] + span]
        out.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))
    return out
