"""The demo's stage graph: per replicate, the init, one expert per reward, MORL at uniform mu, and the front sweep.

Each stage is a full LightningCLI (or `rs front`) config, written to `<out>/configs/<stage>.yaml` so any stage can
be re-run by hand (`rs fit --config ...`), plus the names of the stages it needs. `runner.run_stages` runs the
graph concurrently, each stage in its own process. A stage is finished when its output (an exported expert, a
summary.json) exists; outputs are written atomically, so a killed demo resumes with its finished stages.

Replicates: replicate r has its own init (its own data order and model seed), its own experts and MORL run
(training seed r), and its own full sweep. Training noise is measured across replicates, never assumed from one
run; the test-set noise of each replicate is the bootstrap interval of its sweep's summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rs_lightning.demo.runner import rs_command

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
# A stage's log is a file, not a terminal: Rich's bar (Lightning's default when rich is installed) prints nothing
# there, tqdm prints "NN%|" lines that the runner reads back as the stage's progress.
PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 10}}


@dataclass
class Stage:
    """One step of the demo.

    Args:
        name: unique name, also the config and log file name (e.g. "r0-expert-bleu1").
        kind: "init", "expert", "morl" or "front".
        output: the path whose existence marks the stage as finished.
        config: a LightningCLI (or `rs front`) config dict.
        needs: names of the stages that must finish first.
        seed: the training seed.
        mu: the reward weights it trains on (experts: one-hot).
        replicate: which replicate it belongs to.
        trains: whether the stage is a training (counted in the compute spent).
        command: argv to run before `--config <path>` (default: `rs front` for kind "front", else `rs fit`).
        resources: what a cluster launcher asks for (cpus, gpus, nodes, mem_gb, time_min); None: its defaults.
    """

    name: str
    kind: str
    output: Path
    config: dict
    needs: list[str] = field(default_factory=list)
    seed: int | None = None
    mu: list[float] | None = None
    replicate: int = 0
    trains: bool = True
    command: list[str] | None = None
    resources: dict | None = None

    def argv(self, config_path: Path) -> list[str]:
        base = self.command or rs_command("front" if self.kind == "front" else "fit")
        return [*base, "--config", str(config_path)]


PRECISIONS = ("32-true", "bf16-mixed")


def set_precision(stages: list[Stage], precision: str) -> None:
    """Every training and sweep stage of the demo runs under Lightning's `precision` (the front sweep's trainer
    too, so the soups are scored in the precision their experts were trained in)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for stage in stages:
        trainer = stage.config.setdefault("trainer", {})
        # Lightning's default is 32-true: a config that leaves the key out stays as it was written (so its front's
        # config hash, and a run recorded before this option, are unchanged).
        if trainer.get("precision", "32-true") != precision:
            trainer["precision"] = precision


class NotASection(ValueError):
    """`set_nested` met a value that is not a mapping on the way: `keys` is the path to it."""

    def __init__(self, keys: list[str], found):
        super().__init__(f"{'.'.join(keys)!r} is a {type(found).__name__}, not a section")
        self.keys, self.found = keys, found


def set_nested(node: dict, keys: list[str], value) -> None:
    """node[k0][k1]...[kn] = value, making the missing (or null) sections on the way; NotASection where a key on
    the way holds something else. The one dotted-key setter of the demo profiles and the plans."""
    for i, key in enumerate(keys[:-1]):
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise NotASection(keys[: i + 1], nxt)
        node = nxt
    node[keys[-1]] = value


def front_section(rewards: list[str], experts: list[Path], out_dir: Path, *, init: Path | None,
                  morl: Path | list[tuple[list[float], Path]] | None, points: int, ideal: list[float],
                  nadir: list[float], preferences: list[list[float]]) -> dict:
    """The `front:` section of an `rs front` config for N experts (and optionally init and MORL runs).

    `morl`: one path (MORL at uniform mu) or (mu, path) pairs, one per preference; the run at uniform mu is named
    "morl" (the report's baseline row), the others "morl mu=<mu>".

    Two experts: `points` values of lam. Three or more: `simplex_design(N)`, a design of bounded size (N + N(N-1)/2
    + 1 points), not the whole lattice, whose size grows as m^(N-1). Validation rows are evaluated at every point
    (lam* is selected on them); test rows only report."""
    n_experts = len(experts)
    grid = ({"kind": "sweep", "points": points, "include_uniform": points > 2} if n_experts == 2 else
            {"kind": "explicit", "weights": simplex_design(n_experts)})
    front = {
        "experts": [{"path": str(p), "name": n} for p, n in zip(experts, rewards)],
        "grid": grid,
        "out_dir": str(out_dir),
        "validate": True,
        "summary": {"rewards": rewards, "ideal": ideal, "nadir": nadir, "preferences": preferences},
    }
    if init is not None:
        front["init"] = {"path": str(init), "name": "init"}
    if isinstance(morl, (str, Path)):
        morl = [([1.0 / n_experts] * n_experts, Path(morl))]
    if morl:
        front["morl"] = [{"path": str(p), "mu": mu, "name": morl_name(mu)} for mu, p in morl]
    return front


def morl_name(mu: list[float]) -> str:
    """"morl" for uniform mu (the demo's baseline run), else "morl mu=0.6,0.2,0.2"."""
    if all(abs(m - 1.0 / len(mu)) < 1e-9 for m in mu):
        return "morl"
    return "morl mu=" + ",".join(f"{m:g}" for m in mu)


def default_preferences(n: int) -> list[list[float]]:
    """The preferences lam* is selected for: 0.8/0.5/0.2 for two rewards; else the uniform one and, per reward,
    0.6 on it and the rest shared."""
    if n == 2:
        return [[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]]
    rest = round(0.4 / (n - 1), 6)
    return [[1.0 / n] * n] + [[0.6 if j == i else rest for j in range(n)] for i in range(n)]


def simplex_design(n: int) -> list[list[float]]:
    """Soup weights for n >= 3 experts: each expert, each pair's midpoint, and the uniform soup."""
    points = [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)]
    points += [[0.5 if j in (a, b) else 0.0 for j in range(n)] for a in range(n) for b in range(a + 1, n)]
    return points + [[1.0 / n] * n]


def replicate_stages(out: Path, replicate: int, seed: int, rewards: list[str], init: Stage,
                     train: Callable[[Path, int, list[float]], tuple[dict, Path]],
                     front: Callable[[Path, list[Path], Path | None, list[tuple[list[float], Path]], int], dict],
                     points: int, morl_preferences: list[list[float]] | None = None) -> list[Stage]:
    """One replicate's stages: `init`, an expert per reward, MORL at each preference (default: uniform mu only;
    all seeded `seed`), the sweep.

    Args:
        out: the replicate's folder.
        init: its init stage (named and seeded by the caller).
        train: (run folder, seed, mu) -> (LightningCLI config, the path of the exported expert).
        front: (out folder, experts, init, [(mu, morl path)], points) -> `rs front` config.
        morl_preferences: the mu of each MORL training (one training each: MORL's cost grows with them).
    """
    prefix = f"r{replicate}"
    stages = [init]
    experts = []
    for i, name in enumerate(rewards):
        mu = [1.0 if j == i else 0.0 for j in range(len(rewards))]
        config, output = train(out / name, seed, mu)
        experts.append(output)
        stages.append(Stage(f"{prefix}-expert-{name}", "expert", output, config, [init.name], seed=seed, mu=mu,
                            replicate=replicate))
    morl = []
    for mu in morl_preferences or [[1.0 / len(rewards)] * len(rewards)]:
        # The uniform run keeps the plain name (and folder) that finished demos already hold.
        tag = morl_name(mu).replace("morl mu=", "morl-").replace(",", "-")
        config, output = train(out / tag.replace("-", "_"), seed, mu)
        morl.append((mu, output))
        stages.append(Stage(f"{prefix}-{tag}", "morl", output, config, [init.name], seed=seed, mu=mu,
                            replicate=replicate))
    stages.append(Stage(f"{prefix}-front", "front", out / "front" / "summary.json",
                        front(out / "front", experts, init.output, morl, points),
                        [s.name for s in stages], seed=seed, replicate=replicate, trains=False))
    return stages
