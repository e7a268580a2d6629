"""Experiment plans (`rs run PLAN`): the stage graph a plan expands to, its agreement with `rs demo`, bad plans."""

import json
import re
from pathlib import Path

import pytest
import yaml

from rs_lightning.commands.run import main as rs_run
from rs_lightning.demo import captioning
from rs_lightning.plan.spec import PLAN_ROOT, PlanError, load_plan


def _relative(value, roots: dict[str, str]):
    """The value with every run-folder path made relative to its run folder (and stage names aligned)."""
    if isinstance(value, dict):
        return {k: _relative(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, roots) for v in value]
    if isinstance(value, str):
        for root, tag in roots.items():
            value = value.replace(root, tag)
        return re.sub(r"<out>/(rep|seed)(\d)", r"<out>/<seed\2>", value)
    return value


def test_the_quick_plan_is_the_method_as_a_stage_graph(tmp_path):
    plan = load_plan("quick", out=tmp_path)
    stages = plan.stages()
    assert [s.name for s in stages] == ["seed0-init", "seed0-expert-bleu1", "seed0-expert-rouge_l",
                                        "seed0-morl-0.5-0.5", "seed0-sweep"]
    init, bleu1, rouge_l, morl, sweep = stages
    assert init.needs == [] and all(s.needs == ["seed0-init"] for s in (bleu1, rouge_l, morl))
    assert sweep.needs == [s.name for s in stages[:-1]] and sweep.kind == "front"
    assert [s.mu for s in (bleu1, rouge_l, morl)] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    for s in (bleu1, rouge_l, morl):
        args = s.config["model"]["init_args"]
        assert args["reward_weights"] == s.mu and args["init_checkpoint"] == str(init.output)
        export = [c for c in s.config["trainer"]["callbacks"] if c["class_path"].endswith("ExportCaptioner")]
        assert export == [{"class_path": "rs_lightning.tasks.captioning.export.ExportCaptioner",
                           "init_args": {"path": str(s.output)}}]
        assert s.config["trainer"]["default_root_dir"] == str(s.output.parent)
    front = sweep.config["front"]
    assert [e["path"] for e in front["experts"]] == [str(bleu1.output), str(rouge_l.output)]
    assert front["init"]["path"] == str(init.output) and front["morl"][0]["path"] == str(morl.output)
    assert front["out_dir"] == str(sweep.output.parent) and "init_checkpoint" not in sweep.config["model"]["init_args"]
    assert init.resources == {"cpus": 1, "time_min": 10}


@pytest.mark.parametrize("plan_name, profile, points, seeds", [("quick", "quick", 3, 1), ("demo", "default", 11, 3)])
def test_the_shipped_plans_run_exactly_the_stages_of_rs_demo(plan_name, profile, points, seeds, tmp_path):
    """`rs demo` is a shipped plan: configs/plans/demo.yaml (and quick.yaml, as `rs demo --quick`) expand to the very
    configs the demo writes, up to folder names."""
    plan = load_plan(plan_name, out=tmp_path / "plan")
    demo = captioning.plan(tmp_path / "demo", replicates=seeds, profile=profile, points=points)
    ours = plan.stages()
    assert len(ours) == len(demo)
    roots = {str(tmp_path / "plan"): "<out>", str(tmp_path / "demo"): "<out>"}
    for a, b in zip(ours, demo):
        assert (a.kind, a.mu, a.seed) == (b.kind, b.mu, b.seed)
        assert _relative(str(a.output), roots).replace("morl_0.5_0.5", "morl") == _relative(str(b.output), roots)
        got = json.loads(json.dumps(_relative(a.config, roots)).replace("morl_0.5_0.5", "morl"))
        assert got == _relative(b.config, roots), a.name


def test_dry_run_prints_the_graph_and_starts_nothing(tmp_path, capsys):
    assert rs_run(["quick", "--out", str(tmp_path / "q"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "seed0-sweep  [front; cpus 1, time_min 10]" in text
    assert "needs: seed0-init, seed0-expert-bleu1, seed0-expert-rouge_l, seed0-morl-0.5-0.5" in text
    assert f"run:   rs fit --config {tmp_path / 'q' / 'configs' / 'seed0-init.yaml'}" in text
    assert not (tmp_path / "q").exists()


def test_status_before_anything_ran(tmp_path, capsys):
    assert rs_run(["quick", "--out", str(tmp_path / "q"), "--status"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"seed0-expert-bleu1\s+expert\s+pending\s+waits for seed0-init", text)
    assert "5 stages under" in text and "5 pending" in text


def test_every_shipped_plan_parses_and_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("COCO", "/data/coco")
    plans = sorted(PLAN_ROOT.glob("*.yaml"))
    assert {p.stem for p in plans} >= {"quick", "demo", "review", "news_summary", "coco_captioning"}
    for path in plans:
        stages = load_plan(path, out=tmp_path / path.stem).stages()
        assert stages[-1].kind == "front", path


def _write_plan(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((PLAN_ROOT / "quick.yaml").read_text())
    for key in ("init", "train"):
        raw[key]["config"] = str(PLAN_ROOT / raw[key]["config"])
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 3}, "unknown key(s) ['epochs'] in the plan"),
    ({"rewards": ["bleu1"]}, "rewards must list 2 or more distinct reward names"),
    ({"morl": [[0.5, 0.3]]}, "morl[0] must be 2 weights >= 0 summing to 1"),
    ({"morl": [[0.5, 0.5, 0.0]]}, "morl[0] must be 2 weights >= 0 summing to 1"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct integers"),
    ({"retries": -1}, "retries must be an integer >= 0"),
    ({"train": None}, "train is missing"),
    ({"train": {"config": "nope.yaml"}}, "train.config: no such file"),
    ({"sweep": {"resources": {"gpu": 1}}}, "unknown key(s) ['gpu'] in sweep.resources"),
    ({"sweep": {"resources": {"gpus": -1}}}, "sweep.resources.gpus must be a number >= 0"),
    ({"init": {"path": "x", "set": {}}}, "a given init (init.path) takes only `feeds`"),
])
def test_bad_plans_are_refused_with_the_key_named(changes, message, tmp_path, capsys):
    if "train" in changes and changes["train"] and "config" in changes["train"]:
        changes["train"] = {**yaml.safe_load((PLAN_ROOT / "quick.yaml").read_text())["train"], **changes["train"]}
    path = _write_plan(tmp_path, **changes)
    with pytest.raises(PlanError) as err:
        load_plan(path, out=tmp_path / "out").stages()
    assert message in str(err.value) and str(path) in str(err.value)
    assert rs_run([str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_set_key_that_walks_into_a_list_is_named(tmp_path):
    raw = yaml.safe_load((PLAN_ROOT / "quick.yaml").read_text())
    train = {**raw["train"], "config": str(PLAN_ROOT / raw["train"]["config"]),
             "set": {"trainer.callbacks.path": "x"}}
    path = _write_plan(tmp_path, train=train)
    with pytest.raises(PlanError, match=r"train.set.trainer.callbacks.path: 'trainer.callbacks' is a list"):
        load_plan(path)


def test_an_unknown_plan_name_lists_the_shipped_ones(tmp_path, capsys):
    assert rs_run(["nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no plan file 'nope'" in err and "quick" in err and "demo" in err


def test_resources_ask_lightning_for_the_same_devices(tmp_path):
    """A multi-GPU stage's trainer asks for gpus x nodes devices, as the SLURM job gives it tasks."""
    raw = yaml.safe_load((PLAN_ROOT / "quick.yaml").read_text())
    train = {**raw["train"], "config": str(PLAN_ROOT / raw["train"]["config"]),
             "resources": {"gpus": 4, "nodes": 2, "cpus": 8, "time_min": 600}}
    stages = load_plan(_write_plan(tmp_path, train=train), out=tmp_path / "o").stages()
    trainer = stages[1].config["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", 4, 2)
    assert stages[1].resources == {"gpus": 4, "nodes": 2, "cpus": 8, "time_min": 600}


def test_paper_plans_ask_a_cluster_for_gpus_and_name_missing_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("COCO", raising=False)
    with pytest.raises(PlanError, match=r"train.set.data.init_args.root uses \$\{COCO\}, but the environment has no "
                                        r"COCO"):
        load_plan("coco_captioning")
    monkeypatch.setenv("COCO", "/data/coco")
    stages = load_plan("coco_captioning", out=tmp_path).stages()
    assert stages[0].config["data"]["init_args"]["root"] == "/data/coco"
    news = load_plan("news_summary", out=tmp_path / "news").stages()
    assert [s.kind for s in news] == ["expert", "expert", "morl", "morl", "morl", "front"]  # the init is given
    assert all(s.resources["gpus"] == 1 for s in news)
    export = [c for c in news[0].config["trainer"]["callbacks"] if c["class_path"].endswith("ExportExpert")]
    # the base config's export settings stay (a checkpoint every 10 iterations), its folder is the stage's
    assert export == [{"class_path": "rs_lightning.tasks.text.export.ExportExpert",
                       "init_args": {"every_n_iterations": 10, "dirpath": str(news[0].output)}}]
