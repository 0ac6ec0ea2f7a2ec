"""The Trace: lossless round trips through Chrome JSON, parquet and csv; clear errors on bad files."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from tiertune.errors import InputError
from tiertune.traces import Trace
from tiertune.vocab import RESOURCES

events = st.lists(st.fixed_dictionaries({
    "source": st.sampled_from(["simulated", "measured"]), "iteration": st.integers(0, 3),
    "task": st.text(alphabet="abcdefgh_0123456789", min_size=1, max_size=12),
    "kind": st.sampled_from(["forward", "backward", "load", "update"]), "layer": st.integers(0, 100),
    "resource": st.sampled_from(RESOURCES),
    "start_s": st.floats(0, 1e3, allow_nan=False), "end_s": st.floats(0, 1e3, allow_nan=False),
    "bytes": st.integers(0, 2**50), "flops": st.floats(0, 1e18, allow_nan=False)}), max_size=30).map(
    lambda evs: [{**e, "end_s": e["start_s"] + e["end_s"]} for e in evs])     # end_s drawn as a duration
memory = st.lists(st.fixed_dictionaries({"time_s": st.floats(0, 1e3, allow_nan=False),
                                         "tier": st.sampled_from(["gpu", "cpu", "ssd"]),
                                         "bytes": st.integers(0, 2**50)}), max_size=20)


@given(events, memory)
@settings(max_examples=30, deadline=None)
def test_trace_survives_every_file_format_unchanged(tmp_path_factory, ev, mem):
    trace = Trace.from_records(ev, mem, {"model": "m", "capacity": {"gpu": 1 << 30}})
    d = tmp_path_factory.mktemp("t")
    for suffix in (".json", ".parquet", ".csv"):
        trace.save(d / f"run{suffix}")
        assert Trace.load(d / f"run{suffix}").equals(trace), suffix


def _trace():
    ev = [dict(source="simulated", iteration=i, task=f"fwd{i}", kind="forward", layer=1, resource="gpu",
               start_s=2.0 * i, end_s=2.0 * i + 1.5, bytes=0, flops=1.0) for i in range(3)]
    return Trace.from_records(ev, [{"time_s": 0.0, "tier": "gpu", "bytes": 7}])


def test_steady_state_iteration_time_skips_the_first_iteration():
    t = _trace()
    assert t.iteration_s() == pytest.approx(2.0)
    assert t.busy_s()["gpu"] == pytest.approx(1.5)
    assert t.bottleneck() == "gpu" and t.peak_bytes()["gpu"] == 7


def test_chrome_trace_has_one_track_per_resource_and_memory_counters(tmp_path):
    t = _trace()
    t.save(tmp_path / "t.json")
    d = json.loads((tmp_path / "t.json").read_text())
    names = {e["args"]["name"] for e in d["traceEvents"] if e.get("name") == "thread_name"}
    assert set(RESOURCES) <= names
    assert any(e["ph"] == "C" and e["name"] == "memory gpu" for e in d["traceEvents"])


def test_truncated_and_foreign_traces_are_refused(tmp_path):
    t = _trace()
    t.save(tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="truncated"):
        Trace.load(tmp_path / "cut.json")
    (tmp_path / "old.json").write_text(text.replace("tiertune.trace/1", "tiertune.trace/0"))
    with pytest.raises(InputError, match="trace/0"):
        Trace.load(tmp_path / "old.json")
    (tmp_path / "kineto.json").write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(InputError, match="not a tiertune trace"):
        Trace.load(tmp_path / "kineto.json")


def test_device_events_recorded_inside_another_count_once():
    """A LOMO backward recorded around the fused updates it runs: the device is busy 10 s, not
    13 s, and the backward's own time is what is left; CPU events that overlap are parallel work."""
    from tiertune.traces.trace import own_durations

    rows = [("backward", "gpu", 0.0, 10.0), ("update", "gpu", 2.0, 3.0), ("update", "gpu", 5.0, 7.0),
            ("forward", "gpu", 10.0, 12.0), ("update", "cpu", 0.0, 10.0), ("update", "cpu", 2.0, 5.0)]
    ev = [{"source": "measured", "iteration": 0, "task": f"t{i}", "kind": k, "layer": 1, "resource": r,
           "start_s": s, "end_s": e, "bytes": 0, "flops": 0.0} for i, (k, r, s, e) in enumerate(rows)]
    trace = Trace.from_records(ev)
    assert list(own_durations(trace.events)) == [7.0, 1.0, 2.0, 2.0, 10.0, 3.0]
    assert trace.busy_s()["gpu"] == 12.0 and trace.busy_s()["cpu"] == 13.0
