"""Caption metrics: fast BLEU/ROUGE-L/CIDEr-D against pycocoevalcap, METEOR's long-lived JVM, SPICE refusal.

Parity tests feed pycocoevalcap's scorer classes and ours the SAME tokenised strings (BLEU, ROUGE-L and
CIDEr need no Java). Tests that start a JVM are marked `java`; METEOR's paraphrase table takes seconds to
load, so both METEOR processes (ours and pycocoevalcap's) are started once per module, side by side.
"""

from __future__ import annotations

import math
import random
import shutil
import threading

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from rs_lightning.rewards import caption, caption_java
from rs_lightning.rewards.caption_metric import CaptionMetric

PARITY_TOL = 1e-6
VOCAB = "a the dog cat man woman on in with red blue runs sits table grass street two of and is".split()


def _mutate(words: list[str], edits: int, rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(edits):
        op = rng.random()
        i = rng.randrange(len(words)) if words else 0
        if op < 0.4 and words:
            words[i] = rng.choice(VOCAB)
        elif op < 0.7 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, rng.choice(VOCAB))
    return words


def _make_cases() -> tuple[list[str], list[list[str]]]:
    """Seeded captions from a 20-word vocabulary: references are edits of a base caption, so overlaps vary."""
    rng = random.Random(1234)
    cands, refs = [], []
    for _ in range(36):
        base = [rng.choice(VOCAB) for _ in range(rng.randint(3, 12))]
        refs.append([" ".join(_mutate(base, rng.randint(0, 6), rng)) for _ in range(rng.randint(1, 5))])
        cands.append(" ".join(_mutate(base, rng.randint(0, 8), rng)))
    edge_cases = [
        ("", ["a dog runs", "the dog"]),  # empty candidate
        ("dog", ["a dog runs on the grass", "the dog"]),  # single word
        (" ".join(VOCAB), ["a dog", "the red cat sits"]),  # much longer than its references
        ("a dog runs on the grass", ["a dog runs on the grass"] * 3),  # duplicated references, exact match
        ("the the the the", ["the cat", "the the cat"]),  # clipping of repeated words
        ("cat", ["cat"]),  # one word against one word
        ("a man with a red table", ["a man", "a man", "two women in the street"]),
    ]
    for cand, image_refs in edge_cases:
        cands.append(cand)
        refs.append(image_refs)
    return cands, refs


CANDS, REFS = _make_cases()


def _as_dicts(cands, refs):
    return {i: list(r) for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}


def _max_diff(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    return max(abs(float(a) - float(b)) for a, b in zip(ours, theirs))


# -- parity with pycocoevalcap (no Java) ---------------------------------------------------------------------


def test_generated_captions_are_already_fast_tokenised():
    # So the default `tokenize=True` path sees exactly what pycocoevalcap sees below.
    assert [caption.tokenize(c) for c in CANDS] == CANDS
    assert [[caption.tokenize(r) for r in rs] for rs in REFS] == REFS


@pytest.mark.parametrize("tokenize", [False, True])
def test_bleu_matches_pycocoevalcap_per_caption(tokenize):
    _, theirs = Bleu(4).compute_score(*_as_dicts(CANDS, REFS), verbose=0)
    for order in range(1, 5):
        ours = caption.score(f"bleu{order}", CANDS, REFS, tokenize=tokenize)
        assert _max_diff(ours, theirs[order - 1]) < PARITY_TOL, order


@pytest.mark.parametrize("tokenize", [False, True])
def test_rouge_l_matches_pycocoevalcap_per_caption(tokenize):
    _, theirs = Rouge().compute_score(*_as_dicts(CANDS, REFS))
    assert _max_diff(caption.score("rouge_l", CANDS, REFS, tokenize=tokenize), theirs) < PARITY_TOL


@pytest.mark.parametrize("tokenize", [False, True])
def test_cider_d_matches_pycocoevalcap_per_caption(tokenize):
    _, theirs = Cider().compute_score(*_as_dicts(CANDS, REFS))
    ours = caption.score("cider_d", CANDS, REFS, tokenize=tokenize)
    assert _max_diff(ours, theirs) < PARITY_TOL
    assert max(ours) > 1.0 and min(ours) == 0.0  # the cases span real overlaps and none


def test_cached_df_matches_pycocoevalcap_on_the_whole_corpus():
    # pycocoevalcap takes df over the batch; scoring the whole corpus with it gives the reference numbers
    # for CiderD(corpus) scoring any subset.
    _, theirs = Cider().compute_score(*_as_dicts(CANDS, REFS))
    scorer = caption.CiderD(REFS, tokenize=False)
    subset = [3, 0, 40, 17, 36]
    ours = scorer.score([CANDS[i] for i in subset], [REFS[i] for i in subset])
    assert _max_diff(ours, [theirs[i] for i in subset]) < PARITY_TOL
    # df over a small batch is a different (noisier) idf, hence different numbers.
    batch_df = caption.cider_d([CANDS[i] for i in subset], [REFS[i] for i in subset])
    assert _max_diff(batch_df, ours) > 1e-3


def test_duplicated_rows_count_twice_in_batch_df_like_pycocoevalcap():
    cands, refs = CANDS[:5] + CANDS[:5], REFS[:5] + REFS[:5]
    _, theirs = Cider().compute_score(*_as_dicts(cands, refs))
    assert _max_diff(caption.cider_d(cands, refs), theirs) < PARITY_TOL


# -- hand-computed values ------------------------------------------------------------------------------------


def test_bleu_hand_computed():
    # unigrams 3/4 match, bigrams 1/3 (only "a b"), no trigram; closest reference length 5 -> BP = exp(1 - 5/4)
    b1, b2, b3, b4 = caption.bleu(["a b c d"], [["a b x d e"]])[0]
    bp = math.exp(1 - 5 / 4)
    assert b1 == pytest.approx(0.75 * bp, abs=1e-8)
    assert b2 == pytest.approx(math.sqrt(0.75 / 3) * bp, abs=1e-8)
    assert 0 < b3 < 1e-3 and 0 < b4 < b3  # pycocoevalcap's tiny/small constants: small, never exactly 0
    # Ties in "closest" length go to the shorter reference: lengths 3 and 5 around a 4-word candidate.
    # Reference length 3 means no brevity penalty, so every unigram matching gives BLEU-1 = 1.
    assert caption.bleu(["a b c d"], [["a b c", "a b c d e"]])[0][0] == pytest.approx(1.0, abs=1e-8)


def test_rouge_l_hand_computed():
    # LCS("a b c d", "a c d e f") = "a c d": P = 3/4, R = 3/5, F_beta with beta = 1.2
    p, r, b2 = 0.75, 0.6, 1.2**2
    assert caption.rouge_l(["a b c d"], [["a c d e f"]])[0] == pytest.approx((1 + b2) * p * r / (r + b2 * p), 1e-12)
    # P and R are maximised over references separately (here from different references).
    # Ref 1 gives P = 2/2 (R = 2/6), ref 2 gives R = 1/1 (P = 1/2): P_max = R_max = 1, so F = 1.
    assert caption.rouge_l(["a b"], [["a x b y z w", "a"]])[0] == pytest.approx(1.0, abs=1e-12)


def test_cider_d_hand_computed():
    scorer = caption.CiderD([["a b"], ["c d"]], tokenize=False)
    # Perfect two-word match: cosine 1 for unigrams and bigrams, 0 for 3/4-grams -> mean 0.5, x10.
    assert scorer.score(["a b"], [["a b"]]) == pytest.approx([5.0], abs=1e-12)
    # "c" vs "c d": unigram cosine 1/sqrt(2); bigram lengths 0 vs 1 -> Gaussian penalty exp(-1 / 72).
    expected = (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert scorer.score(["c"], [["c d"]]) == pytest.approx([expected], abs=1e-12)
    # An n-gram present in every document has idf log(2) - log(2) = 0 and earns nothing.
    assert caption.CiderD([["a b"], ["a c"]], tokenize=False).score(["a"], [["a b"]]) == [0.0]


# -- tokenisation, validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man's dog runs.", "a man 's dog runs"),
        ("Two \"big\" dogs don't play; they're asleep!", "two big dogs do n't play they 're asleep"),
        ("A black-and-white photo -- 3.5 m/s, 50% off?", "a black-and-white photo 3.5 m/s 50 % off"),
        ("at 5:30, 1,000 people: 'quoted'", "at 5:30 1,000 people quoted"),
        ("  spaced \n out  ", "spaced out"),
        ("...", ""),
    ],
)
def test_fast_tokenize_rules(raw, expected):
    assert caption.tokenize(raw) == expected


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption.score("cider", ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 candidates but 1"):
        caption.score("bleu4", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="non-empty list"):
        caption.score("rouge_l", ["a"], [[]])
    with pytest.raises(ValueError, match="single string"):
        caption.score("bleu1", "a dog", [["a dog"]])
    with pytest.raises(ValueError, match="empty"):
        caption.CiderD([])


# -- SPICE and missing Java (no JVM started) ------------------------------------------------------------------


def test_spice_refused_with_clear_message_before_any_download(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(caption_java, "spice_lib_dir", lambda: tmp_path / "lib")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")

    def no_download(*args, **kwargs):
        raise AssertionError("pycocoevalcap tried to download CoreNLP")

    monkeypatch.setattr("urllib.request.urlretrieve", no_download)
    assert not caption.spice_available()
    with pytest.raises(caption.SpiceUnavailableError) as info:
        caption.SpiceScorer()
    message = str(info.value)
    assert f"{tmp_path / 'lib'}" in message
    assert "stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar" in message
    assert "cannot be downloaded offline" in message
    with pytest.raises(caption.SpiceUnavailableError):
        caption.score("spice", ["a dog"], [["a dog"]])
    with pytest.raises(caption.SpiceUnavailableError):  # refused before PTB tokenisation starts a JVM
        caption.evaluate_corpus(["a dog"], [["a dog"]], metrics=("bleu1", "spice"))


def test_spice_delegates_to_pycocoevalcap_when_jars_present(monkeypatch, tmp_path):
    lib = tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    for name in caption_java.CORENLP_JARS:
        (lib / name).write_bytes(b"")
    monkeypatch.setattr(caption_java, "spice_lib_dir", lambda: lib)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/java")
    calls = []

    class FakeSpice:
        def compute_score(self, gts, res):
            calls.append((gts, res))
            return 0.25, [{"All": {"f": 0.5, "pr": 0.5, "re": 0.5}}, {"All": {"f": 0.0, "pr": 0.0, "re": 0.0}}]

    monkeypatch.setattr("pycocoevalcap.spice.spice.Spice", FakeSpice)
    assert caption.spice_available()
    assert caption.SpiceScorer().compute_score(["a", "b"], [["a"], ["c", "d"]]) == (0.25, [0.5, 0.0])
    assert calls == [({0: ["a"], 1: ["c", "d"]}, {0: ["a"], 1: ["b"]})]


def test_missing_java_is_named(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(caption_java, "_shared_meteor", None)
    with pytest.raises(caption.JavaNotFoundError, match="METEOR needs a Java runtime.*`java`"):
        caption.MeteorScorer()
    with pytest.raises(caption.JavaNotFoundError, match="METEOR"):
        caption.score("meteor", ["a"], [["a"]])
    with pytest.raises(caption.JavaNotFoundError, match="PTB tokenizer"):
        caption.tokenize_ptb(["a dog"])
    with pytest.raises(caption.JavaNotFoundError, match="SPICE"):
        caption.SpiceScorer()
    assert not caption.spice_available()


# -- Java: PTB tokenizer, METEOR, corpus evaluation ------------------------------------------------------------

PLAIN_CAPTIONS = [
    "A group of people standing around a table with food.",
    "Two \"big\" dogs don't play; they're sleeping here!",
    "The colour of the theatre... is grey-blue, 3.5 m/s & 50% cheaper?",
    "It's a T-shirt -- isn't it? 'quoted' `x`",
    "can't won't I'm we'll you'd they've",
    "A kitchen with a stove , sink , and refrigerator .",
    "An old-fashioned clock at 12:00.",
    "Three cats: one black, one white.",
    "The dogs' owners, smiling.",
    "",
]


@pytest.fixture(scope="module")
def meteors():
    """(ours, pycocoevalcap's) METEOR, started together so their paraphrase tables load in parallel."""
    from pycocoevalcap.meteor.meteor import Meteor

    ours, theirs = caption.MeteorScorer(), Meteor()
    previous = caption_java._shared_meteor
    caption_java._shared_meteor = ours  # score("meteor") and evaluate_corpus reuse this JVM
    yield ours, theirs
    caption_java._shared_meteor = previous
    ours.close()
    theirs.meteor_p.kill()  # pycocoevalcap only stops its JVM in __del__; do it now
    theirs.meteor_p.wait()


@pytest.mark.java
def test_fast_tokenize_matches_ptb_on_plain_captions():
    assert caption.tokenize_ptb(PLAIN_CAPTIONS) == [caption.tokenize(c) for c in PLAIN_CAPTIONS]


@pytest.mark.java
def test_meteor_reuses_one_process_and_matches_pycocoevalcap(meteors):
    ours, theirs = meteors
    pid = ours.pid
    halves = [(CANDS[:20], REFS[:20]), (CANDS[20:], REFS[20:])]
    for cands, refs in halves:
        corpus, per_caption = ours.compute_score(cands, refs)
        their_corpus, their_per_caption = theirs.compute_score(*_as_dicts(cands, refs))
        assert per_caption == their_per_caption
        assert corpus == their_corpus
        assert ours.pid == pid and ours._process.poll() is None
    assert caption.score("meteor", CANDS[:3], REFS[:3]) == ours.score(CANDS[:3], REFS[:3])


@pytest.mark.java
def test_meteor_is_thread_safe(meteors):
    ours, _ = meteors
    expected = ours.score(CANDS, REFS)
    results = [None] * 4

    def work(i):
        results[i] = ours.score(CANDS, REFS)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


@pytest.mark.java
def test_meteor_close_stops_the_process():
    scorer = caption.MeteorScorer()
    scorer.close()
    scorer.close()  # idempotent
    assert scorer.closed and scorer._process.poll() is not None
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(["a"], [["a"]])


@pytest.mark.java
def test_evaluate_corpus_matches_the_pycocoevalcap_pipeline(meteors):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _, their_meteor = meteors
    cands = PLAIN_CAPTIONS[:6]
    refs = [[c, CANDS[i], PLAIN_CAPTIONS[-2 - i]] for i, c in enumerate(PLAIN_CAPTIONS[2:8])]
    ours = caption.evaluate_corpus(cands, refs)
    assert list(ours) == list(caption.DEFAULT_CORPUS_METRICS)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(cands)})
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"bleu{k + 1}": bleus[k] for k in range(4)}
    expected["meteor"] = their_meteor.compute_score(gts, res)[0]
    expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
    expected["cider_d"] = Cider().compute_score(gts, res)[0]
    assert ours == pytest.approx(expected, abs=1e-12)


# -- CaptionMetric -------------------------------------------------------------------------------------------


def test_caption_metric_mean_and_per_sample_scores():
    metric = CaptionMetric("rouge_l")
    first = metric.score(CANDS[:10], REFS[:10])
    assert first.dtype == torch.float32 and first.shape == (10,)
    assert int(metric.count) == 0  # score leaves the states alone
    metric.update(CANDS[:10], REFS[:10])
    metric.update(CANDS[10:], REFS[10:])
    expected = sum(caption.score("rouge_l", CANDS, REFS)) / len(CANDS)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(metric.compute())


def test_caption_metric_with_cached_cider_df():
    metric = CaptionMetric("cider_d", cider_corpus=REFS)
    scores = metric.score(CANDS[:4], REFS[:4])
    assert scores.tolist() == pytest.approx(caption.CiderD(REFS).score(CANDS[:4], REFS[:4]), abs=1e-6)
    with pytest.raises(ValueError, match="only applies to cider_d"):
        CaptionMetric("bleu4", cider_corpus=REFS)
