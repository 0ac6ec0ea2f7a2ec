"""One layer's runtime state in the executor: its parameters as one flat tensor, where that tensor
and its optimizer state live, and the copies and updates in flight.

Every field the executor, the tier stores (tiers.py) and the update strategies (strategies.py)
touch is declared here, so a layer's state can be read in one place.

Tied embeddings: the head owns the tied matrix (as `ModelSpec.head_params` counts it) and the
embed layer borrows it: the embed module's parameter *is* the head's parameter object, so it is
left out of the embed layer's own list here, and `borrows` names the head. Both layers'
backward passes accumulate into that one parameter's `.grad`; the head's gradient is handed to
its optimizer only after the embed layer's backward, so it is summed once.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import torch.nn as nn

from tiertune.errors import InputError
from tiertune.executor.compress import LayerCompression


class LayerState:
    """Layer `i` (`name`, `module`, plan `lp`) with the parameters no earlier-built layer owns."""

    def __init__(self, i: int, name: str, module: nn.Module, lp, dtype: torch.dtype,
                 owned_elsewhere: dict[int, int] | None = None):
        self.i, self.name, self.module, self.lp = i, name, module, lp
        owned_elsewhere = owned_elsewhere or {}
        named = list(module.named_parameters())
        # a parameter another layer owns (a tied matrix): used here, trained there
        self.borrows: int | None = next((owned_elsewhere[id(p)] for _, p in named if id(p) in owned_elsewhere), None)
        named = [(n, p) for n, p in named if id(p) not in owned_elsewhere]
        if not named and self.borrows is None:
            raise InputError(f"layer {name} has no parameters")
        self.pnames = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self.wbytes = off * torch.tensor([], dtype=dtype).element_size()
        self.lent_to: int | None = None           # the layer that borrows some of these parameters
        self.lent: set[int] = set()               # which (indices into params)
        # weights
        self.home: torch.Tensor | None = None     # compute-dtype flat weights at home (device or host)
        self.dev: torch.Tensor | None = None      # flat weights on the device while materialised
        self.fetching: torch.Tensor | None = None
        self.fetch: Future | None = None
        self.stage: torch.Tensor | None = None    # host staging buffer of an SSD weight read
        # optimizer state and updates
        self.opt: dict[str, torch.Tensor] | None = None   # "master" + "<k>.<state>" (None when on SSD)
        self.opt_bytes = 0                        # bytes of that state, wherever it lives
        self.opt_read: Future | None = None       # an SSD read of it under way
        self.shared_master = False                # fp32 weights at home are the master (same tier)
        self.pending = None                       # futures until its last update is home
        self.grad_futs: list[Future] = []
        self.ghost: torch.Tensor | None = None    # host fp32 gradient accumulator
        self.gacc: list[torch.Tensor | None] | None = None   # device gradients (device optimizer, LSP)
        # LSP-Offload (grad_rank set): projectors on the device, subspace AdamW on the CPU
        self.lsp: LayerCompression | None = None
        self.lsp_host: dict[str, torch.Tensor] | None = None   # host copies of S until the CPU step
        self.lsp_dev: dict[str, torch.Tensor] | None = None    # device buffers the update lands in
        self.lsp_norms: list[torch.Tensor] | None = None       # full-gradient norms (for clipping)
        self.lsp_apply: tuple[dict, int] | None = None         # (update buffers, iteration) to apply
        self.lsp_sample_bytes = 0                               # device bytes of gradients kept for refits

    def view(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        o = self.offsets[k]
        return flat[o:o + self.shapes[k].numel()].view(self.shapes[k])

    def bind(self, flat: torch.Tensor | None, empty: torch.Tensor) -> None:
        """Point the module's parameters at views of `flat` (or at nothing)."""
        for k, p in enumerate(self.params):
            p.data = self.view(flat, k) if flat is not None else empty

    def master(self, opt: dict, k: int) -> torch.Tensor:
        """Parameter k's fp32 master weight (the weights at home when they are the master)."""
        return self.view(self.home if self.shared_master else opt["master"], k)

    def flat(self) -> torch.Tensor | None:
        """The weights the device computes with now (resident or fetched)."""
        return self.home if self.lp.params == "gpu" else self.dev


def build_layers(modules: list[nn.Module], names: list[str], plans: list, dtype: torch.dtype) -> list[LayerState]:
    """LayerStates in model order, a tied parameter owned by the last layer that uses it (the head)."""
    owner: dict[int, int] = {}
    for i in reversed(range(len(modules))):
        for p in modules[i].parameters():
            owner.setdefault(id(p), i)
    layers = []
    for i, (m, n, lp) in enumerate(zip(modules, names, plans)):
        elsewhere = {pid: j for pid, j in owner.items() if j != i}
        layers.append(LayerState(i, n, m, lp, dtype, elsewhere))
    for L in layers:
        if L.borrows is not None:
            if L.borrows < L.i:
                raise InputError(f"layer {L.name} uses a parameter of an earlier layer; only the head may share "
                                 f"with the embedding")
            owner = layers[L.borrows]
            owner.lent_to = L.i
            used = {id(p) for p in L.module.parameters()}
            owner.lent = {k for k, p in enumerate(owner.params) if id(p) in used}
    return layers
