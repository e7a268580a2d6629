"""The demo's stage runner: dependencies, concurrency, failures, reuse, and a killed run that resumes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rs_lightning.demo.pipeline import Stage
from rs_lightning.demo.runner import StageFailed, load_timings, run_stages

# A stage: sleep, then record (start, end) and write the output file atomically (write + rename).
STAGE = textwrap.dedent("""
    import json, os, sys, time
    out, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    start = time.time(); time.sleep(seconds); print("50%|##### ", flush=True)
    if code:
        sys.exit(code)
    with open(out + ".tmp", "w") as f:
        json.dump({"start": start, "end": time.time()}, f)
    os.replace(out + ".tmp", out)
""")


def stage(tmp: Path, name: str, needs=(), seconds=0.3, code=0) -> Stage:
    out = tmp / f"{name}.json"
    return Stage(name, "expert", out, {"stage": name}, list(needs),
                 command=[sys.executable, "-c", STAGE, str(out), str(seconds), str(code)])


def span(s: Stage) -> tuple[float, float]:
    d = json.loads(s.output.read_text())
    return d["start"], d["end"]


def test_dependencies_run_in_order_and_independent_stages_overlap(tmp_path):
    a, b = stage(tmp_path, "a", seconds=1.0), stage(tmp_path, "b", seconds=1.0)
    c = stage(tmp_path, "c", needs=["a", "b"], seconds=0.1)
    lines = []
    timings = run_stages([c, a, b], tmp_path, workers=2, status_every=0.3, log=lines.append)
    (a0, a1), (b0, b1), (c0, _) = span(a), span(b), span(c)
    assert a0 < b1 and b0 < a1  # a and b ran at the same time
    assert c0 >= max(a1, b1)  # c waited for both
    assert set(timings) == {"a", "b", "c"} and all(t["cpu_seconds"] >= 0 for t in timings.values())
    assert (tmp_path / "configs" / "a.yaml").exists() and "50%" in (tmp_path / "logs" / "a.log").read_text()
    assert any(line.startswith("  running: ") and "50%" in line for line in lines)  # progress per stage


def test_one_worker_runs_one_stage_at_a_time(tmp_path):
    a, b = stage(tmp_path, "a", seconds=0.5), stage(tmp_path, "b", seconds=0.5)
    run_stages([a, b], tmp_path, workers=1, log=lambda _: None)
    (a0, a1), (b0, b1) = span(a), span(b)
    assert a1 <= b0 or b1 <= a0


def test_a_failed_stage_stops_its_dependants_not_its_siblings(tmp_path):
    bad = stage(tmp_path, "bad", code=3)
    child = stage(tmp_path, "child", needs=["bad"])
    sibling = stage(tmp_path, "sibling")
    with pytest.raises(StageFailed, match=r"bad: exit code 3; log: .*bad\.log"):
        run_stages([bad, child, sibling], tmp_path, workers=2, log=lambda _: None)
    assert sibling.output.exists() and not child.output.exists()
    assert "sibling" in load_timings(tmp_path) and "bad" not in load_timings(tmp_path)


def test_finished_stages_are_reused_and_force_reruns_them(tmp_path):
    a = stage(tmp_path, "a")
    run_stages([a], tmp_path, log=lambda _: None)
    first = span(a)
    lines = []
    run_stages([a], tmp_path, log=lines.append)
    assert span(a) == first and "reused" in lines[0]
    run_stages([a], tmp_path, force=True, log=lambda _: None)
    assert span(a) != first


def test_a_finished_stage_planned_with_another_config_is_not_reused(tmp_path):
    """A re-run whose plan changed (another precision, iteration count, grid) must not report the old stages under
    the new settings: it stops before anything runs, naming the stage and the keys, and --force reruns."""
    from rs_lightning.demo.runner import StageConfigChanged

    a = stage(tmp_path, "a", seconds=0.1)
    a.config = {"trainer": {"limit_train_batches": 15}, "model": {"lr": 5e-4}}
    run_stages([a], tmp_path, log=lambda _: None)
    first = a.output.read_text()
    a.config = {"trainer": {"limit_train_batches": 15, "precision": "bf16-mixed"}, "model": {"lr": 1e-3}}
    b = stage(tmp_path, "b", seconds=0.1)
    with pytest.raises(StageConfigChanged) as err:
        run_stages([a, b], tmp_path, log=lambda _: None)
    message = str(err.value)
    assert "1 finished stage(s)" in message and "a (" in message and "--force" in message
    assert "trainer.precision: (absent) -> 'bf16-mixed'" in message and "model.lr: 0.0005 -> 0.001" in message
    assert not b.output.exists() and a.output.read_text() == first  # nothing ran
    # The same config again (tuples written as YAML lists compare equal): reused.
    a.config = {"trainer": {"limit_train_batches": 15}, "model": {"lr": 5e-4}}
    lines = []
    run_stages([a], tmp_path, log=lines.append)
    assert any("reused" in line for line in lines)
    # --force reruns it with the new config, which is then the recorded one.
    a.config = {"trainer": {"precision": "bf16-mixed"}}
    run_stages([a], tmp_path, force=True, log=lambda _: None)
    assert a.output.read_text() != first
    run_stages([a], tmp_path, log=lambda _: None)  # now reused without complaint


def test_bad_graphs_are_refused_before_anything_runs(tmp_path):
    a = stage(tmp_path, "a")
    with pytest.raises(ValueError, match="unknown stages"):
        run_stages([stage(tmp_path, "b", needs=["nope"]), a], tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match="duplicate stage names"):
        run_stages([a, a], tmp_path, log=lambda _: None)
    assert not a.output.exists()


def test_a_killed_run_leaves_no_orphan_and_resumes_with_its_finished_stages(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_demo_runner import stage
        from rs_lightning.demo.runner import run_stages
        tmp = Path({str(tmp_path)!r})
        run_stages([stage(tmp, "fast", seconds=0.1), stage(tmp, "slow", needs=["fast"], seconds=30)], tmp,
                   workers=1, log=lambda line: print(line, flush=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "started  expert slow" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    alive = subprocess.run(["pgrep", "-f", f"{tmp_path}/slow.json"], capture_output=True, text=True).stdout.split()
    assert [p for p in alive if int(p) != os.getpid()] == []  # the stage died with its runner
    assert (tmp_path / "fast.json").exists() and not (tmp_path / "slow.json").exists()
    lines = []
    run_stages([stage(tmp_path, "fast", seconds=0.1), stage(tmp_path, "slow", needs=["fast"], seconds=0.1)],
               tmp_path, log=lines.append)
    assert any("reused" in line and "fast" in line for line in lines)
    assert (tmp_path / "slow.json").exists()


def test_stages_that_unblock_most_start_first(tmp_path):
    # Two "replicates": x0 -> (a0, b0), x1 -> (a1, b1). With one worker, x1 must start before a0 and b0.
    x0, x1 = stage(tmp_path, "x0", seconds=0.05), stage(tmp_path, "x1", seconds=0.05)
    kids = [stage(tmp_path, f"{k}{r}", needs=[f"x{r}"], seconds=0.05) for r in (0, 1) for k in "ab"]
    run_stages([x0, *kids[:2], x1, *kids[2:]], tmp_path, workers=1, log=lambda _: None)
    assert span(x1)[0] < min(span(kids[0])[0], span(kids[1])[0])


def test_progress_is_the_stages_own_bar_not_a_model_loading_bar(tmp_path):
    from rs_lightning.demo.runner import _progress

    log = tmp_path / "stage.log"
    log.write_bytes(b"Epoch 0:   0%|          | 0/15\rEpoch 0:  40%|####      | 6/15\n"
                    b"Loading weights:   0%|    | 0/103\rLoading weights: 100%|####| 103/103 [00:00<00:00]\n")
    assert _progress(log) == "40%"
    assert _progress(tmp_path / "missing.log") == ""
