"""Hugging Face causal LMs from a local directory, one layer at a time.

`HFSource(dir)` reads `config.json` and the headers of the `*.safetensors` files (one file, or
shards listed in `model.safetensors.index.json`); `build_layer(i)` builds layer i and reads only
that layer's tensors, so a model larger than host memory can be streamed into the executor's
tiers. Layers follow the executor's interface (see executor/models.py):

    0        embed: forward(tokens LongTensor[b, s]) -> hidden [b, s, h]
    1..n     block: forward(hidden) -> hidden     (positions and causal masking inside)
    n+1      head:  forward(hidden, targets) -> scalar mean cross-entropy over targets != -100

Families (`FAMILIES`): Llama, Mistral and Qwen2 (qkv biases) share one layout; GPT-2, GPT-NeoX
and OPT have their own tensor names, learned positions (GPT-2, OPT) and projections (OPT-350m).
Blocks and norms are transformers' own modules, taken from the model class built on the meta
device (no memory) and given their tensors from the files, run with SDPA attention (causal,
no attention mask: right padding needs none, its targets are -100). Dropout follows the config
unless the caller sets `dropout` (the executor recomputes a layer with torch's RNG state as it
was, see runtime.py).

Tied embeddings (GPT-2, OPT, Llama-3.2 style): one nn.Parameter used by the embed layer and the
head; the executor trains it once (the head owns it, the embed layer borrows it, executor/layer.py).
`file_names(i)` maps each layer's parameter names to the tensor names in the files, both to read
them and to write them back (executor/export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from tiertune.errors import InputError
from tiertune.executor.data import IGNORE
from tiertune.workload import ModelSpec, model_from_hf_config

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class Family:
    """Where a family's tensors are: `base` module path, and names under it."""
    base: str                         # e.g. "model" (the files may omit it: GPT-2 saved as GPT2Model)
    embed: str                        # token embedding module
    layers: str                       # the ModuleList of blocks
    norm: str | None                  # final norm module
    head: str = "lm_head"             # LM head module (top level; unused when tied)
    head_file: str | None = None      # its name in older files, where it differs
    positions: str | None = None      # learned position embedding module
    rotary: str | None = None         # rotary embedding module (positions computed per block)
    project_in: str | None = None     # OPT-350m: embeddings to hidden size and back
    project_out: str | None = None
    dropout: tuple[str, ...] = ()     # config keys of dropout probabilities


_LLAMA = Family(base="model", embed="embed_tokens", layers="layers", norm="norm", rotary="rotary_emb",
                dropout=("attention_dropout",))
FAMILIES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Family(base="transformer", embed="wte", layers="h", norm="ln_f", positions="wpe",
                   dropout=("attn_pdrop", "resid_pdrop", "embd_pdrop")),
    "gpt_neox": Family(base="gpt_neox", embed="embed_in", layers="layers", norm="final_layer_norm",
                       head_file="embed_out", rotary="rotary_emb", dropout=("attention_dropout", "hidden_dropout")),
    "opt": Family(base="model.decoder", embed="embed_tokens", layers="layers", norm="final_layer_norm",
                  positions="embed_positions", project_in="project_in", project_out="project_out",
                  dropout=("dropout", "attention_dropout")),
}


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (transformers' causal LM loss)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


class Embed(nn.Module):
    """Token embedding (+ learned positions, + OPT's projection in), transformers' modules inside."""

    def __init__(self, parts: dict[str, nn.Module], arch: str):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.arch = arch

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.parts["embed"](tokens)
        if "project_in" in self.parts:
            x = self.parts["project_in"](x)
        if "positions" in self.parts:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
            if self.arch == "opt":      # OPTLearnedPositionalEmbedding adds its offset of 2 itself
                x = x + self.parts["positions"](None, position_ids=positions)
            else:
                x = x + self.parts["positions"](positions)
        if "drop" in self.parts:
            x = self.parts["drop"](x)
        return x


class Block(nn.Module):
    """One transformers decoder layer, called with what its model's forward would pass it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None):
        super().__init__()
        self.layer = layer
        self.rotary = rotary                       # its inv_freq is a buffer: no parameters here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)[None]
        kw = {"position_embeddings": self.rotary(x, positions)} if self.rotary is not None else {}
        # attention_mask=None with SDPA makes transformers pass is_causal=True
        out = self.layer(x, attention_mask=None, position_ids=positions, **kw)
        return out[0] if isinstance(out, tuple) else out


class Head(nn.Module):
    """Final norm (+ OPT's projection out), LM head, loss; `lm` may be the embedding's tied weight."""

    def __init__(self, parts: dict[str, nn.Module], lm: nn.Parameter):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.lm = lm

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if "norm" in self.parts:
            x = self.parts["norm"](x)
        if "project_out" in self.parts:
            x = self.parts["project_out"](x)
        return F.linear(x, self.lm)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # fp32 logits, as transformers' own loss does; targets are already shifted by one
        return masked_cross_entropy(self.logits(x), targets)


def _transformers():
    """transformers' model classes, imported only when an HF model is used."""
    try:
        import transformers
    except ImportError:
        raise InputError("loading HF models needs `pip install tiertune[hf]`") from None
    return transformers


class HFSource:
    """A local HF model directory as a list of buildable layers (FAMILIES)."""

    def __init__(self, dir: str | Path, dtype: torch.dtype = torch.float32, dropout: float | None = None):
        self.dir = Path(dir)
        self.dtype = dtype
        cfg_path = self.dir / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except OSError as exc:
            raise InputError(f"HF model {self.dir}: cannot read config.json ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed {cfg_path}: {exc}") from None
        self.spec: ModelSpec = model_from_hf_config(cfg, name=self.dir.resolve().name, where=str(cfg_path))
        self.arch = cfg.get("model_type")
        if self.arch not in FAMILIES:
            raise InputError(f"{cfg_path}: building layers supports model_type {', '.join(FAMILIES)}; "
                             f"got {self.arch!r}")
        self.family = FAMILIES[self.arch]
        self.tied = self.spec.tied_embeddings

        transformers = _transformers()
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        self.config = CONFIG_MAPPING[self.arch].from_dict(cfg)
        self.config._attn_implementation = "sdpa"
        if dropout is not None:
            for k in self.family.dropout:
                setattr(self.config, k, float(dropout))
        # the longest sequence every position attends to in full (Mistral / Qwen2 sliding windows
        # need an attention mask, which the blocks are not given)
        window = getattr(self.config, "sliding_window", None)
        if self.arch == "qwen2" and not getattr(self.config, "use_sliding_window", False):
            window = None
        self.max_seq_len = min(self.spec.max_seq_len, window or self.spec.max_seq_len)

        self._files = self._index()                # tensor name -> file holding it
        base = self.family.base + "."
        self._prefix = base if f"{base}{self.family.embed}.weight" in self._files else ""
        with torch.device("meta"):                  # the model's structure, no memory
            self._skeleton = transformers.AutoModelForCausalLM.from_config(self.config)
        self._tied: nn.Parameter | None = None

    @property
    def num_layers(self) -> int:
        return self.spec.n_layers + 2

    @property
    def dropout(self) -> float:
        """The largest dropout probability the layers use (0: deterministic)."""
        return max((float(getattr(self.config, k, 0.0) or 0.0) for k in self.family.dropout), default=0.0)

    def _index(self) -> dict[str, Path]:
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {self.dir / f for f in set(weight_map.values())}
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise InputError(f"malformed {index}: {exc!r}") from None
        else:
            files = set(self.dir.glob("*.safetensors"))
            if not files:
                raise InputError(f"HF model {self.dir}: no *.safetensors files (only safetensors weights are read)")
        # Read every header now (cheap, no tensor data): a bad file fails here, by name.
        where: dict[str, Path] = {}
        for f in sorted(files):
            try:
                with safe_open(str(f), framework="pt") as sf:
                    where.update((k, f) for k in sf.keys())
            except (SafetensorError, OSError) as exc:
                raise InputError(f"HF model file {f}: unreadable safetensors ({exc})") from None
        return where

    def source_dtype(self) -> torch.dtype:
        """The dtype of the weights in the files (what an export writes back)."""
        name = self._lm_name()
        with safe_open(str(self._files[name]), framework="pt") as sf:
            return SAFETENSORS_DTYPES[sf.get_slice(name).get_dtype()]

    def _tensors(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """{local name: tensor} for {local name: file tensor name}, each file opened once."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for local, name in names.items():
            if name not in self._files:
                raise InputError(f"HF model {self.dir}: missing tensor {name!r}")
            by_file.setdefault(self._files[name], []).append((local, name))
        out = {}
        for f, pairs in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for local, name in pairs:
                        t = sf.get_tensor(name)
                        out[local] = t.to(self.dtype) if t.is_floating_point() else t
            except (SafetensorError, OSError) as exc:
                raise InputError(f"HF model file {f}: cannot read tensor ({exc})") from None
        return out

    def _module(self, path: str) -> nn.Module:
        return self._skeleton.get_submodule(path)

    def _parts(self, i: int) -> dict[str, tuple[str, str]]:
        """Layer i's pieces: {local key: (module path in the model, tensor name prefix in the files)}."""
        f, p, n = self.family, self._prefix, self.spec.n_layers
        if i == 0:
            keys = {"embed": f.embed, "positions": f.positions, "project_in": f.project_in}
        elif i == n + 1:
            keys = {"norm": f.norm, "project_out": f.project_out}
        else:
            return {"layer": (f"{f.base}.{f.layers}.{i - 1}", f"{p}{f.layers}.{i - 1}.")}
        base = self._module(f.base)
        return {k: (f"{f.base}.{v}", f"{p}{v}.") for k, v in keys.items()
                if v is not None and getattr(base, v, None) is not None}     # OPT: projections optional

    def _lm_name(self) -> str:
        f = self.family
        if self.tied:
            return f"{self._prefix}{f.embed}.weight"
        if f.head_file is not None and f"{f.head_file}.weight" in self._files:
            return f"{f.head_file}.weight"          # Pythia's files: embed_out
        return f"{f.head}.weight"

    def file_names(self, i: int) -> dict[str, str]:
        """Layer i's parameter names (as `build_layer(i).named_parameters()` gives them, a tied
        matrix under the head) -> tensor names in the files."""
        if i == self.spec.n_layers + 1 or i == 0:
            wrap = "parts"
        else:
            wrap = None
        out = {}
        for key, (path, prefix) in self._parts(i).items():
            for name, _ in self._module(path).named_parameters():
                out[f"{wrap}.{key}.{name}" if wrap else f"{key}.{name}"] = prefix + name
        if i == 0 and self.tied:
            out.pop("parts.embed.weight")
        if i == self.spec.n_layers + 1:
            out["lm"] = self._lm_name()
        return out

    def _fill(self, module: nn.Module, names: dict[str, str]) -> nn.Module:
        """Give a module built on the meta device its parameters from the files."""
        prefix = next(iter(names.values()), "").rsplit(".", 1)[0]
        try:
            module.load_state_dict(self._tensors(names), strict=False, assign=True)
        except RuntimeError as exc:                # shape mismatch between config and file
            raise InputError(f"HF model {self.dir}: tensors under {prefix!r} do not fit config.json "
                             f"({str(exc).splitlines()[-1].strip()})") from None
        empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if empty:
            raise InputError(f"HF model {self.dir}: no tensors for {', '.join(empty)} under {prefix!r}")
        return module

    def _tied_weight(self) -> nn.Parameter:
        """The one parameter a tied embedding and head share (read once)."""
        if self._tied is None:
            self._tied = nn.Parameter(self._tensors({"w": self._lm_name()})["w"])
        return self._tied

    def _fresh(self, path: str) -> nn.Module:
        """A copy of the skeleton's module at `path`, still on the meta device."""
        import copy
        return copy.deepcopy(self._module(path))

    def _structure(self, i: int) -> tuple[nn.Module, dict[str, str]]:
        """Layer i built on the meta device (a tied matrix a placeholder), and its file names."""
        f, n = self.family, self.spec.n_layers
        parts = {k: self._fresh(path) for k, (path, _) in self._parts(i).items()}
        names = self.file_names(i)
        if i == 0:
            drop = getattr(self._module(f.base), "drop", None) or getattr(self._module(f.base), "emb_dropout", None)
            if drop is not None:
                parts["drop"] = drop
            return Embed(parts, self.arch), names
        if i == n + 1:
            return Head(parts, self._fresh(f.head).weight if not self.tied else
                        nn.Parameter(torch.empty_like(self._module(f"{f.base}.{f.embed}").weight))), names
        rotary = None
        if f.rotary is not None:
            rotary = type(self._module(f"{f.base}.{f.rotary}"))(config=self.config)
        return Block(parts["layer"], rotary), names

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters layer i owns (a tied matrix: the head), in the order the executor
        flattens them (the module's named_parameters)."""
        module, _ = self._structure(i)
        return {n: tuple(p.shape) for n, p in module.named_parameters()
                if not (i == 0 and self.tied and n == "parts.embed.weight")}

    def build_layer(self, i: int) -> nn.Module:
        """Layer i (0 embed, 1..n blocks, n+1 head) with its weights, on the CPU, in `dtype`."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range 0..{self.num_layers - 1}")
        module, names = self._structure(i)
        if self.tied and i == 0:
            module.parts["embed"].weight = self._tied_weight()
        elif self.tied and i == self.spec.n_layers + 1:
            module.lm = self._tied_weight()
            names.pop("lm")
        return self._fill(module, names)

    def build_all(self) -> list[nn.Module]:
        """Every layer at once: for models that fit in host memory (tests, small runs)."""
        return [self.build_layer(i) for i in range(self.num_layers)]
