"""Which LSP gradient ranks the planner may use: an error estimate per rank and the user's cap.

A plan's `max_compression_error` caps the relative reconstruction error ||P P^T G Q Q^T - G|| / ||G||
the planner accepts for a grad_rank. The planner cannot see gradients, so it uses an estimate:

    error(m, n, d) = sqrt(1 - min(1, d/m) * min(1, d/n))

the expected relative error of projecting a gradient with no low-rank structure (i.i.d. entries)
onto d-dimensional subspaces on both sides: such a projection keeps a (d/m)(d/n) share of the
energy. It is 0 when d reaches both dimensions (the executor then uses identity projectors) and
depends only on the fractions d/m, d/n. It is conservative: gradients with low-rank structure, and
LSP's fitted projectors, can do better (tests/test_planner_compression.py checks it against what
`compress.error_for_rank` reaches on low-rank-plus-noise gradients); the executor logs the error it
measures at each projector check (Executor.lsp_log) to compare against.

A rank's estimate for a model is the relative error of the whole weight gradient when every matrix
is compressed at that rank, each matrix's gradient energy taken proportional to its size (the
isotropic model again): sqrt(sum_j numel_j err_j^2 / sum_j numel_j) over every matrix of every
layer. Vectors are sent whole and do not count. Being conservative, caps below about 0.9 exclude
LSP's own ranks (d about hidden/2) on the 7B shapes; that is the estimate speaking, not a measurement.
"""

from __future__ import annotations

import math

from tiertune.errors import InputError
from tiertune.workload import ModelSpec, TrainSpec, layer_costs


def estimate_error(m: int, n: int, rank: int) -> float:
    """Estimated relative compression error of an m x n gradient at rank d (see module doc)."""
    if m <= 0 or n <= 0 or rank <= 0:
        raise InputError(f"estimate_error: m, n, rank must be positive, got {(m, n, rank)}")
    kept = min(1.0, rank / m) * min(1.0, rank / n)
    return math.sqrt(max(0.0, 1.0 - kept))


def rank_error(model: ModelSpec, train: TrainSpec, rank: int) -> float:
    """Estimated relative error of the model's whole weight gradient at `rank` (size-weighted, see above)."""
    mats = [s for lc in layer_costs(model, train) for s in lc.matrices]
    total = sum(o * i for o, i in mats)
    if not total:
        return 0.0
    return math.sqrt(sum(o * i * estimate_error(o, i, rank) ** 2 for o, i in mats) / total)


def default_ranks(model: ModelSpec) -> tuple[int, ...]:
    """Candidate ranks when the user gives a cap but no ranks: hidden/8, /4, /2 (LSP's choice), hidden."""
    h = model.hidden
    return tuple(sorted({max(1, h // 8), max(1, h // 4), max(1, h // 2), h}))


def allowed_ranks(model: ModelSpec, train: TrainSpec, ranks: tuple[int, ...],
                  cap: float | None) -> tuple[tuple[int, ...], dict[int, float]]:
    """(ranks whose estimate is within `cap`, estimate per rank asked for). No cap: all of them."""
    if cap is not None and (not isinstance(cap, (int, float)) or not 0 < cap <= 1):
        raise InputError(f"max_compression_error must be in (0, 1], got {cap!r}")
    errors = {r: rank_error(model, train, r) for r in ranks}
    keep = tuple(r for r in ranks if cap is None or errors[r] <= cap)
    return keep, errors
