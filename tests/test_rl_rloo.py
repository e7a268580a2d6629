"""RLOO advantages (rs_lightning/rl/rloo.py): exact values on tiny tensors, the row layout, the k checks."""

import pytest
import torch

from rs_lightning.rl import rloo_advantages


def test_rloo_advantages_exact_values():
    # 2 prompts x k=3 responses, contiguous rows; beta = 0.5.
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    seq_kl = torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]])
    adv = rloo_advantages(scores, seq_kl, mask, kl_coef=0.5, k=3)
    # Penalised rewards r = score - 0.5 KL: prompt 0 -> [1, 1, 4], prompt 1 -> [-0.5, -0.5, 2.5].
    # Leave-one-out: 1 - (1 + 4)/2 = -1.5, again -1.5, 4 - (1 + 1)/2 = 3; -0.5 - 1 = -1.5, -1.5, 2.5 + 0.5 = 3.
    expected = torch.tensor([[-1.5, -1.5], [-1.5, 0.0], [3.0, 3.0], [-1.5, -1.5], [-1.5, -1.5], [3.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_rloo_baseline_uses_only_the_same_prompt():
    # k=2: A = r_i - r_other. A huge reward on the other prompt changes nothing.
    mask = torch.ones(4, 1)
    adv = rloo_advantages(torch.tensor([1.0, 3.0, 100.0, 100.0]), torch.zeros(4), mask, kl_coef=0.1, k=2)
    torch.testing.assert_close(adv.squeeze(1), torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    # Equal rewards within every prompt: zero advantages, not NaN.
    same = rloo_advantages(torch.tensor([2.0, 2.0, 5.0, 5.0]), torch.ones(4), mask, kl_coef=0.1, k=2)
    assert torch.equal(same, torch.zeros_like(same))


def test_rloo_rejects_bad_k_and_row_counts():
    mask = torch.ones(4, 2)
    with pytest.raises(ValueError, match="rloo_k must be >= 2.*got 1"):
        rloo_advantages(torch.zeros(4), torch.zeros(4), mask, kl_coef=0.1, k=1)
    with pytest.raises(ValueError, match="multiple of rloo_k=3"):
        rloo_advantages(torch.zeros(4), torch.zeros(4), mask, kl_coef=0.1, k=3)
