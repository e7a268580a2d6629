"""CUDA checks, skipped without a GPU (`scripts/gpu_check.sh` runs them on a lent GPU machine):

- the compiled Triton soup kernel against a float64 reference, for every dtype, K up to MAX_K, awkward sizes,
  every alignment class, and a tensor past 2^31 elements (int64 tile offsets in compiled code);
- `interpolate(impl="triton")` in place into a live CUDA model, equal to the torch path, one-hot bit-exact,
  output aliasing a source, and a whole lambda sweep reusing its cached tables;
- a few PPO iterations of the text module and SCST steps of the captioning module on the GPU in bf16-mixed
  precision: finite rewards, weights that move, tensors that stay on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

# Where the checks run; a CPU dry run of this file (TRITON_INTERPRET=1) sets it to "cpu" to check the checks.
DEVICE = "cuda"
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _triton():
    ti = pytest.importorskip("rs_lightning.soup.triton_impl")
    if not ti.supports(torch.device(DEVICE)):
        pytest.skip(f"the kernel cannot take {DEVICE} tensors here (compiled: CUDA; interpreter: CPU)")
    return ti


def _assert_soup(out, xs, weights):
    """Compiled code rounds to nearest: half an ulp of the float64 value plus the fp32 accumulation error."""
    terms = [w * x.double() for w, x in zip(weights, xs)]
    ref = sum(terms)
    scale = sum(t.abs() for t in terms)
    # The interpreter (CPU dry run) truncates fp32 -> bf16: a whole ulp there.
    rtol = 2.0**-7 if DEVICE == "cpu" and out.dtype == torch.bfloat16 else HALF_ULP[out.dtype]
    tol = rtol * ref.abs() + 4 * len(xs) * 2.0**-24 * scale + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"{out.dtype} {tuple(out.shape)}: max error {err.max().item():.3g}"


SHAPES = [(), (1,), (7,), (4095,), (4096,), (4097,), (33, 65), (1_000_003,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 5, 16])
def test_kernel_matches_float64_reference(dtype, k):
    ti = _triton()
    g = torch.Generator(device=DEVICE).manual_seed(k)
    # One flat buffer per source, cut into the shapes at offsets of 0, 1 and 3 elements: every alignment class.
    total = sum(int(torch.Size(s).numel()) for s in SHAPES) + 3 * len(SHAPES)
    flats = [torch.randn(total, generator=g, device=DEVICE).to(dtype) for _ in range(k)]
    xs, pos = [[] for _ in range(k)], 0
    for j, shape in enumerate(SHAPES):
        pos += (0, 1, 3)[j % 3]
        n = int(torch.Size(shape).numel())
        for i in range(k):
            xs[i].append(flats[i][pos:pos + n].view(shape))
        pos += n
    weights = [(-1.0) ** i * (0.25 + 0.5 * i) / k for i in range(k)]  # negative weights included
    outs = [torch.full(s, float("nan"), dtype=dtype, device=DEVICE) for s in SHAPES]
    ti.weighted_sum_(outs, xs, weights)
    for j, out in enumerate(outs):
        _assert_soup(out.cpu(), [x[j].cpu() for x in xs], weights)


def test_kernel_past_int32_offsets():
    ti = _triton()
    if DEVICE != "cuda":
        pytest.skip("compiled code only")
    n = 2**31 + 4099  # tiles past pid * BLOCK = 2^31 elements: int32 offsets would wrap here
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2 * n + 2**30:
        pytest.skip("needs about 13 GB of free GPU memory")
    a = torch.full((n,), 2.0, dtype=torch.bfloat16, device=DEVICE)
    b = torch.full((n,), 4.0, dtype=torch.bfloat16, device=DEVICE)
    a[-3:] = torch.tensor([1.0, 8.0, -2.0], dtype=torch.bfloat16)
    out = torch.zeros(n, dtype=torch.bfloat16, device=DEVICE)
    ti.weighted_sum_([out], [[a], [b]], [0.25, 0.75])
    assert out[-3:].float().tolist() == [3.25, 5.0, 2.5]
    for start in (0, 2**31 - 4096, 2**31 - 1, 2**31, n - 4099):  # around the wrap point and the tail tile
        assert bool((out[start:start + 8].float() == 3.5).all()), start
    assert int((out != 3.5).sum()) == 3
    del a, b, out
    torch.cuda.empty_cache()


def _tiny_llama(dtype=torch.bfloat16):
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm

    model, _ = tiny_random_causal_lm(vocab_size=1000, hidden_size=96, num_layers=3)
    return model.to(DEVICE, dtype)


def _experts(model, k: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return [{n: (p + 0.02 * torch.randn(p.shape, generator=g, device=DEVICE).to(p.dtype)).detach()
             for n, p in model.state_dict().items()} for _ in range(k)]


def test_interpolate_in_place_into_a_cuda_model_equals_the_torch_path():
    _triton()
    from rs_lightning.soup import interpolate, lambda_sweep

    model = _tiny_llama()
    experts = _experts(model, 3)
    weights = [0.2, 0.5, 0.3]
    expected = {n: torch.empty_like(t) for n, t in experts[0].items()}
    interpolate(experts, weights, out=expected, impl="torch")
    interpolate(experts, weights, out=model, impl="triton")
    for name, value in model.state_dict().items():
        diff = (value.float() - expected[name].float()).abs()
        assert bool((diff <= 2.0**-7 * expected[name].float().abs() + 1e-6).all()), name  # one bf16 ulp at most
    # One-hot is bit-exact; an output that is also a source is safe.
    interpolate(experts, [0.0, 1.0, 0.0], out=model, impl="triton")
    assert all(torch.equal(v, experts[1][n]) for n, v in model.state_dict().items())
    alias = {n: t.clone() for n, t in experts[0].items()}
    interpolate([alias, experts[1]], [0.5, 0.5], out=alias, impl="triton")
    interpolate([experts[0], experts[1]], [0.5, 0.5], out=expected, impl="triton")
    assert all(torch.equal(alias[n], expected[n]) for n in alias)
    # A lambda sweep: cached tables, every point equal to the torch path within one ulp.
    from rs_lightning.soup import triton_impl

    for pair in lambda_sweep(11):
        interpolate(experts[:2], pair, out=model, impl="triton")
        interpolate(experts[:2], pair, out=expected, impl="torch")
        for name, value in model.state_dict().items():
            diff = (value.float() - expected[name].float()).abs()
            assert bool((diff <= 2.0**-7 * expected[name].float().abs() + 1e-6).all()), (pair, name)
    assert len(triton_impl._table_cache) <= triton_impl._CACHE_SIZE


def _trainer(root, steps: int):
    """bf16-mixed on the GPU; a probe records where the souped tensors live during training (Lightning moves
    the module back to the CPU at teardown, so looking after `fit` says nothing)."""
    import lightning as L

    class Probe(L.Callback):
        def __init__(self):
            self.devices: set[str] = set()

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.devices |= {t.device.type for t in pl_module.soup_state_dict().values()}

    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    return L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_epochs=1,
                     limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root), callbacks=[Probe()])


def _probe(trainer):
    return next(c for c in trainer.callbacks if type(c).__name__ == "Probe")


def _text_ppo(tmp_path, **kwargs):
    import json

    import lightning as L

    from rs_lightning.rewards.rules import KeywordReward
    from rs_lightning.tasks.text.data import PromptDataModule
    from rs_lightning.tasks.text.model_loading import tiny_random_causal_lm
    from rs_lightning.tasks.text.module import TextPPOModule

    tiny_random_causal_lm(save_dir=tmp_path / "model")
    rows = [{"id": str(i), "instruction": f"Write about item {i}.", "reference": "the cat"} for i in range(64)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    module = TextPPOModule(model=str(tmp_path / "model"), rewards=[KeywordReward(["e"], mode="count",
                           whole_word=False, name="e")], lora={"r": 4, "alpha": 8, "dropout": 0.0},
                           ppo={"lr": 1e-2, "epochs": 2, "mini_batch_size": 8},
                           rollout={"response_length": (8, 8), "eval_max_new_tokens": 8}, **kwargs)
    data = PromptDataModule(source=str(tmp_path / "prompts.jsonl"), tokenizer=str(tmp_path / "model"), num_val=8,
                            num_test=8, batch_size=16, eval_batch_size=8, prefix_tokens=(0, 0), template="alpaca")
    return module, data


def test_text_ppo_iterations_on_gpu(tmp_path):
    module, data = _text_ppo(tmp_path)
    before = {n: t.detach().clone() for n, t in module.soup_state_dict().items()}
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert all(v == v for v in metrics.values()), metrics  # no NaN
    after = module.soup_state_dict()
    assert _probe(trainer).devices == {DEVICE}
    assert any(not torch.equal(after[n].cpu(), before[n].cpu()) for n in before)
    result = trainer.test(module, data, verbose=False)[0]
    assert all(v == v for v in result.values()), result


def test_text_ppo_under_fsdp_exports_the_full_adapter(tmp_path):
    """configs/text/news_summary_fsdp.yaml's strategy on one GPU: wrapped decoder layers, use_orig_params, generation
    through the wrapped policy, ExportExpert gathering full state dicts (one rank runs NO_SHARD: the gathers of a
    real multi-GPU run are not exercised here)."""
    if DEVICE != "cuda":
        pytest.skip("FSDP runs on CUDA")
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from rs_lightning.soup import load_adapter
    from rs_lightning.tasks.text.export import ExportExpert

    module, data = _text_ppo(tmp_path, dtype="bfloat16")  # as the config: bf16 base, float32 LoRA factors
    # TextPPOModule.configure_model wraps the policy (with this auto-wrap policy) and the value head as FSDP roots of
    # their own: see rs_lightning/tasks/text/fsdp.py for why the whole LightningModule cannot be the root.
    strategy = FSDPStrategy(sharding_strategy="FULL_SHARD", auto_wrap_policy={LlamaDecoderLayer},
                            state_dict_type="full")
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_epochs=1,
                        limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[ExportExpert(str(tmp_path / "expert"))])
    trainer.fit(module, data)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    assert isinstance(module.policy, FSDP) and isinstance(module.value_head, FSDP)
    wrapped = [m for m in module.policy.modules() if isinstance(m, FSDP)]
    assert len(wrapped) == 1 + 2 + 2 * 4 * 2  # root, 2 decoder layers, lora_A/B of q/k/v/o_proj in each layer
    adapter = load_adapter(tmp_path / "expert")
    assert not any("_fsdp" in k for k in adapter.state_dict), list(adapter.state_dict)[:3]  # PEFT's own names
    lora_b = [v for k, v in adapter.state_dict.items() if "lora_B" in k]
    assert lora_b, list(adapter.state_dict)[:5]
    assert all(bool(torch.isfinite(v).all()) for v in adapter.state_dict.values())
    assert any(bool(v.abs().sum() > 0) for v in lora_b)  # B starts at zero: PPO moved it


def test_captioning_scst_steps_on_gpu(tmp_path):
    pytest.importorskip("open_clip")
    import lightning as L

    from rs_lightning.tasks.captioning.data import CaptionDataModule
    from rs_lightning.tasks.captioning.module import CaptioningModule

    L.seed_everything(0)
    module = CaptioningModule(stage="scst", rewards=["bleu1", "rouge_l"], reward_weights=[0.5, 0.5],
                              eval_metrics=["bleu1", "rouge_l"], corpus_metrics=False, vocab="train",
                              decoding={"max_length": 16})
    data = CaptionDataModule(num_train=64, num_val=8, num_test=16, batch_size=16, eval_batch_size=16, seed=0)
    before = {n: t.detach().clone() for n, t in module.soup_state_dict().items()}
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, data)
    after = module.soup_state_dict()
    assert _probe(trainer).devices == {DEVICE}
    assert any(not torch.equal(after[n].cpu(), before[n].cpu()) for n in before)
    result = trainer.test(module, data, verbose=False)[0]
    assert all(v == v and 0.0 <= v <= 1.0 for k, v in result.items() if "bleu1" in k or "rouge_l" in k), result
