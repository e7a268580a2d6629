"""The settings of `TextPPOModule` in typed groups: `lora`, `ppo`, `kl`, `rollout`, `scoring`.

Each group is a dataclass, so LightningCLI (jsonargparse) shows it as nested keys with the field docs of its
"Args:" section in `--help` (`--model.init_args.ppo.lr`, or in YAML `ppo: {lr: 5.0e-4}`: the fields not given keep
their defaults). Defaults are the module's own; the paper's values (TRL 0.4, LLaMA-7B runs) are noted where they
differ. Each group checks its choices in `__post_init__`, naming the key as a config writes it (`model.ppo.advantage`).

Python callers may give a group as its dataclass, as a plain dict of some of its fields, or leave it out:
`coerce` turns any of them into the dataclass and refuses an unknown key, naming it and the group's fields.
`upgrade_flat_keys` rewrites the flat keys of configs written before the groups (`lora_r: 8` -> `lora: {r: 8}`),
so the `rs front` runs made then can still be served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rs_lightning.tasks import settings_groups as groups
from rs_lightning.tasks.settings_groups import check_choice as _check_choice
from rs_lightning.tasks.settings_groups import set_field as _set

CRITIC_FREE = ("sequence", "rloo")  # advantages without a value head
ADVANTAGES = ("gae", *CRITIC_FREE)
PROMPT_FIELDS = ("prompts", "instructions", "inputs")


@dataclass(frozen=True)
class LoraSettings:
    """The trainable LoRA of the policy (config key `model.lora`).

    Args:
        r: LoRA rank (paper 16).
        alpha: LoRA scaling alpha (paper 16).
        dropout: dropout on the LoRA input (paper 0.05).
        target_modules: the modules that get a LoRA (paper q_proj, k_proj, v_proj, o_proj).
        init_adapter: start from this PEFT adapter (a folder) instead of a fresh LoRA (the paper's SFT LoRA).
        init_seed: seed of a fresh LoRA and of the value head, independent of seed_everything: every run of an
            experiment shares it, so every expert starts from the same theta_0 and their soups are meaningful.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    init_adapter: str | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            raise ValueError(f"model.lora.target_modules must be a list of module names, got {self.target_modules!r}")
        _set(self, "target_modules", list(self.target_modules))


@dataclass(frozen=True)
class PPOSettings:
    """The PPO update (config key `model.ppo`).

    Args:
        lr: Adam learning rate (paper 1.41e-5).
        epochs: passes of PPO over each iteration's batch (paper 4).
        mini_batch_size: responses per PPO mini-batch (paper 4).
        advantage: "gae" (the paper: GAE with a learned value head), or critic-free (no value head, one advantage
            per response on all its tokens, PPO-clip policy loss): "sequence", z(R_i) - beta (KL_i - mean KL), a
            batch baseline (rl/sequence.py); "rloo", R_i - beta KL_i minus the mean of the other rloo_k - 1
            samples of the same prompt (rl/rloo.py). Both learn from the first iteration (short CPU runs).
        rloo_k: samples per prompt for "rloo" (>= 2): each training batch of B prompts yields B * rloo_k responses.
        gamma: GAE discount (paper 1).
        gae_lambda: GAE lambda (paper 0.95; `lam` is only ever the soup weight).
        cliprange: PPO clip range of the policy ratio (paper 0.2).
        cliprange_value: clip range of the value loss (paper 0.2; GAE only).
        vf_coef: weight of the value loss (paper 0.1; GAE only).
        max_grad_norm: gradient clipping norm (None: off, as TRL 0.4).
        whiten: where GAE advantages are whitened: "minibatch" (TRL 0.4, the paper) or "batch".
    """

    lr: float = 1.41e-5
    epochs: int = 4
    mini_batch_size: int = 4
    advantage: str = "gae"
    rloo_k: int = 2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float | None = None
    whiten: str = "minibatch"

    def __post_init__(self) -> None:
        _check_choice("model.ppo.advantage", self.advantage, ADVANTAGES)
        _check_choice("model.ppo.whiten", self.whiten, ("minibatch", "batch"))
        if self.advantage == "rloo" and (isinstance(self.rloo_k, bool) or not isinstance(self.rloo_k, int)
                                         or self.rloo_k < 2):
            raise ValueError(f"model.ppo.rloo_k must be an integer >= 2 with advantage 'rloo' (the baseline of a "
                             f"sample is the mean of the OTHER samples of its prompt), got {self.rloo_k!r}")

    @property
    def critic_free(self) -> bool:
        """True for the advantages that use no value head ("sequence", "rloo")."""
        return self.advantage in CRITIC_FREE


@dataclass(frozen=True)
class KLSettings:
    """The KL penalty to a reference policy (config key `model.kl`).

    Args:
        init_coef: initial KL coefficient beta (paper 0.2; 0.05 for the summaries).
        adaptive: adapt beta towards `target` (TRL's adaptive controller, the paper) rather than keep it fixed.
        target: the adaptive controller's KL target (paper 6).
        horizon: the adaptive controller's horizon (paper 10000).
        reference: "init" (default): the KL reference is the policy's starting point, i.e. a frozen copy of
            `model.lora.init_adapter`; "base": the base model with the adapter disabled, what the paper's TRL 0.4
            did for a PEFT policy (see policy.py). The same thing for a fresh LoRA.
    """

    init_coef: float = 0.2
    adaptive: bool = True
    target: float = 6.0
    horizon: int = 10000
    reference: str = "init"

    def __post_init__(self) -> None:
        _check_choice("model.kl.reference", self.reference, ("init", "base"))


@dataclass(frozen=True)
class RolloutSettings:
    """How responses are generated, in training and in evaluation (config key `model.rollout`).

    Args:
        response_length: (low, high) of max_new_tokens in training, drawn uniformly (paper 16..32).
        length_sampling: "batch" (one length per batch) or "prompt" (one per prompt: the paper's loop drew TRL's
            LengthSampler per query). With "rloo" the k samples of a prompt share its draw.
        ignore_eos: generate past EOS in training as the paper does (every response has exactly its length).
        top_k: training sampling top-k (paper 0: off).
        top_p: training sampling top-p (paper 1.0: off).
        temperature: training sampling temperature (paper 1.0).
        eval_max_new_tokens: greedy decoding length at validation/test/predict, and the sampled length of
            `rs fisher` (paper 32).
    """

    response_length: tuple[int, int] = (16, 32)
    length_sampling: str = "batch"
    ignore_eos: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    eval_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        _check_choice("model.rollout.length_sampling", self.length_sampling, ("batch", "prompt"))
        length = self.response_length
        if isinstance(length, str) or len(length) != 2 or not 0 < int(length[0]) <= int(length[1]):
            raise ValueError(f"model.rollout.response_length must be [low, high] with 0 < low <= high, got {length!r}")
        _set(self, "response_length", (int(length[0]), int(length[1])))


@dataclass(frozen=True)
class ScoringSettings:
    """How the rewards read a response and how their scores are normalised (config key `model.scoring`).

    Args:
        normalization: "none" (the paper: raw scores), "running" (z-score with running statistics) or "fixed"
            (z-score with `mean` and `std`).
        mean: per-reward means for "fixed", aligned with `model.rewards`.
        std: per-reward standard deviations for "fixed", aligned with `model.rewards`.
        includes_prefix: the rewards read the reference prefix that ends the query plus the continuation (the
            paper's "response"), rather than the continuation alone.
        prompt_field: the batch field the rewards receive as their `prompts` (the context a reward model reads):
            "prompts" (the templated query), "instructions" (the question: the paper's QA/assistant RMs read
            "question [SEP] answer") or "inputs" (the article, for the summary RMs).
    """

    normalization: str = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    includes_prefix: bool = True
    prompt_field: str = "prompts"

    def __post_init__(self) -> None:
        _check_choice("model.scoring.normalization", self.normalization, ("none", "running", "fixed"))
        _check_choice("model.scoring.prompt_field", self.prompt_field, PROMPT_FIELDS)


GROUPS: dict[str, type] = {"lora": LoraSettings, "ppo": PPOSettings, "kl": KLSettings, "rollout": RolloutSettings,
                           "scoring": ScoringSettings}


@dataclass(frozen=True)
class TextSettings:
    """Every group of one `TextPPOModule`, as it reads them (`module.settings.ppo.lr`)."""

    lora: LoraSettings
    ppo: PPOSettings
    kl: KLSettings
    rollout: RolloutSettings
    scoring: ScoringSettings


def coerce(group: str, value: Any) -> Any:
    """The dataclass of `group` from an instance of it, a dict of some of its fields, or None (settings_groups.py)."""
    return groups.coerce(GROUPS, group, value)


as_dict = groups.as_dict


# The flat init args of TextPPOModule before the groups, and where each one lives now.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "target_modules": ("lora", "target_modules"), "init_adapter": ("lora", "init_adapter"),
    "lora_init_seed": ("lora", "init_seed"),
    "lr": ("ppo", "lr"), "ppo_epochs": ("ppo", "epochs"), "mini_batch_size": ("ppo", "mini_batch_size"),
    "advantage": ("ppo", "advantage"), "rloo_k": ("ppo", "rloo_k"), "gamma": ("ppo", "gamma"),
    "gae_lambda": ("ppo", "gae_lambda"), "cliprange": ("ppo", "cliprange"),
    "cliprange_value": ("ppo", "cliprange_value"), "vf_coef": ("ppo", "vf_coef"),
    "max_grad_norm": ("ppo", "max_grad_norm"), "whiten": ("ppo", "whiten"),
    "init_kl_coef": ("kl", "init_coef"), "adaptive_kl": ("kl", "adaptive"), "kl_target": ("kl", "target"),
    "kl_horizon": ("kl", "horizon"), "kl_reference": ("kl", "reference"),
    "response_length": ("rollout", "response_length"), "length_sampling": ("rollout", "length_sampling"),
    "ignore_eos": ("rollout", "ignore_eos"), "top_k": ("rollout", "top_k"), "top_p": ("rollout", "top_p"),
    "temperature": ("rollout", "temperature"), "eval_max_new_tokens": ("rollout", "eval_max_new_tokens"),
    "reward_normalization": ("scoring", "normalization"), "reward_mean": ("scoring", "mean"),
    "reward_std": ("scoring", "std"), "reward_includes_prefix": ("scoring", "includes_prefix"),
    "reward_prompt_field": ("scoring", "prompt_field"),
}


def upgrade_flat_keys(init_args: dict[str, Any]) -> dict[str, Any]:
    """TextPPOModule init args with the flat keys of before the groups moved into them (settings_groups.py)."""
    return groups.upgrade_flat_keys(FLAT_KEYS, init_args)
