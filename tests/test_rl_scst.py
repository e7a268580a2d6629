"""SCST baselines and loss on tiny tensors with exact values, plus one gradient step on a categorical policy."""

import pytest
import torch

from rs_lightning.rl import greedy_baseline, leave_one_out_baseline, scst_loss, sequence_logprobs

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_leave_one_out_baseline_values():
    rewards = t([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    close(leave_one_out_baseline(rewards), [[11 / 3, 10 / 3, 3.0, 2.0], [4 / 3, 4 / 3, 4 / 3, 0.0]])
    # k = 5 as in the paper
    close(leave_one_out_baseline(t([[1.0, 2.0, 3.0, 4.0, 5.0]])), [[3.5, 3.25, 3.0, 2.75, 2.5]])
    with pytest.raises(ValueError):
        leave_one_out_baseline(t([[1.0], [2.0]]))


def test_greedy_baseline_broadcasts_the_greedy_reward():
    close(greedy_baseline(t([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), t([0.5, -1.0])), [[0.5] * 3, [-1.0] * 3])
    with pytest.raises(ValueError):
        greedy_baseline(t([[1.0, 2.0]]), t([0.5, 0.5]))


def test_scst_loss_hand_value_summed_logprobs():
    rewards = t([[1.0, 2.0, 3.0, 6.0]])
    logprobs = t([[-1.0, -2.0, -3.0, -4.0]])
    # advantages (-8/3, -4/3, 0, 4); loss = -mean(adv * logp) = -(8/3 + 8/3 + 0 - 16) / 4 = 8/3
    close(scst_loss(logprobs, rewards, leave_one_out_baseline(rewards)), 8 / 3)
    close(scst_loss(logprobs, rewards, greedy_baseline(rewards, t([2.0]))), -(1.0 + 0.0 - 3.0 - 16.0) / 4)


def test_scst_loss_token_logprobs_with_mask_and_length_normalisation():
    tokens = t([[[-0.5, -0.5, 9.0], [-1.0, -1.0, -1.0]]])  # [B=1, k=2, T=3]; 9.0 is padding junk
    mask = torch.tensor([[[1, 1, 0], [1, 1, 1]]])
    rewards, baseline = t([[1.0, 0.0]]), t([[0.0, 0.5]])
    close(sequence_logprobs(tokens, mask), [[-1.0, -3.0]])
    close(sequence_logprobs(tokens, mask, length_normalize=True), [[-0.5, -1.0]])
    close(scst_loss(tokens, rewards, baseline, mask), -(1.0 * -1.0 + (-0.5) * -3.0) / 2)
    close(scst_loss(tokens, rewards, baseline, mask, length_normalize=True), -(1.0 * -0.5 + (-0.5) * -1.0) / 2)
    with pytest.raises(ValueError):
        scst_loss(t([[-1.0, -2.0]]), rewards, baseline, length_normalize=True)


def test_scst_gradient_step_on_a_categorical_policy():
    logits = torch.zeros(5, dtype=F64, requires_grad=True)
    samples = torch.tensor([0, 1, 2, 3])  # k = 4 fixed samples of one "image"; token 4 never sampled
    rewards = t([[1.0, 0.0, 0.5, 2.0]])
    baseline = leave_one_out_baseline(rewards)  # (2.5, 3.5, 3, 1.5) / 3
    adv = (rewards - baseline)[0]
    above = adv > 0
    assert above.tolist() == [True, False, False, True]

    before = torch.log_softmax(logits, -1)[samples].detach()
    loss = scst_loss(torch.log_softmax(logits, -1)[samples].unsqueeze(0), rewards, baseline)
    loss.backward()
    # d loss / d z = -(1/k) sum_i adv_i (e_{a_i} - p); the p term vanishes since LOO advantages sum to 0.
    close(adv.sum(), 0.0)
    close(logits.grad, torch.cat([-adv / 4, t([0.0])]))
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = torch.log_softmax(logits, -1)[samples]
    assert (after[above] > before[above]).all()
    assert (after[~above] < before[~above]).all()
