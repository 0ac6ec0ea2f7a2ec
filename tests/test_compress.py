"""LSP-Offload subspace compression (tiertune.executor.compress): exactness, fitting, moment re-projection."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiertune.executor.compress import (LayerCompression, MatrixCompressor, SubspaceAdamW, compressed_numel,
                                        error_for_rank)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with 2 cores shared among processes, extra OpenMP threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def low_rank_grads(m: int, n: int, k: int, count: int, noise: float = 0.02, seed: int = 0) -> list[torch.Tensor]:
    """Gradients sharing a rank-k row and column space (as successive steps' gradients do), plus noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return [a @ torch.randn(k, k, generator=g) @ b + noise * math.sqrt(k) * torch.randn(m, n, generator=g)
            for _ in range(count)]


# --- exactness at full rank ---------------------------------------------------------------------------

def test_identity_compressor_update_equals_torch_adamw():
    torch.manual_seed(0)
    m, n, lr, wd = 12, 7, 1e-2, 0.1
    w_ref = torch.nn.Parameter(torch.randn(m, n))
    w = w_ref.detach().clone()
    opt = torch.optim.AdamW([w_ref], lr=lr, weight_decay=wd)
    comp = MatrixCompressor.identity(m, n)
    adam = SubspaceAdamW(comp.small_shape, lr=lr)
    assert comp.small_shape == (m, n) and torch.equal(comp.P, torch.eye(m)) and torch.equal(comp.Q, torch.eye(n))
    for _ in range(6):
        g = torch.randn(m, n)
        w_ref.grad = g.clone()
        opt.step()
        w.mul_(1 - lr * wd).add_(comp.decompress(adam.step(comp.compress(g))))
        torch.testing.assert_close(w, w_ref.detach(), rtol=1e-5, atol=1e-7)


def test_layer_at_full_rank_equals_torch_adamw_matrices_and_vectors():
    torch.manual_seed(1)
    shapes = {"attn.w": (16, 8), "mlp.w": (8, 24), "ln.weight": (8,), "mlp.bias": (24,)}
    lr, wd = 3e-3, 0.05
    ref = {k: torch.nn.Parameter(torch.randn(s)) for k, s in shapes.items()}
    params = {k: p.detach().clone() for k, p in ref.items()}
    opt = torch.optim.AdamW(ref.values(), lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    lc = LayerCompression(shapes, rank=64, nnz_per_row=4, check_every=2, threshold=0.2, fit_samples=2,
                          lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, seed=0)
    for step in range(5):
        grads = {k: torch.randn(s) for k, s in shapes.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        opt.step()
        stats = lc.observe(step, grads)
        assert not stats["refit"]                      # identity projectors are exact, never refit
        small = lc.compress_grads(grads)
        assert small["ln.weight"] is grads["ln.weight"]   # vectors pass through
        lc.apply(params, lc.cpu_step(small))
        for k in shapes:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-5, atol=1e-7)


def test_rank_reaching_one_side_makes_that_side_exact():
    comp = MatrixCompressor(8, 32, rank=16, nnz_per_row=4, seed=3)
    assert comp.left_identity and not comp.right_identity and comp.small_shape == (8, 16)
    g = torch.randn(8, 32)
    torch.testing.assert_close(comp.compress(g), g @ comp.Q)
    assert compressed_numel(8, 32, 16) == 8 * 16 <= 8 * 32


# --- projectors ----------------------------------------------------------------------------------------

def test_init_follows_lsp_code():
    comp = MatrixCompressor(40, 30, rank=10, nnz_per_row=3, seed=0)
    for x, mask in ((comp.P, comp.P_mask), (comp.Q, comp.Q_mask)):
        assert (mask.sum(dim=1) == 3).all()
        torch.testing.assert_close(x[mask].abs(), torch.full((int(mask.sum()),), 1 / math.sqrt(3)))
        assert (x[~mask] == 0).all()
    g = torch.randn(40, 30)
    torch.testing.assert_close(comp.compress(g), comp.P.T @ g @ comp.Q)
    s = torch.randn(10, 10)
    torch.testing.assert_close(comp.decompress(s), comp.P @ s @ comp.Q.T)


def test_fit_lowers_error_well_below_one_and_generalises():
    m, n, k = 64, 48, 4
    grads = low_rank_grads(m, n, k, count=5)
    train, held_out = grads[:4], grads[4]
    comp = MatrixCompressor(m, n, rank=16, nnz_per_row=4, seed=0)
    before = sum(comp.relative_error(g) for g in train) / len(train)
    after = comp.fit(train, steps=150, lr=1e-2)
    assert after < before
    assert after < 0.25, after
    assert abs(after - sum(comp.relative_error(g) for g in train) / len(train)) < 1e-4
    assert comp.relative_error(held_out) < 0.3            # same subspace, unseen coefficients


def test_fit_preserves_sparsity_pattern():
    comp = MatrixCompressor(32, 24, rank=8, nnz_per_row=3, seed=1)
    masks = comp.P_mask.clone(), comp.Q_mask.clone()
    vals = comp.P.clone()
    comp.fit(low_rank_grads(32, 24, 3, count=3), steps=30, lr=1e-2, beta=1e-3)
    assert torch.equal(comp.P_mask, masks[0]) and torch.equal(comp.Q_mask, masks[1])
    assert (comp.P_mask.sum(1) == 3).all() and (comp.Q_mask.sum(1) == 3).all()
    assert (comp.P[~masks[0]] == 0).all() and (comp.Q[~masks[1]] == 0).all()
    assert not torch.equal(comp.P, vals)                  # the values did move


def test_error_for_rank_orders_ranks():
    grads = low_rank_grads(48, 40, 6, count=3, seed=2)
    full = error_for_rank((48, 40), 48, 4, grads)
    assert full < 1e-6                                    # rank >= both dims: identity, lossless
    low = error_for_rank((48, 40), 2, 2, grads, steps=40)
    mid = error_for_rank((48, 40), 16, 4, grads, steps=40)
    assert mid < low <= 1.0 + 1e-6


# --- moments across a refit --------------------------------------------------------------------------

def _adam_with_history(shape, steps: int, seed: int) -> SubspaceAdamW:
    g = torch.Generator().manual_seed(seed)
    adam = SubspaceAdamW(shape, lr=1e-3)
    for _ in range(steps):
        adam.step(torch.randn(shape, generator=g))
    return adam


dims = st.integers(min_value=3, max_value=20)


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, rank=st.integers(1, 12), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_reproject_onto_same_projectors_keeps_moments(m, n, rank, r, seed):
    comp = MatrixCompressor(m, n, rank, r, seed=seed)
    adam = _adam_with_history(comp.small_shape, 3, seed)
    m1, v1 = adam.exp_avg.clone(), adam.exp_avg_sq.clone()
    full_rank = torch.linalg.matrix_rank(comp.P) == comp.d_left and torch.linalg.matrix_rank(comp.Q) == comp.d_right
    adam.reproject(comp, comp.clone())
    if full_rank:           # pinv(P) P = I needs independent columns (random sparse P nearly always has them)
        torch.testing.assert_close(adam.exp_avg, m1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adam.exp_avg_sq, v1, rtol=1e-5, atol=1e-9)
    assert (adam.exp_avg_sq >= 0).all()


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 10_000))
def test_reproject_identity_to_identity_is_exact(m, n, seed):
    comp = MatrixCompressor.identity(m, n)
    adam = _adam_with_history((m, n), 2, seed)
    m1, v1 = adam.exp_avg.clone(), adam.exp_avg_sq.clone()
    adam.reproject(comp, MatrixCompressor.identity(m, n))
    assert torch.equal(adam.exp_avg, m1) and torch.equal(adam.exp_avg_sq, v1)


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, rank=st.integers(1, 12), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_first_moment_maps_as_stated(m, n, rank, r, seed):
    old = MatrixCompressor(m, n, rank, r, seed=seed)
    new = MatrixCompressor(m, n, rank, r, seed=seed + 1)
    adam = _adam_with_history(old.small_shape, 2, seed)
    mo, vo = adam.exp_avg.double(), adam.exp_avg_sq.double()
    adam.reproject(old, new)
    po, qo, pn, qn = (x.double() for x in (old.P, old.Q, new.P, new.Q))
    a, b = pn.T @ torch.linalg.pinv(po).T, torch.linalg.pinv(qo) @ qn
    torch.testing.assert_close(adam.exp_avg.double(), a @ mo @ b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adam.exp_avg_sq.double(), (a * a) @ vo @ (b * b), rtol=1e-4, atol=1e-9)
    assert (adam.exp_avg_sq >= 0).all()
    # From identity projectors (orthonormal columns) this is LSP's P_new^T P_old M Q_old^T Q_new.
    ident = MatrixCompressor.identity(m, n)
    adam2 = _adam_with_history((m, n), 2, seed)
    m2 = adam2.exp_avg.double()
    adam2.reproject(ident, new)
    torch.testing.assert_close(adam2.exp_avg.double(), pn.T @ m2 @ qn, rtol=1e-5, atol=1e-7)


# --- the layer: refit schedule and wire bytes -------------------------------------------------------

def test_observe_checks_every_and_refits_above_threshold():
    shapes = {"q": (32, 32), "k": (32, 32), "up": (32, 64), "norm": (32,)}
    grads_of = lambda s: {**{k: g for k, g in zip(("q", "k"), low_rank_grads(32, 32, 2, 2, seed=s))},
                          "up": low_rank_grads(32, 64, 2, 1, seed=s)[0], "norm": torch.randn(32)}
    lc = LayerCompression(shapes, rank=8, nnz_per_row=2, check_every=3, threshold=0.2, fit_samples=2,
                          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, fit_steps=40)
    assert len(lc.compressors) == 2                       # q and k share their (32, 32) compressor
    first = lc.observe(0, grads_of(0))
    assert first["error"] > 0.2 and first["refit"] and first["error_after"] < first["error"]
    assert lc.observe(1, grads_of(1))["error"] is None    # not a check step
    lc.cpu_step(lc.compress_grads(grads_of(1)))
    lazy = LayerCompression(shapes, rank=8, nnz_per_row=2, check_every=3, threshold=1e9, fit_samples=2,
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0)
    stats = lazy.observe(0, grads_of(0))
    assert stats["error"] is not None and not stats["refit"]   # checked, below threshold: kept


def test_bytes_on_wire_is_d_squared_per_matrix():
    shapes = {"a": (64, 48), "b": (48, 96), "c": (64, 48), "bias": (48,)}
    lc = LayerCompression(shapes, rank=16, nnz_per_row=4, check_every=10, threshold=0.2, fit_samples=4,
                          lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0)
    expect = (3 * 16 * 16 + 48) * 4
    assert lc.bytes_on_wire() == (expect, expect)
    small = lc.compress_grads({k: torch.randn(s) for k, s in shapes.items()})
    assert sum(t.numel() * t.element_size() for t in small.values()) == expect


def test_compressed_training_reduces_loss_on_low_rank_problem():
    """End to end on a least-squares problem whose gradients are low rank: LSP updates still descend."""
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 32), torch.randn(32, 4) @ torch.randn(4, 48)
    y = x @ w_true
    w = torch.zeros(32, 48)
    lc = LayerCompression({"w": (32, 48)}, rank=16, nnz_per_row=4, check_every=20, threshold=0.2, fit_samples=4,
                          lr=5e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0, fit_steps=60)
    loss0 = ((x @ w - y) ** 2).mean().item()
    refits = 0
    for step in range(100):
        g = 2 * x.T @ (x @ w - y) / x.shape[0] / y.shape[1]
        refits += lc.observe(step, {"w": g})["refit"]
        lc.apply({"w": w}, lc.cpu_step(lc.compress_grads({"w": g})))
    assert refits >= 2                                    # the moments were carried through refits
    assert ((x @ w - y) ** 2).mean().item() < 0.3 * loss0


@settings(max_examples=25, deadline=None)
@given(m=dims, n=dims, rank=st.integers(1, 24), r=st.integers(1, 4), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), decay=st.sampled_from([1.0, 0.99]))
def test_adding_the_decompressed_update_in_place_equals_adding_p_s_qt(m, n, rank, r, seed, dtype, decay):
    """add_decompressed scales the weights by the decay and accumulates P S Q^T into them by the
    sparse product itself (fp32), or through the dense m x n update (another dtype, an identity
    side): the same result either way."""
    comp = MatrixCompressor(m, n, rank, r, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g).to(dtype)
    s = torch.randn(*comp.small_shape, generator=g)
    want = (w.float() * decay).to(dtype).float() + comp.P @ s @ comp.Q.T
    comp.add_decompressed(w, s, decay)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(w.float(), want.to(dtype).float(), rtol=tol, atol=tol)
