"""`rs front` end to end through rs_lightning.cli.main on the shipped toy configs (seconds)."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rs_lightning import cli
from rs_lightning.tasks.toy import quadratic

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "front"


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Run in a temp folder (the configs use relative paths) with the closed-form checkpoints written."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "quadratic.yaml"
    shutil.copy(CONFIGS / "quadratic.yaml", config)
    assert quadratic.main(["--config", str(config)]) == 0
    return config


def test_front_sweep_select_and_report(toy, capsys):
    out = Path("runs/front/quadratic")
    assert cli.main(["front", "--config", str(toy), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "front.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 9 + 1 + 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rewards"] == ["r1", "r2"] and summary["invalid_points"] == []
    assert summary["normalisation"]["source"].startswith("config")
    assert summary["hypervolume"]["rs"] > summary["hypervolume"]["experts"]
    assert summary["lmc"]["per_reward"]["r1"]["min"] > 0
    assert summary["plots"] == ["front.png"] and (out / "front.png").stat().st_size > 10_000
    for name in ("run.json", "config.yaml"):
        assert (out / name).exists()
    assert "hypervolume" in capsys.readouterr().out

    # The same command again resumes: nothing is recomputed, the rows are untouched.
    before = (out / "front.jsonl").read_text()
    assert cli.main(["front", "--config", str(toy), "--no-progress"]) == 0
    assert (out / "front.jsonl").read_text() == before

    # A wider grid reuses the rows it shares with the first one (the grid is not in the config hash).
    assert cli.main(["front", "--config", str(toy), "--no-progress", "--front.grid.points", "21"]) == 0
    assert (out / "front.jsonl").read_text().startswith(before)
    assert len((out / "front.jsonl").read_text().splitlines()) == len(rows) + 10

    capsys.readouterr()
    code = cli.main(["front", "select", "--preference", "0.3", "0.7", str(out), "--write-soup", "soup"])
    assert code == 0
    picked = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert picked["lambda_star"] == pytest.approx([0.3, 0.7])  # symmetric Hessians: lam* = mu here
    assert load_file("soup/model.safetensors")["theta"].tolist() == pytest.approx([0.3, 0.7])

    assert picked["split"] == "val"  # the default: the sweep validated (front.validate defaults to true)

    # `report` re-derives summary.json from the rows alone, intervals included.
    (out / "summary.json").unlink()
    assert cli.main(["front", "report", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["uncertainty"]["n_examples"] == 8 and again["uncertainty"]["n_boot"] == 1000
    assert set(again["verdicts"]) == {"rs_vs_morl", "lmc", "experts"}
    assert again["selection"]["split"] == "val"


def test_selection_on_test_rows_only_when_asked_and_labelled(toy, capsys):
    from rs_lightning.front.select import TEST_NOTE

    out = Path("runs/front/quadratic")
    # No validation rows but selection on them (the default): refused before any point runs.
    assert cli.main(["front", "--config", str(toy), "--no-progress", "--front.validate", "false"]) == 2
    assert "front.summary.select_on: test" in capsys.readouterr().err
    assert not (out / "front.jsonl").exists()
    assert cli.main(["front", "--config", str(toy), "--no-progress", "--front.validate", "false",
                     "--front.summary.select_on", "test"]) == 0
    assert f"lam*: {TEST_NOTE}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"]["split"] == "test"
    assert summary["selection"]["note"] == "selected on TEST rows (asked for explicitly): optimistic"

    assert cli.main(["front", "select", "--preference", "0.3", "0.7", str(out)]) == 2  # --split val by default
    assert "no val_rewards" in (err := capsys.readouterr().err) and "--split test" in err
    assert cli.main(["front", "select", "--preference", "0.3", "0.7", str(out), "--split", "test"]) == 0
    printed = capsys.readouterr()
    picked = json.loads(printed.out)
    assert picked["split"] == "test" and picked["note"] == TEST_NOTE and TEST_NOTE in printed.err
    assert picked["lambda_star"] == pytest.approx([0.3, 0.7])


def test_front_errors_are_clear(toy, capsys):
    assert cli.main(["front", "--config", str(toy), "--front.experts", "[]"]) == 2
    assert "front.experts is empty" in capsys.readouterr().err
    assert cli.main(["front", "--config", str(toy), "--front.grid.points", "0"]) == 2
    assert "grid is empty" in capsys.readouterr().err
    assert cli.main(["front", "--config", str(toy), "--front.grid.low", "-0.5"]) == 2
    assert "allow_extrapolation" in capsys.readouterr().err
    assert cli.main(["front", "--config", str(toy), "--front.summary.nadir", "[0.0]"]) == 2
    assert "disagree on the number of rewards" in capsys.readouterr().err
    assert not Path("runs/front/quadratic/front.jsonl").exists()  # refused before any point ran
    assert cli.main(["front", "--config", str(toy), "--front.nonsense", "1"]) == 2
    assert "rs front --help" in capsys.readouterr().err
    assert cli.main(["front", "--config", str(toy), "--no-progress"]) == 0
    # Same out_dir, different model: the rows on disk would not be comparable.
    assert cli.main(["front", "--config", str(toy), "--model.init_args.peaks", "[2.0, 2.0]"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["front", "select", "--preference", "1", "runs/front/quadratic"]) == 2
    assert "one per reward" in capsys.readouterr().err


def test_front_help_states_the_weight_convention(capsys):
    assert cli.main(["front", "--help"]) == 0
    assert "weight of the SECOND expert" in capsys.readouterr().out
    assert cli.main(["front", "select", "--help"]) == 0
    assert "SECOND" in capsys.readouterr().out


def test_three_reward_config_draws_a_radar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert quadratic.main(["--config", str(CONFIGS / "quadratic3.yaml")]) == 0
    assert cli.main(["front", "--config", str(CONFIGS / "quadratic3.yaml"), "--no-progress"]) == 0
    summary = json.loads(Path("runs/front/quadratic3/summary.json").read_text())
    assert summary["plots"] == ["radar.png", "front_pairs.png"] and summary["n_points"] == 3 + 12 + 1 + 1 + 1
