"""`TextPPOModule`: PPO with LoRA on a causal LM, as a LightningModule (manual optimisation).

One training step = one PPO iteration of the paper (TRL 0.4 semantics):
1. sample a response per prompt (`rloo`: `rloo_k` per prompt) (top_k 0, top_p 1, lengths drawn from
   `response_length`, EOS ignored by default as in the paper);
2. score it with every reward (all are logged) and form the training reward sum_k mu_k R_k / sum mu_k
   (`reward_weights` = mu: one-hot for an expert, mixed for MORL; normalisation explicit);
3. old log-probs (and values for GAE), and reference log-probs (`kl_reference`: the frozen initial adapter, or
   the base model);
4. advantages: `gae` (the paper): per-token reward -beta KL with the score on the last token, GAE (gamma 1,
   lambda 0.95); or critic-free `sequence` (rl/sequence.py) or `rloo` (rl/rloo.py), one value per response;
5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss (+ vf_coef * clipped value loss for GAE,
   with whitened advantages), gradient clipping; then the KL controller update.
Logged per iteration: train/reward/<name> for every reward and train/reward/total (synced over ranks), train/kl,
train/kl_coef, the PPO statistics, and time/{generate,score,reference,optimise} (this rank's seconds); the last
iteration's texts, raw rewards and timings stay in `last_iteration`. Evaluation (`validation_step`/`test_step`)
decodes greedily, logs `test/reward/<name>` for every reward (the front's objectives) and the weighted
total as `test/reward_total`, and returns the per-example scores (the contract of rs_lightning.front.per_example).
Runs are sized in PPO iterations (`limit_train_batches` x `max_epochs`), not in Lightning's `global_step`.
The training iteration itself lives in `training.py`, expert export (PEFT adapter, + value head for GAE) in
`export.py`.
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
from rs_lightning.tasks.ensemble import EnsembleMembers
from rs_lightning.tasks.text import fsdp
from rs_lightning.tasks.text import policy as pol
from rs_lightning.tasks.text.rollout import Rollout, generate, mixture_greedy, response_forward
from rs_lightning.tasks.text.training import PPOIteration

CRITIC_FREE = ("sequence", "rloo")  # advantages without a value head


class TextPPOModule(PPOIteration, L.LightningModule):
    """PPO + LoRA policy for text generation. Every argument is a config key (LightningCLI `model.init_args`).

    Args:
        model: HF causal LM id or local path, or "smollm2-135m-instruct" (offline default) or "tiny-random".
        rewards: the rewards to log (all of them, always); names must be unique.
        reward_weights: mu, aligned with `rewards`: the training reward is sum mu_k R_k / sum mu_k.
            None with one reward trains on it. An expert is one-hot, a MORL run is mixed.
        reward_normalization: "none" (the paper: raw scores), "running" (z-score with running stats), "fixed".
        reward_mean, reward_std: per-reward statistics for "fixed".
        lora_r, lora_alpha, lora_dropout, target_modules: the LoRA (paper: 16, 16, 0.05, q/k/v/o).
        init_adapter: start from this PEFT adapter (the paper's SFT LoRA).
        kl_reference: "init" (default): the KL reference is the policy's starting point, i.e. a frozen copy of
            `init_adapter`; "base": the base model with the adapter disabled, what the paper's TRL 0.4 did for a
            PEFT policy (see policy.py). The same thing for a fresh LoRA.
        lora_init_seed: seed of a fresh LoRA and of the value head, shared by every run of an experiment.
        lr: Adam learning rate (paper 1.41e-5).
        ppo_epochs, mini_batch_size: passes over each batch and their mini-batch size (paper 4, 4).
        init_kl_coef, adaptive_kl, kl_target, kl_horizon: KL penalty (paper 0.2 (0.05 summaries), on, 6, 10000).
        gamma, gae_lambda: GAE (1, 0.95; `lam` is only ever the soup weight). cliprange, cliprange_value, vf_coef:
            PPO (0.2, 0.2, 0.1); the value ones only for GAE.
        max_grad_norm: gradient clipping (None: off, as TRL 0.4).
        whiten: "minibatch" (TRL 0.4, the paper) or "batch": where GAE advantages are whitened.
        advantage: "gae" (the paper: GAE with a learned value head), or critic-free (no value head, one advantage
            per response on all its tokens, PPO-clip policy loss): "sequence", z(R_i) - beta (KL_i - mean KL), a
            batch baseline (rl/sequence.py); "rloo", R_i - beta KL_i minus the mean of the other rloo_k - 1
            samples of the same prompt (rl/rloo.py). Both learn from the first iteration (short CPU runs).
        rloo_k: samples per prompt for "rloo" (>= 2): each training batch of B prompts yields B * rloo_k responses.
        response_length: (low, high) of max_new_tokens, drawn uniformly (paper 16..32).
        length_sampling: "batch" (one length per batch) or "prompt" (one per prompt: the paper's loop drew TRL's
            LengthSampler per query). With "rloo" the k samples of a prompt share its draw.
        ignore_eos: generate past EOS as the paper does (every response has exactly its length).
        top_k, top_p, temperature: rollout sampling (paper 0, 1.0, 1.0).
        eval_max_new_tokens: greedy decoding length at validation/test (paper 32).
        dtype: policy weights dtype ("float32", "bfloat16").
        reward_includes_prefix: rewards read the reference prefix that ends the query plus the continuation
            (the paper's "response"), rather than the continuation alone.
        reward_prompt_field: the batch field the rewards receive as their `prompts` (the context a reward model
            reads): "prompts" (the templated query), "instructions" (the question: the paper's QA/assistant RMs
            read "question [SEP] answer") or "inputs" (the article, for the summary RMs).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        rewards: list[RewardMetric] | None = None,
        reward_weights: list[float] | None = None,
        reward_normalization: str = "none",
        reward_mean: list[float] | None = None,
        reward_std: list[float] | None = None,
        lora_r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),  # type: ignore[assignment]
        init_adapter: str | None = None,
        lora_init_seed: int = 0,
        lr: float = 1.41e-5,
        ppo_epochs: int = 4,
        mini_batch_size: int = 4,
        init_kl_coef: float = 0.2,
        adaptive_kl: bool = True,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        max_grad_norm: float | None = None,
        whiten: str = "minibatch",
        advantage: str = "gae",
        rloo_k: int = 2,
        kl_reference: str = "init",
        response_length: tuple[int, int] = (16, 32),
        length_sampling: str = "batch",
        ignore_eos: bool = True,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        eval_max_new_tokens: int = 32,
        dtype: str = "float32",
        reward_includes_prefix: bool = True,
        reward_prompt_field: str = "prompts",
    ) -> None:
        super().__init__()
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
        fields = ("prompts", "instructions", "inputs")
        for arg, value, choices in (("whiten", whiten, ("minibatch", "batch")),
                                    ("advantage", advantage, ("gae", *CRITIC_FREE)),
                                    ("kl_reference", kl_reference, ("init", "base")),
                                    ("length_sampling", length_sampling, ("batch", "prompt")),
                                    ("reward_prompt_field", reward_prompt_field, fields)):
            if value not in choices:
                raise ValueError(f"{arg} must be one of {choices}, got {value!r}")
        if advantage == "rloo" and (not isinstance(rloo_k, int) or rloo_k < 2):
            raise ValueError(f"rloo_k must be an integer >= 2 with advantage 'rloo' (the baseline of a sample is the "
                             f"mean of the OTHER samples of its prompt), got {rloo_k!r}")
        self.objective = MixtureReward(
            {r.name: r for r in rewards}, list(reward_weights), normalization=reward_normalization,
            mean=reward_mean, std=reward_std, name="total",
        )
        self.reward_names = names
        self.val_means = nn.ModuleDict({n: MeanMetric() for n in [*names, "total"]})
        self.test_means = nn.ModuleDict({n: MeanMetric() for n in [*names, "total"]})
        self.kl_ctl = (
            rl.AdaptiveKLController(init_kl_coef, kl_target, kl_horizon) if adaptive_kl
            else rl.FixedKLController(init_kl_coef)
        )
        self.last_iteration: dict[str, Any] = {}  # texts, raw rewards and phase timings of the latest iteration
        self._build_policy()

    # -- model ----------------------------------------------------------------------------------------------

    def _build_policy(self) -> None:
        from rs_lightning.tasks.text.model_loading import load_causal_lm

        hp = self.hparams
        # "tiny-random" seeds torch to build its weights: keep the run's RNG stream (seed_everything) untouched.
        with torch.random.fork_rng(devices=[]):
            base, self.tokenizer = load_causal_lm(hp.model, dtype=hp.dtype)
        self.policy = pol.attach_lora(
            base, r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout, target_modules=hp.target_modules,
            init_adapter=hp.init_adapter, lora_init_seed=hp.lora_init_seed,
            frozen_reference=hp.kl_reference == "init",  # "base" disables the adapter instead: no copy to load
        )
        # Critic-free advantages use no value estimate: a value head there would still be trained (vf_coef x its
        # loss) and, reading the decoder's hidden states, push the LoRA with a loss the policy does not need.
        self.value_head = (None if hp.advantage in CRITIC_FREE
                           else pol.make_value_head(base.config.hidden_size, hp.lora_init_seed))
        self.policy.train()  # from_pretrained returns eval mode; rollouts switch to eval explicitly

    def configure_model(self) -> None:
        # Under FSDP the policy and value head (if any) are wrapped here, not the whole module: see tasks/text/fsdp.py.
        fsdp.shard_policy(self)

    def soup_state_dict(self) -> dict[str, Tensor]:
        """Live adapter tensors under PEFT's saved names: `rs front` interpolates expert adapters into these."""
        return live_adapter_state(self.policy)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr)

    # -- rollouts and rewards (training: training.py) --------------------------------------------------------

    def rollout(self, batch: dict[str, Any], *, greedy: bool, lengths: list[int], ignore_eos: bool,
                with_logprobs: bool = False) -> Rollout:
        """Responses of the current policy (eval mode) to a batch of left-padded queries; see `rollout.generate`
        (`with_logprobs`: the sampling pass's own log-probs of the response tokens)."""
        hp = self.hparams
        was_training = self.policy.training
        self.policy.eval()  # no dropout while sampling and scoring the behaviour policy
        try:
            with fsdp.generation_context(self.policy):
                return generate(
                    self.policy, self.tokenizer, batch["input_ids"], batch["attention_mask"], lengths, greedy=greedy,
                    top_k=hp.top_k, top_p=hp.top_p, temperature=hp.temperature, ignore_eos=ignore_eos,
                    with_logprobs=with_logprobs,
                )
        finally:
            self.policy.train(was_training)

    def reward_texts(self, batch: dict[str, Any], texts: list[str]) -> list[str]:
        """What the rewards read as the response: the reference prefix (if any) plus the continuation."""
        prefixes = batch.get("prefixes")
        if not self.hparams.reward_includes_prefix or not prefixes:
            return texts
        return [(p or "") + t for p, t in zip(prefixes, texts)]

    def score(self, batch: dict[str, Any], texts: list[str]) -> dict[str, Tensor]:
        """Raw scores {name: [B]} of every reward for the decoded continuations `texts` of `batch`."""
        contexts = batch.get(self.hparams.reward_prompt_field) or batch["prompts"]
        return self.objective.score_components(list(contexts), self.reward_texts(batch, texts),
                                               batch.get("references"))

    def fisher_log_likelihood(self, batch: dict[str, Any]) -> Tensor:
        """Per prompt `[B]`: log p(response | prompt) of one response sampled from the policy (the training
        sampler, `eval_max_new_tokens` tokens), differentiable in the trainable (LoRA) weights: what `rs fisher`
        squares and averages (rs_lightning.fisher). Eval mode: no dropout."""
        n = len(batch["prompts"])
        ro = self.rollout(batch, greedy=False, lengths=[self.hparams.eval_max_new_tokens] * n, ignore_eos=False)
        was_training = self.policy.training
        self.policy.eval()
        try:
            logprobs = response_forward(self.policy, None, ro)["logprobs"]
        finally:
            self.policy.train(was_training)
        return (logprobs * ro.response_mask.to(logprobs.dtype)).sum(1)

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
        lengths = [self.hparams.eval_max_new_tokens] * n
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
        ro = self.rollout(batch, greedy=True, lengths=[self.hparams.eval_max_new_tokens] * n, ignore_eos=False)
        components = self.score(batch, ro.texts)
        return list(ro.texts), {name: values.float().cpu().tolist() for name, values in components.items()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._evaluate(batch, self.val_means, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, dict[str, Tensor]]:
        return self._evaluate(batch, self.test_means, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        n = len(batch["prompts"])
        ro = self.rollout(batch, greedy=True, lengths=[self.hparams.eval_max_new_tokens] * n, ignore_eos=False)
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
                hint = (f" (value_head.*: a run with a value head, but advantage={self.hparams.advantage!r} builds "
                        "none; resume it with the advantage it was trained with)")
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
