"""Colours, markers and display names shared by every tiertune figure.

One fixed palette keyed by name, so a policy, a task kind, a resource or a memory tier has the
same colour in every plot of a paper or report. Names we do not know get a colour from a
fallback palette chosen by a stable hash (crc32, not Python's salted `hash`), so an unknown
policy keeps its colour across runs and processes.
"""

from __future__ import annotations

import zlib

from tiertune.vocab import RESOURCES, TIERS

# Policies: the planner is the one a reader looks for, so it gets the strongest colour (red) and
# is drawn thicker; `ideal` is a reference, so it is grey and dashed.
POLICY_ORDER = ("ideal", "gpu-only", "checkpoint", "lomo", "zero-offload", "zero-infinity", "fuyou",
                "lsp-offload", "megatrain", "planner")
POLICY_COLORS = {
    "ideal": "#7f7f7f",
    "gpu-only": "#8c564b",
    "checkpoint": "#bcbd22",
    "lomo": "#e377c2",
    "zero-offload": "#1f77b4",
    "zero-infinity": "#17becf",
    "fuyou": "#2ca02c",
    "lsp-offload": "#ff7f0e",
    "megatrain": "#9467bd",
    "planner": "#d62728",
}
POLICY_MARKERS = {
    "ideal": "", "gpu-only": "s", "checkpoint": "D", "lomo": "v", "zero-offload": "^",
    "zero-infinity": "<", "fuyou": "o", "lsp-offload": ">", "megatrain": "P", "planner": "*",
}

# Task kinds, grouped by what they do: compute in saturated blue/orange/red (recompute is extra
# work, so it is red), PCIe copies in greens/cyan/purple, CPU-side work in browns/pinks, SSD
# traffic in olives. Light/dark pairs mark the two directions of the same thing.
KIND_ORDER = ("forward", "backward", "recompute", "load", "fetch", "offload", "grad", "writeback",
              "update", "compress", "decompress", "ssd_read", "ssd_write")
KIND_COLORS = {
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "recompute": "#d62728",
    "load": "#2ca02c",
    "fetch": "#17becf",
    "offload": "#98df8a",
    "grad": "#9467bd",
    "writeback": "#c5b0d5",
    "update": "#8c564b",
    "compress": "#e377c2",
    "decompress": "#f7b6d2",
    "ssd_read": "#bcbd22",
    "ssd_write": "#dbdb8d",
}

RESOURCE_ORDER = RESOURCES
RESOURCE_COLORS = {
    "gpu": "#2f7d32",
    "h2d": "#1f77b4",
    "d2h": "#6baed6",
    "cpu": "#ff7f0e",
    "ssd_read": "#6a3d9a",
    "ssd_write": "#b294c7",
}
RESOURCE_LABELS = {"gpu": "GPU", "h2d": "PCIe H2D", "d2h": "PCIe D2H", "cpu": "CPU",
                   "ssd_read": "SSD read", "ssd_write": "SSD write"}

TIER_ORDER = TIERS
TIER_COLORS = {"gpu": "#2f7d32", "cpu": "#ff7f0e", "ssd": "#6a3d9a"}
TIER_LABELS = {"gpu": "GPU memory", "cpu": "CPU memory", "ssd": "NVMe SSD"}

# Fallback for unknown names: colours none of the fixed palettes above uses, so an unknown name
# is never mistaken for a known one.
# Dark or muted hues away from tab10's reds and browns, so no unknown policy looks like `planner`.
_FALLBACK = ("#393b79", "#637939", "#8c6d31", "#7b4173", "#00827f", "#222222", "#5f6b7a", "#e6ab02")
_FALLBACK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


def _stable_index(name: str, n: int) -> int:
    return zlib.crc32(name.encode("utf-8")) % n


def fallback_color(name: str) -> str:
    return _FALLBACK[_stable_index(name, len(_FALLBACK))]


def policy_color(name: str) -> str:
    return POLICY_COLORS.get(name) or fallback_color(name)


def policy_marker(name: str) -> str:
    return POLICY_MARKERS.get(name, _FALLBACK_MARKERS[_stable_index(name, len(_FALLBACK_MARKERS))])


def kind_color(kind: str) -> str:
    return KIND_COLORS.get(kind) or fallback_color(kind)


def resource_color(resource: str) -> str:
    return RESOURCE_COLORS.get(resource) or fallback_color(resource)


def tier_color(tier: str) -> str:
    return TIER_COLORS.get(tier) or fallback_color(tier)


def resource_label(resource: str) -> str:
    return RESOURCE_LABELS.get(resource, resource)


def ordered(names, order: tuple[str, ...]) -> list[str]:
    """Known names in the canonical order, then unknown ones alphabetically: stable legends."""
    names = {str(n) for n in names}
    return [n for n in order if n in names] + sorted(names - set(order))
