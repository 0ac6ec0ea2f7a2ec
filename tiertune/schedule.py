"""The decision vocabulary: a `Plan` is one `LayerPlan` per layer plus global settings.

Every part speaks it: policies and the CP-SAT planner write Plans, the simulator and the
executor read them. JSON format `tiertune.plan/1`; loading validates every field and names
the bad one. (Imports only `workload.TrainSpec`, the training settings a plan is made for.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from tiertune.errors import InputError
from tiertune.fileio import atomic_write_text
from tiertune.vocab import TIERS
from tiertune.workload import TrainSpec

FORMAT = "tiertune.plan/1"
UPDATES = ("after", "overlap", "fused")
ACTIVATIONS = ("keep", "cpu", "ssd", "recompute")


@dataclass(frozen=True)
class LayerPlan:
    """Where one layer's state lives and how it is trained.

    params:      home of the compute-dtype weights (streamed to the GPU for compute when not `gpu`).
    optimizer:   home of fp32 master weights + moments, and where the update runs
                 (`ssd`: SSD-resident, streamed through host memory and updated by the CPU).
    update:      `after` the whole backward (ZeRO) | `overlap` layer by layer during backward
                 (Fuyou, LSP-Offload) | `fused` into the backward hook, gradient freed at once (LOMO).
    activations: what happens to tensors saved for backward: `keep` on GPU | offload to `cpu` |
                 `ssd` | `recompute` from the layer input.
    grad_rank:   None sends the full gradient; d sends the LSP projection P^T G Q (d x d per matrix).
    """

    params: str = "gpu"
    optimizer: str = "gpu"
    update: str = "after"
    activations: str = "keep"
    grad_rank: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("params", TIERS), ("optimizer", TIERS), ("update", UPDATES),
                              ("activations", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        r = self.grad_rank
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0):
            raise InputError(f"grad_rank must be a positive integer or null, got {r!r}")
        if r is not None and self.optimizer == "gpu":
            raise InputError("grad_rank compresses what crosses PCIe to a CPU/SSD optimizer; it needs optimizer cpu or ssd")

    @property
    def lossless(self) -> bool:
        return self.grad_rank is None

    @property
    def optimizer_beside_weights(self) -> bool:
        """The optimizer updates the weights where they live (host memory or the device), so fp32
        weights need no separate master; on the SSD the update streams both through host memory."""
        return self.optimizer == self.params and self.params != "ssd"

    def replace(self, **changes) -> "LayerPlan":
        return replace(self, **changes)


def sliceable(i: int, n_layers: int, lp: LayerPlan) -> bool:
    """Whether layer i runs in `PlanGlobals.activation_slices` slices under lp: a block (not the
    embedding, not the head) whose activations move or are recomputed, and not `fused` (LOMO
    updates inside the backward hook, which must see the whole gradient)."""
    return 0 < i < n_layers - 1 and lp.activations != "keep" and lp.update != "fused"


@dataclass(frozen=True)
class PlanGlobals:
    """Plan-wide settings. LSP defaults follow LSP-Offload's code/paper (arXiv 2406.10181, github.com/gulang2019/LSP-Offload)."""

    prefetch_depth: int = 1          # layers fetched ahead of use (1 = double buffering)
    iterations: int = 3              # iterations the simulator runs; steady state is measured after the first
    gpu_mem_bytes: int | None = None # budget the plan was made for (None: the hardware's)
    lsp_nnz_per_row: int = 4         # r: non-zeros per projector row (LSP: r = 4 at 1.3B, 8 at 6.7B)
    lsp_check_every: int = 100       # CheckFreq: steps between projector error checks
    lsp_refit_threshold: float = 0.2 # alpha: refit when relative reconstruction error exceeds it
    lsp_fit_samples: int = 128       # gradients sampled for a (re)fit
    max_compression_error: float | None = None   # a cap the planner honours when choosing grad_rank
    # DeepSpeed's activation_checkpointing.cpu_checkpointing: recomputed layers keep their input
    # checkpoint in host memory (copied out after forward, back before the recompute)
    cpu_checkpointing: bool = False
    # A block whose saved activations move (`cpu`, `ssd`) or are recomputed runs its forward and
    # backward in this many slices of the micro-batch (along the batch dimension): each slice's
    # saved tensors are offloaded after its own forward and fetched back (or recomputed) for its
    # own backward, so the layer's activations are never on the device at once and their copies
    # overlap the layer's own compute. 1: they move as one block. A `fused` layer (LOMO) updates
    # inside its backward hook and so runs whole; so do the embedding and the head.
    activation_slices: int = 1
    # The host optimizer's step runs on the training thread, which issues no GPU work meanwhile
    # (a seed's released training loop, not a choice of ours: DeepSpeed's engine.step() between
    # backward and the next forward; LSP-Offload's para_offload_modules.py, whose module hooks run
    # the CPU Adam). An `overlap` update finishes before the next layer's backward starts; `after`
    # updates all finish, weights home, before the next step's forward; optimizer state on the SSD
    # is read only once the previous update's state is written back (DeepSpeed's
    # PartitionedOptimizerSwapper without pipeline_read/pipeline_write). Policies set it only when
    # asked to reproduce such a loop; the executor runs host updates on its worker either way.
    host_update_inline: bool = False

    def __post_init__(self) -> None:
        for f in ("prefetch_depth", "iterations", "lsp_nnz_per_row", "lsp_check_every", "lsp_fit_samples",
                  "activation_slices"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "prefetch_depth" else 1):
                raise InputError(f"global.{f} must be a {'non-negative' if f == 'prefetch_depth' else 'positive'} integer, got {v!r}")
        if self.gpu_mem_bytes is not None and (not isinstance(self.gpu_mem_bytes, int) or self.gpu_mem_bytes <= 0):
            raise InputError(f"global.gpu_mem_bytes must be a positive integer or null, got {self.gpu_mem_bytes!r}")
        if not isinstance(self.lsp_refit_threshold, (int, float)) or self.lsp_refit_threshold <= 0:
            raise InputError(f"global.lsp_refit_threshold must be positive, got {self.lsp_refit_threshold!r}")
        for f in ("cpu_checkpointing", "host_update_inline"):
            if not isinstance(getattr(self, f), bool):
                raise InputError(f"global.{f} must be true or false, got {getattr(self, f)!r}")
        cap = self.max_compression_error
        if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not 0 < cap <= 1):
            raise InputError(f"global.max_compression_error must be in (0, 1] or null, got {cap!r}")


@dataclass(frozen=True)
class Plan:
    model: str
    hardware: str
    train: TrainSpec
    layers: tuple[LayerPlan, ...]
    globals: PlanGlobals = field(default_factory=PlanGlobals)
    provenance: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InputError("plan has no layers")
        object.__setattr__(self, "layers", tuple(self.layers))
        fused_or_overlap = {lp.update for lp in self.layers} & {"fused"}
        s = self.globals.activation_slices
        if self.train.batch % s:
            raise InputError(f"global.activation_slices ({s}) must divide the micro-batch (train.batch = {self.train.batch})")
        if fused_or_overlap and self.train.grad_accum > 1:
            i = next(i for i, lp in enumerate(self.layers) if lp.update == "fused")
            raise InputError(f"layers[{i}].update: 'fused' frees each gradient in the backward hook, so it cannot "
                             f"accumulate gradients over {self.train.grad_accum} micro-batches (LOMO#4); use 'after' or 'overlap'")

    # --- what follows from the decisions ----------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def lossless(self) -> bool:
        return all(lp.lossless for lp in self.layers)

    @property
    def needs_second_backward(self) -> bool:
        """LOMO: clipping with updates inside backward needs the norm first, i.e. a second backward pass."""
        return self.train.grad_clip is not None and any(lp.update in ("fused", "overlap") for lp in self.layers)

    def slices(self, i: int) -> int:
        """How many slices of the micro-batch layer i's forward and backward run in (see
        `PlanGlobals.activation_slices`): blocks only, whose activations move or are recomputed,
        and not `fused`."""
        return self.globals.activation_slices if sliceable(i, self.n_layers, self.layers[i]) else 1

    def notes(self) -> list[str]:
        out = []
        if self.needs_second_backward:
            out.append("grad_clip with fused/overlap updates: the gradient norm needs a first backward pass, "
                       "so every step runs backward twice (LOMO); the simulator and executor both do so")
        return out

    def check_model(self, n_model_layers: int, model_name: str | None = None) -> None:
        """The plan must have one LayerPlan per model layer (embed + blocks + head)."""
        if model_name is not None and self.model != model_name:
            raise InputError(f"plan is for model {self.model!r}, not {model_name!r}")
        if self.n_layers != n_model_layers:
            raise InputError(f"plan has {self.n_layers} layers but model {model_name or self.model!r} has "
                             f"{n_model_layers} (embed + blocks + head)")

    def replace(self, **changes) -> "Plan":
        return replace(self, **changes)

    def with_layers(self, layers) -> "Plan":
        return replace(self, layers=tuple(layers))

    # --- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "hardware": self.hardware, "train": self.train.to_dict(),
                "global": asdict(self.globals), "layers": [asdict(lp) for lp in self.layers],
                "provenance": self.provenance}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise InputError("plan must be a JSON object")
        if d.get("format") != FORMAT:
            raise InputError(f"plan format must be {FORMAT!r}, got {d.get('format')!r}")
        for key in ("model", "hardware", "train", "layers"):
            if key not in d:
                raise InputError(f"plan is missing {key!r}")
        unknown = set(d) - {"format", "model", "hardware", "train", "global", "layers", "provenance"}
        if unknown:
            raise InputError(f"plan has unknown field(s) {sorted(unknown)}")
        train = _build(TrainSpec, d["train"], "train")
        glob = _build(PlanGlobals, d.get("global", {}), "global")
        if not isinstance(d["layers"], list):
            raise InputError("plan.layers must be a list")
        layers = tuple(_build(LayerPlan, lp, f"layers[{i}]") for i, lp in enumerate(d["layers"]))
        prov = d.get("provenance", {})
        if not isinstance(prov, dict):
            raise InputError("plan.provenance must be an object")
        return cls(model=str(d["model"]), hardware=str(d["hardware"]), train=train, layers=layers,
                   globals=glob, provenance=prov)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed plan JSON: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"plan file not found: {p}")
        try:
            return cls.from_json(p.read_text())
        except UnicodeDecodeError:
            raise InputError(f"plan file {p} is not UTF-8 text") from None


def _build(cls, d, where: str):
    if not isinstance(d, dict):
        raise InputError(f"{where} must be an object")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise InputError(f"{where}: unknown field(s) {sorted(unknown)}")
    try:
        return cls(**d)
    except InputError as exc:
        raise InputError(f"{where}.{exc}" if str(exc).split(" ")[0] in known else f"{where}: {exc}") from None
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


def uniform_plan(model: str, hardware: str, train: TrainSpec, n_layers: int, layer: LayerPlan,
                 globals: PlanGlobals | None = None, provenance: dict | None = None) -> Plan:
    """Every layer the same decisions: the shape most baselines take."""
    return Plan(model=model, hardware=hardware, train=train, layers=(layer,) * n_layers,
                globals=globals or PlanGlobals(), provenance=provenance or {})


def steady_iteration_s(ends: list[float]) -> float:
    """The steady-state iteration time from when each of k simulated or executed iterations ended:
    the mean gap between consecutive ends, without the last one. The last iteration drains: no
    next forward competes with its late updates and copies, so it ends early (gpt3-1.3b on the
    A1000 laptop: every gap 1.734 s, the last 1.645 s, which made a plan look faster than its GPU
    work). With two iterations, their gap is all there is; with one, its length."""
    k = len(ends)
    if k == 1:
        return ends[0]
    last = k - 2 if k > 2 else k - 1
    return (ends[last] - ends[0]) / last
