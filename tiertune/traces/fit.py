"""Refine a hardware profile from a measured trace (`tiertune calibrate --from-trace`).

Microbenchmarks alone under-predict; FlexGen (Sheng et al., arXiv 2303.06865) fits its constants to real runs. Here
each constant the cost model (tiertune/simulator/costs.py) reads is refit by least squares from
the durations of the trace's tasks, grouped by resource and task kind:

- gpu `forward` / `backward` / `recompute`: the per-task overhead (an intercept), one scale on
  the peak FLOP/s of the trace's dtype (the efficiency table keeps its shape) and the backward
  factor (backward / forward). When the trace's meta carries the model and training settings,
  the run's own cost model splits each prediction into the part the peak scales (matmuls) and
  the part it does not (elementwise work); otherwise an event with flops > 0 is taken as
  overhead + flops / (peak * matmul_eff(flops)).
- `h2d` / `d2h` (and `ssd_read` / `ssd_write`) events with bytes > 0: duration = latency +
  bytes / bandwidth, with one bandwidth per direction and a latency shared by the link. The cost
  model's latency is a fixed constant, so a fitted latency that differs is folded into a refit
  efficiency table (at each measured size, the efficiency that makes the cost model reproduce the
  fit; both directions share one table, so where their bandwidths differ it is a least-squares
  compromise, and small transfers can be off by ~20% until the cost model takes a latency from the
  profile). With a single transfer size latency and bandwidth cannot be told apart: the bandwidth
  is fit with the cost model's latency and the table kept. Each direction's bandwidth is then
  rescaled so its modelled busy time equals the measured one (heavy-tailed, contended copies:
  the typical transfer sets the latency, the total sets the speed). Copies are taken as pinned.
- cpu `update`: params/s. Convention: an `update` event's bytes are the fp32 bytes of the
  parameters it updated, so params = bytes / 4; an event with no bytes (the executor records
  none) counts its layer's parameters, from the cost model of the trace's run (at grad_rank d, the
  compressed ones its subspace AdamW updates). The rate refit is AdamW's, or SGD's
  when the trace's optimizer is sgd (the cost model uses the AdamW rate for adalomo too), and the
  fixed cost per update when the updates come in several sizes.

- contention (`HardwareProfile.contention`): for compute tasks and cpu updates, the constants
  above come from the events that ran with no other resource busy (gpu-only runs, ZeRO-Offload's
  serial update), and the factors from how much longer every other event took than those
  constants predict, against the fraction of its time each other resource was busy (from the
  same trace). A task runs at 1 / (1 + c_s) of its speed while s is busy, as the engine does.
  With too few events that ran alone, every event fits the constants and no factor is fitted.

- per-task fixed costs (HardwareProfile.task_overheads, which `tiertune calibrate` measures on the
  runtime itself) are not refit: they are taken off every event's duration first, so the constants
  above fit what is left (the part that grows with FLOPs, bytes and parameters), and the fitted
  intercepts are what the table does not already charge.

Residuals are relative (each row divided by its duration), so small tasks count as much as big
ones. A group with fewer than `min_events` events is skipped, and the table says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from tiertune.errors import InputError
from tiertune.hardware import GB, Curve, HardwareProfile
from tiertune.simulator.costs import COPY_LATENCY_S, SSD_LATENCY_S
from tiertune.vocab import LINKS, RESOURCES
from tiertune.traces.trace import DUPLEX_SHARE, Trace, interval_union, overlap_share, own_durations

MIN_EVENTS = 3
COMPUTE_KINDS = ("forward", "backward", "recompute")
FP32_BYTES = 4
MAX_TABLE_POINTS = 24


@dataclass(frozen=True)
class FitRow:
    constant: str
    unit: str
    before: float
    after: float | None          # None: not fitted (see note)
    events: int
    note: str = ""


@dataclass
class FitResult:
    profile: HardwareProfile
    rows: list[FitRow]

    @property
    def fitted(self) -> int:
        return sum(r.after is not None for r in self.rows)

    def table(self) -> str:
        """Before/after constants, one line each."""
        lines = [f"{'constant':<28}{'before':>12}{'after':>12}  {'unit':<9}{'events':>7}  note"]
        for r in self.rows:
            after = f"{r.after:>12.4g}" if r.after is not None else f"{'-':>12}"
            lines.append(f"{r.constant:<28}{r.before:>12.4g}{after}  {r.unit:<9}{r.events:>7}  {r.note}")
        return "\n".join(lines)


def relative_lstsq(X: np.ndarray, y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Coefficients c minimising sum(((X c - y) / d)^2): least squares on relative error."""
    w = 1.0 / d
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    return coef


def nonneg_lstsq(X: np.ndarray, y: np.ndarray, d: np.ndarray, nonneg: np.ndarray) -> np.ndarray:
    """relative_lstsq with the columns marked in `nonneg` kept >= 0: the most negative one is
    pinned at 0 and the rest refit, until none is negative."""
    keep = np.ones(X.shape[1], bool)
    while True:
        coef = np.zeros(X.shape[1])
        coef[keep] = relative_lstsq(X[:, keep], y, d)
        neg = np.flatnonzero(nonneg & keep & (coef < 0))
        if not len(neg):
            return coef
        keep[neg[np.argmin(coef[neg])]] = False


def _events(trace: Trace) -> pd.DataFrame:
    ev = trace.events.assign(duration_s=own_durations(trace.events))
    return ev[ev["duration_s"] > 0]


def task_whats(ev: pd.DataFrame, plan) -> pd.Series:
    """What qualifies each event's row of HardwareProfile.task_overheads: the layer's activation mode
    for forward and backward, "fused" for an update in the gradient hooks, what a copy moves (the
    task name's tag: w, act, opt, grad) otherwise; "" where nothing does."""
    kind = ev["kind"].to_numpy()
    tag = [name.split(":")[0].partition(".")[2].split(".")[0] for name in ev["task"]]
    lps = [plan.layers[int(i)] if 0 <= int(i) < plan.n_layers else None for i in ev["layer"]]
    out = []
    for k, t, lp in zip(kind, tag, lps):
        if k in ("forward", "backward"):
            out.append(lp.activations if lp is not None else "")
        elif k == "update":
            out.append("fused" if lp is not None and lp.update == "fused" else "")
        elif k in ("recompute", "compress", "decompress"):
            out.append("")
        else:
            out.append(t)
    return pd.Series(out, index=ev.index, dtype=object)


def _less_task_overheads(ev: pd.DataFrame, trace: Trace, cm, hw: HardwareProfile) -> pd.DataFrame:
    """Events with the base profile's measured fixed cost per task (HardwareProfile.task_overheads)
    taken off their durations, so that what is fitted is the part the other constants model; an
    update in the gradient hooks is recorded per parameter and carries its share of the layer's.
    Events left with nothing are dropped. Unchanged without a table, or without the run's cost
    model and plan."""
    if not hw.task_overheads or cm is None or "plan" not in trace.meta or ev.empty:
        return ev
    from tiertune.schedule import Plan

    try:
        plan = Plan.from_dict(trace.meta["plan"])
    except (InputError, TypeError, ValueError, KeyError):
        return ev
    if not ev["layer"].between(0, len(cm.layers) - 1).all() or plan.n_layers != len(cm.layers):
        return ev
    what = task_whats(ev, plan)
    fixed = np.array([cm.task_overhead_s(k, r, int(i), w) for k, r, i, w in
                      zip(ev["kind"], ev["resource"], ev["layer"], what)])
    share = ev.groupby([ev["kind"], ev["resource"], ev["layer"], ev["iteration"], what])["kind"].transform("size")
    fixed = fixed / np.where(what.to_numpy() == "fused", share.to_numpy(float), 1.0)
    ev = ev.assign(duration_s=ev["duration_s"].to_numpy(float) - fixed)
    return ev[ev["duration_s"] > 0]


def _meta_train(trace: Trace, key: str) -> str | None:
    train = trace.meta.get("train")
    return str(train[key]) if isinstance(train, dict) and train.get(key) else None


# --- GPU compute ---------------------------------------------------------------------------------------
def _compute_model(trace: Trace, hw: HardwareProfile, dtype: str):
    """The cost model of the trace's own run, when its meta names the model and training settings
    (the simulator and executor write `model_spec` and `train`); None otherwise."""
    from tiertune.simulator.costs import CostModel
    from tiertune.workload import ModelSpec, TrainSpec

    spec, train = trace.meta.get("model_spec"), trace.meta.get("train")
    if not isinstance(spec, dict) or not isinstance(train, dict):
        return None
    try:
        return CostModel(ModelSpec(**spec), TrainSpec.from_dict(train).replace(dtype=dtype), hw)
    except (InputError, TypeError, ValueError, KeyError):
        return None


@dataclass
class ComputeRows:
    """One trace's compute events as rows of the linear model the cost model implies:
    duration = overhead + scale * m + e, where `m` is the task's matmul seconds at the base profile
    (forward-equivalent: a backward's is its forward's) and `e` the part the peak does not scale
    (the layer's other operations at the profile's activation rate, CostModel.activation_part_s; a
    backward's is its forward's, times the backward factor). For a backward, scale = backward_factor / peak-scale; otherwise 1 / peak-scale."""

    events: pd.DataFrame
    backward: np.ndarray             # bool: the row is a backward (scaled by the backward factor)
    m: np.ndarray
    e: np.ndarray
    how: str


def _compute_samples(ev: pd.DataFrame, hw: HardwareProfile, dtype: str, cm=None) -> ComputeRows:
    """With the run's cost model (trace meta names the model and training settings) each event's
    prediction splits exactly into overhead, matmul and elementwise parts, so refitting a trace the
    simulator made returns the same profile, and layers without matmuls (the embedding) pin the
    overhead; without it, an event's FLOPs at the table's efficiency are taken as all matmul."""
    gpu = ev[(ev["resource"] == "gpu") & ev["kind"].isin(COMPUTE_KINDS)]
    o = hw.gpu_task_overhead_s
    if cm is not None and len(gpu) and gpu["layer"].between(0, len(cm.layers) - 1).all():
        embed = gpu["layer"].map(lambda i: cm.layers[int(i)].kind == "embed").to_numpy(bool)
        back = (gpu["kind"].to_numpy() == "backward") & ~embed        # embedding backward = its forward
        e = np.array([cm.activation_part_s(cm.layers[int(i)]) for i in gpu["layer"]])
        m = np.array([cm.forward_s(int(i)) - o for i in gpu["layer"]]) - e
        m = np.where(embed, 0.0, m)
        e = np.where(embed, np.array([cm.forward_s(int(i)) - o for i in gpu["layer"]]), e)
        keep = m >= 0
        return ComputeRows(gpu[keep], back[keep], m[keep], e[keep], f"via the cost model of {cm.model.name}")
    sel = gpu[gpu["flops"] > 0]
    back = sel["kind"].to_numpy() == "backward"
    fwd_flops = sel["flops"].to_numpy(float) / np.where(back, 2.0, 1.0)   # backward events count 2x forward FLOPs
    m = fwd_flops / np.array([hw.matmul_efficiency.at(f) for f in fwd_flops]) / hw.peak_flops(dtype)
    return ComputeRows(sel, back, m, np.zeros(len(sel)), "from FLOPs")


def _fit_compute(samples: list[ComputeRows], hw: HardwareProfile, dtype: str,
                 min_events: int) -> tuple[dict, list[FitRow], dict[str, float]]:
    """Least squares over the compute events of every trace for the task overhead, the dtype's peak
    (one scale: the efficiency table keeps its shape) and the backward factor, then the contention
    factors (see _alone, _fit_contention). The overhead is kept when the rows cannot separate it
    from the scale (one task size), the backward factor when there are no backward events."""
    peak = hw.peak_flops(dtype)
    name = f"gpu {dtype} peak"
    sel = pd.concat([s.events for s in samples]) if samples else pd.DataFrame(columns=["kind"])
    back, m, e = (np.concatenate([getattr(s, k) for s in samples]) if samples else np.zeros(0)
                  for k in ("backward", "m", "e"))
    back = back.astype(bool)
    d = sel["duration_s"].to_numpy(float) if len(sel) else np.zeros(0)
    how = "; ".join(sorted({s.how for s in samples}))
    counts = sel.groupby("kind").size().to_dict() if len(sel) else {}
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"
    if len(sel) < min_events or not (m > 0).any():
        return {}, [FitRow(name, "TFLOP/s", peak / 1e12, None, len(sel),
                           f"skipped: {len(sel)} compute events (< {min_events}) or no matmul work; kinds: {by_kind}")], {}
    cols = {"fwd": np.where(back, 0.0, m), "bwd": np.where(back, m, 0.0)}
    if not back.any():
        cols.pop("bwd")
    X = np.column_stack(list(cols.values()))
    alone = _alone(sel, back, min_events)
    mm = m[alone]
    sizes = len(np.unique(np.round(mm[mm > 0] / mm[mm > 0].max(), 3))) + int((mm == 0).any()) if (mm > 0).any() else 0
    fit_overhead = sizes >= 2

    def solve(factor: float) -> tuple[float, np.ndarray]:
        """(overhead, scales) with a backward's elementwise part taken at `factor`, from the
        events that ran alone; noise that pushes the intercept below zero pins it there."""
        y = (d - np.where(back, factor, 1.0) * e)[alone]
        if fit_overhead:
            coef = nonneg_lstsq(np.column_stack([np.ones(alone.sum()), X[alone]]), y, d[alone],
                                np.array([True] + [False] * len(cols)))
            return float(coef[0]), coef[1:]
        o = hw.gpu_task_overhead_s
        return o, relative_lstsq(X[alone], y - o, d[alone])

    # The backward factor scales a backward's elementwise part too, which makes the model bilinear;
    # a few fixed-point rounds (solve at a factor, take the factor found) settle it.
    def rounds() -> tuple[float, float, np.ndarray]:
        factor = hw.backward_factor
        for _ in range(8):
            overhead, coef = solve(factor)
            if "bwd" not in cols or coef[0] <= 0 or coef[-1] <= 0:
                break
            new = float(coef[-1] / coef[0])
            if abs(new - factor) < 1e-9 * factor:
                break
            factor = new
        return factor, overhead, coef

    factor, overhead, coef = rounds()
    if coef[0] <= 0 and fit_overhead:
        # Durations that vary more with other work on the machine than with FLOPs let the intercept
        # take everything: keep the profile's overhead and fit the scale alone.
        fit_overhead = False
        factor, overhead, coef = rounds()
    scales = dict(zip(cols, coef))
    if scales["fwd"] <= 0:
        return {}, [FitRow(name, "TFLOP/s", peak / 1e12, None, len(sel), "skipped: durations do not grow with FLOPs")], {}
    pred = overhead + X @ coef + np.where(back, factor, 1.0) * e      # every event, without contention
    new_peak = peak / scales["fwd"]
    changes: dict = {"gpu_flops": dict(hw.gpu_flops, **{dtype: new_peak})}
    rows = [FitRow(name, "TFLOP/s", peak / 1e12, new_peak / 1e12, len(sel), f"scale x{new_peak / peak:.3g} {how}; {by_kind}")]
    if fit_overhead:
        changes["gpu_task_overhead_s"] = overhead
        rows.append(FitRow("gpu task overhead", "us", hw.gpu_task_overhead_s * 1e6, overhead * 1e6, len(sel),
                           "intercept per layer task"))
    else:
        rows.append(FitRow("gpu task overhead", "us", hw.gpu_task_overhead_s * 1e6, None, len(sel),
                           "kept: one task size, overhead and peak not separable"))
    if "bwd" in scales and scales["bwd"] > 0:
        factor = scales["bwd"] / scales["fwd"]
        changes["backward_factor"] = factor
        rows.append(FitRow("backward factor", "x fwd", hw.backward_factor, factor, int(back.sum()), ""))
    factors, crows = _fit_contention("gpu", hw, sel, d, pred, alone, min_events)
    return changes, rows + crows, factors


# --- transfers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    name: str                                   # pcie | ssd
    directions: dict[str, str]                  # resource -> profile attribute of its bandwidth
    latency_s: float                            # the cost model's fixed per-transfer latency
    table: str                                  # profile attribute of the efficiency Curve
    devices: int = 1                            # SSD: bandwidth is per device, efficiency by bytes per device


def _links(hw: HardwareProfile) -> list[Link]:
    return [Link("pcie", {"h2d": "h2d_bps", "d2h": "d2h_bps"}, COPY_LATENCY_S, "pcie_efficiency"),
            Link("ssd", {"ssd_read": "ssd_read_bps", "ssd_write": "ssd_write_bps"}, SSD_LATENCY_S,
                 "ssd_efficiency", max(hw.ssd_count, 1))]


def _fit_duplex(evs: list[pd.DataFrame], hw: HardwareProfile) -> tuple[dict, list[FitRow]]:
    """Whether each link's two directions ran at once in the traces (trace.DUPLEX_SHARE, the rule
    replay keeps them apart by): then the machine is duplex as far as the simulator is concerned.
    The fitted bandwidths come from those overlapped transfers (busy_preserving), so serialising
    the two again would count the sharing twice."""
    changes: dict = {}
    rows: list[FitRow] = []
    for name, (a, b) in LINKS.items():
        attr = f"{name}_duplex"
        both, lighter = map(sum, zip(*(overlap_share(e, a, b) for e in evs)))
        if not lighter:
            continue
        share = both / lighter
        changes[attr] = share > DUPLEX_SHARE
        events = int(sum(e["resource"].isin((a, b)).sum() for e in evs))
        rows.append(FitRow(f"{name} duplex", "yes=1", float(getattr(hw, attr)), float(changes[attr]), events,
                           f"{a} and {b} overlapped {share:.0%} of the lighter one's busy time"))
    return changes, rows


def _table_sizes(sizes: np.ndarray) -> np.ndarray:
    uniq = np.unique(sizes)
    if len(uniq) <= MAX_TABLE_POINTS:
        return uniq
    return np.unique(np.geomspace(uniq[0], uniq[-1], MAX_TABLE_POINTS))


def _fit_link(ev: pd.DataFrame, hw: HardwareProfile, link: Link, min_events: int) -> tuple[dict, list[FitRow]]:
    changes: dict = {}
    rows: list[FitRow] = []
    fitted: dict[str, pd.DataFrame] = {}
    for res, attr in link.directions.items():
        sel = ev[(ev["resource"] == res) & (ev["bytes"] > 0)]
        if len(sel) >= min_events:
            fitted[res] = sel
        else:
            rows.append(FitRow(f"{res} bandwidth", "GB/s", getattr(hw, attr) / GB, None, len(sel),
                               f"skipped: {len(sel)} events (< {min_events})"))
    if not fitted:
        return changes, rows
    curve: Curve = getattr(hw, link.table)
    allev = pd.concat(fitted.values())
    nbytes = allev["bytes"].to_numpy(float)
    d = allev["duration_s"].to_numpy(float)
    dirs = list(fitted)
    onehot = np.stack([(allev["resource"] == r).to_numpy(float) for r in dirs], axis=1)
    spread = nbytes.max() / nbytes.min()
    latency = None
    if spread >= 2.0:                           # sizes vary: latency and bandwidth separable
        coef = relative_lstsq(np.column_stack([np.ones_like(d), onehot * nbytes[:, None]]), d, d)
        if coef[0] < 0:                          # noise pushed the intercept below zero: pin it there
            coef = np.concatenate([[0.0], relative_lstsq(onehot * nbytes[:, None], d, d)])
        latency, inv_bw = float(coef[0]), coef[1:]
        base_s = np.full_like(d, latency)
        xfer_s = onehot * nbytes[:, None]
    else:                                        # one size: bandwidth only, with the model's latency and table
        per_dev = nbytes / link.devices
        x = onehot * (nbytes / np.array([curve.at(s) for s in per_dev]))[:, None]
        inv_bw = relative_lstsq(x, d - link.latency_s, d)
        base_s, xfer_s = np.full_like(d, link.latency_s), x
    inv_bw = _busy_preserving(inv_bw, base_s, xfer_s, d)
    note = "" if latency is not None else "one transfer size: latency not separable, table kept"
    bws: dict[str, float] = {}
    for res, ib in zip(dirs, inv_bw):
        attr = link.directions[res]
        before = getattr(hw, attr)
        if ib <= 0:
            rows.append(FitRow(f"{res} bandwidth", "GB/s", before / GB, None, len(fitted[res]),
                               "skipped: durations do not grow with bytes"))
            continue
        bws[res] = 1.0 / ib / link.devices         # per device, as the profile stores it
        changes[attr] = bws[res]
        rows.append(FitRow(f"{res} bandwidth", "GB/s", before / GB, bws[res] / GB, len(fitted[res]), note))
    if latency is not None and bws:
        changes[link.table] = _latency_table(latency, link, bws, _table_sizes(nbytes))
        rows.append(FitRow(f"{link.name} latency", "us", link.latency_s * 1e6, latency * 1e6, len(allev),
                           f"folded into {link.table} ({len(changes[link.table].points)} steps)"))
    return changes, rows


def _busy_preserving(inv_bw: np.ndarray, base_s: np.ndarray, xfer_s: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rescale each direction's 1/bandwidth so its modelled durations add up to its measured ones.

    Relative least squares gives the typical transfer's speed (it pins the latency, which small
    transfers carry); but measured copies have heavy tails (a copy that ran beside compute, another
    copy or another process's I/O takes 2-5x its typical time), and what the simulator has to
    reproduce is each resource's busy time, tails included. With durations that follow the model
    (calibration-like noise) the scale is ~1 and changes nothing."""
    out = np.array(inv_bw, dtype=float)
    for j in range(len(out)):
        rows = xfer_s[:, j] > 0
        modelled = float((xfer_s[rows, j] * out[j]).sum())
        if out[j] > 0 and modelled > 0:
            out[j] *= max(float((d[rows] - base_s[rows]).sum()), 0.0) / modelled or 1.0
    return out


def _latency_table(latency: float, link: Link, bws: dict[str, float], sizes: np.ndarray) -> Curve:
    """Efficiency at each size so that model latency + s / (bw * eff) = fitted latency + s / bw.

    Exact for one direction; one table serves both, so with two directions of different bandwidth
    1/eff is the least-squares compromise on relative error (solved in closed form: the model
    time is linear in 1/eff). Capped to the range Curve accepts."""
    points = []
    for k, s in enumerate(sizes):
        num = den = 0.0
        for bw in bws.values():
            t_bw = s / (bw * link.devices)          # bytes over the link's total bandwidth
            target = latency + t_bw
            num += (t_bw / target) * (1.0 - link.latency_s / target)
            den += (t_bw / target) ** 2
        eff = float(np.clip(den / num, 0.01, 1.5)) if num > 0 else 1.5
        points.append((0.0 if k == 0 else float(s) / link.devices, round(eff, 4)))
    return Curve(tuple(points))


# --- CPU optimizer ---------------------------------------------------------------------------------------
def _update_params(ev: pd.DataFrame, cm, ranks: dict[int, int] | None = None) -> pd.Series:
    """Parameters each cpu `update` event updated: bytes / 4 by the trace convention; where an event
    records no bytes (the executor's updates do not), the layer's parameter count from the run's
    cost model, or at grad_rank d (`ranks`: layer -> d, from the run's plan) the compressed count
    its subspace AdamW updates (CostModel.compressed_params, as the simulator charges it)."""
    params = ev["bytes"].astype(float) / FP32_BYTES
    if cm is not None:
        ranks = ranks or {}
        known = ev["layer"].between(0, len(cm.layers) - 1)
        from_model = ev["layer"].where(known, 0).map(
            lambda i: float(cm.compressed_params(int(i), ranks[int(i)]) if ranks.get(int(i)) else cm.layers[int(i)].params))
        params = params.where(params > 0, from_model.where(known, 0.0))
    return params


def _grad_ranks(trace: Trace) -> dict[int, int]:
    """Layer -> grad_rank of the run's plan (LSP-Offload layers); empty without a readable plan."""
    from tiertune.schedule import Plan

    try:
        plan = Plan.from_dict(trace.meta["plan"])
    except (InputError, TypeError, ValueError, KeyError):
        return {}
    return {i: lp.grad_rank for i, lp in enumerate(plan.layers) if lp.grad_rank}


def _fit_update(ev: pd.DataFrame, hw: HardwareProfile, optimizer: str,
                min_events: int) -> tuple[dict, list[FitRow], dict[str, float]]:
    """params/s and, where updates of several sizes separate them, the fixed cost per update, then
    the contention factors (see _alone, _fit_contention). `ev` carries a `params` column (see
    _update_params)."""
    attr = "cpu_sgd_params_per_s" if optimizer == "sgd" else "cpu_adam_params_per_s"
    name = f"cpu {'sgd' if optimizer == 'sgd' else 'adam'} update"
    before = getattr(hw, attr)
    sel = ev[(ev["resource"] == "cpu") & (ev["kind"] == "update") & (ev["params"] > 0)]
    if len(sel) < min_events:
        return {}, [FitRow(name, "Gparams/s", before / 1e9, None, len(sel), f"skipped: {len(sel)} events (< {min_events})")], {}
    d_all, p_all = sel["duration_s"].to_numpy(float), sel["params"].to_numpy(float)
    alone = _alone(sel, np.zeros(len(sel), bool), min_events)
    params, d = p_all[alone], d_all[alone]
    overhead = hw.update_overhead_s
    fitted_overhead = False
    if params.max() >= 2 * params.min():
        c0, inv = relative_lstsq(np.column_stack([np.ones_like(d), params]), d, d)
        if c0 >= 0:
            overhead, inv_rate, fitted_overhead = float(c0), float(inv), True
    if not fitted_overhead:
        inv_rate = relative_lstsq(params[:, None], d - overhead, d)[0]
    if inv_rate <= 0:
        return {}, [FitRow(name, "Gparams/s", before / 1e9, None, len(sel), "skipped: durations do not grow with bytes")], {}
    changes = {attr: 1.0 / inv_rate}
    rows = [FitRow(name, "Gparams/s", before / 1e9, 1.0 / inv_rate / 1e9, len(sel),
                   "params = bytes / 4, or the layer's from the cost model")]
    if fitted_overhead:
        changes["update_overhead_s"] = overhead
    rows.append(FitRow("update overhead", "us", hw.update_overhead_s * 1e6, overhead * 1e6 if fitted_overhead else None,
                       len(sel), "intercept per layer update" if fitted_overhead else "kept: one update size or a negative intercept"))
    factors, crows = _fit_contention("cpu", hw, sel, d_all, overhead + p_all * inv_rate, alone, min_events)
    return changes, rows + crows, factors


# --- device optimizer step -------------------------------------------------------------------------------
def _fit_gpu_update(evs: list[pd.DataFrame], cms: list, hw: HardwareProfile, overhead: float,
                    min_events: int) -> tuple[dict, list[FitRow]]:
    """Device memory bandwidth from the device's optimizer steps (CostModel.gpu_update_s: the task
    overhead, fitted above, plus the bytes the step streams over the bandwidth). A fused (LOMO)
    update is recorded parameter by parameter: events are summed per layer and iteration first.
    Ordinary least squares, not relative: a step's time is the sum of its updates, so a layer's
    big update counts for more than the embedding's small one. Needs the run's cost model."""
    rows = []
    for e, cm in zip(evs, cms):
        sel = e[(e["resource"] == "gpu") & (e["kind"] == "update")]
        if cm is None or sel.empty or not sel["layer"].between(0, len(cm.layers) - 1).all():
            continue
        per = sel.groupby(["iteration", "layer"])["duration_s"].agg(["sum", "size"]).reset_index()
        rows.append(pd.DataFrame({"bytes": [cm.gpu_update_bytes(int(i)) for i in per["layer"]],
                                  "fixed": overhead * per["size"], "d": per["sum"]}))
    name, before = "gpu memory bandwidth", hw.gpu_mem_bw_bps / GB
    df = pd.concat(rows) if rows else pd.DataFrame(columns=["bytes", "fixed", "d"])
    if len(df) < min_events:
        return {}, [FitRow(name, "GB/s", before, None, len(df), f"skipped: {len(df)} device updates (< {min_events})")]
    x, y = df["bytes"].to_numpy(float), (df["d"] - df["fixed"]).to_numpy(float)
    inv = float(x @ y / (x @ x))
    if inv <= 0:
        return {}, [FitRow(name, "GB/s", before, None, len(df), "skipped: device updates do not grow with bytes")]
    return {"gpu_mem_bw_bps": 1.0 / inv}, [FitRow(name, "GB/s", before, 1.0 / inv / GB, len(df),
                                                  "from device optimizer steps (bytes from the cost model)")]


# --- contention ----------------------------------------------------------------------------------------
MIN_OVERLAP = 0.05           # an event counts as overlapped with a resource beyond this fraction
MAX_K = 0.9                  # c / (1 + c) at most: a resource slows another 10x at most


def with_overlaps(ev: pd.DataFrame) -> pd.DataFrame:
    """Add `busy_<resource>` columns: the fraction of each event's duration during which that other
    resource ran something (its events' union, within the same trace)."""
    ev = ev.copy()
    start, end = ev["start_s"].to_numpy(float), ev["end_s"].to_numpy(float)
    own = ev["resource"].to_numpy()
    for r in RESOURCES:
        on = ev[own == r].sort_values("start_s")
        frac = np.zeros(len(ev))
        if len(on):
            a, b = interval_union(on["start_s"].to_numpy(float), on["end_s"].to_numpy(float))
            cum = np.concatenate([[0.0], np.cumsum(b - a)])

            def busy_until(t: np.ndarray) -> np.ndarray:
                k = np.searchsorted(a, t, side="right") - 1
                inside = np.clip(t - a[np.maximum(k, 0)], 0.0, (b - a)[np.maximum(k, 0)])
                return np.where(k < 0, 0.0, cum[np.maximum(k, 0)] + inside)

            frac = (busy_until(end) - busy_until(start)) / np.maximum(end - start, 1e-12)
        ev[f"busy_{r}"] = np.where(own == r, 0.0, np.clip(frac, 0.0, 1.0))
    return ev


def _alone(sel: pd.DataFrame, split: np.ndarray, min_events: int) -> np.ndarray:
    """Rows that ran with no other resource busy: they pin the base constants, so that a slow-down
    seen beside other work cannot pass for a slower machine (or the reverse). All rows when too
    few ran alone in either group of `split` (forward-like / backward rows): then no contention is
    fitted."""
    overlap = sel[[c for c in sel.columns if c.startswith("busy_")]].sum(axis=1).to_numpy() if len(sel) else np.zeros(0)
    alone = overlap <= MIN_OVERLAP
    enough = all((alone & (split == g)).sum() >= min_events for g in np.unique(split))
    return alone if enough else np.ones(len(sel), bool)


def _fit_contention(victim: str, hw: HardwareProfile, sel: pd.DataFrame, d: np.ndarray, pred: np.ndarray,
                    alone: np.ndarray, min_events: int) -> tuple[dict[str, float], list[FitRow]]:
    """Contention factors of `victim` from every row's duration `d` and its base prediction `pred`
    (fitted on the rows that ran alone). The engine runs a task at 1 / (1 + c) of its speed while
    s is busy, so with a fraction f of its time overlapped its work pred = d (1 - k f),
    k = c / (1 + c): (d - pred) / d = sum_s k_s f_s, least squares with k >= 0 (capped at MAX_K).
    Fitted only for resources that overlapped at least `min_events` rows, and only when the base
    came from rows that ran alone; the profile's factors are kept otherwise."""
    before = hw.contention.get(victim, {})
    busy = [r for r in RESOURCES if f"busy_{r}" in sel and (sel[f"busy_{r}"] > MIN_OVERLAP).sum() >= min_events]
    if alone.all() or not busy:
        why = "kept: too few events overlapped" if not busy else "kept: too few events ran alone to pin the base"
        return dict(before), [FitRow(f"{victim} slowed by busy {r}", "x", x, None, 0, why) for r, x in before.items()]
    F = sel[[f"busy_{r}" for r in busy]].to_numpy(float)
    k = np.minimum(nonneg_lstsq(F, (d - pred) / d, np.ones_like(d), np.ones(len(busy), bool)), MAX_K)
    factors = {r: float(x / (1 - x)) for r, x in zip(busy, k) if x > 1e-6}
    rows = [FitRow(f"{victim} slowed by busy {r}", "x", before.get(r, 0.0), factors.get(r, 0.0),
                   int((sel[f"busy_{r}"] > MIN_OVERLAP).sum()), "speed / (1 + x) while it is busy")
            for r in RESOURCES if r in busy or r in before]
    return factors, rows


# --- driver -------------------------------------------------------------------------------------------------
def _keep_what_predicts_better(traces: list[Trace], base: HardwareProfile,
                               parts: list[tuple[dict, list[FitRow], dict]]) -> tuple[dict, list[FitRow]]:
    """Each group of fitted constants is kept only if the traces' own iteration times, simulated
    with it, come out no further from what was measured than without it. Least squares on task
    durations can move a constant far on rows it does not explain: in one bench_fidelity run the
    compute peak was scaled x38 from durations that did not grow with FLOPs, and the refit profile
    predicted its own traces 62% off where the profile before it was 26% off. Traces whose plan
    cannot be simulated again (no model or plan in their meta) skip the check."""
    from tiertune.traces.validate import predict, workload_of      # validate imports the simulator

    contention = {r: dict(row) for r, row in base.contention.items()}
    try:
        for t in traces:
            workload_of(t)
    except InputError:
        checked = False
    else:
        checked = True

    def error(changes: dict, contention: dict) -> float:
        profile = base.replace(**changes, contention={r: row for r, row in contention.items() if row})
        errs = []
        for t in traces:
            res = predict(t, profile)
            if not res.fits:
                return math.inf
            errs.append(abs(res.iteration_s / t.iteration_s() - 1))
        return sum(errs) / len(errs)

    changes: dict = {}
    rows: list[FitRow] = []
    now = error(changes, contention) if checked else 0.0
    for part, part_rows, part_contention in parts:
        if part and checked:
            trial = {**contention, **part_contention}
            err = error({**changes, **part}, trial)
            if not err <= now:
                rows += [replace(r, after=None, note=f"refused: the traces' iteration error would go from "
                                                      f"{now:.1%} to {err:.1%}") if r.after is not None else r
                         for r in part_rows]
                continue
            now = err
        changes.update(part)
        contention.update(part_contention)
        rows += part_rows
    changes["contention"] = {r: row for r, row in contention.items() if row}
    return changes, rows


def fit_profile(trace: Trace, base: HardwareProfile, dtype: str | None = None, optimizer: str | None = None,
                min_events: int = MIN_EVENTS, name: str | None = None, where: str = "trace") -> FitResult:
    """Refit `base` from `trace`; raises InputError when no constant could be fitted."""
    return fit_profiles([trace], base, dtype, optimizer, min_events, name, where)


def fit_profiles(traces: list[Trace], base: HardwareProfile, dtype: str | None = None, optimizer: str | None = None,
                 min_events: int = MIN_EVENTS, name: str | None = None, where: str = "traces") -> FitResult:
    """Refit `base` from the events of several traces at once (one least-squares problem per
    constant over all of them: runs of different plans and models pin the constants down better
    than any one run). The traces should share the dtype and optimizer; the first one's are used."""
    if min_events < 2:
        raise InputError(f"--min-events must be at least 2, got {min_events}")
    if not traces:
        raise InputError("no traces to fit from")
    dtype = dtype or _meta_train(traces[0], "dtype") or ("bf16" if "bf16" in base.gpu_flops else next(iter(base.gpu_flops)))
    optimizer = optimizer or _meta_train(traces[0], "optimizer") or "adamw"
    cms = [_compute_model(t, base, dtype) for t in traces]
    evs = [_less_task_overheads(with_overlaps(_events(t)), t, cm, base) for t, cm in zip(traces, cms)]
    ev = pd.concat([e.assign(params=_update_params(e, cm, _grad_ranks(t))) for e, cm, t in zip(evs, cms, traces)],
                   ignore_index=True)
    compute = [_compute_samples(e, base, dtype, cm) for e, cm in zip(evs, cms)]
    parts: list[tuple[dict, list[FitRow], dict]] = []       # (constants, their rows, contention rows)
    for victim, (part, r, factors) in (("gpu", _fit_compute(compute, base, dtype, min_events)),
                                         ("cpu", _fit_update(ev, base, optimizer, min_events))):
        parts.append((part, r, {victim: factors} if part else {}))
    for link in _links(base):
        part, r = _fit_link(ev, base, link, min_events)
        parts.append((part, r, {}))
    part, r = _fit_duplex(evs, base)
    parts.append((part, r, {}))
    overhead = parts[0][0].get("gpu_task_overhead_s", base.gpu_task_overhead_s)
    part, r = _fit_gpu_update(evs, cms, base, overhead, min_events)
    parts.append((part, r, {}))
    if not any(r.after is not None for _, part_rows, _ in parts for r in part_rows):
        raise InputError(f"{where}: no constant could be fitted ({len(ev)} events with a duration; "
                         f"need >= {min_events} per group of compute, copy, SSD or cpu update events)")
    changes, rows = _keep_what_predicts_better(traces, base, parts)
    fitted = sum(r.after is not None for r in rows)
    desc = f"{base.name} refit by least squares from {where} ({len(ev)} events, {fitted} constants)"
    profile = base.replace(**changes, name=name or f"{base.name}-fit", source="calibrated",
                           description=desc.replace('"', "").replace("'", "").replace("\\", "/"))
    return FitResult(profile, rows)
