"""The cached one-token decoder (incremental.py) against the full pass of `decoder_hidden`, in float64.

Checked: hidden states of every position on awkward sizes, with pad tokens inside the prefix (open_clip's pad
mask, legacy shifted and corrected), beam reordering, and the decoding functions (sampling, greedy, beam
search) giving the same captions and log-probs with and without the cache.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from rs_lightning.tasks.captioning.decoding import CaptionDecoder, decoder_hidden, encode_images
from rs_lightning.tasks.captioning.incremental import IncrementalDecoder, supports_incremental
from rs_lightning.tasks.captioning.model import CaptionTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_models import perturbed_coca  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def coca64():
    """A tiny CoCa in float64 with non-uniform outputs (random perturbation of every weight)."""
    return perturbed_coca(1, torch.float64)


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer("coca-tiny")


def _embs(model, n):
    return encode_images(model, torch.randn(n, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("correct_cls_mask", [False, True])
@pytest.mark.parametrize("n,length", [(1, 1), (3, 7), (5, 17)])
def test_every_position_matches_the_full_pass(coca64, tok, n, length, correct_cls_mask):
    model = copy.deepcopy(coca64)
    model.text.correct_cls_mask = correct_cls_mask
    assert supports_incremental(model)
    embs = _embs(model, n)
    gen = torch.Generator().manual_seed(n * 100 + length)
    prefix = torch.randint(1, 2000, (n, length), generator=gen)
    prefix[:, 0] = tok.sot_id
    if length > 3:  # pad tokens inside a prefix: open_clip masks them as keys (shifted by one in legacy mode)
        prefix[0, 2] = model.text.pad_id
        prefix[-1, length - 1] = model.text.pad_id
    full = decoder_hidden(model, embs, prefix)
    state = IncrementalDecoder(model, embs)
    for t in range(length):
        torch.testing.assert_close(state.step(prefix[:, t]), full[:, t], rtol=0, atol=1e-12)


def test_reordering_rows_follows_the_rows(coca64, tok):
    embs = _embs(coca64, 4)
    prefix = torch.randint(1, 2000, (4, 6), generator=torch.Generator().manual_seed(3))
    prefix[:, 0] = tok.sot_id
    state = IncrementalDecoder(coca64, embs)
    for t in range(3):
        state.step(prefix[:, t])
    order = torch.tensor([2, 2, 0, 3])
    state.select(order)
    reordered = prefix[order]
    full = decoder_hidden(coca64, embs[order], reordered)
    for t in range(3, 6):
        torch.testing.assert_close(state.step(reordered[:, t]), full[:, t], rtol=0, atol=1e-12)


def test_beyond_the_context_is_an_error(coca64, tok):
    state = IncrementalDecoder(coca64, _embs(coca64, 1))
    context = coca64.text.positional_embedding.shape[0] - 1  # the last position holds CLS
    sot = torch.tensor([tok.sot_id])
    for _ in range(context):
        state.step(sot)
    with pytest.raises(ValueError, match="context length"):
        state.step(sot)


def test_a_model_without_a_causal_text_tower_is_refused(coca64):
    model = copy.deepcopy(coca64)
    model.text.attn_mask = None
    assert not supports_incremental(model)
    with pytest.raises(ValueError, match="full pass"):
        IncrementalDecoder(model, _embs(coca64, 1))


@pytest.mark.parametrize("vocab", [None, "small"])
def test_decoding_is_the_same_with_and_without_the_cache(coca64, tok, vocab):
    ids = None if vocab is None else torch.tensor(sorted({tok.eot_id, *range(300, 340)}))
    cached = CaptionDecoder(coca64, tok.sot_id, tok.eot_id, tok.pad_id, ids)
    full = CaptionDecoder(coca64, tok.sot_id, tok.eot_id, tok.pad_id, ids, incremental=False)
    embs = _embs(coca64, 7).repeat_interleave(3, 0)
    for greedy in (False, True):
        a = cached.generate(embs, 9, greedy=greedy, generator=torch.Generator().manual_seed(5))
        b = full.generate(embs, 9, greedy=greedy, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-10)
    a, b = cached.beam_search(embs[:7], 8, beam_size=4), full.beam_search(embs[:7], 8, beam_size=4)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-10)
