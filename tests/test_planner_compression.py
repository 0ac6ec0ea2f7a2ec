"""The planner's LSP rank choice: the error estimate, the max_compression_error cap, the CLI.

The estimate (planner/compression.py) must be 0 where the executor's projectors are identities,
fall with the rank, and sit at or above what the real compressor reaches on low-rank-plus-noise
gradients (it is meant as a conservative estimate); the cap must remove ranks, and `compare` on
LSP's own test-bed must show compressed plans next to `ideal`.
"""

from __future__ import annotations

import json

import pytest
import torch

from tiertune.cli import main
from tiertune.errors import InputError
from tiertune.executor.compress import error_for_rank
from tiertune.planner.compression import allowed_ranks, default_ranks, estimate_error, rank_error
from tiertune.workload import TrainSpec, load_model

TRAIN = TrainSpec(batch=1, seq_len=64)


def test_estimate_is_zero_at_full_rank_and_falls_with_rank():
    assert estimate_error(64, 176, 176) == 0.0
    errs = [estimate_error(256, 64, d) for d in (4, 8, 16, 32, 64, 128)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert 0 < errs[-1] < 1


def low_rank_plus_noise(m, n, k, noise, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        s = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
        e = torch.randn(m, n, generator=g)
        out.append(s / s.norm() + noise * e / e.norm())
    return out


@pytest.mark.parametrize("m,n,d", [(64, 64, 32), (128, 48, 16), (96, 96, 24)])
def test_estimate_is_at_or_above_what_the_fitted_compressor_reaches(m, n, d):
    torch.manual_seed(0)
    grads = low_rank_plus_noise(m, n, max(1, min(m, n) // 8), 0.1, 4)
    measured = error_for_rank((m, n), d, 4, grads)
    assert estimate_error(m, n, d) >= measured - 0.02, (measured, estimate_error(m, n, d))


def test_the_cap_excludes_ranks_whose_estimate_exceeds_it():
    model = load_model("llama2-7b")
    errs = {r: rank_error(model, TRAIN, r) for r in (1024, 2048, 4096)}
    assert errs[1024] > errs[2048] > errs[4096]
    cap = (errs[2048] + errs[4096]) / 2
    keep, got = allowed_ranks(model, TRAIN, (1024, 2048, 4096), cap)
    assert keep == (4096,) and got == errs
    assert allowed_ranks(model, TRAIN, (1024,), None)[0] == (1024,)
    assert model.hidden // 2 in default_ranks(model)
    with pytest.raises(InputError, match="max_compression_error"):
        allowed_ranks(model, TRAIN, (1024,), 1.5)


def compare_rows(capsys, *extra) -> dict:
    assert main(["compare", "--model", "llama2-7b", "--hardware", "lsp-4090", "--time-limit", "2", *extra,
                 "--json"]) == 0
    return {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}


def test_compare_on_lsp_testbed_plans_compressed_when_the_cap_allows(capsys):
    allowed = compare_rows(capsys, "--grad-rank", "2048", "--max-compression-error", "0.95")
    assert allowed["lsp-offload"]["fits"] and allowed["ideal"]["fits"]
    assert allowed["planner"]["fits"] and allowed["planner"]["lossless"] is False
    assert allowed["planner"]["ratio_to_ideal"] > 0
    # at rank 2048 the estimate is about 0.93: a cap of 0.5 leaves the planner lossless
    capped = compare_rows(capsys, "--grad-rank", "2048", "--max-compression-error", "0.5")
    assert capped["planner"]["lossless"] is True
    assert capped["planner"]["iteration_s"] > allowed["planner"]["iteration_s"]


def test_plan_cli_records_the_cap_and_the_estimates(capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["plan", "--model", "tiny-llama", "--hardware", "lsp-a1000-laptop", "--seq", "64",
                 "--time-limit", "2", "--max-compression-error", "0.99", "-o", str(out), "--json"]) == 0
    plan = json.loads(out.read_text())
    assert plan["global"]["max_compression_error"] == 0.99
    est = plan["provenance"]["rank_error_estimates"]
    assert set(est) == {str(r) for r in default_ranks(load_model("tiny-llama"))}
    assert all(lp["grad_rank"] is None or est[str(lp["grad_rank"])] <= 0.99 for lp in plan["layers"])
    capsys.readouterr()
    assert main(["plan", "--model", "tiny-llama", "--hardware", "lsp-4090", "--max-compression-error", "2",
                 "--time-limit", "1"]) == 2
    assert "max-compression-error" in capsys.readouterr().err


def test_compare_text_says_when_a_lossy_baseline_meets_a_lossless_planner(capsys):
    assert main(["compare", "--model", "llama2-7b", "--hardware", "lsp-4090", "--time-limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "lossless" in out.splitlines()[0]
    assert "note: lsp-offload compress(es) gradients (lossy)" in out and "--grad-rank" in out
    assert main(["compare", "--model", "llama2-7b", "--hardware", "lsp-4090", "--time-limit", "2",
                 "--grad-rank", "2048"]) == 0
    assert "note: " not in capsys.readouterr().out
