"""Builders shared by the soup safety tests: tiny checkpoints of every format, hostile pickles, helpers.

Not a test module (no `test_` prefix): imported by test_bad_inputs_soup.py and test_soup_safety.py.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
MARKER = "PWNED"


class Payload:
    """A pickled object whose unpickling WOULD create `marker` (through exec, os.system or subprocess)."""

    def __init__(self, marker: Path, how: str = "exec"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "exec":
            return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (subprocess.call, (["touch", self.marker],))


def state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g).to(dtype), "b": torch.randn(4, generator=g).to(dtype),
            "steps": torch.tensor(seed)}


def two(d: Path, sd1=None, sd2=None) -> list[Path]:
    """Two HF folders a/ and b/ of the tiny network (different seeds unless given)."""
    return [hf_folder(d / "a", sd1 or state(0)), hf_folder(d / "b", sd2 or state(1))]


def hf_folder(folder: Path, sd: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder


def st_file(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, path)
    return path


def evil_torch(path: Path, how: str = "exec", *, lightning: bool = True, legacy: bool = False) -> Path:
    """A torch file with a working state dict AND a hostile object next to it."""
    marker = path.parent / MARKER
    sd = {"w": torch.ones(4, 4), "b": torch.ones(4), "steps": torch.tensor(0)}
    hostile = {"x": Payload(marker, how)}
    obj = {"state_dict": sd, "hyper_parameters": hostile} if lightning else sd | hostile
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        with open(path, "wb") as f:  # a bare pickle: what an attacker hand-writes
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path


def adapter(folder: Path, seed: int, *, r: int = 2, sd: dict | None = None, bin_file: bool = False) -> Path:
    """A PEFT LoRA adapter folder on a one-Linear base ("l", 4 -> 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["l"], "base_model_name_or_path": "b"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    sd = sd if sd is not None else {"base_model.model.l.lora_A.weight": torch.randn(r, 4, generator=g),
                                    "base_model.model.l.lora_B.weight": torch.randn(4, r, generator=g)}
    if bin_file:
        torch.save(sd, folder / "adapter_model.bin")
    else:
        save_file(sd, folder / "adapter_model.safetensors")
    return folder


def base(folder: Path) -> Path:
    return hf_folder(folder, {"l.weight": torch.randn(4, 4), "l.bias": torch.zeros(4)})


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its size and mtime (files): equal snapshots = nothing written or removed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            # A folder's mtime changes when an entry is added and removed again: not a leftover.
            is_dir = p.is_dir() and not p.is_symlink()
            key = str(p.relative_to(root))
            out[key] = (st.st_mode >> 12, 0 if is_dir else st.st_size, 0 if is_dir else st.st_mtime_ns)
    return out


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A tmpfs mounted at `where` (root only); yields False when mounting is not possible here."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield False
        return
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    ok = subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def rs_subprocess(*args, **kwargs) -> subprocess.Popen:
    """`rs ...` as a real process (python -m rs_lightning.cli), output piped."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rs_lightning.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def lock_holder(path: Path, cleanups: list, what: str | None = None) -> int:
    """Another process holding the write lock of `path` until `cleanups` is closed; returns its pid."""
    kwargs = "" if what is None else f", what={what!r}"
    code = ("import sys; from rs_lightning.soup.lock import output_lock\n"
            f"with output_lock({str(path)!r}{kwargs}):\n    print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert holder.stdout.readline().strip() == "locked"

    def release():
        holder.stdin.close()
        holder.wait(30)

    cleanups.append(contextlib.ExitStack())
    cleanups[-1].callback(release)
    return holder.pid
