"""What is being trained: model shapes (`ModelSpec`), training settings (`TrainSpec`) and the
per-layer bytes and FLOPs (`LayerCost`) that every other part budgets with.

A model is a list of layers: `embed`, then one `block` per transformer layer, then `head`
(final norm + LM head + loss). Each is a unit of placement, streaming and update.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tiertune.errors import InputError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "sgd", "adalomo")
# Tokens per chunk of a chunked cross-entropy (TrainSpec.chunked_loss): the logits of this many
# tokens are alive at once. Our choice, not a measurement: only this transient depends on it.
LOSS_CHUNK_TOKENS = 1024
# Elements per fp64 chunk of the gradient norm LoHan (Fuyou's released code) takes in its gradient
# hook: RC4ML/LoHan ratel_optimizer.py, _constant_buffered_norm2(buffer_size=250000000).
FP64_NORM_CHUNK = 250_000_000


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str                    # "llama" (RMSNorm, RoPE, SwiGLU) | "gpt" (LayerNorm, learned positions, GeLU)
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    tied_embeddings: bool = False
    bias: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt"):
            raise InputError(f"model {self.name!r}: arch must be 'llama' or 'gpt', got {self.arch!r}")
        for f in ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"model {self.name!r}: {f} must be a positive integer, got {v!r}")
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise InputError(f"model {self.name!r}: hidden ({self.hidden}) must divide by n_heads ({self.n_heads}) "
                             f"and n_heads by n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def layer_names(self) -> list[str]:
        return ["embed"] + [f"block{i}" for i in range(self.n_layers)] + ["head"]

    def block_matrices(self) -> tuple[tuple[int, int], ...]:
        """(out, in) shapes of the block's weight matrices, in the order the executor creates them."""
        h, f = self.hidden, self.ffn_hidden
        kv = self.n_kv_heads * self.head_dim
        attn = ((h, h), (kv, h), (kv, h), (h, h))
        mlp = ((f, h), (f, h), (h, f)) if self.arch == "llama" else ((f, h), (h, f))
        return attn + mlp

    def block_params(self) -> int:
        h, f = self.hidden, self.ffn_hidden
        kv = self.n_kv_heads * self.head_dim
        n = sum(o * i for o, i in self.block_matrices())
        if self.arch == "llama":
            n += 2 * h                              # two RMSNorm weights
        else:
            n += 4 * h                              # two LayerNorms (weight + bias)
        if self.bias:
            n += h + 2 * kv + h + (f + h if self.arch == "gpt" else 2 * f + h)
        return n

    def embed_params(self) -> int:
        n = 0 if self.tied_embeddings else self.vocab_size * self.hidden
        if self.arch == "gpt":
            n += self.max_seq_len * self.hidden     # learned positions
        return n

    def head_params(self) -> int:
        # A tied matrix is counted once, here: the head's matmul needs all of it, the
        # embedding's lookup reads only b*s rows of it.
        norm = self.hidden if self.arch == "llama" else 2 * self.hidden
        return self.vocab_size * self.hidden + norm

    def total_params(self) -> int:
        return self.embed_params() + self.n_layers * self.block_params() + self.head_params()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    batch: int = 1                 # micro-batch (sequences)
    seq_len: int = 2048
    dtype: str = "bf16"            # compute/weight dtype; fp32 master weights when not fp32
    optimizer: str = "adamw"
    grad_accum: int = 1
    flash_attention: bool = True   # memory-efficient attention: no s^2 score matrix is kept
    grad_clip: float | None = None
    # False: the optimizer updates the weights in the training dtype with no fp32 master copy
    # (LOMO/AdaLomo update in place inside the backward hook; pure bf16/fp16 training).
    master_weights: bool = True
    # True: the head computes the loss over chunks of tokens (fused / chunked cross-entropy,
    # as Liger-Kernel and Unsloth do), so the full logits and their log-softmax are never held.
    chunked_loss: bool = False
    # True: gradients reach a host optimizer as fp32 (DeepSpeed's ZeRO-Offload/-Infinity cast
    # each gradient to fp32 on the device, copy it into fp32 partitions in host memory and keep
    # them until the step: 4 bytes per parameter over PCIe and in host memory, not 2).
    fp32_host_grads: bool = False
    # True: a recomputed block is checkpointed at its attention and its MLP half separately (Fuyou:
    # LoHan's gpt_model.py wraps each half in its own torch.utils.checkpoint). It keeps two inputs
    # per block instead of one, and its backward holds one half's activations at a time.
    checkpoint_halves: bool = False
    # True: the gradient hook copies each gradient into a new device buffer and takes its norm in
    # fp64 chunks before the gradient leaves for the host optimizer (Fuyou: LoHan's
    # ratel_optimizer.py partition_grads, `grad_buffer = torch.empty_like(...)` then
    # `_constant_buffered_norm2`, `part.data.double()` per FP64_NORM_CHUNK elements): a layer's
    # backward also holds `grad_hook_bytes` on the device.
    grad_copy_fp64_norm: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise InputError(f"train.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for f in ("batch", "seq_len", "grad_accum"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"train.{f} must be a positive integer, got {v!r}")
        clip = self.grad_clip
        if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool)
                                 or not 0 < clip < float("inf")):
            raise InputError(f"train.grad_clip must be a positive number or null, got {clip!r}")
        for f in ("flash_attention", "master_weights", "chunked_loss", "fp32_host_grads", "checkpoint_halves",
                  "grad_copy_fp64_norm"):
            if not isinstance(getattr(self, f), bool):
                raise InputError(f"train.{f} must be true or false, got {getattr(self, f)!r}")

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step."""
        return self.batch * self.seq_len * self.grad_accum

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def master_bytes(self) -> int:
        """Bytes per parameter of the optimizer's fp32 master copy: none when the weights are fp32
        already or when training keeps no master (`master_weights` false)."""
        return 4 if (self.dtype != "fp32" and self.master_weights) else 0

    @property
    def host_grad_bytes(self) -> int:
        """Bytes per parameter of a full gradient on its way to (and waiting in) a host optimizer."""
        return 4 if self.fp32_host_grads else self.elem_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        if not isinstance(d, dict):
            raise InputError("train must be an object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"train: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainSpec":
        return replace(self, **changes)


@dataclass(frozen=True)
class LayerCost:
    """Bytes and FLOPs of one layer for one micro-batch (activations, FLOPs) or one copy (weights)."""

    index: int
    name: str
    kind: str                          # embed | block | head
    params: int
    weight_bytes: int                  # compute-dtype weights
    grad_bytes: int                    # compute-dtype gradients
    optim_bytes: int                   # fp32 master + optimizer moments
    act_bytes: int                     # saved for backward without recompute
    act_checkpoint_bytes: int          # kept when recomputed (the layer's input)
    fwd_flops: float
    bwd_flops: float
    matrices: tuple[tuple[int, int], ...] = field(default=())   # weight matrices (LSP compression)
    # Most activation bytes alive at once while the layer is recomputed and backpropagated
    # (checkpoint included): act_bytes, or less when the recompute works on parts of the layer.
    act_recompute_bytes: int = 0

    @property
    def recompute_flops(self) -> float:
        return self.fwd_flops


def optimizer_bytes_per_param(train: TrainSpec) -> int:
    """Bytes of optimizer state per parameter, mixed-precision convention (ZeRO paper, Sec. 3.1):
    AdamW keeps fp32 master + m + v = 12 bytes (8 if the weights are fp32 already or keep no
    master), SGD only the fp32 master, AdaLomo the master plus a factored second moment (added by
    the caller). LOMO (OpenLMLab/LOMO) keeps no master: SGD 0 bytes, so llama2-7b's 13.5 GB of
    bf16 weights fit its 24 GB RTX 3090.
    """
    return {"adamw": train.master_bytes + 8, "sgd": train.master_bytes, "adalomo": train.master_bytes}[train.optimizer]


def _block_activation_halves(m: ModelSpec, t: TrainSpec) -> tuple[int, int]:
    """Bytes a block saves for backward: (attention half, MLP half), each with its norm's input.

    GPT: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 1, no tensor/sequence parallelism): s*b*h*(34 + 5*a*s/h) with 16-bit activations and
    1-byte dropout masks, generalised here to element size e: attention 11sbh + 5as^2b, MLP 19sbh,
    each LayerNorm's input 2sbh. Llama: the same bookkeeping for RMSNorm/RoPE/SwiGLU and no
    dropout: attention 4e*sbh + 2e*sbh*kv/a (norm input, q/k/v input, q, attention output; k, v),
    MLP 2e*sbh + 4e*sbf (norm input, gate/up input; gate, up, activation, product). With
    memory-efficient attention the a*s^2*b score terms are replaced by the fp32 log-sum-exp (4*a*s*b).
    """
    s, b, h, a, f, e = t.seq_len, t.batch, m.hidden, m.n_heads, m.ffn_hidden, t.elem_bytes
    sbh = s * b * h
    if m.arch == "gpt":
        attn_core = 4 * a * s * b if t.flash_attention else (2 * e + 1) * a * s * s * b
        attention = e * sbh + 5 * e * sbh + sbh + attn_core    # 2sbh + 11sbh + 5as^2b at e=2
        mlp = e * sbh + e * sbh + 2 * e * s * b * f + sbh       # 2sbh + 19sbh at e=2, f=4h
        return attention, mlp
    kv_frac = m.n_kv_heads / m.n_heads
    attn_core = 4 * a * s * b if t.flash_attention else e * a * s * s * b
    return int(4 * e * sbh + 2 * e * sbh * kv_frac + attn_core), 2 * e * sbh + 4 * e * s * b * f


def _block_activation_bytes(m: ModelSpec, t: TrainSpec) -> int:
    """Bytes a block saves for backward (both halves, `_block_activation_halves`)."""
    return sum(_block_activation_halves(m, t))


def layer_costs(m: ModelSpec, t: TrainSpec) -> list[LayerCost]:
    """Per-layer costs, index 0 = embed, 1..n = blocks, n+1 = head."""
    if t.seq_len > m.max_seq_len and m.arch == "gpt":
        raise InputError(f"seq_len {t.seq_len} exceeds {m.name}'s learned positions ({m.max_seq_len})")
    e = t.elem_bytes
    tokens = t.batch * t.seq_len
    s, b, h = t.seq_len, t.batch, m.hidden
    opt_per_param = optimizer_bytes_per_param(t)

    def optim_bytes(params: int, mats: tuple[tuple[int, int], ...]) -> int:
        n = params * opt_per_param
        if t.optimizer == "adalomo":                    # factored second moment: one row + one column per matrix
            n += 4 * sum(o + i for o, i in mats) + 4 * (params - sum(o * i for o, i in mats))
        return n

    def cost(index, name, kind, params, act, ckpt, fwd, mats, live=None):
        return LayerCost(index=index, name=name, kind=kind, params=params, weight_bytes=params * e,
                         grad_bytes=params * e, optim_bytes=optim_bytes(params, mats), act_bytes=act,
                         act_checkpoint_bytes=ckpt, fwd_flops=fwd, bwd_flops=2 * fwd if kind != "embed" else 0.0,
                         matrices=mats, act_recompute_bytes=act if live is None else live)

    out = [cost(0, "embed", "embed", m.embed_params(), 8 * s * b, 8 * s * b, 0.0, ())]
    mats = m.block_matrices()
    matmul_params = sum(o * i for o, i in mats)
    # Narayanan et al. 2021: 2 FLOPs per multiply-add; attention scores + weighted sum 4*b*s^2*h.
    block_fwd = 2.0 * tokens * matmul_params + 4.0 * b * s * s * h
    attn_act, mlp_act = _block_activation_halves(m, t)
    act, ckpt, live = attn_act + mlp_act, e * s * b * h, attn_act + mlp_act
    if t.checkpoint_halves:
        # Checkpoints: the block's input and the residual between the halves (each half's norm
        # input). Backward recomputes the MLP half while the block input waits, then the attention
        # half: at most one half is alive, plus the other's checkpoint.
        ckpt, live = 2 * e * s * b * h, max(e * s * b * h + mlp_act, attn_act)
    for i in range(m.n_layers):
        out.append(cost(i + 1, f"block{i}", "block", m.block_params(), act, ckpt, block_fwd, mats, live))
    head_mats = ((m.vocab_size, m.hidden),)
    # final-norm input + head input (e each) + logits in e and their fp32 log-softmax for the loss;
    # a chunked loss keeps one chunk's logits and an fp32 log-sum-exp per token instead.
    logit_tokens = min(LOSS_CHUNK_TOKENS, s * b) if t.chunked_loss else s * b
    head_act = 2 * e * s * b * h + (e + 4) * logit_tokens * m.vocab_size + (4 * s * b if t.chunked_loss else 0)
    out.append(cost(m.n_layers + 1, "head", "head", m.head_params(), head_act, e * s * b * h,
                    2.0 * tokens * m.vocab_size * m.hidden, head_mats))
    return out


def grad_hook_bytes(m: ModelSpec, t: TrainSpec) -> int:
    """Device bytes the gradient hook holds beside a layer's backward (TrainSpec.grad_copy_fp64_norm):
    for the block's largest matrix of n elements, its gradient's copy (n x dtype bytes) and one fp64
    chunk of its norm (8 x min(n, FP64_NORM_CHUNK)); the hook handles one gradient at a time."""
    if not t.grad_copy_fp64_norm:
        return 0
    n = max(o * i for o, i in m.block_matrices())
    return n * t.elem_bytes + 8 * min(n, FP64_NORM_CHUNK)


def model_flops_per_step(m: ModelSpec, t: TrainSpec) -> float:
    """Model FLOPs of one optimizer step (forward + backward, no recompute): the MFU convention."""
    return t.grad_accum * sum(c.fwd_flops + c.bwd_flops for c in layer_costs(m, t))


# --- presets and HF configs ------------------------------------------------------------

def _gpt3(name, h, layers, heads):
    # GPT-3 paper (Brown et al. 2020) Table 2.1; vocab 50257, context 2048, ffn 4h, tied embeddings.
    return ModelSpec(name=name, arch="gpt", vocab_size=50257, hidden=h, n_layers=layers, n_heads=heads,
                     n_kv_heads=heads, ffn_hidden=4 * h, max_seq_len=2048, tied_embeddings=True, bias=True)


def _llama2(name, h, layers, heads, kv, ffn):
    # Llama 2 paper / HF config.json: vocab 32000, context 4096, untied head.
    return ModelSpec(name=name, arch="llama", vocab_size=32000, hidden=h, n_layers=layers, n_heads=heads,
                     n_kv_heads=kv, ffn_hidden=ffn, max_seq_len=4096)


MODEL_PRESETS: dict[str, ModelSpec] = {
    "gpt3-1.3b": _gpt3("gpt3-1.3b", 2048, 24, 16),
    "gpt3-2.7b": _gpt3("gpt3-2.7b", 2560, 32, 32),
    "gpt3-6.7b": _gpt3("gpt3-6.7b", 4096, 32, 32),
    "gpt3-13b": _gpt3("gpt3-13b", 5120, 40, 40),
    "gpt3-175b": _gpt3("gpt3-175b", 12288, 96, 96),
    "llama2-7b": _llama2("llama2-7b", 4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2("llama2-13b", 5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2("llama2-70b", 8192, 80, 64, 8, 28672),
    # OPT paper (Zhang et al. 2022) Table 1: 1.3B = 24 layers, 32 heads, d=2048; vocab 50272, ctx 2048.
    "opt-1.3b": ModelSpec(name="opt-1.3b", arch="gpt", vocab_size=50272, hidden=2048, n_layers=24, n_heads=32,
                          n_kv_heads=32, ffn_hidden=8192, max_seq_len=2048, tied_embeddings=True, bias=True),
    # Small shapes the executor really runs on a CPU (byte-level vocabulary).
    "tiny-llama": ModelSpec(name="tiny-llama", arch="llama", vocab_size=256, hidden=64, n_layers=4, n_heads=4,
                            n_kv_heads=2, ffn_hidden=176, max_seq_len=256),
    "small-llama": ModelSpec(name="small-llama", arch="llama", vocab_size=256, hidden=256, n_layers=8, n_heads=8,
                             n_kv_heads=4, ffn_hidden=688, max_seq_len=512),
    "tiny-gpt2": ModelSpec(name="tiny-gpt2", arch="gpt", vocab_size=256, hidden=64, n_layers=4, n_heads=4,
                           n_kv_heads=4, ffn_hidden=256, max_seq_len=256, bias=True),
    "small-gpt2": ModelSpec(name="small-gpt2", arch="gpt", vocab_size=256, hidden=256, n_layers=8, n_heads=8,
                            n_kv_heads=8, ffn_hidden=1024, max_seq_len=512, bias=True),
}


def _int(cfg: dict, *keys: str, default=None, where: str = "config.json") -> int:
    for k in keys:
        if cfg.get(k) is not None:
            v = cfg[k]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"{where}: {k} must be a positive integer, got {v!r}")
            return v
    if default is not None:
        return default
    raise InputError(f"{where}: missing {' or '.join(keys)}")


def model_from_hf_config(cfg: dict, name: str = "hf-model", where: str = "config.json") -> ModelSpec:
    """Llama-family (llama, mistral, qwen2), GPT-2, GPT-NeoX and OPT configs."""
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: expected a JSON object")
    mt = cfg.get("model_type")
    if mt in ("llama", "mistral", "qwen2"):
        heads = _int(cfg, "num_attention_heads", where=where)
        return ModelSpec(name=name, arch="llama", vocab_size=_int(cfg, "vocab_size", where=where),
                         hidden=_int(cfg, "hidden_size", where=where),
                         n_layers=_int(cfg, "num_hidden_layers", where=where), n_heads=heads,
                         n_kv_heads=_int(cfg, "num_key_value_heads", default=heads, where=where),
                         ffn_hidden=_int(cfg, "intermediate_size", where=where),
                         max_seq_len=_int(cfg, "max_position_embeddings", default=4096, where=where),
                         tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         bias=bool(cfg.get("attention_bias", False)))
    if mt == "gpt2":
        h = _int(cfg, "n_embd", "hidden_size", where=where)
        heads = _int(cfg, "n_head", "num_attention_heads", where=where)
        return ModelSpec(name=name, arch="gpt", vocab_size=_int(cfg, "vocab_size", where=where), hidden=h,
                         n_layers=_int(cfg, "n_layer", "num_hidden_layers", where=where), n_heads=heads,
                         n_kv_heads=heads, ffn_hidden=_int(cfg, "n_inner", default=4 * h, where=where),
                         max_seq_len=_int(cfg, "n_positions", default=1024, where=where),
                         tied_embeddings=bool(cfg.get("tie_word_embeddings", True)), bias=True)
    if mt in ("gpt_neox", "opt"):
        heads = _int(cfg, "num_attention_heads", where=where)
        return ModelSpec(name=name, arch="gpt", vocab_size=_int(cfg, "vocab_size", where=where),
                         hidden=_int(cfg, "hidden_size", where=where),
                         n_layers=_int(cfg, "num_hidden_layers", where=where), n_heads=heads, n_kv_heads=heads,
                         ffn_hidden=_int(cfg, "intermediate_size", "ffn_dim", where=where),
                         max_seq_len=_int(cfg, "max_position_embeddings", default=2048, where=where),
                         tied_embeddings=bool(cfg.get("tie_word_embeddings", mt == "opt")), bias=True)
    raise InputError(f"{where}: unsupported model_type {mt!r} (llama, mistral, qwen2, gpt2, gpt_neox, opt)")


def load_model(name_or_path: str) -> ModelSpec:
    """A preset name, a directory holding config.json, or a config.json path."""
    if name_or_path in MODEL_PRESETS:
        return MODEL_PRESETS[name_or_path]
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise InputError(f"model config not found: {p}")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"malformed {p}: {exc}") from None
        return model_from_hf_config(cfg, name=p.parent.name or "hf-model", where=str(p))
    raise InputError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODEL_PRESETS)}) nor a directory with config.json")


def default_train(model: ModelSpec) -> TrainSpec:
    """Defaults a user of the field would pick: bf16, AdamW, the model's context up to 2048."""
    return TrainSpec(batch=1, seq_len=min(2048, model.max_seq_len), dtype="bf16", optimizer="adamw")
