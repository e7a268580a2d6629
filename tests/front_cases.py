"""Builders and the harness shared by the bad-input tests of `rs front`, `rs front select|report`, `rs fit`, `rs demo`.

Not a test module (no `test_` prefix): imported by test_bad_inputs_front.py, test_bad_inputs_fit_demo.py and
test_front_safety.py. A case runs in its own folder `d` (the current folder while it runs) and is judged like the
`rs soup` cases (tests/test_bad_inputs_soup.py): exit code, ONE line on stderr "rs <command>: error: ..." matching
a regex that names the problem, no traceback, and the folder byte-for-byte as it was (nothing written or left).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_cases import REPO, mounted_tmpfs, snapshot  # noqa: E402
from soup_cases import lock_holder as _lock_holder  # noqa: E402

QUAD = REPO / "configs" / "front" / "quadratic.yaml"
ONE_LINE = re.compile(r"^rs [a-z ]+: error: ")
CLEANUPS: list[contextlib.ExitStack] = []


def toy_config(d: Path, **front) -> Path:
    """d/front.yaml: the quadratic toy with its closed-form checkpoints in d/ckpt, 5 lam values, out_dir d/run.

    `front` overrides keys of the `front:` section (e.g. morl=[...], out_dir="x")."""
    from rs_lightning.tasks.toy import quadratic

    cfg = yaml.safe_load(QUAD.read_text())
    ck = d / "ckpt"
    mus = [[0.8, 0.2], [0.2, 0.8]]
    section = {
        "experts": [{"path": str(ck / f"e{i}.safetensors"), "name": f"r{i}"} for i in (1, 2)],
        "init": {"path": str(ck / "init.safetensors"), "name": "init"},
        "morl": [{"path": str(ck / f"m{i}.safetensors"), "mu": mu} for i, mu in enumerate(mus)],
        "grid": {"kind": "sweep", "points": 5},
        "out_dir": str(d / "run"),
        "summary": {**cfg["front"]["summary"], "preferences": [[0.5, 0.5]], "n_boot": 20},
    }
    module = quadratic.QuadraticRewards(**cfg["model"]["init_args"])
    quadratic.write_checkpoints(module, [e["path"] for e in section["experts"]], section["init"]["path"],
                                [(m["path"], m["mu"]) for m in section["morl"]])
    section.update(front)
    cfg["front"] = section
    path = d / "front.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def front_args(d: Path, *extra, **front) -> list:
    return ["front", "--config", toy_config(d, **front), "--no-progress", *extra]


_FINISHED: dict[str, Path] = {}


def finished_run(d: Path) -> Path:
    """A copy of a finished toy run (rows with val rewards, run.json, summary.json) at d/run; built once per process."""
    if "run" not in _FINISHED:
        from rs_lightning import cli

        cache = Path(tempfile.mkdtemp(prefix="front-run-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["front", "--config", str(toy_config(cache)), "--no-progress"]) == 0
        _FINISHED["run"] = cache / "run"
    shutil.copytree(_FINISHED["run"], d / "run")
    return d / "run"


def lock_holder(path: Path, what: str = "run folder") -> int:
    """Another process holding the write lock of `path` until the case ends; returns its pid."""
    return _lock_holder(path, CLEANUPS, what)


def read_only_dir(d: Path, fill: Path | None = None) -> Path:
    """d/ro, a folder nothing can be written in (holding a copy of `fill` when given): a tmpfs remounted read-only
    as root (root ignores permissions), else mode 555."""
    import pytest

    ro = d / "ro"
    stack = contextlib.ExitStack()
    CLEANUPS.append(stack)
    if os.geteuid() == 0:
        if not stack.enter_context(mounted_tmpfs(ro, "size=1m")):
            pytest.skip("a read-only location needs a tmpfs mount as root")
        if fill is not None:
            shutil.copytree(fill, ro / fill.name)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    else:
        ro.mkdir()
        if fill is not None:
            shutil.copytree(fill, ro / fill.name)
            (ro / fill.name).chmod(0o555)
            stack.callback((ro / fill.name).chmod, 0o755)
        ro.chmod(0o555)
        stack.callback(ro.chmod, 0o755)
    return ro


def disk_full(mp, under: Path, name: str = "") -> None:
    """Simulate a full disk for files under `under` (whose name contains `name`): their fsync fails with ENOSPC,
    as on a filesystem that accepts the write into the page cache and reports the missing space on the flush."""
    import errno

    real = os.fsync
    under = str(under)

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(under) and name in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    mp.setattr(os, "fsync", fsync)


def run_in_process(argv) -> tuple[int | None, str, str, BaseException | None]:
    """`rs ARGV` through rs_lightning.cli.main in this process: (exit code, stdout, stderr, escaped exception)."""
    from rs_lightning import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    code, exc = None, None
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse / jsonargparse exit: a message, not a traceback
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as err:  # noqa: BLE001 - a traceback is what this harness counts
            exc = err
    return code, stdout.getvalue(), stderr.getvalue(), exc


def run_subprocess(argv, cwd: Path, timeout: float) -> tuple[int | None, str, str, BaseException | None]:
    """`rs ARGV` as a real process; a timeout counts as work started on a bad input (the process is killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rs_lightning.cli", *map(str, argv)]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        return None, out, err, TimeoutError(f"still running after {timeout:g} s (it started the work)")
    exc = RuntimeError(err.strip().splitlines()[-1]) if "Traceback (most recent call last)" in err else None
    return proc.returncode, out, err, exc


def classify(case: tuple, d: Path, mp, *, runner=run_in_process) -> tuple[str, str]:
    """Run one case (builder(d, mp) -> argv [or (argv, regex)], exit code, regex) in folder d: (category, detail).

    Categories: clean, traceback, silent (exit 0 or still running: the bad input was accepted), leftover
    (a file written, changed or removed), unclear (wrong exit code, several lines, or the problem not named)."""
    builder, code, regex = case
    mp.chdir(d)
    built = builder(d, mp)
    argv, regex = built if isinstance(built, tuple) else (built, regex)
    before = snapshot(d)
    got, _, err, exc = runner(argv) if runner is run_in_process else runner(argv, d)
    after = snapshot(d)
    changed = sorted({c[0] for c in set(after.items()) ^ set(before.items())})
    left = f" [+leftover: {changed[:3]}]" if changed else ""
    lines = [line for line in err.splitlines() if line.strip()]
    if isinstance(exc, TimeoutError) or got == 0:
        return "silent", f"{exc or 'exit 0'}{left}"
    if exc is not None:
        return "traceback", f"{type(exc).__name__}: {str(exc)[:200]}{left}"
    if left:
        return "leftover", left
    one_line = len(lines) == 1 and ONE_LINE.match(lines[0]) and "Traceback" not in err
    if got != code or not one_line or not re.search(regex, lines[0]):
        return "unclear", f"exit {got}: {err.strip()[-400:]}"
    return "clean", lines[0]


def cleanup() -> None:
    while CLEANUPS:
        CLEANUPS.pop().close()


def tally(tables: list[tuple[str, dict, object]]) -> None:
    """Print tried / clean / tracebacks / silent / unclear / leftovers over case tables [(label, cases, runner)]."""
    import pytest

    results: dict[str, list[str]] = {}
    for label, cases, runner in tables:
        for name, case in cases.items():
            with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
                try:
                    category, detail = classify(case, Path(tmp).resolve(), mp, runner=runner)
                except pytest.skip.Exception as skip:
                    category, detail = "skipped", str(skip)
                except Exception as err:  # noqa: BLE001 - the setup itself failed (e.g. an older package)
                    category, detail = "case not applicable", f"{type(err).__name__}: {err}"
                finally:
                    cleanup()
            results.setdefault(category, []).append(f"{label} | {name}: {detail[:160]}")
    print(f"tried {sum(map(len, results.values()))}: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(results.items()))
          + f"; cases that left files: {sum('leftover' in i for v in results.values() for i in v)}")
    for category, items in sorted(results.items()):
        if category != "clean":
            print(f"\n{category}:\n  " + "\n  ".join(items))
