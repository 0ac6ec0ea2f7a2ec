"""The words every part of tiertune shares: memory tiers, resources and the links they form.

One table, imported by the plan vocabulary, the hardware profile, the simulator, the planner, the
executor, traces and plots; nothing else spells these lists out. It imports nothing, so any
module may import it without pulling in anything else.
"""

# Memory tiers, fastest first. Lists indexed by tier (the engine's allocations, peaks and
# capacities) use this order.
TIERS = ("gpu", "cpu", "ssd")
GPU_TIER, CPU_TIER, SSD_TIER = range(len(TIERS))

# Resources that each run one task at a time: the GPU's compute stream, the two PCIe copy
# directions, the CPU (optimizer and decompression work) and the SSDs' two directions. Lists
# indexed by resource (task graphs, busy time) use this order.
RESOURCES = ("gpu", "h2d", "d2h", "cpu", "ssd_read", "ssd_write")
GPU, H2D, D2H, CPU, SSD_READ, SSD_WRITE = range(len(RESOURCES))

# A link's two directions; a half-duplex link (HardwareProfile.<link>_duplex false) runs one
# transfer at a time across both.
LINKS = {"pcie": ("h2d", "d2h"), "ssd": ("ssd_read", "ssd_write")}

# What an executor runs on worker threads beside the compute stream.
COPY_ENGINES = RESOURCES[1:]
