"""The executor: a real torch run of a Plan (layer by layer, state on the tiers the plan names),
recording a measured Trace. `Executor` in runtime.py (set-up and the step loop), with the tier
stores in tiers.py, saved activations in activations.py, update strategies in strategies.py;
built-in models in models.py; the SSD tier, data, checkpoints and HF weights in ssd.py, data.py,
checkpoint.py, hf.py.

Imports are lazy so `import tiertune.executor` stays cheap (torch loads on first use).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "Executor":
        from tiertune.executor.runtime import Executor
        return Executor
    if name == "build_model":
        from tiertune.executor.models import build_model
        return build_model
    raise AttributeError(name)
