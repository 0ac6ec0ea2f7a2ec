"""`tiertune sweep`: the cartesian product of models x hardware x GPU budgets x policies (+ planner),
one row a simulated configuration, written to parquet; resumable and parallel (a local process
pool, or a Ray cluster with `--ray auto|ADDRESS`).

Spec (TOML):
    models = ["gpt3-13b", "llama2-7b"]          # presets or config dirs
    hardware = ["fuyou-4090-12ssd"]              # presets or profile .toml files
    gpu_mem_gib = [8, 16, 24]                    # budgets; omit for each machine's own
    policies = ["ideal", "zero-offload", "fuyou", "planner"]
    planner_time_limit_s = 5                     # optional
    [train]                                      # optional TrainSpec fields
    batch = 1
    seq_len = 2048
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from tiertune.errors import InputError
from tiertune.fileio import atomic_write
from tiertune.limits import MAX_COUNT, MAX_GIB, MAX_ITERATIONS, MAX_SECONDS

SPEC_KEYS = {"models", "hardware", "gpu_mem_gib", "policies", "planner_time_limit_s", "train", "iterations"}
KEY_COLUMNS = ["model", "hardware", "gpu_mem_gib", "policy"]
RESULT_COLUMNS = KEY_COLUMNS + ["fits", "iteration_s", "tokens_per_s", "tflops", "peak_gpu", "peak_cpu",
                                "peak_ssd", "bottleneck", "error", "spec_hash"]



@dataclass(frozen=True)
class SweepSpec:
    models: tuple[str, ...]
    hardware: tuple[str, ...]
    gpu_mem_gib: tuple[float | None, ...]
    policies: tuple[str, ...]
    train: dict
    planner_time_limit_s: float = 5.0
    iterations: int = 3

    def rows(self) -> list[tuple]:
        return list(itertools.product(self.models, self.hardware, self.gpu_mem_gib, self.policies))

    def row_hash(self) -> str:
        """What a row's result depends on besides its key: a row computed under another value
        (another iteration count, time limit or training setting) is computed again."""
        settings = {"train": self.train, "planner_time_limit_s": self.planner_time_limit_s,
                    "iterations": self.iterations}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; every unknown key or preset is named."""
    from tiertune.hardware import load_hardware
    from tiertune.planner.policies import POLICIES
    from tiertune.workload import TrainSpec, load_model

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sweep spec not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed sweep spec {path.name}: {exc}") from None
    unknown = set(d) - SPEC_KEYS
    if unknown:
        raise InputError(f"sweep spec: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for key in ("models", "hardware", "policies"):
        if not isinstance(d.get(key), list) or not d[key] or not all(isinstance(x, str) for x in d[key]):
            raise InputError(f"sweep spec: {key} must be a non-empty list of names")
    for m in d["models"]:
        load_model(m)
    for h in d["hardware"]:
        load_hardware(h)
    for p in d["policies"]:
        if p != "planner" and p not in POLICIES:
            raise InputError(f"sweep spec: unknown policy {p!r}; known: {', '.join([*POLICIES, 'planner'])}")
    budgets = d.get("gpu_mem_gib", [None])
    if not isinstance(budgets, list) or not budgets or not all(_number(b) and 0 < b <= MAX_GIB for b in budgets
                                                               if b is not None):
        raise InputError(f"sweep spec: gpu_mem_gib must be a non-empty list of numbers in (0, {MAX_GIB:g}], "
                         f"got {budgets!r}")
    limit = d.get("planner_time_limit_s", 5.0)
    if not _number(limit) or not 0 < limit <= MAX_SECONDS:
        raise InputError(f"sweep spec: planner_time_limit_s must be a number of seconds in (0, {MAX_SECONDS:g}], "
                         f"got {limit!r}")
    iterations = d.get("iterations", 3)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or not 1 <= iterations <= MAX_ITERATIONS:
        raise InputError(f"sweep spec: iterations must be an integer in [1, {MAX_ITERATIONS}], got {iterations!r}")
    train = d.get("train", {})
    for key in ("batch", "seq_len", "grad_accum"):
        v = train.get(key) if isinstance(train, dict) else None
        if isinstance(v, int) and v > MAX_COUNT:
            raise InputError(f"sweep spec: train.{key} must be at most {MAX_COUNT}, got {v}")
    TrainSpec.from_dict(train)                     # validates the fields now, not in a worker
    return SweepSpec(models=tuple(d["models"]), hardware=tuple(d["hardware"]),
                     gpu_mem_gib=tuple(float(b) if b is not None else None for b in budgets),
                     policies=tuple(d["policies"]), train=dict(train),
                     planner_time_limit_s=float(limit), iterations=iterations)


def run_row(model_name: str, hw_name: str, gpu_mem_gib: float | None, policy: str, train: dict,
            planner_time_limit_s: float, iterations: int, spec_hash: str = "") -> dict:
    """One sweep row from names (what crosses a process or Ray boundary)."""
    from tiertune.hardware import load_hardware
    from tiertune.workload import TrainSpec, load_model

    model = load_model(model_name)
    hw = load_hardware(hw_name).with_gpu_mem(gpu_mem_gib)
    spec = TrainSpec.from_dict({"batch": 1, "seq_len": min(2048, model.max_seq_len), **train})
    row = {"model": model_name, "hardware": hw_name, "gpu_mem_gib": gpu_mem_gib, "policy": policy}
    return {**row, **evaluate(model, spec, hw, policy, planner_time_limit_s, iterations), "spec_hash": spec_hash}


def evaluate(model, train, hw, policy: str, planner_time_limit_s: float = 5.0, iterations: int = 3) -> dict:
    """Simulate one policy (or the planner) on one machine; a plan that cannot fit gives fits=False
    and the reason instead of an error."""
    from tiertune.planner.policies import make_policy
    from tiertune.simulator import simulate

    try:
        if policy == "planner":
            from tiertune.planner.search import plan_schedule
            plan = plan_schedule(model, train, hw, time_limit_s=planner_time_limit_s).plan
        else:
            plan = make_policy(policy, model, train, hw)
        res = simulate(model, plan.train, hw, plan, iterations=iterations)
    except InputError as exc:
        return {"fits": False, "iteration_s": float("nan"), "tokens_per_s": 0.0, "tflops": 0.0,
                "peak_gpu": 0, "peak_cpu": 0, "peak_ssd": 0, "bottleneck": "", "error": str(exc)}
    return {"fits": bool(res.fits), "iteration_s": float(res.iteration_s) if res.fits else float("nan"),
            "tokens_per_s": float(res.tokens_per_s) if res.fits else 0.0,
            "tflops": float(res.tflops) if res.fits else 0.0,
            "peak_gpu": int(res.peak_bytes.get("gpu", 0)), "peak_cpu": int(res.peak_bytes.get("cpu", 0)),
            "peak_ssd": int(res.peak_bytes.get("ssd", 0)), "bottleneck": res.bottleneck or "",
            "error": res.error or ""}


def _key(row) -> tuple:
    gib = row["gpu_mem_gib"]
    return (row["model"], row["hardware"], None if gib is None or pd.isna(gib) else float(gib), row["policy"])


def _save(rows: list[dict], out: Path) -> None:
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS).sort_values(KEY_COLUMNS, na_position="first", kind="stable")
    with atomic_write(out, "wb") as f:
        df.reset_index(drop=True).to_parquet(f, index=False)


def run_sweep(spec: SweepSpec, out: str | Path, ray_address: str | None = None, workers: int | None = None,
              progress: Callable[[Iterable], Iterable] | None = None) -> pd.DataFrame:
    """Run every row not already in `out` under this spec's settings (`row_hash`), and save after
    each one, so an interrupted sweep resumes; a row computed under other settings is replaced."""
    out = Path(out)
    done: list[dict] = []
    if out.exists():
        try:
            done = pd.read_parquet(out).to_dict("records")
        except Exception as exc:      # pyarrow raises several unrelated types for a damaged file
            raise InputError(f"existing results {out} are unreadable ({exc}); move it away to start over") from None
    digest = spec.row_hash()
    have = {_key(r) for r in done if r.get("spec_hash") == digest}
    todo = [r for r in spec.rows() if _key(dict(zip(KEY_COLUMNS, r))) not in have]
    args = [(m, h, g, p, spec.train, spec.planner_time_limit_s, spec.iterations, digest) for m, h, g, p in todo]
    results = _run_ray(args, ray_address) if ray_address else _run_pool(args, workers)
    if progress is not None:
        results = progress(results, total=len(args))
    for row in results:
        done = [r for r in done if _key(r) != _key(row)] + [row]
        _save(done, out)
    if not args:
        _save(done, out)
    return pd.read_parquet(out)


def _run_pool(args: list[tuple], workers: int | None):
    if not args:
        return
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = [pool.submit(run_row, *a) for a in args]
        for fut in as_completed(futures):
            yield fut.result()


def _run_ray(args: list[tuple], address: str):
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'tiertune[ray]'") from None
    if not args:
        return
    started_here = not ray.is_initialized()
    if started_here:
        opts = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        if address == "local":
            ray.init(**opts)
        elif address == "auto":
            try:
                ray.init(address="auto", **opts)
            except ConnectionError:          # no cluster running: a local one on this machine
                ray.init(**opts)
        else:
            ray.init(address=address, **opts)
    try:
        remote = ray.remote(run_row)
        pending = [remote.remote(*a) for a in args]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started_here:
            ray.shutdown()
