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


@pytest.mark.parametrize("policy", ["fuyou", "zero-offload"])
def test_the_simulator_moves_the_bytes_the_executor_moves(tmp_path, policy):
    """Weights, gradients and optimizer state: every copy and SSD transfer of a steady iteration
    carries as many bytes in the simulated trace as in the measured one (fp32 weights on the SSD
    travel with their optimizer state, which the CPU update reads and writes whole)."""
    from tiertune.executor.run import train_plan
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.workload import TrainSpec, load_model

    m, t, hw = load_model("tiny-llama"), TrainSpec(batch=2, seq_len=32), load_hardware("fuyou-4090-1ssd")
    plan = make_policy(policy, m, t, hw)
    measured = train_plan(m, plan, 2, offload_dir=tmp_path, progress=False).trace
    simulated = simulate(m, plan.train, hw, plan, iterations=2).trace

    def moved(trace):
        ev = trace.events[(trace.events.iteration == 1) & (trace.events.bytes > 0)]
        ev = ev.assign(what=ev.task.str.split(":").str[0])
        ev = ev[~ev.what.str.endswith(".act")]       # activations: the cost model's estimate of saved tensors
        return ev.groupby(["what", "resource"]).bytes.sum().to_dict()

    assert moved(measured) == moved(simulated)
    assert moved(measured)
