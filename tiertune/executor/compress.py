"""Learned sparse subspace compression of weight gradients, LSP-Offload style.

LSP-Offload (Gu et al., arXiv 2406.10181; code: github.com/gulang2019/LSP-Offload) keeps the
optimizer on the CPU but sends far fewer bytes over PCIe than ZeRO-Offload: for a weight matrix
W (m x n) with gradient G, the GPU sends only the d x d matrix S = P^T G Q, the CPU runs Adam on S
(its moments are d x d), and the d x d update U comes back; the GPU applies W <- W + P U Q^T.
P (m x d) and Q (n x d) are (d, r)-sparse: r non-zeros per row, at random positions, initialised to
+-1/sqrt(r) (the code's "binary" count-sketch init). They are *learned*: every `check_every` steps the
relative reconstruction error ||P P^T G Q Q^T - G||_F / ||G||_F is measured, and when it exceeds a
threshold (code default 0.2) the non-zero values are refit with AdamW on sampled gradients, the
sparsity pattern kept. The Adam moments are then carried into the new subspace.

This module is the algorithm, device-agnostic (the executor runtime moves the tensors):

    MatrixCompressor   the projector pair of one matrix shape: compress / decompress / fit
    SubspaceAdamW      Adam(W) state of one tensor in its subspace (plain Adam for vectors)
    LayerCompression   every parameter of one layer, per the plan's lsp_* globals
    error_for_rank     cheap estimate of the compression error at a rank, for the planner
    compressed_numel   elements that cross PCIe per matrix at a rank

Per training step the executor calls, for each compressed layer:

    stats = lc.observe(step, grads)      # device: sample, check error, maybe refit + re-project moments
    small = lc.compress_grads(grads)     # device: P^T G Q per matrix; vectors pass through
    ...  D2H copy of `small`  ...
    upd = lc.cpu_step(small)             # CPU: Adam in the subspace, updates already scaled by -lr
    ...  H2D copy of `upd`  ...
    lc.apply(params, upd)                # device: decoupled weight decay on the full W, then W += P U Q^T

Choices this module makes (LSP's paper/code leave them open or we generalise):
- Ranks at or above a side's dimension: a side with d >= m (resp. n) uses the identity, so the
  compressed matrix is min(d, m) x min(d, n) and never larger than G; with d >= max(m, n) the update
  is exactly uncompressed AdamW (tested). Identity sides have one non-zero per row and are not fit.
- Learning rate: folded into the CPU-side update (U = -lr * m_hat / (sqrt(v_hat) + eps)), so the
  device only adds P U Q^T. Decoupled weight decay is applied on the device to the full W
  (W *= 1 - lr * wd), the same order as torch.optim.AdamW, because the weights never leave the GPU.
- Moment re-projection on refit: M_new = P_new^T (P_old^+)^T M_old Q_old^+ Q_new, i.e. compress with
  the new projectors the minimum-norm full-space average consistent with M_old (P^+ = pseudoinverse).
  It equals LSP's P_new^T P_old M Q_old^T Q_new when the old projectors have orthonormal columns, and
  leaves M unchanged when new == old (LSP's formula would not: P^T P != I for a count sketch).
  The second moment maps through the squared entries of the same operators, (A*A) V (B*B), as LSP's
  code does: it is the variance of A S B if the entries of S were independent with variance V, and
  is non-negative by construction (no clamping needed).
- Projector sharing: by default matrices of the same shape within one layer share a compressor
  (LSP shares per (shape, param group)); its refit re-projects the moments of all of them.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import deque

import torch
from torch import Tensor


def compressed_numel(m: int, n: int, rank: int) -> int:
    """Elements of the compressed gradient (and of its CPU moments) for an m x n matrix at rank d."""
    return min(rank, m) * min(rank, n)


# A (d, r)-sparse projector X (k x d) is kept as idx (k x r: the column of each non-zero) and val (k x r),
# the source of truth the fit optimises, plus CSR copies for the products, as LSP-Offload's sparse
# kernel: 2 m n r multiply-adds per product instead of a dense matmul's 2 m n d. Measured on one CPU
# thread (torch's CSR x dense, MKL), S = P^T G Q and P U Q^T at d = 128, r = 4: 0.41 against 1.1 ms
# (688 x 256), 0.26 against 0.6 ms (256 x 256), 0.6-0.7 against 1.1-1.2 ms (256 x 688); at
# tiny-llama's 64 x 176, d = 32 both take 20-40 us. The fit differentiates through dense copies
# built from the values (it runs at refits only).

def _dense(idx: Tensor, val: Tensor, d: int) -> Tensor:
    """The k x d matrix with val at (row, idx); differentiable in val."""
    return torch.zeros(idx.shape[0], d, dtype=val.dtype, device=val.device).scatter(1, idx, val)


# --- one projector pair ------------------------------------------------------------------------------

class MatrixCompressor:
    """(d, r)-sparse projectors P (m x d) and Q (n x d) for m x n gradients; S = P^T G Q."""

    def __init__(self, m: int, n: int, rank: int, nnz_per_row: int, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if m <= 0 or n <= 0 or rank <= 0 or nnz_per_row <= 0:
            raise ValueError(f"m, n, rank, nnz_per_row must be positive, got {(m, n, rank, nnz_per_row)}")
        self.m, self.n, self.rank = m, n, rank
        self.nnz_per_row = nnz_per_row
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        gen = torch.Generator().manual_seed(seed)
        self.p_idx, self.p_val, self.left_identity = self._init_side(m, rank, nnz_per_row, gen)
        self.q_idx, self.q_val, self.right_identity = self._init_side(n, rank, nnz_per_row, gen)
        self._refresh()

    def _init_side(self, k: int, d: int, r: int, gen: torch.Generator) -> tuple[Tensor, Tensor, bool]:
        if d >= k:
            # A rank that reaches the dimension gains nothing from a sketch: use the exact identity.
            idx = torch.arange(k).unsqueeze(1)
            val = torch.ones(k, 1, dtype=self.dtype)
            return idx.to(self.device), val.to(self.device), True
        r = min(r, d)
        # r distinct random columns per row (LSP: multinomial without replacement), random signs.
        idx = torch.rand(k, d, generator=gen).argsort(dim=1)[:, :r].contiguous()
        sign = torch.randint(0, 2, (k, r), generator=gen).to(self.dtype) * 2 - 1
        val = sign / math.sqrt(r)
        return idx.to(self.device), val.to(self.device), False

    @classmethod
    def identity(cls, m: int, n: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> "MatrixCompressor":
        """P = I_m, Q = I_n: lossless, the compressed gradient is G itself (for exactness tests)."""
        return cls(m, n, rank=max(m, n), nnz_per_row=1, device=device, dtype=dtype)

    # shapes and dense views
    @property
    def d_left(self) -> int:
        return min(self.rank, self.m)

    @property
    def d_right(self) -> int:
        return min(self.rank, self.n)

    @property
    def small_shape(self) -> tuple[int, int]:
        return (self.d_left, self.d_right)

    @property
    def lossless(self) -> bool:
        return self.left_identity and self.right_identity

    @property
    def P(self) -> Tensor:
        """Dense m x d_left projector (zeros off the pattern)."""
        return _dense(self.p_idx, self.p_val, self.d_left)

    @property
    def Q(self) -> Tensor:
        """Dense n x d_right projector (zeros off the pattern)."""
        return _dense(self.q_idx, self.q_val, self.d_right)

    @property
    def P_mask(self) -> Tensor:
        return _dense(self.p_idx, torch.ones_like(self.p_val), self.d_left).bool()

    @property
    def Q_mask(self) -> Tensor:
        return _dense(self.q_idx, torch.ones_like(self.q_val), self.d_right).bool()

    def _refresh(self) -> None:
        """Rebuild the CSR copies after the values change: P^T and Q^T (compress), P and Q
        (decompress); identity sides are never multiplied."""
        self._sparse = {}
        for name, idx, val, d, identity in (("P", self.p_idx, self.p_val, self.d_left, self.left_identity),
                                            ("Q", self.q_idx, self.q_val, self.d_right, self.right_identity)):
            if not identity:
                x = _dense(idx, val, d)
                with warnings.catch_warnings():     # torch calls its CSR support beta; we use only SpMM
                    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
                    self._sparse[name] = x.to_sparse_csr()
                    self._sparse[name + "T"] = x.T.contiguous().to_sparse_csr()

    def sparse_tensors(self) -> list[Tensor]:
        """The tensors the CSR copies hold (for device byte counts)."""
        return [t for x in self._sparse.values() for t in (x.crow_indices(), x.col_indices(), x.values())]

    def clone(self) -> "MatrixCompressor":
        new = copy.copy(self)            # (torch cannot deepcopy CSR tensors: rebuilt from the values)
        for name in ("p_idx", "p_val", "q_idx", "q_val"):
            setattr(new, name, getattr(self, name).clone())
        new._refresh()
        return new

    def to(self, device: torch.device | str) -> "MatrixCompressor":
        self.device = torch.device(device)
        for name in ("p_idx", "p_val", "q_idx", "q_val"):
            setattr(self, name, getattr(self, name).to(self.device))
        self._refresh()
        return self

    # the two products, given dense projectors (the fit differentiates through them)
    def _compress(self, g: Tensor, p: Tensor, q: Tensor) -> Tensor:
        if self.lossless:
            return g.clone()
        if self.left_identity:
            return g @ q
        if self.right_identity:
            return p.T @ g
        # contract the larger side of G first: (P^T G) Q costs m n d + n d^2, P^T (G Q) m n d + m d^2
        return (p.T @ g) @ q if self.n <= self.m else p.T @ (g @ q)

    def _decompress(self, s: Tensor, p: Tensor, q: Tensor) -> Tensor:
        if self.lossless:
            return s.clone()
        if self.left_identity:
            return s @ q.T
        if self.right_identity:
            return p @ s
        return (p @ s) @ q.T if self.n >= self.m else p @ (s @ q.T)

    @torch.no_grad()
    def compress(self, grad: Tensor) -> Tensor:
        """S = P^T G Q (d x d) in the compressor's dtype, with the sparse projectors."""
        g = grad.to(self.dtype)
        if self.lossless:
            return g.clone()
        x = g if self.left_identity else self._sparse["PT"] @ g              # P^T G, d x n
        return x if self.right_identity else (self._sparse["QT"] @ x.T).T.contiguous()   # (Q^T (P^T G)^T)^T

    @torch.no_grad()
    def decompress(self, small: Tensor) -> Tensor:
        """P S Q^T (m x n), with the sparse projectors."""
        s = small.to(self.dtype)
        if self.lossless:
            return s.clone()
        y = s if self.right_identity else (self._sparse["Q"] @ s.T).T       # S Q^T = (Q S^T)^T, d x n
        return y.contiguous() if self.left_identity else self._sparse["P"] @ y

    @torch.no_grad()
    def add_decompressed(self, w: Tensor, small: Tensor, decay: float = 1.0) -> None:
        """w = decay * w + P S Q^T in place: when w is in the compressor's dtype, one sparse product
        (addmm_) scales w and accumulates P (S Q^T) into it in a single pass, with no m x n
        temporary to write and read back and no separate pass for the weight decay."""
        if w.dtype != self.dtype or self.lossless or self.left_identity:
            if decay != 1.0:
                w.mul_(decay)
            w.add_(self.decompress(small).to(device=w.device, dtype=w.dtype))
            return
        s = small.to(self.dtype)
        y = s if self.right_identity else (self._sparse["Q"] @ s.T).T        # S Q^T, d x n
        w.addmm_(self._sparse["P"], y, beta=decay)

    @torch.no_grad()
    def relative_error(self, grad: Tensor) -> float:
        """||P P^T G Q Q^T - G||_F / ||G||_F (0 for a zero gradient)."""
        g = grad.to(self.dtype)
        norm = torch.linalg.vector_norm(g).item()
        if norm == 0.0:
            return 0.0
        return torch.linalg.vector_norm(self.decompress(self.compress(g)) - g).item() / norm

    def fit(self, grads: list[Tensor], steps: int = 200, lr: float = 1e-2, beta: float = 0.0) -> float:
        """Learn the non-zero values on sample gradients; returns the mean relative error after.

        Minimises mean_i ||P P^T G_i Q Q^T - G_i||_F / ||G_i||_F + beta (||P||_F + ||Q||_F) with AdamW
        over the non-zeros only (the sparsity pattern is kept). Keeps the best values seen, so the
        error after is never above the error before.
        """
        g = torch.stack([x.to(device=self.device, dtype=self.dtype) for x in grads])
        norms = torch.linalg.vector_norm(g, dim=(-2, -1)).clamp_min(torch.finfo(self.dtype).tiny)
        pv = self.p_val.detach().clone().requires_grad_(not self.left_identity)
        qv = self.q_val.detach().clone().requires_grad_(not self.right_identity)
        trainable = [v for v in (pv, qv) if v.requires_grad]

        def recon() -> Tensor:
            p, q = _dense(self.p_idx, pv, self.d_left), _dense(self.q_idx, qv, self.d_right)
            return self._decompress(self._compress(g, p, q), p, q)

        def objective() -> tuple[Tensor, Tensor]:
            r = recon()
            err = (torch.linalg.vector_norm(r - g, dim=(-2, -1)) / norms).mean()
            reg = beta * sum(torch.linalg.vector_norm(v) for v in trainable) if beta and trainable else 0.0
            return err, err + reg

        if not trainable or steps <= 0:
            with torch.no_grad():
                return objective()[0].item()
        with torch.no_grad():
            # LSP's +-1/sqrt(r) init makes P P^T ~ (m/d) x noise, so the reconstruction starts several
            # times larger than G and the first AdamW steps shrink P, Q toward the P = 0 saddle (error
            # stuck at 1). Start instead from the least-squares optimal scale c of the reconstruction
            # (it is quartic in the values: c = s^4 with s applied to the trainable side(s)).
            r = recon()
            w = norms[:, None, None] ** 2
            c = ((r * g / w).sum() / (r * r / w).sum().clamp_min(1e-30)).item()
            if c > 0 and math.isfinite(c):
                s = c ** (1.0 / (2 * len(trainable)))
                for v in trainable:
                    v.mul_(s)
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        best = (math.inf, math.inf, None, None)       # (objective, error, p values, q values)
        for it in range(steps + 1):                    # the last pass only evaluates the final values
            err, loss = objective()
            if loss.item() < best[0]:
                best = (loss.item(), err.item(), pv.detach().clone(), qv.detach().clone())
            if it == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.p_val, self.q_val = best[2], best[3]
        self._refresh()
        return best[1]


# --- Adam in the subspace -----------------------------------------------------------------------------

def _transition(old: MatrixCompressor, new: MatrixCompressor) -> tuple[Tensor, Tensor]:
    """A (d_new x d_old), B (d_old x d_new) with new-subspace coordinates = A S_old B (see module doc).

    A = P_new^T (P_old^+)^T, B = Q_old^+ Q_new, in float64 so that new == old gives I to ~1e-15.
    """
    def side(x_old: Tensor, old_identity: bool, x_new: Tensor) -> Tensor:
        x_new = x_new.to(device=x_old.device, dtype=torch.float64)
        if old_identity:                                  # pinv(I) = I
            return x_new
        return torch.linalg.pinv(x_old.double()) @ x_new  # X_old^+ X_new  (d_old x d_new)
    a = side(old.P, old.left_identity, new.P).T
    b = side(old.Q, old.right_identity, new.Q)
    return a, b


class SubspaceAdamW:
    """Adam state of one tensor in its (compressed) coordinates; the CPU side of LSP-Offload.

    Matches torch.optim.AdamW's arithmetic (bias corrections, eps outside the sqrt); decoupled
    weight decay is left to the device, which holds the full weights (LayerCompression.apply).
    """

    def __init__(self, shape_dd: tuple[int, ...], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros(shape_dd, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros(shape_dd, dtype=dtype, device=device)
        self.t = 0

    @torch.no_grad()
    def step(self, small_grad: Tensor) -> Tensor:
        """One Adam step on the compressed gradient; returns the update, already scaled by -lr."""
        g = small_grad.to(device=self.exp_avg.device, dtype=self.exp_avg.dtype)
        b1, b2 = self.betas
        self.t += 1
        self.exp_avg.lerp_(g, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = self.lr / (1 - b1 ** self.t)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        return self.exp_avg / denom * -step_size

    @torch.no_grad()
    def reproject(self, old: MatrixCompressor, new: MatrixCompressor) -> None:
        """Carry the moments from old's subspace into new's (first: A M B; second: (A*A) V (B*B))."""
        if self.t == 0:
            self.exp_avg = self.exp_avg.new_zeros(new.small_shape)
            self.exp_avg_sq = self.exp_avg_sq.new_zeros(new.small_shape)
            return
        a, b = _transition(old, new)
        dev, dt = self.exp_avg.device, self.exp_avg.dtype
        a, b = a.to(dev), b.to(dev)
        self.exp_avg = (a @ self.exp_avg.double() @ b).to(dt)
        self.exp_avg_sq = ((a * a) @ self.exp_avg_sq.double() @ (b * b)).to(dt)


# --- one layer ------------------------------------------------------------------------------------------

class LayerCompression:
    """LSP-Offload for every parameter of one layer: 2-D weights compressed, vectors sent whole."""

    def __init__(self, named_shapes: dict[str, tuple[int, ...]], rank: int, nnz_per_row: int = 4,
                 check_every: int = 100, threshold: float = 0.2, fit_samples: int = 128,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, *, fit_steps: int = 100, fit_lr: float = 1e-2,
                 fit_beta: float = 0.0, share: bool = True, device: torch.device | str | None = None,
                 cpu_device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 decay_vectors: bool = True) -> None:
        if check_every <= 0 or fit_samples <= 0:
            raise ValueError("check_every and fit_samples must be positive")
        self.named_shapes = {k: tuple(v) for k, v in named_shapes.items()}
        self.rank, self.nnz_per_row = rank, nnz_per_row
        self.check_every, self.threshold, self.fit_samples = check_every, threshold, fit_samples
        self.fit_steps, self.fit_lr, self.fit_beta = fit_steps, fit_lr, fit_beta
        self.weight_decay = weight_decay
        self.decay_vectors = decay_vectors        # False: norms and biases are not decayed
        self.dtype = dtype
        self._lr = lr
        # matrices: name -> compressor key; compressors live on the device, optimizer states on the CPU
        self.key_of: dict[str, object] = {}
        self.compressors: dict[object, MatrixCompressor] = {}
        self.states: dict[str, SubspaceAdamW] = {}
        for i, (name, shape) in enumerate(sorted(self.named_shapes.items())):
            if len(shape) == 2:
                key = shape if share else name
                if key not in self.compressors:
                    self.compressors[key] = MatrixCompressor(shape[0], shape[1], rank, nnz_per_row,
                                                             seed=seed * 1_000_003 + i, device=device, dtype=dtype)
                self.key_of[name] = key
                small = self.compressors[key].small_shape
            else:
                small = shape
            self.states[name] = SubspaceAdamW(small, lr, betas, eps, device=cpu_device)
        self.samples: dict[object, deque] = {k: deque(maxlen=fit_samples) for k in self.compressors}
        self.fitted = False

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:                # for schedules: the CPU and device sides must agree
        self._lr = value
        for s in self.states.values():
            s.lr = value

    @torch.no_grad()
    def compress_grads(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """On the device: S = P^T G Q for matrices; vectors are returned unchanged (same tensor)."""
        return {k: self.compressors[self.key_of[k]].compress(g) if k in self.key_of else g
                for k, g in grads.items()}

    @torch.no_grad()
    def cpu_step(self, compressed: dict[str, Tensor]) -> dict[str, Tensor]:
        """On the CPU: Adam in the subspace (plain Adam for vectors); returns updates scaled by -lr."""
        return {k: self.states[k].step(s) for k, s in compressed.items()}

    @torch.no_grad()
    def apply(self, params: dict[str, Tensor], updates: dict[str, Tensor]) -> None:
        """On the device, in place: W *= 1 - lr*wd (decoupled, on the full W), then W += P U Q^T."""
        for k, u in updates.items():
            w = params[k]
            decay = 1 - self._lr * self.weight_decay if self.weight_decay and (self.decay_vectors or w.dim() >= 2) else 1.0
            if k in self.key_of:
                self.compressors[self.key_of[k]].add_decompressed(w, u.to(w.device), decay)
                continue
            if decay != 1.0:
                w.mul_(decay)
            w.add_(u.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def observe(self, step: int, grads: dict[str, Tensor]) -> dict:
        """Sample gradients; at check steps measure the error and refit the projectors above threshold.

        Gradients of the last `fit_samples` steps before each check (step % check_every == 0, and the
        first call) are kept on their device. Call before compress_grads, so a refit takes effect at once.
        Returns {"error": mean relative error before (None if no check), "error_after", "refit": bool,
        "refit_keys": [...]}.
        """
        stats: dict = {"error": None, "error_after": None, "refit": False, "refit_keys": []}
        mats = {k: g for k, g in grads.items() if k in self.key_of}
        if not mats:
            return stats
        if (-step) % self.check_every < self.fit_samples:
            for k, g in mats.items():
                self.samples[self.key_of[k]].append(g.detach().to(self.dtype).clone())
        if step % self.check_every != 0 and self.fitted:
            return stats
        before, after = [], []
        for key, comp in self.compressors.items():
            errs = [comp.relative_error(g) for k, g in mats.items() if self.key_of[k] == key]
            if not errs:
                continue
            err = sum(errs) / len(errs)
            before.append(err)
            if err > self.threshold and not comp.lossless and self.samples[key]:
                old = comp.clone()
                with torch.enable_grad():
                    comp.fit(list(self.samples[key]), steps=self.fit_steps, lr=self.fit_lr, beta=self.fit_beta)
                for name, k2 in self.key_of.items():
                    if k2 == key:
                        self.states[name].reproject(old, comp)
                stats["refit_keys"].append(key)
                errs = [comp.relative_error(g) for k, g in mats.items() if self.key_of[k] == key]
                err = sum(errs) / len(errs)
            after.append(err)
            self.samples[key].clear()
        self.fitted = True
        stats.update(error=sum(before) / len(before), error_after=sum(after) / len(after),
                     refit=bool(stats["refit_keys"]))
        return stats

    def to(self, device: torch.device | str) -> "LayerCompression":
        """Move the projectors (the device side); the subspace moments stay where they are."""
        for comp in self.compressors.values():
            comp.to(device)
        return self

    def device_bytes(self) -> int:
        """Bytes the projectors hold on their device (sparse values and indices plus the CSR copies)."""
        return sum(t.numel() * t.element_size() for c in self.compressors.values()
                   for t in (c.p_idx, c.p_val, c.q_idx, c.q_val, *c.sparse_tensors()))

    def state_bytes(self) -> int:
        """Bytes of the subspace Adam moments (on the CPU side)."""
        return sum(s.exp_avg.numel() * s.exp_avg.element_size() * 2 for s in self.states.values())

    def state_dict(self) -> dict:
        """Projector values and subspace moments, on the CPU, for checkpoints. The gradients sampled
        for the next refit are left out (up to fit_samples full gradients per shape): a resumed run
        refits on the gradients it sees after resuming."""
        return {"rank": self.rank, "nnz_per_row": self.nnz_per_row, "fitted": self.fitted,
                "compressors": [{k: getattr(c, k).detach().cpu().clone() for k in ("p_idx", "p_val", "q_idx", "q_val")}
                                for c in self.compressors.values()],
                "states": {name: {"exp_avg": s.exp_avg.detach().cpu().clone(),
                                  "exp_avg_sq": s.exp_avg_sq.detach().cpu().clone(), "t": s.t}
                           for name, s in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict saved; ValueError when it was made for other shapes or another rank."""
        comps = list(self.compressors.values())
        try:
            if state["rank"] != self.rank or state["nnz_per_row"] != self.nnz_per_row:
                raise ValueError(f"saved at rank {state['rank']} nnz {state['nnz_per_row']}, "
                                 f"not rank {self.rank} nnz {self.nnz_per_row}")
            if len(state["compressors"]) != len(comps) or set(state["states"]) != set(self.states):
                raise ValueError("saved for other parameters")
            for c, sc in zip(comps, state["compressors"]):
                for k in ("p_idx", "p_val", "q_idx", "q_val"):
                    cur = getattr(c, k)
                    if tuple(sc[k].shape) != tuple(cur.shape):
                        raise ValueError(f"projector {k} has shape {tuple(sc[k].shape)}, expected {tuple(cur.shape)}")
                    setattr(c, k, sc[k].to(device=cur.device, dtype=cur.dtype))
                c._refresh()
            for name, s in self.states.items():
                ss = state["states"][name]
                if tuple(ss["exp_avg"].shape) != tuple(s.exp_avg.shape):
                    raise ValueError(f"moments of {name} have shape {tuple(ss['exp_avg'].shape)}")
                s.exp_avg = ss["exp_avg"].to(device=s.exp_avg.device, dtype=s.exp_avg.dtype).clone()
                s.exp_avg_sq = ss["exp_avg_sq"].to(device=s.exp_avg_sq.device, dtype=s.exp_avg_sq.dtype).clone()
                s.t = int(ss["t"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed compression state ({exc})") from None
        self.fitted = bool(state["fitted"])
        for q in self.samples.values():
            q.clear()

    def bytes_on_wire(self) -> tuple[int, int]:
        """(D2H, H2D) bytes per step: d x d per matrix, every element of the vectors, each way."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        total = 0
        for name, shape in self.named_shapes.items():
            total += math.prod(self.compressors[self.key_of[name]].small_shape if name in self.key_of else shape)
        return total * elem, total * elem


def error_for_rank(shape: tuple[int, int], rank: int, nnz: int, grads: list[Tensor],
                   steps: int = 50, lr: float = 1e-2, max_samples: int = 4, seed: int = 0) -> float:
    """Relative reconstruction error a fitted (rank, nnz) compressor reaches on `grads` (cheap:
    a short fit on at most `max_samples` gradients, scored on all of them)."""
    m, n = shape
    comp = MatrixCompressor(m, n, rank, nnz, seed=seed, device=grads[0].device)
    if not comp.lossless:
        with torch.enable_grad():
            comp.fit(grads[:max_samples], steps=steps, lr=lr)
    return sum(comp.relative_error(g) for g in grads) / len(grads)
