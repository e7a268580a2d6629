"""Outputs of `rs soup` (issue 11): one writer per output, and killed runs leave nothing a rerun does not clean.

- `output_lock`: a second process is refused with the holder's pid; re-entrant; killed holders free it;
- stale temporaries of a killed writer are removed (and said so), an interrupted replacement rolled back;
  `--out .` and 250-character names work;
- `rs soup` SIGKILLed at several moments: the output is absent or complete, never partial; a rerun succeeds
  and leaves no temporary or lock file; SIGTERM removes the temporary on the way out.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_cases import REPO, hf_folder, rs_subprocess, st_file, state  # noqa: E402

from rs_lightning import cli  # noqa: E402
from rs_lightning.soup.atomic import atomic_dir, clean_stale  # noqa: E402
from rs_lightning.soup.lock import OutputInUse, lock_file, output_lock  # noqa: E402


def rs(*args) -> int:
    return cli.main(["soup", *map(str, args)])


# --- one writer per output ------------------------------------------------------------------------------

HOLD = """
import sys
from rs_lightning.soup.lock import output_lock
with output_lock(sys.argv[1], what="run folder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_output_lock_between_two_processes(tmp_path):
    out = tmp_path / "deep" / "run"
    holder = _holder(out)
    try:
        with pytest.raises(OutputInUse, match=rf"run folder .*run is in use by pid {holder.pid}") as err:
            with output_lock(out, what="run folder"):
                pass
        assert err.value.pid == holder.pid
        a, b = hf_folder(tmp_path / "a", state(0)), hf_folder(tmp_path / "b", state(1))
        assert rs(a, b, "--weights", 0.5, 0.5, "--out", out) == 2 and not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert not lock_file(out).exists()  # released and removed
    with output_lock(out):
        with output_lock(out):  # re-entrant in one thread
            assert lock_file(out).read_text().strip() == str(os.getpid())
    assert not lock_file(out).exists()


def test_a_killed_holder_frees_the_lock(tmp_path):
    holder = _holder(tmp_path / "run")
    holder.kill()
    holder.wait(30)
    with output_lock(tmp_path / "run"):  # the kernel dropped the flock; the stale file is reused
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_another_thread_is_refused(tmp_path):
    errors = []
    with output_lock(tmp_path / "run"):
        def other():
            try:
                with output_lock(tmp_path / "run"):
                    pass
            except OutputInUse as err:
                errors.append(str(err))
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert errors and "another thread of this process" in errors[0]


def test_failed_lock_removes_the_folders_it_created(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "x" / "y" / "run"):
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


# --- stale temporaries, interrupted replacements, "--out ." -----------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_cleaned_and_reported(tmp_path, capsys):
    a, b = hf_folder(tmp_path / "a", state(0)), hf_folder(tmp_path / "b", state(1))
    dead = _dead_pid()
    stale = tmp_path / f".soup.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".soup.tmp-{os.getppid()}-zzz"  # a running process: not ours to remove
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abc"  # another output's temporary: not its kind
    other.mkdir()
    assert rs(a, b, "--weights", 0.5, 0.5, "--out", tmp_path / "soup") == 0
    err = capsys.readouterr().err
    assert f"removed stale temporary {stale} (left by pid {dead}, which is no longer running)" in err
    assert not stale.exists() and live.exists() and other.exists()
    assert not lock_file(tmp_path / "soup").exists()


def test_a_replacement_killed_half_way_is_rolled_back(tmp_path):
    dest = tmp_path / "soup"
    dead = _dead_pid()
    old = tmp_path / f".soup.old-{dead}-q1"
    old.mkdir()
    (old / "x").mkdir()
    (old / "x" / "model.safetensors").write_text("previous output")
    (tmp_path / f".soup.tmp-{dead}-q2").mkdir()  # the new output that was being renamed in
    notes = []
    clean_stale(dest, notify=notes.append)
    assert (dest / "model.safetensors").read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]
    assert any("restored" in n for n in notes) and any("removed stale" in n for n in notes)


def test_out_dot_replaces_the_current_folder_without_leftovers(tmp_path, monkeypatch):
    a, b = st_file(tmp_path / "src" / "a.safetensors", state(0)), st_file(tmp_path / "src" / "b.safetensors", state(1))
    work = tmp_path / "work"
    work.mkdir()
    (work / "old.txt").write_text("previous")
    monkeypatch.chdir(work)
    assert rs(a, b, "--weights", 1, 0, "--out", ".", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]  # no ..old-*, no .work.tmp-*
    assert sorted(p.name for p in work.iterdir()) == ["model.safetensors", "soup.json"]


def test_long_output_names_get_short_temporaries(tmp_path):
    a, b = hf_folder(tmp_path / "a", state(0)), hf_folder(tmp_path / "b", state(1))
    out = tmp_path / ("n" * 250)
    assert rs(a, b, "--weights", 0.5, 0.5, "--out", out) == 0 and (out / "model.safetensors").is_file()
    with atomic_dir(out, overwrite=True) as tmp:
        assert len(tmp.name) < 160


# --- SIGKILL at several moments --------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.002)
    return False


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory):
    """Two 32 MiB checkpoints of 16 tensors: with 4 MB shards a merge writes 8 files, fsynced one by one."""
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        tensors = {f"t{j:02d}": torch.randn(512, 1024, generator=g) for j in range(16)}
        paths.append(st_file(d / f"e{i}.safetensors", tensors))
    reference = d / "reference"
    assert rs(*paths, "--weights", 0.3, 0.7, "--out", reference, "--max-shard-size", "4MB") == 0
    return paths, _digest(reference)


def _temps(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".soup.")]


# moment -> the condition on the parent folder at which the process is killed
MOMENTS = {
    "while importing": None,
    "temp folder created": lambda tmps: len(tmps) >= 2,  # lock file + temporary folder
    "first shard written": lambda tmps: any(len(list(t.glob("model-*"))) >= 1 for t in tmps if t.is_dir()),
    "most shards written": lambda tmps: any(len(list(t.glob("model-*"))) >= 6 for t in tmps if t.is_dir()),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["new output", "replacing an output"])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_never_leaves_a_partial_output(tmp_path, big_sources, capsys, moment, overwrite):
    paths, reference = big_sources
    out = tmp_path / "soup"
    args = [*paths, "--weights", 0.3, 0.7, "--out", out, "--max-shard-size", "4MB"]
    if overwrite:
        assert rs(*paths, "--weights", 1, 0, "--out", out, "--max-shard-size", "4MB") == 0
        previous = _digest(out)
        args.append("--overwrite")
    proc = rs_subprocess("soup", *args)
    try:
        cond = MOMENTS[moment]
        if cond is None:
            time.sleep(0.3)
        elif not _wait_for(lambda: cond(_temps(tmp_path)) or proc.poll() is not None):
            pytest.fail(f"never reached '{moment}'")
        if proc.poll() is not None:
            pytest.skip(f"the soup finished before '{moment}' on this machine")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    if out.exists():  # either the previous output, whole, or nothing: never a mix
        assert _digest(out) == (previous if overwrite else reference)
    elif overwrite:  # killed between the two renames: the previous output waits, whole, to be put back
        assert any(p.name.startswith(".soup.old-") for p in tmp_path.iterdir())
    assert rs(*args, *([] if overwrite else ["--overwrite"] if out.exists() else [])) == 0
    err = capsys.readouterr().err
    if moment != "while importing":
        assert "removed stale temporary" in err
    assert _digest(out) == reference
    assert _temps(tmp_path) == [], "a temporary or lock file was left behind"


def test_sigterm_removes_the_temporary_on_the_way_out(tmp_path, big_sources):
    paths, _ = big_sources
    out = tmp_path / "soup"
    proc = rs_subprocess("soup", *paths, "--weights", 0.3, 0.7, "--out", out, "--max-shard-size", "4MB")
    try:
        assert _wait_for(lambda: MOMENTS["first shard written"](_temps(tmp_path)) or proc.poll() is not None)
        if proc.poll() is not None:
            pytest.skip("the soup finished before the first shard could be seen on this machine")
        proc.send_signal(signal.SIGTERM)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "rs soup: error: interrupted (nothing was written)\n", err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock file
