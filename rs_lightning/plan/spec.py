"""An experiment plan: the rewarded-soups method described once, expanded into a graph of stages.

A plan file (YAML, under configs/plans/) names a base LightningCLI config per role and what changes per run:

    out: runs/plans/quick               # run folder (relative to the working directory; `rs run --out` overrides)
    rewards: [bleu1, rouge_l]           # one expert per reward, mu one-hot in this order
    seeds: [0, 1, 2]                    # per seed: its own init (when trained), experts, MORL runs and sweep
    retries: 1                          # a failed stage is started again this many times
    init:                               # optional; `path:` for a given init, or a training:
      config: ../captioning/xe_init.yaml      # relative to the plan file
      set: {trainer.max_epochs: 1}            # dotted keys over the config
      seed_keys: [seed_everything, model.init_args.init_seed]   # receive the seed
      export: {class_path: rs_lightning.tasks.captioning.export.ExportCaptioner, arg: path,
               output: model.safetensors} # the callback that writes the stage's output, and its file name
      feeds: model.init_args.init_checkpoint  # the key of every training that receives the init's output
      resources: {gpus: 1, cpus: 8, time_min: 120}
    train:                              # the experts and the MORL runs: same keys as init but `feeds`/`path`
      config: ../captioning/scst.yaml
      mu_key: model.init_args.reward_weights   # where a run's reward weights go (this is the default)
    morl: [[0.5, 0.5]]                  # MORL preferences, one training each (optional)
    sweep:                              # `rs front` over the experts (+ init, + MORL)
      set: {model.init_args.eval_metrics: [bleu1, rouge_l]}
      unset: [model.init_args.init_checkpoint]
      trainer: {accelerator: cpu, devices: 1}
      front: {grid: {kind: sweep, points: 11}, validate: true}
      resources: {gpus: 1, time_min: 60}
    slurm: {partition: gpu, account: my-lab}   # executor settings for --launcher slurm (submitit)
    ray: {address: auto}                        # for --launcher ray

Dependencies follow from the method: every training after its seed's init, the sweep after its seed's trainings.
Each stage's config is the base config with the `set` keys, the seed, mu, the init's output and the stage's own
folders (trainer.default_root_dir, a CSV logger, the export callback) filled in, written to
`<out>/configs/<stage>.yaml` at launch: any stage can be rerun by hand with `rs fit --config` that file.
A stage with `resources.gpus` gets trainer.accelerator gpu, devices = gpus (per node) and num_nodes = nodes.

`${NAME}` in a string is the environment's NAME (a data folder that differs between clusters).
Errors name the key and the file: unknown keys, missing config files, mu of the wrong length, a `set` key that
walks into a list. Nothing is launched before the whole plan is valid.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rs_lightning.demo.pipeline import (
    CONFIG_ROOT,
    PROGRESS_BAR,
    NotASection,
    Stage,
    morl_name,
    set_nested,
    simplex_design,
)
from rs_lightning.demo.runner import rs_command
from rs_lightning.plan.launchers import RESOURCE_KEYS

PLAN_ROOT = CONFIG_ROOT / "plans"
TOP_KEYS = ("out", "rewards", "seeds", "retries", "init", "train", "morl", "sweep", "slurm", "ray")
ROLE_KEYS = {"init": ("config", "set", "seed_keys", "export", "feeds", "resources", "path"),
             "train": ("config", "set", "seed_keys", "export", "resources", "mu_key"),
             "sweep": ("set", "unset", "trainer", "front", "resources")}
EXPORT_KEYS = ("class_path", "arg", "output")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PlanError(ValueError):
    """The plan file is invalid; the message names the file and the key."""


@dataclass
class Plan:
    """A parsed plan: `stages()` expands it."""

    path: Path
    out: Path
    rewards: list[str]
    seeds: list[int]
    retries: int
    init: dict | None
    train: dict
    morl: list[list[float]]
    sweep: dict
    slurm: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)

    def resources(self, kind: str) -> dict:
        role = {"init": self.init, "expert": self.train, "morl": self.train, "front": self.sweep}[kind] or {}
        return dict(role.get("resources") or {})

    def stages(self) -> list[Stage]:
        stages = []
        for seed in self.seeds:
            stages += self._seed_stages(seed)
        return stages

    def _seed_stages(self, seed: int) -> list[Stage]:
        root, prefix = self.out / f"seed{seed}", f"seed{seed}"
        stages, init_stage, init_output = [], None, None
        if self.init and "path" in self.init:
            init_output = Path(self.init["path"])
        elif self.init:
            config, init_output = self._training(self.init, root / "init", seed)
            init_stage = Stage(f"{prefix}-init", "init", init_output, config, seed=seed, replicate=seed)
            init_stage.resources = self.resources("init")
            stages.append(init_stage)
        needs = [init_stage.name] if init_stage else []
        mu_key = self.train.get("mu_key", "model.init_args.reward_weights")
        trainings = []
        runs = [(f"expert-{r}", r, "expert", [1.0 if j == i else 0.0 for j in range(len(self.rewards))])
                for i, r in enumerate(self.rewards)]
        runs += [("morl-" + "-".join(f"{m:g}" for m in mu), "morl_" + "_".join(f"{m:g}" for m in mu), "morl", mu)
                 for mu in self.morl]
        for name, folder, kind, mu in runs:
            config, output = self._training(self.train, root / folder, seed)
            _set(config, mu_key, list(mu), f"train.mu_key ({mu_key})", self.path)
            if init_output is not None and self.init.get("feeds"):
                _set(config, self.init["feeds"], str(init_output), "init.feeds", self.path)
            stage = Stage(f"{prefix}-{name}", kind, output, config, list(needs), seed=seed, mu=list(mu),
                          replicate=seed)
            stage.resources = self.resources(kind)
            trainings.append(stage)
        stages += trainings
        sweep_dir = root / "front"
        sweep = Stage(f"{prefix}-sweep", "front", sweep_dir / "summary.json",
                      self._sweep_config(trainings, init_output, sweep_dir),
                      [s.name for s in stages], seed=seed, replicate=seed, trains=False)
        sweep.resources = self.resources("front")
        return [*stages, sweep]

    def _training(self, role: dict, run_dir: Path, seed: int) -> tuple[dict, Path]:
        config = copy.deepcopy(role["_base"])
        for key in role.get("seed_keys", ["seed_everything"]):
            _set(config, key, seed, "seed_keys", self.path)
        export = role["export"]
        output = run_dir / export["output"]
        trainer = config.setdefault("trainer", {})
        trainer["default_root_dir"] = str(run_dir)
        if trainer.get("logger", True) is not False:
            trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": str(run_dir), "name": "logs"}}
        # The base config's export callback keeps its other settings (e.g. ExportExpert's every_n_iterations) and
        # writes to the stage's folder; other callbacks stay; the progress bar is the one the runner reads.
        callbacks, export_args = [], {}
        for c in trainer.get("callbacks") or []:
            path = c.get("class_path", "") if isinstance(c, dict) else str(c)
            if path == export["class_path"]:
                export_args = dict(c.get("init_args") or {}) if isinstance(c, dict) else {}
            elif path != PROGRESS_BAR["class_path"]:
                callbacks.append(c)
        trainer["callbacks"] = [*callbacks, {"class_path": export["class_path"],
                                             "init_args": {**export_args, export["arg"]: str(output)}}, PROGRESS_BAR]
        trainer["enable_progress_bar"] = True
        _apply_resources(trainer, role.get("resources") or {})
        return config, output

    def _sweep_config(self, trainings: list[Stage], init: Path | None, out_dir: Path) -> dict:
        base = copy.deepcopy(self.train["_base"])
        config = {"seed_everything": 0, "model": base.get("model"), "data": base.get("data"),
                  "trainer": copy.deepcopy(self.sweep.get("trainer") or {"accelerator": "auto", "devices": 1})}
        for key in self.sweep.get("unset", []):
            _unset(config, key)
        for key, value in (self.sweep.get("set") or {}).items():
            _set(config, key, copy.deepcopy(value), f"sweep.set.{key}", self.path)
        _apply_resources(config["trainer"], {k: v for k, v in (self.sweep.get("resources") or {}).items()
                                             if k != "nodes"})
        experts = [s for s in trainings if s.kind == "expert"]
        front = copy.deepcopy(self.sweep.get("front") or {})
        front.setdefault("grid", {"kind": "sweep", "points": 11} if len(experts) == 2 else
                         {"kind": "explicit", "weights": simplex_design(len(experts))})
        front["experts"] = [{"path": str(s.output), "name": r} for s, r in zip(experts, self.rewards)]
        if init is not None:
            front["init"] = {"path": str(init), "name": "init"}
        morl = [s for s in trainings if s.kind == "morl"]
        if morl:
            front["morl"] = [{"path": str(s.output), "mu": s.mu, "name": morl_name(s.mu)} for s in morl]
        front["out_dir"] = str(out_dir)
        config["front"] = front
        return config

    def describe(self) -> str:
        """The stage graph and what each stage would run, for `--dry-run`."""
        lines = [f"plan {self.path} -> {self.out}: {len(self.seeds)} seed(s) {self.seeds}, rewards {self.rewards}, "
                 f"{len(self.morl)} MORL preference(s), retries {self.retries}"]
        for s in self.stages():
            argv = s.argv(self.out / "configs" / f"{s.name}.yaml")
            res = ", ".join(f"{k} {v}" for k, v in (s.resources or {}).items()) or "default resources"
            lines.append(f"  {s.name}  [{s.kind}; {res}]")
            lines.append(f"      needs: {', '.join(s.needs) or '-'}")
            shown = ["rs", *argv[3:]] if argv[:3] == rs_command() else argv
            lines.append(f"      run:   {' '.join(shown)}")
            lines.append(f"      makes: {s.output}" + ("" if s.mu is None else f"  (mu {s.mu})"))
        return "\n".join(lines)


def _apply_resources(trainer: dict, resources: dict) -> None:
    gpus = int(resources.get("gpus", 0) or 0)
    if gpus:
        trainer.update(accelerator="gpu", devices=gpus, num_nodes=int(resources.get("nodes", 1) or 1))


def _set(config: dict, dotted: str, value, where: str, path: Path) -> None:
    try:
        set_nested(config, dotted.split("."), value)
    except NotASection as err:
        raise PlanError(f"{path}: {where}: '{'.'.join(err.keys)}' is a {type(err.found).__name__}, not a section, "
                        f"so '{dotted}' cannot be set (set the whole value instead)") from None


def _unset(config: dict, dotted: str) -> None:
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def _check_keys(section: dict, allowed, where: str, path: Path) -> None:
    if not isinstance(section, dict):
        raise PlanError(f"{path}: {where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {unknown} in {where} (allowed: {', '.join(allowed)})")


def _load_base(role: dict, name: str, path: Path) -> dict:
    if "config" not in role:
        raise PlanError(f"{path}: {name}.config is missing (the LightningCLI config this role starts from)")
    base = (path.parent / role["config"]).resolve()
    if not base.is_file():
        raise PlanError(f"{path}: {name}.config: no such file {base}")
    config = yaml.safe_load(base.read_text()) or {}
    for key, value in (role.get("set") or {}).items():
        _set(config, key, copy.deepcopy(value), f"{name}.set.{key}", path)
    return config


def _check_resources(role: dict, name: str, path: Path) -> None:
    resources = role.get("resources") or {}
    _check_keys(resources, RESOURCE_KEYS, f"{name}.resources", path)
    for key, value in resources.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise PlanError(f"{path}: {name}.resources.{key} must be a number >= 0, got {value!r}")


def resolve_plan_path(name: str | Path) -> Path:
    """A plan file: a path, or the name of a shipped plan (`quick` -> configs/plans/quick.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = PLAN_ROOT / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in PLAN_ROOT.glob("*.yaml")))
    raise PlanError(f"no plan file {name!r} (a path, or a shipped plan: {known})")


def _expand_env(value, path: Path, where: str = "the plan"):
    """`${NAME}` in any string of the plan -> the environment's NAME (e.g. the data folder of a cluster)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, path, f"{where}.{k}" if where != "the plan" else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(match):
            name = match.group(1)
            if name not in os.environ:
                raise PlanError(f"{path}: {where} uses ${{{name}}}, but the environment has no {name}: set it "
                                f"(e.g. {name}=/path rs run ...)")
            return os.environ[name]
        return _ENV.sub(sub, value)
    return value


def load_plan(name: str | Path, out: Path | None = None) -> Plan:
    """Parse and check a plan file (see the module docstring); `out` overrides its `out:`."""
    path = resolve_plan_path(name).resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanError(f"{path}: not valid YAML: {err}") from err
    raw = _expand_env(raw, path)
    _check_keys(raw, TOP_KEYS, "the plan", path)
    rewards = raw.get("rewards")
    if not isinstance(rewards, list) or len(rewards) < 2 or len(set(map(str, rewards))) != len(rewards):
        raise PlanError(f"{path}: rewards must list 2 or more distinct reward names, got {rewards!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise PlanError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    retries = raw.get("retries", 0)
    if not isinstance(retries, int) or retries < 0:
        raise PlanError(f"{path}: retries must be an integer >= 0, got {retries!r}")
    morl = raw.get("morl") or []
    for i, mu in enumerate(morl):
        if (not isinstance(mu, list) or len(mu) != len(rewards) or any(not isinstance(m, (int, float)) or m < 0
                                                                      for m in mu) or abs(sum(mu) - 1) > 1e-6):
            raise PlanError(f"{path}: morl[{i}] must be {len(rewards)} weights >= 0 summing to 1 (one per reward "
                            f"{rewards}), got {mu!r}")
    roles = {}
    for name in ("init", "train", "sweep"):
        role = raw.get(name)
        if role is None:
            if name == "train":
                raise PlanError(f"{path}: train is missing (the config of the experts and MORL runs)")
            roles[name] = None if name == "init" else {}
            continue
        _check_keys(role, ROLE_KEYS[name], name, path)
        _check_resources(role, name, path)
        role = copy.deepcopy(role)
        if name != "sweep" and "path" not in role:
            role["_base"] = _load_base(role, name, path)
            export = role.get("export")
            if export is None:
                raise PlanError(f"{path}: {name}.export is missing (the callback that writes the stage's output: "
                                f"class_path, arg, output)")
            _check_keys(export, EXPORT_KEYS, f"{name}.export", path)
            missing = [k for k in EXPORT_KEYS if k not in export]
            if missing:
                raise PlanError(f"{path}: {name}.export needs {missing}")
        roles[name] = role
    init = roles["init"]
    if init is not None and "path" in init and set(init) - {"path", "feeds"}:
        raise PlanError(f"{path}: a given init (init.path) takes only `feeds`, got {sorted(set(init) - {'path'})}")
    out_dir = Path(out if out is not None else raw.get("out", f"runs/plans/{path.stem}")).resolve()
    for key in ("slurm", "ray"):
        if not isinstance(raw.get(key) or {}, dict):
            raise PlanError(f"{path}: {key} must be a mapping of executor settings")
    return Plan(path=path, out=out_dir, rewards=[str(r) for r in rewards], seeds=seeds, retries=retries, init=init,
                train=roles["train"], morl=[[float(m) for m in mu] for mu in morl], sweep=roles["sweep"],
                slurm=dict(raw.get("slurm") or {}), ray=dict(raw.get("ray") or {}))
