"""The state file of a run (`<out>/state.json`) and the status table `rs run PLAN --status` prints.

The driver (`runner.run_stages`) rewrites the file atomically at every change: which stage is pending, running
(with its attempt, log and job: a pid, a SLURM job id, a Ray task), done, failed (with the reason), blocked by a
failed stage, or interrupted (the driver stopped while it ran). The status view reads it back; a stage whose
output exists is done whatever the file says (outputs are written atomically and are the ground truth), and a
"running" stage whose driver no longer runs on this host shows as interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from rs_lightning.soup.atomic import atomic_file

STATE_FILE = "state.json"


class RunState:
    """The driver's side: one record per stage, saved on every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def begin(cls, out: Path, stages, launcher: str) -> RunState:
        data = {"driver": {"pid": os.getpid(), "host": socket.gethostname(), "launcher": launcher,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None},
                "stages": {s.name: {"state": "pending", "kind": s.kind, "output": str(s.output),
                                    "needs": list(s.needs)} for s in stages}}
        state = cls(Path(out) / STATE_FILE, data)
        state.save()
        return state

    def set(self, name: str, state: str, **info) -> None:
        record = self.data["stages"][name]
        record.update(state=state, updated=time.strftime("%Y-%m-%d %H:%M:%S"), **info)
        if "error" not in info:
            record.pop("error", None)
        self.save()

    def finish(self) -> None:
        self.data["driver"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()

    def save(self) -> None:
        with atomic_file(self.path) as f:
            json.dump(self.data, f, indent=1)


def _driver_alive(driver: dict) -> bool:
    if driver.get("finished"):
        return False
    if driver.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked from here, trust the file
    try:
        os.kill(int(driver["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


def stage_status(stages, out: Path) -> list[dict]:
    """One row per stage: name, kind, state, detail (job, attempt, log path, or why it failed)."""
    path = Path(out) / STATE_FILE
    data = json.loads(path.read_text()) if path.exists() else {"driver": {"finished": "never"}, "stages": {}}
    alive = _driver_alive(data["driver"])
    rows = []
    for s in stages:
        record = data["stages"].get(s.name, {})
        state = record.get("state", "pending")
        log = record.get("log") or str(Path(out) / "logs" / f"{s.name}.log")
        if s.output.exists():
            state, detail = "done", str(s.output)
        elif state == "running" and not alive:
            state, detail = "interrupted", f"the driver stopped while it ran; log: {log}"
        elif state == "running":
            detail = f"{record.get('job', '')}, attempt {record.get('attempt', 1)}; log: {log}"
        elif state in ("failed", "interrupted"):
            detail = f"{record.get('error', '')}; log: {log}"
        elif state == "blocked":
            detail = record.get("error", "a stage it needs failed")
        else:
            state = "pending" if state in ("pending", "done") else state
            detail = "waits for " + ", ".join(s.needs) if s.needs else ""
        rows.append({"name": s.name, "kind": s.kind, "state": state, "detail": detail})
    return rows


def format_status(rows: list[dict], out: Path) -> str:
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'kind':<6}  {'state':<11}  detail"]
    lines += [f"{r['name']:<{width}}  {r['kind']:<6}  {r['state']:<11}  {r['detail']}" for r in rows]
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return "\n".join(lines) + f"\n{len(rows)} stages under {out}: {summary}"
