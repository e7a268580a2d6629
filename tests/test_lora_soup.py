"""LoRA soups ("factors" and "delta") and merge_lora_into_base, checked against PEFT on tiny random models.

References are built independently of the code under test: "factors" against LoRA tensors set by hand,
"delta" against sum_i w_i merge_and_unload(expert_i), which is theta0 + sum_i w_i dW_i with PEFT's own
scaling and fan_in_fan_out handling.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rs_lightning.soup.errors import SoupError
from rs_lightning.soup.lora import (
    LoraAdapter,
    is_peft_adapter_dir,
    load_adapter,
    lora_soup,
    merge_lora_into_base,
    save_adapter,
)

TOKENS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def llama():
    torch.manual_seed(0)  # the same theta0 every time: experts must share their init
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


def make_expert(base_fn, folder, seed, **lora_kwargs):
    """Train-free expert: random A and B (init_lora_weights=False), saved by PEFT and loaded back.

    Returns the loaded adapter and the expert merged into its base (PEFT's merge_and_unload).
    """
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | lora_kwargs
    base = base_fn()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():  # B (and modules_to_save copies) random so every module moves the logits
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    return load_adapter(folder), merged


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def load_soup(base_fn, soup, folder):
    save_adapter(soup, folder)
    return PeftModel.from_pretrained(base_fn(), folder).eval()


def from_state(base_fn, state):
    model = base_fn()
    model.load_state_dict(state, strict=True)
    return model


def weighted(states, ws):
    return {k: sum(w * s[k].double() for w, s in zip(ws, states)).float() for k in states[0]}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two Llama experts with the same structure (r=4, alpha=8): the factors setting."""
    root = tmp_path_factory.mktemp("llama")
    return [make_expert(llama, root / f"e{i}", seed=10 + i) for i in range(2)]


@pytest.fixture(scope="module")
def mixed_experts(tmp_path_factory):
    """Three Llama experts with different ranks, alphas, rsLoRA and a rank/alpha pattern: delta only."""
    root = tmp_path_factory.mktemp("mixed")
    ranks, alphas = {"layers.0.self_attn.q_proj": 5}, {"layers.0.self_attn.q_proj": 7}
    return [
        make_expert(llama, root / "e0", seed=20),
        make_expert(llama, root / "e1", seed=21, r=2, lora_alpha=3, rank_pattern=ranks, alpha_pattern=alphas),
        make_expert(llama, root / "e2", seed=22, r=3, lora_alpha=5, use_rslora=True),
    ]


def test_factors_is_weighted_sum_of_factors(experts):
    (a0, _), (a1, _) = experts
    soup = lora_soup([a0, a1], [0.3, 0.7])
    assert soup.config == a0.config
    assert soup.state_dict.keys() == a0.state_dict.keys()
    for k, t in soup.state_dict.items():
        torch.testing.assert_close(t, 0.3 * a0.state_dict[k] + 0.7 * a1.state_dict[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["factors", "delta"])
def test_one_hot_reproduces_the_expert(experts, mode):
    (a0, _), (a1, _) = experts
    for ws, ref in (([1.0, 0.0], a0), ([0.0, 1.0], a1)):
        soup = lora_soup([a0, a1], ws, mode=mode)
        if mode == "factors":  # bit for bit
            assert all(torch.equal(soup.state_dict[k], ref.state_dict[k]) for k in ref.state_dict)
        else:  # rank 4 + 4: this expert's block is (A, s B) with s = 8 / 4, the other's B block is zero
            assert soup.config["r"] == soup.config["lora_alpha"] == 8
            mine = slice(0, 4) if ws[0] else slice(4, 8)
            other = slice(4, 8) if ws[0] else slice(0, 4)
            for k, t in soup.state_dict.items():
                if ".lora_A." in k:
                    assert torch.equal(t[mine], ref.state_dict[k])
                else:
                    assert torch.equal(t[:, mine], 2 * ref.state_dict[k]) and not t[:, other].any()


def test_factors_soup_loads_in_peft(experts, tmp_path):
    (a0, _), (a1, _) = experts
    ws = [0.25, 0.75]
    loaded = load_soup(llama, lora_soup([a0, a1], ws), tmp_path / "soup")
    by_hand = get_peft_model(
        llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ).eval()
    n_set = 0
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            if "lora_" in name:
                key = name.replace(".default", "")
                p.copy_(ws[0] * a0.state_dict[key] + ws[1] * a1.state_dict[key])
                n_set += 1
    assert n_set == len(a0.state_dict) == 8
    torch.testing.assert_close(logits(loaded), logits(by_hand), rtol=0, atol=1e-6)


def test_delta_soup_is_exact_weight_interpolation(mixed_experts, tmp_path):
    adapters, merged = zip(*mixed_experts)
    ws = [0.2, 0.5, 0.3]
    soup = lora_soup(adapters, ws, mode="delta")
    key = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.weight"
    assert (
        soup.state_dict[key.format(1)].shape[0] == soup.config["r"] == soup.config["lora_alpha"] == 4 + 2 + 3
    )
    # layer 0's q_proj has rank 5 in expert 1: its total rank 4 + 5 + 3 goes in rank/alpha patterns
    assert soup.state_dict[key.format(0)].shape[0] == 12
    assert list(soup.config["rank_pattern"].values()) == list(soup.config["alpha_pattern"].values()) == [12]
    assert soup.config["use_rslora"] is False
    loaded = load_soup(llama, soup, tmp_path / "soup")
    reference = from_state(llama, weighted(merged, ws))
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=0, atol=1e-5)
    # the same soup folded into the base weights
    merged_sd = merge_lora_into_base(llama().state_dict(), adapters, ws)
    torch.testing.assert_close(logits(from_state(llama, merged_sd)), logits(reference), rtol=0, atol=1e-5)


def test_merge_into_gpt2_respects_fan_in_fan_out(tmp_path):
    targets = {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    experts = [make_expert(gpt2, tmp_path / f"e{i}", seed=30 + i, r=2 + 2 * i, **targets) for i in range(2)]
    adapters, merged = zip(*experts)
    ws = [0.6, 0.4]
    base_sd = gpt2().state_dict()
    out = merge_lora_into_base(base_sd, adapters, ws)
    assert out.keys() == base_sd.keys()
    reference = weighted(merged, ws)
    changed = [k for k in out if not torch.equal(out[k], base_sd[k])]
    assert changed and all(".c_attn." in k or ".c_proj." in k for k in changed)
    for k in out:
        torch.testing.assert_close(out[k], reference[k], rtol=0, atol=1e-6)
    soup = load_soup(gpt2, lora_soup(adapters, ws, mode="delta"), tmp_path / "soup")
    torch.testing.assert_close(logits(soup), logits(from_state(gpt2, out)), rtol=0, atol=1e-5)


def test_delta_with_embedding_lora_and_modules_to_save(tmp_path):
    # PEFT saves the embedding's base layer and the lm_head copy as full tensors: averaged linearly.
    kw = {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]}
    experts = [make_expert(llama, tmp_path / f"e{i}", seed=40 + i, r=2 + i, **kw) for i in range(2)]
    adapters, merged = zip(*experts)
    assert any(".base_layer." in k for k in adapters[0].state_dict)
    ws = [0.7, 0.3]
    reference = logits(from_state(llama, weighted(merged, ws)))
    soup = load_soup(llama, lora_soup(adapters, ws, mode="delta"), tmp_path / "soup")
    torch.testing.assert_close(logits(soup), reference, rtol=0, atol=1e-5)
    out = merge_lora_into_base(llama().state_dict(), adapters, ws)
    torch.testing.assert_close(logits(from_state(llama, out)), reference, rtol=0, atol=1e-5)


def test_factors_and_delta_are_different_models(experts, tmp_path):
    (a0, m0), (a1, m1) = experts
    ws = [0.5, 0.5]
    factors = logits(load_soup(llama, lora_soup([a0, a1], ws), tmp_path / "f"))
    delta = logits(load_soup(llama, lora_soup([a0, a1], ws, mode="delta"), tmp_path / "d"))
    exact = logits(from_state(llama, weighted([m0, m1], ws)))
    torch.testing.assert_close(delta, exact, rtol=0, atol=1e-5)
    gap = (factors - delta).abs().max().item()
    spread = (logits(from_state(llama, m0)) - logits(from_state(llama, m1))).abs().max().item()
    assert gap > 0.2 * spread > 0, (gap, spread)  # the cross terms w_i w_j B_i A_j are real


def test_save_load_roundtrip_and_soup_json(experts, tmp_path):
    a0, _ = experts[0]
    assert is_peft_adapter_dir(a0.path) and not is_peft_adapter_dir(tmp_path)
    save_adapter(a0, tmp_path / "out", extra_json={"weights": [1.0]})
    back = load_adapter(tmp_path / "out")
    assert back.config == a0.config and back.path == str(tmp_path / "out")
    assert all(torch.equal(back.state_dict[k], v) for k, v in a0.state_dict.items())
    assert json.loads((tmp_path / "out" / "soup.json").read_text()) == {"weights": [1.0]}
    with pytest.raises(FileExistsError):
        save_adapter(a0, tmp_path / "out")
    save_adapter(a0, tmp_path / "out", overwrite=True)


def _with(adapter, config=None, drop=None):
    state = {k: v for k, v in adapter.state_dict.items() if k != drop}
    return LoraAdapter(config=adapter.config | (config or {}), state_dict=state, path="expert/b")


@pytest.mark.parametrize(
    "change, modes, match",
    [
        ({"r": 2}, ["factors"], r"adapter 1 \(expert/b\) has r=2"),
        ({"lora_alpha": 16}, ["factors"], "lora_alpha"),
        ({"target_modules": ["q_proj", "k_proj"]}, ["factors", "delta"], "target_modules"),
        ({"base_model_name_or_path": "other/model"}, ["factors", "delta"], "base_model_name_or_path"),
        ({"use_dora": True}, ["delta"], "use_dora"),
    ],
)
def test_config_mismatch_is_an_error(experts, change, modes, match):
    a0, a1 = experts[0][0], _with(experts[1][0], config=change)
    if "use_dora" in change:
        a0 = _with(a0, config=change)
    for mode in modes:
        with pytest.raises(SoupError, match=match):
            lora_soup([a0, a1], [0.5, 0.5], mode=mode)


@pytest.mark.parametrize("mode", ["factors", "delta"])
def test_missing_key_is_an_error(experts, mode):
    a0 = experts[0][0]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    with pytest.raises(
        SoupError, match=rf"key '{key}' of adapter 0 .* is missing from adapter 1 \(expert/b\)"
    ):
        lora_soup([a0, _with(experts[1][0], drop=key)], [0.5, 0.5], mode=mode)


def test_rank_mismatch_in_factor_shapes_is_an_error(experts):
    a0, (a1, _) = experts[0][0], experts[1]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = _with(a1)
    bad.state_dict[key] = bad.state_dict[key][:2]
    with pytest.raises(SoupError, match="q_proj.lora_A.weight"):
        lora_soup([a0, bad], [0.5, 0.5])
    b_key = key.replace("lora_A", "lora_B")
    bad.state_dict[b_key] = bad.state_dict[b_key][:, :2]
    with pytest.raises(SoupError, match="rank 2 but its config says r=4"):
        lora_soup([a0, bad], [0.5, 0.5], mode="delta")


@pytest.mark.parametrize("weights", [[0.5, 0.6], [-0.5, 1.5], [1.0], [float("nan"), 1.0]])
def test_weights_off_the_simplex_are_an_error(experts, weights):
    adapters = [e[0] for e in experts]
    with pytest.raises(SoupError):
        lora_soup(adapters, weights)


def test_extrapolation_on_request(experts):
    (a0, _), (a1, _) = experts
    soup = lora_soup([a0, a1], [-0.5, 1.5], allow_extrapolation=True)
    k = next(iter(a0.state_dict))
    torch.testing.assert_close(soup.state_dict[k], -0.5 * a0.state_dict[k] + 1.5 * a1.state_dict[k])


def test_missing_or_broken_files_are_named(experts, tmp_path):
    with pytest.raises(SoupError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoupError, match="adapter_config.json is missing"):
        load_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(SoupError, match="cannot read .*adapter_config.json"):
        load_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(SoupError, match="adapter_model.safetensors is missing"):
        load_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(SoupError, match="cannot read the adapter weights"):
        load_adapter(tmp_path / "empty")


def test_merge_refuses_tied_weights_and_unknown_mode(tmp_path):
    # GPT-2 ties wte and lm_head: merging a LoRA into one name only would untie them.
    adapter, _ = make_expert(gpt2, tmp_path / "e", seed=50, target_modules=["wte"])
    with pytest.raises(SoupError, match="tied"):
        merge_lora_into_base(gpt2().state_dict(), [adapter], [1.0])
    with pytest.raises(SoupError, match="mode must be one of"):
        lora_soup([adapter], [1.0], mode="average")
