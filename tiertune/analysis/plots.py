"""The figures a systems paper about tiertune shows, drawn with matplotlib from plain data.

Each function takes a `Trace` or a small DataFrame and returns a `matplotlib.figure.Figure`
(tests inspect its axes, lines and patches); `save` writes it as PNG and SVG, atomically.

Figures are built with `Figure` and an Agg canvas directly, not through `pyplot`: nothing here
needs a display, figures are not kept alive by pyplot's global registry (no leak when a report
draws hundreds), and the caller's interactive backend, if any, is left alone.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from tiertune.analysis import style
from tiertune.errors import InputError
from tiertune.fileio import atomic_write
from tiertune.traces.trace import Trace

__all__ = ["save", "timeline", "memory", "throughput_vs_budget", "max_model_vs_memory",
           "predicted_vs_measured", "whatif_bars", "compare_bars"]

GIB = 1 << 30
MIB = 1 << 20
UNLIMITED_BYTES = 1 << 60   # the `ideal` policy's "unlimited" capacity is 1 << 62

# Applied while a figure is built and saved: sizes chosen to stay legible when a figure is
# shrunk to one column of a two-column paper; SVG text stays text, and the SVG ids are salted
# with a constant so the same figure gives the same file.
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "svg.fonttype": "none",
    "svg.hashsalt": "tiertune",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


# --- saving ----------------------------------------------------------------------------------


def save(fig: Figure, path_without_suffix: str | Path, dpi: int = 200) -> list[Path]:
    """Write `fig` as `<path>.png` and `<path>.svg` (each to a temp file, then renamed).

    A trailing `.png` / `.svg` on the path is dropped; any other dot stays part of the name
    (so `fig.v2` gives `fig.v2.png`). Returns the files written.
    """
    base = Path(path_without_suffix)
    if base.suffix in (".png", ".svg"):
        base = base.with_suffix("")
    written = []
    with matplotlib.rc_context(RC):
        for fmt in ("png", "svg"):
            out = base.parent / f"{base.name}.{fmt}"
            # No timestamp in the SVG and no software tag in the PNG: the same figure gives the same bytes.
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            with atomic_write(out, "wb") as f:
                fig.savefig(f, format=fmt, dpi=dpi, metadata=meta)
            written.append(out)
    return written


# --- helpers -----------------------------------------------------------------------------------


def _need(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{what}: data lacks column(s) {missing}; has {list(df.columns)}")


def _fits(df: pd.DataFrame) -> pd.Series:
    """The `fits` column as booleans (missing column: everything fits)."""
    if "fits" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["fits"].fillna(False).astype(bool)


def _time_unit(span_s: float) -> tuple[str, float]:
    """Milliseconds unless the span is long enough that ms tick labels get unwieldy."""
    return ("s", 1.0) if span_s >= 10.0 else ("ms", 1e3)


def _bytes_unit(max_bytes: float) -> tuple[str, float]:
    return ("GiB", GIB) if max_bytes >= 0.5 * GIB else ("MiB", MIB)


def _fmt_bytes(b: float) -> str:
    if b >= UNLIMITED_BYTES:
        return "unlimited"
    if b >= 1 << 40:
        return f"{b / (1 << 40):.1f} TiB"
    if b >= 0.5 * GIB:
        return f"{b / GIB:.1f} GiB"
    return f"{b / MIB:.0f} MiB"


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "n/a"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def _name(value) -> str | None:
    """A display name from a meta entry that may be a string or a dict with a `name`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    return None


def _describe(meta: dict) -> str:
    """`model · hardware · policy` from a trace's meta, as far as it says."""
    parts = [_name(meta.get("model")), _name(meta.get("hardware"))]
    plan = meta.get("plan")
    policy = meta.get("policy")
    if policy is None and isinstance(plan, dict):
        policy = (plan.get("provenance") or {}).get("policy")
    parts.append(policy if isinstance(policy, str) else None)
    return " · ".join(p for p in parts if p)


def _policies(df: pd.DataFrame) -> list[str]:
    return style.ordered(df["policy"].dropna().unique(), style.POLICY_ORDER)


def _line_style(policy: str) -> dict:
    kw = {"color": style.policy_color(policy), "marker": style.policy_marker(policy), "markersize": 5,
          "linewidth": 1.6, "zorder": 2}
    if policy == "planner":
        kw.update(linewidth=2.6, markersize=10, zorder=4)
    elif policy == "ideal":
        kw.update(linestyle="--", zorder=1)
    return kw


def _use_log(values: np.ndarray, ratio: float = 20.0) -> bool:
    v = values[np.isfinite(values)]
    return len(v) > 1 and bool((v > 0).all()) and v.max() / v.min() >= ratio


def _ticks_at_values(ax, values: np.ndarray, log: bool, integer: bool = False) -> None:
    """Put x ticks at the budgets actually swept (a sweep has few of them) so a reader need not
    interpolate; fall back to automatic ticks when there are too many to label."""
    uniq = np.unique(values[np.isfinite(values)])
    if log:
        ax.set_xscale("log", base=2)
    if 0 < len(uniq) <= 12:
        ax.set_xticks(uniq)
        ax.set_xticklabels([f"{v:g}" for v in uniq])
        ax.minorticks_off()
    elif integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- 1. timeline -------------------------------------------------------------------------------


def _pick_iteration(trace: Trace, iteration: int | None, what: str) -> int:
    iters = sorted(int(i) for i in trace.events["iteration"].unique())
    if not iters:
        raise InputError(f"{what} trace has no events to draw")
    if iteration is None:
        # The first iteration pays the pipeline fill; the second is the first steady one.
        return iters[1] if len(iters) > 1 else iters[0]
    if iteration not in iters:
        raise InputError(f"{what} trace has no iteration {iteration}; it has {iters[0]}..{iters[-1]}")
    return iteration


def _iteration_window(trace: Trace, it: int) -> pd.DataFrame:
    """Everything the resources did between the end of iteration it-1 and the end of iteration
    it, whichever iteration a task belongs to (a deferred update of it-1 overlapping the forward
    of it is part of the steady state), clipped to that window. The first iteration's window
    opens at its first event."""
    ev = trace.events
    ends = trace.iteration_ends()
    hi = float(ends.loc[it])
    prev = ends[ends.index < it]
    lo = float(prev.iloc[-1]) if len(prev) else float(ev.loc[ev["iteration"] == it, "start_s"].min())
    win = ev[(ev["end_s"] > lo) & (ev["start_s"] < hi)].copy()
    win["start_s"] = win["start_s"].clip(lower=lo)
    win["end_s"] = win["end_s"].clip(upper=hi)
    return win


def _lane_slots(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, int]:
    """Greedy interval colouring: the sub-row of each event so events that overlap on one
    resource (a CPU with several workers, a trace with concurrent copies) do not hide each other.
    Returns the sub-row per event (input order) and how many sub-rows the lane needs."""
    order = np.lexsort((end, start))
    slot = np.zeros(len(start), dtype=int)
    busy: list[tuple[float, int]] = []   # (end, slot) of events still running
    free: list[int] = []
    n = 0
    eps = 1e-12
    for i in order:
        while busy and busy[0][0] <= start[i] + eps:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            s = heapq.heappop(free)
        else:
            s, n = n, n + 1
        slot[i] = s
        heapq.heappush(busy, (end[i], s))
    return slot, max(n, 1)


def _union_length(start: np.ndarray, end: np.ndarray) -> float:
    if len(start) == 0:
        return 0.0
    order = np.argsort(start)
    total, cur_s, cur_e = 0.0, start[order[0]], end[order[0]]
    for i in order[1:]:
        if start[i] > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = start[i], end[i]
        else:
            cur_e = max(cur_e, end[i])
    return float(total + cur_e - cur_s)


_MIN_BAR_FRACTION = 0.0008    # of the shown span: about 1.5 px on a 2200 px wide PNG
_EDGE_MIN_FRACTION = 0.005    # narrower bars get no white edge, which would paint them white


def _draw_gantt(ax, ev: pd.DataFrame, lanes: list[str], scale: float) -> float:
    """One PolyCollection per (resource, kind) (what `broken_barh` makes, but with a sub-row per
    event), so thousands of events cost a handful of artists. Returns the span in seconds."""
    t0 = float(ev["start_s"].min())
    span = float(ev["end_s"].max()) - t0
    for lane, res in enumerate(lanes):
        sub = ev[ev["resource"] == res]
        if sub.empty:
            continue
        start = sub["start_s"].to_numpy() - t0
        end = sub["end_s"].to_numpy() - t0
        slot, n_slots = _lane_slots(start, end)
        h = 0.8 / n_slots
        y0 = lane - 0.4 + slot * h
        kinds = sub["kind"].to_numpy()
        # Events shorter than ~1 pixel would vanish (a 30 ms kernel in a 45 s SSD-bound
        # iteration), leaving a lane that looks idle: draw them at least `min_w` wide.
        min_w = _MIN_BAR_FRACTION * span
        for kind in style.ordered(set(kinds), style.KIND_ORDER):
            m = kinds == kind
            x0, y = start[m] * scale, y0[m]
            x1 = np.maximum(end[m], start[m] + min_w) * scale
            # Rectangles as (n, 4, 2) vertices, built in numpy rather than one patch per event.
            verts = np.stack([np.column_stack([x0, y]), np.column_stack([x0, y + h]),
                              np.column_stack([x1, y + h]), np.column_stack([x1, y])], axis=1)
            # A hairline white edge separates back-to-back events of one kind; a bar too thin for
            # one (or a lane of hundreds) gets none, which would paint it white.
            edged = (end[m] - start[m] >= _EDGE_MIN_FRACTION * span) & (len(x0) <= 200)
            pc = PolyCollection(verts, facecolors=style.kind_color(kind),
                                edgecolors=["white" if e else "none" for e in edged],
                                linewidths=np.where(edged, 0.4, 0.0), antialiased=bool(edged.any()))
            pc.set_gid(f"{res}/{kind}")
            ax.add_collection(pc, autolim=False)
    ax.set_xlim(0, span * scale * 1.01 if span > 0 else 1)
    ax.set_ylim(len(lanes) - 0.5, -0.5)   # first lane (gpu) on top
    ax.grid(axis="y", visible=False)
    return span


def _lane_labels(ev: pd.DataFrame, lanes: list[str], span: float) -> list[str]:
    """`GPU\\n93% busy`: the busy share of the shown span, so the bottleneck reads off the axis."""
    labels = []
    for res in lanes:
        sub = ev[ev["resource"] == res]
        busy = _union_length(sub["start_s"].to_numpy(), sub["end_s"].to_numpy()) if len(sub) else 0.0
        pct = 100.0 * busy / span if span > 0 else 0.0
        labels.append(f"{style.resource_label(res)}\n{pct:.0f}% busy" if len(sub) else
                      f"{style.resource_label(res)}\nidle")
    return labels


def timeline(trace: Trace, iteration: int | None = None, measured: Trace | None = None) -> Figure:
    """Gantt chart of one steady-state iteration: one lane per resource with events, bars
    coloured by task kind, time from the iteration's first event (very short events are drawn
    about a pixel wide so they stay visible). With `measured`, the predicted
    and the measured iteration side by side on the same lanes and the same time scale."""
    panels = [("Predicted" if measured is not None else trace.source.capitalize(), trace)]
    if measured is not None:
        panels.append(("Measured", measured))
    chosen = []
    for title, tr in panels:
        it = _pick_iteration(tr, iteration, title.lower())
        chosen.append((title, tr, it, _iteration_window(tr, it)))

    lanes = style.ordered(set().union(*(set(ev["resource"]) for *_, ev in chosen)), style.RESOURCE_ORDER)
    spans = [float(ev["end_s"].max() - ev["start_s"].min()) for *_, ev in chosen]
    unit, scale = _time_unit(max(spans))
    kinds = style.ordered(set().union(*(set(ev["kind"]) for *_, ev in chosen)), style.KIND_ORDER)

    width = 11.0 if len(chosen) == 1 else 15.0
    fig = _figure(width, 1.6 + 0.55 * len(lanes))
    with matplotlib.rc_context(RC):
        axes = fig.subplots(1, len(chosen), sharex=True, squeeze=False)[0]
        for ax, (title, tr, it, ev), span in zip(axes, chosen, spans):
            _draw_gantt(ax, ev, lanes, scale)
            # Measured lanes are labelled on their own side: their busy shares differ.
            ax.set_yticks(range(len(lanes)), _lane_labels(ev, lanes, span))
            ax.tick_params(axis="y", labelleft=True, length=0)
            ax.set_xlabel(f"time in iteration ({unit})")
            ax.set_xlim(0, max(spans) * scale * 1.01 if max(spans) > 0 else 1)
            sub = f"{title}: iteration {it}, {_fmt_seconds(span)}"
            if title == "Measured" and spans[0] > 0:
                sub += f" ({100.0 * (span - spans[0]) / spans[0]:+.1f}% vs predicted)"
            ax.set_title(sub, loc="left")
        handles = [Patch(facecolor=style.kind_color(k), label=k) for k in kinds]
        # One row when it fits (up to 10 kinds), else two balanced rows.
        ncol = len(kinds) if len(kinds) <= 10 else math.ceil(len(kinds) / 2)
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False,
                   title="task kind")
        head = _describe(trace.meta)
        fig.suptitle("Per-resource timeline of one steady-state iteration" + (f"\n{head}" if head else ""))
    return fig


# --- 2. memory -----------------------------------------------------------------------------------


def memory(trace: Trace) -> Figure:
    """Bytes in use per memory tier over the whole trace (step lines), one panel per tier since
    GPU, CPU and SSD differ by orders of magnitude, with the tier's capacity dashed."""
    mem = trace.memory
    if mem.empty:
        raise InputError("trace has no memory samples to draw")
    tiers = style.ordered(mem["tier"].unique(), style.TIER_ORDER)
    capacity = trace.meta.get("capacity", {}) or {}
    end_s = max(float(mem["time_s"].max()), float(trace.events["end_s"].max()) if len(trace.events) else 0.0)
    t_start = min(float(mem["time_s"].min()), float(trace.events["start_s"].min()) if len(trace.events) else 0.0)
    unit_t, scale_t = _time_unit(end_s - t_start)
    iter_ends = trace.iteration_ends() if len(trace.events) else pd.Series(dtype=float)

    fig = _figure(9.0, 0.6 + 2.0 * len(tiers))
    with matplotlib.rc_context(RC):
        axes = fig.subplots(len(tiers), 1, sharex=True, squeeze=False)[:, 0]
        for ax, tier in zip(axes, tiers):
            s = mem[mem["tier"] == tier].sort_values("time_s", kind="stable")
            t = s["time_s"].to_numpy()
            b = s["bytes"].to_numpy().astype(float)
            # A sample holds until the next one: extend the last level to the end of the trace.
            t = np.append(t, end_s)
            b = np.append(b, b[-1])
            peak = float(b.max())
            cap = capacity.get(tier)
            cap = float(cap) if cap is not None else None
            # Draw the capacity line only when it is on the same scale as the use; an SSD of
            # 46 TB or the `ideal` "unlimited" GPU would flatten the curve to nothing.
            show_cap = cap is not None and (peak <= 0 or cap <= 2.5 * peak)
            unit_b, scale_b = _bytes_unit(max(peak, cap if show_cap else 0.0))
            color = style.tier_color(tier)
            ax.plot((t - t_start) * scale_t, b / scale_b, drawstyle="steps-post", color=color,
                    linewidth=1.4, label=f"{tier} in use")
            ax.fill_between((t - t_start) * scale_t, b / scale_b, step="post", color=color, alpha=0.15,
                            linewidth=0)
            if show_cap:
                ax.axhline(cap / scale_b, color=color, linestyle="--", linewidth=1.2,
                           label=f"{tier} capacity ({_fmt_bytes(cap)})")
            # Shade every other iteration so the periodic pattern is visible.
            prev = t_start
            for k, e in enumerate(iter_ends.to_numpy()):
                if k % 2 == 1:
                    ax.axvspan((prev - t_start) * scale_t, (e - t_start) * scale_t, color="#000000",
                               alpha=0.04, linewidth=0)
                prev = e
            title = f"{style.TIER_LABELS.get(tier, tier)}: peak {_fmt_bytes(peak)}"
            if cap is not None:
                title += f" of {_fmt_bytes(cap)}" + ("" if show_cap else " (capacity off scale)")
                if peak > cap:
                    title += "  OVER CAPACITY"
            ax.set_title(title, loc="left")
            ax.set_ylabel(f"in use ({unit_b})")
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        axes[-1].set_xlabel(f"time ({unit_t})")
        axes[-1].set_xlim(0, (end_s - t_start) * scale_t)
        head = _describe(trace.meta)
        fig.suptitle("Memory in use per tier" + (f" — {head}" if head else ""))
    return fig


# --- 3. throughput vs GPU memory budget ----------------------------------------------------------

_METRIC_LABELS = {"tflops": "achieved TFLOP/s", "tokens_per_s": "throughput (tokens/s)",
                  "iteration_s": "iteration time (s)"}
_X_LABELS = {"gpu_mem_gib": "GPU memory budget (GiB)", "cpu_mem_gib": "CPU memory (GiB)",
             "ssd_count": "number of NVMe SSDs"}


def _policy_lines(ax, df: pd.DataFrame, x: str, y: str) -> list[str]:
    """One Line2D per policy that fits somewhere; non-fitting points become gaps (NaN) so the
    line does not pretend the policy ran there. Returns the policies that never fit."""
    never = []
    fits = _fits(df)
    for pol in _policies(df):
        rows = df[df["policy"] == pol].assign(_fits=fits).sort_values(x, kind="stable")
        if not rows["_fits"].any():
            never.append(pol)
            continue
        yv = rows[y].astype(float).where(rows["_fits"])
        ax.plot(rows[x].astype(float), yv, label=pol, **_line_style(pol))
    return never


def _note_never(ax, never: list[str]) -> None:
    if never:
        # Under the legend, which sits to the right of the axes.
        ax.text(1.03, 0.0, "never fits:\n" + "\n".join(never), transform=ax.transAxes,
                fontsize=8, color="#555555", va="bottom", ha="left")


def throughput_vs_budget(df: pd.DataFrame, metric: str = "tflops") -> Figure:
    """Throughput (`metric`: tflops or tokens_per_s) against the GPU memory budget, one line per
    policy (and the planner); budgets where a policy does not fit are left out of its line."""
    _need(df, ["policy", "gpu_mem_gib", metric], "throughput_vs_budget")
    if df.empty:
        raise InputError("throughput_vs_budget: no rows to draw")
    fig = _figure(7.0, 4.4)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        never = _policy_lines(ax, df, "gpu_mem_gib", metric)
        xs = df["gpu_mem_gib"].to_numpy(dtype=float)
        _ticks_at_values(ax, xs, log=_use_log(xs, 8.0))
        ax.set_xlabel(_X_LABELS["gpu_mem_gib"])
        ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
        ax.set_ylim(bottom=0)
        label = _METRIC_LABELS.get(metric, metric).split(" (")[0]
        ax.set_title(f"{label[:1].upper()}{label[1:]} vs GPU memory budget")
        ax.legend(title="policy", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        _note_never(ax, never)
    return fig


# --- 4. largest trainable model vs memory / SSDs -------------------------------------------------


def max_model_vs_memory(df: pd.DataFrame, x: str = "cpu_mem_gib") -> Figure:
    """The largest model (billions of parameters) each policy can train, against CPU memory
    (or `x="ssd_count"`, or any numeric column), one line per policy."""
    _need(df, ["policy", x, "max_params_b"], "max_model_vs_memory")
    if df.empty:
        raise InputError("max_model_vs_memory: no rows to draw")
    # A policy that cannot train any model at a point reports 0 or NaN: that is a gap, not a fit.
    d = df.assign(fits=_fits(df) & (df["max_params_b"].astype(float) > 0))
    fig = _figure(7.0, 4.4)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        never = _policy_lines(ax, d, x, "max_params_b")
        xs = d[x].to_numpy(dtype=float)
        _ticks_at_values(ax, xs, log=_use_log(xs, 8.0), integer=x == "ssd_count")
        ys = d.loc[d["fits"], "max_params_b"].to_numpy(dtype=float)
        if _use_log(ys, 30.0):
            ax.set_yscale("log")
            ax.set_yticks(sorted(set(np.round(ys, 1))))           # label the model sizes themselves
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(_X_LABELS.get(x, x))
        ax.set_ylabel("largest trainable model (billion parameters)")
        ax.set_title(f"Largest trainable model vs {_X_LABELS.get(x, x).split(' (')[0]}")
        ax.legend(title="policy", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        _note_never(ax, never)
    return fig


# --- 5. predicted vs measured --------------------------------------------------------------------


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error of `predicted` against `measured`, in percent."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return float(np.mean(np.abs(predicted - measured) / np.abs(measured)) * 100.0)


def predicted_vs_measured(df: pd.DataFrame) -> Figure:
    """Predicted against measured time, one annotated point per row, the y=x line and a ±10%
    band; log axes when the times span more than 20x. MAPE in the title."""
    _need(df, ["label", "predicted_s", "measured_s"], "predicted_vs_measured")
    d = df.dropna(subset=["predicted_s", "measured_s"])
    if d.empty:
        raise InputError("predicted_vs_measured: no rows with both a predicted and a measured time")
    if (d["measured_s"] <= 0).any():
        raise InputError("predicted_vs_measured: measured times must be positive")
    pred = d["predicted_s"].to_numpy(float)
    meas = d["measured_s"].to_numpy(float)
    err = mape(pred, meas)
    within = np.abs(pred - meas) <= 0.1 * meas
    allv = np.concatenate([pred, meas])
    log = _use_log(allv, 20.0)
    lo, hi = allv.min(), allv.max()
    if log:
        lo, hi = lo / 1.5, hi * 1.5
    else:
        pad = 0.08 * (hi - lo) if hi > lo else 0.1 * max(hi, 1e-9)
        lo, hi = max(0.0, lo - pad), hi + pad

    fig = _figure(5.6, 5.2)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        line = np.geomspace(lo, hi, 64) if log and lo > 0 else np.linspace(lo, hi, 64)
        ax.fill_between(line, line * 0.9, line * 1.1, color="#999999", alpha=0.2, linewidth=0,
                        label="±10%")
        ax.plot(line, line, color="#333333", linestyle="--", linewidth=1.0, label="y = x (exact)")
        colors = np.where(within, "#1f77b4", "#d62728")
        ax.scatter(meas, pred, c=list(colors), s=28, zorder=3, edgecolors="white", linewidths=0.5)
        # Points crowd along the diagonal, so labels go off it: alternately above-left and
        # below-right (by x order), away from their neighbours' points and labels.
        for rank, i in enumerate(np.argsort(meas)):
            above = rank % 2 == 0
            ax.annotate(str(d["label"].iloc[i]), (meas[i], pred[i]), xytext=(-5, 4) if above else (5, -4),
                        textcoords="offset points", fontsize=7, color="#333333",
                        ha="right" if above else "left", va="bottom" if above else "top")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        if log:   # plain numbers (0.1, 1, 10) read faster than 10^-1, 10^0, 10^1
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("measured time (s)")
        ax.set_ylabel("predicted time (s)")
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], marker="o", linestyle="", color="#1f77b4", label="within ±10%"),
                    Line2D([], [], marker="o", linestyle="", color="#d62728", label="outside ±10%")]
        ax.legend(handles=handles, loc="upper left", frameon=False)
        ax.set_title(f"Predicted vs measured: MAPE {err:.1f}%\n"
                     f"{int(within.sum())} of {len(d)} within ±10%")
    return fig


# --- 6. what-if bars -------------------------------------------------------------------------------

_BASELINE_NAMES = {"baseline", "none", ""}


def whatif_bars(df: pd.DataFrame) -> Figure:
    """Iteration time as one resource at a time is made `factor` times faster: bars grouped by
    resource, one bar per factor, the unchanged machine (factor 1.0) as a dashed line."""
    _need(df, ["resource", "factor", "iteration_s"], "whatif_bars")
    if df.empty:
        raise InputError("whatif_bars: no rows to draw")
    d = df.assign(resource=df["resource"].fillna("").astype(str), factor=df["factor"].astype(float))
    base_rows = d[np.isclose(d["factor"], 1.0)]
    if base_rows.empty:
        raise InputError("whatif_bars: needs a baseline row with factor 1.0")
    baseline = float(base_rows["iteration_s"].median())
    d = d[~d["resource"].str.lower().isin(_BASELINE_NAMES)]
    resources = style.ordered(d["resource"].unique(), style.RESOURCE_ORDER)
    factors = sorted(d["factor"].unique())
    # Slower-than-today factors (< 1) in reds, faster ones in blues, 1.0 in grey.
    blues = matplotlib.colormaps["Blues"]
    reds = matplotlib.colormaps["Reds"]
    faster = [f for f in factors if f > 1.0 + 1e-9]
    slower = [f for f in factors if f < 1.0 - 1e-9]

    def fcolor(f: float):
        if f in faster:
            return blues(0.45 + 0.5 * faster.index(f) / max(len(faster) - 1, 1))
        if f in slower:
            return reds(0.75 - 0.4 * slower.index(f) / max(len(slower) - 1, 1))
        return "#bbbbbb"

    n = len(factors)
    width = 0.8 / max(n, 1)
    fig = _figure(max(6.0, 1.0 + 1.3 * len(resources) * max(1, n / 3)), 4.4)
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        for j, f in enumerate(factors):
            xs, ys = [], []
            for i, r in enumerate(resources):
                row = d[(d["resource"] == r) & np.isclose(d["factor"], f)]
                if row.empty:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(float(row["iteration_s"].iloc[0]))
            if not xs:
                continue
            bars = ax.bar(xs, ys, width=width * 0.92, color=fcolor(f), label=f"×{f:g}")
            # The speed-up over the unchanged machine above each bar: what a reader wants to know.
            ax.bar_label(bars, labels=[f"{baseline / y:.2f}×" if y > 0 else "" for y in ys],
                         fontsize=6.5, padding=1.5, rotation=90 if n > 4 else 0)
        ax.axhline(baseline, color="#333333", linestyle="--", linewidth=1.0,
                   label=f"unchanged ({_fmt_seconds(baseline)})")
        ax.set_xticks(range(len(resources)), [style.resource_label(r) for r in resources])
        ax.grid(axis="x", visible=False)
        ax.set_xlabel("resource made faster")
        ax.set_ylabel("iteration time (s)")
        ax.set_ylim(0, max(float(d["iteration_s"].max()), baseline) * 1.18)
        ax.set_title("What-if: iteration time as each resource's speed scales\n"
                     "(label: speed-up over the unchanged machine)")
        # Factors in increasing order, the unchanged machine last (matplotlib would put lines first).
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(handles)), key=lambda i: isinstance(handles[i], Line2D))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], title="resource speed",
                  loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


# --- 7. policy comparison bars ---------------------------------------------------------------------


def compare_bars(df: pd.DataFrame) -> Figure:
    """Iteration time per policy as horizontal bars, fastest on top, each annotated with its
    bottleneck resource; policies that do not fit are hatched and labelled at the bottom."""
    _need(df, ["policy", "iteration_s"], "compare_bars")
    if df.empty:
        raise InputError("compare_bars: no rows to draw")
    d = df.assign(ok_=_fits(df) & np.isfinite(df["iteration_s"].astype(float)))
    ok = d[d["ok_"]].sort_values("iteration_s", kind="stable")
    bad = d[~d["ok_"]]
    bad = bad.set_index("policy").loc[style.ordered(bad["policy"], style.POLICY_ORDER)].reset_index()
    rows = pd.concat([ok, bad], ignore_index=True)
    longest = float(ok["iteration_s"].max()) if len(ok) else 1.0
    # Ratios against the planner (what the paper claims against), else against the fastest real
    # policy; `ideal` has unlimited GPU memory, so it is a reference, not a competitor.
    real = ok[ok["policy"] != "ideal"]
    planner = ok[ok["policy"] == "planner"]
    if len(planner):
        ref_name, ref = "planner", float(planner["iteration_s"].iloc[0])
    elif len(real):
        ref_name, ref = str(real["policy"].iloc[0]), float(real["iteration_s"].iloc[0])
    else:
        ref_name, ref = "", float("nan")

    fig = _figure(7.5, 1.0 + 0.38 * len(rows))
    with matplotlib.rc_context(RC):
        ax = fig.subplots()
        for y, row in enumerate(rows.itertuples(index=False)):
            pol = str(row.policy)
            color = style.policy_color(pol)
            if row.ok_:
                t = float(row.iteration_s)
                ax.barh(y, t, height=0.7, color=color, edgecolor="#333333" if pol == "planner" else color,
                        linewidth=1.2 if pol == "planner" else 0)
                note = _fmt_seconds(t)
                if ref_name and pol != ref_name and ref > 0:
                    note += f"  ({t / ref:.2f}× {ref_name})"
                bn = getattr(row, "bottleneck", None)
                if isinstance(bn, str) and bn:
                    note += f"  · bound by {style.resource_label(bn)}"
                ax.text(t, y, "  " + note, va="center", fontsize=7.5)
            else:
                # The bar's length carries no time here: it spans the axis so the row is not empty.
                ax.barh(y, longest, height=0.7, facecolor="none", edgecolor=color, hatch="///",
                        linewidth=0.8)
                ax.text(longest * 0.02, y, "does not fit", va="center", fontsize=8, fontweight="bold",
                        color="#333333", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        ax.set_yticks(range(len(rows)), [str(p) for p in rows["policy"]])
        for tick, pol in zip(ax.get_yticklabels(), rows["policy"]):
            if pol == "planner":
                tick.set_fontweight("bold")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        # Room on the right for the annotations (axis fraction, so it holds on any scale).
        ax.set_xlim(0, longest * 1.75)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("iteration time (s)")
        ax.set_title("Iteration time per policy (shorter is better)")
    return fig
