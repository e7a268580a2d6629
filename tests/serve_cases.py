"""Run folders for the tests of `rs serve`: the quick demo's front, and a front of two random CoCas.

The quick demo trains for seconds, so its soups all write the same caption; the browser test needs soups
whose outputs move with lam, which two differently perturbed CoCas (tests/caption_models.py) give.
"""

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from caption_models import perturbed_coca

from rs_lightning.tasks.captioning.model import save_weights


def quick_demo_front(root: Path) -> Path:
    """`rs demo --quick` (1 replicate, 3 points) as a user runs it; returns its front run folder."""
    cmd = [sys.executable, "-m", "rs_lightning.cli", "demo", "--task", "captioning", "--quick", "--points", "3",
           "--replicates", "1", "--out", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "captioning-quick" / "rep0" / "front"


def random_experts_front(root: Path, points: int = 3, names=("alpha", "beta")) -> Path:
    """A finished `rs front` run of perturbed coca-tiny experts (one per name) on 6 synthetic test images
    (greedy); 3 experts sweep the simplex lattice of `points - 1` steps."""
    from rs_lightning.commands import front

    root.mkdir(parents=True, exist_ok=True)
    experts = []
    for seed, name in enumerate(names, start=1):
        path = root / f"expert{seed}.safetensors"
        save_weights(perturbed_coca(seed), path)
        experts.append({"path": str(path), "name": name})
    grid = ({"kind": "sweep", "points": points, "low": 0.0, "high": 1.0} if len(names) == 2
            else {"kind": "lattice", "m": points - 1})
    config = {
        "seed_everything": 0,
        "model": {"class_path": "rs_lightning.tasks.captioning.module.CaptioningModule",
                  "init_args": {"model": "coca-tiny", "stage": "scst", "rewards": ["bleu1"], "vocab": "train",
                                "eval_metrics": ["bleu1", "rouge_l"],
                                "decoding": {"max_length": 10, "eval_decoding": "greedy"}}},
        "data": {"class_path": "rs_lightning.tasks.captioning.data.CaptionDataModule",
                 "init_args": {"source": "synthetic", "model": "coca-tiny", "num_train": 32, "num_val": 4,
                               "num_test": 6, "eval_batch_size": 6, "seed": 0}},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "front": {"experts": experts, "grid": grid, "out_dir": str(root / "front"),
                  "summary": {"rewards": ["bleu1", "rouge_l"], "preferences": [[0.5, 0.5]], "n_boot": 50}},
    }
    cfg = root / "front.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert front.main(["--config", str(cfg), "--no-progress"]) == 0
    return root / "front"


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0):
    """Serve `app` with uvicorn on a free localhost port in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


TEXT_MODEL = {
    "class_path": "rs_lightning.tasks.text.module.TextPPOModule",
    "init_args": {
        "model": "tiny-random", "reward_weights": [0.5, 0.5],
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "rollout": {"eval_max_new_tokens": 6},
        "rewards": [{"class_path": "rs_lightning.rewards.rules.KeywordReward",
                     "init_args": {"keywords": ["e"], "mode": "count", "whole_word": False, "name": "e"}},
                    {"class_path": "rs_lightning.rewards.rules.KeywordReward",
                     "init_args": {"keywords": ["a"], "mode": "count", "whole_word": False, "name": "a"}}],
    },
}
TEXT_DATA = {
    "class_path": "rs_lightning.tasks.text.data.PromptDataModule",
    "init_args": {"source": "drug_reviews", "tokenizer": "tiny-random", "template": "chat", "prefix_tokens": [0, 0],
                  "num_train": 8, "num_val": 4, "num_test": 4, "batch_size": 4, "eval_batch_size": 4},
}


def text_front(root: Path) -> Path:
    """A finished `rs front` run of two LoRA experts (PEFT adapter folders) of the tiny random Llama: the
    text family's layout, prompts as inputs, adapter soups."""
    import torch
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningModule

    from rs_lightning.commands import front
    from rs_lightning.tasks.text.export import export_expert

    root.mkdir(parents=True, exist_ok=True)
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningModule, "model")
    module = parser.instantiate_classes(parser.parse_object({"model": TEXT_MODEL})).model
    module.configure_model()
    start = {k: v.detach().clone() for k, v in module.soup_state_dict().items()}
    experts = []
    for seed, name in ((1, "alpha"), (2, "beta")):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, value in module.soup_state_dict().items():
                value.copy_(start[key] + 0.5 * torch.randn(value.shape, generator=gen))
        experts.append({"path": str(export_expert(module, root / name)), "name": name})
    config = {
        "seed_everything": 0, "model": TEXT_MODEL, "data": TEXT_DATA, "trainer": {"accelerator": "cpu", "devices": 1},
        "front": {"experts": experts, "grid": {"kind": "sweep", "points": 3, "low": 0.0, "high": 1.0},
                  "out_dir": str(root / "front"),
                  "summary": {"rewards": ["e", "a"], "preferences": [[0.5, 0.5]], "n_boot": 50}},
    }
    cfg = root / "front.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert front.main(["--config", str(cfg), "--no-progress"]) == 0
    return root / "front"
