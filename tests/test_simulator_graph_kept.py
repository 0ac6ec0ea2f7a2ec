"""A simulated graph kept in its result (SimResult.graph) gives back the successors it ran with.

After its run the graph holds its edges in a compact form and drops the list per task (so that a
`simulate` leaves no thousands of lists for the garbage collector to walk); `succ` makes them
again when read, and lists handed out for editing stay the graph's edges."""

from tiertune.hardware import load_hardware
from tiertune.schedule import LayerPlan, PlanGlobals, uniform_plan
from tiertune.simulator import builder, simulate
from tiertune.simulator.run import cost_model
from tiertune.workload import TrainSpec, load_model


def inputs(iterations: int):
    model, hw, train = load_model("gpt3-1.3b"), load_hardware("fuyou-4090-12ssd"), TrainSpec(batch=2, seq_len=512)
    ssd = LayerPlan(params="ssd", optimizer="ssd", update="overlap", activations="cpu")
    plan = uniform_plan(model.name, hw.name, train, model.n_layers + 2, ssd, PlanGlobals(iterations=iterations))
    return model, train, hw, plan


def test_a_packed_graph_reads_back_the_successors_the_builder_made_for_any_number_of_iterations():
    for k in (1, 2, 3):
        model, train, hw, plan = inputs(k)
        g = builder.build(model, train, hw, plan, k, cost_model(model, train, hw))
        made = [list(s) for s in g.successor_lists()]
        g.pack()
        assert g.successor_lists() == made
        assert sum(map(len, made)) == sum(g.npred) and len(made) == len(g)


def test_a_simulated_graph_keeps_its_edges_and_edits_to_them_survive_a_rerun():
    model, train, hw, plan = inputs(3)
    g = simulate(model, train, hw, plan).graph
    preds = [0] * len(g)
    for vs in g.succ:
        for v in vs:
            preds[v] += 1
    assert preds == g.npred
    g.succ[0].append(len(g) - 1)          # an edge added by hand (replay chains a resource's tasks so)
    g.npred[-1] += 1
    g.pack()                              # the lists are the graph now: packing keeps them
    assert g.successor_lists()[0][-1] == len(g) - 1
