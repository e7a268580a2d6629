"""The captioning module's settings groups (rs_lightning/tasks/captioning/settings.py): what a Python caller may
pass (the dataclass, a dict of some fields, nothing), the checks that name the key, the nested keys LightningCLI
shows with their field docs, the demo's nested overrides, and configs written before the groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rs_lightning.tasks.captioning import settings as st

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "captioning"
MODULE = "rs_lightning.tasks.captioning.module.CaptioningModule"


def test_coerce_takes_an_instance_a_partial_dict_or_none():
    given = st.DecodingSettings(beam_size=3)
    assert st.coerce("decoding", given) is given
    assert st.coerce("scst", None) == st.SCSTSettings()
    optim = st.coerce("optim", {"lr": 1e-4, "betas": [0.8, 0.9]})
    assert (optim.lr, optim.betas, optim.min_lr) == (1e-4, (0.8, 0.9), 5e-7)  # the other fields keep their defaults
    assert st.as_dict(optim)["betas"] == [0.8, 0.9]  # plain data for hparams and hparams.yaml
    assert st.coerce("clip", {"model": "ViT-B-32"}) == st.CLIPSettings(model="ViT-B-32", pretrained=None)


def test_unknown_keys_and_wrong_types_are_named():
    with pytest.raises(ValueError, match=r"model.decoding has no key 'beam': its keys are max_length, eval_decoding, "
                                         r"beam_size, length_penalty"):
        st.coerce("decoding", {"beam": 3})
    with pytest.raises(ValueError, match=r"model.scst must be a SCSTSettings or a dict of its fields, got int 5"):
        st.coerce("scst", 5)


@pytest.mark.parametrize("group, fields, message", [
    ("decoding", {"eval_decoding": "nucleus"},
     r"model.decoding.eval_decoding must be one of \('beam', 'greedy'\), got 'nucleus'"),
    ("decoding", {"beam_size": 0}, r"model.decoding.beam_size must be an integer >= 1, got 0"),
    ("decoding", {"max_length": 2.5}, r"model.decoding.max_length must be an integer >= 1, got 2.5"),
    ("scst", {"baseline": "mean"}, r"model.scst.baseline must be one of \('leave_one_out', 'greedy'\), got 'mean'"),
    ("scst", {"num_samples": 1}, r"model.scst.num_samples must be >= 2 with baseline 'leave_one_out'"),
    ("optim", {"betas": [0.9]}, r"model.optim.betas must be \[beta1, beta2\], got \[0.9\]"),
    ("optim", {"lr": 0.0}, r"model.optim.lr must be > 0, got 0.0"),
    ("optim", {"anneal": 1.5}, r"model.optim.anneal must be in \(0, 1\]"),
    ("optim", {"warmup_steps": 0}, r"model.optim.warmup_steps must be an integer >= 1, got 0"),
    ("optim", {"anneal_every": 0}, r"model.optim.anneal_every must be an integer >= 1, got 0"),
    ("optim", {"label_smoothing": 1.0}, r"model.optim.label_smoothing must be in \[0, 1\)"),
])
def test_each_group_checks_its_values_naming_the_key(group, fields, message):
    with pytest.raises(ValueError, match=message):
        st.coerce(group, fields)


def test_a_greedy_baseline_takes_one_sample():
    assert st.coerce("scst", {"baseline": "greedy", "num_samples": 1}).num_samples == 1


def test_groups_are_frozen_and_documented():
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.OptimSettings().lr = 1.0  # type: ignore[misc]
    for cls in st.GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f"        {f.name}: " in cls.__doc__, f"{cls.__name__}.{f.name} has no line in its docstring"


def test_module_takes_dicts_and_instances_and_saves_plain_hparams():
    from rs_lightning.tasks.captioning.module import CaptioningModule

    module = CaptioningModule(stage="xe", eval_metrics=[], optim={"lr": 2e-3, "betas": (0.8, 0.9)},
                              decoding=st.DecodingSettings(eval_decoding="greedy", max_length=8))
    assert module.settings.optim.lr == 2e-3 and module.settings.decoding.max_length == 8
    assert module.settings.scst == st.SCSTSettings() and module.settings.clip == st.CLIPSettings()
    # Checkpoints and hparams.yaml hold plain dicts, whatever form the caller gave.
    assert module.hparams["decoding"] == st.as_dict(st.DecodingSettings(eval_decoding="greedy", max_length=8))
    assert module.hparams["optim"]["betas"] == [0.8, 0.9] and module.hparams["scst"]["sample_seed"] == 0
    assert "beam_size" not in module.hparams  # no flat key left
    with pytest.raises(ValueError, match="model.scst has no key 'samples'"):
        CaptioningModule(stage="xe", eval_metrics=[], scst={"samples": 3})
    with pytest.raises(ValueError, match=r"model.stage must be one of \('xe', 'scst'\), got 'rl'"):
        CaptioningModule(stage="rl", eval_metrics=[])


def _parse(*args: str):
    """LightningCLI's own parser on `args`, nothing instantiated."""
    from unittest import mock

    from lightning.pytorch.cli import LightningCLI

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    with mock.patch("sys.argv", ["rs"]):  # LightningCLI warns when pytest's own arguments are in sys.argv
        return ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False, args=list(args)).config


def test_cli_nested_keys_override_one_field_and_keep_the_others():
    config = _parse("--config", str(CONFIGS / "scst_bleu1.yaml"), "--model.init_args.decoding.eval_decoding", "greedy",
                    "--model.init_args.scst.sample_seed=3", "--model.reward_weights", "[1]")
    args = config.model.init_args
    assert args.decoding.eval_decoding == "greedy" and args.scst.sample_seed == 3  # the overrides
    assert args.decoding.beam_size == 5 and args.decoding.max_length == 20 and args.optim.lr == 1e-4  # the YAML's
    assert args.decoding.length_penalty == 1.0 and args.optim.eps == 1e-9  # not in the YAML: the defaults
    assert args.clip.model == "clip-tiny" and list(args.reward_weights) == [1.0] and args.rewards == ["bleu1"]


@pytest.mark.parametrize("key", ["--model.init_args.decoding.beam_sise=3", "--model.scst.sample_sed=1"])
def test_cli_refuses_a_misspelt_group_key_naming_it(key, capsys):
    from rs_lightning.cli import main as rs_main

    code = rs_main(["fit", "--config", str(CONFIGS / "xe_init.yaml"), key])
    err = capsys.readouterr().err
    misspelt = key.split(".")[-1].split("=")[0]
    assert code == 2 and misspelt in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_misspelt_key_in_a_yaml_group(tmp_path, capsys):
    from rs_lightning.cli import main as rs_main

    cfg = yaml.safe_load((CONFIGS / "xe_init.yaml").read_text())
    cfg["model"]["init_args"]["optim"]["warmup"] = 5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert rs_main(["fit", "--config", str(path)]) == 2
    assert "warmup" in capsys.readouterr().err


def test_cli_help_lists_the_nested_keys_with_their_field_docs(capsys):
    from rs_lightning.cli import main as rs_main

    try:
        code = rs_main(["fit", "--model.help", MODULE])
    except SystemExit as exit_:
        code = exit_.code
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert code == 0
    for key, doc in (("--model.optim.lr", "RAdam learning rate"),
                     ("--model.decoding.eval_decoding", "decoding at validation/test/predict"),
                     ("--model.scst.sample_seed", "seeds the SCST samples"),
                     ("--model.clip.model", "open_clip CLIP config")):
        assert key in out and doc in out, (key, doc)


def test_flat_keys_of_older_configs_move_into_their_groups(tmp_path):
    old = {"model": "coca-tiny", "stage": "scst", "rewards": ["bleu1"], "reward_weights": None, "vocab": "train",
           "init_seed": 0, "corpus_metrics": False, "eval_metrics": ["bleu1"], "init_checkpoint": None,
           "num_samples": 5, "baseline": "leave_one_out", "sample_seed": 2, "max_length": 10,
           "eval_decoding": "greedy", "beam_size": 5, "length_penalty": 1.0, "lr": 1e-4, "betas": [0.9, 0.98],
           "eps": 1e-9, "weight_decay": 0.0, "warmup_steps": 1, "anneal": 0.8, "anneal_every": None, "min_lr": 5e-7,
           "label_smoothing": 0.0, "clip_model": "clip-tiny", "clip_pretrained": None,
           "decoding": {"beam_size": 3}}
    new = st.upgrade_flat_keys(old)
    assert new == {
        "model": "coca-tiny", "stage": "scst", "rewards": ["bleu1"], "reward_weights": None, "vocab": "train",
        "init_seed": 0, "corpus_metrics": False, "eval_metrics": ["bleu1"], "init_checkpoint": None,
        "scst": {"num_samples": 5, "baseline": "leave_one_out", "sample_seed": 2},
        "decoding": {"beam_size": 3, "max_length": 10, "eval_decoding": "greedy", "length_penalty": 1.0},
        "optim": {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-9, "weight_decay": 0.0, "warmup_steps": 1,
                  "anneal": 0.8, "anneal_every": None, "min_lr": 5e-7, "label_smoothing": 0.0},
        "clip": {"model": "clip-tiny", "pretrained": None}}
    for group, name in st.FLAT_KEYS.values():
        assert name in {f.name for f in dataclasses.fields(st.GROUPS[group])}
    assert {name for group in st.GROUPS.values() for name in (f.name for f in dataclasses.fields(group))} == {
        name for _, name in st.FLAT_KEYS.values()}  # every field of every group had a flat key
    # `rs serve` reads an `rs front` run made before the groups with its flat keys moved, and parses it.
    from rs_lightning.serve.session import _read_config

    data = yaml.safe_load((CONFIGS / "front_bleu1_rouge_l.yaml").read_text())["data"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": MODULE, "init_args": old},
                                                          "data": data, "front": {"out_dir": str(tmp_path)}}))
    cfg = _read_config(tmp_path)
    assert cfg["model"]["init_args"] == new
    from rs_lightning.front.config import build_parser

    args = build_parser().parse_object(cfg).model.init_args
    assert args.decoding.beam_size == 3 and args.decoding.eval_decoding == "greedy" and args.scst.sample_seed == 2


def test_demo_and_plan_configs_set_the_nested_keys_and_parse(tmp_path):
    from rs_lightning.demo import captioning
    from rs_lightning.plan.spec import load_plan

    stages = captioning.plan(tmp_path / "demo", replicates=2, profile="quick", points=3)
    plan = load_plan("quick", out=tmp_path / "plan").stages()
    for stage in [s for s in stages if s.kind != "front"] + [s for s in plan if s.kind != "front"]:
        args = stage.config["model"]["init_args"]
        if args["stage"] == "scst":
            assert args["scst"]["sample_seed"] == stage.seed and args["scst"]["num_samples"] == 5
            assert args["decoding"] == {"max_length": 20, "eval_decoding": "greedy", "beam_size": 5}
        else:
            assert args["init_seed"] == stage.seed and "scst" not in args
        path = tmp_path / f"{stage.name}.yaml"
        path.write_text(yaml.safe_dump(stage.config))
        parsed = _parse("--config", str(path)).model.init_args
        assert parsed.decoding.eval_decoding == "greedy" and parsed.optim.warmup_steps == args["optim"]["warmup_steps"]
    # A profile may set a field of a group: the group's other fields stay, a group the config lacks is skipped.
    config = {"model": {"init_args": {"decoding": {"max_length": 20}}}, "data": {"init_args": {}}}
    captioning._apply(config, {"model.decoding.eval_decoding": "beam", "model.scst.num_samples": 2,
                               "data.num_train": 8, "xe_epochs": 1})
    assert config == {"model": {"init_args": {"decoding": {"max_length": 20, "eval_decoding": "beam"}}},
                      "data": {"init_args": {"num_train": 8}}}
    with pytest.raises(ValueError, match="'model.stage.name': 'stage' is not a group of settings"):
        captioning._apply({"model": {"init_args": {"stage": "xe"}}}, {"model.stage.name": 1})
