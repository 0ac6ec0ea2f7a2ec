"""`tiertune <verb>`: the command line. Each verb lives in tiertune/commands/<module>.py, which
registers its parser; heavy imports (torch, ortools) happen inside the handlers so `--help`
and `presets` stay fast.

Bad input (`InputError`, unreadable/unwritable files) ends with one line on stderr and exit 2;
Ctrl-C with "tiertune: interrupted" and exit 130, after the clean-up.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from tiertune.errors import InputError

VERB_MODULES = (
    "tiertune.commands.presets",
    "tiertune.commands.simulate",
    "tiertune.commands.plan",
    "tiertune.commands.execute",
    "tiertune.commands.export",
    "tiertune.commands.calibrate",
    "tiertune.commands.traces",
    "tiertune.commands.report",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:          # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiertune", description="Plan, simulate and run LLM fine-tuning across GPU, CPU and NVMe tiers.")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue                                 # a verb not built yet
        module.register(sub)
    return parser


_INTERRUPTED = threading.Event()


def _interrupt_once(signum, frame) -> None:
    """The first Ctrl-C stops the command; later ones are ignored, so that the clean-up it starts
    (temp files removed, worker threads joined, a half-written output deleted) runs to the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _interrupt_once)     # first: the imports below take seconds
    try:
        return _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        cpsat = sys.modules.get("tiertune.planner.cpsat")
        if cpsat is not None and cpsat.STOPPED_BY_CTRL_C.is_set():
            # OR-Tools aborts the process at exit after a solve stopped part-way ("terminate called
            # without an active exception", from its C++ clean-up during interpreter shut-down):
            # our own clean-up has run by now, so leave without the interpreter's.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


def _run(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:                    # --help (0) or a bad flag (2, one line printed)
            return exc.code if isinstance(exc.code, int) else 0
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"tiertune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                           # full disk, unwritable directory, missing file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"tiertune: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiertune: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Ctrl-C inside a C extension's import surfaces as that import's error (OR-Tools:
        # "ImportError: initialization failed"), not as KeyboardInterrupt
        if _INTERRUPTED.is_set():
            print("tiertune: interrupted", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
