"""One PPO iteration of `TextPPOModule` (its `training_step`), as a mixin: rollout, scores, reference, advantages,
clipped updates, KL controller, logging. The module (module.py) holds the policy, the rewards and the evaluation.

Advantage estimators (`ppo.advantage`): "gae", the paper's (per-token KL-shaped rewards, GAE over a learned value
head, TRL 0.4's mini-batch whitening); the critic-free "sequence" (rl/sequence.py: a batch baseline) and "rloo"
(rl/rloo.py: `ppo.rloo_k` samples per prompt, leave-one-out baseline), which train the clipped policy loss alone.
Settings are read from the module's `settings` (settings.py's groups).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from rs_lightning import rl
from rs_lightning.tasks.autocast_cache import frozen_linear_casts
from rs_lightning.tasks.cpu_attention import attention_for_backward
from rs_lightning.tasks.text import fsdp
from rs_lightning.tasks.text import policy as pol
from rs_lightning.tasks.text.rollout import PhaseClock, Rollout, repeat_rows, response_forward, sample_lengths


class PPOIteration:
    """Mixin for a LightningModule with `policy`, `value_head` (None for critic-free advantages), `objective`,
    `kl_ctl`, `rollout()` and `score()`, and `settings` (a settings.TextSettings), as `TextPPOModule` has."""

    @property
    def ppo_iteration(self) -> int:
        """PPO iterations (training batches) done so far: 0 inside the first `training_step`, n after n of them
        (in `on_train_batch_end`, `on_train_end`, and in a run resumed from a checkpoint taken there).
        Lightning's `global_step` counts optimizer steps instead (ppo.epochs x mini-batches per iteration):
        size runs with `limit_train_batches` and `max_epochs`."""
        if self._trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _step_generator(self, salt: int) -> torch.Generator:
        # Seeded by the iteration so a resumed run draws the same lengths and mini-batches as an uninterrupted one.
        return torch.Generator().manual_seed(1_000_003 * self.ppo_iteration + salt)

    def _lengths(self, batch_size: int) -> list[int]:
        low, high = self.settings.rollout.response_length
        gen = self._step_generator(1)
        if self.settings.rollout.length_sampling == "batch":
            return sample_lengths(low, high, 1, gen) * batch_size
        return sample_lengths(low, high, batch_size, gen)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Under bf16/fp16-mixed the frozen base weights are cast once per iteration rather than at every forward
        # (a no-op in fp32 and under FSDP, whose flat parameters it leaves alone; see tasks/autocast_cache.py).
        casts = contextlib.nullcontext() if fsdp.is_sharded(self.policy) else frozen_linear_casts(self.policy)
        with casts:
            self._ppo_iteration(batch)

    def _ppo_iteration(self, batch: dict[str, Any]) -> None:
        ppo = self.settings.ppo
        lengths = self._lengths(len(batch["prompts"]))
        if ppo.advantage == "rloo":
            # The k samples per prompt are made here, not by the data module: the data order, its resumable state
            # and DDP's per-rank split keep counting prompts. A prompt's k samples share its length draw.
            k = ppo.rloo_k
            batch, lengths = repeat_rows(batch, k), [length for length in lengths for _ in range(k)]
        n = len(batch["prompts"])  # responses in this iteration
        clock = PhaseClock()
        # Critic-free estimators need no values: the old log-probs come from the sampling pass itself (same
        # weights, same eval mode), which saves one full forward of the batch. GAE still needs the value head's
        # pass over the hidden states, and takes the log-probs from it.
        from_sampling = self.value_head is None
        ro = self.rollout(batch, greedy=False, lengths=lengths, ignore_eos=self.settings.rollout.ignore_eos,
                          with_logprobs=from_sampling)
        clock.lap("generate")
        components = self.score(batch, ro.texts)
        scores = self.objective.combine(components, update_stats=True).to(self.device)
        clock.lap("score")
        mask = ro.response_mask
        with torch.no_grad():
            self.policy.eval()
            old = {"logprobs": ro.logprobs} if from_sampling else response_forward(self.policy, self.value_head, ro)
            with pol.reference_policy(self.policy, self.settings.kl.reference):
                ref_logprobs = response_forward(self.policy, None, ro)["logprobs"]
            self.policy.train()
            beta = float(self.kl_ctl.value)  # logged as train/kl_coef: the coefficient THIS batch was penalised with
            seq_kl = rl.sequence_kl(old["logprobs"], ref_logprobs, mask)
            advantages, returns = self._advantages(scores, old, ref_logprobs, seq_kl, mask, beta)
        clock.lap("reference")
        stats = self._optimise(ro, old, advantages, returns)
        clock.lap("optimise")

        self.kl_ctl.update(float(self._all_mean(seq_kl.mean())), n * self.trainer.world_size)
        self._log_train(components, scores, seq_kl, mask, stats, beta)
        for phase, seconds in clock.laps.items():  # this rank's wall time: where an iteration's time goes
            self.log(f"time/{phase}", seconds, on_step=True, on_epoch=False, batch_size=n)
        self.last_iteration = {"texts": ro.texts, "rewards": components, "timings": clock.laps}

    def _advantages(self, scores, old, ref_logprobs, seq_kl, mask, beta) -> tuple[Tensor, Tensor | None]:
        """(advantages [B, T], GAE returns [B, T] or None for the critic-free estimators)."""
        ppo = self.settings.ppo
        # The critic-free advantages are already centred per batch / per prompt: no whitening on top.
        if ppo.advantage == "sequence":
            return rl.sequence_advantages(scores, seq_kl, mask, beta), None
        if ppo.advantage == "rloo":
            return rl.rloo_advantages(scores, seq_kl, mask, beta, ppo.rloo_k), None
        rewards, _ = rl.kl_penalized_rewards(scores, old["logprobs"], ref_logprobs, mask, beta)
        advantages, returns = rl.gae(rewards, old["values"], mask, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda)
        if ppo.whiten == "batch":
            advantages = rl.masked_whiten(advantages, mask)
        return advantages, returns

    def _optimise(self, ro: Rollout, old: dict[str, Tensor], advantages: Tensor, returns: Tensor | None) -> dict:
        """`ppo.epochs` passes of clipped PPO over shuffled mini-batches; returns the per-mini-batch stats."""
        ppo = self.settings.ppo
        opt, mask = self.optimizers(), ro.response_mask
        stats: dict[str, list[Tensor]] = {}
        gen = self._step_generator(2)
        for idx in rl.minibatch_indices(len(mask), ppo.mini_batch_size, generator=gen, epochs=ppo.epochs):
            mb = Rollout(ro.query_ids[idx], ro.query_mask[idx], ro.response_ids[idx], mask[idx], [])
            adv = advantages[idx]
            if ppo.whiten == "minibatch" and ppo.advantage == "gae":  # TRL 0.4: whiten inside each mini-batch
                adv = rl.masked_whiten(adv, mask[idx]) if int(mask[idx].sum()) > 1 else adv
            with attention_for_backward(self.policy, mb.query_ids.device):  # bf16 on CPU: the math kernel
                new = response_forward(self.policy, self.value_head, mb, with_entropy=True)
            if self.value_head is None:  # critic-free: the clipped policy loss alone
                loss, mb_stats = rl.ppo_policy_loss(new["logprobs"], old["logprobs"][idx], adv, mask[idx],
                                                    ppo.cliprange)
            else:
                loss, mb_stats = rl.ppo_loss(
                    new["logprobs"], old["logprobs"][idx], adv, new["values"], old["values"][idx], returns[idx],
                    mask[idx], clip_range=ppo.cliprange, clip_range_value=ppo.cliprange_value, vf_coef=ppo.vf_coef,
                )
            mb_stats["entropy"] = rl.masked_mean(new["entropy"].detach(), mask[idx])
            opt.zero_grad()
            self.manual_backward(loss)
            if ppo.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=ppo.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            for key, value in mb_stats.items():
                stats.setdefault(key, []).append(torch.as_tensor(value).detach().float())
        return stats

    def _all_mean(self, value: Tensor) -> Tensor:
        """Mean over DDP ranks, so every rank updates the KL coefficient identically."""
        return self.trainer.strategy.reduce(value.detach().to(self.device), reduce_op="mean")

    def _log_train(self, components, scores, seq_kl, mask, stats, beta) -> None:
        log = dict(on_step=True, on_epoch=False, sync_dist=True, batch_size=len(scores))
        for name, values in components.items():
            self.log(f"train/reward/{name}", values.mean().to(self.device), prog_bar=True, **log)
        self.log("train/reward/total", scores.float().mean(), **log)
        self.log("train/kl", seq_kl.mean(), prog_bar=True, **log)
        self.log("train/kl_coef", torch.tensor(beta, device=self.device), **log)
        self.log("train/response_length", mask.sum(1).float().mean(), **log)
        for key, values in stats.items():
            self.log(f"train/{key}", torch.stack(values).mean().to(self.device), **log)
