"""Nothing of the user's is ever lost: a save directory holding the user's files is refused, not
emptied; outputs are written through symbolic links, to FIFOs and devices, keeping a file's mode;
an output that cannot be written is refused before the work; JSON on stdout is strict."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiertune.cli import main
from tiertune.fileio import atomic_write_text, strict_json

SIMULATE = ["simulate", "--model", "tiny-llama", "--hardware", "lsp-4090", "--policy", "gpu-only"]
EXECUTE = ["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1", "--batch", "2", "--seq", "16"]


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_a_save_dir_holding_the_users_files_is_refused_and_left_alone(capsys, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("code\n")
    code, _, err = run(capsys, *EXECUTE, "--save-dir", str(proj))
    assert code == 2 and len(err) == 1 and "did not write" in err[0] and "src" in err[0]
    assert (proj / "src" / "main.py").read_text() == "code\n"
    assert sorted(os.listdir(tmp_path)) == ["proj"] and os.listdir(proj) == ["src"]


def test_a_save_dir_that_is_a_file_is_refused_not_moved(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    code, _, err = run(capsys, *EXECUTE, "--save-dir", str(f))
    assert code == 2 and len(err) == 1 and "not a directory" in err[0]
    assert f.read_text() == "mine\n" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_save_dir_the_tool_wrote_is_saved_into_again(capsys, tmp_path):
    ck = tmp_path / "ck"
    assert run(capsys, *EXECUTE, "--save-dir", str(ck))[0] == 0
    (ck / "README").write_text("my note\n")          # a user's file beside the checkpoints is kept
    assert run(capsys, *EXECUTE, "--save-dir", str(ck))[0] == 0
    assert (ck / "README").read_text() == "my note\n"
    assert run(capsys, *EXECUTE, "--save-dir", str(tmp_path / "empty"))[0] == 0


def test_an_output_through_a_symlink_replaces_the_target_and_keeps_the_link(capsys, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert run(capsys, *SIMULATE, "--trace", str(link))[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["tiertune"]["format"] == "tiertune.trace/1"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_an_existing_file_keeps_its_mode(tmp_path, mode):
    f = tmp_path / "out.txt"
    f.write_text("old")
    os.chmod(f, mode)
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and stat.S_IMODE(f.stat().st_mode) == mode


def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path):
    mask = os.umask(0o022)
    try:
        # the mode of a new file is fixed at import: check it against the umask in force then
        from tiertune.fileio import NEW_FILE_MODE
        atomic_write_text(tmp_path / "new.txt", "x")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == NEW_FILE_MODE
        assert NEW_FILE_MODE & 0o044                     # readable by others, unlike mkstemp's 0600
    finally:
        os.umask(mask)


def test_an_output_to_a_fifo_is_written_into_it(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "tiertune.cli", *SIMULATE, "--trace", str(fifo)],
                          capture_output=True, text=True, timeout=300)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)                    # still a FIFO, not a file
    assert json.loads(got[0])["tiertune"]["format"] == "tiertune.trace/1"
    assert sorted(os.listdir(tmp_path)) == ["pipe.json"]


def test_an_output_to_the_standard_output_device_goes_to_stdout(tmp_path):
    before = os.lstat("/dev/stdout")
    proc = subprocess.run([sys.executable, "-m", "tiertune.cli", "plan", "--model", "tiny-llama", "--hardware",
                           "lsp-4090", "--time-limit", "2", "-o", "/dev/stdout"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"format": "tiertune.plan/1"' in proc.stdout and "wrote /dev/stdout" in proc.stdout
    after = os.lstat("/dev/stdout")
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)     # not replaced by a file
    assert os.listdir(tmp_path) == []


def test_an_unwritable_trace_is_refused_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.perf_counter()
    code, _, err = run(capsys, *EXECUTE, "--trace", str(blocker / "t.json"), "--save-dir", str(tmp_path / "ck"))
    assert code == 2 and len(err) == 1 and "--trace" in err[0]
    assert not (tmp_path / "ck").exists()                            # no training ran
    assert time.perf_counter() - t0 < 10


def test_an_unwritable_plan_output_is_refused_before_the_search(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.perf_counter()
    code, _, err = run(capsys, "plan", "--model", "gpt3-13b", "--hardware", "fuyou-4090-12ssd", "--time-limit", "60",
                       "-o", str(blocker / "plan.json"))
    assert code == 2 and len(err) == 1 and "-o" in err[0]
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_compare_outputs_are_checked_first(capsys, tmp_path, flag):
    (tmp_path / "dir.png").mkdir()
    code, _, err = run(capsys, "compare", "--model", "gpt3-13b", "--hardware", "fuyou-4090-12ssd", flag,
                       str(tmp_path / "dir.png"))
    assert code == 2 and len(err) == 1 and "is a directory" in err[0]


def test_a_plan_that_does_not_fit_exits_0_with_or_without_trace(capsys, tmp_path):
    argv = ["simulate", "--model", "gpt3-175b", "--hardware", "fuyou-4090-12ssd", "--policy", "gpu-only", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(out)["fits"] is False
    code, out, _ = run(capsys, *argv, "--trace", str(tmp_path / "t.json"))
    assert code == 0 and json.loads(out)["trace"] is None and not (tmp_path / "t.json").exists()


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


keys = st.text(alphabet="abcxyz", min_size=1, max_size=4)
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_json_out_is_strict_and_says_what_became_null(obj):
    out = _strict(strict_json(obj))
    because = out.pop("null_because", {})

    def walk(a, b, where):
        if isinstance(a, float) and not math.isfinite(a):
            assert b is None and where in because
        elif isinstance(a, dict):
            for k in a:
                walk(a[k], b[str(k)], f"{where}.{k}" if where else str(k))
        elif isinstance(a, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        else:
            assert a == b
    walk(obj, out, "")
    assert len(because) == _count_non_finite(obj)


def _count_non_finite(obj) -> int:
    if isinstance(obj, float):
        return int(not math.isfinite(obj))
    if isinstance(obj, dict):
        return sum(_count_non_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_non_finite(v) for v in obj)
    return 0
