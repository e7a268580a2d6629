"""SCST throughput on the tiny CoCa (`coca-tiny`, 64 px synthetic images): where a training step goes.

    (a) scst step    `CaptioningModule.scst_step` (encode images, sample k captions per image, score them,
                     leave-one-out baseline, teacher-forced log-probs) + backward + RAdam step, reward BLEU-1;
                     once with the output softmax over the training captions' ids (`vocab="train"`, the offline
                     configs) and once over CoCa's 49408 BPE ids (`vocab="full"`, the COCO configs)
    (b) sample       `CaptionDecoder.generate` of k captions per image, no gradient
    (c) rewards      BLEU-1 and CIDEr-D (cached df) of the B*k sampled captions (pure Python)
    (d) beam search  beam 5 evaluation captions of the B images

`extra_info` carries images/s and sampled captions/s (from the minimum time). Run:
`OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_scst.py` (one thread is several times faster
than two on a busy 2-core machine: the ops are tiny). Sizes: RS_BENCH_SCST_BATCH (images, default 16),
RS_BENCH_SCST_SAMPLES (k, 5), RS_BENCH_SCST_MAX_LENGTH (20), RS_BENCH_SCST_ROUNDS (5).
"""

from __future__ import annotations

import os

import pytest
import torch

BATCH = int(os.environ.get("RS_BENCH_SCST_BATCH", "16"))
SAMPLES = int(os.environ.get("RS_BENCH_SCST_SAMPLES", "5"))
MAX_LENGTH = int(os.environ.get("RS_BENCH_SCST_MAX_LENGTH", "20"))
ROUNDS = int(os.environ.get("RS_BENCH_SCST_ROUNDS", "5"))


@pytest.fixture(scope="module")
def data():
    from rs_lightning.tasks.captioning.data import CaptionDataModule, collate

    dm = CaptionDataModule(num_train=max(BATCH, 200), num_val=1, num_test=1)
    ds = dm.dataset("train")
    return dm.train_references(), collate([ds[i] for i in range(BATCH)])


def _module(vocab: str, refs):
    from rs_lightning.tasks.captioning.model import vocab_from_references
    from rs_lightning.tasks.captioning.module import CaptioningModule

    torch.manual_seed(0)
    module = CaptioningModule(stage="scst", rewards=["bleu1"], vocab=vocab, scst={"num_samples": SAMPLES},
                              decoding={"max_length": MAX_LENGTH}, eval_metrics=["bleu1"], corpus_metrics=False)
    if vocab == "train":
        module.vocab_ids = vocab_from_references(module.tokenizer, refs)
    module.log = lambda *args, **kwargs: None  # no Trainer here: logging is not what we measure
    # A fresh CoCa's output projection is zero (load_coca): uniform predictions, so almost every sampled caption
    # runs to MAX_LENGTH, the most work a step can take.
    return module


def _rates(benchmark, machine, images: int, captions: int = 0) -> None:
    best = benchmark.stats.stats.min
    benchmark.extra_info["machine"] = machine
    benchmark.extra_info["images_per_s"] = round(images / best, 1)
    if captions:
        benchmark.extra_info["sampled_captions_per_s"] = round(captions / best, 1)


@pytest.mark.parametrize("vocab", ["train", "full"])
def test_a_scst_step(benchmark, data, machine, vocab):
    refs, batch = data
    module = _module(vocab, refs)
    # foreach, as the training code builds it (schedule.configure_radam)
    optimizer = torch.optim.RAdam(module.model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-9, foreach=True)

    def step():
        optimizer.zero_grad()
        module.scst_step(batch).backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    _rates(benchmark, machine, BATCH, BATCH * SAMPLES)
    benchmark.extra_info["vocab_size"] = "49408" if vocab == "full" else str(len(module.vocab_ids))


def test_b_sample(benchmark, data, machine):
    from rs_lightning.tasks.captioning.decoding import encode_images

    refs, batch = data
    module = _module("train", refs)
    decoder = module.decoder()
    with torch.no_grad():
        embs = encode_images(module.model, batch["images"]).repeat_interleave(SAMPLES, 0)
    generator = torch.Generator().manual_seed(0)
    benchmark.pedantic(lambda: decoder.generate(embs, MAX_LENGTH, generator=generator), rounds=ROUNDS,
                       warmup_rounds=1)
    _rates(benchmark, machine, BATCH, BATCH * SAMPLES)


def test_c_rewards(benchmark, data, machine):
    from rs_lightning.rewards import caption

    refs, batch = data
    module = _module("train", refs)
    with torch.no_grad():
        from rs_lightning.tasks.captioning.decoding import encode_images

        embs = encode_images(module.model, batch["images"]).repeat_interleave(SAMPLES, 0)
        texts = module.tokenizer.decode_batch(module.decoder().generate(embs, MAX_LENGTH).tokens)
    sample_refs = [r for r in batch["references"] for _ in range(SAMPLES)]
    cider = caption.CiderD(refs)

    def score():
        caption.score("bleu1", texts, sample_refs)
        cider.score(texts, sample_refs)

    benchmark.pedantic(score, rounds=ROUNDS, warmup_rounds=1)
    _rates(benchmark, machine, BATCH, BATCH * SAMPLES)


def test_d_beam_search(benchmark, data, machine):
    refs, batch = data
    module = _module("train", refs)
    benchmark.pedantic(lambda: module.caption(batch["images"]), rounds=ROUNDS, warmup_rounds=1)
    _rates(benchmark, machine, BATCH)
