"""`tiertune demo`: the whole loop on built-in defaults, on a CPU, in a few minutes.

1. simulate and compare every policy + the planner for GPT-3 13B on Fuyou's RTX 4090 box and for
   Llama-2 7B on LSP-Offload's RTX 4090 workstation (one report folder each);
2. measure this machine (`calibrate --quick`);
3. execute a small built-in Llama for real with an offloading plan (weights and optimizer on the
   SSD tier, activations swapped, CPU Adam overlapped with backward) twice, recording traces: the
   first run refits the profile (`calibrate --from-trace`), the second is predicted with the
   microbenchmarked and with the refit profile and compared; replay its trace with what-if speed-ups;
4. write DIR/index.md and DIR/index.html linking everything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from tiertune.analysis.report import (Section, build_report, significant, validation_section, whatif_section,
                                      write_index)
from tiertune.executor.run import train_plan
from tiertune.hardware import load_hardware
from tiertune.planner.pick import DEFAULT_HARDWARE, policy_plan
from tiertune.traces.calibrate import calibrate
from tiertune.traces.fit import fit_profile
from tiertune.traces.trace import Trace
from tiertune.traces.validate import compare, predict
from tiertune.workload import default_train, load_model

PAIRS = (("gpt3-13b", "fuyou-4090-12ssd"), ("llama2-7b", "lsp-4090"))
EXEC_MODEL, EXEC_POLICY, EXEC_GPU_GIB = "small-llama", "fuyou", 0.05


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out: str | Path = "tiertune-demo", time_limit_s: float = 10.0, steps: int = 8,
             single_file: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sections: list[Section] = []
    rows = []
    for model_name, hw_name in PAIRS:
        _log(f"{model_name} on {hw_name}: compare policies, plan, plot")
        model, hw = load_model(model_name), load_hardware(hw_name)
        md = build_report(model, default_train(model), hw, out / f"{model_name}_on_{hw_name}",
                          time_limit_s=time_limit_s, single_file=single_file, log=_log)
        rows.append({"model": model_name, "hardware": hw_name,
                     "report": f"[{md.parent.name}]({md.parent.name}/index.html)"})
    sections.append(Section("Simulated and planned at scale",
                            "Every named policy and the CP-SAT planner, simulated on the machines the papers "
                            "used; each report compares them, shows where the time goes and how the winner "
                            "changes with the GPU memory budget, host memory and SSD count.",
                            pd.DataFrame(rows)))

    executed = out / "executed"
    executed.mkdir(exist_ok=True)
    # As `validate` does on a CPU: the main thread is the GPU, the copy and optimizer threads get
    # the other cores; a second intra-op thread would fight them and blur every timing.
    torch.set_num_threads(1)
    _log("measuring this machine (calibrate --quick)")
    profile, _ = calibrate(device="cpu", quick=True, progress=False)
    (executed / "profile.toml").write_text(profile.to_toml())
    spec = load_model(EXEC_MODEL)
    plan = policy_plan(spec, load_hardware(DEFAULT_HARDWARE).with_gpu_mem(EXEC_GPU_GIB), EXEC_POLICY, batch=4, seq=128)
    budget = int(EXEC_GPU_GIB * (1 << 30))
    _log(f"executing {EXEC_MODEL} with the {EXEC_POLICY} plan, {steps} steps (CPU standing in for the GPU), "
         f"twice: the first run to fit the profile from, the second to predict")
    fit_run = train_plan(spec, plan, steps, gpu_mem_bytes=budget, offload_dir=executed / "offload")
    fit_run.trace.save(executed / "fit_run.json")
    fitted = fit_profile(fit_run.trace, profile, name="local-cpu-fit").profile
    (executed / "profile_fit.toml").write_text(fitted.to_toml())
    trace_path = executed / "measured.json"
    train_plan(spec, plan, steps, gpu_mem_bytes=budget, offload_dir=executed / "offload").trace.save(trace_path)
    measured = Trace.load(trace_path)
    _log("predicting the executed run and replaying its trace")
    before = compare(measured, predict(measured, profile).trace)
    section, after = validation_section(measured, fitted, executed)
    if after is not None:
        section.text = (
            f"The small built-in Llama ({EXEC_MODEL}) trained for {steps} steps with the {EXEC_POLICY} plan (weights "
            f"and optimizer on the SSD tier, activations swapped, CPU Adam overlapped with backward), this machine's "
            f"CPU standing in for a GPU with a {EXEC_GPU_GIB} GiB budget. Its trace: "
            f"[executed/measured.json](executed/measured.json) (open it in Perfetto).\n\n"
            f"- Measured: {significant(after.measured_s)} s per iteration.\n"
            f"- Predicted by the simulator with this machine's microbenchmarked profile "
            f"([executed/profile.toml](executed/profile.toml), from `calibrate --quick`): "
            f"{significant(before.predicted_s)} s ({before.iteration_error:+.1%}).\n"
            f"- Predicted with that profile refit from an earlier run of the same plan "
            f"([executed/profile_fit.toml](executed/profile_fit.toml), from `calibrate --from-trace` on "
            f"[executed/fit_run.json](executed/fit_run.json)): {significant(after.predicted_s)} s "
            f"({after.iteration_error:+.1%}).\n\n"
            "The figures and the table compare the measured run with the refit profile's prediction, per kind "
            "of task (seconds per iteration).")
    section.title = f"Executed for real: {EXEC_MODEL}, {EXEC_POLICY} plan"
    sections.append(section)
    sections.append(whatif_section(measured, executed, "the executed run", "whatif_measured"))
    md, html = write_index(out, "tiertune demo", sections, single_file)
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return html
