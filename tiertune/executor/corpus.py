"""Text and JSON-lines training files tokenized with a model directory's own tokenizer.

A `.txt` is one document. A `.jsonl` holds one document per line: `{"text": ...}`, or
`{"prompt": ..., "response": ...}` whose loss falls on the response only (the prompt's tokens
are inputs, never targets). Each document is tokenized as the model's tokenizer does it (its BOS
included), then ended with EOS; a prompt and its response are tokenized apart and joined, so the
boundary between them is a token boundary and the masked span is exactly the prompt. The EOS
after a response is a target: the model learns where to stop.

The tokenizer is transformers' AutoTokenizer read from the directory, offline: a model whose
directory has no tokenizer files trains on token ids (`.bin`, `.npy`) only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from tiertune.errors import InputError
from tiertune.executor.data import TokenData, check_vocab, config_eos

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CHUNK = 1000                           # documents tokenized per call (and per progress tick)


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path):
    """transformers' tokenizer of `model_dir`, read from its files only (no network)."""
    if not has_tokenizer(model_dir):
        raise InputError(f"model {model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                         f"give its training data as token ids (.bin or .npy)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError("tokenizing text needs `pip install tiertune[hf]`") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:               # transformers raises many kinds for a bad tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model {model_dir}: cannot load its tokenizer ({first})") from None


def eos_id(tokenizer, model_dir: Path) -> int:
    """The id that ends a document: the tokenizer's EOS, else config.json's eos_token_id."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = config_eos(model_dir)
    if not isinstance(eos, int):
        raise InputError("the model's tokenizer and config.json name no EOS token to end documents with")
    return eos


def read_documents(path: Path) -> list[tuple[str, str | None]]:
    """(text, None) or (prompt, response) per document of a .txt or .jsonl file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"training data {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"training data {path}: not UTF-8 (byte {exc.start}: {exc.reason})") from None
    if path.suffix.lower() != ".jsonl":
        return [(text, None)] if text.strip() else []
    docs: list[tuple[str, str | None]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path} line {n}: not JSON ({exc})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append((row["text"], None))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            docs.append((row["prompt"], row["response"]))
        else:
            raise InputError(f"{path} line {n}: needs a string \"text\" field, or string \"prompt\" and "
                             f"\"response\" fields")
    return docs


def tokenize_file(path: str | Path, model_dir: str | Path, vocab: int, progress: bool = True) -> TokenData:
    """The documents of a .txt / .jsonl file as one token stream with a loss mask and document ends."""
    path, model_dir = Path(path), Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    eos = eos_id(tokenizer, model_dir)
    docs = read_documents(path)
    if not docs:
        raise InputError(f"training data {path}: no documents (the file is empty)")
    from tqdm import tqdm

    ids: list[np.ndarray] = []
    loss: list[np.ndarray] = []
    for at in tqdm(range(0, len(docs), CHUNK), desc=f"tokenize {path.name}", unit="chunk", file=sys.stderr,
                   disable=None if progress and len(docs) > CHUNK else True, leave=False):
        part = docs[at:at + CHUNK]
        firsts = tokenizer([d[0] for d in part])["input_ids"]          # texts and prompts, with BOS
        answers = [d[1] for d in part]
        seconds = iter(tokenizer([a for a in answers if a is not None], add_special_tokens=False)["input_ids"]
                       if any(a is not None for a in answers) else [])
        for first, answer in zip(firsts, answers):
            first = list(first)
            if first and first[-1] == eos:      # a tokenizer that appends EOS itself: end once
                first.pop()
            if answer is None:
                doc, mask = first + [eos], [True] * (len(first) + 1)
            else:
                rest = list(next(seconds)) + [eos]
                doc, mask = first + rest, [False] * len(first) + [True] * len(rest)
            ids.append(np.asarray(doc, dtype=np.int64))
            loss.append(np.asarray(mask, dtype=bool))
    ends = np.cumsum([len(d) for d in ids])
    stream = np.concatenate(ids)
    check_vocab(stream, vocab, str(path))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    mask = np.concatenate(loss)
    return TokenData(stream, loss=None if mask.all() else mask, ends=ends, eos=eos, pad=pad, name=str(path))
