"""`rs demo`: the whole pipeline on the quick profile, stage reuse on a second run, and the README's commands."""

import json
import subprocess
import sys

import pytest

from rs_lightning.cli import main


def run_demo(out) -> str:
    """`rs demo --quick` as a user runs it: in its own process (no state left by other tests)."""
    cmd = [sys.executable, "-m", "rs_lightning.cli", "demo", "--task", "captioning", "--quick", "--points", "5",
           "--replicates", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_readme_help_commands_work(capsys):
    for command in (["--help"], ["demo", "--help"], ["soup", "--help"], ["front", "--help"], ["serve", "--help"],
                    ["list"]):
        try:
            code = main(command)
        except SystemExit as exit_:  # argparse's --help
            code = exit_.code
        assert code == 0, command
    out = capsys.readouterr().out
    assert "weight of the SECOND" in out


def test_the_default_demo_runs_three_replicates():
    from rs_lightning.commands.demo import build_parser

    assert build_parser().parse_args([]).replicates == 3  # what `make demo` and the README's table run


def _planned(tmp_path, *argv):
    from rs_lightning.commands.demo import build_parser, planned_stages

    return planned_stages(build_parser().parse_args(list(argv)), tmp_path)


def test_family_defaults_text_runs_the_budget_recipe_in_bf16_and_captioning_stays_fp32(tmp_path):
    stages, settings = _planned(tmp_path, "--task", "text")
    assert settings["precision"] == "bf16-mixed" and settings["points"] == 6
    assert {s.config["trainer"]["precision"] for s in stages} == {"bf16-mixed"}  # trainings and sweeps alike
    training = next(s for s in stages if s.kind == "expert")
    assert training.config["model"]["init_args"]["ppo"]["lr"] == 1.0e-3
    assert training.config["trainer"]["limit_train_batches"] == 10
    front = next(s for s in stages if s.kind == "front")
    assert front.config["front"]["grid"]["points"] == 6
    # The arguments win over the family's defaults.
    stages, settings = _planned(tmp_path, "--task", "text", "--precision", "32-true", "--points", "11",
                                "--iterations", "15")
    assert all("precision" not in s.config["trainer"] for s in stages)  # Lightning's default: fp32
    assert next(s for s in stages if s.kind == "front").config["front"]["grid"]["points"] == 11
    assert next(s for s in stages if s.kind == "expert").config["trainer"]["limit_train_batches"] == 15
    stages, settings = _planned(tmp_path)
    assert settings["precision"] == "32-true" and settings["points"] == 11
    # Lightning's default: the captioning configs are written as they were before --precision existed, so their
    # front's config hash (and the reuse of a recorded run) is unchanged.
    assert all("precision" not in s.config["trainer"] for s in stages)
    stages, _ = _planned(tmp_path, "--precision", "bf16-mixed")
    assert {s.config["trainer"]["precision"] for s in stages} == {"bf16-mixed"}


def test_set_precision_refuses_an_unknown_precision():
    from rs_lightning.demo.pipeline import set_precision

    with pytest.raises(ValueError, match="precision must be one of 32-true, bf16-mixed, got '16-mixed'"):
        set_precision([], "16-mixed")


def _verdict_of(interval: dict, positive: str, negative: str) -> str:
    if interval["low"] > 0:
        return positive
    if interval["high"] < 0:
        return negative
    return "indistinguishable at 95 %"


def test_quick_captioning_demo_runs_replicates_and_reuses_stages(tmp_path):
    pytest.importorskip("open_clip")
    first = run_demo(tmp_path)
    out_dir = tmp_path / "captioning-quick"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["rewards"] == ["bleu1", "rouge_l"]
    assert len(report["replicates"]) == 2  # two independent replicates: the least that gives a pooled interval
    assert list(report["pooled_policies"])[:3] == ["init", "expert bleu1", "expert rouge_l"]
    assert report["compute"]["trainings"] == 8  # per replicate: XE init, 2 experts, MORL
    for r in range(2):
        rows = [json.loads(line) for line in (out_dir / f"rep{r}" / "front" / "front.jsonl").read_text().splitlines()]
        assert len(rows) == 5 + 1 + 1  # 5 lambdas (the endpoints are the experts), init, MORL
        assert all(row["val_rewards"] for row in rows)  # lam* is selected on validation rows
        assert (out_dir / f"rep{r}" / "front" / "front.png").exists()
        assert (out_dir / "logs" / f"r{r}-init.log").exists()
    # Replicates differ: their own init (data order and model seed), hence their own experts.
    a, b = ((out_dir / f"rep{r}" / "init" / "model.safetensors").read_bytes() for r in range(2))
    assert a != b
    # Every printed verdict is the one its interval gives, and the report prints each claim with its numbers.
    claims = {c["figure"]: c for c in report["claims"]}
    assert {"hv_rs_minus_morl", "gain_over_init_bleu1", "gain_over_init_rouge_l", "tradeoff_bleu1_vs_rouge_l",
            "lmc_mean_bleu1"} <= set(claims)
    for c in report["claims"]:
        positive, negative = c["labels"]
        pooled = c["pooled"]
        assert pooled["n"] == 2 and pooled["low"] <= pooled["value"] <= pooled["high"]
        assert c["pooled_verdict"] == _verdict_of(pooled, positive, negative)
        for interval, said in zip(c["per_replicate"], c["per_replicate_verdicts"]):
            assert said == _verdict_of(interval, positive, negative)
        assert c["holds_in_every_replicate"] == all(v == positive for v in c["per_replicate_verdicts"])
        printed = f"pooled {pooled['value']:+.3f} [{pooled['low']:+.3f}, {pooled['high']:+.3f}]: {c['pooled_verdict']}"
        assert printed in first, printed
    second = run_demo(tmp_path)
    assert second.count("reused") == 10  # 2 replicates x (init, 2 experts, MORL, sweep)

