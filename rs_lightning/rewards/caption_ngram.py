"""Per-caption BLEU-1..4 and ROUGE-L in pure Python, matching pycocoevalcap 1.2 number for number.

These are the fast training-reward paths: no Java, no subprocess, no per-call scorer objects. They take
captions that are ALREADY tokenised (tokens joined by single spaces, see `caption.tokenize`) and reproduce
pycocoevalcap's per-caption scores to float rounding, including its quirks:

- BLEU (`pycocoevalcap.bleu.BleuScorer`, option "closest"): clipped n-gram counts against the max count over
  the references; the brevity penalty uses the reference length closest to the candidate's (ties go to the
  SHORTER reference); numerator and denominator carry the constants `tiny=1e-15` and `small=1e-9`, so a
  caption with no matching 4-gram gets a small positive BLEU-4 (about 1e-5), never exactly 0.
- ROUGE-L (`pycocoevalcap.rouge.Rouge`): tokens come from `str.split(" ")` (so an empty caption is ONE empty
  token), precision and recall are maximised over the references SEPARATELY (they may come from different
  references), then F with beta = 1.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# pycocoevalcap's BleuScorer constants: without them a zero n-gram match would make log/0 trouble.
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9
ROUGE_BETA = 1.2

NGram = tuple[str, ...]


def ngram_counts(words: Sequence[str], n: int = 4) -> dict[NGram, int]:
    """Count every k-gram for k = 1..n.

    Args:
        words: the tokens of one caption.
        n: the longest n-gram.

    Returns:
        A dict from n-gram tuple to its count; insertion order is k = 1 first (as in pycocoevalcap's precook).
    """
    counts: dict[NGram, int] = {}
    length = len(words)
    for k in range(1, n + 1):
        for i in range(length - k + 1):
            gram = tuple(words[i : i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject inputs pycocoevalcap would assert on, with a message that says what is wrong.

    Raises:
        ValueError: lengths differ, a reference list is empty, or a caption is not a string.
    """
    if isinstance(candidates, str):
        raise ValueError("candidates must be a sequence of captions, got a single string")
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if not isinstance(cand, str):
            raise ValueError(f"candidate {i} is {type(cand).__name__}, expected str")
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


def bleu_sentence(candidate: str, references: Sequence[str], n: int = 4) -> list[float]:
    """BLEU-1..n of one tokenised caption, as pycocoevalcap's per-caption list.

    Args:
        candidate: tokenised candidate caption.
        references: tokenised reference captions (at least one).
        n: the highest BLEU order.

    Returns:
        `[bleu_1, ..., bleu_n]`.
    """
    words = candidate.split()
    test_len = len(words)
    counts = ngram_counts(words, n)

    ref_lens = []
    max_ref_counts: dict[NGram, int] = {}
    for ref in references:
        ref_words = ref.split()
        ref_lens.append(len(ref_words))
        for gram, count in ngram_counts(ref_words, n).items():
            if count > max_ref_counts.get(gram, 0):
                max_ref_counts[gram] = count
    # "closest" effective reference length; the tuple comparison sends ties to the shorter reference.
    ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]

    correct = [0] * n
    for gram, count in counts.items():
        correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
    guess = [max(0, test_len - k) for k in range(n)]

    scores = []
    product = 1.0
    for k in range(n):
        product *= (float(correct[k]) + BLEU_TINY) / (float(guess[k]) + BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[list[float]]:
    """Per-caption BLEU-1..n for a batch (pycocoevalcap's `Bleu(n).compute_score(...)[1]`, transposed).

    Args:
        candidates: N tokenised candidates.
        references: N lists of tokenised references.
        n: the highest BLEU order.

    Returns:
        N lists `[bleu_1, ..., bleu_n]`.
    """
    check_pairs(candidates, references)
    return [bleu_sentence(cand, refs, n) for cand, refs in zip(candidates, references)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (one-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for token in a:
        prev_diag = 0
        for j, other in enumerate(b, start=1):
            prev_row = row[j]
            row[j] = prev_diag + 1 if token == other else max(row[j], row[j - 1])
            prev_diag = prev_row
    return row[-1]


def rouge_l_sentence(candidate: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F-score of one tokenised caption, as pycocoevalcap's `Rouge.calc_score`.

    Args:
        candidate: tokenised candidate caption.
        references: tokenised reference captions (at least one).
        beta: recall weight; pycocoevalcap uses 1.2.
    """
    # split(" ") and not split(): an empty caption is one empty token in pycocoevalcap, which we reproduce.
    cand_tokens = candidate.split(" ")
    prec_max = 0.0
    rec_max = 0.0
    for ref in references:
        ref_tokens = ref.split(" ")
        lcs = lcs_length(ref_tokens, cand_tokens)
        prec_max = max(prec_max, lcs / float(len(cand_tokens)))
        rec_max = max(rec_max, lcs / float(len(ref_tokens)))
    if prec_max != 0 and rec_max != 0:
        return ((1 + beta**2) * prec_max * rec_max) / float(rec_max + beta**2 * prec_max)
    return 0.0


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-caption ROUGE-L for a batch (pycocoevalcap's `Rouge().compute_score(...)[1]`)."""
    check_pairs(candidates, references)
    return [rouge_l_sentence(cand, refs) for cand, refs in zip(candidates, references)]
