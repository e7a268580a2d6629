"""The sweep on the analytic quadratic toy: exact front, LMC gaps and Lemma 2, resume, bad input."""

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

from rs_lightning.front import Checkpoint, FrontError, GridSpec, SummarySettings, build_grid, run_sweep
from rs_lightning.front.rows import FRONT_FILE, read_rows, strip_timing
from rs_lightning.front.summary import build_summary, write_outputs
from rs_lightning.soup import SoupError
from rs_lightning.tasks.toy.quadratic import QuadraticData, QuadraticRewards, save_theta, write_checkpoints

OPTIMA = [[1.0, 0.0], [0.0, 1.0]]
ETAS = [1.0, 3.0]
PEAKS = [1.0, 2.0]
MORL_MUS = [[0.75, 0.25], [0.5, 0.5]]


def make_task(cls=QuadraticRewards, **kw):
    args = dict(optima=OPTIMA, etas=ETAS, peaks=PEAKS, names=["r1", "r2"], init=[0.2, 0.2])
    args.update(kw)
    return cls(**args), QuadraticData(n_samples=6, batch_size=4)


@pytest.fixture
def ckpts(tmp_path):
    """Closed-form expert, init and MORL checkpoints of the isotropic 2-reward toy."""
    module, _ = make_task()
    d = tmp_path / "ckpt"
    experts = [d / "expert_r1.safetensors", d / "expert_r2.safetensors"]
    morl = [(d / f"morl_{i}.safetensors", mu) for i, mu in enumerate(MORL_MUS)]
    write_checkpoints(module, experts, d / "init.safetensors", morl)
    return {
        "experts": [Checkpoint(str(p), name=f"r{i + 1}") for i, p in enumerate(experts)],
        "init": Checkpoint(str(d / "init.safetensors")),
        "morl": [Checkpoint(str(p), mu=mu) for p, mu in morl],
        "dir": d,
    }


class Recorder(Callback):
    """Counts test runs, records which weights storage each one saw, and can fail at the n-th (a kill)."""

    def __init__(self, fail_at=None):
        self.count, self.fail_at, self.ptrs = 0, fail_at, []

    def on_test_start(self, trainer, pl_module):
        self.count += 1
        self.ptrs.append(pl_module.theta.data_ptr())
        if self.count == self.fail_at:
            raise RuntimeError("simulated kill")


def sweep(tmp_path, ckpts, out="run", grid=None, module=None, **kw):
    if module is None:
        module, _ = make_task()
    data = QuadraticData(n_samples=6, batch_size=4)
    grid = grid if grid is not None else build_grid(GridSpec(points=21), 2)
    kw.setdefault("init", ckpts["init"])
    kw.setdefault("morl", ckpts["morl"])
    rows = run_sweep(module, data, ckpts["experts"], grid, tmp_path / out, progress=False, **kw)
    return rows, module


def test_sweep_recovers_the_analytic_front_lmc_and_lemma2(tmp_path, ckpts):
    rec = Recorder()
    rows, module = sweep(tmp_path, ckpts, callbacks=[rec])
    assert [r["kind"] for r in rows] == ["expert"] * 2 + ["soup"] * 19 + ["init"] + ["morl"] * 2
    assert len(set(rec.ptrs)) == 1, "every point must be souped in place into the same tensors"
    for r in rows:
        assert r["valid"] and r["samples"] == 6 and r["seconds"] > 0
        if r["weights"] is not None:
            expected = module.closed_form_rewards(module.soup_theta(r["weights"]))
            assert [r["rewards"]["r1"], r["rewards"]["r2"]] == pytest.approx(expected, abs=1e-5)
    assert rows[0]["rewards"] == {"r1": 1.0, "r2": -4.0}  # one-hot: expert 1 exactly (R2 = 2 - 3 * 2)
    init = rows[21]
    assert [init["rewards"]["r1"], init["rewards"]["r2"]] == pytest.approx(module.closed_form_rewards([0.2, 0.2]))

    prefs = [[0.75, 0.25], [0.5, 0.5], [0.9, 0.1], [0.25, 0.75]]
    summary = build_summary(rows, SummarySettings(preferences=prefs))
    for point in summary["lmc"]["points"]:
        assert point["gaps"] == pytest.approx(module.lmc_gap(point["weights"]), abs=1e-5)
    assert summary["lmc"]["per_reward"]["r1"]["min"] > 0  # strictly above the chord inside the simplex
    for entry, mu in zip(summary["selection"]["preferences"], prefs):
        # Lemma 2: lam_i ∝ mu_i eta_i, here exactly on the 0.05 grid.
        assert entry["lambda_star"] == pytest.approx(module.lemma2_lambda(mu), abs=1e-9)
    uniform = summary["selection"]["preferences"][1]
    assert uniform["regret_lambda_eq_mu"] > 0.1  # lam = mu is not optimal when eta_1 != eta_2
    assert uniform["rs_minus_morl"] == pytest.approx(0.0, abs=1e-5)  # isotropic: MORL lies on the RS curve
    assert summary["hypervolume"]["rs"] > summary["hypervolume"]["experts"] > 0


def test_three_experts_lattice_lmc_closed_form_and_radar(tmp_path):
    module, data = make_task(optima=np.eye(3).tolist(), etas=[1.0, 1.5, 2.0], peaks=None, names=["a", "b", "c"],
                             init=None)
    paths = [tmp_path / f"e{i}.safetensors" for i in range(3)]
    write_checkpoints(module, paths, morl=[(tmp_path / "m.safetensors", [1 / 3] * 3)])
    experts = [Checkpoint(str(p)) for p in paths]
    morl = [Checkpoint(str(tmp_path / "m.safetensors"), mu=[1 / 3] * 3)]
    rows = run_sweep(module, data, experts, build_grid(GridSpec(m=2), 3), tmp_path / "run", morl=morl,
                     progress=False)
    assert len(rows) == 3 + 3 + 1 + 1  # experts, the 3 mixed lattice points, the added uniform soup, MORL
    summary = write_outputs(tmp_path / "run", rows)
    for point in summary["lmc"]["points"]:
        assert point["gaps"] == pytest.approx(module.lmc_gap(point["weights"]), abs=1e-5)
    assert summary["plots"] == ["radar.png", "front_pairs.png"] and (tmp_path / "run" / "radar.png").stat().st_size > 0
    assert (tmp_path / "run" / "front_pairs.png").stat().st_size > 0


def test_killed_sweep_resumes_without_recomputing(tmp_path, ckpts):
    grid = build_grid(GridSpec(points=11), 2)
    killer = Recorder(fail_at=4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        sweep(tmp_path, ckpts, grid=grid, callbacks=[killer])
    first = read_rows(tmp_path / "run" / FRONT_FILE)
    assert len(first) == 3

    again = Recorder()
    rows, _ = sweep(tmp_path, ckpts, grid=grid, callbacks=[again])  # a fresh process: new module and trainer
    n_points = 2 + 9 + 1 + 2
    assert again.count == n_points - 3  # only the missing points ran
    assert len(rows) == n_points
    names = [r["name"] for r in read_rows(tmp_path / "run" / FRONT_FILE)]
    assert len(names) == len(set(names)) == n_points  # no point twice in the file

    full, _ = sweep(tmp_path, ckpts, out="full", grid=grid)
    resumed = [strip_timing(r) for r in read_rows(tmp_path / "run" / FRONT_FILE)]
    assert resumed == [strip_timing(r) for r in read_rows(tmp_path / "full" / FRONT_FILE)]

    third = Recorder()
    sweep(tmp_path, ckpts, grid=grid, callbacks=[third])
    assert third.count == 0  # all done: a re-run computes nothing


def test_checkpoints_that_do_not_fit_fail_before_any_point(tmp_path, ckpts):
    bad = tmp_path / "bad.safetensors"
    save_theta([1.0, 2.0, 3.0], bad)
    rec = Recorder()
    experts = [ckpts["experts"][0], Checkpoint(str(bad))]
    with pytest.raises(FrontError, match="shape"):
        sweep(tmp_path, {**ckpts, "experts": experts}, callbacks=[rec])
    renamed = tmp_path / "renamed.safetensors"
    save_file({"model.theta": torch.tensor([0.0, 1.0])}, str(renamed))
    other = [ckpts["experts"][0], Checkpoint(str(renamed))]
    with pytest.raises(FrontError, match="do not match each other"):
        sweep(tmp_path, {**ckpts, "experts": other}, callbacks=[rec])
    both = [Checkpoint(str(renamed), name="a"), Checkpoint(str(renamed), name="b")]
    with pytest.raises(FrontError, match="not among the module's weights.*prefix"):
        sweep(tmp_path, {**ckpts, "experts": both}, callbacks=[rec], init=None, morl=())
    assert rec.count == 0 and not (tmp_path / "run" / FRONT_FILE).exists()
    # With the prefix stripped the same files fit.
    fixed = [Checkpoint(str(renamed), name="a", prefix="model."), Checkpoint(str(renamed), name="b", prefix="model.")]
    rows, _ = sweep(tmp_path, {**ckpts, "experts": fixed}, grid=[[0.5, 0.5]], init=None, morl=())
    assert len(rows) == 3


def test_bad_grids_and_configs(tmp_path, ckpts):
    with pytest.raises(FrontError, match="empty"):
        sweep(tmp_path, ckpts, grid=[])
    with pytest.raises(SoupError, match="allow_extrapolation"):
        sweep(tmp_path, ckpts, grid=[[1.5, -0.5]])
    with pytest.raises(FrontError, match="needs `mu`"):
        sweep(tmp_path, ckpts, morl=[Checkpoint(ckpts["morl"][0].path)])
    sweep(tmp_path, ckpts, grid=[[0.5, 0.5]], config_hash="one")
    with pytest.raises(FrontError, match="new output folder.*--overwrite"):
        sweep(tmp_path, ckpts, grid=[[0.5, 0.5]], config_hash="two")
    rows, _ = sweep(tmp_path, ckpts, grid=[[0.5, 0.5]], config_hash="two", overwrite=True)
    assert {r["config_hash"] for r in rows} == {"two"}


def test_extrapolation_is_swept_but_kept_out_of_the_lmc_check(tmp_path, ckpts):
    grid = build_grid(GridSpec(points=5, low=-0.5, high=1.5), 2, allow_extrapolation=True)
    rows, module = sweep(tmp_path, ckpts, grid=grid, allow_extrapolation=True, init=None, morl=())
    assert [r["weights"][1] for r in rows] == [0.0, 1.0, -0.5, 0.5, 1.5]
    for r in rows:
        expected = module.closed_form_rewards(module.soup_theta(r["weights"]))
        assert [r["rewards"]["r1"], r["rewards"]["r2"]] == pytest.approx(expected, abs=1e-5)
    summary = build_summary(rows)
    assert [p["weights"] for p in summary["lmc"]["points"]] == [[0.5, 0.5]]
    assert summary["hypervolume"]["rs_extrapolated"] >= summary["hypervolume"]["rs"]


class NaNRewards(QuadraticRewards):
    """R2 is NaN once theta_2 > 0.75: a reward model that breaks on some soups."""

    def rewards(self, theta=None):
        r = super().rewards(theta)
        if float(self.theta[1]) > 0.75:
            r = torch.stack([r[0], torch.tensor(float("nan"))])
        return r


def test_nan_reward_is_recorded_and_reported_not_fatal(tmp_path, ckpts):
    module, _ = make_task(NaNRewards)
    rows, _ = sweep(tmp_path, ckpts, module=module, grid=build_grid(GridSpec(points=11), 2), morl=())
    bad = [r for r in rows if not r["valid"]]
    assert [r["name"] for r in bad] == ["r2", "lam=0.8", "lam=0.9"]
    assert all(r["rewards"]["r2"] is None and r["invalid_rewards"] == ["r2"] for r in bad)
    assert all(json.loads(line) for line in (tmp_path / "run" / FRONT_FILE).read_text().splitlines())
    summary = write_outputs(tmp_path / "run", rows)
    assert [p["name"] for p in summary["invalid_points"]] == ["r2", "lam=0.8", "lam=0.9"]
    assert summary["n_valid"] == len(rows) - 3 and summary["hypervolume"]["rs"] > 0
    assert "skipped" in summary["lmc"]  # the chord needs both experts valid
    json.loads((tmp_path / "run" / "summary.json").read_text())  # strict JSON, no NaN


class Renamed(QuadraticRewards):
    """A task whose checkpoints name the weights differently from its own state_dict (like PEFT adapters)."""

    def soup_state_dict(self):
        return {"policy.w": self.theta.data}


def test_soup_state_dict_hook_maps_checkpoint_names(tmp_path, ckpts):
    paths = []
    for i, opt in enumerate(OPTIMA):
        paths.append(tmp_path / f"peft_{i}.safetensors")
        save_file({"policy.w": torch.tensor(opt)}, str(paths[-1]))
    experts = [Checkpoint(str(p)) for p in paths]
    with pytest.raises(FrontError, match="policy.w"):
        sweep(tmp_path, {**ckpts, "experts": experts}, out="plain", init=None, morl=())
    module, _ = make_task(Renamed)
    rows, _ = sweep(tmp_path, {**ckpts, "experts": experts}, module=module, grid=[[0.25, 0.75]], init=None,
                    morl=(), cache_checkpoints=False)
    expected = module.closed_form_rewards([0.25, 0.75])
    assert [rows[2]["rewards"]["r1"], rows[2]["rewards"]["r2"]] == pytest.approx(expected, abs=1e-6)


def test_validation_rows_drive_selection(tmp_path, ckpts):
    rows, _ = sweep(tmp_path, ckpts, grid=build_grid(GridSpec(points=5), 2), validate=True, morl=())
    assert all(r["val_rewards"] == r["rewards"] and r["val_samples"] == 6 for r in rows)
    summary = build_summary(rows, SummarySettings(preferences=[[0.5, 0.5]]))
    assert summary["selection"]["split"] == "val"
    assert summary["selection"]["preferences"][0]["test_rewards_at_lambda_star"] is not None


def test_lora_adapter_folders_are_souped_in_place_through_the_peft_hook(tmp_path):
    """PEFT adapter folders (saved names) land on the live LoRA factors (module names) via the hook."""
    pytest.importorskip("peft")
    import lightning.pytorch as pl
    import torchmetrics
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rs_lightning.soup.lora import live_adapter_state

    def tiny_lora():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2)
        return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    class LoraTask(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy = tiny_lora()
            self.score = torchmetrics.MeanMetric()
            self.seen = []

        def soup_state_dict(self):
            return live_adapter_state(self.policy)

        def test_step(self, batch, batch_idx):
            self.seen.append({k: v.clone() for k, v in self.soup_state_dict().items()})
            self.score.update(self.policy(input_ids=batch).logits[:, -1, 0])
            self.log("test/reward/logit", self.score)

    folders = []
    for i in range(2):
        model = tiny_lora()
        for j, (name, p) in enumerate(model.named_parameters()):
            if "lora_" in name:
                p.data.normal_(generator=torch.Generator().manual_seed(1000 * i + j))
        folders.append(tmp_path / f"adapter_{i}")
        model.save_pretrained(folders[-1])
    task = LoraTask()
    data = QuadraticData(n_samples=2, batch_size=2)
    data.test_dataloader = lambda: torch.utils.data.DataLoader(torch.zeros(2, 4, dtype=torch.long), batch_size=2)
    rows = run_sweep(task, data, [Checkpoint(str(f)) for f in folders], [[0.25, 0.75]], tmp_path / "run",
                     progress=False, validate=False)  # the task has no validation_step
    assert len(rows) == 3 and all(r["valid"] for r in rows)
    from safetensors.torch import load_file

    saved = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    souped = task.seen[-1]  # the soup point was evaluated last
    assert set(souped) == set(saved[0])
    for key, value in souped.items():
        torch.testing.assert_close(value, 0.25 * saved[0][key] + 0.75 * saved[1][key])
