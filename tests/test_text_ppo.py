"""TextPPOModule on a tiny random Llama (CPU, seconds): it learns, experts share their init and soup, an SFT
adapter is the KL reference, a run resumes bit-for-bit from a .ckpt, metrics are logged, the CLI trains.

A rule reward (count of the letter "e") is learnable by a random 2-layer model within a dozen PPO iterations
once LoRA also covers the MLP and the LM head (attention alone is too weak a lever on a random model).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from rs_lightning.rewards.rules import KeywordReward
from rs_lightning.tasks.text import policy as pol
from rs_lightning.tasks.text.data import PromptDataModule
from rs_lightning.tasks.text.export import ExportExpert
from rs_lightning.tasks.text.module import TextPPOModule
from rs_lightning.tasks.text.rollout import generate, response_forward

ALL_LINEAR = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
# Settings under which the tiny random policy learns the "e" count fast (the lead's smoke run), by group.
FAST = dict(lora=dict(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR),
            ppo=dict(lr=1e-2, epochs=2, mini_batch_size=8), kl=dict(init_coef=0.05),
            rollout=dict(response_length=(8, 8), eval_max_new_tokens=8))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """One tiny random Llama folder and one prompt file for the whole session."""
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    root = tmp_path_factory.mktemp("text_ppo")
    tiny_random_causal_lm(save_dir=root / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "the cat sat on the mat"}
            for i in range(64)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, model=str(root / "model"), prompts=str(root / "prompts.jsonl"))


def e_reward(name="e"):
    return KeywordReward(["e"], mode="count", whole_word=False, name=name)


def make_module(tiny, rewards=None, **kw) -> TextPPOModule:
    """FAST, with `kw`'s groups (dicts) merged into it field by field (`ppo={"advantage": "rloo"}`)."""
    merged = {**FAST, **{k: {**FAST.get(k, {}), **v} if isinstance(v, dict) else v for k, v in kw.items()}}
    return TextPPOModule(model=tiny.model, rewards=rewards or [e_reward()], **merged)


def make_data(tiny, **kw) -> PromptDataModule:
    args = dict(source=tiny.prompts, tokenizer=tiny.model, num_val=8, num_test=8, batch_size=16, eval_batch_size=8,
                prefix_tokens=(0, 0), template="alpaca")
    return PromptDataModule(**{**args, **kw})


def make_trainer(root, iterations: int, epochs: int = 1, callbacks=(), **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=iterations, limit_val_batches=0,
                num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks))
    return L.Trainer(**{**args, **kw})


class Record(L.Callback):
    """Every logged train/ metric, one dict per PPO iteration."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    def series(self, key):
        return [row[key] for row in self.rows]


def adapter(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.soup_state_dict().items()}


def reference_state(module) -> dict[str, torch.Tensor]:
    ref = f".{pol.REFERENCE_ADAPTER}."
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if ref in n}


# ---- 1. it learns -----------------------------------------------------------------------------------------------

def test_ppo_learns_rule_reward_and_kl_starts_at_zero(tiny, tmp_path):
    L.seed_everything(0)
    rec = Record()
    make_trainer(tmp_path, iterations=3, epochs=4, callbacks=[rec]).fit(make_module(tiny), make_data(tiny))
    reward, kl = rec.series("train/reward/e"), rec.series("train/kl")
    assert len(reward) == 12
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    spread = max(abs(a - b) for a, b in zip(reward[:3], reward[1:3]))  # step-to-step noise before learning
    assert last - first > max(1.0, 3 * spread), reward
    # Fresh LoRA (B = 0): the policy IS the reference at the first rollout, so the KL is exactly 0.
    assert kl[0] == 0.0
    assert sum(kl[-3:]) / 3 > sum(kl[:3]) / 3 + 0.1, kl


# ---- 2. experts of different rewards, exported and souped ---------------------------------------------------------

def test_experts_differ_export_and_soup(tiny, tmp_path):
    from rs_lightning.cli import main as rs_main

    rewards = lambda: [e_reward("e"), KeywordReward(["a"], mode="count", whole_word=False, name="a")]  # noqa: E731
    experts = []
    for tag, mu in (("e", [1.0, 0.0]), ("a", [0.0, 1.0])):
        L.seed_everything(0)
        module = make_module(tiny, rewards=rewards(), reward_weights=mu)
        out = tmp_path / f"expert_{tag}"
        make_trainer(tmp_path / tag, iterations=2, callbacks=[ExportExpert(str(out))]).fit(module, make_data(tiny))
        experts.append((out, adapter(module)))
    (dir_e, state_e), (dir_a, state_a) = experts
    assert state_e.keys() == state_a.keys()
    assert any(not torch.equal(state_e[k], state_a[k]) for k in state_e), "different rewards gave the same adapter"
    info = json.loads((dir_e / "expert.json").read_text())
    assert info["rewards"] == ["e", "a"] and info["reward_weights"] == [1.0, 0.0] and info["ppo_iterations"] == 2
    assert set(load_file(str(dir_e / "value_head.safetensors"))) == {"summary.weight", "summary.bias"}
    saved = load_file(str(dir_e / "adapter_model.safetensors"))
    assert saved.keys() == state_e.keys() and all(torch.equal(saved[k], state_e[k]) for k in saved)
    assert all(".lora_" in k for k in saved), "a LoRA on lm_head must not export the frozen base lm_head"

    for weights, expected in (([1, 0], state_e), ([0, 1], state_a)):
        out = tmp_path / f"soup_{weights[0]}{weights[1]}"
        assert rs_main(["soup", str(dir_e), str(dir_a), "--weights", *map(str, weights), "--out", str(out)]) == 0
        soup = load_file(str(out / "adapter_model.safetensors"))
        assert soup.keys() == expected.keys() and all(torch.equal(soup[k], expected[k]) for k in soup)
    out = tmp_path / "soup_half"
    assert rs_main(["soup", str(dir_e), str(dir_a), "--weights", "0.5", "0.5", "--out", str(out)]) == 0
    soup = load_file(str(out / "adapter_model.safetensors"))
    for k in soup:  # "factors": A and B averaged separately
        torch.testing.assert_close(soup[k], 0.5 * state_e[k] + 0.5 * state_a[k], rtol=1e-6, atol=1e-7)
    # The soup loads back into the policy under the saved names (what `rs front` does in place).
    module = make_module(tiny)
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module.policy, soup)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    assert all(torch.equal(module.soup_state_dict()[k], soup[k]) for k in soup)


# ---- 3. shared init ---------------------------------------------------------------------------------------------

def test_fresh_lora_and_value_head_do_not_depend_on_run_seed(tiny):
    L.seed_everything(1)
    one = make_module(tiny)
    L.seed_everything(2)
    two = make_module(tiny)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)
    for x, y in zip(one.value_head.parameters(), two.value_head.parameters()):
        assert torch.equal(x, y)
    other = adapter(make_module(tiny, lora={"init_seed": 1}))  # the seed that IS meant to change it
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)


# ---- 4. starting from an existing (SFT) adapter -------------------------------------------------------------------

@pytest.fixture(scope="session")
def sft_adapter(tiny):
    """A LoRA on q/v with nonzero B (so it changes the model), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from rs_lightning.tasks.text.model_loading import load_causal_lm

    base, _ = load_causal_lm(tiny.model)
    torch.manual_seed(123)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    path = tiny.root / "sft_adapter"
    model.save_pretrained(str(path))
    return str(path)


def _rollout(module, data, n=8):
    batch = next(iter(data.train_dataloader()))
    lengths = [6] * n
    torch.manual_seed(0)
    ro = module.rollout({k: v[:n] for k, v in batch.items()}, greedy=False, lengths=lengths, ignore_eos=True)
    return ro


def test_init_adapter_is_trainable_start_and_frozen_reference(tiny, sft_adapter, tmp_path):
    from peft import PeftModel

    from rs_lightning.tasks.text.model_loading import load_causal_lm

    L.seed_everything(0)
    module = make_module(tiny, lora={"init_adapter": sft_adapter})
    saved = load_file(f"{sft_adapter}/adapter_model.safetensors")
    start = adapter(module)
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    ref_before = reference_state(module)
    assert ref_before and not any(p.requires_grad for p in ref_before.values())

    data = make_data(tiny)
    data.setup("fit")
    ro = _rollout(module, data)
    with torch.no_grad(), pol.reference_policy(module.policy):
        ref_lp = response_forward(module.policy, None, ro)["logprobs"]
    # Still trainable after the switch back, reference still frozen.
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if ".default." in n)
    assert not any(p.requires_grad for n, p in module.policy.named_parameters() if ".reference." in n)
    sft, _ = load_causal_lm(tiny.model)
    sft = PeftModel.from_pretrained(sft, sft_adapter).eval()
    bare, _ = load_causal_lm(tiny.model)
    with torch.no_grad():
        torch.testing.assert_close(ref_lp, response_forward(sft, None, ro)["logprobs"], rtol=0, atol=1e-5)
        bare_lp = response_forward(bare, None, ro)["logprobs"]
    assert (ref_lp - bare_lp).abs().max() > 1e-2, "the reference is the bare base model, not the SFT adapter"

    rec = Record()
    make_trainer(tmp_path, iterations=2, callbacks=[rec]).fit(module, data)
    assert rec.series("train/kl")[0] == 0.0
    after = adapter(module)
    assert any(not torch.equal(after[k], start[k]) for k in start), "training did not move the adapter"
    ref_after = reference_state(module)
    assert ref_after.keys() == ref_before.keys()
    assert all(torch.equal(ref_after[k], ref_before[k]) for k in ref_before)


# ---- 5. resume from a Lightning checkpoint ------------------------------------------------------------------------

class BatchIds(L.Callback):
    def __init__(self):
        self.ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids.append(list(batch["ids"]))


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(lora={"dropout": 0.1}, scoring={"normalization": "running"})  # dropout and reward stats must resume too
    n = 2
    L.seed_everything(0)
    straight, seen = make_module(tiny, **kw), BatchIds()
    make_trainer(tmp_path / "straight", iterations=n, epochs=2, callbacks=[seen]).fit(straight, make_data(tiny))

    L.seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    first, seen_1 = make_module(tiny, **kw), BatchIds()
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_epochs=1, save_last=True, save_top_k=-1)
    make_trainer(tmp_path / "first", iterations=n, epochs=1, callbacks=[ckpt, seen_1],
                 enable_checkpointing=True).fit(first, make_data(tiny))
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()

    L.seed_everything(7)  # a different seed: the checkpoint, not the seed, must carry the state
    resumed, seen_2 = make_module(tiny, **kw), BatchIds()
    make_trainer(tmp_path / "resumed", iterations=n, epochs=2, callbacks=[seen_2]).fit(
        resumed, make_data(tiny), ckpt_path=str(last))
    assert resumed.ppo_iteration == 2 * n
    assert seen_1.ids + seen_2.ids == seen.ids  # same prompts, same order, epoch after epoch
    assert seen.ids[0] != seen.ids[n]  # and the order changes between epochs
    a, b = adapter(straight), adapter(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert straight.kl_ctl.value == pytest.approx(resumed.kl_ctl.value, abs=1e-9)
    torch.testing.assert_close(resumed.objective.stats_mean, straight.objective.stats_mean)

    # The checkpoint holds what training changes, not the frozen base model, and loads into a fresh module.
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert any(".lora_A." in k for k in state) and any(k.startswith("value_head.") for k in state)
    assert not [k for k in state if "lora_" not in k and not k.startswith(("value_head.", "objective."))]
    fresh = TextPPOModule.load_from_checkpoint(str(last), rewards=[e_reward()])
    loaded, ref = adapter(fresh), adapter(first)
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)


class KillAfter(L.Callback):
    """Stops a run with an exception after PPO iteration `n` (a crash, not a clean stop)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, *args):
        if pl_module.ppo_iteration == self.n:
            raise RuntimeError("killed")


def test_mid_epoch_resume_matches_uninterrupted_run(tiny, tmp_path):
    """A run killed in the middle of an epoch and resumed from a step checkpoint sees the batches it had not
    trained on yet (not the epoch's first ones again) and ends where the uninterrupted run ends."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(lora={"dropout": 0.1}, scoring={"normalization": "running"})
    n, epochs = 3, 2  # 48 training prompts / batch 16: 3 iterations per epoch
    L.seed_everything(0)
    straight, seen = make_module(tiny, **kw), BatchIds()
    make_trainer(tmp_path / "straight", iterations=n, epochs=epochs, callbacks=[seen]).fit(straight, make_data(tiny))
    steps = straight.trainer.global_step // (n * epochs)  # optimizer steps per PPO iteration

    L.seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=steps, save_top_k=-1)
    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(tmp_path / "first", iterations=n, epochs=epochs, callbacks=[ckpt, KillAfter(5)],
                     enable_checkpointing=True).fit(make_module(tiny, **kw), make_data(tiny))
    for done in (2, 4):  # after batch 2 of epoch 0, after batch 1 of epoch 1
        path = next(ckpt_dir.glob(f"*step={done * steps}.ckpt"))
        L.seed_everything(7)  # a different seed: the checkpoint, not the seed, must carry the state
        resumed, seen_2 = make_module(tiny, **kw), BatchIds()
        make_trainer(tmp_path / f"resumed{done}", iterations=n, epochs=epochs, callbacks=[seen_2]).fit(
            resumed, make_data(tiny), ckpt_path=str(path))
        assert seen_2.ids == seen.ids[done:], done
        assert resumed.ppo_iteration == n * epochs
        a, b = adapter(straight), adapter(resumed)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


# ---- 6. logged metrics, response lengths, EOS masking -------------------------------------------------------------

def test_logged_metrics_train_and_test(tiny, tmp_path):
    L.seed_everything(0)
    rewards = [e_reward("e"), KeywordReward(["a"], mode="count", whole_word=False, name="a")]
    module, data, rec = make_module(tiny, rewards=rewards, reward_weights=[0.5, 0.5]), make_data(tiny), Record()
    trainer = make_trainer(tmp_path, iterations=1, callbacks=[rec])
    trainer.fit(module, data)
    row = rec.rows[0]
    expected = {f"train/{k}" for k in ("reward/e", "reward/a", "reward/total", "kl", "kl_coef", "entropy", "clipfrac",
                                      "approx_kl", "value_loss", "response_length")}
    assert expected <= row.keys(), expected - row.keys()
    assert row["train/reward/total"] == pytest.approx(0.5 * (row["train/reward/e"] + row["train/reward/a"]), abs=1e-5)
    assert row["train/kl_coef"] == pytest.approx(0.05) and row["train/response_length"] == 8
    assert row["train/entropy"] > 0
    metrics = trainer.test(module, data, verbose=False)[0]
    # The weighted total is logged outside `test/reward/`: a front scores every `test/reward/*` as an objective.
    assert {k for k in metrics if k.startswith("test/reward/")} == {"test/reward/e", "test/reward/a"}
    assert metrics["test/reward_total"] == pytest.approx(0.5 * (metrics["test/reward/e"] + metrics["test/reward/a"]),
                                                         abs=1e-5)


def test_prompt_length_sampling_gives_per_prompt_lengths(tiny):
    module = make_module(tiny, rollout={"response_length": (2, 9), "length_sampling": "prompt"})
    data = make_data(tiny)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    lengths = module._lengths(len(batch["prompts"]))
    assert all(2 <= n <= 9 for n in lengths) and len(set(lengths)) > 1
    ro = module.rollout(batch, greedy=False, lengths=lengths, ignore_eos=True)
    assert ro.response_mask.sum(1).tolist() == lengths  # EOS ignored: every response has exactly its length
    assert ro.response_ids.shape[1] == max(lengths)
    assert module._lengths(16) == lengths  # seeded by the iteration: a resumed run draws the same lengths
    batch_mode = make_module(tiny, rollout={"response_length": (2, 9)})._lengths(16)
    assert len(set(batch_mode)) == 1


class _FixedGenerate:
    """Stands in for a model whose generate() returns a fixed continuation (to test mask construction)."""

    def __init__(self, response):
        self.response, self.config = response, None

    def generate(self, input_ids, attention_mask, generation_config):
        self.config = generation_config
        return torch.cat([input_ids, self.response], dim=1)


def test_eos_masking(tiny):
    from rs_lightning.tasks.text.model_loading import load_tokenizer

    tok = load_tokenizer(tiny.model)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b, c = tok("hello world", add_special_tokens=False)["input_ids"][:1] * 3
    response = torch.tensor([[a, eos, b, c], [eos, a, b, c], [a, b, c, eos]])
    query = torch.tensor([[pad, a], [a, b], [a, b]])
    qmask = torch.tensor([[0, 1], [1, 1], [1, 1]])
    fake = _FixedGenerate(response)
    ro = generate(fake, tok, query, qmask, [4, 4, 3], ignore_eos=False)
    assert fake.config.eos_token_id == eos
    # The first EOS is the last real token; what follows it is padding; a row stops at its own length.
    assert ro.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert ro.response_ids.tolist() == [[a, eos, pad, pad], [eos, pad, pad, pad], [a, b, c, pad]]
    ro = generate(fake, tok, query, qmask, [4, 4, 3], ignore_eos=True)
    assert fake.config.eos_token_id == []  # generate runs to max_new_tokens, as the paper (eos_token_id=-1)
    assert ro.response_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert ro.texts[2] == tok.decode([a, b, c], skip_special_tokens=True)


# ---- 7. LightningCLI: the smoke config end to end; every text config parses ---------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "text"


def test_cli_fit_smoke_config_exports_expert(tmp_path):
    from rs_lightning.cli import main as rs_main

    root = tmp_path / "run"
    code = rs_main(["fit", "--config", str(CONFIGS / "smoke.yaml"), f"--trainer.default_root_dir={root}",
                    f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false"])
    assert code == 0
    info = json.loads((root / "expert" / "expert.json").read_text())
    assert info["ppo_iterations"] == 2 and info["rewards"] == ["e", "length"]
    assert (root / "expert" / "adapter_model.safetensors").is_file()
    lines = (root / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert {"train/reward/e", "train/reward/length", "train/kl", "time/generate"} <= set(header)
    assert len([row for row in lines[1:] if row.split(",")[header.index("train/reward/e")]]) == 2


def _parse_only(path: Path, *extra: str):
    """Parse a config with the CLI's own parser (every class_path imported, every init arg type-checked against
    the signatures) without instantiating anything: the paper configs name 7B models that are not here."""
    from lightning.pytorch.cli import LightningCLI

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False,
                     args=["--config", str(path), *extra]).config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_text_config_parses(path):
    config = _parse_only(path)
    assert config.model.class_path == "rs_lightning.tasks.text.module.TextPPOModule"
    args = config.model.init_args
    assert len(args.reward_weights) == len(args.rewards)
    names = [r.init_args.name for r in args.rewards]
    assert len(set(names)) == len(names) and None not in names
    assert path.read_text().startswith("#"), "each config opens with a comment saying what it is"


PAPER_CONFIGS = ["news_summary", "news_summary_fsdp", "reddit_tldr", "stack_exchange", "movie_review", "assistant"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_use_the_base_model_as_kl_reference_and_per_query_lengths(name):
    """The paper's TRL 0.4 runs: reference = base LLaMA (adapter disabled), a response length drawn per query."""
    args = _parse_only(CONFIGS / f"{name}.yaml").model.init_args
    assert args.lora.init_adapter and args.kl.reference == "base" and args.rollout.length_sampling == "prompt"


def test_config_parse_catches_a_wrong_reward_argument(tmp_path, capsys):
    text = (CONFIGS / "smoke.yaml").read_text()
    assert "{target: 4, name: length}" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("{target: 4, name: length}", "{targett: 4, name: length}"))
    with pytest.raises(SystemExit):
        _parse_only(bad)
    assert "targett" in capsys.readouterr().err


def test_export_from_gathered_state_equals_the_live_export(tiny, tmp_path):
    """The FSDP export path (full state dicts gathered from the units, adapter picked by name) writes the same
    adapter, config and value head as PEFT's save_pretrained on the live module."""
    from rs_lightning.soup import load_adapter
    from rs_lightning.tasks.text.export import export_expert

    module = make_module(tiny)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    export_expert(module, tmp_path / "live")
    gathered = ({k: v.clone() for k, v in module.policy.state_dict().items()}, module.value_head.state_dict())
    export_expert(module, tmp_path / "gathered", states=gathered)
    live, got = load_adapter(tmp_path / "live"), load_adapter(tmp_path / "gathered")
    assert live.state_dict.keys() == got.state_dict.keys() and len(live.state_dict) > 0
    assert all(torch.equal(live.state_dict[k], got.state_dict[k]) for k in live.state_dict)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("live", "gathered")]
    for config in configs:  # a set in PEFT's config: its saved order is arbitrary
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    live_head = load_file(str(tmp_path / "live" / "value_head.safetensors"))
    got_head = load_file(str(tmp_path / "gathered" / "value_head.safetensors"))
    assert all(torch.equal(live_head[k], got_head[k]) for k in live_head)
    with pytest.raises(RuntimeError, match="holds no tensor of the 'default' LoRA adapter"):
        export_expert(module, tmp_path / "empty", states=({"w": torch.zeros(1)}, gathered[1]))
    assert not (tmp_path / "empty").exists()  # atomic: nothing half-written


# ---- 8. critic-free advantages (sequence, rloo): no value head ------------------------------------------------------

def test_critic_free_sequence_mode_has_no_value_head_and_ignores_vf_coef(tiny, tmp_path):
    """advantage=sequence uses no value estimate: vf_coef must not change the update. It did when a value head was
    still built and trained next to the policy (its loss reached the LoRA through the shared hidden states)."""
    states = []
    for vf_coef in (0.0, 0.1):
        L.seed_everything(0)
        module = make_module(tiny, ppo={"advantage": "sequence", "vf_coef": vf_coef})
        make_trainer(tmp_path / str(vf_coef), iterations=1).fit(module, make_data(tiny))
        states.append(adapter(module))
    first, second = states
    assert any(bool(v.abs().sum() > 0) for k, v in first.items() if "lora_B" in k), "no training happened"
    assert all(torch.equal(first[k], second[k]) for k in first), "vf_coef changed a critic-free update"
    assert module.value_head is None
    assert not [n for n, _ in module.named_parameters() if "value_head" in n]


def test_rloo_iteration_samples_k_per_prompt_and_moves_the_lora(tiny, tmp_path):
    L.seed_everything(0)
    module, rec, seen = make_module(tiny, ppo={"advantage": "rloo", "rloo_k": 4}), Record(), BatchIds()
    assert module.value_head is None and not [n for n, _ in module.named_parameters() if "value_head" in n]
    before = adapter(module)
    make_trainer(tmp_path, iterations=1, callbacks=[rec, seen]).fit(module, make_data(tiny, batch_size=4))
    assert [len(ids) for ids in seen.ids] == [4]  # the data (and its resumable order, DDP's split) count prompts
    assert len(module.last_iteration["texts"]) == 16  # 4 prompts x 4 samples
    row = rec.rows[0]
    assert row["train/reward/e"] == pytest.approx(float(module.last_iteration["rewards"]["e"].mean()))  # per sample
    assert "train/value_loss" not in row and "train/clipfrac" in row
    after = adapter(module)
    assert any(not torch.equal(after[k], before[k]) for k in before), "an rloo iteration did not move the LoRA"


def test_rloo_k_below_two_is_refused(tiny):
    with pytest.raises(ValueError, match=r"model.ppo.rloo_k must be an integer >= 2.*got 1"):
        make_module(tiny, ppo={"advantage": "rloo", "rloo_k": 1})


def test_repeat_rows_puts_the_k_samples_of_a_prompt_next_to_each_other():
    from rs_lightning.tasks.text.rollout import repeat_rows

    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "ids": ["a", "b"], "labels": [None, None]}
    out = repeat_rows(batch, 3)
    assert out["input_ids"].tolist() == [[1, 2]] * 3 + [[3, 4]] * 3
    assert out["ids"] == ["a", "a", "a", "b", "b", "b"] and out["labels"] == [None] * 6
    assert batch["ids"] == ["a", "b"]  # the loader's batch is left as it is


def test_rloo_mid_epoch_resume_matches_uninterrupted_run(tiny, tmp_path):
    """The k-fold repetition happens inside training_step: a checkpoint taken after a prompt batch resumes on the
    next prompt batch and ends where the uninterrupted run ends."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw, data = dict(ppo={"advantage": "rloo", "rloo_k": 2}), dict(batch_size=8)
    L.seed_everything(0)
    straight, seen = make_module(tiny, **kw), BatchIds()
    make_trainer(tmp_path / "straight", iterations=2, callbacks=[seen]).fit(straight, make_data(tiny, **data))
    steps = straight.trainer.global_step // 2
    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=steps, save_top_k=-1)
    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(tmp_path / "first", iterations=2, callbacks=[ckpt, KillAfter(2)], enable_checkpointing=True).fit(
            make_module(tiny, **kw), make_data(tiny, **data))
    L.seed_everything(7)
    resumed, seen_2 = make_module(tiny, **kw), BatchIds()
    make_trainer(tmp_path / "resumed", iterations=2, callbacks=[seen_2]).fit(
        resumed, make_data(tiny, **data), ckpt_path=str(next((tmp_path / "ckpt").glob(f"*step={steps}.ckpt"))))
    assert seen_2.ids == seen.ids[1:] and len(seen.ids[0]) == 8
    a, b = adapter(straight), adapter(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_critic_free_export_and_checkpoint_have_no_value_head(tiny, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = make_module(tiny, ppo={"advantage": "sequence"})
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    make_trainer(tmp_path, iterations=1, callbacks=[ckpt, ExportExpert(str(tmp_path / "expert"))],
                 enable_checkpointing=True).fit(module, make_data(tiny))
    expert = tmp_path / "expert"
    assert (expert / "adapter_model.safetensors").is_file() and not (expert / "value_head.safetensors").exists()
    info = json.loads((expert / "expert.json").read_text())
    assert info["advantage"] == "sequence" and info["kl_reference"] == "init"
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert any(".lora_A." in k for k in state) and not [k for k in state if "value_head" in k]
    fresh = TextPPOModule.load_from_checkpoint(str(last), rewards=[e_reward()])
    assert fresh.value_head is None
    loaded, trained = adapter(fresh), adapter(module)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    with pytest.raises(KeyError, match="value_head.*advantage='sequence' builds none"):
        fresh.on_load_checkpoint({"state_dict": {"value_head.summary.bias": torch.zeros(1)}})


def test_fsdp_wraps_and_exports_no_value_head_in_critic_free_modes(tiny, tmp_path, monkeypatch):
    """shard_policy / full_state_dicts / export with value_head None, FSDP replaced by a recording stand-in (a real
    FSDP run needs a GPU: tests/test_gpu.py)."""
    import contextlib

    import torch.distributed.fsdp as torch_fsdp
    from lightning.pytorch.strategies import FSDPStrategy

    from rs_lightning.tasks.text import fsdp
    from rs_lightning.tasks.text.export import export_expert

    class StandIn(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module

        @staticmethod
        def state_dict_type(*args):
            return contextlib.nullcontext()

    monkeypatch.setattr(torch_fsdp, "FullyShardedDataParallel", StandIn)
    module = make_module(tiny, ppo={"advantage": "rloo"})
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(parallel_devices=[torch.device("cpu")]))
    assert fsdp.shard_policy(module)
    assert isinstance(module.policy, StandIn) and module.value_head is None
    policy_state, head_state = fsdp.full_state_dicts(module, world_size=1)
    assert head_state is None and any("lora_A" in k for k in policy_state)
    module._trainer = None
    export_expert(module, tmp_path / "expert", states=(policy_state, head_state))
    assert (tmp_path / "expert" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "expert" / "value_head.safetensors").exists()


# ---- 9. KL reference: the initial adapter (default) or the base model (the paper's TRL 0.4) ------------------------

def test_kl_reference_base_disables_the_initial_adapter(tiny, sft_adapter, tmp_path):
    from rs_lightning.tasks.text.model_loading import load_causal_lm

    L.seed_everything(0)
    module = make_module(tiny, lora={"init_adapter": sft_adapter}, kl={"reference": "base"})
    assert not reference_state(module), "kl_reference=base needs no frozen copy of the adapter"
    data = make_data(tiny)
    data.setup("fit")
    ro = _rollout(module, data)
    bare, _ = load_causal_lm(tiny.model)
    with torch.no_grad():
        with pol.reference_policy(module.policy, "base"):
            ref_lp = response_forward(module.policy, None, ro)["logprobs"]
        policy_lp = response_forward(module.policy, None, ro)["logprobs"]  # the adapter is back on after the block
        torch.testing.assert_close(ref_lp, response_forward(bare, None, ro)["logprobs"], rtol=0, atol=1e-5)
    assert (policy_lp - ref_lp).abs().max() > 1e-2, "the policy (SFT adapter on) equals its reference"
    rec = Record()
    make_trainer(tmp_path, iterations=1, callbacks=[rec]).fit(module, data)
    assert rec.series("train/kl")[0] > 0.01  # the SFT start is already away from the base model (init: exactly 0)
    with pytest.raises(ValueError, match="model.kl.reference must be one of .*'sft'"):
        make_module(tiny, kl={"reference": "sft"})


# ---- 10. scripts/compare_estimators.py ------------------------------------------------------------------------------

def _compare_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_estimators.py"
    spec = importlib.util.spec_from_file_location("compare_estimators", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_compare_estimators_summary_exact_values():
    script = _compare_script()
    row = lambda i, r, kl, cpu: {"iteration": i, "reward": r, "kl": kl, "cpu_s": cpu, "samples": 4, "prompts": 4}  # noqa: E731
    runs = {"a": [row(1, 0.0, 0.0, 30), row(2, 0.3, 1.0, 60), row(3, 0.6, 2.0, 90), row(4, 0.9, 3.0, 120)],
            "b": [row(1, 0.1, 0.0, 60), row(2, 0.1, 0.5, 120), row(3, 0.4, 1.5, 180), row(4, 0.4, 1.0, 240)]}
    summary = script.summarise(runs, window=2)
    assert summary["kl_level"] == 1.5  # the smallest peak KL: every run reaches it
    a, b = summary["estimators"]["a"], summary["estimators"]["b"]
    assert a["gain"] == pytest.approx(0.75 - 0.0) and a["gain_per_cpu_minute"] == pytest.approx(0.75 / 2)
    assert b["gain"] == pytest.approx(0.4 - 0.1) and b["gain_per_cpu_minute"] == pytest.approx(0.3 / 4)
    # a: peak KL 1.0 -> 2.0 between iterations 2 and 3, smoothed rewards 0.15 -> 0.45: 0.30 at KL 1.5.
    assert a["gain_at_kl_level"] == pytest.approx(0.30)
    # b: reaches 1.5 exactly at iteration 3 (smoothed 0.25); its later KL drop does not count (running max).
    assert b["gain_at_kl_level"] == pytest.approx(0.25 - 0.1)
    assert script.reward_at_kl([1.0, 2.0], [0.0, 0.5], level=1.0) is None


def _replicate(estimator, seed, r_start, r_end, kl_end, cpu_s=60.0):
    """A run record with only what the replicate summary reads."""
    return {"estimator": estimator, "seed": seed, "iterations": 2, "complete": True, "train_cpu_s": cpu_s,
            "eval_start": {"reward": r_start, "kl": 0.0, "kl_sampled": 0.0},
            "eval_end": {"reward": r_end, "kl": kl_end, "kl_sampled": kl_end},
            "rows": [{"kl": 0.0}, {"kl": kl_end}]}


def test_compare_estimators_replicate_statistics_and_verdicts():
    script = _compare_script()
    ci = script.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, df 2) * sd 1 / sqrt(3)
    assert (ci["mean"], ci["sd"]) == (2.0, 1.0) and (ci["low"], ci["high"]) == pytest.approx((2 - half, 2 + half))
    assert script.mean_ci([0.5])["low"] is None and script.mean_ci([])["mean"] is None
    # One CPU minute per run: gain per CPU minute = held-out gain. a beats b at indistinguishable KL; c beats b but
    # drifts further (KL +0.9..1.1 on every seed); a beats c, KLs indistinguishable.
    gains = {"a": [0.30, 0.32, 0.31], "b": [0.10, 0.13, 0.10], "c": [0.20, 0.23, 0.21]}
    kls = {"a": [1.0, 1.5, 0.8], "b": [1.2, 0.9, 1.0], "c": [2.1, 1.9, 2.1]}
    records = [_replicate(e, s, 0.4, 0.4 + gains[e][s], kls[e][s]) for s in range(3) for e in "abc"]
    summary = script.replicate_summary(records, ["a", "b", "c"])
    a = summary["estimators"]["a"]
    assert a["gain_per_cpu_minute"]["mean"] == pytest.approx(0.31) and a["kl_end"]["mean"] == pytest.approx(1.1)
    assert a["reward_start"]["mean"] == pytest.approx(0.4) and a["cpu_minutes"]["mean"] == pytest.approx(1.0)
    ab, cb, ac = (summary["pairs"][k] for k in ("a - b", "b - c", "a - c"))
    assert ab["gain_per_cpu_minute"]["values"] == pytest.approx([0.20, 0.19, 0.21])
    assert ab["verdict"] == ("a gains more per CPU minute than b; end KLs indistinguishable at 95 % "
                             "(equal KL not rejected)")
    assert cb["kl_end"]["values"] == pytest.approx([-0.9, -1.0, -1.1])
    assert cb["verdict"] == ("c gains more per CPU minute than b but also drifts further (end KL higher at 95 %): "
                             "not a win at equal KL")
    assert ac["verdict"].startswith("a gains more per CPU minute than c; end KLs indistinguishable")
    assert summary["overall"].startswith("a gains more reward per CPU minute than every other estimator")
    # Gains that do not separate: no winner, whatever the KLs.
    flat = [_replicate(e, s, 0.4, 0.4 + 0.1 * (1 + (s + i) % 3), 1.0) for s in range(3)
            for i, e in enumerate("ab")]
    flat_summary = script.replicate_summary(flat, ["a", "b"])
    assert flat_summary["pairs"]["a - b"]["verdict"].startswith("indistinguishable at 95 %")
    assert flat_summary["overall"].startswith("no estimator")
    lower = script.pair_verdict("x", "y", script.mean_ci([0.1, 0.11, 0.12]), script.mean_ci([-1.0, -1.1, -0.9]))
    assert lower == "x gains more per CPU minute than y, with a lower end KL (at 95 %)"
    single = script.replicate_summary([_replicate(e, 0, 0.4, 0.5, 1.0) for e in "ab"], ["a", "b"])
    assert single["pairs"]["a - b"]["verdict"].startswith("n/a")


def test_compare_estimators_quick_runs_end_to_end(tmp_path):
    script = _compare_script()
    out = tmp_path / "compare.json"
    result = script.main(["--quick", "--seeds", "0", "1", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    runs = result["runs"]
    assert [(r["seed"], r["estimator"]) for r in runs] == [(s, e) for s in (0, 1) for e in ("gae", "sequence", "rloo")]
    for r in runs:
        rows = r["rows"]
        assert [row["iteration"] for row in rows] == [1, 2] and all(row["samples"] == 8 for row in rows)
        assert 0 < rows[0]["cpu_s"] <= rows[1]["cpu_s"] <= r["train_cpu_s"] and r["complete"]
        for stage in ("eval_start", "eval_end"):  # the same 4 held-out prompts, greedy reward and sampled KL
            assert r[stage]["prompts"] == 4 and len(r[stage]["kl_per_prompt"]) == 4
            assert {"reward", "reward/vader", "kl", "kl_sampled"} <= set(r[stage])
        assert r["eval_start"]["kl"] == pytest.approx(0.0, abs=1e-4)  # the start policy is the reference
        assert r["eval_start"]["reused"] == (r is not runs[0])  # same start weights: evaluated once
        prompts = {"rloo": 4}.get(r["estimator"], 8)  # same samples per iteration, k=2 per prompt for rloo
        assert rows[0]["prompts"] == prompts
    by = {(r["seed"], r["estimator"]): r for r in runs}
    for seed in (0, 1):  # gae and sequence sample the same first batch of a seed from the same start
        assert by[seed, "gae"]["rows"][0]["reward"] == by[seed, "sequence"]["rows"][0]["reward"]
    assert result["start_eval_consistent"] and not result["failures"]
    summary = result["summary"]
    assert summary["estimators"]["gae"]["gain_per_cpu_minute"]["n"] == 2
    assert summary["estimators"]["gae"]["gain_per_cpu_minute"]["low"] is not None
    assert set(summary["pairs"]) == {"gae - sequence", "gae - rloo", "sequence - rloo"}
    assert set(result["train_summary"]) == {"0", "1"}
    # --reuse: the complete runs of an earlier JSON are taken as they are, only the missing ones run (here seed 2),
    # and they reuse its start evaluation.
    more = script.main(["--quick", "--seeds", "0", "1", "2", "--estimators", "gae,rloo", "--reuse", str(out),
                        "--out", str(tmp_path / "more.json")])
    assert json.loads((tmp_path / "more.json").read_text())["settings"]["reuse"] == [str(out)]
    assert [(r["seed"], r["estimator"]) for r in more["runs"]] == [(s, e) for s in (0, 1, 2) for e in ("gae", "rloo")]
    assert [r for r in more["runs"] if r["seed"] < 2] == [by[s, e] for s in (0, 1) for e in ("gae", "rloo")]
    assert all(r["eval_start"]["reused"] for r in more["runs"] if r["seed"] == 2)
    assert more["reused_from"][0]["runs_taken"] == ["gae-0", "rloo-0", "gae-1", "rloo-1"]
    with pytest.raises(ValueError, match="iterations"):
        script.main(["--quick", "--iterations", "1", "--reuse", str(out)])


def test_compare_estimators_wall_budget_cuts_and_skips_runs():
    result = _compare_script().main(["--quick", "--wall-minutes", "0", "--estimators", "sequence,rloo"])
    # Out of time: the first run stops after one iteration, the next one is not started (it could not end in time).
    assert [(r["estimator"], len(r["rows"]), r["complete"]) for r in result["runs"]] == [("sequence", 1, False)]
    assert [r["estimator"] for r in result["skipped"]] == ["rloo"]
    # A cut run is not comparable with complete ones: it stays out of the summary.
    assert result["summary"]["estimators"]["sequence"]["seeds"] == []
    assert result["summary"]["pairs"]["sequence - rloo"]["verdict"].startswith("n/a")


def test_compare_estimators_parallel_workers_match_in_process(tmp_path):
    script = _compare_script()
    args = ["--quick", "--estimators", "sequence,rloo", "--seeds", "3", "--kl-prompts", "2"]
    serial = script.main(args)
    parallel = script.main([*args, "--jobs", "2", "--out", str(tmp_path / "p.json")])
    assert (tmp_path / "p.logs" / "worker0.log").exists() and not parallel["failures"]
    for a, b in zip(serial["runs"], parallel["runs"], strict=True):  # each run in its own worker process
        assert (a["estimator"], a["seed"]) == (b["estimator"], b["seed"])
        assert [r["reward"] for r in a["rows"]] == [r["reward"] for r in b["rows"]]
        assert a["eval_end"]["kl_per_prompt"] == b["eval_end"]["kl_per_prompt"] and b["eval_end"]["kl_prompts"] == 2
        assert a["eval_end"]["reward"] == b["eval_end"]["reward"]


# ---- old log-probs from the sampling pass (critic-free modes) --------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_sampling_logprobs_equal_a_forward_pass_of_the_same_policy(tiny, ignore_eos):
    # lora dropout on: eval mode must switch it off
    module = make_module(tiny, ppo={"advantage": "sequence"}, lora={"dropout": 0.1})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a LoRA that moves the policy (a fresh one is the base model: B = 0)
        for name, p in module.policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    data = make_data(tiny)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = {k: v[:8] for k, v in batch.items()}
    torch.manual_seed(0)
    ro = module.rollout(batch, greedy=False, lengths=[8, 3, 5, 8, 1, 7, 8, 2], ignore_eos=ignore_eos,
                        with_logprobs=True)
    module.policy.eval()
    with torch.no_grad():
        forward = response_forward(module.policy, None, ro)["logprobs"]
    mask = ro.response_mask.bool()
    assert ro.logprobs.shape == forward.shape and mask.any()
    torch.testing.assert_close(ro.logprobs[mask], forward[mask], rtol=0, atol=2e-5)
    assert torch.all(ro.logprobs[~mask] == 0)


def test_critic_free_iterations_skip_the_old_logprob_forward(tiny, tmp_path, monkeypatch):
    """GAE needs the value head's pass; the critic-free estimators take the old log-probs from sampling."""
    from rs_lightning.tasks.text import training

    calls = []
    real = training.response_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "response_forward", counted)
    counts = {}
    for advantage in ("gae", "sequence"):
        calls.clear()
        L.seed_everything(0)
        make_trainer(tmp_path / advantage, iterations=1).fit(make_module(tiny, ppo={"advantage": advantage}),
                                                             make_data(tiny))
        counts[advantage] = len(calls)
    # batch 16, mini-batches of 8, 2 PPO epochs: 4 optimisation passes; + reference; + old (GAE only).
    assert counts == {"gae": 6, "sequence": 5}


# ---- bf16-mixed: weights cast once per decode and per iteration, same training bit for bit ----------------------

def test_bf16_mixed_training_same_with_and_without_cast_once(tiny, tmp_path, monkeypatch):
    """`weight_cast_cache` and `frozen_linear_casts` only change how often autocast casts: two PPO iterations under
    Lightning's bf16-mixed give the same adapter, bit for bit, as with both turned into no-ops; the frozen fp32
    weights are the same Parameters before and after."""
    from rs_lightning.tasks.text import module as text_module
    from rs_lightning.tasks.text import training as text_training

    def fit():
        L.seed_everything(0)
        module = make_module(tiny)
        frozen = {n: p for n, p in module.policy.named_parameters() if not p.requires_grad}
        make_trainer(tmp_path, iterations=2, precision="bf16-mixed").fit(module, make_data(tiny))
        after = dict(module.policy.named_parameters())
        assert all(after[n] is p and p.dtype == torch.float32 for n, p in frozen.items())
        return adapter(module)

    cast_once = fit()
    monkeypatch.setattr(text_module, "weight_cast_cache", lambda model: contextlib.nullcontext())
    monkeypatch.setattr(text_training, "frozen_linear_casts", lambda model: contextlib.nullcontext())
    plain = fit()
    assert cast_once.keys() == plain.keys()
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in plain.values())  # it trained
    for key in plain:
        assert torch.equal(cast_once[key], plain[key]), key


@pytest.mark.parametrize("precision, flash_backward", [("bf16-mixed", False), ("32-true", True)])
def test_ppo_minibatch_backward_uses_math_attention_under_bf16_mixed(tiny, tmp_path, precision, flash_backward):
    """Under Lightning's bf16-mixed on CPU the differentiated mini-batch forward runs PyTorch's math attention
    (tasks/cpu_attention.py), whose bf16 backward is the faster one; the rollouts keep flash. fp32 is unchanged."""
    from torch.profiler import ProfilerActivity, profile

    L.seed_everything(0)
    module = make_module(tiny)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        make_trainer(tmp_path, iterations=1, precision=precision).fit(module, make_data(tiny))
    ops = {e.key for e in prof.key_averages() if "attention" in e.key}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, ops  # the rollout's no-grad decode
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops) is flash_backward, ops
    if not flash_backward:
        assert "aten::_scaled_dot_product_attention_math" in ops, ops
