"""TextPPOModule under DDP: 2 CPU processes (ddp_spawn, gloo), several manual backward passes per step.

Each rank rolls out its own prompts; gradients are all-reduced so the adapters stay identical; the logged rewards
are the mean over ranks. Every rank writes what it saw to a file that the test compares.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rs_lightning.rewards.rules import KeywordReward
from rs_lightning.tasks.text.data import PromptDataModule
from rs_lightning.tasks.text.module import TextPPOModule


class RankDump(L.Callback):
    """Writes the prompts, the synced and local rewards and the final adapter of its rank to `out`."""

    def __init__(self, out: str):
        self.out = out
        self.ids: list[str] = []
        self.synced: list[float] = []
        self.local: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ids += list(batch["ids"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.synced.append(float(trainer.callback_metrics["train/reward/e"]))
        self.local.append(float(pl_module.last_iteration["rewards"]["e"].mean()))

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.soup_state_dict(), f"{self.out}/adapter_{rank}.pt")
        info = {"ids": self.ids, "synced": self.synced, "local": self.local, "world": trainer.world_size,
                "kl_coef": float(pl_module.kl_ctl.value)}
        with open(f"{self.out}/rank_{rank}.json", "w") as f:
            json.dump(info, f)


def test_ddp_spawn_two_ranks_keep_identical_adapters(tmp_path):
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    tiny_random_causal_lm(save_dir=tmp_path / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "x"} for i in range(48)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = str(tmp_path / "model")
    L.seed_everything(0)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
    module = TextPPOModule(
        model=model, rewards=[KeywordReward(["e"], mode="count", whole_word=False, name="e")],
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets}, ppo={"lr": 1e-2, "epochs": 2,
        "mini_batch_size": 4}, kl={"init_coef": 0.05}, rollout={"response_length": (6, 6)},
    )
    data = PromptDataModule(source=str(tmp_path / "p.jsonl"), tokenizer=model, num_val=0, num_test=8, batch_size=8,
                            prefix_tokens=(0, 0))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[RankDump(str(tmp_path))])
    trainer.fit(module, data)

    r0, r1 = (json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and len(r0["ids"]) == len(r1["ids"]) == 16
    assert not set(r0["ids"]) & set(r1["ids"]), "both ranks rolled out the same prompts"
    a0, a1 = (torch.load(tmp_path / f"adapter_{r}.pt") for r in (0, 1))
    assert a0.keys() == a1.keys() and all(torch.equal(a0[k], a1[k]) for k in a0), "adapters diverged across ranks"
    assert any(v.abs().sum() > 0 for k, v in a0.items() if "lora_B" in k), "no training happened"
    assert r0["synced"] == r1["synced"]
    for step, synced in enumerate(r0["synced"]):
        assert synced == pytest.approx((r0["local"][step] + r1["local"][step]) / 2, abs=1e-6)
    assert r0["kl_coef"] == r1["kl_coef"]  # the KL controller sees the all-rank mean KL
