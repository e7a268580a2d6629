"""Diagonal Fisher estimation (rs_lightning.fisher) and `rs fisher` on the captioning task.

The estimator is checked exactly on a model whose per-example gradients are known in closed form (log-likelihood
linear in theta: the gradient of example n is x_n, so F = mean x_n^2), with soup keys that alias parameters and
buffers; then `rs fisher` end to end on a tiny CoCa: the soup's keys, fp32, non-negative, repeatable, and usable
by `rs soup --method fisher`.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from rs_lightning.fisher import diagonal_fisher

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("stat", torch.ones(2))

    def fisher_log_likelihood(self, x):  # [B, 3, 5] -> [B]: linear in w, so d/dw = x_n exactly
        return (x * self.w).sum((1, 2)) + 0.0 * self.frozen.sum()


def test_the_estimator_is_the_mean_of_squared_per_example_gradients():
    torch.manual_seed(0)
    model = Linear()
    xs = torch.randn(7, 3, 5, dtype=torch.float32)
    batches = [xs[:3], xs[3:6], xs[6:]]
    fisher = diagonal_fisher(model, batches, 5)
    want = (xs[:5].double() ** 2).mean(0)
    torch.testing.assert_close(fisher["w"].double(), want, rtol=1e-6, atol=1e-7)
    assert fisher["w"].dtype == torch.float32
    assert torch.equal(fisher["frozen"], torch.zeros(4)) and torch.equal(fisher["stat"], torch.zeros(2))
    # Fewer examples than asked: the mean over those there are.
    torch.testing.assert_close(diagonal_fisher(model, [xs[:2]], 10)["w"].double(), (xs[:2].double() ** 2).mean(0))


def test_the_estimator_refuses_what_it_cannot_do():
    model = Linear()
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        diagonal_fisher(model, [torch.randn(1, 3, 5)], 0)
    with pytest.raises(ValueError, match="loader is empty"):
        diagonal_fisher(model, [], 3)
    with pytest.raises(ValueError, match="no fisher_log_likelihood"):
        diagonal_fisher(nn.Linear(2, 2), [torch.randn(1, 2)], 1)
    with pytest.raises(ValueError, match=r"one value per example"):
        diagonal_fisher(model, [torch.randn(2, 3, 5)], 1, log_likelihood=lambda b: (b * model.w).sum())


@pytest.fixture(scope="module")
def caption_expert(tmp_path_factory):
    pytest.importorskip("open_clip")
    from rs_lightning.tasks.captioning.model import load_coca, save_weights

    d = tmp_path_factory.mktemp("fisher")
    torch.manual_seed(0)
    coca = load_coca("coca-tiny")
    with torch.no_grad():
        coca.text_decoder.text_projection.normal_(0.0, 0.5)
    path = save_weights(coca, d / "expert.safetensors")
    config = d / "task.yaml"
    config.write_text("""
model:
  class_path: rs_lightning.tasks.captioning.module.CaptioningModule
  init_args: {model: coca-tiny, stage: scst, rewards: [bleu1], vocab: train, decoding: {max_length: 8},
               eval_metrics: [bleu1], corpus_metrics: false}
data:
  class_path: rs_lightning.tasks.captioning.data.CaptionDataModule
  init_args: {source: synthetic, model: coca-tiny, num_train: 12, num_val: 2, num_test: 2, batch_size: 4,
               eval_batch_size: 2}
trainer: {accelerator: cpu, devices: 1}
""")
    return d, path, config


def _fisher(d, path, config, out, *extra):
    from rs_lightning.cli import main

    return main(["fisher", "--config", str(config), "--ckpt", str(path), "--out", str(d / out), "--samples", "6",
                 "--progress", "false", *extra])


def test_rs_fisher_writes_the_soups_keys_and_repeats(caption_expert, capsys):
    d, path, config = caption_expert
    assert _fisher(d, path, config, "f1.safetensors") == 0, capsys.readouterr().err
    assert "over 6 examples" in capsys.readouterr().out
    fisher, expert = load_file(str(d / "f1.safetensors")), load_file(str(path))
    assert set(fisher) == {k for k, v in expert.items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 and v.shape == expert[k].shape and bool((v >= 0).all())
               for k, v in fisher.items())
    assert float(fisher["text_decoder.text_projection"].sum()) > 0  # the sampled tokens' logits get gradient
    with safe_open(str(d / "f1.safetensors"), "pt") as f:
        assert f.metadata()["examples"] == "6"
    assert _fisher(d, path, config, "f2.safetensors") == 0
    again = load_file(str(d / "f2.safetensors"))
    assert all(torch.equal(fisher[k], again[k]) for k in fisher)  # seeded: the same samples, the same Fisher


def test_rs_fisher_feeds_the_fisher_soup(caption_expert, capsys):
    from rs_lightning.commands import soup as soup_cmd

    d, path, config = caption_expert
    if not (d / "f1.safetensors").exists():
        assert _fisher(d, path, config, "f1.safetensors") == 0
    out = d / "soup"
    argv = [str(path), str(path), "--lam", "0.3", "--method", "fisher", "--fisher", str(d / "f1.safetensors"),
            str(d / "f1.safetensors"), "--out", str(out)]
    assert soup_cmd.main(argv) == 0, capsys.readouterr().err
    soup, expert = load_file(str(out / "model.safetensors")), load_file(str(path))
    for k, v in expert.items():  # two identical experts: any weighted average is the expert
        torch.testing.assert_close(soup[k], v, rtol=1e-6, atol=1e-6)


def test_rs_fisher_bad_arguments_are_one_line(caption_expert, capsys):
    d, path, config = caption_expert
    assert _fisher(d, path, config, "f.bin") == 2
    assert "give a .safetensors file name" in capsys.readouterr().err
    assert _fisher(d, d / "missing.safetensors", config, "g.safetensors") == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert _fisher(d, path, config, "h.safetensors", "--samples", "0") == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert not (d / "h.safetensors").exists()


def test_text_fisher_covers_the_lora_adapter(tmp_path):
    """The text task: the Fisher of a tiny random Llama's LoRA policy over sampled responses, in adapter keys."""
    import json

    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.tasks.text.data import PromptDataModule
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm
    from rs_lightning.tasks.text.module import TextPPOModule

    tiny_random_causal_lm(save_dir=tmp_path / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "a cat"} for i in range(8)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = TextPPOModule(model=str(tmp_path / "model"), rewards=[KeywordReward(["e"], mode="count", name="e")],
                           lora={"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                           rollout={"eval_max_new_tokens": 4}, ppo={"advantage": "sequence"})
    module.configure_model()
    data = PromptDataModule(source=str(tmp_path / "p.jsonl"), tokenizer=str(tmp_path / "model"), num_val=2,
                            num_test=2, batch_size=2, eval_batch_size=2, prefix_tokens=(0, 0), template="alpaca")
    data.setup("fit")
    torch.manual_seed(0)
    fisher = diagonal_fisher(module, data.train_dataloader(), 3)
    keys = set(module.soup_state_dict())
    assert set(fisher) == keys and any("lora_B" in k for k in keys)
    # LoRA B starts at 0, so the gradient reaches B (through A x) and not yet A (through B): F_B > 0 = F_A.
    assert all(float(v.sum()) > 0 for k, v in fisher.items() if "lora_B" in k)
    assert all(float(v.sum()) == 0 for k, v in fisher.items() if "lora_A" in k)
