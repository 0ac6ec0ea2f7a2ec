"""Optimizer math of one parameter: AdamW, SGD, AdaLomo, wherever the state lives.

The executor updates parameter by parameter (LOMO's hooks need exactly that), on whichever tier
the plan puts the optimizer, so the step is a plain function of (master weight, gradient, state)
rather than a torch.optim.Optimizer bound to parameters. AdamW and SGD follow
torch.optim.AdamW / torch.optim.SGD defaults operation by operation (their single-tensor code
path), so a lossless plan trains like a plain torch loop; tests check it against torch.optim.

AdaLomo (Lv et al., arXiv 2310.10195; code github.com/OpenLMLab/LOMO): Adafactor-style factored second moment (row and column
means of g^2 for matrices, a full moment for vectors), update clipped by its RMS
(clip_threshold 1.0), decay rate -0.8, step scaled by max(eps2, RMS(param)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from tiertune.errors import InputError
from tiertune.executor.lr_schedule import SCHEDULES, lr_factor

ADALOMO_EPS = (1e-30, 1e-3)
ADALOMO_CLIP = 1.0
ADALOMO_DECAY = -0.8


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"          # adamw | sgd | adalomo
    lr: float = 1e-3             # torch.optim.AdamW default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01   # torch.optim.AdamW default; SGD and AdaLomo default to 0
    momentum: float = 0.0        # SGD: LOMO is momentum-free
    schedule: str = "constant"   # lr schedule after warm-up: constant | linear | cosine (decay to 0)
    warmup_steps: int = 0        # linear warm-up from 0
    total_steps: int | None = None   # where linear / cosine reach 0 (train_plan: the run's last step)
    decay_vectors: bool = True   # decay 1-D parameters too; False: the usual no-decay group (norms, biases)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"lr schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def decay(self) -> float:
        return self.weight_decay if self.name == "adamw" else 0.0

    def lr_factor(self, step_no: int) -> float:
        """The lr multiplier of optimizer step `step_no` (1-based), see lr_schedule.py."""
        return lr_factor(self.schedule, self.warmup_steps, self.total_steps, step_no)

    def for_param(self, step_no: int, shape: torch.Size) -> "OptimConfig":
        """This config as parameter `shape` uses it at step `step_no`: the scheduled lr, and no weight
        decay on vectors when they are in the no-decay group."""
        lr = self.lr * self.lr_factor(step_no)
        wd = self.weight_decay if self.decay_vectors or len(shape) >= 2 else 0.0
        if lr == self.lr and wd == self.weight_decay:
            return self
        return replace(self, lr=lr, weight_decay=wd)

    def to_state(self) -> dict:
        """Every field, for a checkpoint (`from_dict` reads it back)."""
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: dict) -> "OptimConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if k == "betas" else v for k, v in d.items() if k in known}
        return cls(**kw)

    def to_dict(self) -> dict:
        """What a run reports: the settings actually used."""
        out = {"optimizer": self.name, "lr": self.lr, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
               "total_steps": self.total_steps}
        if self.name == "adamw":
            out.update(betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay,
                       no_decay="none" if self.decay_vectors else "1-D parameters (norms, biases)")
        elif self.name == "adalomo":
            out.update(note="AdaLomo (LOMO's adaptive optimizer): factored second moment, update clipped by RMS",
                       weight_decay=self.weight_decay)
        else:
            out.update(momentum=self.momentum)
        return out


def state_shapes(cfg: OptimConfig, shape: torch.Size) -> dict[str, tuple[int, ...]]:
    """fp32 state tensors one parameter of `shape` needs (besides its master weight)."""
    if cfg.name == "adamw":
        return {"exp_avg": tuple(shape), "exp_avg_sq": tuple(shape)}
    if cfg.name == "adalomo":
        if len(shape) >= 2:
            return {"row": tuple(shape[:-1]), "col": tuple(shape[:-2]) + (shape[-1],)}
        return {"sq": tuple(shape)}
    return {}


def step(cfg: OptimConfig, step_no: int, master: torch.Tensor, grad: torch.Tensor,
         state: dict[str, torch.Tensor]) -> None:
    """Update `master` (fp32, in place) with `grad` at optimizer step `step_no` (1-based)."""
    g = grad if grad.dtype == master.dtype else grad.to(master.dtype)
    if cfg.name == "adamw":
        _adamw(cfg, step_no, master, g, state["exp_avg"], state["exp_avg_sq"])
    elif cfg.name == "sgd":
        master.add_(g, alpha=-cfg.lr)
    elif cfg.name == "adalomo":
        _adalomo(cfg, step_no, master, g, state)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")


def _adamw(cfg: OptimConfig, t: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    # torch/optim/adamw.py (_single_tensor_adam with decoupled weight decay), same operation order.
    beta1, beta2 = cfg.betas
    p.mul_(1 - cfg.lr * cfg.weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = cfg.lr / bias_correction1
    denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(cfg.eps)
    p.addcdiv_(m, denom, value=-step_size)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / math.sqrt(x.numel())


def _adalomo(cfg: OptimConfig, t: int, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    beta2t = 1.0 - math.pow(t, ADALOMO_DECAY)
    sq = g * g + ADALOMO_EPS[0]
    if "row" in state:
        row, col = state["row"], state["col"]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
        # Adafactor's rank-1 estimate of 1/sqrt(v): rsqrt(row / mean(row)) x rsqrt(col)
        r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c = col.unsqueeze(-2).rsqrt()
        u = r * c * g
    else:
        state["sq"].mul_(beta2t).add_(sq, alpha=1 - beta2t)
        u = state["sq"].rsqrt() * g
    u.div_((_rms(u) / ADALOMO_CLIP).clamp_(min=1.0))
    scale = max(ADALOMO_EPS[1], float(_rms(p)))
    if cfg.weight_decay:
        p.mul_(1 - cfg.lr * cfg.weight_decay)
    p.add_(u, alpha=-cfg.lr * scale)


def state_bytes(cfg: OptimConfig, shape: torch.Size) -> int:
    return 4 * sum(math.prod(s) for s in state_shapes(cfg, shape).values())
