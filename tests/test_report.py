"""`tiertune report`: one folder with index.md / index.html embedding every plot it wrote."""

import re

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
