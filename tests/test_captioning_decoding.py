"""CoCa loading and decoding: parity with open_clip's decoder, exact log-probs, beam search, the SCST gradient."""

import contextlib
import itertools
import sys
from pathlib import Path

import pytest
import torch

from rs_lightning.rl import scst
from rs_lightning.tasks.captioning.decoding import CaptionDecoder, decoder_hidden, encode_images
from rs_lightning.tasks.captioning.model import (
    CaptionTokenizer,
    image_transforms,
    load_coca,
    load_weights,
    save_weights,
    vocab_from_references,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_models import perturbed_coca  # noqa: E402
from cast_counting import WeightCasts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def coca():
    """A tiny CoCa with non-uniform outputs (a fresh open_clip init predicts a near-uniform distribution)."""
    return perturbed_coca(0)


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer("coca-tiny")


REFS = [["a red circle on the left", "a small red disc"], ["a big blue box at the top", "two shapes"]]


def _decoder(coca, tok, vocab=None):
    return CaptionDecoder(coca, tok.sot_id, tok.eot_id, tok.pad_id, vocab)


def test_decoder_hidden_matches_open_clip(coca, tok):
    images = torch.randn(2, 3, 64, 64)
    ids = tok.encode(["a red circle on the left", "two shapes"])
    expected = coca(images, ids)["logits"]
    hidden = decoder_hidden(coca, encode_images(coca, images), ids[:, :-1])
    torch.testing.assert_close(hidden @ coca.text_decoder.text_projection, expected, rtol=0, atol=1e-5)


def test_transforms_and_tokenizer(tok):
    _, eval_tf = image_transforms("coca-tiny")
    from PIL import Image

    assert eval_tf(Image.new("RGB", (80, 64))).shape == (3, 64, 64)
    ids = tok.encode(["A red circle, on the LEFT."])[0]
    assert ids[0] == tok.sot_id and tok.eot_id in ids.tolist()
    assert tok.decode(ids) == "a red circle , on the left ."
    vocab = vocab_from_references(tok, REFS)
    assert tok.eot_id in vocab.tolist() and tok.sot_id not in vocab.tolist() and 0 not in vocab.tolist()


@pytest.mark.parametrize("restricted", [False, True])
def test_sampled_logprobs_equal_teacher_forcing(coca, tok, restricted):
    decoder = _decoder(coca, tok, vocab_from_references(tok, REFS) if restricted else None)
    embs = encode_images(coca, torch.randn(3, 3, 64, 64)).repeat_interleave(4, 0)
    out = decoder.generate(embs, 8, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (12, out.tokens.shape[1])
    scored = decoder.token_logprobs(embs, out.tokens, out.mask)
    torch.testing.assert_close(scored, out.logprobs, rtol=0, atol=1e-4)
    ended = (out.tokens == tok.eot_id).any(1)
    assert torch.equal(out.mask.sum(1)[ended], (out.tokens != tok.pad_id).sum(1)[ended].float())
    if restricted:
        assert set(out.tokens[out.mask.bool()].tolist()) <= set(decoder.vocab.tolist())


def test_beam_search_one_beam_is_greedy(coca, tok):
    decoder = _decoder(coca, tok)
    embs = encode_images(coca, torch.randn(3, 3, 64, 64))
    greedy = decoder.generate(embs, 10, greedy=True)
    beam = decoder.beam_search(embs, 10, beam_size=1, length_penalty=0.0)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.logprobs, beam.logprobs)


def test_beam_search_is_exact_when_the_beam_holds_every_sequence(coca, tok):
    """Vocabulary {a, red, EOT}, 3 tokens: a beam of 27 keeps every prefix, so it must find the best caption
    by brute force (length-normalised), and its log-probs are the teacher-forced ones."""
    vocab = torch.tensor(sorted({*tok.encode(["a red"])[0, 1:3].tolist(), tok.eot_id}))
    decoder = _decoder(coca, tok, vocab)
    embs = encode_images(coca, torch.randn(2, 3, 64, 64))
    beam = decoder.beam_search(embs, 3, beam_size=27, length_penalty=1.0)
    for i in range(2):
        best, best_score = None, -float("inf")
        for n in range(1, 4):
            for seq in itertools.product(vocab.tolist(), repeat=n):
                if tok.eot_id in seq[:-1]:
                    continue
                t = torch.tensor([seq])
                lp = decoder.token_logprobs(embs[i : i + 1], t, torch.ones_like(t, dtype=torch.float32))
                if n < 3 and seq[-1] != tok.eot_id:
                    continue  # shorter sequences must end with EOT
                score = float(lp.sum().detach()) / n
                if score > best_score:
                    best, best_score = list(seq), score
        got = beam.tokens[i][beam.mask[i].bool()].tolist()
        assert got == best
        lp = decoder.token_logprobs(embs[i : i + 1], beam.tokens[i : i + 1], beam.mask[i : i + 1])
        torch.testing.assert_close(lp, beam.logprobs[i : i + 1], rtol=0, atol=1e-4)


def test_scst_update_moves_logprobs_with_the_advantage(coca, tok):
    """On the real tiny CoCa: one SGD step on the SCST loss with fixed samples raises the log-prob of the
    samples whose reward beats the leave-one-out baseline and lowers the others."""
    model = load_coca("coca-tiny")
    model.load_state_dict(coca.state_dict())
    decoder = _decoder(model, tok)
    images = torch.randn(2, 3, 64, 64)
    k = 4
    with torch.no_grad():
        out = decoder.generate(encode_images(model, images).repeat_interleave(k, 0), 6,
                               generator=torch.Generator().manual_seed(1))
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 0.9, 0.1, 0.3]])
    advantage = rewards - scst.leave_one_out_baseline(rewards)

    def logprobs():
        embs = encode_images(model, images).repeat_interleave(k, 0)
        return decoder.token_logprobs(embs, out.tokens, out.mask).view(2, k, -1)

    before = logprobs()
    loss = scst.scst_loss(before, rewards, scst.leave_one_out_baseline(rewards), mask=out.mask.view(2, k, -1))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-4 * p.grad)
        delta = logprobs().sum(-1) - before.detach().sum(-1)
    assert torch.equal(torch.sign(delta), torch.sign(advantage)), (delta, advantage)


def test_weights_round_trip(coca, tmp_path):
    path = save_weights(coca, tmp_path / "m.safetensors", {"note": "x"})
    fresh = load_coca("coca-tiny")
    load_weights(fresh, path)
    for key, value in coca.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    import open_clip  # an export is a plain open_clip checkpoint too

    oc = open_clip.create_model("coca-tiny", pretrained=str(path))
    assert torch.equal(oc.state_dict()["text_decoder.text_projection"], coca.text_decoder.text_projection)


def test_decoding_under_bf16_autocast_casts_each_weight_once_same_captions(coca, tok, monkeypatch):
    """Under Lightning's bf16-mixed (autocast, cast cache off) sampling, greedy and beam decoding cast each weight
    once per decode (`cast_once_per_decode`), not at every step, and give the same tokens and log-probs bit for bit
    as without it."""
    from rs_lightning.tasks import autocast_cache

    matrices = [p for p in coca.parameters() if p.dim() == 2]

    decoder = _decoder(coca, tok)
    embs = encode_images(coca, torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))).detach()

    def decode_all():
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), WeightCasts(matrices) as casts:
            sampled = decoder.generate(embs, 6, generator=torch.Generator().manual_seed(3))
            greedy = decoder.generate(embs, 6, greedy=True)
            beam = decoder.beam_search(embs, 6, beam_size=3)
        return [sampled, greedy, beam], casts.count

    coca.eval()
    cached, cached_casts = decode_all()
    monkeypatch.setattr(autocast_cache, "weight_cast_cache", lambda model: contextlib.nullcontext())
    plain, plain_casts = decode_all()
    for a, b in zip(cached, plain):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    # Weights used through views (the attention's in_proj chunks) are cast at every step either way: autocast
    # caches whole leaf tensors only. Measured: 165 casts against 450 over the three decodes.
    assert 0 < 2 * cached_casts < plain_casts
