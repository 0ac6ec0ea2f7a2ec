"""Named baseline policies: (model, train, hardware) -> Plan, each following its paper or code.

The planner must beat these; `tiertune compare` runs them all. Registry: `POLICIES`.
"""

from __future__ import annotations

from typing import Callable

from tiertune.errors import InputError
from tiertune.hardware import HardwareProfile
from tiertune.schedule import LayerPlan, Plan, PlanGlobals, uniform_plan
from tiertune.workload import ModelSpec, TrainSpec

UNLIMITED = 1 << 62

PolicyFn = Callable[[ModelSpec, TrainSpec, HardwareProfile], Plan]
POLICIES: dict[str, PolicyFn] = {}


def policy(name: str):
    def deco(fn: PolicyFn) -> PolicyFn:
        POLICIES[name] = fn
        return fn
    return deco


def _uniform(model: ModelSpec, train: TrainSpec, hw: HardwareProfile, layer: LayerPlan, name: str,
             **globals_) -> Plan:
    return uniform_plan(model.name, hw.name, train, model.n_layers + 2, layer, PlanGlobals(**globals_),
                        {"policy": name})


@policy("ideal")
def ideal(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Unlimited GPU memory, everything resident, nothing moved: native speed, the reference."""
    return _uniform(model, train, hw, LayerPlan(), "ideal", gpu_mem_bytes=UNLIMITED)


@policy("gpu-only")
def gpu_only(model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    """Plain PyTorch training on the real GPU: everything resident; does not fit when the model is big."""
    return _uniform(model, train, hw, LayerPlan(), "gpu-only")


def make_policy(name: str, model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> Plan:
    try:
        fn = POLICIES[name]
    except KeyError:
        raise InputError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    return fn(model, train, hw)
