"""`rs soup --method`: the streaming merge of files equals `merge` in memory, records what it did, and refuses
what does not apply (an option of another method, adapters for a full-weight method, a missing theta_0)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rs_lightning.commands import soup as soup_cmd
from rs_lightning.soup import METHODS, merge, streaming

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soup_cases  # noqa: E402


def _write(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(33, 17, generator=g), "a.bias": torch.randn(17, generator=g),
            "steps": torch.tensor(3)}
    experts = [{k: (v + 0.05 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                for k, v in base.items()} for _ in range(2)]
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
               for _ in range(2)]
    return {"base": _write(tmp_path / "base.safetensors", base), "base_sd": base,
            "experts": [_write(tmp_path / f"e{i}.safetensors", e) for i, e in enumerate(experts)],
            "experts_sd": experts,
            "fisher": [_write(tmp_path / f"f{i}.safetensors", f) for i, f in enumerate(fishers)],
            "fisher_sd": fishers, "tmp": tmp_path}


def test_the_cli_lists_the_registry():
    assert soup_cmd.METHOD_NAMES == tuple(METHODS)


CASES = {
    "ties": (["--method", "ties", "--density", "0.4"], dict(method="ties", density=0.4), True, False),
    "dare_ties": (["--method", "dare_ties", "--drop-rate", "0.5", "--seed", "5"],
                  dict(method="dare_ties", drop_rate=0.5, seed=5), True, False),
    "task_arithmetic": (["--method", "task_arithmetic", "--scaling", "0.5"],
                        dict(method="task_arithmetic", scaling=0.5), True, False),
    "slerp": (["--method", "slerp"], dict(method="slerp"), False, False),
    "fisher": (["--method", "fisher"], dict(method="fisher"), False, True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("group_bytes", [None, 64])
def test_streaming_equals_merge_in_memory(files, name, group_bytes, monkeypatch, capsys):
    if group_bytes:
        monkeypatch.setattr(streaming, "GROUP_BYTES", group_bytes)  # one tensor per group: same per-key masks
    flags, kwargs, with_base, with_fisher = CASES[name]
    out = files["tmp"] / f"out_{name}_{group_bytes}"
    argv = [*files["experts"], "--weights", "0.3", "0.7", "--out", str(out), *flags]
    argv += ["--base", files["base"]] if with_base else []
    argv += ["--fisher", *files["fisher"]] if with_fisher else []
    assert soup_cmd.main(argv) == 0, capsys.readouterr().err
    assert f"method {name}" in capsys.readouterr().out
    got = load_file(str(out / "model.safetensors"))
    want = merge(files["experts_sd"], [0.3, 0.7], base=files["base_sd"] if with_base else None,
                 fisher=files["fisher_sd"] if with_fisher else None, **kwargs)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    record = json.loads((out / "soup.json").read_text())
    assert record["merge_method"] == name and record["weights"] == [0.3, 0.7]
    assert set(record["merge_options"]) == set(METHODS[name].options)


BAD = {
    "option of another method": (["--method", "ties", "--drop-rate", "0.5"], True,
                                 "--drop-rate does not apply to --method ties"),
    "density with linear": (["--density", "0.5"], False, "--density does not apply to --method linear"),
    "ties without base": (["--method", "ties"], False, "'ties' needs theta_0"),
    "base with slerp": (["--method", "slerp"], True, "--method slerp does not use it"),
    "fisher with ties": (["--method", "ties", "--fisher", "F0", "F1"], True, "--fisher applies to --method fisher"),
    "fisher without files": (["--method", "fisher"], False, "needs one Fisher file per source"),
    "slerp of the wrong weights": (["--method", "slerp", "--weights", "0.5", "0.6"], False, "sum to"),
    "density out of range": (["--method", "ties", "--density", "0"], True, "density must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_method_arguments_are_one_line_and_write_nothing(files, case, capsys):
    flags, with_base, message = BAD[case]
    flags = [files["fisher"][0] if f == "F0" else files["fisher"][1] if f == "F1" else f for f in flags]
    out = files["tmp"] / "bad"
    weights = [] if "--weights" in flags else ["--weights", "0.3", "0.7"]
    argv = [*files["experts"], *weights, "--out", str(out), *flags] + (["--base", files["base"]] if with_base else [])
    assert soup_cmd.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_adapters_refuse_a_full_weight_method(tmp_path, capsys):
    a, b = soup_cases.adapter(tmp_path / "a", 1), soup_cases.adapter(tmp_path / "b", 2)
    out = tmp_path / "out"
    assert soup_cmd.main([str(a), str(b), "--lam", "0.5", "--method", "ties", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "LoRA adapters support --method linear only" in err and not out.exists()
