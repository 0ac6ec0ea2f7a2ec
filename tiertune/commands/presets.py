"""`tiertune presets`: the model and hardware presets with their key numbers."""

from __future__ import annotations

import argparse

from tiertune.commands.common import print_json
from tiertune.hardware import GiB, hardware_presets, load_hardware
from tiertune.workload import MODEL_PRESETS


def register(sub) -> None:
    p = sub.add_parser("presets", help="list model and hardware presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    models = [{"name": m.name, "arch": m.arch, "params_b": round(m.total_params() / 1e9, 3), "layers": m.n_layers,
               "hidden": m.hidden, "heads": m.n_heads, "ffn": m.ffn_hidden, "vocab": m.vocab_size}
              for m in MODEL_PRESETS.values()]
    hws = [load_hardware(n).summary() for n in hardware_presets()]
    if args.json:
        print_json({"models": models, "hardware": hws})
        return 0
    print("Models")
    print(f"  {'name':<14}{'arch':<7}{'params':>10}{'layers':>8}{'hidden':>8}{'heads':>7}{'ffn':>8}{'vocab':>8}")
    for m in models:
        print(f"  {m['name']:<14}{m['arch']:<7}{m['params_b']:>9.3f}B{m['layers']:>8}{m['hidden']:>8}"
              f"{m['heads']:>7}{m['ffn']:>8}{m['vocab']:>8}")
    print("\nHardware")
    print(f"  {'name':<18}{'gpu':<28}{'GiB':>5}{'bf16 TF':>9}{'PCIe GB/s':>11}{'host GiB':>10}"
          f"{'Adam Gp/s':>10}{'SSDs':>6}{'SSD r/w GB/s':>14}")
    for h in hws:
        print(f"  {h['name']:<18}{h['gpu']:<28}{h['gpu_mem_gib']:>5.0f}{h['bf16_tflops']:>9.1f}"
              f"{h['h2d_gbps']:>11.1f}{h['cpu_mem_gib']:>10.0f}{h['cpu_adam_gparams_s']:>10.2f}{h['ssds']:>6}"
              f"{h['ssd_read_gbps']:>8.1f}/{h['ssd_write_gbps']:<5.1f}")
    return 0
