"""Functional ensembling of captioners (MixtureDecoder, CaptioningModule.set_ensemble, front.ensemble).

The mixture's next-token log-probs are checked against log(sum_i w_i p_i) computed in float64 from each member's
full-pass log-probs; one-hot weights and identical members reduce to one model; and `rs front` with
`front.ensemble: true` writes "ensemble" rows, their hypervolume and the cost per point.
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from rs_lightning.tasks.captioning.decoding import CaptionDecoder, MixtureDecoder, encode_images
from rs_lightning.tasks.captioning.model import CaptionTokenizer, load_coca

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_models import perturbed_coca  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _coca(seed):
    return perturbed_coca(seed, torch.float64)


@pytest.fixture(scope="module")
def members():
    tok = CaptionTokenizer("coca-tiny")
    vocab = torch.tensor(sorted({tok.eot_id, *range(400, 437)}))
    models = [_coca(s) for s in (1, 2, 3)]
    decoders = [CaptionDecoder(m, tok.sot_id, tok.eot_id, tok.pad_id, vocab) for m in models]
    images = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    return tok, models, decoders, [encode_images(m, images) for m in models]


def test_mixture_logprobs_are_the_log_of_the_weighted_probabilities(members):
    tok, models, decoders, embs = members
    weights = [0.2, 0.5, 0.3]
    mix = MixtureDecoder(decoders, weights)
    prefix = torch.randint(400, 437, (5, 4), generator=torch.Generator().manual_seed(0))
    prefix[:, 0] = tok.sot_id
    want = torch.log(sum(w * d.next_logprobs(e, prefix).exp() for w, d, e in zip(weights, decoders, embs)))
    torch.testing.assert_close(mix.next_logprobs(embs, prefix), want, rtol=0, atol=1e-12)
    # The cached step path of generate agrees with the full pass, step by step (greedy: the argmax of `want`).
    out = mix.generate(embs, 6, greedy=True)
    pre = torch.full((5, 1), tok.sot_id)
    for t in range(out.tokens.shape[1]):
        lp = torch.log(sum(w * d.next_logprobs(e, pre).exp() for w, d, e in zip(weights, decoders, embs)))
        pos = lp.argmax(-1)
        live = out.mask[:, t].bool()
        assert torch.equal(out.tokens[live, t], mix.to_tokens(pos)[live])
        torch.testing.assert_close(out.logprobs[live, t], lp.gather(1, pos[:, None]).squeeze(1)[live], atol=1e-10,
                                   rtol=0)
        pre = torch.cat([pre, out.tokens[:, t:t + 1]], 1)


def test_one_hot_weights_and_identical_members_reduce_to_one_model(members):
    tok, models, decoders, embs = members
    mix = MixtureDecoder(decoders, [0.0, 1.0, 0.0])
    a, b = mix.generate(embs[1:2], 7, greedy=True), decoders[1].generate(embs[1], 7, greedy=True)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-12)
    twin = MixtureDecoder([decoders[0], decoders[0]], [0.3, 0.7])
    a, b = twin.beam_search([embs[0], embs[0]], 6, beam_size=3), decoders[0].beam_search(embs[0], 6, beam_size=3)
    assert torch.equal(a.tokens, b.tokens)


def test_bad_mixtures_are_refused(members):
    tok, models, decoders, embs = members
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureDecoder(decoders[:2], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per member"):
        MixtureDecoder(decoders[:2], [1.0])
    other = CaptionDecoder(models[0], tok.sot_id, tok.eot_id, tok.pad_id, None)
    with pytest.raises(ValueError, match="share the tokenizer ids and the output vocabulary"):
        MixtureDecoder([decoders[0], other], [0.5, 0.5])


def test_the_module_captions_with_the_ensemble_and_back():
    from rs_lightning.tasks.captioning.module import CaptioningModule

    module = CaptioningModule(model="coca-tiny", stage="scst", rewards=["bleu1"], vocab="full",
                              eval_metrics=["bleu1"], corpus_metrics=False,
                              decoding={"max_length": 6, "eval_decoding": "greedy"})
    with torch.no_grad():
        module.model.text_decoder.text_projection.normal_(0.0, 1.0)
    images = torch.randn(3, 3, 64, 64)
    alone = module.caption(images)
    state = copy.deepcopy(module.model.state_dict())
    module.set_ensemble([state, state], [0.4, 0.6])
    assert module.caption(images) == alone  # two copies of the model: the same policy
    module.set_ensemble(None)
    assert module.caption(images) == alone


def test_front_ensemble_rows_and_their_hypervolume(tmp_path):
    import yaml

    from rs_lightning.cli import main
    from rs_lightning.tasks.captioning.model import save_weights

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = load_coca("coca-tiny")
        with torch.no_grad():
            model.text_decoder.text_projection.normal_(0.0, 0.5)
        paths.append(str(save_weights(model, tmp_path / f"e{seed}.safetensors")))
    cfg = {
        "model": {"class_path": "rs_lightning.tasks.captioning.module.CaptioningModule",
                  "init_args": {"model": "coca-tiny", "stage": "scst", "rewards": ["bleu1"], "vocab": "train",
                                "decoding": {"max_length": 6, "eval_decoding": "greedy"},
                                "eval_metrics": ["bleu1", "rouge_l"], "corpus_metrics": False}},
        "data": {"class_path": "rs_lightning.tasks.captioning.data.CaptionDataModule",
                 "init_args": {"source": "synthetic", "model": "coca-tiny", "num_train": 16, "num_val": 4,
                               "num_test": 6, "batch_size": 4, "eval_batch_size": 6}},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "front": {"experts": [{"path": paths[0], "name": "a"}, {"path": paths[1], "name": "b"}],
                  "grid": {"kind": "sweep", "points": 3}, "ensemble": True, "out_dir": str(tmp_path / "run"),
                  "summary": {"rewards": ["bleu1", "rouge_l"], "ideal": [1.0, 1.0], "nadir": [0.0, 0.0],
                              "n_boot": 50}},
    }
    (tmp_path / "front.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["front", "--config", str(tmp_path / "front.yaml"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "front.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ensemble") == 1 and kinds.count("soup") == 1  # lam = 0.5 (the endpoints are the experts)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "ensemble" in summary["hypervolume"] and "rs_minus_ensemble" in summary["hypervolume"]
    assert summary["cost"]["ensemble_seconds_per_point"] > 0
    assert "rs_minus_ensemble" in summary["uncertainty"]["hypervolume"]
    # A second run resumes: every row, ensemble rows included, is read back and reused.
    assert main(["front", "--config", str(tmp_path / "front.yaml"), "--no-progress"]) == 0
    again = [json.loads(line) for line in (tmp_path / "run" / "front.jsonl").read_text().splitlines()]
    assert again == rows


def test_the_member_cache_follows_the_state_objects_not_their_ids():
    from rs_lightning.tasks.ensemble import EnsembleMembers

    cache, built = EnsembleMembers(), []

    def build(state):
        built.append(state["w"].item())
        return torch.nn.Linear(1, 1)

    states = [{"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}]
    first = cache.get(states, build)
    assert cache.get(states, build) is first and built == [1.0, 2.0]  # the same dicts: reused
    del states
    fresh = [{"w": torch.tensor(100.0)}, {"w": torch.tensor(200.0)}]  # may reuse the freed dicts' ids
    assert cache.get(fresh, build) is not first and built[-2:] == [100.0, 200.0]
