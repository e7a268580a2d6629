"""Functional ensembling for the text task: `mixture_greedy` and TextPPOModule.set_ensemble on a tiny Llama.

Checked: the mixture's first token is the argmax of log(sum_i w_i p_i) computed from full forward passes in
float64; identical members and one-hot weights reduce to the single model's greedy decoding (generate); the
module evaluates with the ensemble and returns to its policy.
"""

import copy
import json

import pytest
import torch

from rs_lightning.tasks.text.rollout import generate, mixture_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.tasks.text.data import PromptDataModule
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm
    from rs_lightning.tasks.text.module import TextPPOModule

    root = tmp_path_factory.mktemp("text_ens")
    tiny_random_causal_lm(save_dir=root / "model")
    rows = [{"id": str(i), "instruction": f"Say {i} things.", "reference": "a cat"} for i in range(8)]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = TextPPOModule(model=str(root / "model"), rewards=[KeywordReward(["e"], mode="count", name="e")],
                           lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                           rollout={"eval_max_new_tokens": 5}, ppo={"advantage": "sequence"})
    module.configure_model()
    data = PromptDataModule(source=str(root / "p.jsonl"), tokenizer=str(root / "model"), num_val=2, num_test=4,
                            batch_size=4, eval_batch_size=4, prefix_tokens=(0, 0), template="alpaca")
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    return module, batch


def _member(module, seed):
    member = copy.deepcopy(module.policy).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in member.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return member


def test_the_first_token_is_the_argmax_of_the_mixture(setup):
    module, batch = setup
    a, b = _member(module, 1), _member(module, 2)
    ro = mixture_greedy([a, b], [0.3, 0.7], module.tokenizer, batch["input_ids"], batch["attention_mask"], [1] * 4)
    mask = batch["attention_mask"]
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        probs = [torch.softmax(m(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos).logits[:, -1]
                               .double(), -1) for m in (a, b)]
    want = torch.log(0.3 * probs[0] + 0.7 * probs[1]).argmax(-1)
    assert torch.equal(ro.response_ids[:, 0], want)


def test_identical_members_and_one_hot_weights_are_the_single_model(setup):
    module, batch = setup
    a, b = _member(module, 1), _member(module, 2)
    lengths = [5] * 4
    alone = generate(a, module.tokenizer, batch["input_ids"], batch["attention_mask"], lengths, greedy=True,
                     ignore_eos=False)
    twin = mixture_greedy([a, a], [0.4, 0.6], module.tokenizer, batch["input_ids"], batch["attention_mask"], lengths)
    hot = mixture_greedy([b, a], [0.0, 1.0], module.tokenizer, batch["input_ids"], batch["attention_mask"], lengths)
    assert twin.texts == alone.texts and hot.texts == alone.texts
    with pytest.raises(ValueError, match="sum to 1"):
        mixture_greedy([a, b], [0.5, 0.6], module.tokenizer, batch["input_ids"], batch["attention_mask"], lengths)


def test_the_module_evaluates_the_ensemble_and_returns(setup):
    module, batch = setup
    from rs_lightning.soup.lora import live_adapter_state

    state = {k: v.clone() for k, v in live_adapter_state(module.policy).items()}
    before = module._evaluate(batch, module.test_means, "test")["rewards"]["e"]
    module.set_ensemble([state, state], [0.5, 0.5])
    same = module._evaluate(batch, module.test_means, "test")["rewards"]["e"]
    module.set_ensemble(None)
    after = module._evaluate(batch, module.test_means, "test")["rewards"]["e"]
    assert torch.equal(before, same) and torch.equal(before, after)
