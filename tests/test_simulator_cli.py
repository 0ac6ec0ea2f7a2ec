"""`tiertune simulate`: JSON report, traces, and one-line errors with exit code 2 on bad input."""

import json

import pytest

from tiertune.cli import main
from tiertune.hardware import GiB
from tiertune.schedule import LayerPlan, PlanGlobals, uniform_plan
from tiertune.traces import Trace
from tiertune.workload import TrainSpec, load_model

KEYS = {"fits", "iteration_s", "tokens_per_s", "tflops", "peak_bytes", "busy_s", "bottleneck", "events", "sim_wall_s"}


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fuyou_175b_plan(tmp_path):
    """Fuyou's placement for GPT-3 175B: weights and Adam state on the SSD array, updates during
    backward, the blocks' activations recomputed and the head's (logits) swapped to host memory."""
    model = load_model("gpt3-175b")
    n = model.n_layers + 2
    ssd = LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="recompute")
    layers = [ssd] * (n - 1) + [ssd.replace(activations="cpu")]
    plan = uniform_plan(model.name, "fuyou-4090-12ssd", TrainSpec(batch=1, seq_len=2048), n, ssd,
                        PlanGlobals()).with_layers(layers)
    path = tmp_path / "fuyou-175b.json"
    plan.save(path)
    return path


def test_gpt3_175b_with_ssd_offload_fits_a_24_gib_gpu(tmp_path, capsys):
    code, out, err = cli(capsys, "simulate", "--model", "gpt3-175b", "--hardware", "fuyou-4090-12ssd",
                         "--plan", str(fuyou_175b_plan(tmp_path)), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == KEYS
    assert r["fits"] and 0 < r["peak_bytes"]["gpu"] < 24 * GiB
    assert r["peak_bytes"]["ssd"] >= 14 * load_model("gpt3-175b").total_params()   # bf16 weights + fp32 Adam
    assert r["bottleneck"] in r["busy_s"] and r["events"] > 96 * 3
    assert r["tokens_per_s"] == pytest.approx(2048 / r["iteration_s"])


def test_policy_run_writes_a_trace_that_matches_the_report(tmp_path, capsys):
    out_path = tmp_path / "sim.json"
    code, out, _ = cli(capsys, "simulate", "--model", "tiny-llama", "--hardware", "lsp-a1000-laptop",
                       "--policy", "gpu-only", "--seq", "128", "--iterations", "3", "--trace", str(out_path), "--json")
    assert code == 0
    r = json.loads(out)
    trace = Trace.load(out_path)
    assert trace.source == "simulated" and trace.meta["plan"]["provenance"]["policy"] == "gpu-only"
    assert trace.peak_bytes() == r["peak_bytes"]
    assert trace.iteration_s() == pytest.approx(r["iteration_s"])


def test_readable_summary_names_the_bottleneck(capsys):
    code, out, _ = cli(capsys, "simulate", "--model", "gpt3-1.3b", "--hardware", "fuyou-4090-12ssd",
                       "--policy", "ideal")
    assert code == 0 and "bottleneck gpu" in out and "TFLOP/s" in out


def test_a_plan_that_does_not_fit_is_reported_not_raised(capsys):
    code, out, _ = cli(capsys, "simulate", "--model", "gpt3-175b", "--hardware", "fuyou-4090-12ssd",
                       "--policy", "gpu-only", "--json")
    r = json.loads(out)
    assert code == 0 and r["fits"] is False and r["iteration_s"] is None
    assert "gpu memory" in r["error"] and "GiB" in r["error"]


@pytest.mark.parametrize("argv", [
    ["--model", "gpt3-1.3b", "--hardware", "no-such-box", "--policy", "gpu-only"],
    ["--model", "no-such-model", "--hardware", "lsp-4090", "--policy", "gpu-only"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--policy", "no-such-policy"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--policy", "gpu-only", "--batch", "-4"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--policy", "gpu-only", "--iterations", "0"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--plan", "{malformed}"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--plan", "{other-model}"],
    ["--model", "gpt3-1.3b", "--hardware", "lsp-4090", "--plan", "{missing}"],
])
def test_bad_input_ends_with_one_line_and_exit_code_2(tmp_path, capsys, argv):
    (tmp_path / "bad.json").write_text('{"format": "tiertune.plan/1", "model": "m", "train": {}')
    tiny = uniform_plan("tiny-llama", "lsp-4090", TrainSpec(seq_len=64), 6, LayerPlan())
    tiny.save(tmp_path / "tiny.json")
    subst = {"{malformed}": str(tmp_path / "bad.json"), "{other-model}": str(tmp_path / "tiny.json"),
             "{missing}": str(tmp_path / "nope.json")}
    code, out, err = cli(capsys, "simulate", *[subst.get(a, a) for a in argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err
