"""`front.method`: a sweep whose soups use another merge method (quadratic toy, closed-form rewards).

Checked: every soup row is the method's merge of the experts (rewards equal the closed form at the merged
theta), one-hot soups are evaluated beside the true experts, rows and run.json record the method, the config
hash changes with the method and its options (so rows of another method are never resumed as these), and a
linear sweep keeps its old hash and rows. Bad method sections are one clear error before anything runs.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rs_lightning import cli
from rs_lightning.soup import merge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_cases import toy_config  # noqa: E402


def _run(cfg: Path, *extra) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["front", "--config", str(cfg), "--no-progress", *extra])
    return code, out.getvalue(), err.getvalue()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "front.jsonl").read_text().splitlines()]


def _toy_module(cfg: Path):
    import yaml

    from rs_lightning.tasks.toy.quadratic import QuadraticRewards

    return QuadraticRewards(**yaml.safe_load(cfg.read_text())["model"]["init_args"])


@pytest.mark.parametrize("method", [{"name": "ties", "options": {"density": 0.5}},
                                    {"name": "dare_ties", "options": {"drop_rate": 0.5, "seed": 3}},
                                    {"name": "slerp"}])
def test_soups_are_the_methods_merges(tmp_path, method):
    cfg = toy_config(tmp_path, method=method)
    code, out, err = _run(cfg)
    assert code == 0, err
    rows = _rows(tmp_path / "run")
    experts = [r for r in rows if r["kind"] == "expert"]
    soups = [r for r in rows if r["kind"] == "soup"]
    assert len(experts) == 2 and len(soups) == 5  # the 5 grid lams, one-hot ones included, beside the experts
    ck = tmp_path / "ckpt"
    sds = [load_file(str(ck / f"e{i}.safetensors")) for i in (1, 2)]
    base = load_file(str(ck / "init.safetensors")) if method["name"] != "slerp" else None
    module = _toy_module(cfg)
    for row in soups:
        assert row["method"] == method["name"] and set(method.get("options", {})) <= set(row["method_options"])
        theta = merge(sds, row["weights"], method["name"], base=base, **method.get("options", {}))["theta"]
        want = module.closed_form_rewards(theta.double().tolist())
        got = [row["rewards"][n] for n in ("r1", "r2")]
        assert got == pytest.approx(want, abs=1e-5)
    for i, row in enumerate(experts):  # the experts are themselves, not the method's one-hot soup
        want = module.closed_form_rewards(sds[i]["theta"].double().tolist())
        assert [row["rewards"][n] for n in ("r1", "r2")] == pytest.approx(want, abs=1e-5)
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["method"]["method"] == method["name"]


def test_the_config_hash_follows_the_method_and_keeps_linear_as_it_was(tmp_path):
    cfg = toy_config(tmp_path)
    assert _run(cfg)[0] == 0
    rows = _rows(tmp_path / "run")
    # An explicit linear method is the same sweep: every row is reused, none is added.
    assert _run(cfg, "--front.method.name", "linear")[0] == 0
    assert _rows(tmp_path / "run") == rows
    # Another method, or the same method with other options, would give other rows: refused, nothing written.
    code, _, err = _run(cfg, "--front.method.name", "ties")
    assert code == 2 and "checkpoints or merge method changed" in err, err
    ties = toy_config(tmp_path / "t", method={"name": "ties", "options": {"density": 0.5}})
    assert _run(ties)[0] == 0
    code, _, err = _run(ties, "--front.method.options", '{"density": 1.0}')
    assert code == 2 and "checkpoints or merge method changed" in err, err


def test_fisher_sweep_reads_one_fisher_file_per_expert(tmp_path):
    ck = tmp_path / "ckpt"
    cfg = toy_config(tmp_path, method={"name": "fisher", "fisher": [str(ck / "f1.safetensors"),
                                                                    str(ck / "f2.safetensors")]})
    save_file({"theta": torch.tensor([4.0, 1.0])}, str(ck / "f1.safetensors"))
    save_file({"theta": torch.tensor([1.0, 4.0])}, str(ck / "f2.safetensors"))
    code, _, err = _run(cfg)
    assert code == 0, err
    module = _toy_module(cfg)
    sds = [load_file(str(ck / f"e{i}.safetensors")) for i in (1, 2)]
    fs = [load_file(str(ck / f"f{i}.safetensors")) for i in (1, 2)]
    for row in (r for r in _rows(tmp_path / "run") if r["kind"] == "soup"):
        theta = merge(sds, row["weights"], "fisher", fisher=fs)["theta"]
        assert [row["rewards"][n] for n in ("r1", "r2")] == pytest.approx(
            module.closed_form_rewards(theta.double().tolist()), abs=1e-5)


BAD = {
    "unknown method": ({"name": "magic"}, "front.method: unknown merge method 'magic'"),
    "unknown option": ({"name": "ties", "options": {"densty": 0.2}}, "no option 'densty'"),
    "base for slerp": ({"name": "slerp", "base": "x.safetensors"}, "front.method.base: method slerp does not use"),
    "fisher count": ({"name": "fisher", "fisher": ["a.safetensors"]}, "one Fisher file per expert (2), got 1"),
    "missing base file": ({"name": "ties", "base": "nowhere.safetensors"}, "front.method.base"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_method_sections_are_one_error_before_anything_runs(tmp_path, case):
    spec, message = BAD[case]
    cfg = toy_config(tmp_path, method=spec)
    code, out, err = _run(cfg)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run" / "front.jsonl").exists()


def test_ties_without_theta0_is_refused(tmp_path):
    cfg = toy_config(tmp_path, method={"name": "ties"}, init=None)
    code, _, err = _run(cfg)
    assert code == 2 and "needs theta_0" in err


def test_lora_adapter_experts_take_the_linear_soup_only(tmp_path):
    from soup_cases import adapter

    experts = [{"path": str(adapter(tmp_path / f"l{i}", i)), "name": f"l{i}"} for i in (1, 2)]
    cfg = toy_config(tmp_path, experts=experts, method={"name": "ties"})
    code, _, err = _run(cfg)
    assert code == 2 and "LoRA adapter folders, which take the linear soup only" in err, err


def test_an_ensemble_with_a_target_prefix_is_refused(tmp_path):
    cfg = toy_config(tmp_path, ensemble=True, target_prefix="model.")
    code, _, err = _run(cfg)
    assert code == 2 and "front.ensemble with front.target_prefix" in err, err
