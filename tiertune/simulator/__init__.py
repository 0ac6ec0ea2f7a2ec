"""Simulator: cost model, task-graph builder and discrete-event engine.

`simulate(model, train, hw, plan)` -> `SimResult` (fits, steady iteration time, peaks, bottleneck,
and the run as a Trace). Imports nothing from planner/ or executor/ (one-direction data flow).
"""

from tiertune.simulator.run import SimResult, simulate

__all__ = ["simulate", "SimResult"]
