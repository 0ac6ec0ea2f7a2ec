"""`tiertune report`: one folder a person opens (index.md / index.html) to see where the time goes
and which schedule wins, for one model on one machine — from our own simulations, and from a
recorded trace when one is given (replay what-ifs, predicted vs measured).
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from tiertune.analysis import plots
from tiertune.analysis.html import write_page
from tiertune.fileio import atomic_write_text
from tiertune.hardware import GiB, HardwareProfile
from tiertune.workload import MODEL_PRESETS, ModelSpec, TrainSpec

if TYPE_CHECKING:
    from tiertune.traces.validate import Validation

SIZE_LADDER = ("gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "llama2-7b", "gpt3-13b", "llama2-13b", "llama2-70b", "gpt3-175b")
BUDGET_POLICIES = ("ideal", "zero-offload", "zero-infinity", "fuyou", "lsp-offload", "megatrain", "lomo")


@dataclass
class Section:
    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: list[Path] = field(default_factory=list)     # PNGs where they were saved (an SVG sits beside each)


def significant(v: float, digits: int = 3) -> str:
    """`v` to `digits` significant digits, without an exponent or trailing zeros (8.58, 206, 0.00242)."""
    if not math.isfinite(v):
        return ""
    if v == 0:
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(v))), 0)
    text = f"{v:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _percent(v: float) -> str:
    return f"{v:.0%}" if math.isfinite(v) else ""


def _signed_percent(v: float) -> str:
    return f"{v:+.1%}" if math.isfinite(v) else ""


def _times(v: float) -> str:
    return f"{v:.2f}×" if math.isfinite(v) else ""


def _yes_no(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else ("yes" if v else "no")


def _why(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else textwrap.shorten(str(v), 140)


# How each column a report shows reads: its heading (with the unit) and how a value is written.
COLUMNS: dict[str, tuple[str, Callable]] = {
    "fits": ("fits", _yes_no),
    "lossless": ("lossless", _yes_no),
    "iteration_s": ("iteration (s)", significant),
    "tokens_per_s": ("tokens/s", significant),
    "tflops": ("model TFLOP/s", significant),
    "peak_gpu_gib": ("peak GPU (GiB)", significant),
    "peak_cpu_gib": ("peak host (GiB)", significant),
    "peak_ssd_gib": ("peak SSD (GiB)", significant),
    "ratio_to_ideal": ("time vs ideal", _times),
    "ratio_to_lower_bound": ("time vs lower bound", _times),
    "why_not_fit": ("why it does not fit", _why),
    "busy_s": ("busy per iteration (s)", significant),
    "share_of_iteration": ("share of the iteration", _percent),
    "measured_s": ("measured (s)", significant),
    "predicted_s": ("predicted (s)", significant),
    "error": ("prediction error", _signed_percent),
    "speed": ("speed", lambda v: f"{v:g}×"),
    "change": ("iteration time change", _signed_percent),
    "why_unfinished": ("why the replay did not finish", _why),
    "gpu_mem_gib": ("GPU memory (GiB)", significant),
    "cpu_mem_gib": ("host memory (GiB)", significant),
    "ssd_count": ("SSDs", str),
}


def _plain(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return _yes_no(v)
    if isinstance(v, float):
        return significant(v)
    return str(v)


def readable(df: pd.DataFrame) -> pd.DataFrame:
    """The table as a person reads it: headings with units, numbers to sensible precision, and
    no column that would be empty in every row."""
    shown = {}
    for col in df.columns:
        heading, fmt = COLUMNS.get(col, (str(col), _plain))
        cells = [fmt(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else ""
                 for v in df[col].tolist()]
        if any(cells):
            shown[heading] = cells
    return pd.DataFrame(shown)


def md_table(df: pd.DataFrame) -> str:
    """A Markdown pipe table of `readable(df)` (cells may hold Markdown links)."""
    df = readable(df)
    cell = lambda v: str(v).replace("|", "\\|")
    head = "| " + " | ".join(map(cell, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def _save(fig, out: Path, name: str) -> Path:
    return plots.save(fig, out / name)[0]


# --- sections ------------------------------------------------------------------------------------

def comparison(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: Path, time_limit_s: float):
    """Every policy plus the planner's schedule; returns the section and the best plan's simulation."""
    from tiertune.planner.compare import comparison as compare_all

    df, planned = compare_all(model, train, hw, time_limit_s)
    shown = df[["policy", "fits", "iteration_s", "tokens_per_s", "tflops", "peak_gpu_gib", "peak_cpu_gib",
                "peak_ssd_gib", "bottleneck", "ratio_to_ideal", "ratio_to_lower_bound", "lossless", "why_not_fit"]]
    fig = plots.compare_bars(df)
    lb = df.attrs.get("lower_bound_s")
    ssds = f"{hw.ssd_count} SSD{'s' if hw.ssd_count != 1 else ''}"
    text = (f"{model.name} ({model.total_params() / 1e9:.1f} B parameters) on {hw.name} ({hw.gpu_name}, "
            f"{hw.gpu_mem_bytes / GiB:.0f} GiB GPU, {hw.cpu_mem_bytes / GiB:.0f} GiB host memory, {ssds}); "
            f"batch {train.batch} of {train.seq_len} tokens, {train.dtype}, {train.optimizer}. "
            "Every number is simulated: one steady-state iteration of each named policy and of the planner's "
            "schedule; `ideal` is everything on a GPU with unlimited memory, the reference the others are "
            "timed against.")
    if lb:
        text += (f" No schedule can take less than {significant(lb)} s per iteration on this machine "
                 f"(lower bound, set by the {df.attrs.get('lower_bound_binding', '')}).")
    return Section("Policies compared", text, shown, [_save(fig, out, "compare")]), planned


def schedule(sim, label: str, out: Path) -> Section:
    trace = sim.trace
    figs = [_save(plots.timeline(trace), out, "timeline"), _save(plots.memory(trace), out, "memory")]
    busy = pd.DataFrame({"resource": list(sim.busy_s), "busy_s": list(sim.busy_s.values())})
    busy["share_of_iteration"] = busy["busy_s"] / sim.iteration_s
    return Section(f"Where the time goes: {label}",
                   f"One simulated steady-state iteration ({significant(sim.iteration_s)} s) of the {label} "
                   f"schedule: what each resource does when, and what each memory tier holds. The bottleneck "
                   f"is the {sim.bottleneck}.", busy, figs)


def budgets(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: Path, time_limit_s: float) -> Section:
    from tiertune.analysis.sweep import evaluate

    top = hw.gpu_mem_bytes / GiB
    ladder = sorted({b for b in (2, 4, 8, 12, 16, 24, 32, 48, 80, 141) if b <= max(top, 4) * 1.01} | {top})
    rows = [{"policy": p, "gpu_mem_gib": b, **evaluate(model, train, hw.with_gpu_mem(b), p, time_limit_s, 2)}
            for b in ladder for p in (*BUDGET_POLICIES, "planner")]
    df = pd.DataFrame(rows)
    fig = plots.throughput_vs_budget(df)
    table = df.pivot_table(index="gpu_mem_gib", columns="policy", values="tflops", aggfunc="first").reset_index()
    return Section("Throughput vs GPU memory budget",
                   f"Simulated model TFLOP/s of each policy when {hw.name}'s GPU memory is limited to each "
                   "budget (0: the policy does not fit in it).", table, [_save(fig, out, "throughput_vs_budget")])


def _largest(hw: HardwareProfile, train: dict, policies: tuple[str, ...]) -> dict[str, float]:
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.errors import InputError
    from tiertune.workload import TrainSpec as TS

    best = {p: 0.0 for p in policies}
    for name in SIZE_LADDER:
        m = MODEL_PRESETS[name]
        t = TS(**{**train, "seq_len": min(train["seq_len"], m.max_seq_len)})
        for p in policies:
            try:
                plan = make_policy(p, m, t, hw)
                if simulate(m, plan.train, hw, plan, iterations=2).fits:
                    best[p] = max(best[p], m.total_params() / 1e9)
            except InputError:
                pass
    return best


def max_model(hw: HardwareProfile, train: TrainSpec, out: Path) -> Section:
    policies = tuple(p for p in BUDGET_POLICIES if p != "ideal") + ("gpu-only",)
    base = {"batch": train.batch, "seq_len": train.seq_len, "dtype": train.dtype, "optimizer": train.optimizer}
    rows = []
    for mem in (32, 64, 128, 256, 512, 768, 1536):
        for p, b in _largest(hw.replace(cpu_mem_bytes=mem * GiB), base, policies).items():
            rows.append({"policy": p, "cpu_mem_gib": mem, "max_params_b": b})
    by_mem = pd.DataFrame(rows)
    rows = []
    for n in (1, 2, 4, 8, 12):
        for p, b in _largest(hw.replace(ssd_count=n), base, policies).items():
            rows.append({"policy": p, "ssd_count": n, "max_params_b": b})
    by_ssd = pd.DataFrame(rows)
    figs = [_save(plots.max_model_vs_memory(by_mem, x="cpu_mem_gib"), out, "max_model_vs_cpu_mem"),
            _save(plots.max_model_vs_memory(by_ssd, x="ssd_count"), out, "max_model_vs_ssds")]
    table = by_mem.pivot_table(index="cpu_mem_gib", columns="policy", values="max_params_b").reset_index()
    return Section("Largest model that fits",
                   f"Billions of parameters of the largest preset model ({', '.join(SIZE_LADDER)}) each policy "
                   f"fits on {hw.name} (0: none), simulated as its host memory (table, first figure) and its "
                   "number of SSDs (second figure) vary.", table, figs)


def whatif_section(trace, out: Path, label: str, name: str = "whatif") -> Section:
    from tiertune.traces.replay import whatif

    df = whatif(trace)
    ok = df[df["iteration_s"].map(math.isfinite)]
    base_s = float(df["iteration_s"].iloc[0])
    text = ("The trace replayed with one resource at half and at double speed: how much each resource's "
            f"speed moves the iteration time (unchanged replay: {significant(base_s)} s).")
    figs = [_save(plots.whatif_bars(ok), out, name)] if len(ok) else []
    table = pd.DataFrame({"resource": ["none (unchanged)", *df["resource"].iloc[1:]], "speed": df["factor"],
                          "iteration_s": df["iteration_s"], "change": df["iteration_s"] / base_s - 1,
                          "why_unfinished": df["error"]})
    return Section(f"What if: {label}", text, table, figs)


def validation_section(measured, hw: HardwareProfile, out: Path,
                       profile_text: str | None = None) -> tuple[Section, Validation | None]:
    """The measured run against the simulator's prediction of it with profile `hw` (described in
    the text as `profile_text`); also returns the comparison (None when the simulator could not run it)."""
    from tiertune.traces.validate import compare, predict

    profile_text = profile_text or f"profile `{hw.name}`"
    pred = predict(measured, hw)
    if not pred.fits:
        return Section("Simulator vs measurement", f"The simulator could not run the measured plan with "
                       f"{profile_text}: {pred.error}"), None
    v = compare(measured, pred.trace)
    kinds = v.per_kind.groupby("kind")[["measured_s", "predicted_s"]].sum().reset_index()
    pvm = kinds.rename(columns={"kind": "label"})
    pvm = pd.concat([pvm, pd.DataFrame([{"label": "iteration", "measured_s": v.measured_s,
                                         "predicted_s": v.predicted_s}])], ignore_index=True)
    pvm = pvm[(pvm.measured_s > 0) & (pvm.predicted_s > 0)]
    figs = [_save(plots.predicted_vs_measured(pvm), out, "predicted_vs_measured"),
            _save(plots.timeline(pred.trace, measured=measured), out, "timeline_predicted_vs_measured")]
    return Section("Simulator vs measurement",
                   f"Measured: {significant(v.measured_s)} s per iteration. Predicted by the simulator with "
                   f"{profile_text}: {significant(v.predicted_s)} s ({v.iteration_error:+.1%}). The figures and "
                   "the table set the two side by side, per kind of task (seconds per iteration).",
                   v.per_kind, figs), v


# --- the document --------------------------------------------------------------------------------

def write_index(out: Path, title: str, sections: list[Section], single_file: bool = False) -> tuple[Path, Path]:
    """index.md (figures and links relative to `out`) and the index.html rendered from it."""
    md = [f"# {title}", ""]
    for s in sections:
        md += [f"## {s.title}", "", s.text, ""]
        for f in s.figures:
            png = Path(os.path.relpath(f, out)).as_posix()
            md += [f"[![{s.title}]({png})]({png[:-len('.png')]}.svg)", ""]
        if s.table is not None and len(s.table):
            md += [md_table(s.table), ""]
    atomic_write_text(out / "index.md", "\n".join(md))
    return out / "index.md", write_page(out / "index.md", single_file)


def build_report(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: str | Path,
                 time_limit_s: float = 10.0, trace=None, measured_profile: HardwareProfile | None = None,
                 extra: list[Section] | None = None, single_file: bool = False,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """All sections for one (model, hardware); returns the index.md path (index.html beside it,
    self-contained with `single_file`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    log(f"[report] comparing policies for {model.name} on {hw.name}")
    sec, planned = comparison(model, train, hw, out, time_limit_s)
    sections.append(sec)
    if planned is not None:
        log("[report] timeline and memory of the planned schedule")
        sections.append(schedule(planned.sim, "planner", out))
        sections.append(whatif_section(planned.sim.trace, out, "the planned schedule"))
    log("[report] throughput vs GPU budget")
    sections.append(budgets(model, train, hw, out, min(time_limit_s, 3.0)))
    log("[report] largest model vs host memory and SSDs")
    sections.append(max_model(hw, train, out))
    if trace is not None:
        log("[report] replay and validation of the given trace")
        sections.append(whatif_section(trace, out, "the given trace", "whatif_trace"))
        if trace.source == "measured" and measured_profile is not None:
            sections.append(validation_section(trace, measured_profile, out)[0])
    sections += extra or []
    md, _ = write_index(out, f"tiertune report: {model.name} on {hw.name}", sections, single_file)
    return md
