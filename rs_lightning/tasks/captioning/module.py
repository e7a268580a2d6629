"""`CaptioningModule`: a CoCa captioner trained with cross-entropy (stage "xe") or SCST (stage "scst").

The settings named here are the groups of settings.py (`scst.num_samples` is the config key
`model.init_args.scst.num_samples`):
- "xe": teacher-forced cross-entropy on every reference caption of each image (the image is encoded once);
  this trains the shared initialisation of the experts, exported with `export.ExportCaptioner`.
- "scst": self-critical sequence training as in the paper's captioner: `scst.num_samples` (5) captions sampled
  per image, reward = one metric or the MORL mixture sum_i mu_i R_i / sum_i mu_i (`reward_weights` = mu),
  baseline = the mean reward of the other k-1 samples (or the greedy caption's reward), loss =
  -(r - b) * sum_t log p_t averaged over samples. SCST runs start from the XE export through `init_checkpoint`.
Optimiser (`optim`): RAdam (0.9, 0.98), eps 1e-9, lr with warm-up and x0.8 per epoch down to 5e-7 (`schedule.py`).
Evaluation (`decoding`) decodes with beam search (beam 5) or greedily and logs `val|test/reward/<name>` for
every metric (mean per-caption score: BLEU/METEOR differ from the corpus-level numbers; CIDEr-D takes df over the
evaluated split, which makes it pycocoevalcap's corpus CIDEr-D), and at test end `test/coco/<name>`,
pycocoevalcap's corpus metrics (PTB tokenizer; fast tokenizer and no METEOR without Java). The soup target is the
CoCa's full state dict (`soup_state_dict`).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from rs_lightning.rewards.registry import build_reward
from rs_lightning.rl import scst
from rs_lightning.tasks.captioning import rewards as rw
from rs_lightning.tasks.captioning.decoding import CaptionDecoder, MixtureDecoder, encode_images
from rs_lightning.tasks.captioning.export import check_vocab
from rs_lightning.tasks.captioning.model import (
    TINY_COCA,
    CaptionTokenizer,
    load_coca,
    load_weights,
    vocab_from_references,
)
from rs_lightning.tasks.captioning.schedule import configure_radam
from rs_lightning.tasks.captioning.settings import (
    GROUPS,
    CaptioningSettings,
    CLIPSettings,
    DecodingSettings,
    OptimSettings,
    SCSTSettings,
    as_dict,
    coerce,
)
from rs_lightning.tasks.ensemble import EnsembleMembers

DEFAULT_EVAL_METRICS = ("bleu1", "bleu4", "rouge_l", "cider_d", "meteor")
# Group defaults (frozen dataclasses): module-level so the signature shows them and jsonargparse reads their fields.
DEFAULT_OPTIM, DEFAULT_DECODING, DEFAULT_SCST, DEFAULT_CLIP = (OptimSettings(), DecodingSettings(), SCSTSettings(),
                                                               CLIPSettings())


class CaptioningModule(L.LightningModule):
    """CoCa captioner, XE or SCST; every argument is a config key (LightningCLI `model.init_args`).

    The settings beyond what a run varies per expert come in groups (rs_lightning/tasks/captioning/settings.py
    documents each field), nested keys in a config (`decoding: {eval_decoding: greedy}`) or on the command line
    (`--model.init_args.optim.lr 1e-4`); a group or a field not given keeps its default. Python callers may give
    each group as its dataclass, a dict of some of its fields, or None.

    Args:
        model: open_clip CoCa config ("coca-tiny" offline, "coca_ViT-L-14", ...).
        pretrained: open_clip tag (needs the hub) or local checkpoint for the CoCa; None: random init.
        init_checkpoint: safetensors export (or Lightning .ckpt) to start from, loaded strictly: the XE init.
        init_seed: seed of the random initialisation (a random CoCa is the same in every run).
        stage: "xe" or "scst".
        rewards: SCST training rewards (names from `rewards.REWARD_NAMES`), all logged in training.
        reward_weights: mu aligned with `rewards` (None: one reward, weight 1). One-hot: expert; mixed: MORL.
        eval_metrics: metrics logged at evaluation (default bleu1, bleu4, rouge_l, cider_d, meteor when Java is
            present, plus the training rewards).
        vocab: "full" (CoCa's 49408 BPE ids) or "train" (ids of the training references, + EOT).
        freeze_visual: keep the image tower fixed (the paper's default froze its backbone).
        corpus_metrics: log pycocoevalcap corpus metrics at test end.
        optim: the RAdam optimiser, its warm-up/anneal schedule and the XE label smoothing.
        decoding: caption generation: maximum length, evaluation by beam search or greedily, beam size, length
            penalty.
        scst: SCST: samples per image, baseline, sampling seed.
        clip: the CLIP behind the "clipscore" reward and metric.
    """

    def __init__(
        self,
        model: str = TINY_COCA,
        pretrained: str | None = None,
        init_checkpoint: str | None = None,
        init_seed: int = 0,
        stage: str = "scst",
        rewards: list[str] = ("cider_d",),  # type: ignore[assignment]
        reward_weights: list[float] | None = None,
        eval_metrics: list[str] | None = None,
        vocab: str = "full",
        freeze_visual: bool = False,
        corpus_metrics: bool = True,
        optim: OptimSettings = DEFAULT_OPTIM,
        decoding: DecodingSettings = DEFAULT_DECODING,
        scst: SCSTSettings = DEFAULT_SCST,
        clip: CLIPSettings = DEFAULT_CLIP,
    ) -> None:
        super().__init__()
        self.settings = CaptioningSettings(optim=coerce("optim", optim), decoding=coerce("decoding", decoding),
                                           scst=coerce("scst", scst), clip=coerce("clip", clip))
        # save_hyperparameters reads these arguments from this frame: rebound to plain dicts, so checkpoints,
        # hparams.yaml and the front's config hash hold plain data whichever form a caller gave (the CLI gives
        # its own config, where they are dicts already).
        optim, decoding, scst, clip = (as_dict(getattr(self.settings, g)) for g in GROUPS)
        self.save_hyperparameters()
        for key, value, allowed in (("stage", stage, ("xe", "scst")), ("vocab", vocab, ("full", "train"))):
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {value!r}")
        rewards = list(rewards)
        if reward_weights is None and len(rewards) != 1:
            raise ValueError(f"{len(rewards)} rewards {rewards} need model.reward_weights (mu)")
        self.reward_weights = [1.0] if reward_weights is None else [float(w) for w in reward_weights]
        if len(self.reward_weights) != len(rewards):
            raise ValueError(f"got {len(self.reward_weights)} reward_weights for rewards {rewards}")
        metrics = list(eval_metrics) if eval_metrics is not None else [
            m for m in DEFAULT_EVAL_METRICS if m != "meteor" or shutil.which("java")]
        options = {"clipscore": dict(model=self.settings.clip.model, pretrained=self.settings.clip.pretrained)}
        # XE needs no reward: skip building them (CIDEr-D df over 113k COCO images is not free).
        train = rewards if stage == "scst" else []
        metrics += [r for r in train if r not in metrics]
        self.train_rewards = nn.ModuleDict({n: build_reward(n, **options.get(n, {})) for n in train})
        self.val_metrics = nn.ModuleDict({n: build_reward(n, **options.get(n, {})) for n in metrics})
        self.test_metrics = nn.ModuleDict({n: build_reward(n, **options.get(n, {})) for n in metrics})
        # The SCST reward sum_i mu_i R_i / sum_i mu_i (it holds no persistent state: checkpoints are unchanged).
        self.objective = rw.CaptionMixture(dict(self.train_rewards), self.reward_weights, name="total") if train \
            else None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = load_coca(model, pretrained)
        if init_checkpoint:
            load_weights(self.model, init_checkpoint)
        if freeze_visual:
            self.model.visual.requires_grad_(False)
        self.tokenizer = CaptionTokenizer(model)
        self.vocab_ids: Tensor | None = None
        self.test_captions: list[dict[str, Any]] = []
        self._ready: set[str] = set()

    # -- model and data -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Idempotent: a front sweep calls trainer.test (and so setup) at every point.
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "train_references"):
            if "warned" not in self._ready and (self.hparams.vocab == "train" or "cider_d" in self.train_rewards):
                rank_zero_warn("no CaptionDataModule: the full vocabulary and per-batch CIDEr-D df are used")
            self._ready.add("warned")
            return
        if "train" not in self._ready:
            train_refs = dm.train_references()
            if self.hparams.vocab == "train":
                self.vocab_ids = vocab_from_references(self.tokenizer, train_refs)
                if self.hparams.init_checkpoint:
                    check_vocab(self.hparams.init_checkpoint, self.vocab_ids)
            for reward in self.train_rewards.values():
                if isinstance(reward, rw.CaptionMetric):
                    reward.set_cider_corpus(train_refs)
            self._ready.add("train")
        # Evaluation CIDEr-D takes df over the evaluated split, as pycocoevalcap's corpus score does.
        for split, metrics in (("val", self.val_metrics), ("test", self.test_metrics)):
            wanted = stage in ("fit", "validate") if split == "val" else stage == "test"
            if wanted and split not in self._ready and "cider_d" in metrics:
                metrics["cider_d"].set_cider_corpus(dm.dataset(split).references)
                self._ready.add(split)

    def decoder(self) -> CaptionDecoder:
        tok = self.tokenizer
        return CaptionDecoder(self.model, tok.sot_id, tok.eot_id, tok.pad_id, self.vocab_ids)

    def soup_state_dict(self) -> dict[str, Tensor]:
        """The CoCa's full state dict (live tensors): what soups of exported experts are written into."""
        return self.model.state_dict()

    def set_ensemble(self, states: list[dict[str, Tensor]] | None, weights: list[float] | None = None) -> None:
        """Evaluate the token-level mixture of N experts instead of `self.model` (None: back to the model).

        The functional-ensembling baseline of `rs front` (front.ensemble): `states` are the experts' state dicts
        (the keys `soup_state_dict` uses), `weights` the mixture weights. Member models are copies of
        `self.model` loaded once per list of states and reused across the sweep's points.
        """
        if states is None:  # back to the model; the members stay built for the sweep's next point
            self._ensemble = None
            return

        def build(state):
            member = copy.deepcopy(self.model)
            member.load_state_dict(state)
            return member

        if getattr(self, "_ensemble_members", None) is None:
            self._ensemble_members = EnsembleMembers()
        members = [m.to(self.device) for m in self._ensemble_members.get(states, build)]
        self._ensemble = (members, list(weights))

    def _caption_decoder(self, images: Tensor):
        """(decoder, image embeddings) of evaluation: the model's, or the ensemble's mixture (set_ensemble)."""
        ensemble = getattr(self, "_ensemble", None)
        if ensemble is None:
            return self.decoder(), encode_images(self.model, images)
        members, weights = ensemble
        tok = self.tokenizer
        decoders = [CaptionDecoder(m, tok.sot_id, tok.eot_id, tok.pad_id, self.vocab_ids) for m in members]
        mixture = MixtureDecoder(decoders, weights)
        return mixture, [encode_images(m, images) for m, w in zip(members, weights) if w > 0]

    def configure_optimizers(self):
        opt = self.settings.optim
        every = opt.anneal_every
        if every is None:
            _ = self.trainer.estimated_stepping_batches  # loads the train loader, so num_training_batches is set
            every = self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        params = [p for p in self.model.parameters() if p.requires_grad]
        return configure_radam(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
                               warmup_steps=opt.warmup_steps, anneal=opt.anneal, min_lr=opt.min_lr,
                               steps_per_epoch=every)

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # -- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.xe_step(batch) if self.hparams.stage == "xe" else self.scst_step(batch)

    def xe_step(self, batch: dict[str, Any]) -> Tensor:
        """Cross-entropy over every reference of every image (`images` `[B, 3, S, S]`, B reference lists)."""
        refs = batch["references"]
        counts = torch.tensor([len(r) for r in refs], device=self.device)
        captions = self.tokenizer.encode([c for r in refs for c in r]).to(self.device)
        embs = encode_images(self.model, batch["images"]).repeat_interleave(counts, dim=0)
        loss = self.decoder().xe_loss(embs, captions, self.settings.optim.label_smoothing)
        self.log("train/xe_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(refs))
        return loss

    def _rewards(self, texts: list[str], refs: list[list[str]], images: Tensor | None) -> dict[str, Tensor]:
        return self.objective.score_components(texts, refs, images)

    def scst_step(self, batch: dict[str, Any]) -> Tensor:
        """One SCST loss: k samples per image `[B*k, T]`, rewards and baseline `[B, k]`, 0-dim loss."""
        sc, images, refs = self.settings.scst, batch["images"], batch["references"]
        max_length = self.settings.decoding.max_length
        b, k = len(refs), sc.num_samples
        decoder = self.decoder()
        embs = encode_images(self.model, images)
        samples_embs = embs.repeat_interleave(k, dim=0)
        generator = torch.Generator(device=self.device)
        # Seeded per training batch (not per optimizer step: gradient accumulation) and rank, so a resumed run
        # draws the same captions as an uninterrupted one.
        batches = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else 0
        generator.manual_seed(sc.sample_seed * 1_000_003 + batches * 7919 + self.global_rank)
        with self._eval_mode():
            sampled = decoder.generate(samples_embs.detach(), max_length, generator=generator)
        texts = self.tokenizer.decode_batch(sampled.tokens)
        needs_images = self.objective.needs_images
        components = self._rewards(texts, [r for r in refs for _ in range(k)],
                                   images.repeat_interleave(k, dim=0) if needs_images else None)
        total = self.objective.combine(components).view(b, k)
        if sc.baseline == "leave_one_out":
            baseline = scst.leave_one_out_baseline(total)
        else:
            with self._eval_mode():
                greedy = decoder.generate(embs.detach(), max_length, greedy=True)
            greedy_texts = self.tokenizer.decode_batch(greedy.tokens)
            greedy_total = self.objective.combine(self._rewards(greedy_texts, refs, images if needs_images else None))
            baseline = scst.greedy_baseline(total, greedy_total)
        logp = decoder.token_logprobs(samples_embs, sampled.tokens, sampled.mask)
        t = sampled.tokens.shape[1]
        loss = scst.scst_loss(logp.view(b, k, t), total.to(self.device), baseline.to(self.device),
                              mask=sampled.mask.view(b, k, t))
        log = dict(on_step=True, on_epoch=False, sync_dist=True, batch_size=b)
        for name, values in components.items():
            self.log(f"train/reward/{name}", values.mean().to(self.device), prog_bar=True, **log)
        self.log("train/reward/total", total.mean().to(self.device), **log)
        self.log("train/scst_loss", loss.detach(), **log)
        self.log("train/caption_length", sampled.mask.sum(1).mean(), **log)
        return loss

    def fisher_log_likelihood(self, batch: dict[str, Any]) -> Tensor:
        """Per image `[B]`: log p(caption | image) of one caption sampled from the model, differentiable in every
        parameter (image encoder included): what `rs fisher` squares and averages (rs_lightning.fisher). Eval
        mode (no dropout), and each call draws from its own seed (`scst.sample_seed` + call count): repeatable."""
        decoder = self.decoder()
        calls = getattr(self, "_fisher_calls", 0)
        self._fisher_calls = calls + 1
        seed = self.settings.scst.sample_seed * 1_000_003 + 104_729 + calls
        generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._eval_mode():
            embs = encode_images(self.model, batch["images"].to(self.device))
            with torch.no_grad():
                sampled = decoder.generate(embs.detach(), self.settings.decoding.max_length, generator=generator)
            logp = decoder.token_logprobs(embs, sampled.tokens, sampled.mask)
        return logp.sum(1)

    # -- evaluation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, images: Tensor) -> list[str]:
        """Evaluation captions of `[B, 3, S, S]` images (beam search or greedy, per `decoding.eval_decoding`)."""
        dec = self.settings.decoding
        with self._eval_mode():
            decoder, embs = self._caption_decoder(images)
            if dec.eval_decoding == "beam":
                out = decoder.beam_search(embs, dec.max_length, dec.beam_size, dec.length_penalty)
            else:
                out = decoder.generate(embs, dec.max_length, greedy=True)
        return self.tokenizer.decode_batch(out.tokens)

    @torch.no_grad()
    def serve_step(self, batch: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
        """Captions of `batch` by the model as it now is, and each test metric's per-caption score, without
        logging: what `rs serve` shows for the soup of the moment (the same values `test_step` would score)."""
        images = batch["images"].to(self.device)
        texts = self.caption(images)
        scores = {name: metric.score(texts, batch["references"], images).float().cpu().tolist()
                  for name, metric in self.test_metrics.items()}
        return texts, scores

    def _evaluate(self, batch: dict[str, Any], metrics: nn.ModuleDict, stage: str) -> tuple[list[str], dict]:
        texts, refs = self.caption(batch["images"]), batch["references"]
        scores = {}
        for name, metric in metrics.items():
            # Per-caption scores for the front's paired bootstrap (rs_lightning.front.per_example), scored once:
            # `add_scores` feeds the same values to the logged mean (torchmetrics', synced across devices).
            scores[name] = metric.score(texts, refs, batch["images"])
            metric.add_scores(scores[name])
            self.log(f"{stage}/reward/{name}", metric, on_step=False, on_epoch=True, batch_size=len(texts))
        return texts, {"rewards": scores}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._evaluate(batch, self.val_metrics, "val")[1]

    def on_test_epoch_start(self) -> None:
        self.test_captions = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        texts, out = self._evaluate(batch, self.test_metrics, "test")
        self.test_captions += [{"id": i, "caption": c, "references": r}
                               for i, c, r in zip(batch["ids"], texts, batch["references"])]
        return out

    def on_test_epoch_end(self) -> None:
        if not self.hparams.corpus_metrics:
            return
        rows = self.test_captions
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not rows:
            return
        values = rw.corpus_metrics([r["caption"] for r in rows], [r["references"] for r in rows])
        for name, value in values.items():
            self.log(f"test/coco/{name}", value, sync_dist=False, rank_zero_only=False)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        return [{"id": i, "caption": c} for i, c in zip(batch["ids"], self.caption(batch["images"]))]

    # -- checkpoints ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rs_vocab"] = None if self.vocab_ids is None else self.vocab_ids.tolist()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("rs_vocab") is not None:
            self.vocab_ids = torch.tensor(checkpoint["rs_vocab"], dtype=torch.long)
