"""One reward contract for text and captions: one base class owning the sum/count states and the score/update/
compute plumbing, one `build_reward` for every reward name of both families."""

import pytest
import torch

from rs_lightning.rewards import caption
from rs_lightning.rewards.base import CaptionRewardMetric, RewardMetric, TextRewardMetric
from rs_lightning.rewards.caption_metric import CaptionMetric
from rs_lightning.rewards.mixture import MixtureReward
from rs_lightning.rewards.registry import REWARD_TYPES, build_reward
from rs_lightning.rewards.rules import KeywordReward, LengthReward
from rs_lightning.rewards.vader import VaderReward
from rs_lightning.tasks.captioning.rewards import CaptionMixture, CLIPScore

CANDS = ["a red circle on the left", "a big blue box", "two shapes"]
REFS = [["a red disc on the left", "a small red circle"], ["a large blue square at the top", "a blue box"],
        ["a green dot and a red box", "two shapes: a dot and a box"]]
TEXTS = ["good good", "a b c d e f", "good"]

#: the init arguments a type name cannot do without (every other one builds from its name alone)
REQUIRED = {
    "classifier": {"model": "some-org/some-reward-model"},  # loaded lazily: never loaded here
    "keyword": {"keywords": ["good"]},
    "mixture": {"components": {"short": "length", "good": {"type": "keyword", "keywords": ["good"]}},
                "weights": [1.0, 1.0]},
    "caption_mixture": {"components": {"bleu1": "bleu1", "clip": "clipscore"}, "weights": [1.0, 1.0]},
}
CAPTION_TYPES = {*caption.METRICS, "clipscore", "caption_mixture"}


def _both_families():
    text = [LengthReward(), KeywordReward(["good"]), VaderReward()]
    captions = [CaptionMetric("bleu1"), CaptionMetric("rouge_l"),
                CaptionMixture({"bleu1": CaptionMetric("bleu1"), "rouge_l": CaptionMetric("rouge_l")}, [1.0, 2.0])]
    return text, captions


def test_both_families_share_the_base_states_and_their_mean():
    text, captions = _both_families()
    batches = [(text, ([""] * 3, TEXTS)), (captions, (CANDS, REFS))]
    for rewards, batch in batches:
        for reward in rewards:
            assert isinstance(reward, RewardMetric)
            assert set(reward.metric_state) == {"total", "count"}, type(reward).__name__
            scores = reward.score(*batch)
            assert scores.shape == (3,) and scores.dtype == torch.float32
            assert int(reward.count) == 0  # score leaves the states alone
            reward.update(*batch)
            reward.update(*batch)
            assert int(reward.count) == 6
            assert float(reward.total) == pytest.approx(2 * float(scores.sum()), abs=1e-6)
            assert float(reward.compute()) == pytest.approx(float(scores.mean()), abs=1e-6)
    # One copy of the plumbing: no reward of either family re-implements update/compute.
    for reward in [*text, *captions]:
        assert type(reward).update is RewardMetric.update and type(reward).compute is RewardMetric.compute


def test_families_check_their_own_batch():
    with pytest.raises(TypeError, match="responses must be a list of strings"):
        LengthReward().score([""], "one string")
    with pytest.raises(ValueError, match="got 2 candidates but 3 reference lists"):
        CaptionMetric("bleu1").score(CANDS[:2], REFS)
    with pytest.raises(ValueError, match="references\\[0\\] must be a non-empty list"):
        CaptionMetric("bleu1").score(CANDS[:1], [[]])

    class Familyless(RewardMetric):
        pass

    with pytest.raises(NotImplementedError, match="Familyless belongs to no reward family"):
        Familyless().score(["a"])


def test_build_reward_builds_every_known_name():
    assert set(REQUIRED) <= set(REWARD_TYPES) and CAPTION_TYPES <= set(REWARD_TYPES)
    for name in REWARD_TYPES:
        reward = build_reward(name, **REQUIRED.get(name, {}))
        family = CaptionRewardMetric if name in CAPTION_TYPES else TextRewardMetric
        assert isinstance(reward, family), name
    for metric in caption.METRICS:
        reward = build_reward(metric)
        assert isinstance(reward, CaptionMetric) and reward.metric == metric and reward.name == metric
    clip = build_reward("clipscore", model="clip-tiny", weight=1.0)
    assert isinstance(clip, CLIPScore) and clip.name == "clipscore" and clip.weight == 1.0
    mix = build_reward("caption_mixture", **REQUIRED["caption_mixture"])
    assert isinstance(mix, CaptionMixture) and mix.names == ["bleu1", "clip"] and mix.needs_images
    assert isinstance(build_reward("mixture", **REQUIRED["mixture"]), MixtureReward)


def test_build_reward_rejects_unknown_names_and_bad_options():
    with pytest.raises(ValueError, match="unknown reward type 'bleu5'; known types") as err:
        build_reward("bleu5")
    assert all(repr(name) in str(err.value) for name in REWARD_TYPES)
    with pytest.raises(ValueError, match="reward type 'bleu4' fixes \\['metric'\\]"):
        build_reward("bleu4", metric="rouge_l")
    with pytest.raises(ValueError, match="bad arguments for CLIPScore"):
        build_reward("clipscore", bogus=1)
    with pytest.raises(ValueError, match="cannot apply to an already built VaderReward"):
        build_reward(VaderReward(), name="positive")
    # a mixture takes components of its own family only, and says which one is wrong
    with pytest.raises(ValueError, match="'pos' is a VaderReward, expected a CaptionRewardMetric"):
        build_reward({"type": "caption_mixture", "components": {"pos": "vader"}, "weights": [1.0]})
    with pytest.raises(ValueError, match="'cider' is a CaptionMetric, expected a TextRewardMetric"):
        build_reward({"type": "mixture", "components": {"cider": "cider_d"}, "weights": [1.0]})


def test_add_scores_is_an_update_for_torchmetrics():
    """Scores added directly (the evaluation path, which scores each batch once) count as an update: compute()
    neither warns that it ran before any update nor returns a value cached before the last scores came in."""
    import warnings

    metric = LengthReward()
    metric.add_scores(torch.tensor([1.0, 3.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metric.compute().item() == 2.0
    metric.add_scores(torch.tensor([5.0]))
    assert metric.compute().item() == 3.0
    metric.reset()
    metric.update(["p", "q"], ["abc", "abcde"])
    assert metric.compute().item() == pytest.approx(float(metric.score(["p", "q"], ["abc", "abcde"]).mean()))
