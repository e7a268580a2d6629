"""The front sweep: evaluate every grid point by souping IN PLACE into one live module, then `trainer.test`.

    rows = run_sweep(module, datamodule, experts, grid, out_dir, init=..., morl=[...], trainer=...)

The module and the Trainer are built once. For each weight vector w (aligned with the experts,
theta = sum_i w_i theta_i; for two experts lam is the weight of the SECOND) the soup engine writes the
soup into the module's own tensors (no save-and-reload per point), `trainer.test(module, datamodule)`
runs, and every logged `test/reward/<name>` becomes one row of `front.jsonl` (see rows.py), flushed and
fsynced as soon as the point finishes. By default `trainer.validate` runs too (`val/reward/<name>`, the rows
lam* is selected on). The per-example rewards the task's `test_step` / `validation_step` return (the contract
of per_example.py) are kept in the row as `per_example` / `val_per_example`, for the bootstrap intervals.
Re-running skips the points already on disk, so a killed sweep resumes and loses at most the point in
progress. Rewards are torchmetrics Metrics in the task, so the sync across devices is Lightning's; rows are
written by global rank 0 only.

Everything that can be checked is checked before the first row is written: the grid, the MORL preferences,
the checkpoints (they fit the module and each other, and hold no NaN/inf unless `allow_nonfinite`: checked
once at load, not at every point), the rows already on disk; then the first point runs and the reward names
it logged are checked against `rewards` and the MORL mu lengths (and `check_names`, e.g. the CLI's summary
settings). Only then are run.json and the first row written, so a refused sweep leaves its folder as it was.

Points, in order: each expert (one-hot weights; the grid's one-hot points are these rows, bit for bit,
and are not evaluated twice), every other grid point (kind "soup"), the init, each MORL run.

Which module tensors a checkpoint's keys land on is the small `soup_state_dict()` protocol documented in
checkpoints.py (default: `module.state_dict()`, optionally under `target_prefix`). Each point is seeded
with the same `seed` (common random numbers: sampling-based rewards compare points on the same draws, and
a resumed sweep reproduces the uninterrupted one). DataModules should cache in `setup`, which Lightning
calls again at every `trainer.test`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rs_lightning.front.checkpoints import Checkpoint, check_fit, fingerprint, load_checkpoint, soup_target
from rs_lightning.front.errors import FrontError
from rs_lightning.front.evaluate import counter_callback, evaluate, quiet_lightning, quiet_trainer
from rs_lightning.front.grids import one_hot_index, weights_label
from rs_lightning.front.preflight import NameCheck, RunFile, check_finite, check_morl_mu, run_info
from rs_lightning.front.rows import FRONT_FILE, RowStore, clean_rewards, point_key, stable_hash
from rs_lightning.front.runs import RUN_FILE
from rs_lightning.front.soup_method import SoupMethod
from rs_lightning.soup import SoupError, interpolate, validate_weights

__all__ = ["RUN_FILE", "Point", "check_morl_mu", "plan_points", "point_name", "run_sweep"]


@dataclass
class Point:
    """One evaluation of a sweep: a soup of the experts (`weights`), or a single extra checkpoint."""

    kind: str
    name: str
    weights: list[float] | None = None
    extra: Checkpoint | None = None

    @property
    def key(self) -> str:
        return point_key(self.kind, self.name, self.weights)


def plan_points(experts: Sequence[Checkpoint], grid, *, init=None, morl=(), one_hot_soups: bool = False,
                ensemble: bool = False) -> list[Point]:
    """The ordered points of a sweep: experts, then the grid's soups, then init and MORL.

    One-hot grid weights are the experts' rows (linear soups reproduce them bit for bit) unless `one_hot_soups`
    (a merge method other than linear: its one-hot soup is not the expert, see soup_method.py)."""
    n = len(experts)
    points = [Point("expert", point_name(e, "expert"), [1.0 if j == i else 0.0 for j in range(n)])
              for i, e in enumerate(experts)]
    for w in grid:
        soup = Point("soup", weights_label(w), list(w))
        if (one_hot_soups or one_hot_index(w) is None) and all(p.key != soup.key for p in points):  # once each
            points.append(soup)
    if ensemble:  # the prediction mixture at every grid weight off the experts (one-hot: the expert itself)
        for w in grid:
            ens = Point("ensemble", weights_label(w), list(w))
            if one_hot_index(w) is None and min(w) >= 0 and all(p.key != ens.key for p in points):
                points.append(ens)
    if init is not None:
        points.append(Point("init", point_name(init, "init"), extra=init))
    points += [Point("morl", point_name(m, "morl"), extra=m) for m in morl]
    keys = [p.key for p in points]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise FrontError(f"two points share the identity {dup}: give the checkpoints distinct names")
    return points


def point_name(ckpt: Checkpoint, kind: str) -> str:
    """Row name of an expert / init / MORL checkpoint: its `name`, else "init" / "mu=..." / the file stem."""
    if ckpt.name:
        return ckpt.name
    if kind == "init":
        return "init"
    if kind == "morl":
        if ckpt.mu is None:
            raise FrontError(f"MORL checkpoint {ckpt.where()} needs `mu`, the preference it was trained on")
        return "mu=" + ",".join(f"{m:g}" for m in ckpt.mu)
    return ckpt.label


def run_sweep(
    module,
    datamodule,
    experts: Sequence[Checkpoint],
    grid: Sequence[Sequence[float]],
    out_dir: str | os.PathLike,
    *,
    init: Checkpoint | None = None,
    morl: Sequence[Checkpoint] = (),
    allow_extrapolation: bool = False,
    trainer=None,
    callbacks: Sequence = (),
    rewards: Sequence[str] | None = None,
    config_hash: str | None = None,
    overwrite: bool = False,
    validate: bool = True,
    seed: int | None = 0,
    target_prefix: str | None = None,
    cache_checkpoints: bool = True,
    progress: bool = True,
    meta: dict | None = None,
    allow_nonfinite: bool = False,
    check_names: Callable[[list[str]], None] | None = None,
    method: SoupMethod | None = None,
    ensemble: bool = False,
) -> list[dict]:
    """Evaluate the experts, every grid soup, the init and the MORL runs; append rows to out_dir/front.jsonl.

    Args:
        module: the task's LightningModule (weights are overwritten in place at every point).
        datamodule: its LightningDataModule (test split; validation split too when `validate`).
        experts: one checkpoint per expert, aligned with the weights.
        grid: weight vectors aligned with `experts` (see grids.build_grid).
        out_dir: run folder: front.jsonl and run.json are written here.
        init: the shared init, evaluated once (kind "init"), optional.
        morl: MORL checkpoints, each with its `mu`, optional.
        allow_extrapolation: accept grid weights off the simplex (negative, summing to 1).
        trainer: a Lightning Trainer to reuse (default: `quiet_trainer()`).
        callbacks: extra Lightning callbacks attached for the sweep (e.g. to stop it in a test).
        rewards: reward names every row must have (a missing one is recorded as invalid).
        config_hash: identity of the model/data/trainer/checkpoints; rows on disk must match it.
        overwrite: discard rows already in out_dir instead of resuming.
        validate: also run `trainer.validate` per point and record `val/reward/*` as `val_rewards` (the
            rows λ* is selected on; default True). The module needs a `validation_step` and the datamodule
            a `val_dataloader`; without them pass False and select on test explicitly (optimistic).
        seed: `seed_everything(seed)` before each point; None leaves the RNG alone.
        target_prefix: restrict `module.state_dict()` to keys under this prefix (see checkpoints.py).
        cache_checkpoints: hold all checkpoints in memory (fast); False re-reads them at every point.
        progress: show one tqdm bar over the points.
        meta: extra JSON written into run.json (e.g. the summary settings of the CLI).
        allow_nonfinite: sweep checkpoints holding NaN/inf (refused by default, naming the key and file).
        check_names: called with the reward names the first point logged, before anything is written;
            raises FrontError to refuse the sweep (the CLI checks its summary settings against them).
        method: the soups' merge method (soup_method.SoupMethod; default linear, the rewarded soup).
        ensemble: also evaluate the experts' prediction mixture at each grid weight off the experts (kind
            "ensemble"); the module must define `set_ensemble(states, weights)`.

    Returns:
        The rows of this sweep's points, in plan order.

    Raises:
        FrontError / SoupError: bad grid or MORL mu, checkpoints that do not fit the module or each other
            or hold NaN/inf, or rows on disk from another config (all before any point runs); a reward in
            `rewards` that the module does not log (after the first point, before anything is written).
        OSError: a write failed (naming the file); the rows written before it are kept (resume).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    grid = [validate_weights(w, len(experts), allow_extrapolation=allow_extrapolation) for w in grid]
    if not grid:
        raise FrontError("the grid is empty: give at least one weight vector")
    method = method or SoupMethod()
    points = plan_points(experts, grid, init=init, morl=morl, one_hot_soups=not method.linear, ensemble=ensemble)
    if ensemble and target_prefix:
        raise FrontError("front.ensemble with front.target_prefix: a prediction ensemble builds whole member models "
                         "from the experts, which a target_prefix restricts to part of the module; drop one of them")
    if ensemble and not callable(getattr(module, "set_ensemble", None)):
        raise FrontError(f"front.ensemble is true but {type(module).__name__} has no set_ensemble(states, weights): "
                         "this task cannot evaluate a prediction ensemble (the captioning and text tasks can)")
    check_morl_mu(morl, rewards)
    if validate:
        _check_can_validate(module, datamodule)
    loaded = [(e, load_checkpoint(e, cache=cache_checkpoints)) for e in experts]
    extras = {id(c): load_checkpoint(c, cache=cache_checkpoints) for c in [*([init] if init else []), *morl]}
    named = loaded + [(c, extras[id(c)]) for c in [*([init] if init else []), *morl]]
    method_inputs = _load_method_inputs(method, init, extras, loaded, cache_checkpoints)
    if method_inputs["base"] is not None and (init is None or method.base is not init):
        named.append((method.base, method_inputs["base"]))
    target = soup_target(module, target_prefix)
    n_keys = check_fit(target, named)
    if not allow_nonfinite:
        check_finite(named)  # once here: every point then soups with allow_nonfinite=True (no pass per point)
    if config_hash is None:
        config_hash = stable_hash([
            type(module).__qualname__, dict(getattr(module, "hparams", {})),
            type(datamodule).__qualname__, dict(getattr(datamodule, "hparams", {})),
            [fingerprint(c) for c in [*experts, *([init] if init else []), *morl]], target_prefix, validate, seed,
        ])
    if trainer is None:
        trainer = quiet_trainer()
    # Under DDP every rank runs this function; only global rank 0 touches the files.
    is_writer = bool(getattr(trainer, "is_global_zero", True))
    store = RowStore(out_dir / FRONT_FILE, config_hash, overwrite=overwrite and is_writer)
    checks = NameCheck(rewards, morl, check_names)
    done = [store.get(p.key) for p in points if store.get(p.key) is not None]
    if done:
        checks(list(done[0]["rewards"]), "test")  # nothing to evaluate first: the rows on disk say what is logged
    run_file = RunFile(out_dir, lambda: run_info(experts, init, morl, config_hash, n_keys, len(target),
                                                    allow_extrapolation, target_prefix, points, meta))

    from rs_lightning.front.per_example import collector_callback

    counter, collector = counter_callback(), collector_callback()
    added = [counter, collector, *callbacks]
    trainer.callbacks.extend(added)
    sources = [sd for _, sd in loaded]
    todo = [p for p in points if store.get(p.key) is None]
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="front", unit="pt", disable=not progress)
    try:
        with quiet_lightning():
            for point in todo:
                bar.set_postfix_str(f"{point.kind} {point.name}", refresh=True)
                row = _run_point(point, module, datamodule, trainer, (counter, collector), sources, extras,
                                 target_prefix, allow_extrapolation, rewards, validate, seed,
                                 None if checks.done else checks, method, method_inputs)
                if is_writer:
                    with run_file.writing():
                        store.append(row)
                bar.update(1)
        if is_writer:
            with run_file.writing():  # when every point was on disk: run.json still records this grid
                pass
    finally:
        bar.close()
        for cb in added:
            trainer.callbacks.remove(cb)
    return [store.get(p.key) for p in points if store.get(p.key) is not None]


def _check_can_validate(module, datamodule) -> None:
    """Refuse, before any point runs, a validating sweep whose module or datamodule cannot validate."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    loaders = ("the datamodule", datamodule) if datamodule is not None else ("the module", module)
    missing = [f"{what} has no `{hook}`" for what, obj, hook in (("the module", module, "validation_step"),
                                                                (*loaders, "val_dataloader"))
               if not is_overridden(hook, obj)]
    if missing:
        raise FrontError(
            f"front.validate is true (the default: lam* is selected on validation rows) but {' and '.join(missing)}. "
            "Add it, or set front.validate: false with front.summary.select_on: test (selection on the test rows, "
            "optimistic)"
        )


def _load_method_inputs(method: SoupMethod, init, extras, loaded, cache: bool) -> dict:
    """theta_0 and the Fisher state dicts of a non-linear method, loaded once and checked against the experts."""
    from rs_lightning.soup.methods.merge import check_fisher

    base = None
    if method.base is not None:
        base = extras[id(init)] if init is not None and method.base is init else load_checkpoint(method.base,
                                                                                                 cache=cache)
    fisher = [load_checkpoint(f, cache=cache) for f in method.fisher] or None
    if fisher is not None:
        sources = [sd for _, sd in loaded]
        try:
            check_fisher(fisher, sources, list(sources[0]), [e.where() for e, _ in loaded])
        except SoupError as err:
            raise FrontError(f"front.method.fisher: {err}") from err
    return {"base": base, "fisher": fisher}


def _run_point(point, module, datamodule, trainer, callbacks, sources, extras, target_prefix,
               allow_extrapolation, rewards, validate, seed, check=None, method: SoupMethod | None = None,
               method_inputs: dict | None = None) -> dict:
    start = time.perf_counter()
    target = soup_target(module, target_prefix)  # fresh: the module may have moved device since last time
    # allow_nonfinite=True: run_sweep checked every checkpoint once at load (or was told to let NaN/inf through);
    # checking again here would scan every source at every point. An extrapolated soup that overflows is then
    # evaluated like any point, and its non-finite rewards make it an invalid row, not a stopped sweep.
    by_method = method is not None and not method.linear and point.kind == "soup"
    if point.kind == "ensemble":
        module.set_ensemble(sources, point.weights)
        try:
            return _evaluate_point(point, module, datamodule, trainer, callbacks, rewards, validate, seed, check,
                                   {"kind": point.kind, "name": point.name, "weights": point.weights, "mu": None},
                                   start)
        finally:
            module.set_ensemble(None)
    if by_method:
        method.apply(sources, point.weights, target, base_sd=method_inputs["base"],
                     fisher_sds=method_inputs["fisher"], allow_extrapolation=allow_extrapolation)
    elif point.extra is None:
        interpolate(sources, point.weights, out=target, allow_extrapolation=allow_extrapolation, allow_nonfinite=True)
    else:
        interpolate([extras[id(point.extra)]], [1.0], out=target, allow_nonfinite=True)
    row: dict = {"kind": point.kind, "name": point.name, "weights": point.weights,
                 "mu": point.extra.mu if point.extra is not None else None}
    if by_method:
        row.update(method.describe())
    return _evaluate_point(point, module, datamodule, trainer, callbacks, rewards, validate, seed, check, row, start)


def _evaluate_point(point, module, datamodule, trainer, callbacks, rewards, validate, seed, check, row: dict,
                    start: float) -> dict:
    """trainer.test (and validate) of the module as it now is; the row with its rewards and per-example values."""
    counter, collector = callbacks
    stages = ["test", "validate"] if validate else ["test"]
    for stage in stages:
        if seed is not None:
            from lightning.pytorch import seed_everything

            seed_everything(seed, verbose=False)
        values, samples, per_example = evaluate(trainer, module, datamodule, stage, counter, collector)
        if check is not None:
            check(list(values), stage)
        clean, bad = clean_rewards(values, rewards or ())
        _check_per_example(per_example, values, stage)
        if stage == "test":
            row.update(rewards=clean, valid=not bad and bool(clean), invalid_rewards=bad, samples=samples)
            if not clean:
                row["invalid_rewards"] = ["<no test/reward/* metric was logged>"]
            if per_example:
                row["per_example"] = per_example
        else:
            row.update(val_rewards=clean, val_valid=not bad and bool(clean), val_samples=samples)
            if per_example:
                row["val_per_example"] = per_example
    row["seconds"] = round(time.perf_counter() - start, 6)
    return row


def _check_per_example(per_example: dict, logged: dict, stage: str) -> None:
    """The per-example rewards must be exactly the logged ones, each with one value per example."""
    if not per_example:
        return
    step = "test_step" if stage == "test" else "validation_step"
    if set(per_example) != set(logged):
        raise FrontError(f"{step} returned per-example rewards {sorted(per_example)} but logged "
                         f"{sorted(logged)} as {stage if stage == 'test' else 'val'}/reward/*: return exactly the "
                         "logged rewards (see rs_lightning.front.per_example)")
    sizes = {name: len(v) for name, v in per_example.items()}
    if len(set(sizes.values())) > 1:
        raise FrontError(f"{step} returned per-example rewards of different lengths {sizes}: one score per example")
