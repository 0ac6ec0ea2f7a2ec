"""A training run loses at most --save-every steps: non-finite losses stop it with exit 2 and no
checkpoint of non-finite state is written; checkpoints rotate atomically; a run killed with
SIGKILL at any moment and resumed gives the uninterrupted run's losses; a resume that would change
the run (seed, batch, sequence length, text) is refused."""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiertune.cli import main
from tiertune.executor.checkpoint import RUN_MANIFEST, load_checkpoint
from tiertune.executor.run import non_finite

TINY = ["execute", "--model", "tiny-llama", "--policy", "gpu-only", "--batch", "2", "--seq", "16", "--lr", "0.01"]
TOTAL = 6


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def checkpoints(d: Path) -> list[str]:
    return json.loads((d / RUN_MANIFEST).read_text())["checkpoints"]


def history(d: Path) -> list[float]:
    return load_checkpoint(d)["executor"]["losses"]


def test_a_diverging_run_stops_with_exit_2_and_keeps_only_finite_checkpoints(capsys, tmp_path):
    d = tmp_path / "ck"
    code, out, err = run(capsys, *TINY[:-1], "1e6", "--steps", "6", "--save-dir", d, "--save-every", "1", "--json")
    assert code == 2 and out == "" and len(err) == 1 and "step " in err[0] and "kept" in err[0]
    assert checkpoints(d)
    for name in checkpoints(d):
        assert non_finite(load_checkpoint(d / name)) is None
    assert load_checkpoint(d)["executor"]["step"] < 6


def test_resuming_into_a_nan_does_not_replace_the_good_checkpoint(capsys, tmp_path):
    """The issue's reproduction: --resume D --save-dir D with a learning rate that blows up."""
    d = tmp_path / "ck"
    assert run(capsys, *TINY, "--steps", "1", "--save-dir", d)[0] == 0
    good = checkpoints(d)
    code, out, err = run(capsys, *TINY[:-1], "1e6", "--steps", "4", "--resume", d, "--save-dir", d, "--json")
    assert code == 2 and "NaN" not in out and len(err) == 1 and "step" in err[0]
    assert checkpoints(d) == good and non_finite(load_checkpoint(d)) is None


def test_checkpoints_rotate_keeping_the_last_k(capsys, tmp_path):
    d = tmp_path / "ck"
    code, out, _ = run(capsys, *TINY, "--steps", "5", "--save-dir", d, "--save-every", "2", "--keep", "2", "--json")
    assert code == 0
    names = checkpoints(d)
    assert [int(n.split("-")[1]) for n in names] == [4, 5]         # every 2 steps, and at the end
    assert sorted(os.listdir(d)) == sorted([*names, RUN_MANIFEST])
    assert history(d) == pytest.approx(json.loads(out)["losses"], rel=0, abs=0)


def test_a_new_run_into_an_old_save_dir_replaces_its_checkpoints(capsys, tmp_path):
    d = tmp_path / "ck"
    assert run(capsys, *TINY, "--steps", "3", "--save-dir", d, "--save-every", "1")[0] == 0
    assert run(capsys, *TINY, "--steps", "1", "--save-dir", d, "--seed", "7")[0] == 0
    assert [int(n.split("-")[1]) for n in checkpoints(d)] == [1] and load_checkpoint(d)["seed"] == 7
    assert sorted(os.listdir(d)) == sorted([*checkpoints(d), RUN_MANIFEST])


@pytest.mark.parametrize("flag, value, saved", [("--seed", "3", "seed 0"), ("--batch", "4", "checkpoint: 2"),
                                                ("--seq", "32", "checkpoint: 16")])
def test_resume_refuses_flags_that_would_change_the_run(capsys, tmp_path, flag, value, saved):
    d = tmp_path / "ck"
    assert run(capsys, *TINY, "--steps", "1", "--save-dir", d)[0] == 0
    argv = [a for a in TINY if a not in ("--batch", "2", "--seq", "16")] + [flag, value]
    code, _, err = run(capsys, *argv, "--steps", "1", "--resume", d)
    assert code == 2 and len(err) == 1 and saved in err[0]


def test_resume_refuses_other_training_text(capsys, tmp_path):
    d = tmp_path / "ck"
    assert run(capsys, *TINY, "--steps", "1", "--save-dir", d)[0] == 0
    text = tmp_path / "other.txt"
    text.write_text("some other text for training, long enough for a window of sixteen bytes\n" * 4)
    code, _, err = run(capsys, *TINY, "--steps", "1", "--resume", d, "--data", text)
    assert code == 2 and len(err) == 1 and "text" in err[0]


def test_resume_keeps_the_checkpoints_settings_and_states_a_changed_lr(capsys, tmp_path):
    d = tmp_path / "ck"
    assert run(capsys, *TINY, "--steps", "1", "--save-dir", d, "--seed", "5")[0] == 0
    code, out, _ = run(capsys, "execute", "--model", "tiny-llama", "--policy", "gpu-only", "--steps", "1",
                       "--resume", d, "--lr", "0.02", "--json")
    r = json.loads(out)
    assert code == 0 and r["seed"] == 5 and r["steps"] == 2 and r["changed"] == {"lr": [0.01, 0.02]}


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "tiertune.cli", *map(str, argv)]


def _saved_steps(d: Path) -> int:
    try:
        return len(checkpoints(d))
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    d = tmp_path_factory.mktemp("whole") / "ck"
    subprocess.run(_cli(*TINY, "--steps", TOTAL, "--save-dir", d), check=True, capture_output=True, timeout=600)
    return history(d)


@pytest.mark.parametrize("kill_after, seed", [(0, 11), (2, 13), (4, 14)])
def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_losses(tmp_path, uninterrupted,
                                                                              kill_after, seed):
    """SIGKILL once `kill_after` checkpoints are listed, plus a random delay (so it may land
    inside a step or a save); resume until TOTAL steps are done."""
    d = tmp_path / "ck"
    argv = [*TINY, "--save-dir", d, "--save-every", 1, "--keep", 2]
    proc = subprocess.Popen(_cli(*argv, "--steps", TOTAL), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _saved_steps(d) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(d)["executor"]["step"] if (d / RUN_MANIFEST).exists() else 0
    if done < TOTAL:
        resume = ["--resume", d] if done else []
        subprocess.run(_cli(*argv, *resume, "--steps", TOTAL - done), check=True, capture_output=True, timeout=600)
    torch.testing.assert_close(torch.tensor(history(d)), torch.tensor(uninterrupted), rtol=1e-6, atol=0)
    assert all(n.startswith("step-") for n in os.listdir(d) if n != RUN_MANIFEST)   # no temp left behind


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # else the kernel kills the writer
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from tiertune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_leaves_no_temp_offload_dir(tmp_path):
    """The issue's `ulimit -f 500; tiertune execute --model small-llama --policy fuyou ...`: the
    SSD tier's files cannot be written; one line, exit 2, and the temp offload dir is gone."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "execute", "--model", "small-llama", "--policy", "fuyou",
                           "--steps", "1", "--batch", "1", "--seq", "16"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp) == []


def test_with_clipping_a_non_finite_gradient_norm_stops_before_the_update(capsys, tmp_path):
    from tiertune.hardware import load_hardware
    from tiertune.planner.policies import make_policy
    from tiertune.workload import MODEL_PRESETS, TrainSpec

    train = TrainSpec(batch=2, seq_len=16, dtype="fp32", optimizer="adamw", grad_clip=1.0)
    plan = make_policy("gpu-only", MODEL_PRESETS["tiny-llama"], train, load_hardware("lsp-4090"))
    plan.save(tmp_path / "clip.json")
    d = tmp_path / "ck"
    code, _, err = run(capsys, "execute", "--model", "tiny-llama", "--plan", tmp_path / "clip.json", "--lr", "1e6",
                       "--steps", "8", "--save-dir", d, "--save-every", "1")
    assert code == 2 and len(err) == 1 and re.search(r"step \d+: (gradient norm|loss) is", err[0])
    for name in checkpoints(d):
        assert non_finite(load_checkpoint(d / name)) is None
