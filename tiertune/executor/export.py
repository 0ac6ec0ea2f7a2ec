"""A training checkpoint of a Hugging Face model back in Hugging Face form.

`export(checkpoint, out)` writes a directory `AutoModelForCausalLM.from_pretrained(out)` loads:
the trained fp32 master weights under the source files' tensor names (HFSource.file_names), cast
to the source's dtype, one `model.safetensors`; `config.json`, `generation_config.json` and the
tokenizer files copied from the source directory the checkpoint names. A tied matrix is one
tensor under the embedding's name, as `save_pretrained` writes a tied model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from tiertune.errors import InputError

# what a model directory holds besides weights, copied as they are
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja")
WEIGHTS = "model.safetensors"
MARK = "tiertune_export"        # in the weights' metadata: the checkpoint they came from


def hf_tensors(source, layers: list[dict], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{file tensor name: tensor} from each layer's flat fp32 master weights (executor layer
    order, parameters in the order the layer modules list them, a tied matrix under the head)."""
    out: dict[str, torch.Tensor] = {}
    for i, flat in enumerate(layers):
        names = source.file_names(i)
        shapes = source.layer_shapes(i)
        if sum(math.prod(s) for s in shapes.values()) != flat.numel():
            raise InputError(f"checkpoint layer {i} holds {flat.numel()} weights, the model's layer "
                             f"{sum(math.prod(s) for s in shapes.values())}")
        off = 0
        for local, shape in shapes.items():
            n = math.prod(shape)
            out[names[local]] = flat[off:off + n].view(shape).to(dtype).contiguous()
            off += n
    return out


def is_export(dir: Path) -> bool:
    """Whether `dir` is what an earlier export wrote (its weights say so; nothing else is in it)."""
    from safetensors import SafetensorError, safe_open
    if not (dir / WEIGHTS).is_file() or any(f.name not in (WEIGHTS, *SIDE_FILES) for f in dir.iterdir()):
        return False
    try:
        with safe_open(str(dir / WEIGHTS), framework="pt") as f:
            return MARK in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


def check_export_dir(out: str | Path) -> Path:
    """Refuse, before any work, an -o that is a file, unwritable, or a directory of someone's files
    (an earlier export is replaced)."""
    from tiertune.fileio import check_output_dir
    out = check_output_dir(out, "-o")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        shown = ", ".join(sorted(f.name for f in out.iterdir())[:3])
        raise InputError(f"-o {out} holds files tiertune export did not write ({shown}, ...); give a new or empty "
                         f"directory")
    return out


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the HF directory `out` (new, empty, or an earlier export, which is replaced: a user's
    files never are) from an `execute --save-dir` checkpoint of an HF model; written beside it and
    renamed into place, so `out` is never half-written."""
    from safetensors.torch import save_file

    from tiertune.executor.checkpoint import load_checkpoint
    from tiertune.executor.hf import HFSource

    out = check_export_dir(out)
    state = load_checkpoint(checkpoint)
    src_dir = state.get("source") if isinstance(state, dict) else None
    if not src_dir:
        raise InputError(f"checkpoint {checkpoint}: not of a Hugging Face model directory (built-in models "
                         f"have no HF form)")
    if not Path(src_dir, "config.json").is_file():
        raise InputError(f"checkpoint {checkpoint}: its source model {src_dir} is gone (config and tokenizer "
                         f"files are copied from it)")
    source = HFSource(src_dir)
    layers = [layer["master"] for layer in state["executor"]["layers"]]
    if len(layers) != source.num_layers:
        raise InputError(f"checkpoint {checkpoint}: {len(layers)} layers, {src_dir} has {source.num_layers}")
    tensors = hf_tensors(source, layers, dtype or source.source_dtype())
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", MARK: str(checkpoint)})
        for name in SIDE_FILES:
            if Path(src_dir, name).is_file():
                shutil.copy2(Path(src_dir, name), tmp / name)
        if dtype is not None:                  # the config says which dtype the weights are in
            config = json.loads((tmp / "config.json").read_text())
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)                    # empty or an earlier export, checked above
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"export to {out}: {exc.strerror or exc}") from None
    return out
