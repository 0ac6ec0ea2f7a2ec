"""`tiertune report`: one folder with index.md / index.html embedding every plot it wrote, in tables
and sentences a person reads (units, sensible precision, no empty columns)."""

import math
import re

import pandas as pd
from hypothesis import given, strategies as st

from tiertune.analysis.report import readable, significant
from tiertune.cli import main


def test_report_writes_an_index_that_embeds_every_plot(tmp_path, capsys):
    out = tmp_path / "rep"
    sim_trace = tmp_path / "run.json"
    assert main(["simulate", "--model", "gpt3-1.3b", "--hardware", "lsp-a1000-laptop", "--policy", "zero-offload",
                 "--seq", "512", "--trace", str(sim_trace)]) == 0
    rc = main(["report", "--model", "gpt3-1.3b", "--hardware", "lsp-a1000-laptop", "--seq", "512",
               "--time-limit", "1", "--trace", str(sim_trace), "-o", str(out)])
    assert rc == 0
    assert "index.md" in capsys.readouterr().out
    md = (out / "index.md").read_text()
    html = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    embedded = sorted(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md))
    assert pngs == embedded
    for name in ("compare", "timeline", "memory", "whatif", "whatif_trace", "throughput_vs_budget",
                 "max_model_vs_cpu_mem", "max_model_vs_ssds"):
        assert f"{name}.png" in pngs and (out / f"{name}.svg").exists()
        assert f'src="{name}.png"' in html
    for title in ("Policies compared", "Where the time goes", "Throughput vs GPU memory budget",
                  "Largest model that fits", "What if"):
        assert f"## {title}" in md
    assert "| policy | fits |" in md and "| planner |" in md


def test_report_refuses_an_unknown_preset_in_one_line(tmp_path, capsys):
    assert main(["report", "--model", "gpt3-1.3b", "--hardware", "nope", "-o", str(tmp_path / "r")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# --- how numbers and tables read -----------------------------------------------------------------

def test_numbers_read_to_three_significant_digits_without_exponents():
    assert [significant(v) for v in (8.58, 205.8, 0.002413, 1536.0, 12.0, 0.0, -0.0775, math.nan)] == \
        ["8.58", "206", "0.00241", "1,536", "12", "0", "-0.0775", ""]


@given(st.floats(min_value=1e-6, max_value=1e9) | st.floats(min_value=-1e9, max_value=-1e-6))
def test_a_number_written_reads_back_within_its_precision(v):
    text = significant(v)
    assert "e" not in text
    assert math.isclose(float(text.replace(",", "")), v, rel_tol=5.01e-3)


def test_tables_carry_units_and_no_column_that_is_empty_everywhere():
    df = pd.DataFrame({"resource": ["gpu", "cpu"], "factor": [0.5, 2.0], "speed": [0.5, 2.0],
                       "iteration_s": [2.998, math.nan], "error": [None, None],
                       "ratio_to_ideal": [3.8604, 1.0], "fits": [True, False]})
    shown = readable(df)
    assert list(shown.columns) == ["resource", "factor", "speed", "iteration (s)", "time vs ideal", "fits"]
    assert shown.to_dict("list") == {"resource": ["gpu", "cpu"], "factor": ["0.5", "2"], "speed": ["0.5×", "2×"],
                                     "iteration (s)": ["3", ""], "time vs ideal": ["3.86×", "1.00×"],
                                     "fits": ["yes", "no"]}
