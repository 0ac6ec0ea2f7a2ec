"""Ctrl-C anywhere: one line "interrupted", exit 130, temp files removed, earlier outputs intact,
also after OR-Tools has run a solve (it used to leave SIGINT at its default: the process died
silently by the signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _started(pid: int) -> bool:
    """The command is past start-up: numpy/torch/OR-Tools (imported by the handlers, after the CLI
    installed its Ctrl-C handler) have started their threads."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return True


def interrupt(argv: list[str], after_s: float, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "tiertune.cli", *argv], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while not _started(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("verb, after_s", [("plan", 3.0), ("plan", 10.0), ("compare", 8.0)])
def test_ctrl_c_in_the_planner_is_one_line_and_exit_130(tmp_path, verb, after_s):
    out = tmp_path / ("plan.json" if verb == "plan" else "cmp.csv")
    out.write_text("previous\n")
    flag = "-o" if verb == "plan" else "--csv"
    r = interrupt([verb, "--model", "gpt3-13b", "--hardware", "fuyou-4090-12ssd", "--time-limit", "120",
                   flag, str(out)], after_s, tmp_path)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == ["tiertune: interrupted"]
    assert out.read_text() == "previous\n" and sorted(os.listdir(tmp_path)) == [out.name]


def test_ctrl_c_while_training_removes_the_temp_offload_dir_and_keeps_the_checkpoint(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    common = ["execute", "--model", "tiny-llama", "--policy", "fuyou", "--batch", "2", "--seq", "16",
              "--save-dir", str(tmp_path / "ck")]
    subprocess.run([sys.executable, "-m", "tiertune.cli", *common, "--steps", "1"], check=True, capture_output=True,
                   timeout=600)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    r = interrupt([*common, "--steps", "100000", "--save-every", "1000"], 6.0, tmp_path, {"TMPDIR": str(tmp)})
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "tiertune: interrupted"
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert os.listdir(tmp) == []
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
