"""Training data for the executor: token streams, loss masks, packed or padded batches.

Two sources of tokens:
  - the built-in models' byte-level text (vocab 256): with no file given, the demo text is the
    first act of Shakespeare's Coriolanus (public domain), shipped as tiertune/data/coriolanus.txt:
    the opening ~32 KB of the tinyshakespeare data set of Karpathy's char-rnn. Bytes are the
    tokens, so any UTF-8 text works with no tokenizer;
  - token ids: a `.bin` of uint16 / uint32 ids as nanoGPT's prepare.py writes them (read through
    np.memmap, never loaded whole), a `.npy` of integer ids, or a `.txt` / `.jsonl` tokenized with
    a model directory's tokenizer (executor/corpus.py).

A `TokenData` is one stream of ids, with a per-token loss mask (False on prompts) and document
ends (after each EOS). Batches are (tokens, targets, attention_mask), each [rows, seq]: targets are
the tokens shifted by one, IGNORE (-100, the ignore_index of torch's cross_entropy and of
transformers' labels) where a target carries no loss. Two layouts:
  packed  windows of seq + 1 consecutive ids at random offsets (nanoGPT's get_batch): documents
          run into one another across their EOS and attend across it, as in GPT-2's pretraining;
          every position is real (attention mask all ones);
  padded  one document per row from the start, cut to seq + 1 ids, right-padded: pads have
          attention mask 0 and target IGNORE. Causal attention never lets a real token see the
          pads after it, so a model run without the mask gives the same loss (the executor's
          layers take no mask); the mask is there for a loop that wants it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from tiertune.errors import InputError

VOCAB_SIZE = 256
DEMO_TEXT = "coriolanus.txt"
IGNORE = -100                          # target of a position with no loss
LAYOUTS = ("packed", "padded")
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_SCAN = 1 << 24                        # ids checked per chunk of a memory-mapped file


class Batch(NamedTuple):
    tokens: torch.Tensor               # LongTensor [rows, seq]
    targets: torch.Tensor              # LongTensor [rows, seq]: next token, or IGNORE
    attention_mask: torch.Tensor       # LongTensor [rows, seq]: 1 on real tokens, 0 on pads


def loss_weights(targets: list[torch.Tensor]) -> list[float]:
    """Each micro-batch's share of a step's loss: its loss-carrying targets over the step's.

    A micro-batch's loss is the mean over its own targets; weighting it so makes the step's loss
    (and gradient) the mean over all of the step's targets, as one big batch would have it, not
    a mean of means that over-weights a micro-batch with few response tokens. Micro-batches of
    equal, unmasked size all get 1 / count.
    """
    counts = [int((t != IGNORE).sum()) for t in targets]
    total = sum(counts)
    if total == 0:
        raise InputError("no target in this step carries a loss (every target is IGNORE)")
    return [c / total for c in counts]


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


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"data layout must be {' or '.join(LAYOUTS)}, got {layout!r}")


def _check_sizes(batch: int, seq: int) -> None:
    for name, v in (("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class TokenData:
    """A stream of token ids, which of them are loss targets, and where its documents end."""

    ids: np.ndarray                    # 1-D integer ids (possibly a read-only memmap)
    loss: np.ndarray | None = None     # bool per id: may it be a target with loss; None: all
    ends: np.ndarray | None = None     # end offset of each document (exclusive); None: from `eos`
    eos: int | None = None
    pad: int | None = None             # id fed at padded positions (its target is IGNORE)
    name: str = "data"

    def document_ends(self) -> np.ndarray:
        if self.ends is not None:
            return self.ends
        if self.eos is None:               # no way to tell documents apart: one document
            return np.array([len(self.ids)], dtype=np.int64)
        ends = np.flatnonzero(np.asarray(self.ids) == self.eos) + 1
        if not len(ends) or ends[-1] != len(self.ids):
            ends = np.append(ends, len(self.ids))
        return ends.astype(np.int64)

    def fingerprint(self, layout: str = "packed") -> str:
        """sha256 of what decides the batches: the ids and, where they matter, the loss mask and
        the documents of a padded layout (a plain text's is the sha256 of its bytes)."""
        h = hashlib.sha256()
        for at in range(0, len(self.ids), _SCAN):
            h.update(np.ascontiguousarray(self.ids[at:at + _SCAN]).tobytes())
        if self.loss is not None:
            h.update(b"loss" + np.packbits(self.loss).tobytes())
        if layout != "packed":
            h.update(layout.encode() + self.document_ends().astype(np.int64).tobytes())
        return h.hexdigest()

    def batches(self, batch: int, seq: int, seed: int, layout: str = "packed") -> Iterator[Batch]:
        """Endless batches of `batch` rows of `seq` tokens, from a generator seeded with `seed`
        (a resumed run that skips as many batches sees the same data). Checks happen at the
        call, not at the first next()."""
        _check_sizes(batch, seq)
        check_layout(layout)
        return self._packed(batch, seq, seed) if layout == "packed" else self._padded(batch, seq, seed)

    # --- packed: random windows of the stream ---------------------------------------------------
    def _packed(self, batch: int, seq: int, seed: int) -> Iterator[Batch]:
        n = len(self.ids)
        if n < seq + 1:
            raise InputError(f"{self.name} of {n} tokens is too short for sequences of {seq} tokens "
                             f"(needs at least {seq + 1})")
        starts = None                      # every window start; else only those with a loss target
        if self.loss is not None:
            has = np.concatenate(([0], np.cumsum(self.loss[1:], dtype=np.int64)))
            ok = np.flatnonzero(has[seq:] - has[:n - seq] > 0)    # targets at s+1 .. s+seq
            if not len(ok):
                raise InputError(f"{self.name}: no window of {seq + 1} tokens holds a loss-carrying "
                                 f"(response) token")
            starts = torch.from_numpy(ok)
        return self._windows(batch, seq, seed, n - seq if starts is None else len(starts), starts)

    def _windows(self, batch: int, seq: int, seed: int, count: int,
                 starts: torch.Tensor | None) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        span = np.arange(seq + 1)
        ones = torch.ones(batch, seq, dtype=torch.long)
        while True:
            pick = torch.randint(0, count, (batch,), generator=g)
            s = (pick if starts is None else starts[pick]).numpy()
            idx = s[:, None] + span
            w = torch.from_numpy(np.asarray(self.ids[idx]).astype(np.int64))
            targets = w[:, 1:].clone()
            if self.loss is not None:
                targets[~torch.from_numpy(np.asarray(self.loss[idx[:, 1:]]))] = IGNORE
            yield Batch(w[:, :-1].contiguous(), targets, ones)

    # --- padded: one document per row ---------------------------------------------------------
    def _padded(self, batch: int, seq: int, seed: int) -> Iterator[Batch]:
        ends = self.document_ends()
        begins = np.concatenate(([0], ends[:-1]))
        rows = []                          # (begin, length) of each document, cut to seq + 1
        for b, e in zip(begins.tolist(), ends.tolist()):
            e = min(e, b + seq + 1)
            if e - b < 2:
                continue                   # no target at all
            if self.loss is not None and not self.loss[b + 1:e].any():
                continue                   # its response starts beyond seq tokens
            rows.append((b, e - b))
        if not rows:
            raise InputError(f"{self.name}: no document has a loss-carrying token within its first "
                             f"{seq + 1} tokens")
        pad = self.pad if self.pad is not None else (self.eos if self.eos is not None else 0)
        return self._rows(rows, batch, seq, seed, pad)

    def _rows(self, rows: list[tuple[int, int]], batch: int, seq: int, seed: int, pad: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while True:
            tokens = torch.full((batch, seq), pad, dtype=torch.long)
            targets = torch.full((batch, seq), IGNORE, dtype=torch.long)
            mask = torch.zeros(batch, seq, dtype=torch.long)
            for r in range(batch):
                if not order:              # a new epoch: every document once, in a fresh order
                    order = torch.randperm(len(rows), generator=g).tolist()[::-1]
                b, length = rows[order.pop()]
                doc = torch.from_numpy(np.asarray(self.ids[b:b + length]).astype(np.int64))
                tokens[r, :length - 1] = doc[:-1]
                targets[r, :length - 1] = doc[1:]
                mask[r, :length - 1] = 1
                if self.loss is not None:
                    keep = torch.from_numpy(np.asarray(self.loss[b + 1:b + length]))
                    targets[r, :length - 1][~keep] = IGNORE
            yield Batch(tokens, targets, mask)


def bytes_data(text: bytes, name: str = "text") -> TokenData:
    """A byte-level text as tokens (the built-in models' vocabulary of 256)."""
    return TokenData(np.frombuffer(text, dtype=np.uint8), name=name)


def open_data(path: str | None, vocab: int, model_dir: str | Path | None = None, dtype: str | None = None,
              progress: bool = True) -> TokenData:
    """The training data `tiertune execute --data` names, for a model of `vocab` ids.

    `.bin` / `.npy`: token ids, for any model. Otherwise a text: a built-in model (`model_dir`
    None) reads its bytes (None: the demo text); a Hugging Face model directory tokenizes it, and
    a `.jsonl`, with its own tokenizer.
    """
    kind = Path(path).suffix.lower() if path is not None else None
    if dtype is not None and kind != ".bin":
        raise InputError("--data-dtype applies to .bin token files only")
    if kind in (".bin", ".npy"):
        data = read_ids(path, vocab, dtype)
        if model_dir is not None:              # documents end at the model's EOS (padded layout)
            data.eos = config_eos(Path(model_dir))
        return data
    if model_dir is None:
        if kind == ".jsonl":
            raise InputError(f"training data {path}: a .jsonl is tokenized with a model directory's tokenizer; "
                             f"built-in models read plain text as bytes")
        data = bytes_data(load_text(path), name=path or "the demo text")
        check_vocab(data.ids, vocab, data.name)
        return data
    if path is None:
        raise InputError("--data is needed for a Hugging Face model (the demo text is byte-level): "
                         "a .txt or .jsonl to tokenize, or token ids (.bin, .npy)")
    from tiertune.executor.corpus import tokenize_file
    return tokenize_file(path, model_dir, vocab, progress=progress)


def config_eos(model_dir: Path) -> int | None:
    """config.json's eos_token_id (the first, where it lists several), or None."""
    import json
    try:
        eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else None


def read_ids(path: str | Path, vocab: int, dtype: str | None = None) -> TokenData:
    """Token ids from a `.bin` (raw uint16/uint32, nanoGPT's format) or a `.npy` file.

    A `.bin` is uint16 unless `dtype` says otherwise or the vocabulary needs more than 16 bits.
    Every id must lie in [0, vocab); the file is scanned in chunks, not loaded whole.
    """
    p = Path(path)
    kind = p.suffix.lower()
    try:
        if kind == ".bin":
            name = dtype or ("uint16" if vocab <= 1 << 16 else "uint32")
            if name not in BIN_DTYPES:
                raise InputError(f"token file {p}: --data-dtype must be {' or '.join(BIN_DTYPES)}, got {name!r}")
            item = np.dtype(BIN_DTYPES[name]).itemsize
            size = p.stat().st_size
            if size % item:
                raise InputError(f"token file {p}: {size} bytes is not a whole number of {name} ids")
            if size == 0:
                raise InputError(f"token file {p}: empty")
            ids = np.memmap(p, dtype=BIN_DTYPES[name], mode="r")
        elif kind == ".npy":
            if dtype is not None:
                raise InputError(f"token file {p}: a .npy says its own dtype (--data-dtype is for .bin)")
            ids = np.load(p, mmap_mode="r", allow_pickle=False)
            if ids.dtype.kind not in "iu":
                raise InputError(f"token file {p}: ids must be integers, got dtype {ids.dtype}")
            if ids.ndim != 1:
                raise InputError(f"token file {p}: expected a 1-D array of ids, got shape {ids.shape}")
            if ids.size == 0:
                raise InputError(f"token file {p}: empty")
        else:
            raise InputError(f"token file {p}: expected .bin or .npy")
    except OSError as exc:
        raise InputError(f"token file {p}: {exc.strerror or exc}") from None
    except ValueError as exc:                   # np.load on a file that is not .npy
        raise InputError(f"token file {p}: not a .npy array ({exc})") from None
    check_vocab(ids, vocab, str(p))
    return TokenData(ids, name=str(p))


def check_vocab(ids: np.ndarray, vocab: int, name: str) -> None:
    """Fail (InputError) on the first id outside [0, vocab), naming its position."""
    for at in range(0, len(ids), _SCAN):
        chunk = np.asarray(ids[at:at + _SCAN])
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab))
        if len(bad):
            i = int(bad[0])
            raise InputError(f"{name}: token id {int(chunk[i])} at position {at + i} is outside the "
                             f"model's vocabulary of {vocab}")


def batches(data: bytes, batch: int, seq: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens, targets) pairs of a byte-level text, each LongTensor [batch, seq]: packed
    windows at uniform random offsets (see TokenData.batches)."""
    it = bytes_data(data).batches(batch, seq, seed)
    return ((b.tokens, b.targets) for b in it)


def eval_batches(data: bytes, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, targets) batches whose windows cover every target byte of `data`, in order.

    Windows step by `seq`; when the text does not divide evenly, one last window ends at the
    text's end (overlapping its neighbour). The last batch may hold fewer than `batch` rows.
    """
    _check_sizes(batch, seq)
    if len(data) < seq + 1:
        raise InputError(f"text of {len(data)} bytes is too short for sequences of {seq} tokens "
                         f"(needs at least {seq + 1})")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
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
