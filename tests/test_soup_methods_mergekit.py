"""`rs_lightning.soup.merge` against mergekit (arcee-ai/mergekit), an OUTSIDE reference, never a dependency.

mergekit is not installed in the project environment; this module skips without it. To run the comparison,
install it into a separate directory and put that directory on PYTHONPATH, e.g.

    .venv/bin/python -m pip install --target ../mkenv --no-deps mergekit immutables
    PYTHONPATH=../mkenv .venv/bin/python -m pytest tests/test_soup_methods_mergekit.py

(torch, transformers, safetensors, pydantic, click, tqdm, networkx come from the project venv.)

Three tiny Llama checkpoints are written with `save_pretrained` (float32 safetensors): a base (init seed 0) and
two experts = base + N(0, 0.02^2) noise (seeds 1 and 2). Each method runs through mergekit's Python API
(`MergeConfiguration` + `run_merge`, CPU) with mergekit's DEFAULT options for that method, and through ours:

    linear           merge([e1, e2], [0.3, 0.7], method="linear")            mergekit normalize=True (default)
    task_arithmetic  merge([e1, e2], [0.3, 0.7], method="task_arithmetic", base=base)
                                                                               mergekit normalize=False, lambda=1
    ties             merge([e1, e2], [0.3, 0.7], method="ties", base=base, density=0.5)
                                                                               mergekit normalize=True, lambda=1,
                                                                               consensus "sum", magnitude trim
    slerp            merge([e1, e2], [0.3, 0.7], method="slerp")             mergekit base_model=e1, t=0.7

Every tensor must agree within atol 1e-6 (rtol 0), with the same key set, shape and dtype. Run as a script,
the module prints the numbers instead (max |ours - mergekit| per method, and for slerp how many tensors take its
linear fallback):  PYTHONPATH=../mkenv .venv/bin/python tests/test_soup_methods_mergekit.py
"""

import json

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit (outside reference, not a dependency) is not importable")
# mergekit present but a dependency of it missing (e.g. immutables): skip too, with the import error as reason.
mk_config = pytest.importorskip("mergekit.config")
mk_merge = pytest.importorskip("mergekit.merge")
mk_options = pytest.importorskip("mergekit.options")

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = [0.3, 0.7]
DENSITY = 0.5
NOISE_STD = 0.02
ATOL = 1e-6
METHODS = ["linear", "task_arithmetic", "ties", "slerp"]


def _llama_config(tie: bool):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tie,
    )


def _save_llama(path, tie: bool, noise_seed: int | None):
    import transformers

    torch.manual_seed(0)  # shared init: every folder starts from the same base weights
    model = transformers.LlamaForCausalLM(_llama_config(tie)).to(torch.float32)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():  # tied lm_head shares the embedding Parameter: noised once
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32) * NOISE_STD)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llamas(request, tmp_path_factory):
    tie = request.param
    root = tmp_path_factory.mktemp("llamas_tied" if tie else "llamas_untied")
    return {
        "tie": tie,
        "root": root,
        "base": _save_llama(root / "base", tie, None),
        "e1": _save_llama(root / "e1", tie, 1),
        "e2": _save_llama(root / "e2", tie, 2),
    }


def _load(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _mergekit_config(method: str, m) -> dict:
    e1, e2, base = str(m["e1"]), str(m["e2"]), str(m["base"])
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": e1, "parameters": {"weight": WEIGHTS[0]}},
                {"model": e2, "parameters": {"weight": WEIGHTS[1]}},
            ],
        }
    if method == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": e1, "parameters": {"weight": WEIGHTS[0]}},
                {"model": e2, "parameters": {"weight": WEIGHTS[1]}},
            ],
        }
    if method == "ties":
        return {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": e1, "parameters": {"weight": WEIGHTS[0], "density": DENSITY}},
                {"model": e2, "parameters": {"weight": WEIGHTS[1], "density": DENSITY}},
            ],
        }
    if method == "slerp":
        # mergekit's slerp interpolates from base_model (t=0) to the other model (t=1): base = expert 1 and
        # t = the weight of expert 2, i.e. the same convention as ours (theta(lam) from e1 at 0 to e2 at 1).
        return {
            "merge_method": "slerp",
            "base_model": e1,
            "models": [{"model": e1}, {"model": e2}],
            "parameters": {"t": WEIGHTS[1]},
        }
    raise AssertionError(method)


def _run_mergekit(method: str, m) -> dict[str, torch.Tensor]:
    out = m["root"] / f"out_{method}"
    config = mk_config.MergeConfiguration.model_validate(_mergekit_config(method, m))
    options = mk_options.MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True)
    mk_merge.run_merge(config, str(out), options)
    # The output config is the base model's (slerp: expert 1's); the tie flag must survive.
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is m["tie"]
    return _load(out)


def _run_ours(method: str, m) -> dict[str, torch.Tensor]:
    # Imported here, not at module level: until `merge` exists the tests fail, collection does not error.
    from rs_lightning.soup import merge

    experts = [_load(m["e1"]), _load(m["e2"])]
    if method == "linear":
        return merge(experts, WEIGHTS, method="linear")
    if method == "task_arithmetic":
        return merge(experts, WEIGHTS, method="task_arithmetic", base=_load(m["base"]))
    if method == "ties":
        return merge(experts, WEIGHTS, method="ties", base=_load(m["base"]), density=DENSITY)
    if method == "slerp":
        return merge(experts, WEIGHTS, method="slerp")  # t = WEIGHTS[1]
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_matches_mergekit(llamas, method):
    theirs = _run_mergekit(method, llamas)
    ours = _run_ours(method, llamas)
    inputs = set(_load(llamas["e1"]))

    # Key sets. mergekit writes only the weights its architecture table (_data/architectures/llama.json) lists;
    # for these Llama checkpoints that is every saved key. lm_head.weight is listed as optional with
    # tied_names=[model.embed_tokens.weight]: with tie_word_embeddings=True save_pretrained does not store
    # lm_head.weight, mergekit's planner checks only the name and aliases (not tied_names) for optional weights,
    # logs "Skipping optional weight lm_head.weight" and writes no lm_head either; with untied weights the
    # stored lm_head.weight is merged like any other tensor. Either way the key sets must be identical.
    if llamas["tie"]:
        assert "lm_head.weight" not in inputs
        assert "lm_head.weight" not in theirs, "mergekit now writes a tied lm_head: compare it to our embedding"
    else:
        assert "lm_head.weight" in inputs and "lm_head.weight" in theirs
    assert set(theirs) == inputs, sorted(set(theirs) ^ inputs)
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    assert not only_ours and not only_theirs, {"only ours": only_ours, "only mergekit": only_theirs}

    worst = {}
    for name, ref in theirs.items():
        got = ours[name]
        assert isinstance(got, torch.Tensor), name
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        assert got.dtype == ref.dtype == torch.float32, (name, got.dtype, ref.dtype)
        worst[name] = (got.detach().cpu() - ref).abs().max().item()
    bad = {k: v for k, v in worst.items() if not v <= ATOL}
    assert not bad, f"{method}: {len(bad)} tensors differ from mergekit by > {ATOL}: {bad}"


def _max_differences() -> None:
    """Print max |ours - mergekit| per method and embedding tie (the note's and RESULTS.md's numbers)."""
    import tempfile
    from importlib.metadata import version
    from pathlib import Path

    torch.set_num_threads(1)
    print(f"mergekit {version('mergekit')}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for tie in (False, True):
            root = Path(tmp) / ("tied" if tie else "untied")
            m = {"tie": tie, "root": root, "base": _save_llama(root / "base", tie, None),
                 "e1": _save_llama(root / "e1", tie, 1), "e2": _save_llama(root / "e2", tie, 2)}
            e1, e2 = _load(m["e1"]), _load(m["e2"])
            print(f"== {'tied' if tie else 'untied'} embeddings ({len(e1)} tensors)")
            for method in METHODS:
                theirs, ours = _run_mergekit(method, m), _run_ours(method, m)
                worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
                line = f"{method:16s} max |ours - mergekit| {worst:.3e}"
                if method == "slerp":  # mergekit falls back to the linear merge when |cos| > 0.9995
                    cos = {k: torch.nn.functional.cosine_similarity(e1[k].flatten().double(),
                                                                    e2[k].flatten().double(), dim=0).item()
                           for k in e1}
                    closest = min(cos, key=lambda k: abs(abs(cos[k]) - 0.9995))
                    line += (f"   ({sum(abs(c) > 0.9995 for c in cos.values())}/{len(cos)} tensors take the linear "
                             f"fallback; cos nearest the threshold: {cos[closest]:.5f}, {closest})")
                print(line)


if __name__ == "__main__":
    _max_differences()
