"""A live soup of a finished `rs front` run: the task module built once, the experts loaded once, and a soup
written IN PLACE into the module's own tensors at each request (no save and reload), serialised by a lock.

    session = SoupSession.open("runs/demo/captioning/rep0/front", examples=8)
    result = session.soup([0.7, 0.3])   # outputs and rewards of the soup on the fixed examples

What is read from the run folder (written by `rs front`): `front.jsonl` (the rows: the front on the page),
`run.json` (the experts' paths and prefix, the weight convention), `config.yaml` (the task module, datamodule and
trainer the sweep used) and `summary.json` (per-point intervals, when the sweep computed them). A run folder
moved with its checkpoints (the same layout relative to each other) is found again: a recorded path that no
longer exists is looked up relative to the folder's new place.

Examples are the first `examples` items of the test split, decoded as the task's `test_step` decodes them: the
module's `serve_step(batch) -> (outputs, {reward: per-example scores})` and the datamodule's
`example_views(split, indices)` (images for captioning, prompts for text) are the two task hooks.

Linear soups only (the rewarded soup, `front.method` linear): a run made with another merge method is refused
at open, naming it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rs_lightning.front.errors import FrontError

SPLIT = "test"


@dataclass
class SoupResult:
    """What one soup did on the examples: `outputs[i]`, `rewards[name][i]`, their means, timings."""

    weights: list[float]
    outputs: list[str]
    rewards: dict[str, list[float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def mean_rewards(self) -> dict[str, float]:
        return {name: sum(v) / len(v) if v else float("nan") for name, v in self.rewards.items()}


def locate(recorded: str, recorded_run: str | None, run_dir: Path) -> str:
    """The path of a checkpoint the run recorded: as recorded when it exists, else at the same place relative to
    the run folder (the folder was moved or copied with its checkpoints)."""
    if os.path.exists(recorded) or not recorded_run:
        return recorded
    moved = os.path.normpath(os.path.join(run_dir, os.path.relpath(recorded, recorded_run)))
    if os.path.exists(moved):
        return moved
    raise FrontError(f"checkpoint {recorded} (recorded in {run_dir}/run.json) does not exist, nor at {moved} where "
                     "the run folder's move would have put it: restore the checkpoints or re-run `rs front`")


# Runs made before the modules' settings had groups: their flat keys move into the groups when read.
UPGRADES = {"rs_lightning.tasks.text.module.TextPPOModule": "rs_lightning.tasks.text.settings",
            "rs_lightning.tasks.captioning.module.CaptioningModule": "rs_lightning.tasks.captioning.settings"}


def _read_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FrontError(f"{run_dir} has no config.yaml: only a finished `rs front` run can be served (the sweep "
                         "writes it at its end)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FrontError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("front"), dict):
        raise FrontError(f"{path} has no 'front' section: not the config of an `rs front` run")
    cfg.pop("config", None)  # the paths of the YAML files it was merged from: not needed, maybe gone
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("class_path") in UPGRADES and isinstance(model.get("init_args"), dict):
        import importlib

        upgrade_flat_keys = importlib.import_module(UPGRADES[model["class_path"]]).upgrade_flat_keys
        model["init_args"] = upgrade_flat_keys(model["init_args"])
    return cfg


class SoupSession:
    """The served run: the module, the experts' state dicts, the fixed examples, and the soup lock."""

    def __init__(self, run_dir: Path, run, config: dict, module, datamodule, trainer, experts: list,
                 expert_paths: list[str], expert_names: list[str], batch, views: list[dict], seed: int | None,
                 adapters: bool):
        self.run_dir, self.run, self.config = run_dir, run, config
        self.module, self.datamodule, self.trainer = module, datamodule, trainer
        self.experts, self.expert_paths, self.expert_names = experts, expert_paths, expert_names
        self.batch, self.views, self.seed, self.adapters = batch, views, seed, adapters
        self.lock = threading.Lock()
        self.expert_results: list[SoupResult] = []
        self.summary = _read_summary(run_dir)

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, run_dir: str | os.PathLike, *, examples: int = 8, progress=None) -> SoupSession:
        """Build the task of a finished `rs front` run and load its experts (see the module docstring).

        Raises:
            FrontError: naming the file or key that makes the folder unservable.
        """
        from rs_lightning.front.checkpoints import Checkpoint, check_fit, load_checkpoint, soup_target
        from rs_lightning.front.preflight import check_finite
        from rs_lightning.front.runs import load_run
        from rs_lightning.soup.lora import is_peft_adapter_dir

        say = progress or (lambda text: None)
        if examples < 1:
            raise FrontError(f"--examples must be at least 1, got {examples}")
        run_dir = Path(run_dir).resolve()
        run = load_run(run_dir)
        config = _read_config(run_dir)
        method = (run.info.get("method") or {}).get("name", "linear")
        if method != "linear":
            raise FrontError(f"{run_dir} was swept with front.method {method!r}: `rs serve` explores linear soups "
                             "(the rewarded soup) only")
        recorded_run = config["front"].get("out_dir")
        experts_info = run.info.get("experts") or []
        if len(experts_info) < 2 or any(not e.get("path") for e in experts_info):
            raise FrontError(f"{run_dir}/run.json lists {len(experts_info)} expert path(s): a soup needs at least 2")
        paths = [locate(e["path"], recorded_run, run_dir) for e in experts_info]
        names = [e.get("name") or f"expert {i}" for i, e in enumerate(experts_info)]
        ckpts = [Checkpoint(path=p, name=n, prefix=e.get("prefix")) for p, n, e in zip(paths, names, experts_info)]

        say("building the task from config.yaml")
        module, datamodule, trainer = _build_task(config, run_dir)
        say("loading the experts")
        loaded = [(c, load_checkpoint(c)) for c in ckpts]
        target = soup_target(module, run.info.get("target_prefix"))
        check_fit(target, loaded)
        if not config["front"].get("allow_nonfinite"):
            check_finite(loaded)  # once: every soup then runs with allow_nonfinite=True
        say("preparing the examples")
        batch, views = _examples(module, datamodule, trainer, examples)
        session = cls(run_dir, run, config, module, datamodule, trainer, [sd for _, sd in loaded], paths, names, batch,
                      views, config.get("seed_everything"), any(is_peft_adapter_dir(p) for p in paths))
        for i in range(len(paths)):
            say(f"decoding the examples with expert {names[i]}")
            session.expert_results.append(session.soup([1.0 if j == i else 0.0 for j in range(len(paths))]))
        return session

    # -- soups ------------------------------------------------------------------------------------------------

    def check_weights(self, weights: Sequence) -> list[float]:
        """The weights as floats on the simplex, aligned with the experts; SoupError naming what is wrong."""
        from rs_lightning.soup import SoupError, validate_weights

        if not isinstance(weights, (list, tuple)):
            raise SoupError(f"weights must be a list of {len(self.experts)} numbers, got {type(weights).__name__}")
        values = []
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise SoupError(f"weight {i} is {w!r}, not a number")
            try:
                values.append(float(w))
            except OverflowError as err:
                raise SoupError(f"weight {i} is {w}: too large for a float") from err
        for i, w in enumerate(values):
            if w < 0:  # validate_weights would suggest allow_extrapolation, which rs serve does not offer
                raise SoupError(f"weight {i} is {w}: rs serve soups on the simplex (every weight >= 0, sum 1)")
        return validate_weights(values, len(self.experts))

    def soup(self, weights: Sequence) -> SoupResult:
        """Soup `weights` in place into the live module and decode and score the examples (serialised)."""
        from rs_lightning.front.checkpoints import soup_target
        from rs_lightning.soup import interpolate

        ws = self.check_weights(weights)
        with self.lock:
            start = time.perf_counter()
            target = soup_target(self.module, self.run.info.get("target_prefix"))
            # allow_nonfinite: the experts were checked once at open (or the sweep let NaN/inf through).
            interpolate(self.experts, ws, out=target, allow_nonfinite=True)
            merged = time.perf_counter()
            if self.seed is not None:
                from lightning.pytorch import seed_everything

                seed_everything(self.seed, verbose=False)
            # The sweep's precision (e.g. bf16-mixed) for the examples' forward passes, as trainer.test ran them.
            with self.trainer.precision_plugin.forward_context():
                outputs, rewards = self.module.serve_step(self.batch)
            done = time.perf_counter()
        return SoupResult(ws, list(outputs), {k: [float(x) for x in v] for k, v in rewards.items()},
                          {"merge": merged - start, "decode": done - merged})

    def nearest_row(self, weights: Sequence[float]) -> dict | None:
        """The evaluated soup or expert row closest to `weights` (Euclidean in weight space)."""
        best, best_d = None, math.inf
        for row in self.run.rows:
            if row["kind"] not in ("soup", "expert") or not row.get("weights"):
                continue
            d = math.dist(row["weights"], weights)
            if d < best_d - 1e-12:
                best, best_d = row, d
        return best

    def front_rows(self) -> list[dict]:
        """The run's rows for the page: kind, name, weights, rewards, validity and (when the sweep computed them)
        the 95 % paired-bootstrap interval per reward."""
        from rs_lightning.front.uncertainty import point_labels

        points = ((self.summary or {}).get("uncertainty") or {}).get("points") or {}
        rows = self.run.rows
        labels = point_labels(rows, list(range(len(rows))))
        out = []
        for row, label in zip(rows, labels):
            item = {k: row.get(k) for k in ("kind", "name", "weights", "mu", "rewards", "val_rewards", "valid")}
            item["label"] = label
            if label in points:
                item["intervals"] = {n: [v["low"], v["high"]] for n, v in points[label].items()}
            out.append(item)
        return out

    def info(self) -> dict:
        """What the page needs to draw itself: experts, reward names, examples, download route."""
        from rs_lightning.front.rows import reward_names

        return {
            "run_dir": str(self.run_dir),
            "experts": self.expert_names,
            "rewards": reward_names(self.run.rows),
            "example_rewards": list(self.expert_results[0].rewards) if self.expert_results else [],
            "weight_convention": "weights aligned with the experts: theta = sum_i w_i theta_i (2 experts: lam = w_2)",
            "n_examples": len(self.views),
            "download": "/api/soup-adapter.zip" if self.adapters else "/api/soup.safetensors",
            "lam_star": (self.summary or {}).get("selection"),
        }


def _read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the page then shows no intervals; the rows themselves were checked by load_run


def _build_task(config: dict, run_dir: Path):
    """(module, datamodule, trainer) of the sweep's config, as `rs front` built them."""
    from rs_lightning.commands.messages import build_failure
    from rs_lightning.front.config import build_parser
    from rs_lightning.front.evaluate import quiet_trainer

    parser = build_parser()
    try:
        cfg = parser.parse_object(config)
    except (SystemExit, ValueError, TypeError) as err:  # jsonargparse may report a bad config by exiting
        raise FrontError(f"{run_dir}/config.yaml does not parse as an `rs front` config: {err}") from err
    try:
        objs = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise FrontError(f"{run_dir}/config.yaml: {build_failure(err, cfg)}") from err
    # One test batch at open: Lightning runs the task's setup with its datamodule (vocabulary, corpus statistics)
    # exactly as the sweep did; every later soup calls the module's serve_step directly. The sweep's trainer
    # settings (accelerator, precision) on one device: a server is one process.
    from rs_lightning.commands.front import plain_trainer
    from rs_lightning.front.config import QUIET_TRAINER

    kwargs = {**plain_trainer(objs.trainer), **QUIET_TRAINER, "devices": 1, "num_nodes": 1, "strategy": "auto",
              "limit_test_batches": 1, "callbacks": None}
    try:
        trainer = quiet_trainer(**kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise FrontError(f"{run_dir}/config.yaml: the trainer section cannot build a Trainer here: {err}") from err
    return objs.model, objs.data, trainer


def _examples(module, datamodule, trainer, n: int):
    from rs_lightning.front.evaluate import quiet_lightning

    if not callable(getattr(module, "serve_step", None)):
        raise FrontError(f"{type(module).__name__} has no serve_step(batch): this task cannot be served")
    with quiet_lightning():
        trainer.test(module, datamodule=datamodule, verbose=False)
    # trainer.test's teardown moves the module back to the CPU and restores train mode: serve on the sweep's
    # device, in eval mode (no dropout in any task's serve_step).
    module.to(trainer.strategy.root_device)
    module.eval()
    loader = datamodule.test_dataloader()
    dataset = loader.dataset
    indices = list(range(min(n, len(dataset))))
    if not indices:
        raise FrontError("the test split is empty: nothing to show")
    batch = loader.collate_fn([dataset[i] for i in indices])
    views_fn = getattr(datamodule, "example_views", None)
    views = views_fn(SPLIT, indices) if callable(views_fn) else [{"input": f"test example {i}"} for i in indices]
    return batch, views
