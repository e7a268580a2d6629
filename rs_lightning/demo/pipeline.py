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


def front_section(rewards: list[str], experts: list[Path], out_dir: Path, *, init: Path | None, morl: Path | None,
                  points: int, ideal: list[float], nadir: list[float], preferences: list[list[float]]) -> dict:
    """The `front:` section of an `rs front` config for two experts (and optionally init and MORL at 0.5)."""
    front = {
        "experts": [{"path": str(p), "name": n} for p, n in zip(experts, rewards)],
        "grid": {"kind": "sweep", "points": points, "include_uniform": points > 2},
        "out_dir": str(out_dir),
        "summary": {"rewards": rewards, "ideal": ideal, "nadir": nadir, "preferences": preferences},
    }
    if init is not None:
        front["init"] = {"path": str(init), "name": "init"}
    if morl is not None:
        front["morl"] = [{"path": str(morl), "mu": [0.5, 0.5], "name": "morl"}]
    return front


def method_stages(out: Path, seeds: list[int], rewards: list[str], init: Stage,
                  train: Callable[[Path, int, list[float]], tuple[dict, Path]],
                  front: Callable[[Path, list[Path], Path | None, Path | None, int], dict],
                  points: int) -> list[Stage]:
    """The method's stages after the init: an expert per reward and seed, MORL at mu = 0.5, the sweeps.

    Args:
        train: (run folder, seed, mu) -> (LightningCLI config, the path of the exported expert).
        front: (out folder, experts, init, morl, points) -> `rs front` config.
    """
    stages = [init]
    experts: dict[int, list[Path]] = {}
    for seed in seeds:
        experts[seed] = []
        for i, name in enumerate(rewards):
            mu = [1.0 if j == i else 0.0 for j in range(len(rewards))]
            config, output = train(out / f"seed{seed}" / name, seed, mu)
            experts[seed].append(output)
            stages.append(Stage(f"seed{seed}-{name}", "expert", output, config, fit, seed=seed, mu=mu))
    config, morl = train(out / f"seed{seeds[0]}" / "morl", seeds[0], [0.5, 0.5])
    stages.append(Stage(f"seed{seeds[0]}-morl", "morl", morl, config, fit, seed=seeds[0], mu=[0.5, 0.5]))
    stages.append(Stage("front", "front", out / "front" / "summary.json",
                        front(out / "front", experts[seeds[0]], init.output, morl, points), sweep, trains=False))
    for seed in seeds[1:]:  # the other seeds' experts alone: the seed spread of each expert
        spread = out / f"front_seed{seed}"
        stages.append(Stage(f"front-seed{seed}", "front", spread / "summary.json",
                            front(spread, experts[seed], None, None, 2), sweep, trains=False, seed=seed))
    return stages
