"""Bad input is one line on stderr and exit 2, never a traceback or a silent wrong result: numeric
flags (fuzzed), sweep spec fields (fuzzed), traces with impossible times or metadata, token ids
outside a model's vocabulary, a plan made for another model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiertune.cli import build_parser, main
from tiertune.commands.common import number

SIMULATE = ["simulate", "--model", "tiny-llama", "--hardware", "lsp-4090", "--policy", "gpu-only"]


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def one_line_exit_2(capsys, *argv, match: str | None = None) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err) == 1, (code, err)
    assert "Traceback" not in err[0]
    if match:
        assert re.search(match, err[0]), err[0]
    return err[0]


# --- numeric flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    (["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--gpu-mem", "inf"], "--gpu-mem"),
    (["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--gpu-mem", "nan"], "--gpu-mem"),
    (["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--gpu-mem", "1e300"], "--gpu-mem"),
    (["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--seed", "99999999999999999999"],
     "--seed"),
    (["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--lr", "inf"], "--lr"),
    ([*SIMULATE, "--gpu-mem", "1e300"], "--gpu-mem"),
    ([*SIMULATE, "--batch", "true"], "--batch"),
    (["sweep", "spec.toml", "-o", "x.parquet", "--workers", "-2"], "--workers"),
])
def test_the_issues_numeric_flags_are_one_line(capsys, argv, match):
    one_line_exit_2(capsys, *argv, match=match)


def test_a_batch_larger_than_host_memory_is_one_line(capsys):
    one_line_exit_2(capsys, "execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1",
                    "--batch", "1000000000", "--seq", "64", match="memory")


def _numeric_flags() -> list[tuple[str, str]]:
    """(verb, flag) for every flag of every verb whose value is a number."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return [(verb, a.option_strings[-1]) for verb, p in sub.choices.items() for a in p._actions
            if a.option_strings and getattr(a.type, "__name__", "") in ("integer", "number")]


def test_every_numeric_flag_is_checked_by_a_number_type():
    """A plain int/float type would let inf, nan and 10**30 through: every numeric flag of every
    verb goes through commands.common.number."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    plain = [(verb, a.option_strings[-1]) for verb, p in sub.choices.items() for a in p._actions
             if a.type in (int, float)]
    assert plain == [] and len(_numeric_flags()) >= 25


values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "true", "false", "True", "1e309", "0", "-0", "",
                     "0x10", "1_000", " 3", "3.", ".5", "1e-320", "9" * 40]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(_numeric_flags()), value=values)
def test_fuzz_every_numeric_flag_parses_or_is_one_line(capsys, flag, value):
    """Parsing decides validity: any value is accepted (a finite number in range) or refused in one
    line with exit 2, for every numeric flag of every verb."""
    verb, option = flag
    parser = build_parser()
    try:
        parser.parse_args([verb, *_required(verb), f"{option}={value}"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code in (0, 2) and len(lines) <= 1 and "Traceback" not in err
    if code == 0:
        assert not lines


def _required(verb: str) -> list[str]:
    return {"simulate": ["--model", "m", "--hardware", "h", "--policy", "p"],
            "plan": ["--model", "m", "--hardware", "h"], "compare": ["--model", "m", "--hardware", "h"],
            "execute": ["--model", "m", "--policy", "p", "--steps", "1"],
            "calibrate": ["-o", "x.toml"], "replay": ["t.json"],
            "validate": ["--model", "m", "--policy", "p", "--steps", "2"],
            "report": ["--model", "m", "--hardware", "h", "-o", "r"], "sweep": ["s.toml", "-o", "x.parquet"],
            }.get(verb, [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--gpu-mem", "--batch", "--seq", "--iterations"]), value=values)
def test_fuzz_simulate_runs_or_is_one_line(capsys, flag, value):
    """The values that parse also run: simulate ends with exit 0, or 2 and one line."""
    code = main([*SIMULATE, f"{flag}={value}"])
    _, err = capsys.readouterr()
    assert code in (0, 2) and len(err.strip().splitlines()) <= 1 and "Traceback" not in err


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--gpu-mem", "--batch", "--seq", "--lr", "--seed"]),
       value=st.one_of(st.sampled_from(["1e9", "1000000000", "0.001", "1e-300", "9223372036854775807", "4294967295", "5e-324"]),
                       values))
def test_fuzz_execute_runs_or_is_one_line(capsys, monkeypatch, flag, value):
    # the run may hold 2 GiB here (a batch of 100,000 otherwise runs, holding 18 GB beside other test workers)
    monkeypatch.setattr("tiertune.executor.run.available_memory_bytes", lambda: 2 << 30)
    code = main(["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--batch", "1",
                 "--seq", "8", f"{flag}={value}"])
    _, err = capsys.readouterr()
    assert code in (0, 2) and len(err.strip().splitlines()) <= 1 and "Traceback" not in err


def test_execute_refuses_a_step_larger_than_the_memory_available(capsys, monkeypatch):
    # tiny-llama at batch 100,000 x 8 tokens saves 3.45 GiB per block for backward (15.7 GiB kept by
    # gpu-only): with 2 GiB available on the CPU standing in for the GPU, it is one line, before any work
    monkeypatch.setattr("tiertune.executor.run.available_memory_bytes", lambda: 2 << 30)
    code = main(["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--batch", "100000",
                 "--seq", "8"])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "available on this machine" in lines[0], err
    assert "15.7 GiB" in lines[0] or "15.8 GiB" in lines[0], lines[0]


# --- sweep specs ----------------------------------------------------------------------------------

SPEC = """models = ["tiny-llama"]
hardware = ["lsp-4090"]
policies = ["gpu-only"]
"""


def sweep(capsys, tmp_path, extra: str, out: str = "r.parquet") -> tuple[int, list[str]]:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC + extra)
    code = main(["sweep", str(spec), "-o", str(tmp_path / out), "--workers", "1"])
    _, err = capsys.readouterr()
    return code, err.strip().splitlines()


@pytest.mark.parametrize("extra, match", [
    ('iterations = "three"\n', "iterations"),
    ("iterations = 0\n", "iterations"),
    ('planner_time_limit_s = "fast"\n', "planner_time_limit_s"),
    ("planner_time_limit_s = nan\n", "planner_time_limit_s"),
    ("gpu_mem_gib = [true]\n", "gpu_mem_gib"),
    ("gpu_mem_gib = [inf]\n", "gpu_mem_gib"),
    ("[train]\nbatch = true\n", "batch"),
    ('[train]\ngrad_clip = "fast"\n', "grad_clip"),
    ("[train]\nbatch = 100000000000000000\n", "batch"),
])
def test_the_issues_sweep_fields_are_one_line(capsys, tmp_path, extra, match):
    code, err = sweep(capsys, tmp_path, extra)
    assert code == 2 and len(err) == 1 and re.search(match, err[0]), err
    assert not (tmp_path / "r.parquet").exists()


def test_a_changed_spec_recomputes_the_rows_it_changes(capsys, tmp_path):
    import pandas as pd

    assert sweep(capsys, tmp_path, "iterations = 2\n")[0] == 0
    first = pd.read_parquet(tmp_path / "r.parquet")
    assert sweep(capsys, tmp_path, "iterations = 2\n")[0] == 0          # unchanged: kept as is
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), first)
    assert sweep(capsys, tmp_path, "iterations = 4\n")[0] == 0
    second = pd.read_parquet(tmp_path / "r.parquet")
    assert len(second) == 1 and second["spec_hash"].iloc[0] != first["spec_hash"].iloc[0]


sweep_values = st.one_of(st.integers(-(10**20), 10**20), st.floats(), st.booleans(), st.text(max_size=5),
                         st.lists(st.one_of(st.integers(-5, 50), st.floats(), st.booleans()), max_size=2))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["iterations", "planner_time_limit_s", "gpu_mem_gib", "train.batch", "train.seq_len",
                              "train.grad_accum", "train.grad_clip"]), value=sweep_values)
def test_fuzz_every_sweep_field_runs_or_is_one_line(capsys, tmp_path_factory, field, value):
    tmp = tmp_path_factory.mktemp("sweep")
    text = _toml(value)
    if text is None:
        return
    extra = f"[train]\n{field[6:]} = {text}\n" if field.startswith("train.") else f"{field} = {text}\n"
    code, err = sweep(capsys, tmp, extra)
    assert code in (0, 2) and len(err) <= 1 and not any("Traceback" in e for e in err), (extra, err)


def _toml(v) -> str | None:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v) if abs(v) < 2**63 else None        # TOML integers are 64-bit
    if isinstance(v, str):
        return json.dumps(v)
    parts = [_toml(x) for x in v]
    return None if None in parts else "[" + ", ".join(parts) + "]"


# --- traces ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_trace(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("trace") / "t.json"
    assert main([*SIMULATE, "--trace", str(path)]) == 0
    return json.loads(path.read_text())


def _broken(d: dict, tmp_path: Path, how: str) -> Path:
    d = json.loads(json.dumps(d))
    ev = next(e for e in d["traceEvents"] if e.get("ph") == "X")
    if how == "end_before_start":
        ev["args"]["end_s"] = ev["args"]["start_s"] - 1.0
    elif how == "nan":
        ev["args"]["start_s"] = float("nan")
    elif how == "inf_end":
        ev["args"]["end_s"] = float("inf")
    elif how == "meta_not_object":
        d["tiertune"]["meta"] = [1, 2]
    path = tmp_path / f"{how}.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("how", ["end_before_start", "nan", "inf_end", "meta_not_object"])
def test_impossible_traces_are_one_line_for_replay_and_calibrate(capsys, tmp_path, sim_trace, how):
    path = _broken(sim_trace, tmp_path, how)
    one_line_exit_2(capsys, "replay", path)
    one_line_exit_2(capsys, "calibrate", "--from-trace", path, "--profile", "lsp-4090", "-o", tmp_path / "p.toml")
    assert not (tmp_path / "p.toml").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(value=values)
def test_fuzz_replay_scale_runs_or_is_one_line(capsys, tmp_path_factory, sim_trace, value):
    path = tmp_path_factory.getbasetemp() / "fuzz-scale.json"
    if not path.exists():
        path.write_text(json.dumps(sim_trace))
    code = main(["replay", str(path), "--scale", f"gpu={value}", "--json"])
    out, err = capsys.readouterr()
    assert code in (0, 2) and len(err.strip().splitlines()) <= 1 and "Traceback" not in err
    if code == 0:
        assert json.loads(out)["iteration_s"] is not None           # a finite answer, never inf


# --- models and plans ------------------------------------------------------------------------------

def test_token_ids_outside_the_vocabulary_are_one_line(capsys, tmp_path):
    """A model directory's text goes through its tokenizer (none here: refused); token ids are
    checked against its vocabulary."""
    import numpy as np
    import torch
    import transformers  # the test extra installs it

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    capsys.readouterr()                                   # transformers' own progress bar
    text = tmp_path / "text.txt"
    text.write_text("Grüße aus Köln, façade, naïve — non-ASCII text for a byte-level model. " * 4)
    one_line_exit_2(capsys, "execute", "--model", tmp_path / "hf", "--policy", "gpu-only", "--steps", "1",
                    "--seq", "16", "--data", text, match="has no tokenizer")
    np.save(tmp_path / "ids.npy", np.frombuffer(text.read_bytes(), dtype=np.uint8))
    one_line_exit_2(capsys, "execute", "--model", tmp_path / "hf", "--policy", "gpu-only", "--steps", "1",
                    "--seq", "16", "--data", tmp_path / "ids.npy", match="outside the model's vocabulary of 128")


def test_a_plan_for_another_model_is_refused_naming_both(capsys, tmp_path):
    plan = tmp_path / "p.json"
    assert main(["plan", "--model", "tiny-llama", "--hardware", "lsp-4090", "--time-limit", "2", "-o", str(plan)]) == 0
    capsys.readouterr()
    assert json.loads(plan.read_text())["provenance"]["model_identity"]["arch"] == "llama"
    err = one_line_exit_2(capsys, "simulate", "--model", "tiny-gpt2", "--hardware", "lsp-4090", "--plan", plan)
    assert "tiny-llama" in err and "tiny-gpt2" in err
    err = one_line_exit_2(capsys, "execute", "--model", "tiny-gpt2", "--plan", plan, "--steps", "1")
    assert "tiny-llama" in err and "tiny-gpt2" in err
    code, _, _ = run(capsys, "simulate", "--model", "tiny-llama", "--hardware", "lsp-4090", "--plan", plan)
    assert code == 0


def test_an_old_plan_without_identity_still_loads_checked_by_layer_count(capsys):
    example = Path(__file__).parent.parent / "examples" / "gpt3-175b-fuyou-ssd.plan.json"
    assert "model_identity" not in json.loads(example.read_text()).get("provenance", {})
    code, _, _ = run(capsys, "simulate", "--model", "gpt3-175b", "--hardware", "fuyou-4090-12ssd", "--plan", example)
    assert code == 0
    one_line_exit_2(capsys, "simulate", "--model", "tiny-llama", "--hardware", "fuyou-4090-12ssd", "--plan", example,
                    match="layers")


def test_number_type_accepts_exactly_finite_numbers_in_range():
    count = number(int, 1, 10)
    assert count("3") == 3
    for bad in ("0", "11", "2.5", "nan", "true", ""):
        with pytest.raises(Exception):
            count(bad)


def test_a_simulation_too_large_to_build_is_one_clear_error():
    # a million micro-batches per step (a sweep spec accepts grad_accum up to 10**9) would build a
    # graph of tens of millions of tasks: a test worker was killed holding 22 GB
    from tiertune.errors import InputError
    from tiertune.hardware import load_hardware
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.workload import TrainSpec, load_model

    model, hw = load_model("tiny-llama"), load_hardware("lsp-4090")
    train = TrainSpec(batch=1, seq_len=8, grad_accum=10**6)
    with pytest.raises(InputError, match=r"is up to [\d,]+ tasks; at most 10,000,000"):
        simulate(model, train, hw, make_policy("zero-offload", model, train, hw))
