"""Rewards from Hugging Face sequence-classification models: the paper's reward models (RMs), as RewardMetrics.

The paper ran each RM through ``pipeline("text-classification", function_to_apply="none")`` and used raw
logits: ``"k"`` is logit k, ``"a-b"`` is logit a minus logit b (``--reward_formats``). This module does the
same with a plain batched forward: the RM's own tokenizer pads on the right with a real pad token (the
paper's summary code padded the RMs with the LLaMA EOS id, a quirk not reproduced), eval mode, no grad.

Input formats (what text the RM reads; ``context`` is the prompt or the reference, see ``context``):

- ``"response"``: the response alone.
- ``"prompt_sep_response"``: ``question [SEP] answer``, the tokenizer's pair encoding of (context, response),
  as the OpenAssistant RMs were trained (``tokenizer(question, answer)``). The paper built one string
  ``question + sep_token + answer`` instead; for DeBERTa-v3 (no token types) the ids are the same, for
  ELECTRA the pair encoding also sets token type 1 on the answer, as in the RM's training.
- ``"summary_article"``: summary first, article second: the pair encoding (BART: ``<s>S</s></s>A</s>``, the
  CogComp detector's format). Tokenizers without a pair template (GPT-2) need ``pair_separator``, e.g.
  ``" {bos} "`` gives the paper's ``summary <|endoftext|> article`` for ``Tristan/gpt2_reward_summarization``.

``first_sentence=True`` keeps ``response.split(".")[0] + "."`` (the paper's summary RMs score only the first
sentence). Pairs are truncated ``longest_first`` to ``max_length``, so a long article loses its tail first.
"""

from __future__ import annotations

import inspect
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rs_lightning.rewards.base import HeldObject, TextRewardMetric

__all__ = ["PAPER_REWARD_MODELS", "TextClassifierReward", "first_sentence", "parse_output"]

InputFormat = Literal["response", "prompt_sep_response", "summary_article"]
_INPUT_FORMATS = ("response", "prompt_sep_response", "summary_article")
_OUTPUT_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

_SUMMARY = {"input_format": "summary_article", "first_sentence": True}
_QA = {"output": "0", "input_format": "prompt_sep_response"}
#: The paper's reward models (its Appendix; public code github.com/alexrame/rewardedsoups) and how they were
#: fed. ``context`` is our addition: the
#: task must pass the plain question/article (not the templated prompt) as ``prompts`` for these settings.
PAPER_REWARD_MODELS: dict[str, dict[str, Any]] = {
    # GPT-2 RM, one logit LABEL_0; input "summary <|endoftext|> article" (the paper used the BOS token, which is
    # GPT-2's <|endoftext|>, between spaces).
    "Tristan/gpt2_reward_summarization": {"output": "0", "pair_separator": " {bos} ", **_SUMMARY},
    # BART, labels 0 HALLUCINATED / 1 FAITHFUL; input "summary </s></s> article" (summary first, per the card).
    "CogComp/bart-faithful-summary-detector": {"output": "1-0", **_SUMMARY},
    # OpenAssistant RMs (one logit): "question [SEP] answer".
    "OpenAssistant/reward-model-deberta-v3-base": dict(_QA),
    "OpenAssistant/reward-model-electra-large-discriminator": dict(_QA),
    "OpenAssistant/reward-model-deberta-v3-large-v2": dict(_QA),
    "theblackcat102/reward-model-deberta-v3-base-v2": dict(_QA),
}


def parse_output(spec: str) -> tuple[int, int | None]:
    """Parse an output spec: ``"i"`` -> logit i; ``"i-j"`` -> logit i minus logit j.

    Returns:
        ``(i, j)`` with ``j = None`` for the single-logit form.

    Raises:
        ValueError: naming the spec when it is neither form.
    """
    match = _OUTPUT_RE.match(str(spec))
    if match is None:
        raise ValueError(
            f"invalid reward output spec {spec!r}: expected 'i' (logit i) or 'i-j' (logit i minus logit j), "
            "e.g. '0' or '1-0'"
        )
    return int(match[1]), None if match[2] is None else int(match[2])


def first_sentence(text: str) -> str:
    """The paper's summary transform: the text up to its first ``"."``, with the period (added if absent)."""
    return text.split(".")[0] + "."


def _looks_like_path(model: str) -> bool:
    # An HF id is "name" or "org/name"; anything absolute, relative-dotted, home-based or deeper is a path.
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


def _format_separator(template: str, tokenizer: Any) -> str:
    """Fill ``{bos}``/``{eos}``/``{sep}``/``{cls}`` in ``template`` with the tokenizer's special tokens."""
    specials = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "sep": tokenizer.sep_token}
    specials["cls"] = tokenizer.cls_token
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if field not in specials:
            raise ValueError(f"pair_separator {template!r}: unknown placeholder {{{field}}}; use bos, eos, sep, cls")
        if specials[field] is None:
            raise ValueError(f"pair_separator {template!r}: the tokenizer has no {field} token")
    return template.format(**specials)


@dataclass
class _Loaded:
    tokenizer: Any
    model: torch.nn.Module
    forward_keys: frozenset[str]
    max_length: int


class TextClassifierReward(TextRewardMetric):
    """Raw logits (or a logit difference) of a sequence-classification reward model.

    Args:
        model: HF model id or local directory (loaded lazily with ``AutoModelForSequenceClassification``).
        output: ``"i"`` (logit i) or ``"i-j"`` (logit i minus logit j); checked against ``num_labels`` on load.
        input_format: ``"response"``, ``"prompt_sep_response"`` or ``"summary_article"`` (module docstring).
        context: where the question/article comes from: ``"prompt"`` (the ``prompts`` argument, which must then
            be the plain question/article text) or ``"reference"`` (the ``references`` argument).
        first_sentence: score only the response's first sentence (paper's summary RMs).
        pair_separator: join the pair into ONE string with this separator instead of the tokenizer's pair
            encoding; ``{bos}``, ``{eos}``, ``{sep}``, ``{cls}`` are replaced by the tokenizer's special tokens.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (capped by the tokenizer's ``model_max_length``).
        reward_device: device for the RM; ``None`` follows the metric's device (``metric.to(...)``).
        model_dtype: RM weights dtype name (``"bfloat16"``, ...); ``None`` keeps the checkpoint's default. Scores are
            always returned as float32.
        name: log name; defaults to the model's last path component.
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        model: str,
        output: str = "0",
        input_format: InputFormat = "response",
        context: Literal["prompt", "reference"] = "prompt",
        first_sentence: bool = False,
        pair_separator: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
        reward_device: str | None = None,
        model_dtype: str | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name or os.path.basename(os.path.normpath(model)), **kwargs)
        self.output_index = parse_output(output)
        if input_format not in _INPUT_FORMATS:
            raise ValueError(f"unknown input_format {input_format!r}; expected one of {_INPUT_FORMATS}")
        if context not in ("prompt", "reference"):
            raise ValueError(f"unknown context {context!r}; expected 'prompt' or 'reference'")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
        if model_dtype is not None and not isinstance(getattr(torch, model_dtype, None), torch.dtype):
            raise ValueError(f"unknown model_dtype {model_dtype!r}; expected a torch dtype name such as 'bfloat16'")
        self.model_name = model
        self.output = output
        self.input_format = input_format
        self.context = context
        self.first_sentence = first_sentence
        self.pair_separator = pair_separator
        self.batch_size = batch_size
        self.max_length = max_length
        self.reward_device = reward_device
        self.model_dtype = model_dtype
        self._held = HeldObject()

    @classmethod
    def from_paper(cls, model: str, **overrides: Any) -> TextClassifierReward:
        """Build one of :data:`PAPER_REWARD_MODELS` with the paper's settings (``overrides`` win)."""
        if model not in PAPER_REWARD_MODELS:
            raise KeyError(f"{model!r} is not a paper reward model; known: {sorted(PAPER_REWARD_MODELS)}")
        return cls(model=model, **{**PAPER_REWARD_MODELS[model], **overrides})

    # -- loading ----------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load tokenizer and model (once); validate the output spec against the model's ``num_labels``."""
        if self._held.value is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = os.path.expanduser(self.model_name)
        if not os.path.isdir(source) and _looks_like_path(self.model_name):
            raise FileNotFoundError(f"reward model directory {self.model_name!r} does not exist")
        load_kwargs = {} if self.model_dtype is None else {"dtype": getattr(torch, self.model_dtype)}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForSequenceClassification.from_pretrained(source, **load_kwargs)
        except OSError as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "0")
            raise OSError(
                f"could not load reward model {self.model_name!r} (not a local directory; HF_HUB_OFFLINE={offline}): "
                f"{err}"
            ) from err
        num_labels = model.config.num_labels
        if any(i is not None and i >= num_labels for i in self.output_index):
            raise ValueError(
                f"reward output spec {self.output!r} needs a logit index below num_labels={num_labels} "
                f"of {self.model_name!r}"
            )
        # Classifiers pool the first token or (GPT-2) the last non-pad one: right padding with a real pad id.
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"tokenizer of {self.model_name!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False)
        cap = tokenizer.model_max_length if tokenizer.model_max_length < 10**8 else self.max_length
        forward_keys = frozenset(inspect.signature(model.forward).parameters)
        self._held.value = _Loaded(tokenizer, model, forward_keys, min(self.max_length, cap))

    def _ready(self) -> _Loaded:
        self.load()
        loaded: _Loaded = self._held.value
        device = self._reward_device(self.reward_device)
        if next(loaded.model.parameters()).device != device:
            loaded.model.to(device)
        return loaded

    # -- scoring ----------------------------------------------------------------------------------------------

    def _texts(
        self, loaded: _Loaded, prompts: list[str], responses: list[str], references: list[str] | None
    ) -> tuple[list[str], list[str] | None]:
        """The RM's input texts: ``(first, second)`` for pair encoding, or ``(joined, None)``."""
        if self.first_sentence:
            responses = [first_sentence(r) for r in responses]
        if self.input_format == "response":
            return responses, None
        if self.context == "reference":
            if references is None:
                raise ValueError(f"reward {self.name!r} reads the references (context='reference'), none given")
            contexts = references
        else:
            contexts = prompts
        first, second = (contexts, responses) if self.input_format == "prompt_sep_response" else (responses, contexts)
        if self.pair_separator is None:
            return first, second
        sep = _format_separator(self.pair_separator, loaded.tokenizer)
        return [a + sep + b for a, b in zip(first, second)], None

    def _score(self, prompts: list[str], responses: list[str], references: list[str] | None) -> Tensor:
        loaded = self._ready()
        first, second = self._texts(loaded, prompts, responses, references)
        device = next(loaded.model.parameters()).device
        pos, neg = self.output_index
        scores = []
        for start in range(0, len(first), self.batch_size):
            stop = start + self.batch_size
            enc = loaded.tokenizer(
                first[start:stop],
                None if second is None else second[start:stop],
                padding=True,
                truncation="longest_first",
                max_length=loaded.max_length,
                return_tensors="pt",
            )
            # Some tokenizers emit inputs the model does not take (token_type_ids for BART); drop them.
            inputs = {k: v.to(device) for k, v in enc.items() if k in loaded.forward_keys}
            logits = loaded.model(**inputs).logits.float()
            scores.append(logits[:, pos] if neg is None else logits[:, pos] - logits[:, neg])
        return torch.cat(scores)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, model={self.model_name!r}, output={self.output!r}, input={self.input_format!r}"
