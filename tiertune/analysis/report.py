"""`tiertune report`: one folder a person opens (index.md / index.html) to see where the time goes
and which schedule wins, for one model on one machine — from our own simulations, and from a
recorded trace when one is given (replay what-ifs, predicted vs measured).
"""

from __future__ import annotations

import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from tiertune.analysis import plots
from tiertune.fileio import atomic_write_text
from tiertune.hardware import GiB, HardwareProfile
from tiertune.workload import MODEL_PRESETS, ModelSpec, TrainSpec

SIZE_LADDER = ("gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "llama2-7b", "gpt3-13b", "llama2-13b", "llama2-70b", "gpt3-175b")
BUDGET_POLICIES = ("ideal", "zero-offload", "zero-infinity", "fuyou", "lsp-offload", "megatrain", "lomo")


@dataclass
class Section:
    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figures: list[Path] = field(default_factory=list)     # PNGs (an SVG sits beside each)


def md_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def html_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return html.escape(str(v))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _save(fig, out: Path, name: str) -> Path:
    return plots.save(fig, out / name)[0]


# --- sections ------------------------------------------------------------------------------------

def comparison(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: Path, time_limit_s: float):
    """Every policy plus the planner's schedule; returns the section and the best plan's simulation."""
    from tiertune.planner.compare import comparison as compare_all

    df, planned = compare_all(model, train, hw, time_limit_s)
    shown = df[["policy", "fits", "iteration_s", "tokens_per_s", "tflops", "peak_gpu_gib", "peak_cpu_gib",
                "peak_ssd_gib", "bottleneck", "ratio_to_ideal", "ratio_to_lower_bound", "why_not_fit"]].copy()
    shown["why_not_fit"] = shown["why_not_fit"].fillna("").astype(str).str.slice(0, 90)
    fig = plots.compare_bars(df)
    lb = df.attrs.get("lower_bound_s")
    text = (f"{model.name} ({model.total_params() / 1e9:.1f} B parameters) on {hw.name} ({hw.gpu_name}, "
            f"{hw.gpu_mem_bytes / GiB:.0f} GiB GPU, {hw.cpu_mem_bytes / GiB:.0f} GiB host, {hw.ssd_count} SSD); "
            f"batch {train.batch} x {train.seq_len} tokens, {train.dtype}, {train.optimizer}.")
    if lb:
        text += f" Lower bound on the iteration time: {lb:.4g} s ({df.attrs.get('lower_bound_binding', '')})."
    return Section("Policies compared", text, shown, [_save(fig, out, "compare")]), planned


def schedule(sim, label: str, out: Path) -> Section:
    trace = sim.trace
    figs = [_save(plots.timeline(trace), out, "timeline"), _save(plots.memory(trace), out, "memory")]
    busy = pd.DataFrame({"resource": list(sim.busy_s), "busy_s": list(sim.busy_s.values())})
    busy["share_of_iteration"] = busy["busy_s"] / sim.iteration_s
    return Section(f"Where the time goes: {label}",
                   f"One steady-state iteration ({sim.iteration_s:.4g} s) of the {label} schedule; "
                   f"the bottleneck is `{sim.bottleneck}`.", busy, figs)


def budgets(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: Path, time_limit_s: float) -> Section:
    from tiertune.analysis.sweep import evaluate

    top = hw.gpu_mem_bytes / GiB
    ladder = sorted({b for b in (2, 4, 8, 12, 16, 24, 32, 48, 80, 141) if b <= max(top, 4) * 1.01} | {top})
    rows = [{"policy": p, "gpu_mem_gib": b, **evaluate(model, train, hw.with_gpu_mem(b), p, time_limit_s, 2)}
            for b in ladder for p in (*BUDGET_POLICIES, "planner")]
    df = pd.DataFrame(rows)
    fig = plots.throughput_vs_budget(df)
    table = df.pivot_table(index="gpu_mem_gib", columns="policy", values="tflops", aggfunc="first").reset_index()
    return Section("Throughput vs GPU memory budget", "Achieved model TFLOP/s (0 = does not fit).",
                   table, [_save(fig, out, "throughput_vs_budget")])


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
    return Section("Largest model that fits", f"Over the preset ladder {', '.join(SIZE_LADDER)}, on {hw.name} with "
                   "its host memory (and SSD count) varied.", table, figs)


def whatif_section(trace, out: Path, label: str, name: str = "whatif") -> Section:
    from tiertune.traces.replay import whatif

    df = whatif(trace)
    ok = df[df["iteration_s"].map(math.isfinite)]
    text = "Replaying the trace with one resource at half and at double speed."
    stuck = df[~df.index.isin(ok.index)]
    if len(stuck):
        text += " Did not finish (the engine reports why): " + "; ".join(
            f"{r.resource} x{r.factor:g}: {r.error}" for r in stuck.itertuples())
    figs = [_save(plots.whatif_bars(ok), out, name)] if len(ok) else []
    return Section(f"What if: {label}", text, df, figs)


def validation_section(measured, hw: HardwareProfile, out: Path) -> Section:
    from tiertune.traces.validate import compare, predict

    pred = predict(measured, hw)
    if not pred.fits:
        return Section("Simulator vs measurement", f"The simulator could not run the measured plan with profile "
                       f"`{hw.name}`: {pred.error}")
    v = compare(measured, pred.trace)
    kinds = v.per_kind.groupby("kind")[["measured_s", "predicted_s"]].sum().reset_index()
    pvm = kinds.rename(columns={"kind": "label"})
    pvm = pd.concat([pvm, pd.DataFrame([{"label": "iteration", "measured_s": v.measured_s,
                                         "predicted_s": v.predicted_s}])], ignore_index=True)
    pvm = pvm[(pvm.measured_s > 0) & (pvm.predicted_s > 0)]
    figs = [_save(plots.predicted_vs_measured(pvm), out, "predicted_vs_measured"),
            _save(plots.timeline(pred.trace, measured=measured), out, "timeline_predicted_vs_measured")]
    return Section("Simulator vs measurement",
                   f"Measured {v.measured_s:.4g} s per iteration, predicted {v.predicted_s:.4g} s "
                   f"({v.iteration_error:+.1%}) with profile `{hw.name}`.", v.per_kind, figs)


# --- the document --------------------------------------------------------------------------------

def write_index(out: Path, title: str, sections: list[Section]) -> tuple[Path, Path]:
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        md += [f"## {s.title}", "", s.text, ""]
        body += [f"<h2>{html.escape(s.title)}</h2>", f"<p>{html.escape(s.text)}</p>"]
        for f in s.figures:
            md += [f"![{s.title}]({f.name})", ""]
            body.append(f'<p><img src="{html.escape(f.name)}" alt="{html.escape(s.title)}"></p>')
        if s.table is not None and len(s.table):
            md += [md_table(s.table), ""]
            body.append(html_table(s.table))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;} img{max-width:100%;}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0;} td,th{border:1px solid #ccc;padding:2px 6px;}"
             "th{background:#f0f0f0;}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    atomic_write_text(out / "index.md", "\n".join(md) + "\n")
    atomic_write_text(out / "index.html", page)
    return out / "index.md", out / "index.html"


def build_report(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, out: str | Path,
                 time_limit_s: float = 10.0, trace=None, measured_profile: HardwareProfile | None = None,
                 extra: list[Section] | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """All sections for one (model, hardware); returns the index.md path."""
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
            sections.append(validation_section(trace, measured_profile, out))
    sections += extra or []
    md, _ = write_index(out, f"tiertune report: {model.name} on {hw.name}", sections)
    return md
