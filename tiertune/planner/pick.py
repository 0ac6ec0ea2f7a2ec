"""A named policy's plan for a run: the training settings a run uses when a policy, not a plan
file, says what to do, and the profile the policy is made for when none is given."""

from __future__ import annotations

from tiertune.hardware import HardwareProfile
from tiertune.planner.policies import make_policy
from tiertune.schedule import Plan
from tiertune.workload import ModelSpec, TrainSpec

# The profile a named policy is made for when none is given: a 24 GB consumer card, the kind
# these policies were written for.
DEFAULT_HARDWARE = "lsp-4090"


def policy_plan(spec: ModelSpec, hw: HardwareProfile, policy: str, batch: int | None = None,
                seq: int | None = None, dtype: str | None = None) -> Plan:
    """The named policy made for `hw` (batch 4, seq 64, fp32, AdamW unless given)."""
    train = TrainSpec(batch=batch or 4, seq_len=seq or 64, dtype=dtype or "fp32", optimizer="adamw")
    return make_policy(policy, spec, train, hw)
