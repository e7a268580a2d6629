"""A front over the text task (tiny random Llama + LoRA, CPU, seconds): it scores exactly the declared rewards
(never the weighted total) and keeps the per-example rewards the task's evaluation steps return."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rs_lightning.front import Checkpoint, SummarySettings, build_summary, run_sweep
from rs_lightning.rewards.rules import KeywordReward

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama folder and a prompt file."""
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    root = tmp_path_factory.mktemp("text_front")
    tiny_random_causal_lm(save_dir=root / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "the cat sat on the mat"}
            for i in range(40)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _task(root):
    from rs_lightning.tasks.text.data import PromptDataModule
    from rs_lightning.tasks.text.module import TextPPOModule

    rewards = [KeywordReward([c], mode="count", whole_word=False, name=c) for c in ("e", "a")]
    module = TextPPOModule(model=str(root / "model"), rewards=rewards, reward_weights=[0.5, 0.5],
                           lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]},
                           rollout={"eval_max_new_tokens": 6})
    # 7 test / 5 validation prompts in batches of 3: the last batch of each is short.
    data = PromptDataModule(source=str(root / "prompts.jsonl"), tokenizer=str(root / "model"), num_val=5,
                            num_test=7, batch_size=8, eval_batch_size=3, prefix_tokens=(0, 0), template="alpaca")
    return module, data


def _experts(module) -> list[Checkpoint]:
    base = {k: v.detach().clone() for k, v in module.soup_state_dict().items()}
    experts = []
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        experts.append(Checkpoint(name=f"x{i}", state_dict={k: v + 0.5 * torch.randn(v.shape, generator=gen)
                                                            for k, v in base.items()}))
    return experts


def test_text_front_scores_exactly_the_declared_rewards_with_per_example_values(tiny, tmp_path):
    module, data = _task(tiny)
    rows = run_sweep(module, data, _experts(module), [[0.5, 0.5]], tmp_path / "run", progress=False,
                     config_hash="text")
    assert len(rows) == 3
    for row in rows:
        assert set(row["rewards"]) == {"e", "a"}  # the weighted total is not a reward of the front
        assert set(row["val_rewards"]) == {"e", "a"}
        for field, means, n in (("per_example", row["rewards"], 7), ("val_per_example", row["val_rewards"], 5)):
            assert set(row[field]) == {"e", "a"}
            for name, values in row[field].items():
                assert len(values) == n
                assert np.mean(values) == pytest.approx(means[name], abs=1e-5)
    summary = build_summary(rows, SummarySettings(n_boot=50))  # no `rewards`: every logged test/reward/*
    assert summary["rewards"] == ["e", "a"]
    assert len(summary["normalisation"]["ideal"]) == 2 and len(summary["reference_point"]["normalised"]) == 2
    assert summary["selection"]["split"] == "val"
    assert summary["uncertainty"]["n_examples"] == 7
    assert set(summary["uncertainty"]["points"]["x0"]) == {"e", "a"}
