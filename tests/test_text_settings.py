"""The text module's settings groups (rs_lightning/tasks/text/settings.py): what a Python caller may pass (the
dataclass, a dict of some fields, nothing), the checks that name the key, the nested keys LightningCLI shows with
their field docs, one review config for every run of the task, and configs written before the groups."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from rs_lightning.tasks.text import settings as st

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text"
MODULE = "rs_lightning.tasks.text.module.TextPPOModule"


def test_coerce_takes_an_instance_a_partial_dict_or_none():
    given = st.PPOSettings(lr=1e-3)
    assert st.coerce("ppo", given) is given
    assert st.coerce("ppo", None) == st.PPOSettings()
    part = st.coerce("lora", {"r": 8, "target_modules": ("q_proj",)})
    assert (part.r, part.alpha, part.target_modules) == (8, 16, ["q_proj"])  # the other fields keep their defaults
    rollout = st.coerce("rollout", {"response_length": [4, 6]})
    assert rollout.response_length == (4, 6)
    assert st.as_dict(rollout)["response_length"] == [4, 6]  # plain data for hparams and hparams.yaml


def test_unknown_keys_and_wrong_types_are_named():
    with pytest.raises(ValueError, match=r"model.lora has no key 'rank': its keys are r, alpha, dropout, "
                                         r"target_modules, init_adapter, init_seed"):
        st.coerce("lora", {"rank": 8})
    with pytest.raises(ValueError, match=r"model.kl must be a KLSettings or a dict of its fields, got float 0.1"):
        st.coerce("kl", 0.1)


@pytest.mark.parametrize("group, fields, message", [
    ("ppo", {"advantage": "a2c"}, r"model.ppo.advantage must be one of \('gae', 'sequence', 'rloo'\), got 'a2c'"),
    ("ppo", {"whiten": "all"}, r"model.ppo.whiten must be one of \('minibatch', 'batch'\), got 'all'"),
    ("ppo", {"advantage": "rloo", "rloo_k": 1}, r"model.ppo.rloo_k must be an integer >= 2 .*got 1"),
    ("kl", {"reference": "sft"}, r"model.kl.reference must be one of \('init', 'base'\), got 'sft'"),
    ("rollout", {"length_sampling": "token"}, r"model.rollout.length_sampling must be one of"),
    ("rollout", {"response_length": [8, 4]}, r"model.rollout.response_length must be \[low, high\]"),
    ("scoring", {"prompt_field": "question"}, r"model.scoring.prompt_field must be one of \('prompts', "),
    ("scoring", {"normalization": "zscore"}, r"model.scoring.normalization must be one of"),
    ("lora", {"target_modules": "q_proj"}, r"model.lora.target_modules must be a list of module names"),
])
def test_each_group_checks_its_choices_naming_the_key(group, fields, message):
    with pytest.raises(ValueError, match=message):
        st.coerce(group, fields)


def test_groups_are_frozen_and_documented():
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.PPOSettings().lr = 1.0  # type: ignore[misc]
    for cls in st.GROUPS.values():
        for f in dataclasses.fields(cls):
            assert f"        {f.name}: " in cls.__doc__, f"{cls.__name__}.{f.name} has no line in its docstring"


def test_module_takes_dicts_and_instances_and_saves_plain_hparams():
    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.tasks.text.module import TextPPOModule

    module = TextPPOModule(model="tiny-random", rewards=[KeywordReward(["e"], name="e")],
                           lora={"r": 2, "target_modules": ["q_proj"]}, ppo=st.PPOSettings(advantage="sequence"),
                           rollout={"eval_max_new_tokens": 3})
    assert module.settings.lora.r == 2 and module.settings.ppo.critic_free and module.value_head is None
    assert module.settings.kl == st.KLSettings() and module.settings.rollout.eval_max_new_tokens == 3
    # Checkpoints and hparams.yaml hold plain dicts, whatever form the caller gave.
    assert module.hparams["ppo"] == st.as_dict(st.PPOSettings(advantage="sequence"))
    assert module.hparams["lora"]["target_modules"] == ["q_proj"]
    assert module.hparams["scoring"]["prompt_field"] == "prompts"
    with pytest.raises(ValueError, match="model.rollout has no key 'max_new_tokens'"):
        TextPPOModule(model="tiny-random", rewards=[KeywordReward(["e"], name="e")], rollout={"max_new_tokens": 3})


def _parse(*args: str):
    """LightningCLI's own parser on `args`, nothing instantiated."""
    from lightning.pytorch.cli import LightningCLI

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False, args=list(args)).config


def test_cli_nested_keys_override_one_field_and_keep_the_others():
    config = _parse("--config", str(CONFIGS / "review.yaml"), "--model.init_args.ppo.lr", "1e-3",
                    "--model.reward_weights", "[0, 1]", "--trainer.default_root_dir", "runs/x")
    args = config.model.init_args
    assert args.ppo.lr == 1e-3 and args.ppo.advantage == "sequence" and args.ppo.epochs == 1  # the rest: the YAML's
    assert args.ppo.gae_lambda == 0.95  # not in the YAML: the default
    assert args.lora.r == 8 and list(args.reward_weights) == [0.0, 1.0]
    assert config.trainer.default_root_dir == "runs/x"
    callbacks = [c for c in config.trainer.callbacks if c.class_path.endswith("ExportExpert")]
    assert callbacks and callbacks[0].init_args.dirpath is None  # the expert follows default_root_dir
    assert config.trainer.logger is None  # Lightning's default logger: under default_root_dir too


def test_cli_refuses_a_misspelt_group_key_naming_it(capsys):
    from rs_lightning.cli import main as rs_main

    code = rs_main(["fit", "--config", str(CONFIGS / "smoke.yaml"), "--model.ppo.lrr=1e-3"])
    err = capsys.readouterr().err
    assert code == 2 and "lrr" in err and len(err.strip().splitlines()) == 1, err


def test_cli_help_lists_the_nested_keys_with_their_field_docs(capsys):
    from rs_lightning.cli import main as rs_main

    try:
        code = rs_main(["fit", "--model.help", MODULE])
    except SystemExit as exit_:
        code = exit_.code
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert code == 0
    for key, doc in (("--model.lora.r", "LoRA rank (paper 16)"), ("--model.ppo.lr", "Adam learning rate"),
                     ("--model.kl.reference", "frozen copy of `model.lora.init_adapter`"),
                     ("--model.rollout.eval_max_new_tokens", "greedy decoding length"),
                     ("--model.scoring.prompt_field", "the batch field the rewards receive")):
        assert key in out and doc in out, (key, doc)


def test_review_config_trains_any_run_into_default_root_dir(tmp_path):
    """One config for the experts and MORL: mu and the output folder on the command line; the expert and the
    metrics land under trainer.default_root_dir (the tiny model and 1 iteration: seconds)."""
    from rs_lightning.cli import main as rs_main

    root = tmp_path / "relevance"
    code = rs_main(["fit", "--config", str(CONFIGS / "review.yaml"), "--model.model=tiny-random",
                    "--data.tokenizer=tiny-random", "--data.num_train=4", "--data.num_val=0", "--data.num_test=0",
                    "--data.batch_size=4", "--model.rollout.response_length=[4, 4]", "--trainer.limit_train_batches=1",
                    "--model.reward_weights=[0, 1]", f"--trainer.default_root_dir={root}",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                    "--trainer.enable_checkpointing=false"])
    assert code == 0
    info = json.loads((root / "expert" / "expert.json").read_text())
    # The flat keys experts have always written, whatever the module's groups.
    assert info["reward_weights"] == [0.0, 1.0] and info["advantage"] == "sequence" and info["lora_init_seed"] == 0
    assert {"base_model", "reward_normalization", "init_adapter", "kl_reference"} <= set(info)
    assert list(root.glob("lightning_logs/version_0/metrics.csv"))


def test_flat_keys_of_older_configs_move_into_their_groups(tmp_path):
    old = {"model": "tiny-random", "lora_r": 4, "target_modules": ["q_proj"], "advantage": "rloo", "rloo_k": 4,
           "init_kl_coef": 0.05, "kl_reference": "base", "eval_max_new_tokens": 6, "reward_prompt_field": "inputs",
           "reward_weights": [0.5, 0.5], "lora": {"alpha": 8}}
    new = st.upgrade_flat_keys(old)
    assert new == {"model": "tiny-random", "reward_weights": [0.5, 0.5],
                   "lora": {"alpha": 8, "r": 4, "target_modules": ["q_proj"]},
                   "ppo": {"advantage": "rloo", "rloo_k": 4}, "kl": {"init_coef": 0.05, "reference": "base"},
                   "rollout": {"eval_max_new_tokens": 6}, "scoring": {"prompt_field": "inputs"}}
    assert set(st.FLAT_KEYS) == {  # every flat argument the module had
        "lora_r", "lora_alpha", "lora_dropout", "target_modules", "init_adapter", "lora_init_seed", "lr", "ppo_epochs",
        "mini_batch_size", "advantage", "rloo_k", "gamma", "gae_lambda", "cliprange", "cliprange_value", "vf_coef",
        "max_grad_norm", "whiten", "init_kl_coef", "adaptive_kl", "kl_target", "kl_horizon", "kl_reference",
        "response_length", "length_sampling", "ignore_eos", "top_k", "top_p", "temperature", "eval_max_new_tokens",
        "reward_normalization", "reward_mean", "reward_std", "reward_includes_prefix", "reward_prompt_field"}
    for group, name in st.FLAT_KEYS.values():
        assert name in {f.name for f in dataclasses.fields(st.GROUPS[group])}
    # `rs serve` reads an `rs front` run made before the groups with its flat keys moved.
    from rs_lightning.serve.session import _read_config

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": MODULE, "init_args": old},
                                                          "front": {"out_dir": str(tmp_path)}}))
    assert _read_config(tmp_path)["model"]["init_args"] == new


def test_demo_profiles_set_nested_settings_and_each_stage_config_parses(tmp_path):
    from rs_lightning.demo import text

    stages = text.plan(tmp_path, replicates=2, profile="quick")
    trainings = [s for s in stages if s.kind != "front"]
    assert len(trainings) == 8  # 2 replicates x (init, 2 experts, MORL)
    for stage in trainings:
        args = stage.config["model"]["init_args"]
        assert args["rollout"]["response_length"] == [8, 8] and args["rollout"]["eval_max_new_tokens"] == 8
        assert args["rollout"]["ignore_eos"] is False  # the review config's own field stays next to the profile's
        assert args["lora"]["init_seed"] == stage.seed and args["lora"]["r"] == 8  # a replicate's own theta_0
        path = tmp_path / f"{stage.name}.yaml"
        path.write_text(yaml.safe_dump(stage.config))
        parsed = _parse("--config", str(path)).model.init_args
        assert tuple(parsed.rollout.response_length) == (8, 8) and parsed.lora.init_seed == stage.seed
    config = {"model": {"init_args": {}}, "data": {"init_args": {}}}
    text.set_path(config, "model.kl.init_coef", 0.3)
    assert config["model"]["init_args"] == {"kl": {"init_coef": 0.3}}
    with pytest.raises(ValueError, match="profile override 'trainer.max_epochs'"):
        text.set_path(config, "trainer.max_epochs", 2)
    with pytest.raises(ValueError, match="'model.model.name': 'model' is not a group of settings"):
        text.set_path({"model": {"init_args": {"model": "x"}}}, "model.model.name", 1)
