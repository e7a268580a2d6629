# ruff: noqa: E501  (the case table reads best one case per line)
"""Bad inputs to `rs front`, `rs front select` and `rs front report`: each one is a clean, one-line error, found
before the sweep, and leaves the folder as it was (harness: tests/front_cases.py; `rs fit` / `rs demo` cases are in
test_bad_inputs_fit_demo.py).

Every case asserts the exit code (2 for what the user can fix, 1 when the machine failed a write), one line on
stderr "rs front...: error: ..." naming the problem (the key, file or value), no traceback, and no file written,
changed or left behind (no run folder, run.json, front.jsonl, lock file or temporary).

`python tests/test_bad_inputs_front.py` prints the tally (tried, clean, tracebacks, silent acceptances, unclear
messages, leftovers) of these and the `rs fit` / `rs demo` cases instead of asserting, e.g. to measure an older
version of the package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_cases import (  # noqa: E402
    classify,
    cleanup,
    disk_full,
    finished_run,
    front_args,
    lock_holder,
    read_only_dir,
)  # noqa: E402

SELECT = ["front", "select", "--preference", "0.5", "0.5"]


def _in_use(d, mp):
    args = front_args(d)
    return args, rf"run folder .*run is in use by pid {lock_holder(d / 'run')}"


def _disk_full(d, mp):
    """The disk is full when the sweep first writes into the run folder: exit 1, nothing of the run is left."""
    args = front_args(d)
    disk_full(mp, d / "run")
    return args


def _row(d, text, *, run=True):
    """A run folder (a finished one, or a fresh config's out_dir) whose front.jsonl is `text`."""
    if run:
        finished_run(d)
    else:
        (d / "run").mkdir()
    (d / "run" / "front.jsonl").write_text(text)
    return d / "run"


def _run_json(d, text):
    run = finished_run(d)
    (run / "run.json").write_text(text)
    return run


def _settings(d, **settings):
    run = finished_run(d)
    info = json.loads((run / "run.json").read_text())
    info["summary_settings"].update(settings)
    (run / "run.json").write_text(json.dumps(info))
    return run


def _report_read_only(d, mp):
    # A finished run the user may read but not write: report cannot write summary.json.
    return ["front", "report", read_only_dir(d, fill=finished_run(d)) / "run"]


def _report_disk_full(d, mp):
    run = finished_run(d)
    disk_full(mp, run)
    return ["front", "report", run]


def _nan_expert(d, mp):
    import torch
    from safetensors.torch import save_file

    args = front_args(d)
    save_file({"theta": torch.tensor([float("nan"), 0.0])}, str(d / "ckpt" / "e2.safetensors"))
    return args


FRONT_CASES = {
    # configuration that only the end of the sweep used to check
    "negative preference": (lambda d, mp: front_args(d, "--front.summary.preferences", "[[-1, 2]]"), 2, r"front.summary.preferences\[0\] .*-1"),
    "all-zero preference": (lambda d, mp: front_args(d, "--front.summary.preferences", "[[0, 0]]"), 2, r"front.summary.preferences\[0\] .*all zero"),
    "preference longer than the logged rewards": (lambda d, mp: front_args(d, "--front.summary.rewards", "null", "--front.summary.ideal", "null", "--front.summary.nadir", "null", "--front.summary.preferences", "[[0.2, 0.3, 0.5]]"), 2, r"front.summary.preferences\[0\] has 3 values .* 2 rewards"),
    "reward that is not logged": (lambda d, mp: front_args(d, "--front.summary.rewards", "[r1, r3]"), 2, r"front.summary.rewards: 'r3' is not logged .*logs .*r1, r2"),
    "MORL mu of the wrong length": (lambda d, mp: front_args(d, morl=[{"path": str(d / "ckpt" / "m0.safetensors"), "mu": [0.3, 0.3, 0.4]}]), 2, r"front.morl\[0\].*mu has 3 values .*2 rewards"),
    "negative MORL mu": (lambda d, mp: front_args(d, morl=[{"path": str(d / "ckpt" / "m0.safetensors"), "mu": [-0.5, 1.5]}]), 2, r"front.morl\[0\].*mu .*-0.5"),
    "MORL without mu": (lambda d, mp: front_args(d, morl=[{"path": str(d / "ckpt" / "m0.safetensors")}]), 2, r"needs `mu`"),
    "NaN in an expert": (_nan_expert, 2, r"key 'theta' of .*e2.safetensors.* non-finite .*front.allow_nonfinite"),
    "init_args the model refuses": (lambda d, mp: front_args(d, "--model.init_args.hessians", "[[1.0]]"), 2, r"model.*curvatures must be"),
    "unknown config key": (lambda d, mp: front_args(d, "--front.nonsense", "1"), 2, r"nonsense"),
    "unknown model class": (lambda d, mp: front_args(d, "--model.class_path", "no.such.Model"), 2, r"no.such.Model"),
    "config file missing": (lambda d, mp: ["front", "--config", d / "nope.yaml"], 2, r"nope.yaml"),
    "bad nadir_from": (lambda d, mp: front_args(d, "--front.summary.nadir_from", "best"), 2, r"nadir_from"),
    "empty grid": (lambda d, mp: front_args(d, "--front.grid.points", "0"), 2, r"grid is empty"),
    "negative n_boot": (lambda d, mp: front_args(d, "--front.summary.n_boot", "-1"), 2, r"summary.n_boot must be"),
    "missing expert file": (lambda d, mp: front_args(d, experts=[str(d / "ckpt" / "e1.safetensors"), str(d / "nope.safetensors")]), 2, r"nope.safetensors"),
    # the run folder
    "out_dir is a file": (lambda d, mp: front_args(d, out_dir=str((d / "f").write_text("x") and d / "f")), 2, r"front.out_dir .*f exists and is not a folder"),
    "out_dir under a file": (lambda d, mp: front_args(d, out_dir=str((d / "f").write_text("x") and d / "f" / "run")), 2, r"front.out_dir .*f is a file"),
    "out_dir read-only": (lambda d, mp: front_args(d, out_dir=str(read_only_dir(d) / "run")), 2, r"front.out_dir .*cannot write in .*ro \((read-only filesystem|permission denied)\)"),
    "run folder in use": (_in_use, 2, None),
    "empty row in the folder to resume": (lambda d, mp: (_row(d, "{}\n", run=False), front_args(d))[1], 2, r"front.jsonl:1: .*'kind'"),
    "disk full at the first write": (_disk_full, 1, r"(run|front)\.json.*No space left on device"),
    # rs front select
    "select: no such run folder": (lambda d, mp: [*SELECT, d / "nope"], 2, r"nope:? .*(no such|has no front.jsonl)"),
    "select: run folder is a file": (lambda d, mp: [*SELECT, (d / "f").write_text("x") and d / "f"], 2, r"f is not a folder"),
    "select: empty row": (lambda d, mp: [*SELECT, _row(d, '{}\n')], 2, r"front.jsonl:1: .*'kind'"),
    "select: row of unknown kind": (lambda d, mp: [*SELECT, _row(d, json.dumps({"kind": "best", "name": "x", "weights": None, "rewards": {}}) + "\n")], 2, r"front.jsonl:1: .*kind 'best'"),
    "select: weights not a list": (lambda d, mp: [*SELECT, _row(d, json.dumps({"kind": "soup", "name": "x", "weights": "half", "rewards": {"r1": 1}}) + "\n")], 2, r"front.jsonl:1: .*weights"),
    "select: corrupt run.json": (lambda d, mp: [*SELECT, _run_json(d, "{not json")], 2, r"run.json is not valid JSON"),
    "select: run.json a list": (lambda d, mp: [*SELECT, _run_json(d, "[]")], 2, r"run.json must hold a JSON object"),
    "select: unknown summary setting in run.json": (lambda d, mp: [*SELECT, _settings(d, nonsense=1)], 2, r"run.json.*summary_settings.*nonsense"),
    "select: negative preference": (lambda d, mp: ["front", "select", "--preference", "-1", "2", finished_run(d)], 2, r"preference .*-1"),
    "select: NaN preference": (lambda d, mp: ["front", "select", "--preference", "nan", "1", finished_run(d)], 2, r"preference .*nan"),
    "select: wrong number of values": (lambda d, mp: ["front", "select", "--preference", "1", finished_run(d)], 2, r"one per reward"),
    "select: --write-soup under a file": (lambda d, mp: [*SELECT, finished_run(d), "--write-soup", d / "run" / "front.jsonl" / "soup"], 2, r"--write-soup .*front.jsonl is a file"),
    "select: --write-soup exists": (lambda d, mp: [*SELECT, finished_run(d), "--write-soup", d / "run"], 2, r"--write-soup .*run.* (exists|contains)"),
    "select: no run folder given": (lambda d, mp: SELECT, 2, r"RUN_DIR"),
    # rs front report
    "report: no such run folder": (lambda d, mp: ["front", "report", d / "nope"], 2, r"nope:? .*(no such|has no front.jsonl)"),
    "report: empty row": (lambda d, mp: ["front", "report", _row(d, "{}\n")], 2, r"front.jsonl:1: .*'kind'"),
    "report: corrupt run.json": (lambda d, mp: ["front", "report", _run_json(d, "{not json")], 2, r"run.json is not valid JSON"),
    "report: bad summary setting in run.json": (lambda d, mp: ["front", "report", _settings(d, level=2)], 2, r"run.json.*summary.level must be in \(0, 1\)"),
    "report: read-only run folder": (_report_read_only, 2, r"cannot write in .*ro/run \((read-only filesystem|permission denied)\)"),
    "report: disk full": (_report_disk_full, 1, r"run/(summary\.json|front\.png).*No space left on device"),
    "report: run folder in use": (lambda d, mp: (["front", "report", finished_run(d)], rf"in use by pid {lock_holder(d / 'run')}"), 2, None),
}


@pytest.mark.parametrize("name", list(FRONT_CASES))
def test_front_bad_input(name, tmp_path, monkeypatch):
    try:
        category, detail = classify(FRONT_CASES[name], tmp_path.resolve(), monkeypatch)
    finally:
        cleanup()
    assert category == "clean", f"{name}: {category}: {detail}"


def test_cases_count():
    from test_bad_inputs_fit_demo import DEMO_CASES, FIT_CASES

    assert len(FRONT_CASES) + len(FIT_CASES) + len(DEMO_CASES) >= 30


if __name__ == "__main__":
    from front_cases import run_in_process, tally
    from test_bad_inputs_fit_demo import DEMO_CASES, FIT_CASES, demo_runner

    only = set(sys.argv[1:])
    tables = [("front", FRONT_CASES, run_in_process), ("fit", FIT_CASES, run_in_process), ("demo", DEMO_CASES, demo_runner)]
    tally([t for t in tables if not only or t[0] in only])
