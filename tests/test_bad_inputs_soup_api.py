# ruff: noqa: E501  (the case table reads best one case per line)
"""Bad inputs to the soup's Python API: each raises its documented type (SoupError, or OSError for a full
disk) with a one-line message naming the problem, runs no hostile pickle and leaves the folder as it was.

`python tests/test_bad_inputs_soup.py` tallies these together with the `rs soup` cases.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_cases import MARKER, adapter, evil_torch, snapshot, state, two  # noqa: E402


def _interp(*args, **kwargs):
    from rs_lightning.soup import interpolate

    return lambda d: lambda: interpolate(*args, **kwargs)


def _in_place_nan(d):
    from rs_lightning.soup import interpolate

    live, bad = state(0), state(1)
    before = {k: v.clone() for k, v in live.items()}
    bad["b"][0] = float("nan")

    def call():
        try:
            interpolate([live, bad], [0.5, 0.5], out=live)
        finally:
            assert all(torch.equal(live[k], before[k]) for k in live), "the live model was modified"
    return call


def _merge(paths_fn, weights=(0.5, 0.5), out_name="soup", **kwargs):
    def setup(d):
        from rs_lightning.soup import merge_files

        paths = paths_fn(d)
        ws = list(weights) if weights is not None else None
        return lambda: merge_files(paths, ws, d / out_name if out_name else None, **kwargs)
    return setup


def _merge_disk_full(d):
    from rs_lightning.soup import merge_files, writer

    paths = two(d)

    def call():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(writer, "_write_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
            merge_files(paths, [0.5, 0.5], d / "soup")
    return call


def _save(value, where="soup"):
    def setup(d):
        from rs_lightning.soup import save_safetensors

        if where and "/" in where:
            (d / where.split("/")[0]).write_text("a file")
        return lambda: save_safetensors(value, d / where if where else None)
    return setup


def _lora(adapters_fn, weights=(0.5, 0.5)):
    def setup(d):
        from rs_lightning.soup import lora_soup

        adapters = adapters_fn(d)
        return lambda: lora_soup(adapters, list(weights) if weights is not None else None)
    return setup


def _loaded(d, *seeds):
    from rs_lightning.soup import load_adapter

    return [load_adapter(adapter(d / f"l{s}", s)) for s in seeds]


def _captioning_evil(d):
    from rs_lightning.tasks.captioning.model import load_weights

    path = evil_torch(d / "init.ckpt")
    return lambda: load_weights(torch.nn.Linear(4, 4), path)


def _front_evil(d):
    from rs_lightning.front.checkpoints import Checkpoint, load_checkpoint

    path = evil_torch(d / "expert.pt", "system", lightning=False)
    return lambda: load_checkpoint(Checkpoint(path=str(path)))


def _open_none(d):
    from rs_lightning.soup import open_source

    return lambda: open_source(None)


def _base_none(d):
    from rs_lightning.soup import merge_lora_into_base

    adapters = _loaded(d, 1)
    return lambda: merge_lora_into_base(None, adapters, [1.0])


F8 = torch.float8_e4m3fn
# name -> (setup(d) -> the call that must raise, expected exception type, regex of its one-line message)
API_CASES = {
    "interpolate weights=None": (_interp([state(0), state(1)], None), "SoupError", r"weights must be numbers \(a sequence"),
    "interpolate weights as a string": (_interp([state(0), state(1)], "0.5 0.5"), "SoupError", r"weights must be numbers \(a sequence"),
    "interpolate weights of wrong count": (_interp([state(0), state(1)], torch.ones(3) / 3), "SoupError", r"got 3 weights for 2 sources"),
    "interpolate sources=None": (_interp(None, [1.0]), "SoupError", r"sources must be a list of state dicts"),
    "interpolate one dict as sources": (_interp(state(0), [1.0]), "SoupError", r"wrap a single one in a list"),
    "interpolate a string source": (_interp([state(0), "b.safetensors"], [0.5, 0.5]), "SoupError", r"source 1 must be a state dict"),
    "interpolate a non-tensor value": (_interp([state(0), state(1) | {"w": 1.0}], [0.5, 0.5]), "SoupError", r"key 'w' of source 1 is a float, not a tensor"),
    "interpolate NaN": (_interp([state(0), state(1) | {"b": torch.tensor([0.0, float("nan"), 0, 0])}], [0.5, 0.5]), "SoupError", r"key 'b' of source 1 holds non-finite values \(1 NaN of 4\)"),
    "interpolate complex": (_interp([{"c": torch.ones(2, dtype=torch.complex64)}] * 2, [0.5, 0.5]), "SoupError", r"complex64: complex tensors cannot be souped"),
    "interpolate float8": (_interp([{"w": torch.ones(2).to(F8)}] * 2, [0.5, 0.5]), "SoupError", r"float8_e4m3fn: only float16"),
    "interpolate in place with NaN leaves out untouched": (_in_place_nan, "SoupError", r"key 'b' of source 1 holds non-finite"),
    "merge_files paths as a string": (_merge(lambda d: str(d / "a.safetensors")), "SoupError", r"paths must be a list of checkpoint paths"),
    "merge_files weights=None": (_merge(two, weights=None), "SoupError", r"weights must be numbers \(a sequence"),
    "merge_files out_dir=None": (_merge(two, out_name=None), "SoupError", r"the out_dir path is empty"),
    "merge_files out_dir is a source": (_merge(two, out_name="a", overwrite=True), "SoupError", r"out_dir .*a is the input"),
    "merge_files NaN source": (_merge(lambda d: two(d, state(0), state(1) | {"w": torch.full((4, 4), float("inf"))})), "SoupError", r"key 'w' of source 1 .* \(16 inf of 16\)"),
    "merge_files disk full": (_merge_disk_full, "OSError", r"cannot write the soup to .*soup: No space \(nothing was written\)"),
    "lora_soup paths instead of adapters": (_lora(lambda d: [str(adapter(d / "l1", 1)), str(adapter(d / "l2", 2))]), "SoupError", r"adapter 0 is a str, not a LoraAdapter"),
    "lora_soup weights=None": (_lora(lambda d: _loaded(d, 1, 2), weights=None), "SoupError", r"weights must be numbers \(a sequence"),
    "lora_soup no adapters": (_lora(lambda d: [], weights=[]), "SoupError", r"no adapters given"),
    "merge_lora_into_base base=None": (_base_none, "SoupError", r"base state dict must be a mapping"),
    "save_safetensors a non-tensor": (_save({"w": 3}), "SoupError", r"tensor 'w' is a int, not a tensor"),
    "save_safetensors complex128": (_save({"w": torch.ones(2, dtype=torch.complex128)}), "SoupError", r"dtype torch.complex128, which safetensors cannot store"),
    "save_safetensors out_dir=None": (_save({"w": torch.ones(2)}, where=None), "SoupError", r"the out_dir path is empty"),
    "save_safetensors under a file": (_save({"w": torch.ones(2)}, "f/soup"), "SoupError", r"f is a file, so no folder"),
    "open_source(None)": (_open_none, "SoupError", r"a source path is empty"),
    "captioning init_checkpoint hostile": (_captioning_evil, "SoupError", r"init.ckpt pickles a call to builtins.exec"),
    "front checkpoint hostile": (_front_evil, "SoupError", r"expert.pt pickles a call to posix.system"),
}


def classify_api(name: str, d: Path) -> tuple[str, str]:
    setup, kind, regex = API_CASES[name]
    call = setup(d)
    before = snapshot(d)
    try:
        call()
    except Exception as err:  # noqa: BLE001
        after = snapshot(d)
        names = {c.__name__ for c in type(err).__mro__}
        text = str(err)
        left = f" [+leftover: {sorted({c[0] for c in set(after.items()) ^ set(before.items())})[:3]}]" if after != before else ""
        if (d / MARKER).exists():
            return "code ran", f"a hostile pickle ran{left}"
        if kind not in names:
            return "traceback", f"{type(err).__name__}: {text[:200]}{left}"
        if left:
            return "leftover", left
        if "\n" in text or not re.search(regex, text):
            return "unclear", text[:300]
        return "clean", text
    return "silent", "no exception"


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_input(name, tmp_path):
    category, detail = classify_api(name, tmp_path)
    assert category == "clean", f"{name}: {category}: {detail}"
