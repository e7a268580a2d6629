"""Caption rewards: COCO metrics as named rewards, CIDEr-D df, CLIPScore through a tiny CLIP, the MORL mixture
(all ordinary caption reward Metrics), and the paper's learning-rate schedule."""

import pytest
import torch

from rs_lightning.rewards import caption
from rs_lightning.rewards.registry import build_reward
from rs_lightning.rewards.rules import LengthReward
from rs_lightning.tasks.captioning import rewards as rw
from rs_lightning.tasks.captioning.schedule import configure_radam, warmup_anneal

CANDS = ["a red circle on the left", "a big blue box", "two shapes"]
REFS = [["a red disc on the left", "a small red circle"], ["a large blue square at the top", "a blue box"],
        ["a green dot and a red box", "two shapes: a dot and a box"]]


@pytest.mark.parametrize("metric", ["bleu1", "bleu4", "rouge_l", "cider_d"])
def test_caption_reward_equals_caption_score(metric):
    reward = build_reward(metric)
    assert reward.name == metric
    torch.testing.assert_close(reward.score(CANDS, REFS), torch.tensor(caption.score(metric, CANDS, REFS)))
    reward.update(CANDS[:2], REFS[:2])
    reward.update(CANDS[2:], REFS[2:], torch.zeros(1, 3, 8, 8))  # images are accepted and ignored
    expected = sum(caption.score(metric, CANDS[:2], REFS[:2]) + caption.score(metric, CANDS[2:], REFS[2:])) / 3
    assert float(reward.compute()) == pytest.approx(expected, abs=1e-6)


def test_cider_corpus_sets_document_frequencies():
    reward = rw.CaptionMetric("cider_d")
    corpus = REFS + [["a cat"], ["a dog on a mat"]]
    reward.set_cider_corpus(corpus)
    assert reward.score(CANDS, REFS).tolist() == pytest.approx(caption.CiderD(corpus).score(CANDS, REFS))
    # df over exactly the scored references is pycocoevalcap's corpus CIDEr-D
    reward.set_cider_corpus(REFS)
    assert float(reward.score(CANDS, REFS).mean()) == pytest.approx(
        caption.evaluate_corpus(CANDS, REFS, ["cider_d"], tokenizer="fast")["cider_d"], abs=1e-6)


def test_clipscore_with_a_tiny_clip():
    torch.manual_seed(0)
    reward = build_reward("clipscore")
    images = torch.randn(3, 3, 64, 64)
    scores = reward.score(CANDS, REFS, images)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 2.5)).all())
    assert torch.equal(scores, reward.score(CANDS, None, images))  # deterministic, reference-free
    # the CLIP is held outside the module tree: never in a captioner's state dict or soup
    assert list(reward.state_dict()) == [] and list(reward.parameters()) == []
    with pytest.raises(ValueError, match="image"):
        reward.score(CANDS, REFS)


def _mixture(weights):
    return build_reward({"type": "caption_mixture", "components": {"bleu1": "bleu1", "rouge_l": "rouge_l"},
                         "weights": weights})


def test_mixture_is_the_weighted_mean():
    comps = {"bleu1": torch.tensor([1.0, 0.0]), "rouge_l": torch.tensor([0.0, 0.5])}
    torch.testing.assert_close(_mixture([0.2, 0.8]).combine(comps), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(_mixture([2.0, 0.0]).combine(comps), comps["bleu1"])
    with pytest.raises(ValueError, match="not all zero"):
        _mixture([0.0, 0.0])


def test_mixture_metric_equals_the_hand_computed_weighted_mean():
    mix = _mixture([1.0, 3.0])
    assert isinstance(mix, rw.CaptionMixture) and mix.names == ["bleu1", "rouge_l"]
    bleu1 = torch.tensor(caption.score("bleu1", CANDS, REFS), dtype=torch.float32)
    rouge = torch.tensor(caption.score("rouge_l", CANDS, REFS), dtype=torch.float32)
    raw = mix.score_components(CANDS, REFS)
    assert torch.equal(raw["bleu1"], bleu1) and torch.equal(raw["rouge_l"], rouge)
    # sum_i mu_i R_i / sum_i mu_i, in float32 and component order: bit-equal to the former `mixture` function
    assert torch.equal(mix.score(CANDS, REFS), bleu1 * (1.0 / 4.0) + rouge * (3.0 / 4.0))
    # as a Metric: the mean of the per-caption mixture, through the shared sum/count states
    mix.update(CANDS[:1], REFS[:1])
    mix.update(CANDS[1:], REFS[1:], torch.zeros(2, 3, 8, 8))
    assert int(mix.count) == 3
    assert float(mix.compute()) == pytest.approx(float(((bleu1 + 3 * rouge) / 4).mean()), abs=1e-6)
    assert not mix.needs_images


def test_mixture_errors_name_the_culprit():
    with pytest.raises(ValueError, match="2 weights for 1 components"):
        rw.CaptionMixture({"bleu1": rw.CaptionMetric("bleu1")}, [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        rw.CaptionMixture([rw.CaptionMetric("bleu1")], [float("nan")])
    with pytest.raises(TypeError, match="'short' is a LengthReward, expected a CaptionRewardMetric"):
        rw.CaptionMixture({"short": LengthReward()}, [1.0])
    with pytest.raises(KeyError, match="rouge_l"):
        _mixture([0.5, 0.5]).combine({"bleu1": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs the reference captions"):
        rw.CaptionMetric("bleu1").score(CANDS)


def test_clipscore_metric_accumulates_the_mean_of_its_scores():
    torch.manual_seed(0)
    reward = rw.CLIPScore()
    images = torch.randn(3, 3, 64, 64)
    scores = reward.score(CANDS, None, images)
    reward.update(CANDS[:2], REFS[:2], images[:2])
    reward.update(CANDS[2:], images=images[2:])
    assert int(reward.count) == 3
    assert float(reward.compute()) == pytest.approx(float(scores.mean()), abs=1e-6)
    reward.reset()
    assert int(reward.count) == 0 and float(reward.total) == 0.0
    # scoring ran in inference mode; the CLIP it moved there must still be usable outside it
    assert not any(p.is_inference() for p in reward._clip.value[0].parameters())
    # in a mixture with a COCO metric: the images reach CLIPScore, the mixture says it needs them
    mix = rw.CaptionMixture({"clip": reward, "bleu1": rw.CaptionMetric("bleu1")}, [1.0, 1.0])
    assert mix.needs_images
    bleu1 = torch.tensor(caption.score("bleu1", CANDS, REFS), dtype=torch.float32)
    torch.testing.assert_close(mix.score(CANDS, REFS, images), (scores + bleu1) / 2)
    with pytest.raises(ValueError, match="2 images for 3 candidate captions"):
        mix.score(CANDS, REFS, images[:2])


def test_warmup_anneal_schedule():
    f = warmup_anneal(1e-5, warmup_steps=4, anneal=0.8, steps_per_epoch=10, min_lr=5e-7)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(9) == 1.0 and f(10) == pytest.approx(0.8) and f(25) == pytest.approx(0.64)
    assert f(10_000) == pytest.approx(5e-7 / 1e-5)  # the floor
    param = torch.nn.Parameter(torch.zeros(2))
    cfg = configure_radam([param], lr=1e-5, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0, warmup_steps=1,
                          anneal=0.8, min_lr=5e-7, steps_per_epoch=2)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.RAdam) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-5, 1e-5, 8e-6, 8e-6, 6.4e-6])
