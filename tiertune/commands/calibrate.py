"""`tiertune calibrate`: measure this machine into a hardware profile, or refit a profile from a
measured trace (`--from-trace`). The output TOML works anywhere a preset name does
(`--hardware profile.toml`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tiertune.commands.common import COUNT, GIB, THREADS, THREADS_HELP, set_compute_threads
from tiertune.errors import InputError
from tiertune.fileio import atomic_write_text, check_output
from tiertune.hardware import GB, GiB, HardwareProfile, load_hardware, profile_from_dict


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine (or refit a profile from a trace) into a hardware profile",
                       description=__doc__)
    p.add_argument("-o", "--output", required=True, help="profile .toml to write")
    p.add_argument("--name", default=None, help="profile name (default: local-<device>, or <base>-fit)")
    g = p.add_argument_group("microbenchmarks")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when torch sees a GPU, else cpu")
    g.add_argument("--offload-dir", default=None, help="directory on the SSD to test (default: a temp dir)")
    g.add_argument("--device-mem", type=GIB, default=None, metavar="GiB",
                   help="device memory budget (CPU default: a quarter of host RAM; CUDA default: total memory)")
    g.add_argument("--quick", action="store_true", help="a few seconds, small sizes (for tests)")
    g.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    f = p.add_argument_group("fit to a measured trace")
    f.add_argument("--from-trace", default=None, metavar="TRACE", help="trace (.json/.parquet/.csv) whose task durations to fit")
    f.add_argument("--profile", default=None, help="base profile (.toml or preset); default: the trace's hardware")
    f.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="dtype of the compute events (default: the trace's)")
    f.add_argument("--optimizer", choices=("adamw", "sgd", "adalomo"), default=None, help="default: the trace's")
    f.add_argument("--min-events", type=COUNT, default=3, help="fewest events a group needs to be fitted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.output, "-o")     # before minutes of benchmarks, not after
    if args.from_trace:
        return _fit(args, out)
    if args.profile or args.dtype or args.optimizer:
        raise InputError("--profile, --dtype and --optimizer go with --from-trace")
    set_compute_threads(args.threads, args.device)
    from tiertune.traces.calibrate import calibrate

    t0 = time.perf_counter()
    profile, _ = calibrate(args.device, args.offload_dir, args.quick, args.device_mem, args.name,
                           progress=sys.stderr.isatty() or not args.quick)
    atomic_write_text(out, profile.to_toml())
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    print(describe(profile))
    return 0


def describe(hw: HardwareProfile) -> str:
    """The measured numbers, one line each."""
    tf = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in hw.gpu_flops.items())
    return "\n".join([
        f"  device         {hw.gpu_name}: {hw.gpu_mem_bytes / GiB:.3g} GiB, memory {hw.gpu_mem_bw_bps / GB:.3g} GB/s",
        f"  matmul GFLOP/s {tf}; efficiency by FLOPs {hw.matmul_efficiency.to_list()}",
        f"  layers         backward {hw.backward_factor:.3g} x forward; activations GB/s "
        + (", ".join(f"{a} {r / GB:.3g}" for a, r in hw.activation_bps.items()) or "at memory bandwidth")
        + (f"; LSP sparse products {hw.sparse_flops / 1e9:.3g} GFLOP/s" if hw.sparse_flops else ""),
        f"  copies GB/s    h2d {hw.h2d_bps / GB:.3g}, d2h {hw.d2h_bps / GB:.3g}, pageable x{hw.pageable_factor:.3g}, "
        f"duplex {hw.pcie_duplex}; efficiency by bytes {hw.pcie_efficiency.to_list()}",
        f"  host           {hw.cpu_name}, {hw.cpu_cores} cores, {hw.cpu_mem_bytes / GiB:.3g} GiB; "
        f"AdamW {hw.cpu_adam_params_per_s / 1e9:.3g} Gparams/s, SGD {hw.cpu_sgd_params_per_s / 1e9:.3g} Gparams/s",
        f"  ssd GB/s       read {hw.ssd_read_bps / GB:.3g}, write {hw.ssd_write_bps / GB:.3g}, "
        f"free {hw.ssd_capacity_bytes / GiB:.3g} GiB; efficiency by bytes {hw.ssd_efficiency.to_list()}",
        *(["  per task us    " + "; ".join(f"{k} " + ", ".join(f"{lk} {v * 1e6:.0f}" for lk, v in row.items())
                                          for k, row in sorted(hw.task_overheads.items()))] if hw.task_overheads else []),
        f"  notes          {hw.description}",
    ])


def _base_profile(args: argparse.Namespace, trace) -> HardwareProfile:
    if args.profile:
        return load_hardware(args.profile)
    hw = trace.meta.get("hardware")
    if isinstance(hw, dict) and "gpu" in hw:
        return profile_from_dict(hw, source="trace")
    if isinstance(hw, dict) and isinstance(hw.get("name"), str):
        hw = hw["name"]
    if isinstance(hw, str):
        try:
            return load_hardware(hw)
        except InputError:
            pass
    raise InputError(f"{args.from_trace}: the trace names no loadable hardware profile; pass --profile")


def _fit(args: argparse.Namespace, out: Path) -> int:
    from tiertune.traces.fit import fit_profile
    from tiertune.traces.trace import Trace

    if args.quick or args.device or args.offload_dir or args.device_mem is not None or args.threads:
        raise InputError("--quick, --device, --offload-dir, --device-mem and --threads are for microbenchmarks, "
                         "not --from-trace")
    trace = Trace.load(args.from_trace)
    base = _base_profile(args, trace)
    result = fit_profile(trace, base, dtype=args.dtype, optimizer=args.optimizer, min_events=args.min_events,
                         name=args.name, where=Path(args.from_trace).name)
    atomic_write_text(out, result.profile.to_toml())
    print(result.table())
    print(f"wrote {out} ({result.fitted} constants refit from {base.name})")
    return 0
