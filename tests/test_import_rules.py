"""Data flows one way (README, "Layout"): each rule names a part of tiertune and what it may not
import. Imports are read from the source with ast, lazy ones inside functions included, so a
rule cannot be dodged by importing late. The shared words (tiers, resources) are spelt out in
tiertune/vocab.py only."""

import ast
from pathlib import Path

from tiertune.vocab import RESOURCES, TIERS

ROOT = Path(__file__).resolve().parents[1] / "tiertune"
OURS = ("vocab", "errors", "fileio", "limits", "workload", "hardware", "schedule", "simulator", "planner",
        "executor", "traces", "analysis", "commands", "cli")

# part -> parts it may not import ("simulator" covers tiertune/simulator/*; "traces.trace" one module)
FORBIDDEN = {
    "vocab": set(OURS) - {"vocab"},
    "errors": set(OURS) - {"errors"},
    "fileio": set(OURS) - {"errors", "fileio"},
    "limits": set(OURS) - {"vocab", "errors", "limits"},
    "workload": set(OURS) - {"vocab", "errors", "fileio", "limits", "workload"},
    "hardware": set(OURS) - {"vocab", "errors", "fileio", "limits", "hardware"},
    "schedule": set(OURS) - {"vocab", "errors", "fileio", "limits", "workload", "schedule"},
    "simulator": {"planner", "executor", "traces.replay", "traces.fit", "traces.calibrate", "traces.validate",
                  "analysis", "commands", "cli"},
    "planner": {"executor", "traces", "analysis", "commands", "cli"},
    "executor": {"planner", "simulator", "analysis", "commands", "cli"},
    "traces": {"planner", "analysis", "commands", "cli"},
    "analysis": {"commands", "cli"},
    "commands": {"cli"},
}


def ours_imported(path: Path) -> set[str]:
    """Dotted names (without `tiertune.`) of our modules a file imports anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out |= {n.removeprefix("tiertune.") for n in names if n.startswith("tiertune.")}
    return out


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def breaks(imported: str, forbidden: set[str]) -> bool:
    return any(imported == f or imported.startswith(f + ".") for f in forbidden)


def test_every_module_imports_only_in_the_allowed_direction():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        forbidden = FORBIDDEN.get(part_of(path), set())
        wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(ours_imported(path)) if breaks(m, forbidden)]
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from tiertune.planner.search import plan_schedule\n")
    assert breaks("planner.search", FORBIDDEN["simulator"]) and "planner.search" in ours_imported(bad)
    assert not breaks("traces.trace", FORBIDDEN["simulator"])


def test_the_tier_and_resource_lists_are_spelt_out_in_vocab_only():
    spelt = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "vocab.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                if tuple(e.value for e in node.elts) in (TIERS, RESOURCES):
                    spelt.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not spelt, spelt
