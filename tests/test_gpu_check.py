"""benchmarks/gpu_check.py at toy size on the CPU: the one-command GPU check cannot rot unseen."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_toy_check_runs_every_stage_and_writes_one_file(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--toy", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [report[s]["ok"] for s in ("calibrate", "executor", "fidelity")] == [True, True, True]
    fid = report["fidelity"]
    assert fid["plans"] == list(gpu_check.POLICIES)
    for key in ("measured_s", "predicted_calibrated_s", "predicted_leave_one_plan_out_s"):
        assert len(fid[key]) == len(gpu_check.POLICIES) and all(v > 0 and math.isfinite(v) for v in fid[key])
    assert report["executor"]["losses_finite"]


def test_asking_for_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cuda", "--out", str(out)]) == 2
    assert not out.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
