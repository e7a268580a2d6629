"""`rs demo`: the whole pipeline on the quick profile, stage reuse on a second run, and the README's commands."""

import json

import pytest

from rs_lightning.cli import main


def test_readme_help_commands_work(capsys):
    for command in (["--help"], ["demo", "--help"], ["soup", "--help"], ["front", "--help"], ["list"]):
        try:
            code = main(command)
        except SystemExit as exit_:  # argparse's --help
            code = exit_.code
        assert code == 0, command
    out = capsys.readouterr().out
    assert "weight of the SECOND" in out


def test_quick_captioning_demo_runs_and_reuses_stages(tmp_path, capsys):
    pytest.importorskip("open_clip")
    assert main(["demo", "--task", "captioning", "--quick", "--out", str(tmp_path)]) == 0
    out_dir = tmp_path / "captioning-quick"
    report = json.loads((out_dir / "report.json").read_text())
    assert report["rewards"] == ["bleu1", "rouge_l"]
    names = [p["policy"] for p in report["policies"]]
    assert names[:3] == ["init", "expert bleu1 (seed 0)", "expert rouge_l (seed 0)"]
    assert "MORL mu=0.5" in names and "expert bleu1 (seed 1)" in names
    assert report["compute"]["trainings"] == 6  # XE init, 2 experts x 2 seeds, MORL
    rows = [json.loads(line) for line in (out_dir / "front" / "front.jsonl").read_text().splitlines()]
    assert len(rows) == 11 + 1 + 1  # 11 lambdas (the endpoints are the experts), init, MORL
    assert (out_dir / "front" / "front.png").exists()
    capsys.readouterr()
    assert main(["demo", "--task", "captioning", "--quick", "--out", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert second.count("finished earlier, reused") == 8
