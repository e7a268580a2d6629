"""`rs demo`: the whole pipeline on the quick profile, stage reuse on a second run, and the README's commands."""

import json
import subprocess
import sys

import pytest

from rs_lightning.cli import main


def run_demo(out) -> str:
    """`rs demo --quick` as a user runs it: in its own process (no state left by other tests)."""
    cmd = [sys.executable, "-m", "rs_lightning.cli", "demo", "--task", "captioning", "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_readme_help_commands_work(capsys):
    for command in (["--help"], ["demo", "--help"], ["soup", "--help"], ["front", "--help"], ["list"]):
        try:
            code = main(command)
        except SystemExit as exit_:  # argparse's --help
            code = exit_.code
        assert code == 0, command
    out = capsys.readouterr().out
    assert "weight of the SECOND" in out


def test_quick_captioning_demo_runs_and_reuses_stages(tmp_path):
    pytest.importorskip("open_clip")
    first = run_demo(tmp_path)
    assert "trade-off: the bleu1 expert beats the rouge_l expert" in first
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
    second = run_demo(tmp_path)
    assert second.count("finished earlier, reused") == 8
