"""Contention between resources that share a machine part (HardwareProfile.contention): a task
slows while the resources it contends with are busy, and speeds up again when they finish."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiertune.hardware import load_hardware
from tiertune.planner.policies import make_policy
from tiertune.simulator import engine, simulate
from tiertune.simulator.builder import TaskGraph
from tiertune.vocab import CPU, GPU, H2D
from tiertune.workload import TrainSpec, load_model

BIG = 1 << 60


def graph(tasks: list[tuple[int, float]], contention: list[list[float]] | None) -> TaskGraph:
    """Independent tasks (resource, seconds), all ready at t=0."""
    g = TaskGraph()
    for i, (res, dur) in enumerate(tasks):
        g.add("forward", "", i, 0, res, dur)
    g.finish()
    g.capacity = [BIG, BIG, BIG]
    g.contention = contention
    return g


def matrix(**pairs: float) -> list[list[float]]:
    m = [[0.0] * 6 for _ in range(6)]
    for key, x in pairs.items():
        r, s = key.split("_by_")
        m[{"gpu": GPU, "cpu": CPU, "h2d": H2D}[r]][{"gpu": GPU, "cpu": CPU, "h2d": H2D}[s]] = x
    return m


def test_a_task_runs_at_half_speed_while_its_contender_is_busy_then_at_full_speed():
    # gpu 1 s beside cpu 1 s, gpu slowed 2x by the cpu: half its work by t=1, the rest alone
    run = engine.run(graph([(GPU, 1.0), (CPU, 1.0)], matrix(gpu_by_cpu=1.0)))
    assert run.end == pytest.approx([1.5, 1.0])


def test_factors_of_several_busy_resources_add():
    run = engine.run(graph([(GPU, 1.0), (CPU, 4.0), (H2D, 4.0)], matrix(gpu_by_cpu=0.5, gpu_by_h2d=0.5)))
    assert run.end[0] == pytest.approx(2.0)


def test_mutual_contention_slows_both():
    run = engine.run(graph([(GPU, 1.0), (CPU, 1.0)], matrix(gpu_by_cpu=1.0, cpu_by_gpu=1.0)))
    assert run.end == pytest.approx([2.0, 2.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([GPU, CPU, H2D]), st.floats(0.01, 5.0)), min_size=1, max_size=8),
       st.floats(0.0, 2.0))
def test_contention_never_shortens_and_zero_contention_changes_nothing(tasks, x):
    plain = engine.run(graph(tasks, None))
    zero = engine.run(graph(tasks, matrix()))
    slowed = engine.run(graph(tasks, matrix(gpu_by_cpu=x, cpu_by_gpu=x, gpu_by_h2d=x)))
    assert zero.end == pytest.approx(plain.end)
    assert max(slowed.end) >= max(plain.end) - 1e-9
    # work is conserved: no task ends before its own duration, nor later than fully slowed
    for (res, dur), s, e in zip(tasks, slowed.start, slowed.end):
        assert dur - 1e-9 <= e - s <= dur * (1 + 2 * x) + 1e-9


def test_a_profile_with_contention_predicts_a_slower_overlapped_plan_and_the_same_serial_one():
    # batch 16: the device, not the SSD array, is the bottleneck, so slowing it shows
    m, t = load_model("gpt3-1.3b"), TrainSpec(batch=16, seq_len=1024)
    hw = load_hardware("fuyou-4090-12ssd")
    slow = hw.replace(contention={"gpu": {"cpu": 0.5}, "cpu": {"gpu": 0.5}})
    fuyou = make_policy("fuyou", m, t, hw)          # CPU Adam overlapped with backward
    assert simulate(m, t, slow, fuyou).iteration_s > simulate(m, t, hw, fuyou).iteration_s * 1.01
    ideal = make_policy("ideal", m, t, hw)          # nothing runs on the CPU
    assert simulate(m, t, slow, ideal).iteration_s == pytest.approx(simulate(m, t, hw, ideal).iteration_s)
