"""Tests for tiertune.analysis.plots: each figure carries the content a reader needs (lanes,
lines, points, labels), not merely that a file appears."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure

from tiertune.analysis import plots, style
from tiertune.errors import InputError
from tiertune.traces.trace import Trace

GIB = 1 << 30


def make_trace(n_iter: int = 3, n_layers: int = 4, source: str = "simulated", stretch: float = 1.0,
               cpu_workers: int = 1) -> Trace:
    """A hand-made pipelined schedule: per layer a load on h2d, forward on gpu; backward with a
    recompute, gradient offload on d2h, CPU update and SSD writeback; memory samples per tier."""
    ev, mem = [], []
    t = 0.0
    f, c = 0.010 * stretch, 0.004 * stretch   # forward, copy seconds
    for it in range(n_iter):
        start = t
        for l in range(n_layers):
            ev.append(dict(iteration=it, task=f"load{l}", kind="load", layer=l, resource="h2d",
                           start_s=t, end_s=t + c, bytes=64 << 20, flops=0.0))
            ev.append(dict(iteration=it, task=f"ssd_read{l}", kind="ssd_read", layer=l, resource="ssd_read",
                           start_s=t, end_s=t + c, bytes=64 << 20, flops=0.0))
            ev.append(dict(iteration=it, task=f"fwd{l}", kind="forward", layer=l, resource="gpu",
                           start_s=t + c, end_s=t + c + f, bytes=0, flops=1e12))
            t += c + f
        for l in reversed(range(n_layers)):
            ev.append(dict(iteration=it, task=f"rec{l}", kind="recompute", layer=l, resource="gpu",
                           start_s=t, end_s=t + f, bytes=0, flops=1e12))
            ev.append(dict(iteration=it, task=f"bwd{l}", kind="backward", layer=l, resource="gpu",
                           start_s=t + f, end_s=t + 3 * f, bytes=0, flops=2e12))
            ev.append(dict(iteration=it, task=f"grad{l}", kind="grad", layer=l, resource="d2h",
                           start_s=t + 3 * f, end_s=t + 3 * f + c, bytes=64 << 20, flops=0.0))
            # Updates of consecutive layers overlap when the CPU has several workers.
            upd = 5 * f if cpu_workers > 1 else 1.5 * f
            ev.append(dict(iteration=it, task=f"upd{l}", kind="update", layer=l, resource="cpu",
                           start_s=t + 3 * f + c, end_s=t + 3 * f + c + upd, bytes=0, flops=1e9))
            ev.append(dict(iteration=it, task=f"wb{l}", kind="ssd_write", layer=l, resource="ssd_write",
                           start_s=t + 3 * f + c + upd, end_s=t + 3 * f + 2 * c + upd, bytes=64 << 20,
                           flops=0.0))
            t += 3 * f
        t = max(e["end_s"] for e in ev)
        for k in range(6):
            ts = start + (t - start) * k / 6
            mem.append(dict(time_s=ts, tier="gpu", bytes=int((6 + 10 * np.sin(np.pi * k / 6)) * GIB)))
            mem.append(dict(time_s=ts, tier="cpu", bytes=int((60 + 20 * (k % 2)) * GIB)))
        mem.append(dict(time_s=start, tier="ssd", bytes=int(900 * GIB)))
    for e in ev:
        e["source"] = source
    meta = {"source": source, "model": "llama2-7b", "hardware": "fuyou-4090-1ssd",
            "capacity": {"gpu": 24 * GIB, "cpu": 128 * GIB, "ssd": 1200 * GIB}}
    return Trace.from_records(ev, mem, meta)


def collections_by_gid(ax) -> dict[str, PolyCollection]:
    return {c.get_gid(): c for c in ax.collections if isinstance(c, PolyCollection) and c.get_gid()}


# --- style ---------------------------------------------------------------------------------------


def test_palette_fixed_for_known_and_stable_for_unknown():
    assert style.policy_color("planner") == "#d62728"
    assert len(set(style.POLICY_COLORS.values())) == len(style.POLICY_COLORS)
    assert len(set(style.KIND_COLORS.values())) == len(style.KIND_COLORS) == 13
    # Unknown names: same colour every call, and never a colour of a known policy.
    assert style.policy_color("my-policy") == style.policy_color("my-policy")
    assert style.policy_color("my-policy") not in style.POLICY_COLORS.values()
    assert style.kind_color("mystery") not in style.KIND_COLORS.values()
    assert style.ordered({"zzz", "planner", "fuyou", "aaa"}, style.POLICY_ORDER) == ["fuyou", "planner", "aaa", "zzz"]


# --- save ----------------------------------------------------------------------------------------


def test_save_writes_png_and_svg_and_no_temp_files(tmp_path):
    fig = plots.compare_bars(pd.DataFrame({"policy": ["fuyou", "planner"], "iteration_s": [2.0, 1.0],
                                           "fits": [True, True], "bottleneck": ["ssd_read", "gpu"]}))
    out = plots.save(fig, tmp_path / "sub" / "cmp")
    assert [p.name for p in out] == ["cmp.png", "cmp.svg"]
    assert out[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = out[1].read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "planner" in svg   # text kept as text
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["cmp.png", "cmp.svg"]
    # A .png suffix is replaced, a dotted name is kept whole; saving twice gives the same SVG.
    out2 = plots.save(fig, tmp_path / "cmp.v2.png")
    assert [p.name for p in out2] == ["cmp.v2.png", "cmp.v2.svg"]
    plots.save(fig, tmp_path / "again")
    assert (tmp_path / "again.svg").read_bytes() == (tmp_path / "cmp.v2.svg").read_bytes()


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    fig = plots.compare_bars(pd.DataFrame({"policy": ["fuyou"], "iteration_s": [2.0], "fits": [True]}))

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        plots.save(fig, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- timeline ------------------------------------------------------------------------------------


def test_timeline_one_lane_per_resource_and_one_collection_per_resource_kind():
    tr = make_trace()
    fig = plots.timeline(tr)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    ev = tr.events[tr.events["iteration"] == 1]     # default: the second (first steady) iteration
    resources = style.ordered(ev["resource"].unique(), style.RESOURCE_ORDER)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(ax.get_yticks()) == len(resources) == 6
    assert [lab.split("\n")[0] for lab in labels] == [style.resource_label(r) for r in resources]
    assert labels[0].startswith("GPU") and "% busy" in labels[0]
    pairs = {f"{r}/{k}" for r, k in ev[["resource", "kind"]].drop_duplicates().itertuples(index=False)}
    cols = collections_by_gid(ax)
    assert set(cols) == pairs
    # Every event of the iteration is drawn once, in its kind's colour.
    assert sum(len(c.get_paths()) for c in cols.values()) == len(ev)
    np.testing.assert_allclose(cols["gpu/forward"].get_facecolor()[0][:3],
                               np.array([int(style.KIND_COLORS["forward"][i:i + 2], 16) for i in (1, 3, 5)]) / 255)
    # Bars start at 0 ms (iteration start) and the axis is in ms for a short iteration.
    xs = np.concatenate([p.vertices[:, 0] for c in cols.values() for p in c.get_paths()])
    assert xs.min() == pytest.approx(0.0) and "ms" in ax.get_xlabel()
    span_ms = (ev["end_s"].max() - ev["start_s"].min()) * 1e3
    assert xs.max() == pytest.approx(span_ms)
    legend = fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} == set(ev["kind"])
    assert "iteration 1" in ax.get_title(loc="left")


def test_timeline_only_lanes_with_events_and_explicit_iteration():
    tr = make_trace()
    ev = tr.events[~tr.events["resource"].isin(["ssd_read", "ssd_write"])]
    tr2 = Trace(ev, tr.memory, tr.meta)
    ax = plots.timeline(tr2, iteration=2).axes[0]
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["GPU", "PCIe H2D", "PCIe D2H", "CPU"]
    assert "iteration 2" in ax.get_title(loc="left")
    with pytest.raises(InputError, match="no iteration 7"):
        plots.timeline(tr2, iteration=7)


def test_timeline_overlapping_events_get_sub_rows():
    tr = make_trace(cpu_workers=2)
    ax = plots.timeline(tr).axes[0]
    upd = collections_by_gid(ax)["cpu/update"]
    lows = sorted({round(float(p.vertices[:, 1].min()), 6) for p in upd.get_paths()})
    assert len(lows) == 2                      # two sub-rows, so no bar hides another
    heights = {round(float(np.ptp(p.vertices[:, 1])), 6) for p in upd.get_paths()}
    assert heights == {0.4}


def test_timeline_predicted_and_measured_side_by_side():
    pred, meas = make_trace(), make_trace(source="measured", stretch=1.2)
    fig = plots.timeline(pred, measured=meas)
    a, b = fig.axes[:2]
    assert a.get_shared_x_axes().joined(a, b)
    assert len(a.get_yticks()) == len(b.get_yticks()) == 6
    assert a.get_title(loc="left").startswith("Predicted") and b.get_title(loc="left").startswith("Measured")
    assert "+20.0% vs predicted" in b.get_title(loc="left")
    assert set(collections_by_gid(a)) == set(collections_by_gid(b))


def test_timeline_thousands_of_events_stay_few_artists():
    tr = make_trace(n_iter=2, n_layers=400)
    ax = plots.timeline(tr).axes[0]
    assert len(tr.events[tr.events["iteration"] == 1]) == 3200
    assert len(ax.collections) == 8


def test_timeline_empty_trace_is_input_error():
    with pytest.raises(InputError, match="no events"):
        plots.timeline(Trace.from_records([]))


# --- memory --------------------------------------------------------------------------------------


def test_memory_one_line_per_tier_plus_capacity():
    tr = make_trace()
    fig = plots.memory(tr)
    axes = fig.axes
    assert len(axes) == 3
    for ax, tier in zip(axes, ["gpu", "cpu", "ssd"]):
        labels = [l.get_label() for l in ax.get_lines()]
        assert labels == [f"{tier} in use", f"{tier} capacity ({ {'gpu': '24.0 GiB', 'cpu': '128.0 GiB', 'ssd': '1.2 TiB'}[tier]})"]
        use, cap = ax.get_lines()
        assert use.get_drawstyle() == "steps-post" and cap.get_linestyle() == "--"
        assert cap.get_ydata()[0] == pytest.approx(tr.meta["capacity"][tier] / GIB)
        s = tr.memory[tr.memory["tier"] == tier]
        assert max(use.get_ydata()) == pytest.approx(s["bytes"].max() / GIB)
        assert ax.get_ylabel() == "in use (GiB)"
        assert {t.get_text() for t in ax.get_legend().get_texts()} == set(labels)
    assert "peak 16.0 GiB of 24.0 GiB" in axes[0].get_title(loc="left")


def test_memory_capacity_off_scale_or_unlimited_is_said_not_drawn():
    tr = make_trace()
    tr.meta["capacity"] = {"gpu": 1 << 62, "cpu": 128 * GIB}
    axes = plots.memory(tr).axes
    assert [l.get_label() for l in axes[0].get_lines()] == ["gpu in use"]
    assert "of unlimited (capacity off scale)" in axes[0].get_title(loc="left")
    assert len(axes[1].get_lines()) == 2
    assert "of" not in axes[2].get_title(loc="left")           # no capacity given for ssd


def test_memory_without_samples_is_input_error():
    tr = make_trace()
    with pytest.raises(InputError, match="no memory samples"):
        plots.memory(Trace(tr.events, meta=tr.meta))


# --- throughput / max model ----------------------------------------------------------------------


def sweep_df() -> pd.DataFrame:
    rows = []
    for pol, base in [("zero-offload", 40), ("fuyou", 60), ("planner", 80), ("gpu-only", 150), ("my-policy", 30)]:
        for gib in [4, 8, 12, 24, 48]:
            fits = pol != "gpu-only" or gib >= 48
            rows.append(dict(policy=pol, gpu_mem_gib=gib, tflops=base * (1 - 1 / gib), fits=fits,
                             tokens_per_s=base * 10 * (1 - 1 / gib)))
    rows.append(dict(policy="lomo", gpu_mem_gib=8, tflops=10.0, fits=False, tokens_per_s=1.0))
    return pd.DataFrame(rows)


def test_throughput_vs_budget_one_line_per_policy_nonfitting_omitted():
    df = sweep_df()
    ax = plots.throughput_vs_budget(df).axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    assert set(lines) == {"zero-offload", "fuyou", "planner", "gpu-only", "my-policy"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["gpu-only", "zero-offload", "fuyou", "planner", "my-policy"]   # canonical order
    g = lines["gpu-only"]
    assert np.isnan(np.asarray(g.get_ydata(), float)[:4]).all() and np.isfinite(g.get_ydata()[4])
    assert lines["planner"].get_color() == style.POLICY_COLORS["planner"]
    assert lines["planner"].get_linewidth() > lines["fuyou"].get_linewidth()
    assert "lomo" in " ".join(t.get_text() for t in ax.texts)          # never fits: said in a note
    assert ax.get_xlabel() == "GPU memory budget (GiB)" and ax.get_ylabel() == "achieved TFLOP/s"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8", "12", "24", "48"]
    ax2 = plots.throughput_vs_budget(df, metric="tokens_per_s").axes[0]
    assert ax2.get_ylabel() == "throughput (tokens/s)"
    with pytest.raises(InputError, match="samples_per_s"):
        plots.throughput_vs_budget(df, metric="samples_per_s")


def test_max_model_vs_memory_lines_and_ssd_axis():
    df = pd.DataFrame([dict(policy=p, cpu_mem_gib=m, ssd_count=s, max_params_b=v)
                       for p, scale in [("zero-offload", 0.1), ("fuyou", 0.25), ("planner", 0.3)]
                       for m, s in [(64, 1), (128, 2), (256, 4), (768, 12)]
                       for v in [scale * m if p != "fuyou" else 30 * s]])
    ax = plots.max_model_vs_memory(df).axes[0]
    assert {l.get_label() for l in ax.get_lines()} == {"zero-offload", "fuyou", "planner"}
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"zero-offload", "fuyou", "planner"}
    assert ax.get_xlabel() == "CPU memory (GiB)" and "billion parameters" in ax.get_ylabel()
    ax2 = plots.max_model_vs_memory(df, x="ssd_count").axes[0]
    assert ax2.get_xlabel() == "number of NVMe SSDs"
    fuyou = next(l for l in ax2.get_lines() if l.get_label() == "fuyou")
    assert list(fuyou.get_xdata()) == [1, 2, 4, 12] and list(fuyou.get_ydata()) == [30, 60, 120, 360]


# --- predicted vs measured -----------------------------------------------------------------------


def test_predicted_vs_measured_points_identity_band_and_mape():
    df = pd.DataFrame({"label": ["a", "b", "c", "d"], "predicted_s": [1.0, 2.1, 0.05, 10.0],
                       "measured_s": [1.0, 2.0, 0.05, 8.0]})
    ax = plots.predicted_vs_measured(df).axes[0]
    ident = [l for l in ax.get_lines() if l.get_label().startswith("y = x")]
    assert len(ident) == 1
    np.testing.assert_allclose(ident[0].get_xdata(), ident[0].get_ydata())
    pts = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(pts) == 1 and len(pts[0].get_offsets()) == 4
    np.testing.assert_allclose(pts[0].get_offsets(), df[["measured_s", "predicted_s"]].to_numpy())
    assert sorted(t.get_text() for t in ax.texts) == ["a", "b", "c", "d"]
    # MAPE = mean(0, 5, 0, 25)% = 7.5%; range 0.05..10 is wide, so log axes.
    assert "MAPE 7.5%" in ax.get_title() and "3 of 4 within ±10%" in ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "±10%" in [t.get_text() for t in ax.get_legend().get_texts()]
    narrow = plots.predicted_vs_measured(df.iloc[:2]).axes[0]
    assert narrow.get_xscale() == "linear"
    with pytest.raises(InputError, match="positive"):
        plots.predicted_vs_measured(pd.DataFrame({"label": ["x"], "predicted_s": [1.0], "measured_s": [0.0]}))


# --- what-if -------------------------------------------------------------------------------------


def test_whatif_bars_grouped_with_baseline():
    rows = [dict(resource="baseline", factor=1.0, iteration_s=4.0)]
    for r, gain in [("gpu", 0.1), ("ssd_read", 0.6), ("cpu", 0.3)]:
        for f in [0.5, 2.0, 4.0]:
            rows.append(dict(resource=r, factor=f, iteration_s=4.0 / (1 + gain * (f - 1)) if f > 1 else 4.0 * 1.5))
    ax = plots.whatif_bars(pd.DataFrame(rows)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GPU", "CPU", "SSD read"]
    bars = [p for c in ax.containers for p in c.patches]
    assert len(bars) == 9 and len(ax.containers) == 3
    base = [l for l in ax.get_lines() if l.get_label().startswith("unchanged")]
    assert len(base) == 1 and base[0].get_ydata()[0] == pytest.approx(4.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["×0.5", "×2", "×4", "unchanged (4.00 s)"]
    # ssd_read ×4 gives 4 / 2.8: a 2.80× speed-up label.
    assert "2.80×" in [t.get_text() for t in ax.texts]
    with pytest.raises(InputError, match="baseline"):
        plots.whatif_bars(pd.DataFrame(rows[1:]).query("factor != 1.0"))


# --- compare -------------------------------------------------------------------------------------


def test_compare_bars_order_hatching_and_bottleneck():
    df = pd.DataFrame({"policy": ["zero-offload", "planner", "gpu-only", "fuyou", "lomo"],
                       "iteration_s": [3.0, 1.0, float("nan"), 1.5, 0.5],
                       "fits": [True, True, False, True, False],
                       "bottleneck": ["cpu", "ssd_read", None, "ssd_read", "gpu"]})
    ax = plots.compare_bars(df).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["planner", "fuyou", "zero-offload", "gpu-only", "lomo"]
    patches = ax.patches
    assert len(patches) == 5
    assert [p.get_hatch() for p in patches] == [None, None, None, "///", "///"]
    assert [p.get_width() for p in patches[:3]] == [1.0, 1.5, 3.0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("does not fit") == 2
    assert any("bound by SSD read" in t and "1.50× planner" in t for t in texts)
    assert texts[0].strip().startswith("1.00 s") and "×" not in texts[0]   # the reference itself
    assert "iteration time (s)" == ax.get_xlabel()


# --- a real simulated trace ----------------------------------------------------------------------

def test_plots_of_a_real_simulated_trace(tmp_path):
    from tiertune.simulator import simulate
    from tiertune.hardware import load_hardware
    from tiertune.planner.policies import make_policy
    from tiertune.workload import TrainSpec, load_model

    model, hw = load_model("llama2-7b"), load_hardware("fuyou-4090-1ssd")
    train = TrainSpec()
    trace = simulate(model, train, hw, make_policy("zero-offload", model, train, hw)).trace
    fig = plots.timeline(trace)
    ev = trace.steady_events()
    ev = ev[ev["iteration"] == ev["iteration"].min()]
    assert len(fig.axes[0].get_yticks()) == ev["resource"].nunique()
    assert len(collections_by_gid(fig.axes[0])) == len(ev[["resource", "kind"]].drop_duplicates())
    if len(trace.memory):
        assert len(plots.memory(trace).axes) == trace.memory["tier"].nunique()
    assert len(plots.save(fig, tmp_path / "tl")) == 2


def test_timeline_short_events_stay_visible():
    # A 1 us kernel in a 10 s iteration would be far below a pixel: it is widened, not lost.
    ev = [dict(source="simulated", iteration=0, task="k", kind="forward", layer=0, resource="gpu",
               start_s=1.0, end_s=1.000001, bytes=0, flops=1.0),
          dict(source="simulated", iteration=0, task="r", kind="ssd_read", layer=0, resource="ssd_read",
               start_s=0.0, end_s=10.0, bytes=1, flops=0.0)]
    ax = plots.timeline(Trace.from_records(ev)).axes[0]
    assert "s)" in ax.get_xlabel() and "ms" not in ax.get_xlabel()
    bar = collections_by_gid(ax)["gpu/forward"].get_paths()[0].vertices[:, 0]
    assert np.ptp(bar) >= 10.0 * plots._MIN_BAR_FRACTION * 0.999
    assert bar.min() == pytest.approx(1.0)
