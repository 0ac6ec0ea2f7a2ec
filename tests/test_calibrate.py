"""`tiertune calibrate`: microbenchmarks -> a loadable, plausible profile; fitting a profile to a
trace recovers the constants the trace was generated from; bad input ends with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiertune.cli import main
from tiertune.hardware import load_hardware
from tiertune.simulator.costs import COPY_LATENCY_S, KERNEL_LATENCY_S, SSD_LATENCY_S
from tiertune.traces.calibrate import efficiency_curve, isotonic, layer_bench_spec, layer_constants, sparse_rate
from tiertune.traces.fit import fit_profile
from tiertune.traces.trace import Trace

BASE = "fuyou-4090-12ssd"         # 12 SSDs: exercises the per-device bandwidth convention
MiB = 1 << 20


# --- microbenchmarks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "local.toml"
    assert main(["calibrate", "--device", "cpu", "--quick", "-o", str(out)]) == 0
    return out


def test_quick_calibration_loads_with_plausible_numbers(quick_profile):
    hw = load_hardware(str(quick_profile))
    assert hw.name == "local-cpu" and hw.source == str(quick_profile)
    assert 1e8 < hw.gpu_flops["fp32"] < 1e13
    assert 0 < hw.gpu_flops["bf16"] < 1e13
    for bw in (hw.h2d_bps, hw.d2h_bps, hw.gpu_mem_bw_bps):          # host memcpy / elementwise add
        assert 1e8 < bw < 1e12
    assert hw.pageable_factor == 1.0 and not hw.pcie_duplex         # no pinned memory on a CPU
    assert 1e5 < hw.ssd_read_bps < 1e11 and 1e5 < hw.ssd_write_bps < 1e11
    assert 1e6 < hw.cpu_adam_params_per_s < 1e11 and hw.cpu_sgd_params_per_s > 1e6
    assert hw.cpu_mem_bytes > hw.gpu_mem_bytes > 0                  # default budget: a quarter of RAM
    assert hw.cpu_cores >= 1 and hw.ssd_count == 1 and hw.ssd_capacity_bytes > 0
    assert "memcpy" in hw.description and "SSD:" in hw.description


def test_quick_calibration_measures_each_architectures_activation_rate_and_a_backward_factor(quick_profile):
    """Each architecture gets a measured rate, or (timings that did not grow with the activations,
    as a burst of load from other processes can make them) memory bandwidth and a note saying so."""
    hw = load_hardware(str(quick_profile))
    for arch in ("llama", "gpt"):
        assert arch in hw.activation_bps or f"{arch} block: forward time did not grow" in hw.description
    assert hw.activation_bps and all(1e6 < r < 1e12 for r in hw.activation_bps.values())
    assert 0.5 < hw.backward_factor < 6


@pytest.mark.parametrize("rates, factor", [({"llama": 2e9, "gpt": 1e9}, 1.7), ({"llama": 5e8, "gpt": 3e9}, 2.4)])
def test_layer_constants_recover_the_rate_and_factor_the_timings_were_made_with(rates, factor):
    """Timings of the layer benchmark's blocks made by the cost model itself, with a fixed cost per
    task on top: the activation rate per arch and the backward factor come back."""
    from tiertune.simulator.costs import CostModel

    base = load_hardware("lsp-4090").replace(task_overheads={}, gpu_task_overhead_s=0.0)
    true = base.replace(activation_bps=rates, backward_factor=factor)
    layers = []
    for arch in rates:
        for h in (32, 128, 256):
            spec, train = layer_bench_spec(arch, h, 64, "fp32")
            cm = CostModel(spec, train, true)
            layers.append((spec, train, 300e-6 + cm.forward_s(1), 500e-6 + cm.backward_s(1)))
    got, got_factor, notes = layer_constants(layers, base)
    assert got == pytest.approx(rates, rel=1e-6)
    assert got_factor == pytest.approx(factor, rel=1e-6)
    assert any("activations GB/s" in n for n in notes)


def test_a_block_whose_time_does_not_grow_with_its_activations_keeps_memory_bandwidth():
    base = load_hardware("lsp-4090")
    layers = [(*layer_bench_spec("llama", h, 64, "fp32"), 1e-3, 2e-3) for h in (32, 128, 256)]
    rates, factor, notes = layer_constants(layers, base)
    assert rates == {} and any("memory bandwidth" in n for n in notes)


def test_activations_are_charged_at_their_architectures_rate_else_at_memory_bandwidth():
    from tiertune.simulator.costs import CostModel

    hw = load_hardware("lsp-4090")
    spec, train = layer_bench_spec("gpt", 128, 64, "fp32")
    lc = CostModel(spec, train, hw).layers[1]
    assert CostModel(spec, train, hw).activation_part_s(lc) == pytest.approx(lc.act_bytes / hw.gpu_mem_bw_bps)
    slow = hw.replace(activation_bps={"gpt": 1e9, "llama": 5e9})
    assert CostModel(spec, train, slow).activation_part_s(lc) == pytest.approx(lc.act_bytes / 1e9)
    assert CostModel(spec, train, slow).forward_s(1) > CostModel(spec, train, hw).forward_s(1)


def test_sparse_rate_recovers_the_flops_the_timings_were_made_with_and_compress_charges_it():
    from tiertune.simulator.costs import CostModel

    hw = load_hardware("lsp-4090")
    samples = []
    for h in (128, 256):
        spec, train = layer_bench_spec("llama", h, 64, "fp32")
        samples.append((spec, train, h // 2, 4, 200e-6 + CostModel(spec, train, hw).compress_flops(1, h // 2, 4) / 3e9))
    rate = sparse_rate(samples, hw)
    assert rate == pytest.approx(3e9, rel=1e-6)
    spec, train = layer_bench_spec("llama", 256, 64, "fp32")
    cm = CostModel(spec, train, hw.replace(sparse_flops=rate))
    assert cm.compress_s(1, 128, 4) == pytest.approx(KERNEL_LATENCY_S + cm.compress_flops(1, 128, 4) / 3e9)
    assert cm.decompress_s(1, 128, 4) == cm.compress_s(1, 128, 4)
    assert sparse_rate(samples[:1], hw) is None


def test_quick_calibration_measures_the_executors_sparse_products(quick_profile):
    hw = load_hardware(str(quick_profile))
    assert 1e6 < hw.sparse_flops < hw.gpu_flops["fp32"]


def test_activation_rates_round_trip_through_toml_and_a_bad_table_is_one_clear_error(tmp_path, capsys):
    hw = load_hardware("lsp-4090").replace(activation_bps={"llama": 2.5e9, "gpt": 1.25e9}, sparse_flops=3e9)
    path = tmp_path / "p.toml"
    path.write_text(hw.to_toml())
    back = load_hardware(str(path))
    assert back.activation_bps == pytest.approx(hw.activation_bps) and back.sparse_flops == pytest.approx(3e9)
    path.write_text(hw.to_toml().replace("llama = 2.5", "llama = -2.5"))
    rc = main(["simulate", "--model", "tiny-llama", "--policy", "gpu-only", "--hardware", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "activation_gbps" in err, err


def test_quick_calibration_tables_ascend(quick_profile):
    hw = load_hardware(str(quick_profile))
    for curve in (hw.matmul_efficiency, hw.pcie_efficiency, hw.ssd_efficiency):
        sizes, effs = zip(*curve.points)
        assert sizes[0] == 0 and list(sizes) == sorted(sizes)
        assert list(effs) == sorted(effs) and all(0 < e <= 1 for e in effs)


def test_isotonic_pools_violators():
    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    curve = efficiency_curve([4e6, 1e6, 1e6], [0.9, 0.4, 0.6])
    assert curve.points == ((0.0, 0.5), (4e6, 0.9))


# --- fitting to a trace ----------------------------------------------------------------------------------
TRUE = {"peak": 90e12, "h2d": 18e9, "d2h": 21e9, "pcie_lat": 35e-6,
        "ssd_read": 30e9, "ssd_write": 14e9, "ssd_lat": 250e-6, "adam": 0.9e9}


def synthetic_trace(noise: float = 0.01, seed: int = 0, update_events: int = 40) -> Trace:
    """Events whose durations follow the cost model's form with the TRUE constants, +-1% noise."""
    rng = np.random.default_rng(seed)
    base = load_hardware(BASE)
    clock = dict.fromkeys(("gpu", "h2d", "d2h", "ssd_read", "ssd_write", "cpu"), 0.0)
    events = []

    def add(kind, res, secs, nbytes=0, flops=0.0):
        secs *= 1 + rng.uniform(-noise, noise)
        start = clock[res]
        clock[res] = start + secs
        events.append({"source": "measured", "iteration": 0, "task": f"{kind}-{len(events)}", "kind": kind,
                       "layer": len(events) % 8, "resource": res, "start_s": start, "end_s": start + secs,
                       "bytes": int(nbytes), "flops": float(flops)})

    sizes = [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
    for _ in range(30):
        f = float(rng.choice([2e9, 2e10, 2e11]))
        for kind, mult in (("forward", 1), ("backward", 2), ("recompute", 1)):
            flops = mult * f
            # the cost model's convention: a backward runs at its forward's matmul efficiency
            add(kind, "gpu", KERNEL_LATENCY_S + flops / (TRUE["peak"] * base.matmul_efficiency.at(f)), flops=flops)
        n = int(rng.choice(sizes))
        add("load_param", "h2d", TRUE["pcie_lat"] + n / TRUE["h2d"], n)
        add("offload_grad", "d2h", TRUE["pcie_lat"] + n / TRUE["d2h"], n)
        add("read_param", "ssd_read", TRUE["ssd_lat"] + n / TRUE["ssd_read"], n)
        add("write_optim", "ssd_write", TRUE["ssd_lat"] + n / TRUE["ssd_write"], n)
    for _ in range(update_events):
        params = int(rng.choice([50e6, 200e6, 800e6]))
        add("update", "cpu", params / TRUE["adam"], 4 * params)
    return Trace.from_records(events, meta={"source": "measured", "hardware": BASE,
                                            "train": {"dtype": "bf16", "optimizer": "adamw"}})


def test_fit_recovers_known_constants():
    base = load_hardware(BASE)
    res = fit_profile(synthetic_trace(), base)
    hw = res.profile
    assert hw.gpu_flops["bf16"] == pytest.approx(TRUE["peak"], rel=0.03)
    assert hw.gpu_flops["fp32"] == base.gpu_flops["fp32"]           # only the trace's dtype moves
    assert hw.h2d_bps == pytest.approx(TRUE["h2d"], rel=0.03)
    assert hw.d2h_bps == pytest.approx(TRUE["d2h"], rel=0.03)
    assert hw.ssd_read_total_bps == pytest.approx(TRUE["ssd_read"], rel=0.03)
    assert hw.ssd_write_total_bps == pytest.approx(TRUE["ssd_write"], rel=0.03)
    assert hw.cpu_adam_params_per_s == pytest.approx(TRUE["adam"], rel=0.03)
    assert hw.cpu_sgd_params_per_s == base.cpu_sgd_params_per_s
    lat = {r.constant: r.after for r in res.rows}
    assert lat["pcie latency"] == pytest.approx(TRUE["pcie_lat"] * 1e6, rel=0.1)
    assert lat["ssd latency"] == pytest.approx(TRUE["ssd_lat"] * 1e6, rel=0.1)
    # the cost model's fixed latency + the refit tables reproduce the true durations at each size
    # (h2d/d2h bandwidths are close, so their shared table fits both; SSD read and write differ 2x,
    # so their shared table is a compromise at small sizes)
    for n in (1 * MiB, 16 * MiB, 256 * MiB):
        for bps, true_bps in ((hw.h2d_bps, TRUE["h2d"]), (hw.d2h_bps, TRUE["d2h"])):
            model = COPY_LATENCY_S + n / (bps * hw.pcie_efficiency.at(n))
            assert model == pytest.approx(TRUE["pcie_lat"] + n / true_bps, rel=0.05)
        for bps, true_bps in ((hw.ssd_read_total_bps, TRUE["ssd_read"]), (hw.ssd_write_total_bps, TRUE["ssd_write"])):
            model = SSD_LATENCY_S + n / (bps * hw.ssd_efficiency.at(n / hw.ssd_count))
            assert model == pytest.approx(TRUE["ssd_lat"] + n / true_bps, rel={MiB: 0.25, 16 * MiB: 0.1}.get(n, 0.03))


def test_fit_counts_the_compressed_parameters_an_lsp_update_runs_adam_on():
    """At grad_rank d the CPU AdamW updates the d x d projections, not the layer's weights: a run of
    LSP-Offload on a host 3x slower at Adam than the profile says refits to that host's rate."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.workload import TrainSpec, load_model

    model, base = load_model("small-llama"), load_hardware("lsp-4090")
    plan = make_policy("lsp-offload", model, TrainSpec(batch=4, seq_len=64, dtype="fp32"), base)
    assert all(lp.grad_rank for lp in plan.layers)
    host = base.replace(cpu_adam_params_per_s=base.cpu_adam_params_per_s / 3)
    trace = simulate(model, plan.train, host, plan, iterations=4).trace
    assert fit_profile(trace, base).profile.cpu_adam_params_per_s == pytest.approx(host.cpu_adam_params_per_s, rel=0.02)


def test_fit_uses_the_runs_cost_model_when_the_trace_names_it():
    """Durations from the cost model itself (matmuls at the true peak plus latency and elementwise
    work): the model-aware fit recovers the peak exactly where the FLOPs-only fit cannot."""
    from tiertune.simulator.costs import CostModel
    from tiertune.workload import TrainSpec, load_model

    base = load_hardware(BASE)
    model, train = load_model("llama2-7b"), TrainSpec(batch=2, seq_len=1024, dtype="bf16")
    truth = CostModel(model, train, base.replace(gpu_flops=dict(base.gpu_flops, bf16=TRUE["peak"])))
    events, t = [], 0.0
    for layer in range(1, len(truth.layers) - 1):
        for kind, secs in (("forward", truth.forward_s(layer)), ("backward", truth.backward_s(layer))):
            events.append({"source": "measured", "iteration": 0, "task": f"{kind}{layer}", "kind": kind, "layer": layer,
                           "resource": "gpu", "start_s": t, "end_s": t + secs, "bytes": 0,
                           "flops": truth.layers[layer].fwd_flops * (2 if kind == "backward" else 1)})
            t += secs
    meta = {"model_spec": model.to_dict(), "train": train.to_dict()}
    fit = fit_profile(Trace.from_records(events, meta=meta), base)
    assert fit.profile.gpu_flops["bf16"] == pytest.approx(TRUE["peak"], rel=1e-6)
    assert "via the cost model" in fit.rows[0].note
    flops_only = fit_profile(Trace.from_records(events, meta={}), base)
    assert "from FLOPs" in flops_only.rows[0].note


def test_fit_skips_groups_with_too_few_events():
    base = load_hardware(BASE)
    res = fit_profile(synthetic_trace(update_events=2), base)
    row = next(r for r in res.rows if r.constant.startswith("cpu adam"))
    assert row.after is None and "skipped: 2 events" in row.note
    assert res.profile.cpu_adam_params_per_s == base.cpu_adam_params_per_s
    assert "skipped" in res.table()


def test_cli_fit_writes_loadable_profile(tmp_path, capsys):
    trace_path = tmp_path / "run.json"
    synthetic_trace().save(trace_path)
    out = tmp_path / "fit.toml"
    assert main(["calibrate", "--from-trace", str(trace_path), "-o", str(out)]) == 0   # base from trace meta
    printed = capsys.readouterr().out
    assert "h2d bandwidth" in printed and "before" in printed
    hw = load_hardware(str(out))
    assert hw.name == f"{BASE}-fit"
    assert hw.h2d_bps == pytest.approx(TRUE["h2d"], rel=0.03)


# --- bad input ----------------------------------------------------------------------------------------------
def _fails_with_one_line(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tiertune: error:") and "\n" not in err
    return err


def test_truncated_trace_exits_2(tmp_path, capsys):
    p = tmp_path / "run.json"
    synthetic_trace().save(p)
    p.write_text(p.read_text()[:500])
    out = tmp_path / "fit.toml"
    assert "truncated" in _fails_with_one_line(["calibrate", "--from-trace", str(p), "--profile", BASE, "-o", str(out)], capsys)
    assert not out.exists()


def test_other_schema_version_exits_2(tmp_path, capsys):
    p = tmp_path / "run.json"
    synthetic_trace().save(p)
    d = json.loads(p.read_text())
    d["tiertune"]["format"] = "tiertune.trace/2"
    p.write_text(json.dumps(d))
    err = _fails_with_one_line(["calibrate", "--from-trace", str(p), "--profile", BASE, "-o", str(tmp_path / "f.toml")], capsys)
    assert "tiertune.trace/2" in err


def test_unwritable_output_exits_2_before_benchmarks(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _fails_with_one_line(["calibrate", "--quick", "-o", str(blocker / "sub" / "p.toml")], capsys)
    assert "cannot write" in err
    _fails_with_one_line(["calibrate", "-o", str(tmp_path)], capsys)          # a directory


def test_trace_without_hardware_or_events_exits_2(tmp_path, capsys):
    p = tmp_path / "run.json"
    tr = synthetic_trace()
    Trace.from_records([], meta={}).save(p)
    assert "--profile" in _fails_with_one_line(["calibrate", "--from-trace", str(p), "-o", str(tmp_path / "f.toml")], capsys)
    assert "no constant" in _fails_with_one_line(
        ["calibrate", "--from-trace", str(p), "--profile", BASE, "-o", str(tmp_path / "f.toml")], capsys)
    tr.save(p)
    _fails_with_one_line(["calibrate", "--from-trace", str(p), "--profile", "no-such-preset", "-o", str(tmp_path / "f.toml")], capsys)


def test_fit_recovers_task_overhead_backward_factor_and_update_overhead():
    """Durations from a cost model whose profile has a CPU-like per-task overhead, backward factor
    and per-update overhead: fitting the base profile to them recovers all three and the peak."""
    from tiertune.simulator.costs import CostModel
    from tiertune.workload import TrainSpec, load_model

    base = load_hardware(BASE)
    truth_hw = base.replace(gpu_flops=dict(base.gpu_flops, bf16=TRUE["peak"]), gpu_task_overhead_s=300e-6,
                            backward_factor=1.8, update_overhead_s=500e-6, cpu_adam_params_per_s=TRUE["adam"])
    model, train = load_model("small-llama"), TrainSpec(batch=4, seq_len=64, dtype="bf16")
    truth = CostModel(model, train, truth_hw)
    events, t = [], 0.0

    def add(kind, layer, res, secs):
        nonlocal t
        events.append({"source": "measured", "iteration": 0, "task": f"{kind}{layer}-{len(events)}", "kind": kind,
                       "layer": layer, "resource": res, "start_s": t, "end_s": t + secs, "bytes": 0,
                       "flops": truth.layers[layer].fwd_flops})
        t += secs
    for layer in range(len(truth.layers)):
        add("forward", layer, "gpu", truth.forward_s(layer))
        add("backward", layer, "gpu", truth.backward_s(layer))
        add("update", layer, "cpu", truth.cpu_update_s(truth.layers[layer].params))
    meta = {"model_spec": model.to_dict(), "train": train.to_dict()}
    hw = fit_profile(Trace.from_records(events, meta=meta), base).profile
    assert hw.gpu_flops["bf16"] == pytest.approx(TRUE["peak"], rel=1e-3)
    assert hw.gpu_task_overhead_s == pytest.approx(300e-6, rel=1e-3)
    assert hw.backward_factor == pytest.approx(1.8, rel=1e-3)
    assert hw.update_overhead_s == pytest.approx(500e-6, rel=1e-3)
    assert hw.cpu_adam_params_per_s == pytest.approx(TRUE["adam"], rel=1e-3)
    again = load_hardware_text(hw.to_toml())
    assert (again.gpu_task_overhead_s, again.backward_factor, again.update_overhead_s) == pytest.approx(
        (hw.gpu_task_overhead_s, hw.backward_factor, hw.update_overhead_s), rel=1e-4)


def load_hardware_text(text: str):
    import tomllib

    from tiertune.hardware import profile_from_dict
    return profile_from_dict(tomllib.loads(text))


def test_fit_recovers_a_contention_factor_from_an_overlapped_and_a_serial_run():
    """Traces simulated with the GPU slowed 1.4x while CPU Adam runs: a Fuyou run (Adam overlapped
    with backward) beside a ZeRO-Offload run (Adam after backward, the same work alone) let the
    fit separate the peak from the slow-down, and it finds no slow-down where there is none."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.traces.fit import fit_profiles
    from tiertune.workload import TrainSpec, load_model

    m, t = load_model("gpt3-1.3b"), TrainSpec(batch=8, seq_len=1024)
    base = load_hardware(BASE)
    truth = base.replace(contention={"gpu": {"cpu": 0.4}})
    traces = [simulate(m, t, truth, make_policy(p, m, t, truth)).trace for p in ("fuyou", "zero-offload")]
    hw = fit_profiles(traces, base).profile
    assert hw.contention["gpu"]["cpu"] == pytest.approx(0.4, rel=0.03)
    assert hw.gpu_flops["bf16"] == pytest.approx(base.gpu_flops["bf16"], rel=0.01)
    assert "cpu" not in hw.contention
    assert load_hardware_text(hw.to_toml()).contention["gpu"]["cpu"] == pytest.approx(0.4, rel=0.03)


def test_fit_calls_a_link_duplex_only_where_its_two_directions_ran_at_once():
    """Reads and writes that overlapped were measured while sharing the drive: the fitted
    bandwidths already carry that, so the simulator must run them side by side, not in turn."""
    base = load_hardware(BASE).replace(ssd_duplex=False, pcie_duplex=False)
    overlapped = synthetic_trace()                 # every resource's events start at 0
    hw = fit_profile(overlapped, base).profile
    assert hw.ssd_duplex and hw.pcie_duplex
    ev = overlapped.events.copy()
    for later, first in (("ssd_write", "ssd_read"), ("d2h", "h2d")):
        shift = ev.loc[ev.resource == first, "end_s"].max()
        ev.loc[ev.resource == later, ["start_s", "end_s"]] += shift
    serial = Trace(ev, overlapped.memory, overlapped.meta)
    hw = fit_profile(serial, base.replace(ssd_duplex=True, pcie_duplex=True)).profile
    assert not hw.ssd_duplex and not hw.pcie_duplex


# --- per-task fixed costs of the runtime --------------------------------------------------------------------
def test_a_task_overhead_adds_to_exactly_the_tasks_it_names(tmp_path):
    """HardwareProfile.task_overheads: a fixed cost per (kind, resource, layer kind) is added to the
    cost-model duration of those tasks only, a fused update's row apart from a plain one's, a row
    naming what a copy moves before the kind's own row, and the table survives the profile's TOML."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.workload import TrainSpec, load_model

    m, t = load_model("tiny-llama"), TrainSpec(batch=2, seq_len=16)
    base = load_hardware("lsp-4090")
    extra = base.replace(task_overheads={"forward.gpu": {"block": 1e-3}, "update.gpu.fused": {"head": 2e-3},
                                         "grad.d2h": {"head": 3e-3}, "grad.d2h.grad": {"head": 4e-3}})
    path = tmp_path / "p.toml"
    path.write_text(extra.to_toml())
    back = load_hardware(str(path)).task_overheads
    assert back.keys() == extra.task_overheads.keys()
    assert all(back[k] == pytest.approx(v) for k, v in extra.task_overheads.items())

    def durations(hw, policy):
        plan = make_policy(policy, m, t, base)
        ev = simulate(m, plan.train, hw, plan, iterations=1).trace.events
        return {(k, int(layer)): float(d) for k, layer, d in zip(ev.kind, ev.layer, ev.end_s - ev.start_s)}

    blocks = {("forward", i) for i in (1, 2, 3, 4)}
    want = {"forward": 1e-3, "update": 2e-3, "grad": 4e-3}
    for policy, changed in (("gpu-only", blocks), ("lomo", blocks | {("update", 5)}),
                            ("zero-offload", blocks | {("grad", 5)})):
        a, b = durations(base, policy), durations(extra, policy)
        assert a.keys() == b.keys()
        added = {k: b[k] - a[k] for k in a if abs(b[k] - a[k]) > 1e-12}
        assert set(added) == changed
        assert all(v == pytest.approx(want[k[0]]) for k, v in added.items())


@pytest.mark.parametrize("table, words", [
    ('"forward.nowhere" = { block = 1 }', "forward.nowhere"),
    ('"forward.gpu" = { block = -1 }', "forward.gpu.block"),
    ('"forward.gpu" = 3', "forward.gpu"),
])
def test_a_bad_task_overhead_table_is_one_clear_error(tmp_path, capsys, table, words):
    path = tmp_path / "p.toml"
    path.write_text(load_hardware("lsp-4090").to_toml() + "\n[task_overheads_us]\n" + table + "\n")
    rc = main(["simulate", "--model", "tiny-llama", "--policy", "gpu-only", "--hardware", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("contention", [{}, {"gpu": {"cpu": 0.5}, "cpu": {"gpu": 0.8}}])
def test_the_probe_finds_the_per_task_costs_of_a_runtime_that_has_them(contention):
    """What the probe measures less what the cost model charges for a task of the probe's size is
    the runtime's fixed cost of that task: on a 'runtime' that is the simulator with a known table,
    every row the probe plans exercise comes back, for every layer kind, with the hand-off to a
    worker thread added to the rows of the tasks worker threads run. Where the device and the CPU
    slow each other down (the profile's measured contention), what a task took beside the other is
    taken back to what it takes alone: the engine slows it again where it overlaps."""
    from tiertune.simulator import simulate
    from tiertune.traces.calibrate import PROBE_MODEL, PROBE_TRAIN, probe_overheads

    base = load_hardware("lsp-4090").replace(gpu_task_overhead_s=0.0, update_overhead_s=0.0, contention=contention)
    rows = ("forward.gpu.keep", "forward.gpu.recompute", "backward.gpu.cpu", "recompute.gpu", "update.gpu",
            "update.gpu.fused", "update.cpu", "grad.d2h.grad", "load.h2d.w", "offload.d2h.act", "fetch.h2d.act",
            "writeback.h2d.w", "writeback.d2h.w", "ssd_read.ssd_read.opt", "ssd_write.ssd_write.act",
            "compress.gpu", "decompress.gpu")
    truth = {key: {"embed": 1e-4 * (k + 1), "block": 1e-3 * (k + 1), "head": 5e-4 * (k + 1)}
             for k, key in enumerate(rows)}
    runtime = base.replace(task_overheads=truth)
    handoff = 3e-5                        # charged to every task a worker thread runs
    found = probe_overheads(base, lambda plan: simulate(PROBE_MODEL, PROBE_TRAIN, runtime, plan, iterations=3).trace,
                            handoff)
    for key, row in truth.items():
        extra = 0.0 if key.split(".")[1] == "gpu" else handoff
        assert found[key] == pytest.approx({lk: v + extra for lk, v in row.items()}, rel=1e-6, abs=1e-9), key
    for key, row in found.items():
        if key not in truth:
            assert all(v == pytest.approx(0.0 if key.split(".")[1] == "gpu" else handoff, abs=1e-9)
                       for v in row.values()), key


def test_quick_calibration_measures_every_kind_of_task_the_executor_runs(quick_profile):
    """The executor's own fixed cost of each kind of task, per layer kind; the per-layer task and
    update overheads are folded into that table (0 apart from it)."""
    hw = load_hardware(str(quick_profile))
    for key in ("forward.gpu.keep", "backward.gpu.keep", "forward.gpu.cpu", "forward.gpu.recompute", "recompute.gpu",
                "update.gpu", "update.gpu.fused", "update.cpu", "grad.d2h.grad", "load.h2d.w", "writeback.h2d.w",
                "writeback.d2h.w", "offload.d2h.act", "fetch.h2d.act", "ssd_read.ssd_read.w", "ssd_read.ssd_read.opt",
                "ssd_read.ssd_read.act", "ssd_write.ssd_write.w", "ssd_write.ssd_write.opt", "ssd_write.ssd_write.act",
                "compress.gpu", "decompress.gpu"):
        assert set(hw.task_overheads[key]) == {"embed", "block", "head"}, key
        assert all(0 <= v < 1.0 for v in hw.task_overheads[key].values()), key
    # the device and the CPU optimizer slowing each other down, measured (0 where they do not)
    assert hw.contention.keys() == {"gpu", "cpu", "h2d", "d2h"}
    assert hw.contention["gpu"].keys() == {"cpu"} and hw.contention["cpu"].keys() == {"gpu"}
    assert hw.contention["h2d"] == hw.contention["d2h"] and hw.contention["h2d"].keys() == {"gpu", "cpu"}
    assert all(0 <= x <= 9 for row in hw.contention.values() for x in row.values())
    assert hw.task_overheads["forward.gpu.keep"]["block"] > 0        # Python runs every op of a block
    assert hw.gpu_task_overhead_s == 0 and hw.update_overhead_s == 0


def test_a_fit_leaves_the_per_task_costs_to_the_table_and_refits_the_rest():
    """A simulated run on a profile with a per-task table and a slower peak and CPU optimizer: the
    fit takes each task's fixed cost off before fitting, so it recovers the peak and the optimizer's
    rate and finds no extra intercept, instead of folding the table into the constants."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.workload import TrainSpec, load_model

    m, t = load_model("small-llama"), TrainSpec(batch=4, seq_len=64, dtype="fp32")
    table = {"forward.gpu": {"embed": 2e-4, "block": 2e-3, "head": 6e-4}, "backward.gpu": {"block": 3e-3},
             "update.cpu": {"embed": 4e-4, "block": 2e-3, "head": 5e-4}, "grad.d2h.grad": {"block": 2e-4}}
    base = load_hardware("lsp-4090").replace(gpu_task_overhead_s=0.0, update_overhead_s=0.0, task_overheads=table)
    truth = base.replace(gpu_flops=dict(base.gpu_flops, fp32=base.gpu_flops["fp32"] / 3),
                         cpu_adam_params_per_s=base.cpu_adam_params_per_s / 2)
    plan = make_policy("zero-offload", m, t, base)
    fit = fit_profile(simulate(m, plan.train, truth, plan, iterations=3).trace, base).profile
    assert fit.gpu_flops["fp32"] == pytest.approx(truth.gpu_flops["fp32"], rel=1e-3)
    assert fit.cpu_adam_params_per_s == pytest.approx(truth.cpu_adam_params_per_s, rel=1e-3)
    assert fit.gpu_task_overhead_s == pytest.approx(0.0, abs=1e-7)
    assert fit.task_overheads == table


def test_a_fit_whose_intercept_would_take_everything_keeps_the_overhead_and_fits_the_peak():
    """On a loaded machine a layer's time can vary more with the other work than with its FLOPs:
    the joint fit then puts everything in the intercept (no peak left). The fit keeps the profile's
    overhead instead and still scales the peak to the durations."""
    base = load_hardware(BASE)
    rng = np.random.default_rng(1)
    events, t = [], 0.0
    for k in range(60):
        flops = float(rng.choice([1e9, 4e9]))
        secs = 5e-3 * (1 + rng.uniform(-0.3, 0.3)) - 1e-4 * (flops > 2e9)    # bigger ones a little shorter
        events.append({"source": "measured", "iteration": 0, "task": f"forward{k}", "kind": "forward", "layer": 1,
                       "resource": "gpu", "start_s": t, "end_s": t + secs, "bytes": 0, "flops": flops})
        t += secs
    fit = fit_profile(Trace.from_records(events, meta={"train": {"dtype": "bf16"}}), base)
    rows = {r.constant: r for r in fit.rows}
    assert rows["gpu bf16 peak"].after is not None and fit.profile.gpu_flops["bf16"] < base.gpu_flops["bf16"]
    assert rows["gpu task overhead"].after is None and fit.profile.gpu_task_overhead_s == base.gpu_task_overhead_s


@pytest.mark.parametrize("flags,threads", [((), 1), (("--threads", "2"), 2)])
def test_calibrate_and_execute_on_the_cpu_compute_on_the_same_thread_count(tmp_path, monkeypatch, flags, threads):
    """A profile predicts runs made on the thread count it was measured on: `calibrate` and
    `execute` (as `validate`) take one torch thread on a CPU standing in for the GPU, or --threads."""
    import torch

    import tiertune.traces.calibrate as cal

    seen = []

    def measure(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return load_hardware("lsp-4090"), None
    monkeypatch.setattr(cal, "calibrate", measure)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert main(["calibrate", "--device", "cpu", "-o", str(tmp_path / "p.toml"), *flags]) == 0
        torch.set_num_threads(3)
        assert main(["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--json", *flags]) == 0
        seen.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(prev)
    assert seen == [threads, threads]


def test_a_refit_keeps_only_constants_that_predict_its_own_traces_better():
    """Least squares can move a constant far on rows it does not explain; such a group is refused
    when the traces' own iteration times, simulated with it, come out further from the measured
    ones than without it. Here the traces ran at half the base GPU peak: the group that says so
    is kept, one that says 38x faster is refused, and the profile keeps its constant."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate
    from tiertune.traces.fit import FitRow, _keep_what_predicts_better
    from tiertune.workload import TrainSpec, load_model

    m, t = load_model("gpt3-1.3b"), TrainSpec(batch=8, seq_len=1024)
    base = load_hardware(BASE)
    peak = base.gpu_flops["bf16"]
    truth = base.replace(gpu_flops=dict(base.gpu_flops, bf16=peak / 2))
    traces = [simulate(m, t, truth, make_policy(p, m, t, truth)).trace for p in ("fuyou", "zero-offload")]

    def part(x: float):
        return {"gpu_flops": dict(base.gpu_flops, bf16=x)}, [FitRow("gpu bf16 peak", "TFLOP/s", peak, x, 10)], {}

    changes, rows = _keep_what_predicts_better(traces, base, [part(peak * 38)])
    assert "gpu_flops" not in changes and rows[0].after is None and rows[0].note.startswith("refused")
    changes, rows = _keep_what_predicts_better(traces, base, [part(peak / 2)])
    assert changes["gpu_flops"]["bf16"] == peak / 2 and rows[0].after == peak / 2
