"""Where a stage's process runs: here (a process pool), on a SLURM cluster (submitit), or on a Ray cluster.

    launcher = make_launcher("slurm", out, partition="gpu")     # or "local", "ray"
    job = launcher.start(stage, argv, env, log_path)
    launcher.poll(job)   # None while it runs, then (exit code, CPU seconds or None, error text or None)

A launcher only starts, watches and cancels commands: the order, the reuse of finished stages, the retries and the
state file are `runner.run_stages`'s, the same for every launcher. A stage is a command line (`rs fit --config
...`) whose output path marks it finished, so a job needs nothing from the driver but its argv, its environment and
a log file; on a cluster the run folder (`--out`), the configs it names and this Python must be on a file system
every node sees (the usual shared home or scratch).

- local: `subprocess.Popen` per stage, `OMP_NUM_THREADS` threads each; the child gets SIGTERM if the driver dies.
- slurm: `submitit.AutoExecutor` per stage (submitit: https://github.com/facebookincubator/submitit). A stage's
  `resources` (gpus, nodes, cpus, mem_gb, time_min) become sbatch options; a multi-GPU stage gets one task per GPU,
  and each task runs the stage's command with the SLURM variables srun set, which Lightning's SLURMEnvironment
  reads (global rank, world size, master address): the trainer config must ask for the same devices x num_nodes
  (plans set them from `resources`). Stages that become ready together with the same resources go as one array
  job. `cluster="local"` swaps in submitit's LocalExecutor, which runs the same submission code as local
  processes (what the tests use).
- ray: a Ray task per stage with its `num_cpus`/`num_gpus`, on `ray.init(address)` (None: a local instance).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

RESOURCE_KEYS = ("cpus", "gpus", "nodes", "mem_gb", "time_min")


def die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, even of SIGKILL, so a killed
    driver (or job wrapper) leaves no orphan training behind (elsewhere this is a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StageJob:
    """The picklable callable a cluster job runs: the stage's command, its output to the stage's log.

    In a multi-task job (one task per GPU) every task runs it; task 0 writes `log`, task k `log.rank<k>`.
    Returns the command's exit code (the driver decides what a failure means)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: str, cwd: str):
        self.argv, self.env, self.log, self.cwd = list(argv), dict(env), log, cwd

    def __call__(self) -> int:
        # The task's global rank: srun's under SLURM, submitit's own variable under its local executor.
        rank = int(os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0")))
        log = self.log if rank == 0 else f"{self.log}.rank{rank}"
        with open(log, "ab") as handle:
            handle.write(("$ " + " ".join(self.argv) + "\n").encode())
            handle.flush()
            proc = subprocess.run(self.argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, **self.env}, cwd=self.cwd, preexec_fn=die_with_parent,
                                  check=False)
        return proc.returncode


class LocalLauncher:
    """Each stage a child process of the driver (the demo's process pool)."""

    name = "local"
    parallel_limit = True  # `workers` stages at once: they share this machine's cores

    class Job:
        def __init__(self, proc: subprocess.Popen, handle):
            self.proc, self.handle = proc, handle

        @property
        def id(self) -> str:
            return f"pid {self.proc.pid}"

    def start(self, stage, argv: list[str], env: dict[str, str], log: Path) -> Job:
        handle = open(log, "wb")
        handle.write(("$ " + " ".join(argv) + "\n").encode())
        handle.flush()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        return self.Job(proc, handle)

    def start_many(self, items: list[tuple]) -> list[Job]:
        return [self.start(*item) for item in items]

    def poll(self, job: Job) -> tuple[int, float | None, str | None] | None:
        pid, status, usage = os.wait4(job.proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        job.proc.returncode = os.waitstatus_to_exitcode(status)
        job.handle.close()
        return job.proc.returncode, usage.ru_utime + usage.ru_stime, None

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.proc.terminate()
        for job in jobs:
            try:
                job.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.handle.close()

    def close(self) -> None:
        pass


def _slurm_parameters(resources: dict, defaults: dict, local: bool) -> dict:
    """submitit executor parameters for a stage's resources (plan keys -> submitit's names)."""
    r = {**defaults, **(resources or {})}
    gpus, nodes = int(r.get("gpus", 0) or 0), int(r.get("nodes", 1) or 1)
    params = {"timeout_min": int(r.get("time_min", 60)), "gpus_per_node": gpus,
              "tasks_per_node": max(1, gpus), "cpus_per_task": int(r.get("cpus", 1) or 1)}
    if local:
        if nodes != 1:
            raise ValueError(f"submitit's local executor runs one node, got nodes: {nodes}")
        return params
    params["nodes"] = nodes
    if r.get("mem_gb"):
        params["mem_gb"] = r["mem_gb"]
    return params


class SubmititLauncher:
    """Each stage a SLURM job through submitit (or submitit's local executor with cluster="local").

    Args:
        folder: where submitit keeps its pickles and job logs (the plan's `<out>/submitit`).
        cluster: "slurm", "local" (the local executor: tests), or None (submitit picks: slurm where sbatch exists).
        slurm: extra executor parameters for every stage, with or without submitit's "slurm_" prefix
            (partition, account, qos, constraint, array_parallelism, additional_parameters, setup, ...).
        defaults: resources of a stage that gives none.
    """

    name = "slurm"
    parallel_limit = False  # the scheduler queues; `workers` only caps what is submitted at once

    def __init__(self, folder: Path, cluster: str | None = None, slurm: dict | None = None,
                 defaults: dict | None = None):
        try:
            import submitit
        except ImportError as err:
            raise RuntimeError("--launcher slurm needs submitit: pip install submitit") from err
        self.submitit, self.folder, self.cluster = submitit, Path(folder), cluster
        self.slurm, self.defaults = dict(slurm or {}), dict(defaults or {})

    def _executor(self, name: str, resources: dict):
        executor = self.submitit.AutoExecutor(folder=self.folder / name, cluster=self.cluster)
        local = executor.cluster != "slurm"
        params = _slurm_parameters(resources, self.defaults, local)
        params["name"] = name
        if not local:
            params.update({k if k.startswith("slurm_") else f"slurm_{k}": v for k, v in self.slurm.items()})
        executor.update_parameters(**params)
        return executor

    def start_many(self, items: list[tuple]) -> list:
        """Submit ready stages; those with the same kind and resources go as one array job (`executor.batch()`)."""
        groups: dict[tuple, list[int]] = {}
        for i, (stage, *_rest) in enumerate(items):
            key = (stage.kind, tuple(sorted((getattr(stage, "resources", None) or {}).items())))
            groups.setdefault(key, []).append(i)
        jobs: list = [None] * len(items)
        for (kind, _), indices in groups.items():
            stage0 = items[indices[0]][0]
            name = stage0.name if len(indices) == 1 else f"{kind}-array-{time.strftime('%H%M%S')}-{indices[0]}"
            executor = self._executor(name, getattr(stage0, "resources", None) or {})
            calls = [StageJob(argv, env, str(log), os.getcwd()) for _stage, argv, env, log in
                     (items[i] for i in indices)]
            if len(calls) == 1:
                jobs[indices[0]] = executor.submit(calls[0])
            else:
                with executor.batch():
                    submitted = [executor.submit(call) for call in calls]
                for i, job in zip(indices, submitted):
                    jobs[i] = job
        return jobs

    def start(self, stage, argv, env, log):
        return self.start_many([(stage, argv, env, log)])[0]

    def poll(self, job) -> tuple[int, float | None, str | None] | None:
        if not job.done():
            return None
        try:
            codes = job.results()  # one per task
        except Exception as err:  # noqa: BLE001 - a job that died (timeout, preemption, node failure) is a failure
            return -1, None, f"job {job.job_id} {job.state}: {str(err).strip().splitlines()[-1][:300]}"
        return max(int(c) for c in codes), None, None

    def cancel(self, jobs: list) -> None:
        for job in jobs:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def close(self) -> None:
        pass


class RayLauncher:
    """Each stage a Ray task with the stage's CPUs and GPUs, on the cluster at `address` (None: start a local one).

    Args:
        address: a running cluster ("auto", "ray://host:10001") or None for a local instance of this machine.
        num_cpus: CPUs of a local instance (default: all).
        defaults: resources of a stage that gives none.
    """

    name = "ray"
    parallel_limit = False

    def __init__(self, address: str | None = None, num_cpus: int | None = None, defaults: dict | None = None):
        try:
            import ray
        except ImportError as err:
            raise RuntimeError("--launcher ray needs ray: pip install 'ray[default]'") from err
        self.ray, self.defaults = ray, dict(defaults or {})
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
            ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
        self.remote = ray.remote(max_retries=0)(_ray_stage)

    class Job:
        def __init__(self, ref, name: str):
            self.ref, self.name = ref, name

        @property
        def id(self) -> str:
            return f"ray task {self.ref.task_id().hex()[:12]}"

    def start(self, stage, argv, env, log):
        r = {**self.defaults, **(getattr(stage, "resources", None) or {})}
        ref = self.remote.options(num_cpus=float(r.get("cpus", 1) or 1), num_gpus=float(r.get("gpus", 0) or 0),
                                  name=stage.name).remote(StageJob(argv, env, str(log), os.getcwd()))
        return self.Job(ref, stage.name)

    def start_many(self, items):
        return [self.start(*item) for item in items]

    def poll(self, job) -> tuple[int, float | None, str | None] | None:
        ready, _ = self.ray.wait([job.ref], timeout=0)
        if not ready:
            return None
        try:
            return int(self.ray.get(job.ref)), None, None
        except Exception as err:  # noqa: BLE001 - a task that died (worker crash, cancel) is a failure
            return -1, None, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"

    def cancel(self, jobs) -> None:
        for job in jobs:
            try:
                self.ray.cancel(job.ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _ray_stage(job: StageJob) -> int:
    return job()


def job_id(job) -> str:
    """A human handle of a job for the state file and `rs run --status` (pid, SLURM job id, Ray task)."""
    if hasattr(job, "job_id"):  # a submitit job: SLURM's job id, or the pid under the local executor
        return f"{'slurm' if type(job).__name__.startswith('Slurm') else 'submitit local'} job {job.job_id}"
    return getattr(job, "id", "?")


LAUNCHERS = ("local", "slurm", "ray")


def make_launcher(kind: str, out: Path, *, slurm: dict | None = None, ray: dict | None = None,
                  defaults: dict | None = None, cluster: str | None = None):
    """The launcher named `kind` (one of LAUNCHERS) for a run under `out`."""
    if kind == "local":
        return LocalLauncher()
    if kind == "slurm":
        return SubmititLauncher(Path(out) / "submitit", cluster=cluster, slurm=slurm, defaults=defaults)
    if kind == "ray":
        ray = dict(ray or {})
        return RayLauncher(address=ray.pop("address", None), num_cpus=ray.pop("num_cpus", None), defaults=defaults)
    raise ValueError(f"unknown launcher {kind!r}: choose one of {', '.join(LAUNCHERS)}")
