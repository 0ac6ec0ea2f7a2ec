"""`tiertune sweep`: a 3x2x3x4 product on the process pool and on local Ray gives identical rows;
an interrupted sweep resumes without recomputing; bad specs are named in one line."""

import re

import pandas as pd
import pytest

from tiertune.analysis.sweep import KEY_COLUMNS, load_spec, run_sweep
from tiertune.cli import main
from tiertune.errors import InputError

SPEC = """
models = ["gpt3-1.3b", "tiny-llama", "llama2-7b"]
hardware = ["lsp-4090", "fuyou-4090-1ssd"]
gpu_mem_gib = [4, 8, 24]
policies = ["ideal", "zero-offload", "fuyou", "lomo"]
[train]
batch = 1
seq_len = 256
"""


def _spec(tmp_path, text=SPEC):
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def _sorted(df):
    return df.sort_values(KEY_COLUMNS).reset_index(drop=True)


def test_process_pool_and_local_ray_give_identical_results(tmp_path):
    spec = load_spec(_spec(tmp_path))
    assert len(spec.rows()) == 3 * 2 * 3 * 4
    pool = run_sweep(spec, tmp_path / "pool.parquet", workers=2)
    ray = run_sweep(spec, tmp_path / "ray.parquet", ray_address="local")
    assert len(pool) == 72 and pool["fits"].any() and not pool["fits"].all()
    pd.testing.assert_frame_equal(_sorted(pool), _sorted(ray))


def test_an_interrupted_sweep_resumes_without_recomputing(tmp_path):
    spec = load_spec(_spec(tmp_path))
    out = tmp_path / "r.parquet"

    def interrupt_after_five(rows, total):
        for i, row in enumerate(rows):
            if i == 5:
                raise KeyboardInterrupt
            yield row

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, workers=1, progress=interrupt_after_five)
    first = pd.read_parquet(out)
    assert len(first) == 5
    # Mark the saved rows: a recomputed row would lose the mark.
    first["error"] = "kept"
    first.to_parquet(out, index=False)
    seen = []
    full = run_sweep(spec, out, workers=2, progress=lambda rows, total: (seen.append(total), rows)[1])
    assert seen == [72 - 5]
    assert len(full) == 72 and (full["error"] == "kept").sum() == 5


@pytest.mark.parametrize("edit, message", [
    (lambda s: "colour = 3\n" + s, "unknown key.*colour"),
    (lambda s: s.replace('"lsp-4090"', '"lsp-9090"'), "lsp-9090"),
    (lambda s: s.replace('"lomo"', '"lomo2"'), "lomo2"),
    (lambda s: s.replace('"tiny-llama"', '"tiny-llama-x"'), "tiny-llama-x"),
    (lambda s: s.replace("seq_len = 256", "seq_len = -1"), "seq_len"),
])
def test_bad_specs_are_named_in_one_line_with_exit_2(tmp_path, capsys, edit, message):
    p = _spec(tmp_path, edit(SPEC))
    out = tmp_path / "x.parquet"
    assert main(["sweep", str(p), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0])
    assert not out.exists()
    with pytest.raises(InputError):
        load_spec(p)
