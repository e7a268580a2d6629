"""What a front sweep checks before it writes anything, and the run.json it writes with its first row.

- `check_morl_mu`: each MORL checkpoint's preference is finite, >= 0, not all zero, one value per reward.
- `check_finite`: no checkpoint holds NaN/inf (unless the sweep allows it): checked ONCE at load, so the
  per-point soups run with `allow_nonfinite=True` instead of scanning every source again at every point.
- `NameCheck`: the reward names the first point logged cover the configured rewards, and every per-reward
  setting (MORL mu, the CLI's summary settings) has one value per scored reward. A reward that is not logged
  used to cost a whole sweep of invalid points; now it costs one point and writes nothing.
- `RunFile`: run.json is written just before the first row; if that first write fails (disk full) what it
  created is removed, so a sweep that wrote no row leaves no run folder behind.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from rs_lightning.front.checkpoints import Checkpoint
from rs_lightning.front.errors import FrontError, naming_writes
from rs_lightning.front.runs import RUN_FILE
from rs_lightning.soup.paths import make_parents, remove_empty
from rs_lightning.soup.values import count_nonfinite, is_finite


def check_morl_mu(morl: Sequence[Checkpoint], rewards: Sequence[str] | None = None) -> None:
    """Each MORL checkpoint's mu: finite, >= 0, not all zero, and (when `rewards` are known) one per reward."""
    for i, m in enumerate(morl):
        if m.mu is None:
            continue  # plan_points names the checkpoint that has none
        mu = list(m.mu)
        if not mu or not all(math.isfinite(v) and v >= 0 for v in mu) or not any(v > 0 for v in mu):
            raise FrontError(f"front.morl[{i}] ({m.where()}): mu {mu} must be finite, >= 0 and not all zero "
                             "(the preference the run was trained on)")
        if rewards and len(mu) != len(rewards):
            raise FrontError(f"front.morl[{i}] ({m.where()}): mu has {len(mu)} values but the sweep scores "
                             f"{len(rewards)} rewards ({', '.join(rewards)}): one weight per reward")


class NameCheck:
    """The check of the first point's logged reward names (see run_sweep's `rewards` and `check_names`)."""

    def __init__(self, rewards, morl, extra):
        self.rewards, self.morl, self.extra, self.done = list(rewards or []), morl, extra, False

    def __call__(self, logged: list[str], stage: str) -> None:
        where = f"{stage if stage == 'test' else 'val'}/reward/<name>"
        if not logged:
            raise FrontError(f"the module logged no {where} metric at the first point: nothing to score. Log each "
                             f"reward as self.log('{where.replace('<name>', 'NAME')}', ...) in the task")
        missing = [n for n in self.rewards if n not in logged]
        if missing:
            raise FrontError(f"front.summary.rewards: {missing[0]!r} is not logged by the module, which logs "
                             f"{where.split('<')[0]}{', '.join(logged)}: fix the name, or log the reward in the task")
        if stage == "test":
            check_morl_mu(self.morl, self.rewards or logged)
            if self.extra is not None:
                self.extra(list(logged))
            self.done = True


class RunFile:
    """run.json, written just before the first row (and then never again by this sweep). A failure of that
    first write removes what it created, so a sweep that wrote no row leaves no run folder behind."""

    def __init__(self, out_dir: Path, info):
        self.out_dir, self.info, self.written = out_dir, info, False

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Wrap a row append: run.json goes first if it has not been written yet, and is taken back (with the
        folders it created) if the block fails."""
        if self.written:
            yield
            return
        path = self.out_dir / RUN_FILE
        existed = path.exists()
        created = make_parents(self.out_dir)
        try:
            write_json(path, self.info())
            yield
        except BaseException:
            if not existed:
                path.unlink(missing_ok=True)
            remove_empty(created)
            raise
        self.written = True


def check_finite(named) -> None:
    """Refuse a checkpoint holding NaN/inf (every soup with it would hold them too), naming the key and file."""
    for ckpt, sd in named:
        for key in sd:
            t = sd[key]
            if t.is_floating_point() and not is_finite(t):
                nan, inf = count_nonfinite(t)
                what = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if x)
                raise FrontError(f"key '{key}' of checkpoint {ckpt.where()} holds non-finite values ({what} of "
                                 f"{t.numel()}): every soup with it would too; set front.allow_nonfinite: true "
                                 "(allow_nonfinite=True) to sweep it anyway")


def run_info(experts, init, morl, config_hash, n_keys, n_target, allow_extrapolation, target_prefix, points,
              meta) -> dict:
    from rs_lightning.front.sweep import point_name

    def desc(c: Checkpoint, kind: str) -> dict:
        return {"name": point_name(c, kind), "path": c.path, "prefix": c.prefix, "mu": c.mu}

    return {
        "config_hash": config_hash,
        "weight_convention": "weights aligned with `experts`: theta = sum_i w_i theta_i (2 experts: lam = w_2)",
        "experts": [desc(e, "expert") for e in experts],
        "init": desc(init, "init") if init else None,
        "morl": [desc(m, "morl") for m in morl],
        "allow_extrapolation": allow_extrapolation,
        "target_prefix": target_prefix,
        "souped_tensors": n_keys,
        "module_tensors": n_target,
        # This sweep's points: front.jsonl may also hold rows of earlier grids, which `rs front report` skips.
        "points": [[p.kind, p.name, p.weights] for p in points],
        **(meta or {}),
    }


def write_json(path: Path, info: dict) -> None:
    from rs_lightning.soup.atomic import atomic_file

    with naming_writes(path), atomic_file(path) as f:
        json.dump(info, f, indent=2)
