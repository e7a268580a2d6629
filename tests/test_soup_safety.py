"""Security of the soup engine's inputs (issue 11): no pickled code ever runs, NaN/inf are refused unless allowed.

- hostile pickles (exec, os.system, subprocess) through every reader of a user-named file: `rs soup` sources
  and `--base`, PEFT adapter_model.bin, the captioner's init_checkpoint (also through CaptioningModule, as
  `rs test` / `rs front` build it) and `pretrained`, the front's checkpoint loader; none creates its marker;
- the package has one unpickler (checked on the syntax tree);
- NaN/inf: `--allow-nonfinite` / `allow_nonfinite=True` let them through; a zero-weight source is not read.

Outputs (locks, temporaries, kills) are in test_soup_outputs.py, bad inputs in test_bad_inputs_soup*.py.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soup_cases import MARKER, REPO, adapter, base, evil_torch, hf_folder, state  # noqa: E402

from rs_lightning import cli  # noqa: E402
from rs_lightning.soup import SoupError, interpolate, merge_files, open_source  # noqa: E402

HOW = ["exec", "system", "subprocess"]


def rs(*args) -> int:
    return cli.main(["soup", *map(str, args)])


# --- hostile pickles --------------------------------------------------------------------------------------


def _soup_source(d, how, suffix):
    evil = evil_torch(d / f"e{suffix}", how, lightning=suffix == ".ckpt")
    return rs(evil, hf_folder(d / "b", state(1)), "--weights", 0.5, 0.5, "--out", d / "soup")


def _hf_bin_folder(d, how):
    evil = evil_torch(d / "m" / "pytorch_model.bin", how, lightning=False)
    return rs(evil.parent, hf_folder(d / "b", state(1)), "--weights", 0.5, 0.5, "--out", d / "soup")


def _adapter_bin(d, how):
    folder = adapter(d / "l2", 2, bin_file=True)
    evil_torch(folder / "adapter_model.bin", how, lightning=False)
    return rs(adapter(d / "l1", 1), folder, "--weights", 0.5, 0.5, "--out", d / "soup")


def _base(d, how):
    evil = evil_torch(d / "base.ckpt", how)
    return rs(adapter(d / "l1", 1), adapter(d / "l2", 2), "--weights", 0.5, 0.5, "--base", evil, "--out", d / "soup")


def _captioning_load_weights(d, how):
    from rs_lightning.tasks.captioning.model import load_weights

    load_weights(torch.nn.Linear(4, 4), evil_torch(d / "init.ckpt", how))


def _front_loader(d, how):
    from rs_lightning.front.checkpoints import Checkpoint, load_checkpoint

    load_checkpoint(Checkpoint(path=str(evil_torch(d / "expert.ckpt", how)), prefix=""))


READERS = {
    "rs soup .ckpt source": lambda d, how: _soup_source(d, how, ".ckpt"),
    "rs soup .pt source": lambda d, how: _soup_source(d, how, ".pt"),
    "rs soup .bin source": lambda d, how: _soup_source(d, how, ".bin"),
    "rs soup pytorch_model.bin folder": _hf_bin_folder,
    "rs soup adapter_model.bin": _adapter_bin,
    "rs soup --base": _base,
    "captioning load_weights": _captioning_load_weights,
    "front load_checkpoint": _front_loader,
}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("reader", list(READERS))
def test_hostile_pickle_never_runs(tmp_path, capsys, reader, how):
    try:
        code = READERS[reader](tmp_path, how)
    except SoupError as err:  # the API readers raise; the CLI returns 2
        assert "pickles a call to" in str(err) and "\n" not in str(err)
    else:
        assert code == 2, capsys.readouterr()
        err = capsys.readouterr().err
        assert re.fullmatch(r"rs soup: error: .* pickles a call to (builtins.exec|posix.system|subprocess.call), "
                            r"which no checkpoint needs: refusing it .*\n", err), err
    assert not (tmp_path / MARKER).exists(), "the hostile pickle ran"
    assert not (tmp_path / "soup").exists()


def test_hostile_init_checkpoint_through_the_captioning_module(tmp_path):
    """What `rs test` / `rs front` do with model.init_args.init_checkpoint: build the module."""
    from rs_lightning.tasks.captioning.module import CaptioningModule

    evil = evil_torch(tmp_path / "xe.ckpt", "exec")
    with pytest.raises(SoupError, match="xe.ckpt pickles a call to builtins.exec"):
        CaptioningModule(stage="xe", eval_metrics=[], init_checkpoint=str(evil))
    assert not (tmp_path / MARKER).exists()


def test_hostile_pretrained_file_is_read_without_running_it(tmp_path):
    """`pretrained` goes through open_clip's reader, pinned to weights_only=True: refused, nothing runs."""
    from rs_lightning.tasks.captioning.model import load_coca

    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_coca(pretrained=str(evil_torch(tmp_path / "coca.pt", "exec", lightning=False)))
    assert not (tmp_path / MARKER).exists()


def test_captioning_still_loads_lightning_checkpoints_and_exports(tmp_path):
    from rs_lightning.tasks.captioning.model import load_weights

    net = torch.nn.Linear(4, 4)
    ckpt = {"state_dict": {f"model.{k}": v + 1 for k, v in net.state_dict().items()} | {"other.x": torch.ones(1)},
            "hyper_parameters": {"init_checkpoint": Path("/x/y.safetensors")}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    load_weights(net, tmp_path / "last.ckpt")
    assert torch.equal(net.weight, ckpt["state_dict"]["model.weight"])
    save_file({k: v * 2 for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    load_weights(net, tmp_path / "model.safetensors")
    assert torch.equal(net.bias, ckpt["state_dict"]["model.bias"] * 2)


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


UNPICKLERS = {"torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
              "_pickle.load", "_pickle.loads", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load",
              "cloudpickle.loads", "marshal.load", "marshal.loads", "shelve.open"}


def test_the_package_has_one_unpickler():
    """Only rs_lightning/soup/ckpt.py may call torch.load / pickle.load(s); nothing passes weights_only=False
    or allow_pickle=True (checked on the syntax tree: docstrings and comments may mention them)."""
    offenders = []
    for path in sorted((REPO / "rs_lightning").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            unsafe_kw = [k.arg for k in node.keywords if (k.arg, getattr(k.value, "value", None)) in
                         (("weights_only", False), ("allow_pickle", True))]
            if (name in UNPICKLERS and rel != "rs_lightning/soup/ckpt.py") or unsafe_kw:
                offenders.append(f"{rel}:{node.lineno}: {name}({', '.join(unsafe_kw)})")
    assert not offenders, "\n".join(offenders)


# --- non-finite values ------------------------------------------------------------------------------------


def test_nonfinite_flags_let_them_through(tmp_path, capsys):
    bad = state(1)
    bad["w"][0, 0] = float("nan")
    a, b = hf_folder(tmp_path / "a", state(0)), hf_folder(tmp_path / "b", bad)
    assert rs(a, b, "--weights", 0.5, 0.5, "--out", tmp_path / "refused") == 2
    assert rs(a, b, "--weights", 0.5, 0.5, "--out", tmp_path / "soup", "--allow-nonfinite") == 0
    assert torch.isnan(open_source(tmp_path / "soup")["w"][0, 0])
    # A zero-weight source is not read: its NaN cannot enter the soup, so nothing to refuse.
    merge_files([a, b], [1.0, 0.0], tmp_path / "one_hot")
    assert interpolate([state(0), bad], [1.0, 0.0])["w"].isfinite().all()
    assert interpolate([state(0), bad], [0.5, 0.5], allow_nonfinite=True)["w"].isnan().any()


def test_lora_nonfinite_flag_and_base_check(tmp_path):
    from rs_lightning.soup import load_adapter, lora_soup, merge_lora_into_base

    nan = {"base_model.model.l.lora_A.weight": torch.full((2, 4), float("nan")),
           "base_model.model.l.lora_B.weight": torch.ones(4, 2)}
    l1, l2 = load_adapter(adapter(tmp_path / "l1", 1)), load_adapter(adapter(tmp_path / "l2", 2, sd=nan))
    with pytest.raises(SoupError, match="adapter 1 .* holds non-finite"):
        lora_soup([l1, l2], [0.5, 0.5])
    soup = lora_soup([l1, l2], [0.5, 0.5], allow_nonfinite=True)
    assert soup.state_dict["base_model.model.l.lora_A.weight"].isnan().all()
    base_sd = dict(open_source(base(tmp_path / "B")))
    base_sd["l.bias"][0] = float("inf")
    with pytest.raises(SoupError, match="key 'l.bias' of the base model holds non-finite"):
        merge_lora_into_base(base_sd, [l1], [1.0])


def test_finiteness_check_is_exact_when_the_sum_overflows():
    from rs_lightning.soup.values import is_finite

    huge = torch.full((3_000_000,), 3e38)  # finite values whose fp32 sum overflows: the slice-by-slice path
    assert is_finite(huge) and is_finite(torch.tensor([1.0, -1.0], dtype=torch.bfloat16))
    huge[2_500_000] = float("nan")
    assert not is_finite(huge)
    assert not is_finite(torch.tensor([float("inf"), float("-inf")]))  # inf - inf: NaN sum, still caught
    assert is_finite(torch.tensor([float("nan")]).long()) and is_finite(torch.empty(0))
