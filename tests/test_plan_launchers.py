"""Launchers of `rs run`: retries, the state file and `--status`, submitit (its local executor runs the same
submission code as SLURM), Ray (a local instance; skipped without ray), and a killed plan that resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rs_lightning.demo.pipeline import Stage
from rs_lightning.demo.runner import StageFailed, run_stages
from rs_lightning.plan.launchers import StageJob, _slurm_parameters, make_launcher
from rs_lightning.plan.state import format_status, stage_status

# A stage that fails while `fail_first` attempts have not been made yet (it counts them in a file), then writes
# its output atomically.
FLAKY = textwrap.dedent("""
    import os, sys, time
    out, fail_first, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    count = out + ".attempts"
    n = (int(open(count).read()) if os.path.exists(count) else 0) + 1
    open(count, "w").write(str(n))
    print(f"attempt {n} rank {os.environ.get('SLURM_PROCID', '-')} threads {os.environ['OMP_NUM_THREADS']}",
          flush=True)
    time.sleep(seconds)
    if n <= fail_first:
        sys.exit(3)
    open(out + ".tmp", "w").write("ok")
    os.replace(out + ".tmp", out)
""")


def flaky(tmp: Path, name: str, needs=(), fail_first=0, seconds=0.2, kind="expert") -> Stage:
    out = tmp / f"{name}.out"
    return Stage(name, kind, out, {"stage": name}, list(needs), resources={"cpus": 1, "time_min": 5},
                 command=[sys.executable, "-c", FLAKY, str(out), str(fail_first), str(seconds)])


def quiet(_line):
    pass


def test_a_failed_stage_is_retried_and_its_first_log_kept(tmp_path):
    a = flaky(tmp_path, "a", fail_first=1)
    b = flaky(tmp_path, "b", needs=["a"])
    lines = []
    run_stages([a, b], tmp_path, retries=1, log=lines.append)
    assert a.output.exists() and b.output.exists()
    assert any(line.startswith("  retry    expert a") and "exit code 3" in line for line in lines)
    assert "attempt 1" in (tmp_path / "logs" / "a.log.1").read_text()
    assert "attempt 2" in (tmp_path / "logs" / "a.log").read_text()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["stages"]["a"]["state"] == "done" and state["stages"]["a"]["attempt"] == 2
    assert state["driver"]["launcher"] == "local" and state["driver"]["finished"]


def test_out_of_retries_the_status_names_the_failure_and_what_it_blocked(tmp_path):
    a = flaky(tmp_path, "a", fail_first=5)
    b = flaky(tmp_path, "b", needs=["a"])
    c = flaky(tmp_path, "c")
    with pytest.raises(StageFailed, match="a: exit code 3"):
        run_stages([a, b, c], tmp_path, retries=1, log=quiet)
    assert (tmp_path / "a.out.attempts").read_text() == "2"  # one try + one retry
    rows = {r["name"]: r for r in stage_status([a, b, c], tmp_path)}
    assert rows["a"]["state"] == "failed" and f"log: {tmp_path / 'logs' / 'a.log'}" in rows["a"]["detail"]
    assert "exit code 3" in rows["a"]["detail"]
    assert rows["b"]["state"] == "blocked" and rows["c"]["state"] == "done"
    text = format_status(list(rows.values()), tmp_path)
    assert "3 stages under" in text and "1 blocked, 1 done, 1 failed" in text


def test_submitit_launcher_runs_stages_as_jobs_with_retries(tmp_path):
    """The SLURM path through submitit's LocalExecutor: the same submission code, jobs as local processes.
    Two experts ready together with the same resources go as one array job."""
    pytest.importorskip("submitit")
    init = flaky(tmp_path, "init", kind="init")
    e1, e2 = flaky(tmp_path, "e1", needs=["init"]), flaky(tmp_path, "e2", needs=["init"], fail_first=1)
    sweep = flaky(tmp_path, "sweep", needs=["e1", "e2"], kind="front")
    launcher = make_launcher("slurm", tmp_path, cluster="local")
    lines = []
    run_stages([init, e1, e2, sweep], tmp_path, launcher=launcher, retries=1, log=lines.append)
    assert all(s.output.exists() for s in (init, e1, e2, sweep))
    assert any("submitit local job" in line for line in lines)
    assert any(p.name.startswith("expert-array-") for p in (tmp_path / "submitit").iterdir())
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["driver"]["launcher"] == "slurm" and state["stages"]["e2"]["attempt"] == 2
    assert re.match(r"submitit local job \d+", state["stages"]["sweep"]["job"])
    assert "attempt 1" in (tmp_path / "logs" / "e2.log.1").read_text()
    # a job runs with as many threads as CPUs its resources ask for
    assert "threads 1" in (tmp_path / "logs" / "init.log").read_text()
    sweep_cpus = flaky(tmp_path, "wide", kind="front")
    sweep_cpus.resources = {"cpus": 2, "time_min": 5}
    run_stages([sweep_cpus], tmp_path, launcher=launcher, log=quiet)
    assert "threads 2" in (tmp_path / "logs" / "wide.log").read_text()


def test_slurm_resources_become_one_task_per_gpu():
    params = _slurm_parameters({"gpus": 4, "nodes": 2, "cpus": 8, "mem_gb": 64, "time_min": 600}, {}, local=False)
    assert params == {"timeout_min": 600, "gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 8,
                      "nodes": 2, "mem_gb": 64}
    assert _slurm_parameters({}, {"time_min": 5}, local=True) == {
        "timeout_min": 5, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1}
    with pytest.raises(ValueError, match="local executor runs one node, got nodes: 2"):
        _slurm_parameters({"nodes": 2}, {}, local=True)


def test_every_task_of_a_multi_gpu_job_logs_to_its_own_file(tmp_path, monkeypatch):
    job = StageJob([sys.executable, "-c", "import os; print('rank', os.environ['SLURM_PROCID'])"], {},
                   str(tmp_path / "s.log"), str(tmp_path))
    for rank in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        assert job() == 0
    assert "rank 0" in (tmp_path / "s.log").read_text() and "rank 1" in (tmp_path / "s.log.rank1").read_text()


def test_ray_launcher_on_a_local_instance(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]'): the Ray launcher is optional")
    a = flaky(tmp_path, "a", fail_first=1)
    b = flaky(tmp_path, "b", needs=["a"])
    launcher = make_launcher("ray", tmp_path, ray={"num_cpus": 2})
    lines = []
    try:
        run_stages([a, b], tmp_path, launcher=launcher, retries=1, log=lines.append)
    finally:
        launcher.close()
    assert a.output.exists() and b.output.exists()
    assert any("ray task" in line for line in lines)
    assert json.loads((tmp_path / "state.json").read_text())["stages"]["a"]["attempt"] == 2


def _rs_run(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rs_lightning.cli", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def test_a_killed_plan_resumes_without_redoing_finished_stages(tmp_path):
    """The quick plan (real trainings through `rs fit`), killed once its init is done, then run again."""
    out = tmp_path / "quick"
    init = out / "seed0" / "init" / "model.safetensors"
    driver = _rs_run("quick", "--out", str(out), "--workers", "2")
    deadline = time.time() + 300
    while not init.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert init.exists(), driver.communicate()[0] if driver.poll() is not None else "init not done in 5 min"

    def expert_running() -> bool:
        try:
            stages = json.loads((out / "state.json").read_text())["stages"]
        except (OSError, ValueError):
            return False
        return stages["seed0-expert-bleu1"]["state"] == "running"

    while not expert_running() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)  # mid-plan: the init is done, the experts are running
    driver.communicate()
    finished_init = init.stat().st_mtime_ns

    status = _rs_run("quick", "--out", str(out), "--status").communicate()[0]
    assert re.search(r"seed0-init\s+init\s+done", status), status
    assert re.search(r"seed0-expert-bleu1\s+expert\s+interrupted\s+the driver stopped while it ran", status), status
    assert re.search(r"seed0-sweep\s+front\s+pending", status), status

    rerun = _rs_run("quick", "--out", str(out), "--workers", "2")
    text = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, text
    assert "reused   init   seed0-init" in text and "finished front  seed0-sweep" in text
    assert init.stat().st_mtime_ns == finished_init
    assert (out / "seed0" / "front" / "summary.json").exists()
    timings = json.loads((out / "stages.json").read_text())
    assert timings["seed0-init"]["reused"] is True and timings["seed0-sweep"]["reused"] is False


def test_sigterm_to_the_driver_stops_its_stages_and_says_so(tmp_path):
    """A scheduler's or user's `kill` (SIGTERM) unwinds like Ctrl-C: the stage in flight is cancelled, not orphaned."""
    out = tmp_path / "q"
    driver = _rs_run("quick", "--out", str(out))
    deadline = time.time() + 120
    pid = None
    while pid is None and driver.poll() is None and time.time() < deadline:
        try:
            record = json.loads((out / "state.json").read_text())["stages"]["seed0-init"]
            pid = int(record["job"].split()[-1]) if record.get("state") == "running" else None
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert pid is not None, "the init stage never started"
    driver.send_signal(signal.SIGTERM)
    text = driver.communicate(timeout=60)[0]
    assert driver.returncode == 143, text
    with pytest.raises(ProcessLookupError):  # the stage's process is gone (reaped by the driver)
        os.kill(pid, 0)
    state = json.loads((out / "state.json").read_text())
    assert state["stages"]["seed0-init"]["state"] == "interrupted" and state["driver"]["finished"]
