"""Hugging Face causal LMs from a local directory, one layer at a time.

`HFSource(dir)` reads `config.json` and the headers of the `*.safetensors` files (one file, or
shards listed in `model.safetensors.index.json`); `build_layer(i)` builds layer i and reads only
that layer's tensors, so a model larger than host memory can be streamed into the executor's
tiers. Layers follow the executor's interface (see executor/models.py):

    0        embed: forward(tokens LongTensor[b, s]) -> hidden [b, s, h]
    1..n     block: forward(hidden) -> hidden     (positions and causal masking inside)
    n+1      head:  forward(hidden, targets) -> scalar mean cross-entropy (final norm inside)

Blocks and norms are transformers' own classes (LlamaDecoderLayer, LlamaRMSNorm,
LlamaRotaryEmbedding, GPT2Block), run with SDPA attention and dropout off: the executor may
recompute a layer, and a recomputed dropout mask would differ from the first one.

Tied embeddings (GPT-2, some Llamas): the head owns the matrix (trains it, as
`ModelSpec.head_params` counts it); the embed layer holds a copy as a buffer, not a parameter,
so the placement sees one trained tensor. The lookup's gradient is not applied to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from tiertune.errors import InputError
from tiertune.workload import ModelSpec, model_from_hf_config

INDEX = "model.safetensors.index.json"


class Embed(nn.Module):
    def __init__(self, tok: torch.Tensor, pos: torch.Tensor | None, tied: bool):
        super().__init__()
        if tied:
            self.register_buffer("tok", tok)       # the head's parameter; see the module docstring
        else:
            self.tok = nn.Parameter(tok)
        self.pos = None if pos is None else nn.Parameter(pos)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.tok)
        if self.pos is not None:                   # GPT-2's learned positions
            x = x + self.pos[: tokens.shape[1]]
        return x


class LlamaBlock(nn.Module):
    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer = layer
        self.rotary = rotary                       # inv_freq is a buffer: no parameters here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)[None]
        # attention_mask=None with SDPA makes transformers pass is_causal=True
        return self.layer(x, attention_mask=None, position_embeddings=self.rotary(x, positions))


class GPT2Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)                       # causal through SDPA, as above


class Head(nn.Module):
    def __init__(self, norm: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # fp32 logits, as transformers' own loss does; targets are already shifted by one
        logits = F.linear(self.norm(x), self.weight).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def _transformers():
    """transformers' config and layer classes, imported only when an HF model is used."""
    try:
        from transformers import GPT2Config, LlamaConfig
        from transformers.models.gpt2 import modeling_gpt2
        from transformers.models.llama import modeling_llama
    except ImportError:
        raise InputError("loading HF models needs `pip install tiertune[hf]`") from None
    return GPT2Config, LlamaConfig, modeling_gpt2, modeling_llama


class HFSource:
    """A local HF model directory as a list of buildable layers (Llama and GPT-2 families)."""

    def __init__(self, dir: str | Path, dtype: torch.dtype = torch.float32):
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
        if self.arch not in ("llama", "gpt2"):
            raise InputError(f"{cfg_path}: building layers supports model_type llama and gpt2, got {self.arch!r}")
        self.tied = self.spec.tied_embeddings

        gpt2_config, llama_config, _, _ = _transformers()
        config_cls = llama_config if self.arch == "llama" else gpt2_config
        self.config = config_cls.from_dict(cfg)
        self.config._attn_implementation = "sdpa"
        for k in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
            if hasattr(self.config, k):
                setattr(self.config, k, 0.0)

        self._files = self._index()                # tensor name -> file holding it
        if self.arch == "llama":
            self._prefix = "model."
        else:                                      # GPT-2 files come with and without "transformer."
            self._prefix = "transformer." if "transformer.wte.weight" in self._files else ""

    @property
    def num_layers(self) -> int:
        return self.spec.n_layers + 2

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

    def _fill(self, module: nn.Module, file_prefix: str) -> nn.Module:
        """Give a module built on the meta device its parameters from the files."""
        names = {n: file_prefix + n for n, _ in module.named_parameters()}
        try:
            module.load_state_dict(self._tensors(names), strict=True, assign=True)
        except RuntimeError as exc:                # shape mismatch between config and file
            raise InputError(f"HF model {self.dir}: tensors under {file_prefix!r} do not fit config.json "
                             f"({str(exc).splitlines()[-1].strip()})") from None
        return module

    def build_layer(self, i: int) -> nn.Module:
        """Layer i (0 embed, 1..n blocks, n+1 head) with its weights, on the CPU, in `dtype`."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range 0..{self.num_layers - 1}")
        _, _, gpt2, llama = _transformers()
        p, n = self._prefix, self.spec.n_layers
        if i == 0:
            if self.arch == "llama":
                t = self._tensors({"tok": p + "embed_tokens.weight"})
                return Embed(t["tok"], None, self.tied)
            t = self._tensors({"tok": p + "wte.weight", "pos": p + "wpe.weight"})
            return Embed(t["tok"], t["pos"], self.tied)
        if i == n + 1:
            if self.arch == "llama":
                with torch.device("meta"):
                    norm = llama.LlamaRMSNorm(self.spec.hidden, eps=self.config.rms_norm_eps)
                norm = self._fill(norm, p + "norm.")
                tied_name = p + "embed_tokens.weight"
            else:
                with torch.device("meta"):
                    norm = nn.LayerNorm(self.spec.hidden, eps=self.config.layer_norm_epsilon)
                norm = self._fill(norm, p + "ln_f.")
                tied_name = p + "wte.weight"
            w = self._tensors({"w": tied_name if self.tied else "lm_head.weight"})["w"]
            return Head(norm, w)
        if self.arch == "llama":
            with torch.device("meta"):
                layer = llama.LlamaDecoderLayer(self.config, layer_idx=i - 1)
            rotary = llama.LlamaRotaryEmbedding(self.config)
            return LlamaBlock(self._fill(layer, f"{p}layers.{i - 1}."), rotary)
        with torch.device("meta"):
            block = gpt2.GPT2Block(self.config, layer_idx=i - 1)
        return GPT2Block(self._fill(block, f"{p}h.{i - 1}."))

    def build_all(self) -> list[nn.Module]:
        """Every layer at once: for models that fit in host memory (tests, small runs)."""
        return [self.build_layer(i) for i in range(self.num_layers)]
