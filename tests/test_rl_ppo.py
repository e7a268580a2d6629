"""PPO math on tiny tensors with exact values (computed by hand or by a plain-Python loop), torchtune style."""

import math
import random

import pytest
import torch

from rs_lightning.rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    minibatch_indices,
    per_token_kl,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_kl,
)

ATOL = 1e-6
F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def close(actual, expected, atol=ATOL):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_from_logits_matches_hand_log_softmax():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    labels = torch.tensor([[2, 1]])
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    close(logprobs_from_logits(logits, labels), [[3.0 - z, -math.log(3)]])


def test_logprobs_from_logits_is_stable_and_upcasts_half_precision():
    logits = t([[[1000.0, 0.0], [-1000.0, 0.0]]])
    close(logprobs_from_logits(logits, torch.tensor([[0, 0]])), [[0.0, -1000.0]])
    out = logprobs_from_logits(torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    close(out, torch.full((2, 3), -math.log(4)))


def test_entropy_from_logits_uniform_and_banned_tokens():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, 0.0, -math.inf]]]).requires_grad_()
    ent = entropy_from_logits(logits)
    close(ent, [[math.log(4), math.log(2)]])
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    p = [0.7, 0.2, 0.1]
    close(entropy_from_logits(t([[[math.log(x) for x in p]]])), [[-sum(x * math.log(x) for x in p)]])


# ---------------------------------------------------------------- KL and rewards


def test_per_token_kl_kinds():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    close(per_token_kl(logp, ref, "kl"), [[0.5, -1.0]])
    close(per_token_kl(logp, ref, "abs"), [[0.5, 1.0]])
    close(per_token_kl(logp, ref, "mse"), [[0.125, 0.5]])
    with pytest.raises(ValueError):
        per_token_kl(logp, ref, "full")


def test_sequence_kl_sums_over_real_tokens():
    logp, ref = t([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]]), t([[-1.5, -1.0, -0.5], [-0.4, -0.1, 0.0]])
    close(sequence_kl(logp, ref, torch.tensor([[1, 1, 1], [1, 1, 0]])), [-0.5, 0.0])


def test_kl_penalized_rewards_puts_the_score_on_the_last_real_token():
    logp = t([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.4, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(t([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [0.2, -0.2, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [-0.02, 0.02 - 1.0, 0.0]])


def test_kl_penalized_rewards_general_mask_and_empty_row():
    # A mask with a leading zero (TRL's query offset): the score still goes on the last non-zero position.
    zeros = torch.zeros(1, 4, dtype=F64)
    rewards, _ = kl_penalized_rewards(t([3.0]), zeros, zeros, torch.tensor([[0, 1, 1, 0]]), kl_coef=0.2)
    close(rewards, [[0.0, 0.0, 3.0, 0.0]])
    with pytest.raises(ValueError):
        kl_penalized_rewards(
            t([1.0, 1.0]), zeros.expand(2, 4), zeros.expand(2, 4), torch.tensor([[1, 0, 0, 0]] + [[0] * 4]), 0.1
        )


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_1x3():
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), torch.ones(1, 3), gamma=1.0, gae_lambda=0.95)
    # A2 = 1 - 0.3; A1 = (0 + 0.3 - 0.4) + 0.95 A2; A0 = (0 + 0.4 - 0.5) + 0.95 A1
    close(adv, [[0.43675, 0.565, 0.7]])
    close(ret, [[0.93675, 0.965, 1.0]])


def test_gae_ragged_row_ignores_padding_junk():
    rewards, values = t([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]]), t([[0.5, 0.4, 0.3], [0.5, 1.0, 7.0]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 1, 1], [1, 1, 0]]), gamma=0.9, gae_lambda=0.5)
    # row 1: A1 = 2 + 0.9 * 0 - 1 = 1; A0 = (1 + 0.9 * 1 - 0.5) + 0.45 * A1 = 1.85
    close(adv[1], [1.85, 1.0, 0.0])
    close(ret[1], [2.35, 2.0, 0.0])


def _gae_reference(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * len(rewards[0]) for _ in rewards]
    for b, n in enumerate(lengths):
        last = 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0
            last = rewards[b][i] + gamma * next_v - values[b][i] + gamma * lam * last
            adv[b][i] = last
    ret = [[a + (values[b][i] if i < lengths[b] else 0.0) for i, a in enumerate(row)] for b, row in enumerate(adv)]
    return adv, ret


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_python_loop_on_awkward_sizes(seed):
    rng = random.Random(seed)
    B, T = 3, 7
    rewards = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    values = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    lengths = [rng.randint(1, T) for _ in range(B)]
    lengths[0] = T  # one full row, one ragged at least
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    gamma, lam = rng.choice([1.0, 0.99]), rng.choice([0.95, 0.5, 1.0])
    adv, ret = gae(t(rewards), t(values), mask, gamma=gamma, gae_lambda=lam)
    ref_adv, ref_ret = _gae_reference(rewards, values, lengths, gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_hand_values():
    x, mask = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(masked_mean(x, mask), 2.5)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])
    close(masked_var(x, mask, unbiased=False), 1.25)
    close(masked_var(x, mask), 5.0 / 3.0)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_hand_values_and_moments():
    close(
        masked_whiten(t([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)),
        [[v / math.sqrt(5 / 3 + 1e-8) for v in (-1.5, -0.5, 0.5, 1.5)]],
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, generator=g, dtype=F64) * 3 + 5
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0)
    assert (w[mask == 0] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(kept, mask), masked_mean(x, mask))
    close(masked_var(kept, mask), 1.0)


# ---------------------------------------------------------------- clipped losses

# Ratios outside [0.8, 1.2] for positive and negative advantages; the last token of row 1 is padding.
RATIOS = [[1.5, 1.1, 0.5], [0.5, 1.5, 0.9]]
ADVS = [[1.0, 1.0, 1.0], [-1.0, -1.0, -2.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _policy_inputs():
    old = t([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logp = (old + t(RATIOS).log()).requires_grad_()
    return logp, old, t(ADVS)


def test_policy_loss_takes_the_pessimistic_branch():
    logp, old, adv = _policy_inputs()
    loss, stats = ppo_policy_loss(logp, old, adv, MASK, clip_range=0.2)
    # per token max(-A r, -A clip(r)): 1.5,A+ -> -1.2 (clipped); 1.1 -> -1.1; 0.5,A+ -> -0.5;
    # 0.5,A- -> 0.8 (clipped); 1.5,A- -> 1.5
    close(loss, (-1.2 - 1.1 - 0.5 + 0.8 + 1.5) / 5)
    close(stats["clipfrac"], 2 / 5)
    logs = [math.log(r) for r in (1.5, 1.1, 0.5, 0.5, 1.5)]
    close(stats["approx_kl"], 0.5 * sum(v * v for v in logs) / 5)
    close(stats["policy_kl"], -sum(logs) / 5)
    close(stats["ratio_mean"], 5.1 / 5)
    assert not stats["policy_loss"].requires_grad


def test_policy_loss_gradient_sign_and_clipped_zeros():
    logp, old, adv = _policy_inputs()
    ppo_policy_loss(logp, old, adv, MASK, clip_range=0.2)[0].backward()
    # d/dlogp (-A r) / N = -A r / 5 on the unclipped branch; zero on the clipped side and on padding.
    close(logp.grad, [[0.0, -1.1 / 5, -0.5 / 5], [0.0, 1.5 / 5, 0.0]])
    inside = torch.tensor([[False, True, False], [False, True, False]])  # ratio within [0.8, 1.2]
    assert (logp.grad[inside].sign() == -adv[inside].sign()).all()


def test_policy_loss_on_policy_gradient_is_minus_advantage_over_n():
    # ratio == 1 exactly (first mini-batch): the tie of max() must still give the full gradient -A / N.
    old = t([[-1.0, -2.0], [-0.5, -0.7]])
    logp = old.clone().requires_grad_()
    adv = t([[2.0, -1.0], [0.5, -3.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(2, 2))
    close(loss, -(2.0 - 1.0 + 0.5 - 3.0) / 4)
    close(stats["clipfrac"], 0.0)
    loss.backward()
    close(logp.grad, -adv / 4)


def test_value_loss_clip():
    values = t([[0.5, 0.1, -0.3], [0.3, 9.0, 9.0]]).requires_grad_()
    old, returns = t([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0]]), torch.zeros(2, 3, dtype=F64)
    returns[0, 0] = 1.0
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # squared errors max(unclipped, clipped): 0.5 -> max(0.25, 0.64); 0.1 -> 0.01; -0.3 -> max(0.09, 0.04); 0.3 -> 0.09
    close(loss, 0.5 * (0.64 + 0.01 + 0.09 + 0.09) / 4)
    close(stats["vf_clipfrac"], 1 / 4)
    close(stats["value_error"], (0.25 + 0.01 + 0.09 + 0.09) / 4)
    loss.backward()
    close(values.grad, [[0.0, 0.1 / 4, -0.3 / 4], [0.3 / 4, 0.0, 0.0]])


def test_ppo_loss_combines_policy_and_value():
    logp, old, adv = _policy_inputs()
    values, old_values, returns = (
        t([[0.5, 0.1, -0.3], [0.3, 9.0, 9.0]]),
        torch.zeros(2, 3, dtype=F64),
        torch.ones(2, 3, dtype=F64),
    )
    loss, stats = ppo_loss(logp, old, adv, values, old_values, returns, MASK, vf_coef=0.1)
    p_loss, _ = ppo_policy_loss(logp, old, adv, MASK)
    v_loss, _ = ppo_value_loss(values, old_values, returns, MASK)
    close(loss, p_loss + 0.1 * v_loss)
    close(stats["loss"], loss.detach())
    assert {"policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio_mean"} <= set(stats)
    assert "entropy" not in stats


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_matches_hand_computation():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 128)  # error clip(0.5) = 0.2 -> x (1 + 0.2 * 0.0128)
    assert ctl.value == pytest.approx(0.200512, abs=1e-12)
    ctl.update(5.4, 128)  # error -0.1 -> x (1 - 0.1 * 0.0128)
    assert ctl.value == pytest.approx(0.200512 * 0.99872, abs=1e-12)
    before = ctl.value
    ctl.update(6.0, 128)
    assert ctl.value == before
    ctl.update(0.0, 128)  # error clipped at -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 0.0128), abs=1e-12)


def test_adaptive_kl_controller_direction_and_state():
    up, down = AdaptiveKLController(0.05), AdaptiveKLController(0.05)
    for _ in range(10):
        up.update(torch.tensor(12.0), 128)
        down.update(1.0, 128)
    assert up.value > 0.05 > down.value
    restored = AdaptiveKLController()
    restored.load_state_dict(up.state_dict())
    assert restored.value == up.value
    fixed = FixedKLController(0.2)
    fixed.update(100.0, 128)
    assert fixed.value == 0.2


# ---------------------------------------------------------------- mini-batches


def test_minibatch_indices_partition_each_epoch():
    batches = minibatch_indices(10, 4, torch.Generator().manual_seed(0), epochs=2)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))  # reshuffled
    again = minibatch_indices(10, 4, torch.Generator().manual_seed(0), epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert [len(b) for b in minibatch_indices(10, 4, epochs=3, drop_last=True)] == [4] * 6


def test_sequence_advantages_exact_values():
    from rs_lightning.rl import sequence_advantages

    scores = torch.tensor([1.0, 3.0])
    seq_kl = torch.tensor([0.5, 1.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = sequence_advantages(scores, seq_kl, mask, kl_coef=0.1, eps=0.0)
    # z-scores (population std 1): -1 and +1; KL centred: -0.5 and +0.5, times beta 0.1.
    expected = torch.tensor([[-1 + 0.05, -1 + 0.05, 0.0], [1 - 0.05, 1 - 0.05, 1 - 0.05]])
    torch.testing.assert_close(adv, expected)
    same = sequence_advantages(torch.tensor([2.0, 2.0]), torch.zeros(2), mask, kl_coef=0.1)
    assert torch.equal(same, torch.zeros_like(same))
