"""`rs soup` end to end through `rs_lightning.cli.main`: full weights, LoRA adapters (with and without a
base model), the help text's weight convention, and clean errors (exit 2, no traceback)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from rs_lightning import cli
from rs_lightning.commands.soup import parse_size
from rs_lightning.soup.io import open_source
from rs_lightning.soup.lora import is_peft_adapter_dir, load_adapter


def rs(*args) -> int:
    return cli.main(["soup", *map(str, args)])


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(6, 4, generator=g), "out.weight": torch.randn(3, 4, generator=g),
            "out.bias": torch.randn(3, generator=g), "steps": torch.tensor(seed)}


@pytest.fixture
def full_experts(tmp_path):
    """Two HF-style folders (weights + config.json) of the same tiny network."""
    paths = []
    for i in range(2):
        folder = tmp_path / f"expert{i}"
        folder.mkdir()
        save_file(state(i), folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "float32"}))
        paths.append(folder)
    return paths


def test_help_explains_the_weight_convention(capsys):
    assert rs("--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ["theta = sum_i w_i * theta_i", "aligned with the sources", "--weights 0.7 0.3",
                   "70% of the first", "must be >= 0 and sum to 1", "--allow-extrapolation", "--lam",
                   "weight of the SECOND source", "--mode {factors,delta}", "--base", "--max-shard-size"]:
        assert phrase in text, phrase


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1234") == 1234 and parse_size("1.5KB") == 1500


def test_full_weights(tmp_path, full_experts, capsys):
    a, b = full_experts
    assert rs(a, b, "--weights", 0.7, 0.3, "--out", tmp_path / "soup", "--progress") == 0
    out, err = capsys.readouterr()
    assert "soup" in err and "tensor" in err  # the tqdm bar, on stderr
    assert f"wrote {tmp_path / 'soup'}: 4 tensors" in out and " s" in out
    got = dict(open_source(tmp_path / "soup"))
    for k, t in state(0).items():
        if t.is_floating_point():
            torch.testing.assert_close(got[k], 0.7 * t + 0.3 * state(1)[k], rtol=1e-6, atol=1e-6)
    assert got["steps"] == 0  # integer buffers come from the heaviest expert
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["weights"] == [0.7, 0.3]
    assert json.loads((tmp_path / "soup" / "config.json").read_text())["model_type"] == "tiny"
    # --lam is the weight of the SECOND source: the same soup, bit for bit.
    assert rs(a, b, "--lam", 0.3, "--out", tmp_path / "lam") == 0
    lam = dict(open_source(tmp_path / "lam"))
    assert all(torch.equal(lam[k], got[k]) for k in got)


def test_lightning_ckpts_prefix_dtype_and_shards(tmp_path, capsys):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"e{i}.ckpt")
        sd = {f"policy.{k}": v for k, v in state(i).items()} | {"value_head.w": torch.ones(2)}
        torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, paths[-1])
    args = [*paths, "--weights", 0.5, 0.5, "--prefix", "policy.", "--dtype", "bfloat16", "--max-shard-size", "64B"]
    assert rs(*args, "--out", tmp_path / "soup") == 0
    assert (tmp_path / "soup" / "model.safetensors.index.json").is_file()
    got = dict(open_source(tmp_path / "soup"))
    assert set(got) == set(state(0)) and got["out.weight"].dtype == torch.bfloat16 and got["steps"].dtype == torch.int64
    assert "4 tensors" in capsys.readouterr().out


def minimal_adapter(folder):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.l.lora_A.weight": torch.ones(2, 4)}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or folder: "),
        ("count", "got 3 weights for 2 sources"),
        ("sum", "sum to 0.9"),
        ("negative", "weight 0 is -0.5 < 0"),
        ("exists", "output folder already exists"),
        ("mode", "--mode applies to LoRA adapter folders only"),
        ("base", "--method linear does not use it"),
        ("lam", "--lam needs exactly two sources"),
        ("mix", "sources mix PEFT adapter folders"),
        ("keys", "key 'extra' of source 1"),
        ("argparse", "the following arguments are required: --out"),
    ],
)
def test_errors_exit_2_without_traceback(tmp_path, full_experts, capsys, case, message):
    a, b = full_experts
    out = ["--out", tmp_path / "soup"]
    args = {
        "missing": [a, tmp_path / "nope", "--weights", 0.5, 0.5, *out],
        "count": [a, b, "--weights", 0.3, 0.3, 0.4, *out],
        "sum": [a, b, "--weights", 0.5, 0.4, *out],
        "negative": [a, b, "--weights", -0.5, 1.5, *out],
        "exists": [a, b, "--weights", 0.5, 0.5, "--out", tmp_path / "taken"],
        "mode": [a, b, "--weights", 0.5, 0.5, "--mode", "delta", *out],
        "base": [a, b, "--weights", 0.5, 0.5, "--base", a, *out],
        "lam": [a, b, a, "--lam", 0.5, *out],
        "mix": [a, minimal_adapter(tmp_path / "lora"), "--weights", 0.5, 0.5, *out],
        "keys": [a, tmp_path / "x.safetensors", "--weights", 0.5, 0.5, *out],
        "argparse": [a, b, "--weights", 0.5, 0.5],
    }[case]
    if case == "keys":
        save_file(state(1) | {"extra": torch.ones(1)}, tmp_path / "x.safetensors")
    (tmp_path / "taken").mkdir()
    assert rs(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rs soup: error: ") or (case == "argparse" and "rs soup: error: " in err), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "soup").exists()


# --- PEFT adapters on a tiny random Llama ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_experts(tmp_path_factory):
    """A saved base model, two PEFT LoRA experts on it, and each expert merged into the base by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    adapters, merged = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), lora)
        model.save_pretrained(root / f"lora{seed}")
        adapters.append(root / f"lora{seed}")
        merged.append({k: v.clone() for k, v in model.merge_and_unload().state_dict().items()})
    return root, adapters, merged


@pytest.mark.parametrize("mode", ["factors", "delta"])
def test_lora_adapter_soup(tmp_path, lora_experts, capsys, mode):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, (a, b), _ = lora_experts
    assert rs(a, b, "--weights", 0.25, 0.75, "--mode", mode, "--out", tmp_path / "soup") == 0
    assert f"(LoRA adapter, mode {mode})" in capsys.readouterr().out
    assert is_peft_adapter_dir(tmp_path / "soup")
    soup, experts = load_adapter(tmp_path / "soup"), [load_adapter(a), load_adapter(b)]
    record = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert record["mode"] == mode and record["weights"] == [0.25, 0.75] and record["sources"] == [str(a), str(b)]
    key = next(k for k in soup.state_dict if "lora_A" in k)
    if mode == "factors":  # the paper's soup: A and B averaged separately, same rank
        want = 0.25 * experts[0].state_dict[key] + 0.75 * experts[1].state_dict[key]
        torch.testing.assert_close(soup.state_dict[key], want)
    else:  # the exact delta soup: one LoRA of rank r_1 + r_2
        assert soup.config["r"] == 8 and soup.state_dict[key].shape[0] == 8
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), tmp_path / "soup")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("mode, weights", [("delta", [0.4, 0.6]), ("factors", [1.0, 0.0])])
def test_lora_soup_merged_into_base(tmp_path, lora_experts, capsys, mode, weights):
    """The delta soup merged into the base IS the interpolation of the experts merged by PEFT; a one-hot
    factors soup is that expert merged."""
    from transformers import LlamaForCausalLM

    root, adapters, merged = lora_experts
    out = tmp_path / "merged"
    assert rs(*adapters, "--weights", *weights, "--mode", mode, "--base", root / "base", "--out", out) == 0
    assert f"(base + LoRA soup, mode {mode})" in capsys.readouterr().out
    model = LlamaForCausalLM.from_pretrained(out)  # config copied next to the weights: a usable model
    got = model.state_dict()
    for k, t in merged[0].items():
        torch.testing.assert_close(got[k], weights[0] * t + weights[1] * merged[1][k], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "soup.json").read_text())["base"] == str(root / "base")


def test_sharded_transformers_checkpoints(tmp_path, capsys):
    """Experts saved by transformers in shards soup into a folder transformers loads back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        experts.append(LlamaForCausalLM(cfg))
        experts[-1].save_pretrained(tmp_path / f"e{seed}", max_shard_size="20KB")
    assert (tmp_path / "e0" / "model.safetensors.index.json").is_file()
    args = [tmp_path / "e0", tmp_path / "e1", "--lam", 0.25, "--max-shard-size", "30KB", "--dtype", "bfloat16"]
    assert rs(*args, "--out", tmp_path / "soup") == 0
    assert "tensors" in capsys.readouterr().out
    soup = LlamaForCausalLM.from_pretrained(tmp_path / "soup")
    assert soup.dtype == torch.bfloat16
    want = {k: 0.75 * v + 0.25 * experts[1].state_dict()[k] for k, v in experts[0].state_dict().items()}
    for k, t in soup.state_dict().items():
        torch.testing.assert_close(t, want[k].bfloat16(), rtol=0, atol=0, msg=k)
