"""The cost model: how long each kind of task takes on a given machine, from bytes and FLOPs.

Used by the task-graph builder and by the planner (CP-SAT sizes, lower bounds), so both judge a
schedule with the same numbers. Efficiency tables come from the HardwareProfile (Calculon-style
size-dependent efficiencies; a calibrated profile carries measured ones).
"""

from __future__ import annotations

from tiertune.hardware import HardwareProfile
from tiertune.workload import LayerCost, ModelSpec, TrainSpec, layer_costs

COPY_LATENCY_S = 10e-6        # per-copy launch + sync overhead (cudaMemcpyAsync class)
SSD_LATENCY_S = 100e-6        # per-request-stream NVMe latency
KERNEL_LATENCY_S = 20e-6      # default per-layer launch overhead (HardwareProfile.gpu_task_overhead_s)
# fp32 elements read or written per parameter by one optimizer step as the executor runs it
# (tiertune/executor/updates.py: torch's single-tensor operation order, one kernel per operation).
# AdamW: mul_ 2, lerp_ 3, mul_ 2, addcmul_ 3, sqrt 2, div 2, add_ 2, addcdiv_ 4; SGD: add_ 3.
# AdaLomo (a matrix: factored moment): g*g 2, +eps 2, row and column means 1 + 1, outer product
# 1, times g 3, RMS of the update 1, clip div_ 2, RMS of the weight 1, add_ 3.
UPDATE_PASSES = {"adamw": 20, "sgd": 3, "adalomo": 17}
# LSP's sparse projections on a profile that did not measure them (HardwareProfile.sparse_flops):
# this fraction of the dtype's dense peak.
SPARSE_EFFICIENCY = 0.3


class CostModel:
    """Task durations in seconds for one (model, train, hardware)."""

    def __init__(self, model: ModelSpec, train: TrainSpec, hw: HardwareProfile) -> None:
        self.model, self.train, self.hw = model, train, hw
        self.layers: list[LayerCost] = layer_costs(model, train)
        self._peak = hw.peak_flops(train.dtype)
        tokens = train.batch * train.seq_len
        self._tokens = tokens
        # Per-layer forward time: each matmul at its own size-dependent efficiency, plus the
        # memory-bound rest (norms, activations, attention softmax) at device bandwidth.
        self._fwd_s = [self._forward_s(lc) for lc in self.layers]

    # --- GPU compute ---------------------------------------------------------------------------
    def _matmul_s(self, flops: float) -> float:
        return flops / (self._peak * self.hw.matmul_efficiency.at(flops)) if flops > 0 else 0.0

    def _forward_s(self, lc: LayerCost) -> float:
        if lc.kind == "embed":
            return self.hw.gpu_task_overhead_s + lc.act_bytes / self.hw.gpu_mem_bw_bps + \
                self._tokens * self.model.hidden * self.train.elem_bytes / self.hw.gpu_mem_bw_bps
        return self.hw.gpu_task_overhead_s + self.matmul_part_s(lc) + self.activation_part_s(lc)

    def matmul_part_s(self, lc: LayerCost) -> float:
        """A layer's forward matmuls, each at its own size-dependent efficiency, and the attention
        scores and weighted sum (the FLOPs that are not the weights') at the efficiency of their total."""
        mats = sum(self._matmul_s(2.0 * self._tokens * o * i) for o, i in lc.matrices)
        return mats + self._matmul_s(lc.fwd_flops - sum(2.0 * self._tokens * o * i for o, i in lc.matrices))

    def activation_part_s(self, lc: LayerCost) -> float:
        """The rest of a layer's forward (norms, activation functions, softmax, residual adds): its
        activation bytes at the rate the profile measured for the architecture (activation_bps)."""
        return lc.act_bytes / self.hw.activation_rate(self.model.arch)

    def forward_s(self, layer: int) -> float:
        return self._fwd_s[layer]

    def backward_s(self, layer: int) -> float:
        """Backward = `backward_factor` (2 by FLOPs: input and weight gradients) x forward, the
        task overhead apart; embedding backward is a scatter-add, as long as its forward."""
        lc = self.layers[layer]
        if lc.kind == "embed":
            return self._fwd_s[layer]
        o = self.hw.gpu_task_overhead_s
        return self.hw.backward_factor * (self._fwd_s[layer] - o) + o

    def recompute_s(self, layer: int) -> float:
        return self._fwd_s[layer]

    def gpu_update_s(self, layer: int) -> float:
        """Optimizer step on the GPU: memory-bound. Each elementwise operation of the update streams
        its fp32 operands (UPDATE_PASSES per parameter); a compute dtype other than fp32 adds reading
        the gradient and writing the weights back from the master copy. Its fixed cost is the
        device's per-task overhead (kernel launches), not the CPU optimizer's."""
        return self.hw.gpu_task_overhead_s + self.gpu_update_bytes(layer) / self.hw.gpu_mem_bw_bps

    def gpu_update_bytes(self, layer: int) -> float:
        """Device memory bytes one optimizer step over `layer` reads and writes."""
        lc = self.layers[layer]
        touched = 4 * UPDATE_PASSES.get(self.train.optimizer, UPDATE_PASSES["adamw"]) * lc.params
        if self.train.master_bytes:
            touched += lc.grad_bytes + lc.weight_bytes
        return touched

    def host_grad_bytes(self, layer: int, rank: int | None) -> int:
        """Bytes of layer's gradient that cross PCIe to a host optimizer and wait there for it: the
        d x d projections at grad_rank d (compute dtype), else the full gradient (fp32 under
        DeepSpeed's accounting, TrainSpec.fp32_host_grads)."""
        if rank:
            return self.compressed_params(layer, rank) * self.train.elem_bytes
        return self.layers[layer].params * self.train.host_grad_bytes

    def task_overhead_s(self, kind: str, resource: str, layer: int, what: str = "") -> float:
        """The profile's measured fixed cost of one `kind` task on `resource` for `layer` (0 where it
        has none: HardwareProfile.task_overheads): the row "<kind>.<resource>.<what>" where the
        profile has one (what a copy moves: w, act, opt, grad; the activation mode of a forward or
        backward; "fused": an update run in the gradient hooks), else "<kind>.<resource>"."""
        table = self.hw.task_overheads
        row = table.get(f"{kind}.{resource}.{what}") if what else None
        row = row if row is not None else table.get(f"{kind}.{resource}")
        return row.get(self.layers[layer].kind, 0.0) if row else 0.0

    # --- copies ------------------------------------------------------------------------------
    def h2d_s(self, nbytes: float, pinned: bool = True) -> float:
        if nbytes <= 0:
            return 0.0
        bw = self.hw.h2d_bps * self.hw.pcie_efficiency.at(nbytes) * (1.0 if pinned else self.hw.pageable_factor)
        return COPY_LATENCY_S + nbytes / bw

    def d2h_s(self, nbytes: float, pinned: bool = True) -> float:
        if nbytes <= 0:
            return 0.0
        bw = self.hw.d2h_bps * self.hw.pcie_efficiency.at(nbytes) * (1.0 if pinned else self.hw.pageable_factor)
        return COPY_LATENCY_S + nbytes / bw

    def ssd_read_s(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        per_dev = nbytes / self.hw.ssd_count
        return SSD_LATENCY_S + nbytes / (self.hw.ssd_read_total_bps * self.hw.ssd_efficiency.at(per_dev))

    def ssd_write_s(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        per_dev = nbytes / self.hw.ssd_count
        return SSD_LATENCY_S + nbytes / (self.hw.ssd_write_total_bps * self.hw.ssd_efficiency.at(per_dev))

    # --- CPU optimizer ---------------------------------------------------------------------------
    def cpu_update_s(self, params: float) -> float:
        """CPU optimizer over `params` parameters (DeepSpeed CPUAdam class throughput)."""
        if params <= 0:
            return 0.0
        rate = self.hw.cpu_sgd_params_per_s if self.train.optimizer == "sgd" else self.hw.cpu_adam_params_per_s
        return self.hw.update_overhead_s + params / rate

    def cpu_apply_s(self, params: float) -> float:
        """A CPU pass adding a dense update into `params` weights (one streaming read-modify-write,
        SGD-class throughput): how host-resident weights absorb an LSP update P U Q^T."""
        return params / self.hw.cpu_sgd_params_per_s if params > 0 else 0.0

    # --- LSP compression ----------------------------------------------------------------------------
    def compressed_params(self, layer: int, rank: int) -> int:
        """Elements that cross PCIe (and that CPU Adam updates) per layer at rank d: min(d, m) x min(d, n)
        per m x n matrix, as the executor sends them (a side whose dimension d reaches is the identity,
        executor/compress.py), plus the vectors (norms, biases), which go uncompressed."""
        lc = self.layers[layer]
        mats = sum(min(rank, o) * min(rank, i) for o, i in lc.matrices)
        return mats + (lc.params - sum(o * i for o, i in lc.matrices))

    def optim_state_bytes(self, layer: int, rank: int | None, beside_weights: bool = True) -> int:
        """Optimizer state of a layer on its optimizer tier. Lossless: fp32 master + moments; fp32
        weights are their own master only `beside_weights` (the optimizer on the weights' tier, host
        memory or the device): with the weights on the device and the optimizer on the host
        (ZeRO-Offload), or both on the SSD (the CPU update streams them through host memory, Fuyou),
        the optimizer holds and moves its own fp32 copy. At grad_rank d (LSP-Offload): only the
        moments, in the subspace, so scaled by compressed/full parameters; there is no fp32 master
        anywhere, since LSP adds P U Q^T to the compute-dtype weights on the GPU (a 7B model's fp32
        master would not fit beside its bf16 weights on LSP's 24 GB card, and a host master would
        need the full-size update to come back)."""
        lc = self.layers[layer]
        if rank is None:
            own_master = self.train.dtype == "fp32" and not beside_weights
            return lc.optim_bytes + (4 * lc.params if own_master else 0)
        master = self.train.master_bytes * lc.params
        return (lc.optim_bytes - master) * self.compressed_params(layer, rank) // max(lc.params, 1)

    def compress_flops(self, layer: int, rank: int, nnz_per_row: int) -> float:
        """FLOPs of P^T G Q over a layer's matrices with (d, r)-sparse P, Q: 2*m*n*r + 2*m*d*r each."""
        return sum(2.0 * o * i * nnz_per_row + 2.0 * o * rank * nnz_per_row for o, i in self.layers[layer].matrices)

    def compress_s(self, layer: int, rank: int, nnz_per_row: int) -> float:
        """GPU time to form P^T G Q with (d, r)-sparse P, Q: reads G once, compress_flops at the
        profile's sparse-product rate."""
        lc = self.layers[layer]
        read = sum(o * i for o, i in lc.matrices) * self.train.elem_bytes
        rate = self.hw.sparse_flops or self._peak * SPARSE_EFFICIENCY
        return KERNEL_LATENCY_S + max(self.compress_flops(layer, rank, nnz_per_row) / rate,
                                      read / self.hw.gpu_mem_bw_bps)

    def decompress_s(self, layer: int, rank: int, nnz_per_row: int) -> float:
        """GPU time to add P U Q^T to the weights in place: the same work as compressing."""
        return self.compress_s(layer, rank, nnz_per_row)
