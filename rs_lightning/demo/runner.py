"""Run a graph of stages (of `rs demo` or `rs run PLAN`) concurrently, each a process of its own, one log each.

    timings = run_stages(stages, out, workers=2, threads=1)                 # here, a process pool
    timings = run_stages(stages, out, launcher=make_launcher("slurm", out))  # or on a cluster (plan/launchers.py)

A stage is a command (`rs fit --config ...`, `rs front --config ...`) with the names of the stages it needs.
Up to `workers` stages run at once, each a process with `threads` OpenMP/torch threads (local launcher) or a job
with the stage's resources (slurm, ray), its output going to `<out>/logs/<stage>.log`. A failed stage is started
again up to `retries` times. Every change of a stage's state goes to `<out>/state.json` (`rs run --status`).
A stage whose output already exists is reused (outputs are written atomically, so a killed run loses only the
stages in flight, and the next run resumes with everything finished). A failed stage stops its dependants,
never its independent siblings; the run then raises with the log paths.

The console shows a line when a stage starts or ends and, every `status_every` seconds, one line per running
stage with its progress (the last percentage its progress bar printed). Per-stage wall seconds and CPU seconds
(the child's own user + system time, from `os.wait4`, local launcher only) go to `<out>/stages.json`, written by
this process only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rs_lightning.soup.atomic import atomic_file

LOG_DIR = "logs"
TIMINGS_FILE = "stages.json"
_PERCENT = re.compile(rb"(\d{1,3})%\|")


class StageFailed(RuntimeError):
    """One or more stages exited with an error (the message names them and their logs)."""


def load_timings(out: Path) -> dict:
    path = Path(out) / TIMINGS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def default_workers(threads: int) -> int:
    """cores // threads per stage, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, threads))


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _progress(log: Path) -> str:
    """The last tqdm percentage of the stage's own bar in a log (read from its tail), or '' when none was printed
    yet. transformers' "Loading weights" bars (a reference model loaded mid-training) are not the stage's progress."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 4096))
            tail = f.read()
    except OSError:
        return ""
    hits = [m for line in re.split(rb"[\r\n]", tail) if not line.lstrip().startswith(b"Loading")
            for m in _PERCENT.findall(line)]
    return f"{int(hits[-1])}%" if hits else ""


class _Running:
    def __init__(self, stage, job, log: Path):
        self.stage, self.job, self.log = stage, job, log
        self.start = time.perf_counter()


def run_stages(stages: Sequence, out: Path, *, force: bool = False, workers: int | None = None, threads: int = 1,
               status_every: float = 30.0, log: Callable[[str], None] = print, launcher=None,
               retries: int = 0) -> dict:
    """Run every unfinished stage, respecting `stage.needs`; return {stage name: timing entry}.

    Args:
        stages: objects with `name`, `kind`, `output` (Path), `needs` (names), `argv(config_path)`,
            `config` (dict written to `<out>/configs/<name>.yaml`), `trains`, `seed`, `mu`, `replicate`, and
            optionally `resources` (read by cluster launchers).
        out: the run folder (configs/, logs/, stages.json and state.json go here).
        force: rerun stages whose output exists.
        workers: stages at once (default: cores // threads for the local launcher, unbounded on a cluster).
        threads: OMP_NUM_THREADS of each stage's process (on a cluster launcher: the stage's resources.cpus when
            it gives them).
        status_every: seconds between progress lines while stages run.
        log: where the console lines go.
        launcher: where stages run (rs_lightning.plan.launchers; default: local child processes).
        retries: how many times a failed stage is started again before it counts as failed (its earlier
            logs are kept as `<stage>.log.<attempt>`).

    Raises:
        StageFailed: some stage exited non-zero or wrote no output (its dependants did not run).
        StageConfigChanged: a finished stage was run with another config than the one planned now (before
            anything runs; `force` reruns it instead).
        ValueError: duplicate names or a dependency on an unknown stage (before anything runs).
    """
    import yaml

    from rs_lightning.plan.launchers import LocalLauncher, job_id
    from rs_lightning.plan.state import RunState

    out = Path(out)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names: {sorted({n for n in names if names.count(n) > 1})}")
    unknown = {d for s in stages for d in s.needs} - set(names)
    if unknown:
        raise ValueError(f"stages depend on unknown stages {sorted(unknown)}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not force:
        check_reused_configs(stages, out)
    launcher = launcher or LocalLauncher()
    if workers is None:
        workers = default_workers(threads) if launcher.parallel_limit else len(stages)
    # Start first what unblocks most: an init before another replicate's experts (R inits, not R x N trainings,
    # sit on the critical path).
    dependants = _dependant_counts(stages)
    timings = load_timings(out)
    done, failed, blocked = set(), {}, set()
    attempts: dict[str, int] = {}
    pending = []
    (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
    state = RunState.begin(out, stages, launcher.name)
    for s in stages:
        if s.output.exists() and not force:
            log(f"  reused   {s.kind:<6} {s.name} (finished earlier: {s.output})")
            timings.setdefault(s.name, {"seconds": None})["reused"] = True
            done.add(s.name)
            state.set(s.name, "done", reused=True)
        else:
            pending.append(s)
    running: list[_Running] = []
    def stage_env(stage) -> dict[str, str]:
        # Here every stage gets `threads` (they share this machine's cores); on a cluster a stage's job has the
        # CPUs its resources ask for, and uses them all.
        cpus = None if launcher.parallel_limit else (getattr(stage, "resources", None) or {}).get("cpus")
        n = str(int(cpus) if cpus else threads)
        return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"}

    last_status = time.perf_counter()
    total = len(stages)

    def save():
        with atomic_file(out / TIMINGS_FILE) as f:
            json.dump(timings, f, indent=2)

    try:
        while pending or running:
            for s in [s for s in pending if any(d in failed or d in blocked for d in s.needs)]:
                pending.remove(s)
                blocked.add(s.name)
                state.set(s.name, "blocked", error="a stage it needs failed")
                log(f"  skipped  {s.kind:<6} {s.name}: a stage it needs failed")
            ready = sorted((s for s in pending if all(d in done for d in s.needs)), key=lambda s: -dependants[s.name])
            batch = []
            while ready and len(running) + len(batch) < workers:
                s = ready.pop(0)
                pending.remove(s)
                config_path = out / "configs" / f"{s.name}.yaml"
                with atomic_file(config_path) as f:
                    yaml.safe_dump(s.config, f, sort_keys=False)
                log_path = out / LOG_DIR / f"{s.name}.log"
                attempts[s.name] = attempts.get(s.name, 0) + 1
                if attempts[s.name] > 1 and log_path.exists():
                    log_path.replace(log_path.with_name(f"{log_path.name}.{attempts[s.name] - 1}"))
                batch.append((s, s.argv(config_path), stage_env(s), log_path))
            if batch:
                for (s, _argv, _env, log_path), job in zip(batch, launcher.start_many(batch)):
                    running.append(_Running(s, job, log_path))
                    state.set(s.name, "running", attempt=attempts[s.name], log=str(log_path), job=job_id(job))
                    log(f"  started  {s.kind:<6} {s.name} (log: {log_path}" +
                        (f", {job_id(job)}" if launcher.name != "local" else "") + ")")
            time.sleep(0.2)
            for r in list(running):
                result = launcher.poll(r.job)
                if result is None:
                    continue
                running.remove(r)
                code, cpu, error = result
                seconds = time.perf_counter() - r.start
                s = r.stage
                if code != 0 or not s.output.exists():
                    why = error or (f"exit code {code}" if code != 0 else f"no output {s.output}")
                    if attempts[s.name] <= retries:
                        log(f"  retry    {s.kind:<6} {s.name} after {_minutes(seconds)}: {why} (attempt "
                            f"{attempts[s.name]} of {retries + 1}; log kept as {r.log}.{attempts[s.name]})")
                        state.set(s.name, "pending", error=f"attempt {attempts[s.name]}: {why}")
                        pending.append(s)
                        continue
                    failed[s.name] = f"{why}; log: {r.log}"
                    state.set(s.name, "failed", error=why)
                    log(f"  FAILED   {s.kind:<6} {s.name} after {_minutes(seconds)}: {why}; see {r.log}")
                    continue
                done.add(s.name)
                state.set(s.name, "done", seconds=round(seconds, 1))
                timings[s.name] = {"seconds": round(seconds, 1), "cpu_seconds": None if cpu is None else round(cpu, 1),
                                   "reused": False, "kind": s.kind, "trains": s.trains, "seed": s.seed, "mu": s.mu,
                                   "replicate": s.replicate}
                save()
                log(f"  finished {s.kind:<6} {s.name} in {_minutes(seconds)} ({len(done)}/{total} done)")
            if running and time.perf_counter() - last_status >= status_every:
                last_status = time.perf_counter()
                parts = [f"{r.stage.name} {_progress(r.log) or '…'} {_minutes(time.perf_counter() - r.start)}"
                         for r in running]
                log(f"  running: {'; '.join(parts)} ({len(done)}/{total} done)")
    except BaseException:
        # A killed run takes its stages with it; their outputs were never written (they are atomic).
        launcher.cancel([r.job for r in running])
        for r in running:
            state.set(r.stage.name, "interrupted", error="the driver stopped while it ran")
        raise
    finally:
        state.finish()
    if failed:
        lines = "\n".join(f"  {name}: {why}" for name, why in failed.items())
        raise StageFailed(f"{len(failed)} stage(s) failed ({len(blocked)} not run because of them):\n{lines}")
    return timings


class StageConfigChanged(ValueError):
    """Finished stages whose recorded config differs from the planned one (reusing them would mislabel a run)."""


def check_reused_configs(stages: Sequence, out: Path) -> None:
    """Refuse to reuse a finished stage whose `<out>/configs/<name>.yaml` (the config it ran with) differs from the
    planned config: a demo re-run with another precision, iteration count or grid would otherwise report the old
    stages under the new settings. A finished stage without a recorded config is reused as before."""
    import yaml

    changed = []
    for s in stages:
        recorded = Path(out) / "configs" / f"{s.name}.yaml"
        if not s.output.exists() or not recorded.exists():
            continue
        try:
            before = yaml.safe_load(recorded.read_text())
        except (OSError, yaml.YAMLError):
            continue  # unreadable: the stage's output is what counts, as before configs were recorded
        # Through YAML both ways, so tuples and lists (or int and float spellings) compare as they are written.
        now = yaml.safe_load(yaml.safe_dump(s.config, sort_keys=False))
        diffs = _differences(before, now)
        if diffs:
            changed.append(f"{s.name} ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})")
    if changed:
        raise StageConfigChanged(
            f"{len(changed)} finished stage(s) in {out} ran with another config than planned now: "
            f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}; pass --force to rerun them, or choose "
            "another output folder")


def _differences(before, now, path: str = "") -> list[str]:
    """Dotted keys where two parsed configs differ, with both values ("a.b: 1 -> 2")."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in list(before) + [k for k in now if k not in before]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in now:
                out.append(f"{sub}: {before[key]!r} -> (absent)")
            elif key not in before:
                out.append(f"{sub}: (absent) -> {now[key]!r}")
            else:
                out += _differences(before[key], now[key], sub)
        return out
    return [] if before == now else [f"{path}: {before!r} -> {now!r}"]


def _dependant_counts(stages: Sequence) -> dict[str, int]:
    """{stage name: how many stages need it, directly or through others}."""
    children: dict[str, set[str]] = {s.name: set() for s in stages}
    for s in stages:
        for d in s.needs:
            children[d].add(s.name)

    def reach(name: str, seen: set[str]) -> set[str]:
        for child in children[name] - seen:
            seen.add(child)
            reach(child, seen)
        return seen

    return {name: len(reach(name, set())) for name in children}


def rs_command(*args: str) -> list[str]:
    """argv of an `rs` subcommand run with this interpreter."""
    return [sys.executable, "-m", "rs_lightning.cli", *args]
