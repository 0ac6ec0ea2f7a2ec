"""The `Trace` (format `tiertune.trace/1`): a tidy table of events, one row each, plus memory
samples per tier. The simulator and the executor both write it; replay, validation and plots
read it without caring which produced it.

Files: Chrome trace JSON (opens in Perfetto: one track per resource, memory as counters;
exact seconds kept in args so a round trip is lossless), or parquet / csv (events file plus a
`.memory` sibling, metadata as JSON in the events file's schema or a `.meta.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tiertune.errors import InputError
from tiertune.fileio import atomic_write, atomic_write_text
from tiertune.schedule import steady_iteration_s
from tiertune.vocab import RESOURCES, TIERS

FORMAT = "tiertune.trace/1"
EVENT_COLUMNS = ["source", "iteration", "task", "kind", "layer", "resource", "start_s", "end_s", "bytes", "flops"]
MEMORY_COLUMNS = ["time_s", "tier", "bytes"]
_EVENT_DTYPES = {"source": "object", "iteration": "int64", "task": "object", "kind": "object", "layer": "int64",
                 "resource": "object", "start_s": "float64", "end_s": "float64", "bytes": "int64", "flops": "float64"}
_MEMORY_DTYPES = {"time_s": "float64", "tier": "object", "bytes": "int64"}


def interval_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge intervals [a, b) sorted by start into disjoint ones: a new one begins where a start
    lies past every earlier end."""
    reach = np.maximum.accumulate(b)
    first = np.concatenate([[True], a[1:] > reach[:-1]])
    last = np.concatenate([first[1:], [True]])
    return a[first], reach[last]


# A link whose two directions overlapped for more than this share of the lighter one's busy time
# ran them at once: replay keeps them apart, a fit calls the link duplex.
DUPLEX_SHARE = 0.05


def overlap_share(events: pd.DataFrame, a: str, b: str) -> tuple[float, float]:
    """(seconds during which an event on resource `a` and one on `b` both ran, busy seconds of the
    lighter of the two). Each side's events are serial on their resource, so a sweep over the two
    sorted lists suffices."""
    ea, eb = events[events["resource"] == a], events[events["resource"] == b]
    if ea.empty or eb.empty:
        return 0.0, 0.0
    lighter = float(min((ea["end_s"] - ea["start_s"]).sum(), (eb["end_s"] - eb["start_s"]).sum()))
    x = ea.sort_values("start_s")[["start_s", "end_s"]].to_numpy()
    y = eb.sort_values("start_s")[["start_s", "end_s"]].to_numpy()
    i = j = 0
    both = 0.0
    while i < len(x) and j < len(y):
        both += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return both, lighter


def own_durations(events: pd.DataFrame) -> pd.Series:
    """Each event's duration, less, on the device, the time of device events that run inside it.
    The executor records a LOMO backward around the fused update it runs in each gradient's hook;
    summed as they are, the device would be busy twice over. The device runs one task at a time
    (one stream); elsewhere events that overlap are parallel work (CPU workers, SSD threads)."""
    own = (events["end_s"] - events["start_s"]).astype(float)
    ev = events[events["resource"] == "gpu"]
    if len(ev) > 1:
        ev = ev.sort_values(["start_s", "end_s"], ascending=[True, False], kind="stable")
        start, end = ev["start_s"].to_numpy(float), ev["end_s"].to_numpy(float)
        # events starting before i ends; only those also ending by then are inside it
        hi = np.searchsorted(start, end, side="left")
        for i in np.flatnonzero(hi > np.arange(len(ev)) + 1):
            j = np.arange(i + 1, hi[i])
            j = j[end[j] <= end[i]]
            if len(j):
                a, b = interval_union(start[j], end[j])
                own.loc[ev.index[i]] -= float((b - a).sum())
    return own


def _typed(df: pd.DataFrame, dtypes: dict) -> pd.DataFrame:
    df = df.reindex(columns=list(dtypes))
    return df.astype(dtypes).reset_index(drop=True)


@dataclass
class Trace:
    events: pd.DataFrame
    memory: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MEMORY_COLUMNS))
    meta: dict = field(default_factory=dict)   # source, model, hardware, plan, train, capacity {tier: bytes}

    def __post_init__(self) -> None:
        missing = set(EVENT_COLUMNS) - set(self.events.columns)
        if missing:
            raise InputError(f"trace events lack column(s) {sorted(missing)}")
        missing = set(MEMORY_COLUMNS) - set(self.memory.columns)
        if missing:
            raise InputError(f"trace memory samples lack column(s) {sorted(missing)}")
        try:
            self.events = _typed(self.events, _EVENT_DTYPES)
            self.memory = _typed(self.memory, _MEMORY_DTYPES)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InputError(f"trace: a column has values of the wrong type ({str(exc).splitlines()[0]})") from None
        if not isinstance(self.meta, dict):
            raise InputError(f"trace metadata must be an object, got {type(self.meta).__name__}")

    def check(self, where: str) -> "Trace":
        """Refuse a trace no analysis can trust: non-finite or negative times, an event that ends
        before it starts, negative bytes, non-finite FLOPs or memory. Returns self."""
        ev, mem = self.events, self.memory
        problems = [
            (~np.isfinite(ev["start_s"]) | ~np.isfinite(ev["end_s"]), "a non-finite start_s or end_s"),
            (ev["end_s"] < ev["start_s"], "end_s before start_s"),
            (ev["bytes"] < 0, "negative bytes"),
            (~np.isfinite(ev["flops"]) | (ev["flops"] < 0), "non-finite or negative flops"),
        ]
        for bad, what in problems:
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise InputError(f"{where}: event {i} ({ev['task'].iloc[i]}) has {what}; "
                                 f"{int(bad.sum())} such event(s)")
        if len(mem) and (~np.isfinite(mem["time_s"]) | (mem["bytes"] < 0)).any():
            raise InputError(f"{where}: a memory sample has a non-finite time or negative bytes")
        return self

    @classmethod
    def from_records(cls, events: list[dict], memory: list[dict] | None = None, meta: dict | None = None) -> "Trace":
        return cls(pd.DataFrame(events, columns=EVENT_COLUMNS), pd.DataFrame(memory or [], columns=MEMORY_COLUMNS),
                   dict(meta or {}))

    # --- analysis ------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return str(self.meta.get("source", self.events["source"].iloc[0] if len(self.events) else "unknown"))

    def iteration_ends(self) -> pd.Series:
        return self.events.groupby("iteration")["end_s"].max().sort_index()

    def iteration_s(self) -> float:
        """Steady-state iteration time (schedule.steady_iteration_s over the iterations' ends); the
        only iteration's length when there is one."""
        ends = self.iteration_ends()
        if len(ends) == 0:
            return 0.0
        if len(ends) == 1:
            return float(ends.iloc[0] - self.events["start_s"].min())
        return float(steady_iteration_s(list(ends)))

    def steady_events(self) -> pd.DataFrame:
        iters = self.events["iteration"]
        return self.events[iters > iters.min()] if iters.nunique() > 1 else self.events

    def busy_s(self) -> dict[str, float]:
        """Busy seconds per resource in one steady-state iteration."""
        ev = self.steady_events()
        n = max(ev["iteration"].nunique(), 1)
        busy = own_durations(ev).groupby(ev["resource"]).sum() / n
        return {r: float(busy.get(r, 0.0)) for r in RESOURCES if r in busy.index or r in RESOURCES}

    def bottleneck(self) -> str:
        busy = self.busy_s()
        return max(busy, key=busy.get) if busy else "gpu"

    def peak_bytes(self) -> dict[str, int]:
        peaks = self.memory.groupby("tier")["bytes"].max()
        return {t: int(peaks.get(t, 0)) for t in TIERS}

    def kind_durations(self) -> pd.DataFrame:
        """Mean duration and bytes per (kind, resource) over steady-state iterations."""
        ev = self.steady_events().assign(duration_s=own_durations)
        return ev.groupby(["kind", "resource"]).agg(count=("task", "size"), duration_s=("duration_s", "sum"),
                                                    bytes=("bytes", "sum")).reset_index()

    # --- equality (for round-trip tests) -------------------------------------------------------------
    def equals(self, other: "Trace") -> bool:
        return (self.events.equals(other.events) and self.memory.equals(other.memory)
                and json.dumps(self.meta, sort_keys=True, default=str) == json.dumps(other.meta, sort_keys=True, default=str))

    # --- Chrome / Perfetto JSON ---------------------------------------------------------------
    def to_chrome_dict(self) -> dict:
        tids = {r: i + 1 for i, r in enumerate(RESOURCES)}
        for r in self.events["resource"].unique():
            tids.setdefault(r, len(tids) + 1)
        out = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": f"tiertune ({self.source})"}}]
        out += [{"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": r}} for r, t in tids.items()]
        out += [{"ph": "M", "pid": 1, "tid": t, "name": "thread_sort_index", "args": {"sort_index": t}} for t in tids.values()]
        for row in self.events.itertuples(index=False):
            out.append({"ph": "X", "pid": 1, "tid": tids[row.resource], "name": row.task, "cat": row.kind,
                        "ts": row.start_s * 1e6, "dur": (row.end_s - row.start_s) * 1e6,
                        "args": {"source": row.source, "iteration": int(row.iteration), "layer": int(row.layer),
                                 "resource": row.resource, "start_s": row.start_s, "end_s": row.end_s,
                                 "bytes": int(row.bytes), "flops": float(row.flops)}})
        for row in self.memory.itertuples(index=False):
            out.append({"ph": "C", "pid": 1, "name": f"memory {row.tier}", "ts": row.time_s * 1e6,
                        "args": {"bytes": int(row.bytes), "time_s": row.time_s, "tier": row.tier}})
        return {"traceEvents": out, "displayTimeUnit": "ms", "tiertune": {"format": FORMAT, "meta": self.meta}}

    @classmethod
    def from_chrome_dict(cls, d: dict, where: str = "trace") -> "Trace":
        if not isinstance(d, dict) or "traceEvents" not in d:
            raise InputError(f"{where}: not a Chrome trace (no traceEvents)")
        tt = d.get("tiertune")
        if not isinstance(tt, dict):
            raise InputError(f"{where}: not a tiertune trace (no 'tiertune' header)")
        if tt.get("format") != FORMAT:
            raise InputError(f"{where}: trace format {tt.get('format')!r}, this tiertune reads {FORMAT!r}")
        events, memory = [], []
        try:
            for e in d["traceEvents"]:
                if e.get("ph") == "X":
                    a = e["args"]
                    events.append({"source": a["source"], "iteration": a["iteration"], "task": e["name"],
                                   "kind": e["cat"], "layer": a["layer"], "resource": a["resource"],
                                   "start_s": a["start_s"], "end_s": a["end_s"], "bytes": a["bytes"],
                                   "flops": a["flops"]})
                elif e.get("ph") == "C" and "tier" in e.get("args", {}):
                    a = e["args"]
                    memory.append({"time_s": a["time_s"], "tier": a["tier"], "bytes": a["bytes"]})
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{where}: malformed trace event (missing {exc})") from None
        meta = tt.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError(f"{where}: tiertune.meta must be an object, got {type(meta).__name__}")
        return cls.from_records(events, memory, meta).check(where)

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> list[Path]:
        """By suffix: .json (Chrome/Perfetto), .parquet or .csv (plus a .memory sibling). Returns files written."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write_text(path, json.dumps(self.to_chrome_dict()))
            return [path]
        if path.suffix not in (".parquet", ".csv"):
            raise InputError(f"trace file must end in .json, .parquet or .csv: {path}")
        mem_path = path.with_suffix(".memory" + path.suffix)
        meta_path = path.with_suffix(".meta.json")
        for df, p in ((self.events, path), (self.memory, mem_path)):
            with atomic_write(p, "wb") as f:
                df.to_parquet(f, index=False) if path.suffix == ".parquet" else df.to_csv(f, index=False)
        atomic_write_text(meta_path, json.dumps({"format": FORMAT, "meta": self.meta}))
        return [path, mem_path, meta_path]

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"trace file not found: {path}")
        if path.suffix == ".json":
            try:
                d = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"malformed or truncated trace {path}: {exc}") from None
            return cls.from_chrome_dict(d, where=str(path))
        if path.suffix not in (".parquet", ".csv"):
            raise InputError(f"trace file must end in .json, .parquet or .csv: {path}")
        meta_path = path.with_suffix(".meta.json")
        try:
            header = json.loads(meta_path.read_text()) if meta_path.is_file() else {"format": FORMAT, "meta": {}}
            if header.get("format") != FORMAT:
                raise InputError(f"{meta_path}: trace format {header.get('format')!r}, this tiertune reads {FORMAT!r}")
            mem_path = path.with_suffix(".memory" + path.suffix)
            if path.suffix == ".parquet":
                events = pd.read_parquet(path)
                memory = pd.read_parquet(mem_path) if mem_path.is_file() else None
            else:    # strings stay strings ("0" is a task name, not a number)
                events = pd.read_csv(path, dtype=_EVENT_DTYPES, keep_default_na=False)
                memory = pd.read_csv(mem_path, dtype=_MEMORY_DTYPES, keep_default_na=False) if mem_path.is_file() else None
            if memory is None:
                memory = pd.DataFrame(columns=MEMORY_COLUMNS)
        except InputError:
            raise
        except Exception as exc:   # pyarrow / csv parser errors have no common base
            raise InputError(f"malformed trace {path}: {exc}") from None
        meta = header.get("meta", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: meta must be an object")
        return cls(events, memory, meta).check(str(path))
