"""`TextPPOModule`: PPO with LoRA on a causal LM, as a LightningModule (manual optimisation).

One training step = one PPO iteration of the paper (TRL 0.4 semantics); the settings named here are the groups of
settings.py (`ppo.epochs` is the config key `model.init_args.ppo.epochs`):
1. sample a response per prompt (`rloo`: `ppo.rloo_k` per prompt) (top_k 0, top_p 1, lengths drawn from
   `rollout.response_length`, EOS ignored by default as in the paper);
2. score it with every reward (all are logged) and form the training reward sum_k mu_k R_k / sum mu_k
   (`reward_weights` = mu: one-hot for an expert, mixed for MORL; normalisation explicit: `scoring`);
3. old log-probs (and values for GAE), and reference log-probs (`kl.reference`: the frozen initial adapter, or
   the base model);
4. advantages (`ppo.advantage`): `gae` (the paper): per-token reward -beta KL with the score on the last token,
   GAE (gamma 1, lambda 0.95); or critic-free `sequence` (rl/sequence.py) or `rloo` (rl/rloo.py), one value per
   response;
5. `ppo.epochs` passes over shuffled mini-batches: clipped policy loss (+ vf_coef * clipped value loss for GAE,
   with whitened advantages), gradient clipping; then the KL controller update.
Logged per iteration: train/reward/<name> for every reward and train/reward/total (synced over ranks), train/kl,
train/kl_coef, the PPO statistics, and time/{generate,score,reference,optimise} (this rank's seconds); the last
iteration's texts, raw rewards and timings stay in `last_iteration`. Evaluation (`validation_step`/`test_step`)
decodes greedily, logs `test/reward/<name>` for every reward (the front's objectives) and the weighted
total as `test/reward_total`, and returns the per-example scores (the contract of rs_lightning.front.per_example).
Runs are sized in PPO iterations (`limit_train_batches` x `max_epochs`), not in Lightning's `global_step`.
The training iteration itself lives in `training.py`, expert export (PEFT adapter, + value head for GAE) in
`export.py`, the settings' groups in `settings.py`.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from rs_lightning import rl
from rs_lightning.rewards.base import RewardMetric
from rs_lightning.rewards.mixture import MixtureReward
from rs_lightning.soup.lora import live_adapter_state
from rs_lightning.tasks.autocast_cache import weight_cast_cache
from rs_lightning.tasks.ensemble import EnsembleMembers
from rs_lightning.tasks.text import fsdp
from rs_lightning.tasks.text import policy as pol
from rs_lightning.tasks.text.rollout import Rollout, generate, mixture_greedy, response_forward
from rs_lightning.tasks.text.settings import (
    GROUPS,
    KLSettings,
    LoraSettings,
    PPOSettings,
    RolloutSettings,
    ScoringSettings,
    TextSettings,
    as_dict,
    coerce,
)
from rs_lightning.tasks.text.training import PPOIteration

# Group defaults (frozen dataclasses): module-level so the signature shows them and jsonargparse reads their fields.
DEFAULT_LORA, DEFAULT_PPO, DEFAULT_KL = LoraSettings(), PPOSettings(), KLSettings()
DEFAULT_ROLLOUT, DEFAULT_SCORING = RolloutSettings(), ScoringSettings()


class TextPPOModule(PPOIteration, L.LightningModule):
    """PPO + LoRA policy for text generation; every argument is a config key (LightningCLI `model.init_args`).

    The settings come in groups (rs_lightning/tasks/text/settings.py documents each field), nested keys in a config
    (`lora: {r: 8}`) or on the command line (`--model.init_args.ppo.lr 5e-4`); a group or a field not given keeps
    its default. Python callers may give each group as its dataclass, a dict of some of its fields, or None.

    Args:
        model: HF causal LM id or local path, or "smollm2-135m-instruct" (offline default) or "tiny-random".
        rewards: the rewards to log (all of them, always); names must be unique.
        reward_weights: mu, aligned with `rewards`: the training reward is sum mu_k R_k / sum mu_k.
            None with one reward trains on it. An expert is one-hot, a MORL run is mixed.
        dtype: policy weights dtype ("float32", "bfloat16").
        lora: the trainable LoRA: rank, alpha, dropout, target modules, initial adapter, init seed.
        ppo: the PPO update: learning rate, epochs, mini-batch size, advantage estimator, clipping, whitening.
        kl: the KL penalty: initial coefficient, adaptive controller, reference policy.
        rollout: generation: training response lengths, sampling, EOS, evaluation length.
        scoring: how rewards read a response (prefix, context field) and how their scores are normalised.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        rewards: list[RewardMetric] | None = None,
        reward_weights: list[float] | None = None,
        dtype: str = "float32",
        lora: LoraSettings = DEFAULT_LORA,
        ppo: PPOSettings = DEFAULT_PPO,
        kl: KLSettings = DEFAULT_KL,
        rollout: RolloutSettings = DEFAULT_ROLLOUT,
        scoring: ScoringSettings = DEFAULT_SCORING,
    ) -> None:
        super().__init__()
        self.settings = TextSettings(lora=coerce("lora", lora), ppo=coerce("ppo", ppo), kl=coerce("kl", kl),
                                     rollout=coerce("rollout", rollout), scoring=coerce("scoring", scoring))
        # save_hyperparameters reads these arguments from this frame: rebound to plain dicts, so checkpoints,
        # hparams.yaml and the front's config hash hold plain data whichever form a caller gave (the CLI gives
        # its own config, where they are dicts already).
        lora, ppo, kl, rollout, scoring = (as_dict(getattr(self.settings, g)) for g in GROUPS)
        self.save_hyperparameters(ignore=["rewards"])
        self.automatic_optimization = False
        if not rewards:
            raise ValueError("model.rewards is empty: give at least one reward (e.g. class_path: ...VaderReward)")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names} (set `name:` in each reward's init_args)")
        if reward_weights is None:
            if len(rewards) > 1:
                raise ValueError(
                    f"{len(rewards)} rewards {names} but no model.reward_weights: give mu, e.g. [1, 0] for an "
                    "expert of the first reward or [0.5, 0.5] for MORL"
                )
            reward_weights = [1.0]
        sc, klc = self.settings.scoring, self.settings.kl
        self.objective = MixtureReward(
            {r.name: r for r in rewards}, list(reward_weights), normalization=sc.normalization,
            mean=sc.mean, std=sc.std, name="total",
        )
        self.reward_names = names
        self.val_means = nn.ModuleDict({n: MeanMetric() for n in [*names, "total"]})
        self.test_means = nn.ModuleDict({n: MeanMetric() for n in [*names, "total"]})
        self.kl_ctl = (
            rl.AdaptiveKLController(klc.init_coef, klc.target, klc.horizon) if klc.adaptive
            else rl.FixedKLController(klc.init_coef)
        )
        self.last_iteration: dict[str, Any] = {}  # texts, raw rewards and phase timings of the latest iteration
        self._build_policy()

    # -- model ----------------------------------------------------------------------------------------------

    def _build_policy(self) -> None:
        from rs_lightning.tasks.text.model_loading import load_causal_lm

        lora = self.settings.lora
        # "tiny-random" seeds torch to build its weights: keep the run's RNG stream (seed_everything) untouched.
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = load_causal_lm(self.hparams.model, dtype=self.hparams.dtype)
        self.policy = pol.attach_lora(
            base, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
            init_adapter=lora.init_adapter, lora_init_seed=lora.init_seed,
            frozen_reference=self.settings.kl.reference == "init",  # "base" disables the adapter: no copy to load
        )
        # Critic-free advantages use no value estimate: a value head there would still be trained (vf_coef x its
        # loss) and, reading the decoder's hidden states, push the LoRA with a loss the policy does not need.
        self.value_head = (None if self.settings.ppo.critic_free
                           else pol.make_value_head(base.config.hidden_size, lora.init_seed))
        self.policy.train()  # from_pretrained returns eval mode; rollouts switch to eval explicitly

    def configure_model(self) -> None:
        # Under FSDP the policy and value head (if any) are wrapped here, not the whole module: see tasks/text/fsdp.py.
        fsdp.shard_policy(self)

    def soup_state_dict(self) -> dict[str, Tensor]:
        """Live adapter tensors under PEFT's saved names: `rs front` interpolates expert adapters into these."""
        return live_adapter_state(self.policy)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.settings.ppo.lr)

    # -- rollouts and rewards (training: training.py) --------------------------------------------------------

    def rollout(self, batch: dict[str, Any], *, greedy: bool, lengths: list[int], ignore_eos: bool,
                with_logprobs: bool = False) -> Rollout:
        """Responses of the current policy (eval mode) to a batch of left-padded queries; see `rollout.generate`
        (`with_logprobs`: the sampling pass's own log-probs of the response tokens)."""
        ro = self.settings.rollout
        was_training = self.policy.training
        self.policy.eval()  # no dropout while sampling and scoring the behaviour policy
        try:
            # weight_cast_cache: under bf16/fp16-mixed, each weight is cast once per decode (a no-op in fp32).
            with torch.no_grad(), fsdp.generation_context(self.policy), weight_cast_cache(self.policy):
                return generate(
                    self.policy, self.tokenizer, batch["input_ids"], batch["attention_mask"], lengths, greedy=greedy,
                    top_k=ro.top_k, top_p=ro.top_p, temperature=ro.temperature, ignore_eos=ignore_eos,
                    with_logprobs=with_logprobs,
                )
        finally:
            self.policy.train(was_training)

    def reward_texts(self, batch: dict[str, Any], texts: list[str]) -> list[str]:
        """What the rewards read as the response: the reference prefix (if any) plus the continuation."""
        prefixes = batch.get("prefixes")
        if not self.settings.scoring.includes_prefix or not prefixes:
            return texts
        return [(p or "") + t for p, t in zip(prefixes, texts)]

    def score(self, batch: dict[str, Any], texts: list[str]) -> dict[str, Tensor]:
        """Raw scores {name: [B]} of every reward for the decoded continuations `texts` of `batch`."""
        contexts = batch.get(self.settings.scoring.prompt_field) or batch["prompts"]
        return self.objective.score_components(list(contexts), self.reward_texts(batch, texts),
                                               batch.get("references"))

    def fisher_log_likelihood(self, batch: dict[str, Any]) -> Tensor:
        """Per prompt `[B]`: log p(response | prompt) of one response sampled from the policy (the training
        sampler, `eval_max_new_tokens` tokens), differentiable in the trainable (LoRA) weights: what `rs fisher`
        squares and averages (rs_lightning.fisher). Eval mode: no dropout."""
        n = len(batch["prompts"])
        ro = self.rollout(batch, greedy=False, lengths=self._eval_lengths(n), ignore_eos=False)
        was_training = self.policy.training
        self.policy.eval()
        try:
            logprobs = response_forward(self.policy, None, ro)["logprobs"]
        finally:
            self.policy.train(was_training)
        return (logprobs * ro.response_mask.to(logprobs.dtype)).sum(1)

    def _eval_lengths(self, n: int) -> list[int]:
        """Response lengths of `n` evaluation responses (greedy decoding, `rs fisher`'s samples)."""
        return [self.settings.rollout.eval_max_new_tokens] * n

    # -- evaluation -----------------------------------------------------------------------------------------

    def set_ensemble(self, states: list[dict[str, Tensor]] | None, weights: list[float] | None = None) -> None:
        """Evaluate the token-level mixture of N experts' policies (`rs front` with front.ensemble); None: back to
        the policy. `states` are expert adapters under `soup_state_dict`'s keys; each member is a copy of the
        policy with that adapter, built once per list of states and reused across the sweep's points."""
        if states is None:  # back to the model; the members stay built for the sweep's next point
            self._ensemble = None
            return

        def build(state):
            member = copy.deepcopy(self.policy)
            live = live_adapter_state(member)
            with torch.no_grad():
                for key, value in state.items():
                    live[key].copy_(value)
            return member

        if getattr(self, "_ensemble_members", None) is None:
            self._ensemble_members = EnsembleMembers()
        self._ensemble = (self._ensemble_members.get(states, build), list(weights))

    def _evaluate(self, batch: dict[str, Any], means: nn.ModuleDict, stage: str) -> dict[str, dict[str, Tensor]]:
        n = len(batch["prompts"])
        lengths = self._eval_lengths(n)
        ensemble = getattr(self, "_ensemble", None)
        if ensemble is not None:
            members, weights = ensemble
            ro = mixture_greedy([m.to(self.device) for m in members], weights, self.tokenizer, batch["input_ids"],
                                batch["attention_mask"], lengths, ignore_eos=False)
        else:
            ro = self.rollout(batch, greedy=True, lengths=lengths, ignore_eos=False)
        components = self.score(batch, ro.texts)
        total = self.objective.combine(components)
        for name, values in [*components.items(), ("total", total)]:
            means[name].update(values.to(self.device))
            # `<stage>/reward/*` are the objectives a front scores; the weighted total is not one of them (it
            # would be a duplicated axis of the hypervolume), so it is logged outside that prefix.
            key = f"{stage}/reward_total" if name == "total" else f"{stage}/reward/{name}"
            self.log(key, means[name], on_step=False, on_epoch=True, batch_size=n)
        # Per-example scores of exactly the logged `<stage>/reward/*`, in batch order (rs_lightning.front.per_example).
        return {"rewards": {name: values.detach().float().cpu() for name, values in components.items()}}

    @torch.no_grad()
    def serve_step(self, batch: dict[str, Any]) -> tuple[list[str], dict[str, list[float]]]:
        """Greedy responses of the policy as it now is and each reward's per-response score, without logging:
        what `rs serve` shows for the soup of the moment (the values `test_step` scores)."""
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        n = len(batch["prompts"])
        ro = self.rollout(batch, greedy=True, lengths=self._eval_lengths(n), ignore_eos=False)
        components = self.score(batch, ro.texts)
        return list(ro.texts), {name: values.float().cpu().tolist() for name, values in components.items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._evaluate(batch, self.val_means, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._evaluate(batch, self.test_means, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        n = len(batch["prompts"])
        ro = self.rollout(batch, greedy=True, lengths=self._eval_lengths(n), ignore_eos=False)
        return [{"prompt": p, "response": r} for p, r in zip(batch["prompts"], ro.texts)]

    # -- checkpoints ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Keep what training changes (adapter, value head if any, reward statistics), not the frozen base model.
        checkpoint["state_dict"] = pol.without_frozen(self, checkpoint["state_dict"])
        checkpoint["rs_kl_ctl"] = self.kl_ctl.state_dict()
        checkpoint["rs_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rs_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()
        unknown = [k for k in checkpoint["state_dict"] if k not in own]
        if unknown:
            hint = ""
            if self.value_head is None and any(k.startswith("value_head.") for k in unknown):
                hint = (f" (value_head.*: a run with a value head, but advantage={self.settings.ppo.advantage!r} "
                        "builds none; resume it with the advantage it was trained with)")
            raise KeyError(f"checkpoint holds {len(unknown)} keys this module does not have, e.g. {unknown[:3]}{hint}")
        # The frozen base weights are not in the checkpoint: fill them from the freshly built module.
        checkpoint["state_dict"] = {**own, **checkpoint["state_dict"]}
        if "rs_kl_ctl" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["rs_kl_ctl"])
        rng = checkpoint.get("rs_rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
