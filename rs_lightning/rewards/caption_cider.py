"""CIDEr-D with cacheable document frequencies, matching pycocoevalcap 1.2's `Cider` number for number.

pycocoevalcap's `Cider` (the number COCO papers report as "CIDEr") is the CIDEr-D variant: tf-idf vectors
of 1..4-grams, cosine similarity with the candidate weight CLIPPED at the reference weight, a Gaussian
length penalty exp(-delta^2 / (2 sigma^2)) with sigma = 6, the mean over n, the mean over references, x10.
Its idf is log(#documents) - log(max(1, df(ngram))), where a document is ONE reference list (an image) and
df(ngram) counts the reference lists that contain the n-gram. It recomputes df from the batch it is given;
`CiderD` computes df once over a corpus (the training references, each image once, as SCST code does) and
then scores any number of candidates against it.

Quirk reproduced on purpose: the "length" in the penalty is pycocoevalcap's, the number of BIGRAMS of the
caption (its `counts2vec` adds the term frequency when the n-gram index is 1), so a caption of L >= 1 words
has length L - 1 and an empty caption has length 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from rs_lightning.rewards.caption_ngram import NGram, check_pairs, ngram_counts
from rs_lightning.rewards.caption_text import tokenize as fast_tokenize

# One caption as tf-idf: per n-gram order a dict n-gram -> weight, per order the L2 norm, the "length".
_Vector = tuple[list[dict[NGram, float]], list[float], int]


class CiderD:
    """CIDEr-D scorer with document frequencies precomputed over a reference corpus.

    Example:
        >>> scorer = CiderD([["a dog runs", "a brown dog"], ["a cat sleeps", "the cat is asleep"]])
        >>> scorer.score(["a dog"], [["a dog runs", "a brown dog"]])  # doctest: +SKIP

    Args:
        references_corpus: one list of reference captions per image; each list is one document for df.
            For SCST pass every training image ONCE (repeating an image would inflate its n-grams' df).
        n: longest n-gram.
        sigma: standard deviation of the Gaussian length penalty.
        tokenize: tokenise corpus, candidates and references with `caption_text.tokenize` first. Pass False
            for captions that are already tokenised (that is how parity with pycocoevalcap is tested).
    """

    def __init__(
        self,
        references_corpus: Iterable[Sequence[str]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        tokenize: bool = True,
    ) -> None:
        self.n = n
        self.sigma = sigma
        self._tokenize: Callable[[str], str] | None = fast_tokenize if tokenize else None
        doc_freq: dict[NGram, int] = {}
        num_docs = 0
        for refs in references_corpus:
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"each corpus entry must be a non-empty list of captions, got {refs!r}")
            num_docs += 1
            grams: set[NGram] = set()
            for ref in refs:
                grams.update(ngram_counts(self._prepare(ref).split(), n))
            for gram in grams:
                doc_freq[gram] = doc_freq.get(gram, 0) + 1
        if num_docs == 0:
            raise ValueError("references_corpus is empty: CIDEr-D needs at least one reference list for its df")
        self.num_docs = num_docs
        self.log_num_docs = math.log(float(num_docs))
        # log(max(1, df)) precomputed: n-grams absent from the corpus get log(1) = 0 at lookup time.
        self.log_df: dict[NGram, float] = {gram: math.log(max(1.0, float(c))) for gram, c in doc_freq.items()}

    def _prepare(self, caption: str) -> str:
        return self._tokenize(caption) if self._tokenize is not None else caption

    def vector(self, caption: str) -> _Vector:
        """The tf-idf representation of one (prepared) caption: per-order weights, norms and bigram count."""
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        log_df = self.log_df
        for gram, term_freq in ngram_counts(caption.split(), self.n).items():
            order = len(gram) - 1
            weight = float(term_freq) * (self.log_num_docs - log_df.get(gram, 0.0))
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:  # pycocoevalcap's length: bigram count (see module docstring)
                length += term_freq
        return vec, [math.sqrt(v) for v in norm], length

    def _similarity(self, hyp: _Vector, ref: _Vector) -> list[float]:
        vec_hyp, norm_hyp, length_hyp = hyp
        vec_ref, norm_ref, length_ref = ref
        delta = float(length_hyp - length_ref)
        penalty = math.exp(-(delta**2) / (2 * self.sigma**2))
        values = []
        for order in range(self.n):
            ref_weights = vec_ref[order]
            value = 0.0
            for gram, weight in vec_hyp[order].items():
                ref_weight = ref_weights.get(gram, 0.0)
                value += min(weight, ref_weight) * ref_weight  # clipping: the "-D" in CIDEr-D
            if norm_hyp[order] != 0 and norm_ref[order] != 0:
                value /= norm_hyp[order] * norm_ref[order]
            values.append(value * penalty)
        return values

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Per-caption CIDEr-D of each candidate against its references, with this scorer's df.

        Args:
            candidates: N captions.
            references: N non-empty lists of reference captions.

        Returns:
            N scores (pycocoevalcap scale: x10, typically 0..~5 per caption).
        """
        check_pairs(candidates, references)
        # SCST scores several samples per image against the same references: vectorise each string once.
        cache: dict[str, _Vector] = {}

        def cached_vector(caption: str) -> _Vector:
            vec = cache.get(caption)
            if vec is None:
                vec = cache[caption] = self.vector(self._prepare(caption))
            return vec

        scores = []
        for cand, refs in zip(candidates, references):
            hyp = cached_vector(cand)
            total = [0.0] * self.n
            for ref in refs:
                for order, value in enumerate(self._similarity(hyp, cached_vector(ref))):
                    total[order] += value
            # Same operation order as pycocoevalcap: mean over n, then / #refs, then x10.
            scores.append(sum(total) / self.n / len(refs) * 10.0)
        return scores


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-caption CIDEr-D with df over THESE references, exactly as pycocoevalcap's `Cider` computes it.

    Inputs must already be tokenised. Each entry of `references` is one df document, so an image listed
    twice counts twice (pycocoevalcap does the same).
    """
    check_pairs(candidates, references)
    return CiderD(references, n=n, sigma=sigma, tokenize=False).score(candidates, references)
