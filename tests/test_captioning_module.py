"""`CaptioningModule` end to end on CPU: XE learns, exports load as inits, logged test metrics equal the scorers,
SCST experts soup back to themselves exactly, and the YAML configs run through the CLI."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from rs_lightning.rewards import caption
from rs_lightning.soup import interpolate
from rs_lightning.tasks.captioning.data import CaptionDataModule
from rs_lightning.tasks.captioning.export import ExportCaptioner, read_metadata
from rs_lightning.tasks.captioning.model import load_weights
from rs_lightning.tasks.captioning.module import CaptioningModule
from rs_lightning.tasks.captioning.settings import GROUPS, coerce

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "captioning"
FAST = dict(eval_metrics=["bleu1", "bleu4", "rouge_l", "cider_d"], corpus_metrics=False, vocab="train",
            decoding={"max_length": 16})
FAST_GREEDY = {**FAST, "decoding": {"max_length": 16, "eval_decoding": "greedy"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def _trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", -1)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kwargs)


def _data(**kwargs) -> CaptionDataModule:
    args = dict(num_train=400, num_val=8, num_test=40, batch_size=16, eval_batch_size=40, seed=0)
    return CaptionDataModule(**{**args, **kwargs})


def _test(module, dm) -> dict[str, float]:
    return {k: float(v) for k, v in _trainer().test(module, dm, verbose=False)[0].items()}


@pytest.fixture(scope="module")
def xe_init(tmp_path_factory):
    """A tiny CoCa trained with XE for 100 steps (batch 16) on the synthetic set, exported as safetensors."""
    path = tmp_path_factory.mktemp("xe") / "init" / "model.safetensors"
    L.seed_everything(0)
    module = CaptioningModule(stage="xe", optim={"lr": 2e-3, "warmup_steps": 10, "anneal": 1.0}, **FAST_GREEDY)
    _trainer(max_steps=100, callbacks=[ExportCaptioner(str(path))]).fit(module, _data())
    return path


def test_xe_captions_held_out_images_far_above_an_untrained_model(xe_init):
    dm = _data()
    untrained = _test(CaptioningModule(stage="xe", **FAST_GREEDY), dm)
    trained = _test(CaptioningModule(stage="xe", init_checkpoint=str(xe_init), **FAST_GREEDY), dm)
    assert untrained["test/reward/cider_d"] < 0.05
    assert trained["test/reward/cider_d"] > 0.3 and trained["test/reward/bleu1"] > 0.4


def test_export_metadata_and_init_checks(xe_init):
    meta = read_metadata(xe_init)
    assert meta["stage"] == "xe" and meta["model"] == "coca-tiny" and meta["optimizer_steps"] == "100"
    module = CaptioningModule(stage="scst", rewards=["bleu1"], init_checkpoint=str(xe_init), **FAST)
    fresh = CaptioningModule(stage="scst", rewards=["bleu1"], **FAST)
    load_weights(fresh.model, xe_init)
    assert module.soup_state_dict().keys() == fresh.model.state_dict().keys()
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in module.soup_state_dict().items())
    # the soup target is live: writing into it changes the model
    module.soup_state_dict()["logit_scale"].fill_(1.5)
    assert float(module.model.logit_scale.detach()) == 1.5
    with pytest.raises(ValueError, match="vocabulary"):  # one-shape scenes: no "two shapes" tokens
        _trainer().test(CaptioningModule(stage="scst", rewards=["bleu1"], init_checkpoint=str(xe_init), **FAST),
                        _data(max_shapes=1), verbose=False)


def _scores(module, metric):
    rows = module.test_captions
    return caption.score(metric, [r["caption"] for r in rows], [r["references"] for r in rows])


class _Returned(L.Callback):
    """The per-example rewards `test_step` returns (the contract `rs front` reads), in batch order."""

    def __init__(self):
        self.rewards: dict[str, list[float]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for name, values in outputs["rewards"].items():
            assert values.shape == (len(batch["ids"]),)
            self.rewards.setdefault(name, []).extend(values.tolist())


def test_logged_test_metrics_equal_caption_scores(xe_init):
    module = CaptioningModule(stage="scst", rewards=["bleu1"], init_checkpoint=str(xe_init), **FAST)
    returned = _Returned()
    logged = {k: float(v) for k, v in
              _trainer(callbacks=[returned]).test(module, _data(eval_batch_size=16), verbose=False)[0].items()}
    rows = module.test_captions
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    assert set(returned.rewards) == {k.removeprefix("test/reward/") for k in logged if k.startswith("test/reward/")}
    for metric in ("bleu1", "bleu4", "rouge_l"):
        values = _scores(module, metric)
        assert logged[f"test/reward/{metric}"] == pytest.approx(sum(values) / len(values), abs=1e-6)
        assert returned.rewards[metric] == pytest.approx(values, abs=1e-6)  # per caption, in caption order
    assert sum(returned.rewards["cider_d"]) / 40 == pytest.approx(logged["test/reward/cider_d"], abs=1e-5)
    # CIDEr-D with df over the test split's references is the corpus CIDEr-D of pycocoevalcap
    corpus = caption.evaluate_corpus([r["caption"] for r in rows], [r["references"] for r in rows], ["cider_d"],
                                     tokenizer="fast")
    assert logged["test/reward/cider_d"] == pytest.approx(corpus["cider_d"], abs=1e-5)
    assert logged["test/reward/cider_d"] > 0.3


@pytest.mark.java
def test_logged_meteor_and_corpus_metrics_equal_pycocoevalcap(xe_init):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor

    from rs_lightning.rewards.caption_text import tokenize_all, tokenize_references

    module = CaptioningModule(stage="scst", rewards=["bleu1"], init_checkpoint=str(xe_init),
                              **{**FAST, "eval_metrics": ["meteor"], "corpus_metrics": True})
    logged = _test(module, _data(num_test=12, eval_batch_size=6))
    rows = module.test_captions
    cands = tokenize_all([r["caption"] for r in rows])
    refs = tokenize_references([r["references"] for r in rows])
    scorer = Meteor()
    try:
        _, per_caption = scorer.compute_score({i: refs[i] for i in range(12)}, {i: [cands[i]] for i in range(12)})
    finally:
        del scorer
    assert logged["test/reward/meteor"] == pytest.approx(sum(per_caption) / 12, abs=1e-6)
    ptb = caption.tokenize_ptb([r["caption"] for r in rows] + [x for r in rows for x in r["references"]])
    gts, res, it = {}, {}, iter(ptb[12:])
    for i, r in enumerate(rows):
        res[i], gts[i] = [ptb[i]], [next(it) for _ in r["references"]]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert logged["test/coco/bleu4"] == pytest.approx(bleu[3], abs=1e-6)
    assert logged["test/coco/bleu1"] == pytest.approx(bleu[0], abs=1e-6)
    assert 0.0 < logged["test/coco/meteor"] < 1.0 and "test/coco/cider_d" in logged


def _expert(xe_init, out: Path, rewards, weights=None, baseline="leave_one_out") -> tuple[CaptioningModule, Path]:
    L.seed_everything(0)
    module = CaptioningModule(stage="scst", rewards=rewards, reward_weights=weights, init_checkpoint=str(xe_init),
                              optim={"lr": 1e-4}, scst={"num_samples": 3, "baseline": baseline}, **FAST)
    _trainer(max_steps=2, callbacks=[ExportCaptioner(str(out))]).fit(module, _data(batch_size=4))
    return module, out


def test_scst_experts_soup_back_to_themselves(xe_init, tmp_path):
    dm = _data(num_test=16)
    _, bleu1 = _expert(xe_init, tmp_path / "bleu1.safetensors", ["bleu1"])
    _, rouge = _expert(xe_init, tmp_path / "rouge_l.safetensors", ["rouge_l"], baseline="greedy")
    _, morl = _expert(xe_init, tmp_path / "morl.safetensors", ["bleu1", "rouge_l"], [0.5, 0.5])
    assert read_metadata(morl)["reward_weights"] == "[0.5, 0.5]"
    from safetensors.torch import load_file

    experts = [load_file(str(bleu1)), load_file(str(rouge))]
    assert not torch.equal(experts[0]["text_decoder.text_projection"], experts[1]["text_decoder.text_projection"])
    direct = []
    for path in (bleu1, rouge):
        direct.append(_test(CaptioningModule(stage="scst", rewards=["bleu1"], init_checkpoint=str(path), **FAST), dm))
    souped = CaptioningModule(stage="scst", rewards=["bleu1"], **FAST)
    for i in range(2):
        interpolate(experts, [1.0 - i, float(i)], out=souped.soup_state_dict())
        assert _test(souped, dm) == direct[i]  # bit-exact weights, so exactly the same captions and metrics
    mid = interpolate(experts, [0.5, 0.5], out=souped.soup_state_dict())
    assert not torch.equal(mid["text_decoder.text_projection"], experts[0]["text_decoder.text_projection"])


def _cli(config: str, *overrides: str) -> None:
    from rs_lightning.cli import main

    assert main(["fit", "--config", str(CONFIGS / config), *overrides]) == 0


def test_cli_xe_then_scst_configs(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["rs"])  # LightningCLI warns when pytest's own arguments are in sys.argv
    small = ["--data.init_args.num_train=32", "--data.init_args.num_val=4", "--data.init_args.num_test=4",
             "--data.init_args.batch_size=8", "--trainer.max_steps=2", "--trainer.max_epochs=1",
             "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={tmp_path}"]
    init = tmp_path / "init.safetensors"
    _cli("xe_init.yaml", *small, _export(init))
    assert read_metadata(init)["stage"] == "xe"
    for config in ("scst_bleu1.yaml", "scst_morl_bleu1_rouge_l.yaml"):
        expert = tmp_path / config.replace(".yaml", ".safetensors")
        _cli(config, *small, f"--model.init_args.init_checkpoint={init}", "--model.init_args.scst.num_samples=2",
             _export(expert))
        meta = read_metadata(expert)
        assert meta["init_checkpoint"] == str(init) and meta["stage"] == "scst"
    assert json.loads(meta["reward_weights"]) == [0.5, 0.5] and json.loads(meta["rewards"]) == ["bleu1", "rouge_l"]


def _export(path: Path) -> str:
    # Replace the config's callbacks (they export under runs/) by one export to `path`.
    callback = {"class_path": "rs_lightning.tasks.captioning.export.ExportCaptioner", "init_args": {"path": str(path)}}
    return "--trainer.callbacks=" + json.dumps([callback])


def test_every_config_matches_the_module_signature():
    import inspect

    from rs_lightning.tasks.captioning.data import CaptionDataModule as DM

    names = {p.name for p in CONFIGS.glob("*.yaml")}
    for wanted in ("xe_init", "scst_bleu1", "scst_bleu4", "scst_rouge_l", "scst_meteor", "scst_cider",
                   "scst_morl_bleu1_rouge_l", "coco_scst_bleu1", "coco_scst_rouge_l"):
        assert f"{wanted}.yaml" in names
    for path in CONFIGS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        for key, cls in (("model", CaptioningModule), ("data", DM)):
            assert cfg[key]["class_path"].endswith(cls.__name__), path
            unknown = set(cfg[key].get("init_args", {})) - set(inspect.signature(cls.__init__).parameters)
            assert not unknown, (path.name, unknown)
        args = cfg["model"]["init_args"]
        for group in GROUPS:  # a group's keys are its fields: coerce names any other
            coerce(group, args.get(group))
        if args.get("stage") == "scst" and len(args.get("rewards", [])) > 1:
            assert len(args["reward_weights"]) == len(args["rewards"]), path.name


def test_a_random_coca_never_reads_uninitialised_memory(monkeypatch):
    """open_clip leaves the CoCa decoder's text_projection as torch.empty: with recycled memory full of NaN it
    was NaN (a SmolLM2 run before it in one process was enough). Every floating torch.empty is NaN here."""
    from rs_lightning.tasks.captioning.model import load_coca

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    coca = load_coca("coca-tiny")
    monkeypatch.undo()
    bad = [n for n, p in coca.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, bad
    assert bool((coca.text_decoder.text_projection == 0).all())

