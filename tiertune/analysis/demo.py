"""`tiertune demo`: the whole loop on built-in defaults, on a CPU, in a few minutes.

1. simulate and compare every policy + the planner for GPT-3 13B on Fuyou's RTX 4090 box and for
   Llama-2 7B on LSP-Offload's RTX 4090 workstation (one report folder each);
2. execute a small built-in Llama for real with an offloading plan (weights and optimizer on the
   SSD tier, activations swapped, CPU Adam overlapped with backward) and record its trace;
3. measure this machine (`calibrate --quick`), predict the same run with the simulator, and
   compare; replay the measured trace with what-if speed-ups;
4. write DIR/index.md and DIR/index.html linking everything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

from tiertune.analysis.report import Section, build_report, md_table, validation_section, whatif_section, write_index
from tiertune.commands.common import default_train
from tiertune.errors import InputError
from tiertune.hardware import load_hardware
from tiertune.workload import load_model

PAIRS = (("gpt3-13b", "fuyou-4090-12ssd"), ("llama2-7b", "lsp-4090"))
EXEC_MODEL, EXEC_POLICY = "small-llama", "fuyou"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out: str | Path = "tiertune-demo", time_limit_s: float = 10.0, steps: int = 8) -> Path:
    from tiertune.cli import main as cli

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections: list[Section] = []
    rows = []
    for model_name, hw_name in PAIRS:
        _log(f"{model_name} on {hw_name}: compare policies, plan, plot")
        model, hw = load_model(model_name), load_hardware(hw_name)
        md = build_report(model, default_train(model), hw, out / f"{model_name}_on_{hw_name}",
                          time_limit_s=time_limit_s, log=_log)
        rows.append({"model": model_name, "hardware": hw_name, "report": f"{md.parent.name}/index.html"})
    sections.append(Section("Simulated and planned at scale",
                            "Every named policy and the CP-SAT planner, simulated on the machines the papers used.",
                            pd.DataFrame(rows)))

    executed = out / "executed"
    executed.mkdir(exist_ok=True)
    trace_path = executed / "measured.json"
    _log(f"executing {EXEC_MODEL} with the {EXEC_POLICY} plan for {steps} steps (CPU standing in for the GPU)")
    rc = cli(["execute", "--model", EXEC_MODEL, "--policy", EXEC_POLICY, "--steps", str(steps), "--batch", "4",
              "--seq", "128", "--gpu-mem", "0.05", "--offload-dir", str(executed / "offload"),
              "--trace", str(trace_path)])
    if rc != 0:
        raise InputError(f"the demo's execute step failed (exit {rc})")
    from tiertune.traces.calibrate import calibrate
    from tiertune.traces.trace import Trace

    _log("measuring this machine (calibrate --quick)")
    profile, _ = calibrate(device="cpu", quick=True, progress=False)
    (executed / "profile.toml").write_text(profile.to_toml())
    measured = Trace.load(trace_path)
    _log("predicting the executed run and replaying its trace")
    val = validation_section(measured, profile, executed)
    sections.append(Section(f"Executed for real: {EXEC_MODEL}, {EXEC_POLICY} plan",
                            f"{steps} steps on this machine's CPU standing in for a GPU with a 0.05 GiB budget; "
                            f"trace in `executed/measured.json` (open it in Perfetto). " + val.text,
                            val.table, val.figures))
    sections.append(whatif_section(measured, executed, "the executed run", "whatif_measured"))
    for s in sections[1:]:          # figures of the executed run live in executed/
        s.figures = [executed.name / Path(f.name) for f in s.figures]
    sections[0].text += "\n\n" + "\n".join(f"- [{r['model']} on {r['hardware']}]({r['report']})" for r in rows)
    md, html = write_index(out, "tiertune demo", sections)
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return html
