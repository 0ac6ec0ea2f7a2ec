"""`tiertune validate`: execute a plan, simulate it, compare; JSON keys, files written, bad input."""

from __future__ import annotations

import json
import math

import pytest

from tiertune.cli import main
from tiertune.hardware import load_hardware


def test_validate_json_traces_and_plot(capsys, tmp_path):
    rc = main(["validate", "--model", "tiny-llama", "--policy", "zero-offload", "--steps", "4", "--batch", "2",
               "--seq", "16", "--trace-dir", str(tmp_path / "tr"), "--plot", str(tmp_path / "tl"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ("iteration_error", "per_kind_error", "peak_error", "measured_s", "predicted_s"):
        assert key in out
    assert out["measured_s"] > 0 and out["predicted_s"] > 0
    assert math.isfinite(out["iteration_error"])
    # zero-offload moves gradients out and weights back: those kinds are compared too
    assert {"forward", "backward", "update", "grad", "writeback"} <= set(out["per_kind_error"])
    assert all(math.isfinite(e) for e in out["per_kind_error"].values())
    assert all(e is None or math.isfinite(e) for e in out["peak_error"].values())
    assert (tmp_path / "tr" / "measured.json").stat().st_size > 0
    assert (tmp_path / "tr" / "predicted.json").stat().st_size > 0
    assert (tmp_path / "tl.png").stat().st_size > 0 and (tmp_path / "tl.svg").stat().st_size > 0


def test_validate_with_a_profile_file_prints_the_table(capsys, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(load_hardware("lsp-4090").replace(name="given").to_toml())
    assert main(["validate", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "2", "--batch", "2",
                 "--seq", "16", "--profile", str(path)]) == 0
    text = capsys.readouterr().out
    assert "profile given" in text and "forward" in text and "backward" in text


@pytest.mark.parametrize("argv, words", [
    (["--policy", "gpu-only", "--steps", "1"], "at least 2"),
    (["--policy", "gpu-only", "--steps", "3", "--batch", "0"], "--batch"),
    (["--policy", "no-such-policy", "--steps", "3", "--profile", "lsp-4090"], "no-such-policy"),
    (["--policy", "gpu-only", "--steps", "3", "--profile", "nope.toml"], "nope.toml"),
    (["--plan", "missing.json", "--steps", "3", "--profile", "lsp-4090"], "missing.json"),
])
def test_validate_bad_input_is_one_line_exit_2(capsys, argv, words):
    rc = main(["validate", "--model", "tiny-llama", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err
