# ruff: noqa: E501  (the case table reads best one case per line)
"""Bad inputs to `rs fit` (LightningCLI) and `rs demo`: one line naming the key or value, exit 2, no traceback, no
usage dump, nothing written, and found before any training starts (harness: tests/front_cases.py).

`rs fit` cases run in this process (they fail while parsing or building the model, in well under a second).
`rs demo` cases run as real processes with a 60 s limit: a demo that starts its stages on a bad input is still
running when the limit strikes, and the case counts as a silent acceptance (the whole process group is killed).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_cases import QUAD, classify, cleanup, lock_holder, read_only_dir, run_subprocess  # noqa: E402

DEMO = ["demo", "--quick", "--task", "captioning"]
demo_runner = functools.partial(run_subprocess, timeout=60)


def fit_config(d: Path, text: str | None = None) -> Path:
    """d/fit.yaml: the quadratic toy's model, data and trainer (one epoch, logs under d), or `text`."""
    path = d / "fit.yaml"
    if text is None:
        cfg = {k: v for k, v in yaml.safe_load(QUAD.read_text()).items() if k != "front"}
        cfg["trainer"].update(max_epochs=1, default_root_dir=str(d / "logs"), enable_progress_bar=False)
        text = yaml.safe_dump(cfg)
    path.write_text(text)
    return path


def fit(d, *extra):
    return ["fit", "--config", fit_config(d), *extra]


FIT_CASES = {
    "unknown model argument": (lambda d, mp: fit(d, "--model.init_args.nonsense", "1"), 2, r"model.*'nonsense'"),
    "unknown trainer argument": (lambda d, mp: fit(d, "--trainer.nonsense", "1"), 2, r"trainer.nonsense|nonsense"),
    "trainer value of the wrong type": (lambda d, mp: fit(d, "--trainer.max_epochs", "x"), 2, r"trainer.max_epochs.*'x'"),
    "unknown model class": (lambda d, mp: fit(d, "--model.class_path", "no.such.Model"), 2, r"no.such.Model"),
    "config file missing": (lambda d, mp: ["fit", "--config", d / "nope.yaml"], 2, r"nope.yaml"),
    "config not YAML": (lambda d, mp: ["fit", "--config", fit_config(d, "model: [")], 2, r"fit.yaml"),
    "init_args the model refuses": (lambda d, mp: fit(d, "--model.init_args.hessians", "[[1.0]]"), 2, r"model.*curvatures must be"),
    "no model": (lambda d, mp: ["fit", "--trainer.max_epochs", "1"], 2, r"model"),
    "unknown top-level option": (lambda d, mp: fit(d, "--nonsense", "1"), 2, r"nonsense"),
}


def _demo_in_use(d, mp):
    pid = lock_holder(d / "demo" / "captioning-quick", what="demo folder")
    return [*DEMO, "--out", d / "demo"], rf"demo folder .*captioning-quick is in use by pid {pid}"


DEMO_CASES = {
    "--points 0": (lambda d, mp: [*DEMO, "--points", "0", "--out", d / "demo"], 2, r"--points must be >= 2, got 0"),
    "--replicates 0": (lambda d, mp: [*DEMO, "--replicates", "0", "--out", d / "demo"], 2, r"--replicates must be >= 1, got 0"),
    "--threads 0": (lambda d, mp: [*DEMO, "--threads", "0", "--out", d / "demo"], 2, r"--threads must be >= 1, got 0"),
    "--points not a number": (lambda d, mp: [*DEMO, "--points", "x", "--out", d / "demo"], 2, r"--points.*'x'"),
    "unknown --task": (lambda d, mp: ["demo", "--task", "vision", "--out", d / "demo"], 2, r"--task.*'vision'"),
    "--out is a file": (lambda d, mp: [*DEMO, "--out", (d / "f").write_text("x") and d / "f"], 2, r"--out .*f (is a file|exists and is not a folder)"),
    "--out under a file": (lambda d, mp: [*DEMO, "--out", (d / "f").write_text("x") and d / "f" / "demo"], 2, r"--out .*f is a file"),
    "--out read-only": (lambda d, mp: [*DEMO, "--out", read_only_dir(d) / "demo"], 2, r"--out .*cannot write in .*ro \((read-only filesystem|permission denied)\)"),
    "demo folder in use": (_demo_in_use, 2, None),
}


@pytest.mark.parametrize("name", list(FIT_CASES))
def test_fit_bad_input(name, tmp_path, monkeypatch):
    try:
        category, detail = classify(FIT_CASES[name], tmp_path.resolve(), monkeypatch)
    finally:
        cleanup()
    assert category == "clean", f"{name}: {category}: {detail}"


@pytest.mark.parametrize("name", list(DEMO_CASES))
def test_demo_bad_input_fails_before_any_stage(name, tmp_path, monkeypatch):
    try:
        category, detail = classify(DEMO_CASES[name], tmp_path.resolve(), monkeypatch, runner=demo_runner)
    finally:
        cleanup()
    assert category == "clean", f"{name}: {category}: {detail}"
