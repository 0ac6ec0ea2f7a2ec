"""Hardware profiles: what a machine can do, as the cost model needs it.

A `HardwareProfile` is loaded from a TOML preset (tiertune/presets/hardware/*.toml,
every number citing its public source) or from a profile `tiertune calibrate` wrote.
Units inside the program are SI: bytes, bytes/s, FLOP/s, seconds.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tiertune.errors import InputError
from tiertune.vocab import RESOURCES

# A CUDA context with cuBLAS/cuDNN handles and the caching allocator's slack: ~300-500 MiB in
# nvidia-smi before the first tensor on current drivers (the low end); the profiles' default
# reserve. Everyone else reads HardwareProfile.gpu_reserve_bytes (a CPU standing in has none).
CUDA_CONTEXT_BYTES = 300 << 20

PRESET_DIR = Path(__file__).parent / "presets" / "hardware"
GiB = 1 << 30
GB = 1e9
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Curve:
    """Size-dependent efficiency as a step table: at sizes >= points[i][0], efficiency points[i][1].

    Calculon's form (transfer efficiency by size, matmul efficiency by size); a calibrated
    profile carries measured tables in the same shape.
    """

    points: tuple[tuple[float, float], ...] = ((0.0, 1.0),)

    def __post_init__(self) -> None:
        if not self.points:
            raise InputError("efficiency table is empty")
        sizes = [p[0] for p in self.points]
        if sizes != sorted(sizes):
            raise InputError(f"efficiency table sizes must ascend: {sizes}")
        for size, eff in self.points:
            if size < 0 or not (0.0 < eff <= 1.5):
                raise InputError(f"efficiency entry ({size}, {eff}) out of range")

    def at(self, size: float) -> float:
        i = bisect.bisect_right([p[0] for p in self.points], size) - 1
        return self.points[max(i, 0)][1]

    def to_list(self) -> list[list[float]]:
        return [[float(s), float(e)] for s, e in self.points]


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    gpu_name: str
    gpu_mem_bytes: int
    gpu_mem_bw_bps: float               # device memory bandwidth (GPU optimizer step is bound by it)
    gpu_flops: dict[str, float]         # peak dense FLOP/s per dtype
    matmul_efficiency: Curve            # by FLOPs of one matmul-sized task
    h2d_bps: float                      # pinned host -> device
    d2h_bps: float                      # pinned device -> host
    pcie_duplex: bool                   # False: h2d and d2h share one link
    pageable_factor: float              # pageable / pinned copy speed
    pcie_efficiency: Curve              # by bytes of one copy
    cpu_name: str
    cpu_cores: int
    cpu_mem_bytes: int
    cpu_adam_params_per_s: float        # fused CPU AdamW (DeepSpeed CPUAdam class)
    cpu_sgd_params_per_s: float
    cpu_workers: int                    # optimizer tasks that can run at once
    ssd_count: int
    ssd_read_bps: float                 # per device
    ssd_write_bps: float                # per device
    ssd_capacity_bytes: int             # per device
    ssd_duplex: bool
    ssd_efficiency: Curve               # by bytes of one request stream
    # Device bytes taken before the first tensor: a CUDA context with cuBLAS handles and allocator
    # slack (~300-500 MiB in nvidia-smi on current drivers; the low end), none for a CPU standing in.
    gpu_reserve_bytes: int = CUDA_CONTEXT_BYTES
    # Fixed cost of one layer's compute task (forward, recompute, backward): launching its few
    # dozen kernels on a GPU (~20 us); on a CPU standing in, torch's per-op dispatch and the
    # module calls (~0.1-0.3 ms). Calibrated by timing a tiny layer; refit from traces.
    gpu_task_overhead_s: float = 20e-6
    # A layer's backward time over its forward time (overhead apart): 2 by FLOPs (input and weight
    # gradients); measured nearer 1.8 on a CPU. Refit from traces.
    backward_factor: float = 2.0
    # Bytes of a layer's activations per second that its operations other than the matmuls (norms,
    # activation functions, rotary embedding, the attention kernel beyond its matmul FLOPs, residual
    # adds) get through, per architecture (ModelSpec.arch), as the runtime runs them. An arch not
    # listed streams its activations once at gpu_mem_bw_bps (presets: no public per-layer
    # measurement). Measured by `tiertune calibrate` on the runtime's own blocks: on a CPU standing in
    # for the GPU those operations move a small-llama block's activations at ~1.5 GB/s, not the
    # ~18 GB/s of a streaming add, and a fresh profile predicted every forward ~20% short.
    activation_bps: dict[str, float] = field(default_factory=dict)
    # FLOP/s of LSP-Offload's sparse projections (a CSR matrix times a dense one) in the compute
    # dtype; 0: SPARSE_EFFICIENCY of the dtype's peak (presets: no public measurement). Measured by
    # `tiertune calibrate` with the executor's own compressor.
    sparse_flops: float = 0.0
    # Fixed cost of one layer's optimizer update: the executor updates parameter by parameter, a
    # handful of elementwise ops each. 0 for presets (fused multi-tensor optimizers); calibrated.
    update_overhead_s: float = 0.0
    # contention[r][s]: a task on resource r runs at 1 / (1 + contention[r][s]) of its speed while
    # resource s is busy (the factors of several busy resources add in the denominator). Where resources share a machine
    # part: a CPU standing in for the GPU shares cores and DRAM bandwidth with the copy and
    # optimizer threads. Empty for GPU presets (no public measurement to cite); fitted from traces.
    contention: dict[str, dict[str, float]] = field(default_factory=dict)
    # Fixed cost of one task of the runtime, beyond what the size-dependent terms above charge:
    # task_overheads["<kind>.<resource>[.<what>]"][layer kind] seconds, kinds and resources as the
    # trace names tasks, <what> what a copy moves (w, act, opt, grad), the layer's activation mode
    # for forward and backward, or "fused" for updates run in LOMO's gradient hooks; a row without
    # <what> serves where no qualified row is given. Layer kinds as workload.LayerCost.kind. What a framework spends per task around the arithmetic and the bytes:
    # issuing work from Python, hand-offs to copy and optimizer threads, saved-tensor and gradient
    # hooks, a file system call per SSD request. Empty for presets (no public per-task measurement;
    # gpu_task_overhead_s stands for kernel launches); measured by `tiertune calibrate`, which then
    # folds the per-layer task and update overheads above into this table.
    task_overheads: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "preset"              # preset | calibrated | file path
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def ssd_read_total_bps(self) -> float:
        return self.ssd_read_bps * self.ssd_count

    @property
    def ssd_write_total_bps(self) -> float:
        return self.ssd_write_bps * self.ssd_count

    @property
    def ssd_capacity_total_bytes(self) -> int:
        return self.ssd_capacity_bytes * self.ssd_count

    def capacity(self, tier: str) -> int:
        return {"gpu": self.gpu_mem_bytes, "cpu": self.cpu_mem_bytes,
                "ssd": self.ssd_capacity_total_bytes}[tier]

    def activation_rate(self, arch: str) -> float:
        """activation_bps for a model architecture, memory bandwidth where none was measured."""
        return self.activation_bps.get(arch, self.gpu_mem_bw_bps)

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.gpu_flops[dtype]
        except KeyError:
            raise InputError(f"hardware {self.name!r} has no peak FLOP/s for dtype {dtype!r}") from None

    def replace(self, **changes) -> "HardwareProfile":
        return dataclasses.replace(self, **changes)

    def with_gpu_mem(self, gib: float | None) -> "HardwareProfile":
        if gib is None:
            return self
        if gib <= 0:
            raise InputError(f"--gpu-mem must be positive, got {gib}")
        return self.replace(gpu_mem_bytes=int(gib * GiB), name=f"{self.name}@{gib:g}GiB")

    def summary(self) -> dict:
        return {
            "name": self.name, "gpu": self.gpu_name, "gpu_mem_gib": self.gpu_mem_bytes / GiB,
            "bf16_tflops": self.gpu_flops.get("bf16", 0) / 1e12,
            "h2d_gbps": self.h2d_bps / GB, "d2h_gbps": self.d2h_bps / GB,
            "cpu_mem_gib": self.cpu_mem_bytes / GiB,
            "cpu_adam_gparams_s": self.cpu_adam_params_per_s / 1e9,
            "ssds": self.ssd_count, "ssd_read_gbps": self.ssd_read_total_bps / GB,
            "ssd_write_gbps": self.ssd_write_total_bps / GB,
        }

    # --- TOML io -------------------------------------------------------------------------
    def to_toml(self) -> str:
        def curve(c: Curve) -> str:
            return "[" + ", ".join(f"[{s:g}, {e:.4g}]" for s, e in c.points) + "]"

        flops = ", ".join(f"{k} = {v / 1e12:.6g}" for k, v in self.gpu_flops.items())
        lines = [
            f"name = {json.dumps(self.name)}",
            f"description = {json.dumps(self.description)}",
            "", "[gpu]",
            f"name = {json.dumps(self.gpu_name)}",
            f"memory_gib = {self.gpu_mem_bytes / GiB:.6g}",
            f"memory_bw_gbps = {self.gpu_mem_bw_bps / GB:.6g}",
            f"reserve_mib = {self.gpu_reserve_bytes / (1 << 20):.6g}",
            f"task_overhead_us = {self.gpu_task_overhead_s * 1e6:.6g}",
            f"backward_factor = {self.backward_factor:.6g}",
            *([f"activation_gbps = {{ " + ", ".join(f"{k} = {v / GB:.6g}" for k, v in self.activation_bps.items()) + " }"]
              if self.activation_bps else []),
            *([f"sparse_tflops = {self.sparse_flops / 1e12:.6g}"] if self.sparse_flops else []),
            f"tflops = {{ {flops} }}",
            f"matmul_efficiency = {curve(self.matmul_efficiency)}",
            "", "[pcie]",
            f"h2d_gbps = {self.h2d_bps / GB:.6g}",
            f"d2h_gbps = {self.d2h_bps / GB:.6g}",
            f"duplex = {str(self.pcie_duplex).lower()}",
            f"pageable_factor = {self.pageable_factor:.4g}",
            f"efficiency = {curve(self.pcie_efficiency)}",
            "", "[cpu]",
            f"name = {json.dumps(self.cpu_name)}",
            f"cores = {self.cpu_cores}",
            f"memory_gib = {self.cpu_mem_bytes / GiB:.6g}",
            f"adam_gparams_per_s = {self.cpu_adam_params_per_s / 1e9:.6g}",
            f"sgd_gparams_per_s = {self.cpu_sgd_params_per_s / 1e9:.6g}",
            f"workers = {self.cpu_workers}",
            f"update_overhead_us = {self.update_overhead_s * 1e6:.6g}",
            "", "[ssd]",
            f"count = {self.ssd_count}",
            f"read_gbps = {self.ssd_read_bps / GB:.6g}",
            f"write_gbps = {self.ssd_write_bps / GB:.6g}",
            f"capacity_tb = {self.ssd_capacity_bytes / 1e12:.6g}",
            f"duplex = {str(self.ssd_duplex).lower()}",
            f"efficiency = {curve(self.ssd_efficiency)}",
        ]
        if self.contention:
            lines += ["", "[contention]   # a task on the left runs at 1 / (1 + x) of its speed while the named resource is busy"]
            lines += [f"{r} = {{ " + ", ".join(f"{s} = {x:.4g}" for s, x in row.items()) + " }"
                      for r, row in self.contention.items() if row]
        if self.task_overheads:
            lines += ["", "[task_overheads_us]   # fixed cost of one task, by kind.resource and layer kind"]
            lines += [f"{json.dumps(k)} = {{ " + ", ".join(f"{lk} = {v * 1e6:.6g}" for lk, v in row.items()) + " }"
                      for k, row in self.task_overheads.items() if row]
        return "\n".join(lines) + "\n"


def _curve(table, where: str) -> Curve:
    try:
        return Curve(tuple((float(s), float(e)) for s, e in table))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: efficiency table must be [[size, efficiency], ...] ({exc})") from None


def _contention(table) -> dict[str, dict[str, float]]:
    if not isinstance(table, dict):
        raise InputError("hardware profile: [contention] must be a table like gpu = { cpu = 0.3 }")
    out: dict[str, dict[str, float]] = {}
    for r, row in table.items():
        if r not in RESOURCES or not isinstance(row, dict):
            raise InputError(f"hardware profile: contention.{r}: expected one of {', '.join(RESOURCES)} "
                             f"with a table of resource = factor")
        for s, x in row.items():
            if s not in RESOURCES or s == r or not isinstance(x, (int, float)) or x < 0:
                raise InputError(f"hardware profile: contention.{r}.{s} = {x!r}: need another resource "
                                 f"({', '.join(RESOURCES)}) and a factor >= 0")
        out[r] = {s: float(x) for s, x in row.items()}
    return out


def _activation_rates(table) -> dict[str, float]:
    """gpu.activation_gbps of a profile TOML ({ arch = GB/s }), in bytes/s."""
    if not isinstance(table, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                              for v in table.values()):
        raise InputError(f"hardware profile: gpu.activation_gbps = {table!r}: expected a table like "
                         f"{{ llama = 1.5 }} of positive GB/s per model architecture")
    return {str(k): float(v) * GB for k, v in table.items()}


def _task_overheads(table) -> dict[str, dict[str, float]]:
    """[task_overheads_us] of a profile TOML, in seconds."""
    if not isinstance(table, dict):
        raise InputError('hardware profile: [task_overheads_us] must be a table like "forward.gpu" = { block = 120 }')
    out: dict[str, dict[str, float]] = {}
    for key, row in table.items():
        parts = str(key).split(".")
        if len(parts) not in (2, 3) or parts[1] not in RESOURCES or not isinstance(row, dict):
            raise InputError(f"hardware profile: task_overheads_us.{key}: expected <kind>.<resource>[.<what>] "
                             f"(resource one of {', '.join(RESOURCES)}) with a table of layer kind = microseconds")
        for lk, us in row.items():
            if not isinstance(us, (int, float)) or isinstance(us, bool) or us < 0:
                raise InputError(f"hardware profile: task_overheads_us.{key}.{lk} = {us!r} is not a number >= 0")
        out[str(key)] = {str(lk): float(us) * 1e-6 for lk, us in row.items()}
    return out


def profile_from_dict(d: dict, source: str = "preset") -> HardwareProfile:
    """Build a profile from the TOML layout; names the missing or bad field."""

    def get(section: str, key: str, kind=float, default=None):
        sec = d.get(section, {}) if section else d
        if key not in sec:
            if default is not None:
                return default
            raise InputError(f"hardware profile {d.get('name', '?')!r}: missing {section + '.' if section else ''}{key}")
        value = sec[key]
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise InputError(f"hardware profile: {section}.{key} = {value!r} is not a {kind.__name__}") from None
        if kind in (int, float) and value < 0:
            raise InputError(f"hardware profile: {section}.{key} must not be negative, got {value}")
        return value

    tflops = d.get("gpu", {}).get("tflops")
    if not isinstance(tflops, dict) or not tflops:
        raise InputError("hardware profile: gpu.tflops must be a table like { bf16 = 165.2 }")
    for k, v in tflops.items():
        if k not in DTYPES or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"hardware profile: gpu.tflops.{k} = {v!r} is not a positive number for a known dtype {DTYPES}")
    default_pcie = [[0, 0.3], [1e6, 0.7], [1e7, 0.9], [1e8, 0.95]]
    prof = HardwareProfile(
        name=get("", "name", str),
        description=get("", "description", str, ""),
        gpu_name=get("gpu", "name", str),
        gpu_mem_bytes=int(get("gpu", "memory_gib") * GiB),
        gpu_mem_bw_bps=get("gpu", "memory_bw_gbps") * GB,
        gpu_flops={k: float(v) * 1e12 for k, v in tflops.items()},
        matmul_efficiency=_curve(d["gpu"].get("matmul_efficiency", [[0, 0.7]]), "gpu.matmul_efficiency"),
        gpu_reserve_bytes=int(get("gpu", "reserve_mib", float, CUDA_CONTEXT_BYTES / (1 << 20)) * (1 << 20)),
        gpu_task_overhead_s=get("gpu", "task_overhead_us", float, 20.0) * 1e-6,
        backward_factor=get("gpu", "backward_factor", float, 2.0),
        activation_bps=_activation_rates(d.get("gpu", {}).get("activation_gbps", {})),
        sparse_flops=get("gpu", "sparse_tflops", float, 0.0) * 1e12,
        update_overhead_s=get("cpu", "update_overhead_us", float, 0.0) * 1e-6,
        h2d_bps=get("pcie", "h2d_gbps") * GB,
        d2h_bps=get("pcie", "d2h_gbps") * GB,
        pcie_duplex=bool(d.get("pcie", {}).get("duplex", True)),
        pageable_factor=get("pcie", "pageable_factor", float, 0.5),
        pcie_efficiency=_curve(d.get("pcie", {}).get("efficiency", default_pcie), "pcie.efficiency"),
        cpu_name=get("cpu", "name", str),
        cpu_cores=get("cpu", "cores", int),
        cpu_mem_bytes=int(get("cpu", "memory_gib") * GiB),
        cpu_adam_params_per_s=get("cpu", "adam_gparams_per_s") * 1e9,
        cpu_sgd_params_per_s=get("cpu", "sgd_gparams_per_s") * 1e9,
        cpu_workers=max(1, get("cpu", "workers", int, 1)),
        ssd_count=get("ssd", "count", int),
        ssd_read_bps=get("ssd", "read_gbps") * GB,
        ssd_write_bps=get("ssd", "write_gbps") * GB,
        ssd_capacity_bytes=int(get("ssd", "capacity_tb") * 1e12),
        ssd_duplex=bool(d.get("ssd", {}).get("duplex", False)),
        ssd_efficiency=_curve(d.get("ssd", {}).get("efficiency", [[0, 0.5], [1 << 20, 0.9]]), "ssd.efficiency"),
        contention=_contention(d.get("contention", {})),
        task_overheads=_task_overheads(d.get("task_overheads_us", {})),
        source=source,
    )
    for attr in ("gpu_mem_bytes", "gpu_mem_bw_bps", "h2d_bps", "d2h_bps", "cpu_mem_bytes",
                 "cpu_adam_params_per_s", "cpu_sgd_params_per_s"):
        if getattr(prof, attr) <= 0:
            raise InputError(f"hardware profile {prof.name!r}: {attr} must be positive")
    return prof


def hardware_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_hardware(name_or_path: str) -> HardwareProfile:
    """A preset name (see `tiertune presets`) or a path to a profile TOML."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise InputError(f"hardware profile file not found: {name_or_path}")
        source = str(path)
    else:
        path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise InputError(f"unknown hardware preset {name_or_path!r}; known: {', '.join(hardware_presets())}")
        source = "preset"
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"malformed hardware profile {path.name}: {exc}") from None
    return profile_from_dict(data, source=source)
