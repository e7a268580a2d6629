"""The front-quality comparison (RS vs MORL fronts of 1, 3, 5 preferences): scores on hand-made sweeps, the plan
it runs, and clear errors when a MORL run is missing."""

from pathlib import Path

import pytest

from rs_lightning.demo import front_quality as fq

REWARDS = ["bleu1", "rouge_l"]


def _row(kind, name, b, r, mu=None):
    return {"kind": kind, "name": name, "mu": mu, "rewards": {"bleu1": b, "rouge_l": r, "cider_d": 1.0}}


def _rows():
    rows = [_row("expert", "bleu1", 0.8, 0.2), _row("expert", "rouge_l", 0.2, 0.8), _row("soup", "lam=0.5", 0.6, 0.6),
            _row("init", "init", 0.1, 0.1)]
    rows += [_row("morl", f"morl mu={m:g}", 0.5, 0.5, mu=fq._mu(m)) for m in (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9)]
    rows[-1]["rewards"].update(bleu1=0.1, rouge_l=0.9)  # mu=0.9 leans to ROUGE-L
    return rows


def test_scores_each_method_on_its_own_points():
    timings = {"r0-expert-bleu1": {"seconds": 60.0}, "r0-expert-rouge_l": {"seconds": 120.0},
               "r0-morl": {"seconds": 30.0}}
    result = fq.score(_rows(), REWARDS, timings)
    table = {row["method"]: row for row in result["methods"]}
    assert list(table) == ["RS (11 soups of 2 experts)", "MORL, 1 preference", "MORL, 3 preferences",
                           "MORL, 5 preferences", "MORL, all 7 preferences"]
    rs = table["RS (11 soups of 2 experts)"]
    # Hand computation with reference (-0.1, -0.1): staircase over (0.8,0.2), (0.6,0.6), (0.2,0.8).
    expected = (0.2 + 0.1) * 0.9 + (0.6 - 0.2) * 0.7 + (0.8 - 0.6) * 0.3  # slices along bleu1: 0.61
    assert rs["hypervolume"] == pytest.approx(expected)
    assert rs["trainings"] == 2 and rs["points"] == 3 and rs["training_minutes"] == 3.0
    one = table["MORL, 1 preference"]
    assert one["hypervolume"] == pytest.approx(0.6 * 0.6) and one["training_minutes"] == 0.5
    assert table["MORL, 3 preferences"]["hypervolume"] == pytest.approx(0.36)  # three equal points
    five = table["MORL, 5 preferences"]
    assert five["hypervolume"] == pytest.approx(0.36 + 0.2 * (1.0 - 0.6))  # (0.1, 0.9) adds a strip
    assert five["training_minutes"] is None  # mu = 0.1 ... 0.9 have no timings here
    # IGD+ against the union front: RS holds every union point but (0.1, 0.9), which it misses by 0.1.
    assert rs["igd_plus"] == pytest.approx(0.1 / 4)
    assert rs["expected_utility"] > one["expected_utility"]
    assert "| RS (11 soups of 2 experts) | 2 | 3 |" in fq.format_table(result)


def test_missing_morl_run_is_named():
    rows = [r for r in _rows() if r["name"] != "morl mu=0.3"]
    with pytest.raises(ValueError, match=r"mu = \[0.3\]"):
        fq.score(rows, REWARDS)


def test_plan_reuses_the_demo_stages_and_adds_the_missing_morl_runs(tmp_path: Path):
    stages = fq.plan(tmp_path, profile="quick")
    names = [s.name for s in stages]
    assert names[:3] == ["r0-init", "r0-expert-bleu1", "r0-expert-rouge_l"]
    assert "r0-morl" in names  # mu = 0.5 is the demo's own MORL stage: same name, same output
    assert sorted(s.mu[1] for s in stages if s.kind == "morl") == [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9]
    assert all(abs(sum(s.mu) - 1.0) < 1e-12 for s in stages if s.kind == "morl")
    front = stages[-1]
    assert front.kind == "front" and front.output == tmp_path / "front_quality" / "summary.json"
    assert len(front.config["front"]["morl"]) == 7
    assert set(front.needs) == {s.name for s in stages[:-1]}  # the sweep waits for every training
