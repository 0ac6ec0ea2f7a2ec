"""Built-in models the executor trains, written as a list of layers (embed, blocks, head).

The executor streams, offloads and updates one layer at a time, so a model is not one nn.Module
but a list of them with a fixed interface (shared with `executor/hf.py`):

    layers[0]        embed: forward(tokens LongTensor[b, s]) -> hidden [b, s, h]
    layers[1..n]     block: forward(hidden) -> hidden   (RoPE tables and causal masking inside)
    layers[n+1]      head:  forward(hidden, targets) -> scalar mean cross-entropy (final norm inside)

Two families, plain torch, following `ModelSpec.arch`:
  llama  RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, no biases by default
  gpt    LayerNorm, learned positions, multi-head attention, GeLU MLP, biases
Embeddings are untied (a tied matrix would be one tensor shared by two layers, which the
per-layer placement cannot express).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiertune.workload import ModelSpec

INIT_STD = 0.02        # GPT-2 / nanoGPT initialisation
ROPE_THETA = 10000.0
NORM_EPS = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares lose too much), return in the input's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)
        return xf.to(x.dtype) * self.weight


_rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(seq: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq, head_dim/2]; cached per shape and device (they are not parameters, nothing moves them)."""
    key = (seq, head_dim, str(device), dtype)
    if key not in _rope_cache:
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        _rope_cache[key] = (ang.cos().to(device, dtype), ang.sin().to(device, dtype))
    return _rope_cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]: rotate the two halves of each head (the Llama / HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, d
        self.rope = spec.arch == "llama"
        # Creation order = ModelSpec.block_matrices(): q, k, v, o.
        self.q = nn.Linear(h, spec.n_heads * d, bias=spec.bias)
        self.k = nn.Linear(h, spec.n_kv_heads * d, bias=spec.bias)
        self.v = nn.Linear(h, spec.n_kv_heads * d, bias=spec.bias)
        self.o = nn.Linear(spec.n_heads * d, h, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope_tables(s, self.head_dim, x.device, x.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv != self.n_heads:               # grouped-query attention: share each kv head
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.up = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.down = nn.Linear(spec.ffn_hidden, spec.hidden, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeLUMLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.fc = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.proj = nn.Linear(spec.ffn_hidden, spec.hidden, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))     # GPT-2's tanh GeLU


def _norm(spec: ModelSpec) -> nn.Module:
    return RMSNorm(spec.hidden) if spec.arch == "llama" else nn.LayerNorm(spec.hidden, eps=NORM_EPS)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm1 = _norm(spec)
        self.attn = Attention(spec)
        self.norm2 = _norm(spec)
        self.mlp = SwiGLU(spec) if spec.arch == "llama" else GeLUMLP(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Embed(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.tok = nn.Embedding(spec.vocab_size, spec.hidden)
        self.pos = nn.Embedding(spec.max_seq_len, spec.hidden) if spec.arch == "gpt" else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return x


class Head(nn.Module):
    """Final norm, LM head, mean cross-entropy (logits in fp32 so bf16 training has a stable loss)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm = _norm(spec)
        self.lm = nn.Linear(spec.hidden, spec.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def _init(layer: nn.Module, gen: torch.Generator, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 n_layers)."""
    for name, p in layer.named_parameters():
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                std = INIT_STD / math.sqrt(2 * n_layers) if name.endswith(("o.weight", "down.weight", "proj.weight")) else INIT_STD
                p.normal_(0.0, std, generator=gen)


def build_model(spec: ModelSpec, seed: int = 0) -> list[nn.Module]:
    """[embed, block0..block{n-1}, head] in fp32 on the CPU; deterministic in (spec, seed) and
    layer by layer (layer i's weights do not depend on how many layers come before it)."""
    layers: list[nn.Module] = [Embed(spec)] + [Block(spec) for _ in range(spec.n_layers)] + [Head(spec)]
    for i, layer in enumerate(layers):
        _init(layer, torch.Generator().manual_seed(seed * 1_000_003 + i), spec.n_layers)
    return layers
