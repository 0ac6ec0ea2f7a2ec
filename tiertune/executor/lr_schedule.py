"""Learning-rate schedules: linear warm-up from 0, then constant, linear or cosine decay to 0.

The factors of transformers' get_{constant,linear,cosine}_schedule_with_warmup, so a run matches
a plain transformers loop step for step. No torch here: the CLI lists the schedules without
loading it.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, warmup_steps: int, total_steps: int | None, step_no: int) -> float:
    """The lr multiplier of optimizer step `step_no` (1-based): the factor transformers' scheduler
    gives after s = step_no - 1 scheduler steps (so a warm-up's first step has lr 0, as there).
    `total_steps`: where linear and cosine reach 0 (constant needs none)."""
    s = step_no - 1
    if s < warmup_steps:
        return s / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    if not total_steps:
        raise ValueError(f"a {schedule} lr schedule needs the total number of steps")
    progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
