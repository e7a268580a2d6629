"""Image-captioning metrics: fast per-caption rewards for SCST and pycocoevalcap numbers for evaluation.

Two paths, on purpose:

- Training rewards, `score(metric, candidates, references)`: BLEU-1..4, ROUGE-L and CIDEr-D in pure Python
  (`caption_ngram`, `caption_cider`), equal to pycocoevalcap's per-caption scores within 1e-6 on the same
  tokenised text; METEOR through one long-lived JVM (`caption_java.MeteorScorer`). Captions are tokenised
  by the fast `caption_text.tokenize` (see its docstring for how it differs from PTB).
  For SCST with CIDEr-D build `CiderD(train_references)` once and call its `score`: `score("cider_d", ...)`
  takes df over the batch's references, as pycocoevalcap's `Cider` does, which is noisy for small batches.
- Evaluation, `evaluate_corpus(candidates, references)`: pycocoevalcap's PTB tokenizer and scorers, corpus
  level, the numbers captioning papers report (BLEU-n is corpus BLEU, METEOR the pooled-statistics score,
  ROUGE-L, CIDEr-D and SPICE the mean over images).

Metric names everywhere: bleu1, bleu2, bleu3, bleu4, rouge_l, cider_d, meteor, spice. `cider_d` is what the
COCO toolkit and papers call "CIDEr". SPICE needs Stanford CoreNLP jars that are not shipped: see
`spice_available()`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rs_lightning.rewards.caption_cider import CiderD, cider_d
from rs_lightning.rewards.caption_java import (
    JavaNotFoundError,
    MeteorScorer,
    SpiceScorer,
    SpiceUnavailableError,
    shared_meteor_scorer,
    spice_available,
    spice_lib_dir,
    tokenize_ptb,
)
from rs_lightning.rewards.caption_ngram import bleu, check_pairs, rouge_l
from rs_lightning.rewards.caption_text import tokenize, tokenize_all, tokenize_references

__all__ = [
    "BLEU_METRICS",
    "DEFAULT_CORPUS_METRICS",
    "FAST_METRICS",
    "METRICS",
    "CiderD",
    "JavaNotFoundError",
    "MeteorScorer",
    "SpiceScorer",
    "SpiceUnavailableError",
    "bleu",
    "cider_d",
    "evaluate_corpus",
    "rouge_l",
    "score",
    "shared_meteor_scorer",
    "spice_available",
    "spice_lib_dir",
    "tokenize",
    "tokenize_ptb",
]

BLEU_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4")
FAST_METRICS = (*BLEU_METRICS, "rouge_l", "cider_d")  # pure Python, no Java
METRICS = (*FAST_METRICS, "meteor", "spice")
DEFAULT_CORPUS_METRICS = (*BLEU_METRICS, "meteor", "rouge_l", "cider_d")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown caption metric {metric!r}; choose from {', '.join(METRICS)}")


def score(
    metric: str,
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
) -> list[float]:
    """Per-caption scores of one metric, for use as rewards.

    Args:
        metric: one of `METRICS`.
        candidates: N generated captions.
        references: N non-empty lists of reference captions.
        tokenize: apply the fast tokeniser (`caption_text.tokenize`) to candidates and references first.
            Pass False for text that is already tokenised (tokens joined by single spaces): the scores are
            then pycocoevalcap's per-caption scores for that text.

    Returns:
        N floats. `cider_d` takes its document frequencies over `references` (each entry one document),
        exactly as pycocoevalcap's `Cider` does; `meteor` uses the shared long-lived METEOR process.

    Raises:
        ValueError: unknown metric, mismatched lengths or an empty reference list.
        JavaNotFoundError: `meteor`/`spice` without a Java runtime.
        SpiceUnavailableError: `spice` without the CoreNLP jars.
    """
    _check_metric(metric)
    check_pairs(candidates, references)
    if tokenize:
        candidates = tokenize_all(candidates)
        references = tokenize_references(references)
    if metric in BLEU_METRICS:
        order = int(metric[-1])
        return [per_order[order - 1] for per_order in bleu(candidates, references, n=order)]
    if metric == "rouge_l":
        return rouge_l(candidates, references)
    if metric == "cider_d":
        return cider_d(candidates, references)
    if metric == "meteor":
        return shared_meteor_scorer().score(candidates, references)
    return SpiceScorer().score(candidates, references)


def evaluate_corpus(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CORPUS_METRICS,
    *,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """Corpus-level caption metrics through pycocoevalcap, as captioning papers report them.

    Args:
        candidates: one generated caption per image.
        references: the reference captions of each image.
        metrics: names from `METRICS`.
        tokenizer: "ptb" (pycocoevalcap's PTBTokenizer, needs Java; the reported numbers), "fast"
            (`caption_text.tokenize`) or "none" (already tokenised).

    Returns:
        `{metric: value}` for the requested metrics, as Python floats (pycocoevalcap scale: CIDEr-D x10).

    Raises:
        ValueError: unknown metric or tokenizer, mismatched lengths, empty reference lists, no candidates.
        JavaNotFoundError: PTB tokenisation, METEOR or SPICE without a Java runtime.
        SpiceUnavailableError: `spice` requested without the CoreNLP jars.
    """
    for metric in metrics:
        _check_metric(metric)
    check_pairs(candidates, references)
    if not candidates:
        raise ValueError("evaluate_corpus needs at least one candidate")
    # Refuse SPICE before the slow steps rather than after them.
    spice = SpiceScorer() if "spice" in metrics else None

    if tokenizer == "ptb":
        # One JVM for candidates and references together: a PTB call costs ~0.2 s of start-up.
        flat = list(candidates) + [ref for refs in references for ref in refs]
        tokens = iter(tokenize_ptb(flat))
        cands = [next(tokens) for _ in candidates]
        refs = [[next(tokens) for _ in image_refs] for image_refs in references]
    elif tokenizer == "fast":
        cands, refs = tokenize_all(candidates), tokenize_references(references)
    elif tokenizer == "none":
        cands, refs = list(candidates), [list(r) for r in references]
    else:
        raise ValueError(f"tokenizer must be 'ptb', 'fast' or 'none', got {tokenizer!r}")

    gts = {i: image_refs for i, image_refs in enumerate(refs)}
    res = {i: [cand] for i, cand in enumerate(cands)}
    results: dict[str, float] = {}
    wanted_bleu = [m for m in BLEU_METRICS if m in metrics]
    if wanted_bleu:
        from pycocoevalcap.bleu.bleu import Bleu

        corpus_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for metric in wanted_bleu:
            results[metric] = float(corpus_bleu[int(metric[-1]) - 1])
    if "meteor" in metrics:
        results["meteor"] = shared_meteor_scorer().compute_score(cands, refs)[0]
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        results["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider_d" in metrics:
        from pycocoevalcap.cider.cider import Cider

        results["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if spice is not None:
        results["spice"] = spice.compute_score(cands, refs)[0]
    return {metric: results[metric] for metric in metrics}
