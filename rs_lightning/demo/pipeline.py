"""The demo's stage runner: train the init, the experts and MORL through LightningCLI, then sweep the front.

Each training stage is a full LightningCLI config written to `<out>/configs/<stage>.yaml` (so any stage can
be re-run by hand with `rs fit --config ...`) and run in this process. A stage is finished when its output
(an exported expert) exists: outputs are written atomically, so a killed demo loses at most the stage in
progress, and a second `rs demo` reuses every finished stage (`--force` retrains). Timings go to
`<out>/stages.json` so the report can state the compute spent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rs_lightning.soup.atomic import atomic_file

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


def fit(config_path: Path) -> None:
    """`rs fit --config config_path`, in this process."""
    from rs_lightning.lightning_cli import run_lightning_cli

    run_lightning_cli(["fit", "--config", str(config_path)])


def sweep(config_path: Path) -> None:
    """`rs front --config config_path`, in this process."""
    from rs_lightning.commands import front

    if front.main(["--config", str(config_path)]) != 0:
        raise RuntimeError(f"the front sweep failed (config {config_path})")


@dataclass
class Stage:
    """One step of the demo.

    Args:
        name: unique name, also the config file name (e.g. "seed0-vader").
        kind: "init", "expert", "morl" or "front".
        output: the path whose existence marks the stage as finished.
        config: a LightningCLI (or `rs front`) config dict.
        run: what executes the config (a function of the config path).
        seed: the training seed, for the report.
        mu: the reward weights it trains on (experts: one-hot).
        trains: whether the stage is a training (counted in the compute spent).
    """

    name: str
    kind: str
    output: Path
    config: dict
    run: Callable[[Path], None]
    seed: int | None = None
    mu: list[float] | None = None
    trains: bool = True
    meta: dict = field(default_factory=dict)


def write_config(path: Path, config: dict) -> Path:
    with atomic_file(path) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def load_timings(out: Path) -> dict:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_stages(stages: list[Stage], out: Path, *, force: bool = False, log=print) -> dict:
    """Run every unfinished stage in order; return {stage name: {"seconds", "reused", ...}}."""
    timings = load_timings(out)
    for i, stage in enumerate(stages, start=1):
        header = f"[{i}/{len(stages)}] {stage.kind:<6} {stage.name}"
        if stage.output.exists() and not force:
            log(f"{header}: finished earlier, reused ({stage.output})")
            timings.setdefault(stage.name, {"seconds": None})["reused"] = True
            continue
        config_path = write_config(out / "configs" / f"{stage.name}.yaml", stage.config)
        log(f"{header}: running `{_command(stage, config_path)}`")
        start = time.perf_counter()
        stage.run(config_path)
        seconds = time.perf_counter() - start
        if not stage.output.exists():
            raise RuntimeError(f"stage {stage.name} finished without writing {stage.output}")
        timings[stage.name] = {"seconds": round(seconds, 1), "reused": False, "kind": stage.kind,
                               "trains": stage.trains, "seed": stage.seed, "mu": stage.mu}
        with atomic_file(out / "stages.json") as f:
            json.dump(timings, f, indent=2)
        log(f"{header}: done in {_minutes(seconds)} -> {stage.output}")
    return timings


def _command(stage: Stage, config_path: Path) -> str:
    return f"rs front --config {config_path}" if stage.kind == "front" else f"rs fit --config {config_path}"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
