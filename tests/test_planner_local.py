"""`--search local`, the plain reference the planner must beat: it never ends slower than where it
started, and where it stops no single move (a prefetch depth, the activation slices, one field on
one block of layers) makes the engine faster."""

from tiertune.hardware import load_hardware
from tiertune.planner.local import _moves, apply, blocks, field_values, local_search, slice_choices
from tiertune.planner.search import lean_start
from tiertune.simulator import simulate
from tiertune.workload import ModelSpec, TrainSpec

HW = load_hardware("lsp-4090")
TRAIN = TrainSpec(batch=2, seq_len=64, dtype="bf16", optimizer="adamw")


def test_blocks_halve_down_to_single_layers():
    got = [list(b) for b in blocks(5)]
    assert got[0] == [0, 1, 2, 3, 4] and got[-5:] == [[0], [1], [2], [3], [4]]
    assert all(len(b) >= 1 for b in got)


def test_local_search_stops_at_a_local_optimum_no_slower_than_its_start():
    model = ModelSpec(name="t", arch="llama", vocab_size=256, hidden=256, n_layers=2, n_heads=4, n_kv_heads=4,
                      ffn_hidden=512, max_seq_len=64)
    hw = HW.replace(gpu_mem_bytes=HW.gpu_reserve_bytes + (24 << 20))
    start = lean_start(model, TRAIN, hw)
    res = local_search(model, TRAIN, hw, start, time_limit_s=120.0)
    start_s = simulate(model, TRAIN, hw, start).iteration_s
    assert res.sim.fits and res.sim.iteration_s <= start_s
    for move in _moves(len(res.plan.layers), field_values(()), slice_choices(TRAIN)):
        cand = apply(res.plan, move, TRAIN)
        if cand is not None:
            sim = simulate(model, TRAIN, hw, cand)
            assert not sim.fits or sim.iteration_s >= res.sim.iteration_s * (1 - 1e-9), move
