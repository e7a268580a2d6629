"""`rs front` under stress: two writers on one run folder, a full disk, a SIGKILL, NaN checkpoints, and `report`
counting the same rows as the sweep's own summary (the toy quadratic task: seconds).

A killed sweep resuming to the uninterrupted rows is also tested in-process (an exception at the n-th point) by
tests/test_front_sweep.py::test_killed_sweep_resumes_without_recomputing; here the kill is a real SIGKILL.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_cases import mounted_tmpfs, run_in_process, toy_config  # noqa: E402
from soup_cases import rs_subprocess  # noqa: E402

from rs_lightning.front.rows import FRONT_FILE, read_rows, strip_timing  # noqa: E402


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the sweep ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _rows(run: Path) -> list[dict]:
    return [strip_timing(r) for r in read_rows(run / FRONT_FILE)]


def test_second_writer_of_a_run_folder_is_refused_while_the_first_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Many samples per point: the first sweep is still running when the second process has started.
    config = toy_config(tmp_path, grid={"kind": "sweep", "points": 9})
    first = rs_subprocess("front", "--config", config, "--no-progress", "--data.init_args.n_samples", "4000")
    try:
        _wait_for(lambda: (tmp_path / ".run.lock").exists(), first)
        # The second writer is this test's own process (a second process all the same, and quick to start).
        code, _, err, exc = run_in_process(["front", "--config", config, "--no-progress",
                                            "--data.init_args.n_samples", "4000"])
        assert first.poll() is None, "the first sweep finished too soon for this test to mean anything"
        assert exc is None and code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert f"run folder {tmp_path / 'run'} is in use by pid {first.pid}" in lines[0]
    finally:
        first.kill()
        first.communicate()


def test_sigkilled_sweep_resumes_to_the_uninterrupted_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = toy_config(tmp_path, grid={"kind": "sweep", "points": 41})
    front = tmp_path / "run" / FRONT_FILE
    killed = rs_subprocess("front", "--config", config, "--no-progress")
    _wait_for(lambda: _lines(front) >= 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    n_before = len(read_rows(front))
    assert 3 <= n_before < 41 + 3, "the kill came too late to test a resume"
    # The dead writer's lock file may remain; the kernel dropped its lock, so the next writer takes it.
    code, _, err, exc = run_in_process(["front", "--config", config, "--no-progress"])
    assert (code, exc) == (0, None), err
    code, _, err, exc = run_in_process(["front", "--config", config, "--no-progress", "--front.out_dir", "full"])
    assert (code, exc) == (0, None), err
    assert _rows(tmp_path / "run") == _rows(tmp_path / "full")
    names = [r["name"] for r in read_rows(front)]
    assert len(names) == len(set(names)) == 41 + 3  # each point once: 41 lam values (2 are the experts), init, 2 MORL
    assert not (tmp_path / ".run.lock").exists()


def test_disk_full_mid_sweep_keeps_whole_rows_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["front", "--config", toy_config(tmp_path), "--no-progress"]
    front = tmp_path / "run" / FRONT_FILE
    real_fsync = os.fsync
    calls = []

    def fsync(fd):  # the 4th row does not fit: its fsync fails (its bytes are already in the file)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(FRONT_FILE):
            calls.append(fd)
            if len(calls) == 4:
                raise OSError(28, "No space left on device")
        return real_fsync(fd)

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        code, _, err, exc = run_in_process(args)
    assert exc is None and code == 1, err
    assert err.count("\n") == 1 and f"cannot write {front}: No space left on device" in err
    assert "re-run to resume" in err
    assert front.read_bytes().endswith(b"\n") and len(read_rows(front)) == 3  # no part of the 4th row
    assert not list(tmp_path.glob("run/.*")), "a temporary was left behind"

    code, _, err, exc = run_in_process(args)  # space freed: the same command resumes
    assert (code, exc) == (0, None), err
    code, _, err, exc = run_in_process([*args, "--front.out_dir", "full"])
    assert (code, exc) == (0, None), err
    assert _rows(tmp_path / "run") == _rows(tmp_path / "full")


def test_really_full_disk_is_one_line_and_leaves_whole_rows(tmp_path, monkeypatch):
    small = tmp_path / "small"
    with mounted_tmpfs(small, "size=12k") as ok:
        if not ok:
            pytest.skip("a real full disk needs a tmpfs mount as root")
        monkeypatch.chdir(tmp_path)
        code, _, err, exc = run_in_process(["front", "--config", toy_config(tmp_path), "--no-progress",
                                            "--front.out_dir", str(small / "run")])
        assert exc is None and code == 1, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("rs front: error: cannot write ") and "No space left" in err
        left = sorted(p.name for p in small.rglob("*"))
        assert not [n for n in left if ".tmp-" in n or n.endswith(".lock")], left
        if (small / "run" / FRONT_FILE).exists():
            assert (small / "run" / FRONT_FILE).read_bytes().endswith(b"\n")
            read_rows(small / "run" / FRONT_FILE)  # every line a whole row


def test_checkpoints_are_checked_for_nan_once_not_at_every_point(tmp_path, monkeypatch):
    import torch

    from rs_lightning.front import preflight, sweep

    monkeypatch.chdir(tmp_path)
    finite_checks, soups = [], []
    real_is_finite, real_interpolate = preflight.is_finite, sweep.interpolate
    monkeypatch.setattr(preflight, "is_finite", lambda t: finite_checks.append(t) or real_is_finite(t))
    monkeypatch.setattr(sweep, "interpolate", lambda *a, **k: soups.append(k) or real_interpolate(*a, **k))
    code, _, err, exc = run_in_process(["front", "--config", toy_config(tmp_path), "--no-progress"])
    assert (code, exc) == (0, None), err
    assert len(finite_checks) == 2 + 1 + 2  # one tensor per checkpoint: 2 experts, init, 2 MORL; once each
    assert len(soups) == 5 + 1 + 2 and all(k.get("allow_nonfinite") is True for k in soups)

    # front.allow_nonfinite lets a NaN checkpoint through: its points are recorded as invalid, not fatal.
    from safetensors.torch import save_file

    save_file({"theta": torch.tensor([float("nan"), 1.0])}, str(tmp_path / "ckpt" / "m1.safetensors"))
    code, out, err, exc = run_in_process(["front", "--config", "front.yaml", "--no-progress", "--front.out_dir",
                                          "nan", "--front.allow_nonfinite", "true"])
    assert (code, exc) == (0, None), err
    assert "INVALID points" in out and "morl mu=0.2,0.8" in out


def test_report_scores_the_rows_the_sweep_scored(tmp_path, monkeypatch):
    """A wider grid first leaves its rows in front.jsonl (the resume cache); the narrower run's report must not
    count them: `rs front report` rewrites the very summary.json the sweep wrote."""
    monkeypatch.chdir(tmp_path)
    config = toy_config(tmp_path)
    base = ["front", "--config", config, "--no-progress"]
    assert run_in_process([*base, "--front.grid.points", "9"])[0] == 0
    code, out, err, _ = run_in_process(base)
    assert code == 0, err
    run = tmp_path / "run"
    swept = json.loads((run / "summary.json").read_text())
    assert swept["n_points"] == 5 + 1 + 2 < len(read_rows(run / FRONT_FILE))
    with contextlib.redirect_stdout(io.StringIO()):
        code, report_out, err, _ = run_in_process(["front", "report", run])
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text()) == swept
    assert report_out.splitlines()[0] == out.splitlines()[0] == f"front: 8 points (8 valid) -> {run}/front.jsonl"
