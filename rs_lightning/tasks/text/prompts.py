"""Prompt templates for the text tasks and the paper's reference-prefix trick.

Two templates, picked by `template`:
- "alpaca": the paper's one-line Alpaca format,
  `### Instruction: {instruction} ### Input: {input} ### Response: ` (the Input part dropped without an input);
- "chat": the model's own chat template, one user turn (instruction, then a blank line and the input if any)
  rendered with `apply_chat_template(..., add_generation_prompt=True, tokenize=False)`.

The query the policy sees is the template followed by the first n tokens of the human reference, n drawn from
[2, 7] (inclusive) per example, so the policy continues a human-written start (paper §2.4, TRL LengthSampler(2, 8)).
The draw is seeded by (seed, example id), so it does not depend on the order or the subset of the examples.
"""

from __future__ import annotations

import random
from typing import Any

TEMPLATES = ("alpaca", "chat")
RESPONSE_SPLIT = "### Response:"
INPUT_SPLIT = "### Input:"
INSTRUCTION_SPLIT = "### Instruction:"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The paper's Alpaca template on one line; ends with "### Response: " (trailing space)."""
    if input:
        return f"### Instruction: {instruction} ### Input: {input} ### Response: "
    return f"### Instruction: {instruction} ### Response: "


def chat_prompt(tokenizer: Any, instruction: str, input: str = "") -> str:
    """One user turn in the tokenizer's chat template, with the assistant generation prompt opened.

    Raises:
        ValueError: the tokenizer has no chat template (base models): use template="alpaca".
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "use template='alpaca'")
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def format_prompt(instruction: str, input: str = "", *, template: str = "alpaca", tokenizer: Any = None) -> str:
    """Render `instruction` (and `input`) with `template` ("alpaca" or "chat"; "chat" needs `tokenizer`)."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    if template == "chat":
        if tokenizer is None:
            raise ValueError("template='chat' needs a tokenizer")
        return chat_prompt(tokenizer, instruction, input)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def check_prefix_range(prefix_tokens: tuple[int, int] | list[int]) -> tuple[int, int]:
    """Validate an inclusive (low, high) range of prefix lengths; (0, 0) disables the prefix."""
    if len(prefix_tokens) != 2:
        raise ValueError(f"prefix_tokens must be (low, high), got {prefix_tokens!r}")
    low, high = int(prefix_tokens[0]), int(prefix_tokens[1])
    if not 0 <= low <= high:
        raise ValueError(f"prefix_tokens must satisfy 0 <= low <= high, got {prefix_tokens!r}")
    return low, high


def sample_prefix_length(example_id: str, seed: int, prefix_tokens: tuple[int, int] = (2, 7)) -> int:
    """Number of reference tokens to prepend for one example, uniform on the inclusive range.

    A per-example RNG seeded by the string "{seed}:{example_id}" (hashed with SHA-512 by `random`, so stable
    across processes and PYTHONHASHSEED) keeps the draw independent of example order and subset.
    """
    low, high = check_prefix_range(prefix_tokens)
    if high == 0:
        return 0
    return random.Random(f"{seed}:{example_id}").randint(low, high)


def reference_prefix(reference: str, tokenizer: Any, n: int) -> str:
    """The text of the first `n` tokens of `reference` under `tokenizer` ("" for n = 0).

    A cut inside a multi-byte character decodes to U+FFFD; those trailing replacement characters are dropped.
    """
    if n <= 0 or not reference:
        return ""
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"][:n]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip("\ufffd")


def build_query(
    example: dict,
    *,
    template: str = "alpaca",
    tokenizer: Any = None,
    prefix_tokens: tuple[int, int] = (2, 7),
    seed: int = 0,
) -> tuple[str, str]:
    """The query text for one example: template + the reference prefix.

    Args:
        example: a dict with "id", "instruction", "reference", optionally "input" and "prefix_source" (the
            text the prefix is cut from when it differs from the reference, e.g. the news summaries with "."
            replaced by "," as in the paper).
        template: "alpaca" or "chat".
        tokenizer: the policy's tokenizer (needed for "chat" and for any non-empty prefix).
        prefix_tokens: inclusive range of the prefix length in tokens; (0, 0) disables it.
        seed: seeds the per-example prefix length.

    Returns:
        (query, prefix): the full query and the prefix part alone (the start of the policy's "response").
    """
    prompt = format_prompt(example["instruction"], example.get("input", "") or "", template=template,
                           tokenizer=tokenizer)
    n = sample_prefix_length(str(example["id"]), seed, prefix_tokens)
    if n and tokenizer is None:
        raise ValueError("a reference prefix needs the tokenizer; pass tokenizer= or prefix_tokens=(0, 0)")
    source = example.get("prefix_source") or example.get("reference", "")
    prefix = reference_prefix(source, tokenizer, n)
    return prompt + prefix, prefix


def split_alpaca(text: str) -> tuple[str, str]:
    """Recover (input, response) from a decoded Alpaca query + generation, as the paper's evaluation does.

    The input is the text between "### Input:" and "### Response:" ("" without an input); the response is
    everything after "### Response:". Both stripped.
    """
    after_input = text.split(INPUT_SPLIT, 1)[1] if INPUT_SPLIT in text else ""
    input_text = after_input.split(RESPONSE_SPLIT, 1)[0].strip()
    response = text.split(RESPONSE_SPLIT, 1)[1].strip() if RESPONSE_SPLIT in text else ""
    return input_text, response
