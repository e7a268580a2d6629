"""Rollouts for PPO on text: sample responses, build their masks, and score them with one forward pass.

Layout of a batch: queries are LEFT-padded ([B, Tq], so every query ends at the same column) and
responses follow them ([B, Tr]). Response masks mark the real response tokens: with `ignore_eos` (the
paper) every one of the first `length_i` tokens is real; otherwise tokens after the first EOS are padding.
Masks never come from `ids == pad_token_id`: for SmolLM2 pad = eos = <|im_end|>.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rs_lightning.rl import entropy_from_logits, logprobs_from_logits


@dataclass
class Rollout:
    """One batch of sampled responses. Shapes: queries [B, Tq], responses [B, Tr]; `logprobs` [B, Tr]: the
    sampling policy's log-probabilities of the response tokens, from the generation's own logits (when asked)."""

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    texts: list[str]
    logprobs: Tensor | None = None


def repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """A collated prompt batch with each row k times in a row (rows p*k ... p*k + k - 1 are prompt p, the layout
    `rl.rloo_advantages` expects): tensors repeat along dim 0, per-row lists element by element."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.repeat_interleave(k, dim=0)
        elif isinstance(value, (list, tuple)):
            out[key] = [item for item in value for _ in range(k)]
        else:
            out[key] = value
    return out


def sample_lengths(low: int, high: int, n: int, generator: torch.Generator) -> list[int]:
    """`n` response lengths drawn uniformly from [low, high] (the paper's LengthSampler(16, 32))."""
    if not 1 <= low <= high:
        raise ValueError(f"response length range must satisfy 1 <= low <= high, got ({low}, {high})")
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def generation_config(tokenizer, max_new_tokens: int, *, greedy: bool, top_k: int, top_p: float,
                      temperature: float, ignore_eos: bool, with_logits: bool = False):
    from transformers import GenerationConfig

    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if with_logits:  # the raw (unprocessed) next-token logits of every step, before temperature/top-k/top-p
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    # An empty EOS list makes generate run to max_new_tokens (the paper's eos_token_id=-1, without the
    # warning); None would fall back to the model's own EOS.
    kwargs["eos_token_id"] = [] if ignore_eos else tokenizer.eos_token_id
    if greedy:
        return GenerationConfig(do_sample=False, **kwargs)
    return GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature, **kwargs)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, query_ids: Tensor, query_mask: Tensor, lengths: list[int], *,
             greedy: bool = False, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
             ignore_eos: bool = True, with_logprobs: bool = False) -> Rollout:
    """Sample (or decode greedily) up to max(lengths) tokens; response i keeps its first lengths[i] tokens.

    `with_logprobs`: also return log p(token) of every response token under the model as it sampled them (raw
    logits, no temperature: what `response_forward` computes with one more forward pass). The same weights in
    the same mode, so PPO's "old" log-probs need no second pass; they agree with that pass to float rounding
    (the KV-cached steps sum in another order). TRL's PPO and RLOO trainers take them from generation too."""
    config = generation_config(tokenizer, max(lengths), greedy=greedy, top_k=top_k, top_p=top_p,
                               temperature=temperature, ignore_eos=ignore_eos, with_logits=with_logprobs)
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=config)
    sequences = out.sequences if with_logprobs else out
    response = sequences[:, query_ids.shape[1]:]
    ro = _as_rollout(response, query_ids, query_mask, lengths, tokenizer, ignore_eos)
    if with_logprobs:
        logits = torch.stack(out.logits, dim=1)[:, : response.shape[1]].float()
        # Padding after an EOS holds the pad id, whose log-prob may be anything: zero it, as masks are used.
        ro.logprobs = torch.where(ro.response_mask.bool(), logprobs_from_logits(logits, response), 0.0)
    return ro


def _as_rollout(response: Tensor, query_ids: Tensor, query_mask: Tensor, lengths: list[int], tokenizer,
                ignore_eos: bool) -> Rollout:
    """Generated tokens -> Rollout: response i keeps its first lengths[i] tokens, up to and including its first
    EOS (unless `ignore_eos`); the rest is padding."""
    positions = torch.arange(response.shape[1], device=response.device)
    mask = positions[None, :] < torch.tensor(lengths, device=response.device)[:, None]
    if not ignore_eos and tokenizer.eos_token_id is not None:
        is_eos = (response == tokenizer.eos_token_id) & mask
        # Keep the first EOS as the last real token, drop what follows it.
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        mask &= ~after_eos
    mask = mask.long()
    response = response.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = [
        tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True) for ids, m in zip(response, mask)
    ]
    return Rollout(query_ids, query_mask, response, mask, texts)


@torch.no_grad()
def mixture_greedy(models: list[nn.Module], weights: list[float], tokenizer, query_ids: Tensor, query_mask: Tensor,
                   lengths: list[int], *, ignore_eos: bool = False) -> Rollout:
    """Greedy decoding of the token-level mixture sum_i w_i p_i(y_t | y_<t, x) of N causal LMs: functional
    ensembling, the prediction ensemble the rewarded-soups paper compares weight interpolation with (Ramé et al.
    2023, Lemma 4). One KV cache per member; each new token costs one forward pass of every member with w_i > 0.
    Left-padded queries get explicit positions (the first real token at 0), as `response_forward` gives them.
    """
    live = [(m, w) for m, w in zip(models, weights) if w > 0]
    if not live or any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"mixture weights must be >= 0 and sum to 1, got {list(weights)}")
    device = query_ids.device
    log_w = torch.log(torch.tensor([w for _, w in live], dtype=torch.float64, device=device))
    mask = query_mask.clone()
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    ids, caches = query_ids, [None] * len(live)
    done = torch.zeros(query_ids.shape[0], dtype=torch.bool, device=device)
    eos = None if ignore_eos else tokenizer.eos_token_id
    tokens = []
    for _ in range(max(lengths)):
        logps = []
        for j, (model, _) in enumerate(live):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=caches[j],
                        use_cache=True, logits_to_keep=1)
            caches[j] = out.past_key_values
            logps.append(torch.log_softmax(out.logits[:, -1].double(), dim=-1))
        token = torch.logsumexp(torch.stack(logps) + log_w[:, None, None], dim=0).argmax(-1)
        token = torch.where(done, torch.full_like(token, tokenizer.pad_token_id), token)
        tokens.append(token)
        if eos is not None:
            done = done | (token == eos)
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return _as_rollout(torch.stack(tokens, 1), query_ids, query_mask, lengths, tokenizer, ignore_eos)


def response_forward(model: nn.Module, value_head: nn.Module | None, rollout: Rollout, *,
                     with_entropy: bool = False) -> dict[str, Tensor]:
    """Log-probabilities [B, Tr] of the response tokens (and values, entropy) in one forward pass."""
    ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1)
    # Explicit positions: with left padding the first real token must sit at position 0.
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    t_resp = rollout.response_ids.shape[1]
    captured: dict[str, Tensor] = {}
    hook = None
    if value_head is not None:
        # The value head reads the decoder's last hidden state, caught by a hook rather than through
        # `output_hidden_states`: transformers 5 records hidden states through a per-class registry filled when a
        # model is constructed, so a model unpickled in a ddp_spawn worker returns hidden_states=None. The hook
        # also avoids keeping every layer's states alive.
        hook = decoder_of(model).register_forward_hook(_keep_last_hidden(captured))
    try:
        # logits_to_keep: only the last t_resp + 1 positions go through the LM head (a 49k-word head on the
        # prompt tokens too would cost more than the rest of the model for a 135M model).
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=t_resp + 1)
    finally:
        if hook is not None:
            hook.remove()
    # Position t predicts token t + 1: the logits for the response come from the token before each one.
    logits = out.logits[:, -t_resp - 1 : -1].float()
    result = {"logprobs": logprobs_from_logits(logits, rollout.response_ids)}
    if value_head is not None:
        result["values"] = value_head(captured["hidden"][:, -t_resp - 1 : -1])
    if with_entropy:
        result["entropy"] = entropy_from_logits(logits)
    return result


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a (PEFT-wrapped) causal LM: its output is the last hidden state [B, T, H]."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _keep_last_hidden(store: dict[str, Tensor]):
    def hook(module: nn.Module, args, output) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    return hook


class PhaseClock:
    """Wall time of the phases of one PPO iteration: `laps` maps phase name -> seconds since the previous lap."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
