"""Mechanics the seeds' systems rely on, each checked against a hand computation: LOMO's missing fp32
master, a chunked cross-entropy, DeepSpeed's fp32 host gradients and CPU activation checkpoints,
LSP-Offload's (d, r) chosen per run, Fuyou's half-block checkpoints, activations moved in slices, and
a host optimizer step run on the training thread (DeepSpeed's engine.step, LSP-Offload's hooks)."""

import pytest

from tiertune.errors import InputError
from tiertune.hardware import load_hardware
from tiertune.planner.estimate import footprint
from tiertune.planner.policies import DEEPSPEED_HOST_BUFFER_FACTOR, PolicyInfeasible, make_policy
from tiertune.schedule import LayerPlan, PlanGlobals, uniform_plan
from tiertune.simulator import simulate
from tiertune.simulator.builder import build
from tiertune.simulator.costs import CostModel
from tiertune.workload import LOSS_CHUNK_TOKENS, TrainSpec, layer_costs, load_model

GiB = 1 << 30


def test_training_without_master_weights_keeps_no_fp32_copy():
    m = load_model("llama2-7b")
    sgd = TrainSpec(optimizer="sgd", master_weights=False)
    assert all(c.optim_bytes == 0 for c in layer_costs(m, sgd))
    adam = TrainSpec(optimizer="adamw", master_weights=False)
    assert all(c.optim_bytes == 8 * c.params for c in layer_costs(m, adam))       # m and v only
    with_master = TrainSpec(optimizer="adamw")
    assert all(c.optim_bytes == 12 * c.params for c in layer_costs(m, with_master))


def test_lomo_trains_llama2_7b_on_a_24gb_3090():
    # LOMO's README: LLaMA-7B full-parameter fine-tuning on one RTX 3090. bf16 weights 13.5 GB,
    # AdaLomo's factored moment a few MB, no master: fits; with a 4 B/param master it could not.
    m, hw = load_model("llama2-7b"), load_hardware("lomo-3090")
    train = TrainSpec(batch=1, seq_len=512, optimizer="sgd")
    plan = make_policy("lomo", m, train, hw)
    assert plan.train.master_weights is False
    assert simulate(m, plan.train, hw, plan).fits
    with_master = plan.replace(train=plan.train.replace(master_weights=True))
    assert not simulate(m, with_master.train, hw, with_master).fits


def test_a_chunked_loss_keeps_one_chunk_of_logits():
    m = load_model("gpt3-13b")
    t = TrainSpec(batch=64, seq_len=1024, dtype="fp16")
    s, b, h, v, e = 1024, 64, m.hidden, m.vocab_size, 2
    full = layer_costs(m, t)[-1].act_bytes
    chunked = layer_costs(m, t.replace(chunked_loss=True))[-1].act_bytes
    assert full == 2 * e * s * b * h + (e + 4) * s * b * v                     # 26.0 GB of logits alone
    assert chunked == 2 * e * s * b * h + (e + 4) * LOSS_CHUNK_TOKENS * v + 4 * s * b
    assert chunked < 2 * GiB < full


def test_deepspeed_offload_keeps_fp32_gradients_on_the_host():
    # DeepSpeed ZeRO-Offload: fp32 master + m + v (12) and fp32 gradient partitions (4) = 16 B/param
    # on the host; each gradient crosses PCIe as fp32.
    m, hw = load_model("gpt3-1.3b"), load_hardware("lsp-4090")
    train = TrainSpec(batch=1, seq_len=1024)
    plan = make_policy("zero-offload", m, train, hw)
    cm = CostModel(m, plan.train, hw)
    assert footprint(cm, plan)["cpu"] == 16 * m.total_params()
    ev = simulate(m, plan.train, hw, plan, iterations=1).trace.events
    grads = ev[ev.kind == "grad"]
    assert grads.bytes.sum() == 4 * m.total_params()


def test_zero_infinity_cannot_hold_175b_fp32_gradients_in_768gb():
    # DeepSpeed's host accounting for GPT-3 175B: 4 B/param of fp32 gradients alone is 698 GB; with
    # its 1.5x pinned-buffer margin no placement fits Fuyou's 768 GB server (Fuyou: ZeRO-Infinity
    # fails to fine-tune 175B on the RTX 4090 box).
    m, hw = load_model("gpt3-175b"), load_hardware("fuyou-4090-12ssd")
    assert 4 * m.total_params() * DEEPSPEED_HOST_BUFFER_FACTOR > hw.cpu_mem_bytes
    with pytest.raises(PolicyInfeasible):
        make_policy("zero-infinity", m, TrainSpec(batch=8, seq_len=1024, chunked_loss=True), hw)


def test_cpu_checkpointing_moves_each_layer_input_through_host_memory():
    m, hw = load_model("gpt3-1.3b"), load_hardware("a100-80g")
    train = TrainSpec(batch=2, seq_len=1024)
    layer = LayerPlan(activations="recompute")
    on_gpu = uniform_plan(m.name, hw.name, train, m.n_layers + 2, layer, PlanGlobals(iterations=1))
    on_host = on_gpu.replace(globals=PlanGlobals(iterations=1, cpu_checkpointing=True))
    ckpt = [min(c.act_checkpoint_bytes, c.act_bytes) for c in layer_costs(m, train)]
    r_gpu, r_host = simulate(m, train, hw, on_gpu), simulate(m, train, hw, on_host)
    ev = r_host.trace.events
    assert ev[ev.task.str.startswith("offload.ckpt:")].bytes.sum() == sum(ckpt)
    assert ev[ev.task.str.startswith("fetch.ckpt:")].bytes.sum() == sum(ckpt)
    # every checkpoint but the one being recomputed has left the device at the backward's start
    assert r_gpu.peak_bytes["gpu"] - r_host.peak_bytes["gpu"] >= sum(ckpt) - 2 * max(ckpt)
    cm = CostModel(m, train, hw)
    assert footprint(cm, on_host)["cpu"] - footprint(cm, on_gpu)["cpu"] == sum(c.act_checkpoint_bytes for c in cm.layers)


def test_lsp_projection_size_and_sparsity_are_chosen_per_run():
    m, hw = load_model("llama2-7b"), load_hardware("lsp-4090")
    train = TrainSpec(batch=4, seq_len=1024)
    plan = make_policy("lsp-offload", m, train, hw, d=512, r=16)
    assert {lp.grad_rank for lp in plan.layers} == {512} and plan.globals.lsp_nnz_per_row == 16
    default = make_policy("lsp-offload", m, train, hw)
    assert {lp.grad_rank for lp in default.layers} == {2048} and default.globals.lsp_nnz_per_row == 8
    with pytest.raises(InputError, match="takes no option"):
        make_policy("fuyou", m, train, hw, d=512)
    with pytest.raises(InputError, match="d must be a positive integer"):
        make_policy("lsp-offload", m, train, hw, d=-1)


@pytest.mark.parametrize("change", [
    dict(train=TrainSpec(batch=1, seq_len=16, dtype="fp32", chunked_loss=True)),
    dict(train=TrainSpec(batch=1, seq_len=16, dtype="bf16", master_weights=False)),
    dict(train=TrainSpec(batch=1, seq_len=16, dtype="fp32", checkpoint_halves=True)),
    dict(globals=PlanGlobals(host_update_inline=True)),
])
def test_settings_the_executor_does_not_run_are_refused_before_it_starts(change):
    from tiertune.executor.run import train_plan

    m = load_model("tiny-llama")
    plan = uniform_plan(m.name, "local-cpu", TrainSpec(batch=1, seq_len=16, dtype="fp32"), m.n_layers + 2,
                        LayerPlan()).replace(**change)
    with pytest.raises(InputError, match="simulate-only"):
        train_plan(m, plan, steps=1, progress=False)


def test_checkpointing_each_half_of_a_block_keeps_two_inputs_and_recomputes_one_half_at_a_time():
    # Fuyou (LoHan's gpt_model.py) checkpoints a block's attention and MLP halves separately.
    # GPT at 16-bit with flash attention, in units of s*b*h bytes (Korthikanti et al. eq. 1):
    # attention half 2 (LayerNorm input) + 11, plus the fp32 log-sum-exp 4*a*s*b; MLP half 2 + 19.
    m = load_model("gpt3-13b")
    t = TrainSpec(batch=4, seq_len=1024, dtype="fp16")
    s, b, h, a = 1024, 4, m.hidden, m.n_heads
    sbh = s * b * h
    whole = layer_costs(m, t)[1]
    halves = layer_costs(m, t.replace(checkpoint_halves=True))[1]
    assert whole.act_bytes == halves.act_bytes == 34 * sbh + 4 * a * s * b
    assert whole.act_checkpoint_bytes == 2 * sbh and whole.act_recompute_bytes == whole.act_bytes
    assert halves.act_checkpoint_bytes == 4 * sbh                 # block input + mid-block residual
    assert halves.act_recompute_bytes == 2 * sbh + 21 * sbh       # the MLP half while the block input waits
    # the task graph allocates that much for a recompute: the half, beyond the checkpoint already there
    hw = load_hardware("fuyou-4090-12ssd")
    train = t.replace(checkpoint_halves=True)
    plan = uniform_plan(m.name, hw.name, train, m.n_layers + 2, LayerPlan(activations="recompute"),
                        PlanGlobals(iterations=1, gpu_mem_bytes=1 << 50))
    g = build(m, train, hw, plan, iterations=1)
    recompute = [t_ for t_ in range(len(g)) if g.kind[t_] == "recompute" and g.layer[t_] == 1]
    assert [g.alloc[0][t_] for t_ in recompute] == [23 * sbh - 4 * sbh]


def test_fuyou_trains_gpt3_175b_at_batch_16_and_not_32_on_its_4090():
    # Fuyou Fig. 7b (seq 1024, LoHan's main.py): 175B trains at batch 16 on the 24 GB RTX 4090 and
    # runs out of memory at 32, with its half-block checkpoints in host memory. At batch 32 the
    # gradient hook's copy and fp64 norm chunk (3.2 GB beside the backward) are what no longer
    # fit: without them batch 32 would (22.0 GiB).
    m, hw = load_model("gpt3-175b"), load_hardware("fuyou-4090-12ssd")
    train = TrainSpec(batch=16, seq_len=1024, dtype="fp16", chunked_loss=True)
    plan = make_policy("fuyou", m, train, hw)
    assert plan.train.checkpoint_halves and plan.globals.cpu_checkpointing and plan.train.grad_copy_fp64_norm
    assert simulate(m, plan.train, hw, plan, iterations=1).fits
    b32 = make_policy("fuyou", m, train.replace(batch=32), hw)
    assert not simulate(m, b32.train, hw, b32, iterations=1).fits
    no_hook = b32.replace(train=b32.train.replace(grad_copy_fp64_norm=False))
    assert simulate(m, no_hook.train, hw, no_hook, iterations=1).fits


def test_lohans_gradient_hook_holds_a_copy_and_an_fp64_norm_chunk_beside_the_backward():
    # RC4ML/LoHan ratel_optimizer.py partition_grads: each gradient is copied (grad_buffer) and its
    # norm taken as part.double() over chunks of 250M elements. GPT-3 175B's largest matrix is the
    # MLP's 12288 x 49152 = 603,979,776 elements: a 1.21 GB fp16 copy and a 2 GB fp64 chunk.
    # GPT-3 13B's (5120 x 20480 = 104,857,600) fits one chunk: 2 + 8 bytes per element.
    from tiertune.simulator.recipe import workspace_bytes

    hw = load_hardware("fuyou-4090-12ssd")
    for name, n in (("gpt3-175b", 12288 * 49152), ("gpt3-13b", 5120 * 20480)):
        m = load_model(name)
        t = TrainSpec(batch=16, seq_len=1024, dtype="fp16")
        plain = workspace_bytes(CostModel(m, t, hw))
        hooked = workspace_bytes(CostModel(m, t.replace(grad_copy_fp64_norm=True), hw))
        assert hooked - plain == 2 * n + 8 * min(n, 250_000_000)
    assert 2 * 12288 * 49152 + 8 * 250_000_000 == 3_207_959_552
    assert 2 * 5120 * 20480 + 8 * 5120 * 20480 == 1_048_576_000


def test_activation_slices_let_a_layer_whose_activations_do_not_fit_run_slice_by_slice():
    # Three blocks whose saved activations (8.4 MB each) go to host memory, on a device budget that
    # holds the resident state plus half of one block's activations: whole, no block fits; in 4
    # slices each slice (2.1 MB) leaves while the next is computed and the device never holds more
    # than the head needs (its kept logits 2.6 MB, its 1 MiB backward workspace, the embedding's 8 KiB).
    from tiertune.schedule import Plan
    from tiertune.simulator.recipe import plan_recipes
    from tiertune.workload import ModelSpec

    model = ModelSpec(name="t", arch="llama", vocab_size=256, hidden=256, n_layers=3, n_heads=4, n_kv_heads=4,
                      ffn_hidden=512, max_seq_len=256)
    train = TrainSpec(batch=4, seq_len=256)
    hw = load_hardware("lsp-4090")
    lp = LayerPlan(activations="cpu")
    whole = Plan("t", hw.name, train, [LayerPlan()] + [lp] * 3 + [LayerPlan()])
    rec = plan_recipes(CostModel(model, train, hw), whole)
    home = hw.gpu_reserve_bytes + sum(r.home[0] for r in rec)
    act = rec[1].act_bytes
    assert act == 8_404_992
    budget = home + act // 2
    assert not simulate(model, train, hw, whole.replace(globals=PlanGlobals(gpu_mem_bytes=budget))).fits
    sliced = whole.replace(globals=PlanGlobals(gpu_mem_bytes=budget, activation_slices=4))
    r = simulate(model, train, hw, sliced)
    assert r.fits
    assert r.peak_bytes["gpu"] - home == 2_621_440 + (1 << 20) + 8192
    # each block runs 4 forwards and 4 backwards, and sends and fetches its activations in quarters
    g = r.graph
    for i in (1, 2, 3):
        mine = [t for t in range(len(g)) if g.layer[t] == i and g.iteration[t] == 0]
        assert sum(g.kind[t] == "forward" for t in mine) == 4 and sum(g.kind[t] == "backward" for t in mine) == 4
        assert [g.nbytes[t] for t in mine if g.kind[t] in ("offload", "fetch")] == [act // 4] * 8
    # the embedding and the head run whole
    assert sum(g.kind[t] == "forward" and g.layer[t] == 4 and g.iteration[t] == 0 for t in range(len(g))) == 1


@pytest.mark.parametrize("preset", ["fuyou-4090-12ssd", "fuyou-4090-1ssd", "fuyou-4090-256g", "lsp-4090"])
def test_rtx_4090_presets_run_large_matmuls_at_the_measured_rate(preset):
    # Public torch.matmul fp16 runs on an RTX 4090 (cited in the presets): n = 8192 at 155.5 and
    # 158.6 TFLOPS, n = 2048 at 159.4 and 167.1, against the 165.2 spec peak. A GPT-3 13B block at
    # batch 8 x 1024 tokens: the four h x h projections (2 * 8192 * 5120^2 = 4.3e11 FLOPs) run at
    # 0.96 of the peak, the two MLP matrices (1.7e12 FLOPs) at the lowest large-size run, 0.94.
    hw = load_hardware(preset)
    assert hw.peak_flops("fp16") * hw.matmul_efficiency.at(2 * 8192 ** 3) == pytest.approx(155.3e12, rel=1e-3)
    assert hw.peak_flops("fp16") * hw.matmul_efficiency.at(2 * 2048 ** 3) == pytest.approx(158.6e12, rel=1e-3)
    m = load_model("gpt3-13b")
    cm = CostModel(m, TrainSpec(batch=8, seq_len=1024, dtype="fp16"), hw)
    tokens, h, f = 8192, 5120, 20480
    by_hand = 4 * 2 * tokens * h * h / (165.2e12 * 0.96) + 2 * 2 * tokens * h * f / (165.2e12 * 0.94)
    assert sum(cm._matmul_s(2.0 * tokens * o * i) for o, i in cm.layers[1].matrices) == pytest.approx(by_hand)


def _inline_plan(update: str, inline: bool, batch: int):
    m, hw = load_model("tiny-llama"), load_hardware("lsp-4090")       # no contention, no per-task overheads
    train = TrainSpec(batch=batch, seq_len=512 if batch > 2 else 128)
    plan = uniform_plan(m.name, hw.name, train, m.n_layers + 2,
                        LayerPlan(params="gpu", optimizer="cpu", update=update),
                        PlanGlobals(host_update_inline=inline))
    from tiertune.simulator.recipe import plan_recipes

    rec = plan_recipes(CostModel(m, train, hw), plan)
    return m, hw, train, plan, (lambda i, step: rec[i].steps[step].duration), len(rec)


def test_an_inline_host_update_in_backward_holds_the_next_layers_backward():
    # LSP-Offload's para_offload_modules.py runs each module's CPU Adam in the hooks the training
    # thread calls between modules: layer i's backward, its gradient's copy out and its update run
    # one after another before layer i-1's backward; the copies home overlap the next backward, and
    # the next step's first forward waits for the embedding's weights:
    # T = sum forward + sum (backward + grad + update) + writeback of the embedding.
    m, hw, train, plan, d, n = _inline_plan("overlap", True, batch=2)
    hand = (sum(d(i, "forward") for i in range(n))
            + sum(d(i, "backward") + d(i, "grad") + d(i, "update") for i in range(n)) + d(0, "writeback"))
    assert simulate(m, train, hw, plan).iteration_s == pytest.approx(hand, rel=1e-9)
    free = plan.replace(globals=PlanGlobals())
    assert simulate(m, train, hw, free).iteration_s < 0.8 * hand       # without it the updates overlap


def test_an_inline_host_step_after_backward_is_a_barrier_before_the_next_forward():
    # DeepSpeed's engine.step() between backward and forward: every layer's update and copy home
    # ends before the next step's first forward. Here each gradient copy (<= 30.5 us) is shorter
    # than the next backward (>= 136.8 us) except the embedding's after the first block's, each
    # copy home longer than the next update, so the step is: forwards, backwards down to the first
    # block, its gradient's copy, the embedding's copy and update, then the copies home one after
    # another.
    m, hw, train, plan, d, n = _inline_plan("after", True, batch=16)
    assert all(d(i, "grad") < d(i - 1, "backward") for i in range(2, n))
    assert all(d(i, "writeback") >= d(i + 1, "update") for i in range(n - 1))
    hand = (sum(d(i, "forward") for i in range(n)) + sum(d(i, "backward") for i in range(1, n))
            + d(1, "grad") + d(0, "grad") + d(0, "update") + sum(d(i, "writeback") for i in range(n)))
    res = simulate(m, train, hw, plan)
    assert res.iteration_s == pytest.approx(hand, rel=1e-9)
    ev = res.trace.events
    first_fwd = ev[(ev.iteration == 2) & (ev.kind == "forward")].start_s.min()
    assert first_fwd >= ev[(ev.iteration == 1) & (ev.kind == "writeback")].end_s.max()
    assert simulate(m, train, hw, plan.replace(globals=PlanGlobals())).iteration_s < res.iteration_s


def test_an_inline_host_step_swaps_ssd_state_one_layer_at_a_time():
    # DeepSpeed's PartitionedOptimizerSwapper without pipeline_read/pipeline_write: each sub-group's
    # state is read, stepped and written back before the next is read, and engine.step() returns
    # (the next forward starts) only after the last write. On one SSD the step is the forwards,
    # the backwards, then read + update + write for every layer.
    m, hw = load_model("tiny-llama"), load_hardware("fuyou-4090-1ssd")
    train = TrainSpec(batch=2, seq_len=128)
    plan = uniform_plan(m.name, hw.name, train, m.n_layers + 2,
                        LayerPlan(params="gpu", optimizer="ssd", update="after"), PlanGlobals(host_update_inline=True))
    from tiertune.simulator.recipe import plan_recipes

    rec = plan_recipes(CostModel(m, train, hw), plan)
    hand = sum(r.steps["forward"].duration + r.steps["backward"].duration + r.steps["opt_ssd_read"].duration
               + r.steps["update"].duration + r.steps["opt_ssd_write"].duration for r in rec)
    res = simulate(m, train, hw, plan)
    assert res.iteration_s == pytest.approx(hand, rel=1e-9)
    ev = res.trace.events
    one = ev[ev.iteration == 1]
    reads = one[one.task.str.startswith("ssd_read.opt")].sort_values("start_s")
    writes = one[one.task.str.startswith("ssd_write.opt")].sort_values("start_s")
    assert (reads.start_s.to_numpy()[1:] >= writes.end_s.to_numpy()[:-1]).all()
    assert ev[(ev.iteration == 2) & (ev.kind == "forward")].start_s.min() >= writes.end_s.max()
    assert simulate(m, train, hw, plan.replace(globals=PlanGlobals())).iteration_s < res.iteration_s


def test_policies_run_the_host_step_inline_only_when_asked():
    m, hw = load_model("gpt3-1.3b"), load_hardware("lsp-4090")
    train = TrainSpec(batch=2, seq_len=512)
    for name in ("zero-offload", "zero-infinity", "lsp-offload"):
        assert not make_policy(name, m, train, hw).globals.host_update_inline
        assert make_policy(name, m, train, hw, host_update_inline=True).globals.host_update_inline
        with pytest.raises(InputError, match="host_update_inline must be true or false"):
            make_policy(name, m, train, hw, host_update_inline="yes")
    with pytest.raises(InputError, match="takes no option"):
        make_policy("fuyou", m, train, hw, host_update_inline=True)
    with pytest.raises(InputError, match="global.host_update_inline must be true or false"):
        PlanGlobals(host_update_inline=1)
