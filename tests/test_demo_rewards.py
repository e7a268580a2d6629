"""`rs demo --rewards`: the captioning demo over 2 to 5 of the paper's metrics (the plan, the checks, the report).

The pipeline itself runs in test_demo.py (two rewards, quick profile); here the plan for N rewards is checked
stage by stage without training anything, and the report's N-reward labels on hand-written rows.
"""

import json

import pytest

from rs_lightning.commands.demo import build_parser, check_args
from rs_lightning.demo import captioning
from rs_lightning.demo.pipeline import default_preferences, simplex_design
from rs_lightning.demo.report import replicate_figures

FIVE = ["bleu1", "bleu4", "rouge_l", "meteor", "cider_d"]


def test_simplex_design_is_experts_pair_midpoints_and_the_uniform_soup():
    design = simplex_design(3)
    assert design == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5],
                      [0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    assert len(simplex_design(5)) == 5 + 10 + 1  # bounded: not the m^(N-1) lattice
    assert all(abs(sum(w) - 1.0) < 1e-12 and min(w) >= 0 for w in simplex_design(5))


def test_the_plan_for_five_metrics(tmp_path):
    stages = captioning.plan(tmp_path, replicates=1, rewards=FIVE)
    kinds = [s.kind for s in stages]
    assert kinds == ["init"] + ["expert"] * 5 + ["morl", "front"]
    experts = [s for s in stages if s.kind == "expert"]
    for i, (stage, reward) in enumerate(zip(experts, FIVE)):
        args = stage.config["model"]["init_args"]
        assert stage.name == f"r0-expert-{reward}"
        assert args["rewards"] == FIVE and args["reward_weights"] == [1.0 if j == i else 0.0 for j in range(5)]
        assert args["eval_metrics"] == FIVE
    morl = stages[-2].config["model"]["init_args"]
    assert morl["reward_weights"] == [0.2] * 5
    front = stages[-1].config
    assert front["model"]["init_args"]["eval_metrics"] == FIVE
    spec = front["front"]
    assert spec["grid"] == {"kind": "explicit", "weights": simplex_design(5)}
    assert spec["morl"][0]["mu"] == [0.2] * 5
    assert spec["summary"]["rewards"] == FIVE
    assert spec["summary"]["ideal"] == [1.0, 1.0, 1.0, 1.0, 10.0]  # CIDEr-D lives in [0, 10]
    assert spec["summary"]["preferences"][0] == [0.2] * 5 and len(spec["summary"]["preferences"]) == 6
    # Two rewards: the demo as it always was (the lam sweep, MORL at 0.5).
    two = captioning.plan(tmp_path, replicates=1)
    assert two[-1].config["front"]["grid"]["kind"] == "sweep" and two[-1].config["front"]["morl"][0]["mu"] == [0.5,
                                                                                                                0.5]


@pytest.mark.parametrize("argv, message", [
    (["--rewards", "bleu1"], "--rewards needs 2 to 5 distinct captioning rewards, got bleu1"),
    (["--rewards", "bleu1", "bleu1"], "--rewards needs 2 to 5 distinct captioning rewards"),
    (["--rewards", "bleu1", "spice"],
     "unknown captioning reward 'spice' (choose from bleu1 bleu4 rouge_l meteor cider_d)"),
    (["--task", "text", "--rewards", "bleu1", "rouge_l"],
     "unknown text reward 'bleu1' (choose from vader relevance concise)"),
    (["--task", "text", "--rewards", "vader"], "--rewards needs 2 to 3 distinct text rewards, got vader"),
])
def test_bad_rewards_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    p = build_parser()
    args = p.parse_args([*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        check_args(p, args)
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_other_rewards_get_their_own_folder(tmp_path):
    p = build_parser()
    assert check_args(p, p.parse_args(["--out", str(tmp_path)])).name == "captioning"
    assert check_args(p, p.parse_args(["--out", str(tmp_path), "--rewards", "bleu1", "rouge_l"])).name == "captioning"
    folder = check_args(p, p.parse_args(["--out", str(tmp_path), "--quick", "--rewards", *FIVE])).name
    assert folder == "captioning-bleu1-bleu4-rouge_l-meteor-cider_d-quick"


def test_the_report_names_the_uniform_soup_and_morl_for_three_rewards(tmp_path):
    names = ["a", "b", "c"]
    rows = [{"kind": "expert", "name": n, "weights": [1.0 if j == i else 0.0 for j in range(3)],
             "rewards": {m: float(i == k) for k, m in enumerate(names)}} for i, n in enumerate(names)]
    rows.append({"kind": "soup", "name": "w=0.33,0.33,0.33", "weights": [1 / 3] * 3,
                 "rewards": {m: 0.4 for m in names}})
    rows.append({"kind": "morl", "name": "morl", "weights": None, "mu": [1 / 3] * 3,
                 "rewards": {m: 0.3 for m in names}})
    for row in rows:
        row.update(valid=True, invalid_rewards=[], samples=1)
    (tmp_path / "front.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"rewards": names}))
    figures = replicate_figures(tmp_path, names)
    assert list(figures["policies"]) == ["expert a", "expert b", "expert c", "uniform soup", "MORL uniform mu"]
    assert figures["policies"]["uniform soup"]["a"]["value"] == 0.4


def test_the_text_plan_with_a_third_reward_that_pulls_against_the_others(tmp_path):
    from rs_lightning.demo import text

    three = ["vader", "relevance", "concise"]
    stages = text.plan(tmp_path, replicates=1, rewards=three)
    assert [s.kind for s in stages] == ["init", "expert", "expert", "expert", "morl", "morl", "morl", "morl", "front"]
    # MORL at every preference lam* is selected for: one training each, each in its own folder, each in the sweep.
    morl = [s for s in stages if s.kind == "morl"]
    assert [s.mu for s in morl] == default_preferences(3)
    assert [s.name for s in morl] == ["r0-morl", "r0-morl-0.6-0.2-0.2", "r0-morl-0.2-0.6-0.2", "r0-morl-0.2-0.2-0.6"]
    assert len({s.output for s in morl}) == 4 and morl[0].output == tmp_path / "rep0" / "morl" / "expert"
    assert [s.config["model"]["init_args"]["reward_weights"] for s in morl] == default_preferences(3)
    assert stages[-1].config["front"]["morl"] == [
        {"path": str(s.output), "mu": s.mu, "name": name}
        for s, name in zip(morl, ["morl", "morl mu=0.6,0.2,0.2", "morl mu=0.2,0.6,0.2", "morl mu=0.2,0.2,0.6"])]
    assert set(stages[-1].needs) == {s.name for s in stages[:-1]}
    for stage in stages[:-1]:
        args = stage.config["model"]["init_args"]
        assert [r["init_args"]["name"] for r in args["rewards"]] == three
        assert len(args["reward_weights"]) == 3
    concise = stages[0].config["model"]["init_args"]["rewards"][2]
    assert concise["class_path"] == "rs_lightning.rewards.rules.LengthReward" and concise["init_args"]["target"] == 8
    assert len(stages[-1].config["model"]["init_args"]["reward_weights"]) == 3  # the sweep's module builds too
    front = stages[-1].config["front"]
    assert front["grid"] == {"kind": "explicit", "weights": simplex_design(3)}
    assert front["summary"]["nadir"] == [-1.0, 0.0, -2.0] and front["summary"]["ideal"] == [1.0, 1.0, 0.0]
    # The default is the demo as it was: the two shipped rewards, the lam sweep.
    two = text.plan(tmp_path, replicates=1)
    assert [r["init_args"]["name"] for r in two[0].config["model"]["init_args"]["rewards"]] == ["vader", "relevance"]
    assert two[-1].config["front"]["grid"]["kind"] == "sweep"
    assert [s.name for s in two if s.kind == "morl"] == ["r0-morl"]
    assert two[-1].config["front"]["morl"] == [{"path": str(tmp_path / "rep0" / "morl" / "expert"), "mu": [0.5, 0.5],
                                                "name": "morl"}]
    p = build_parser()
    assert check_args(p, p.parse_args(["--out", str(tmp_path), "--task", "text", "--rewards", *three])).name == (
        "text-vader-relevance-concise")
