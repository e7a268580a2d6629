"""Standalone: rs_lightning.soup.merge vs mergekit (outside reference) on three tiny Llama checkpoints.

Run (mergekit is not a dependency: install it in a folder of its own, e.g.
`.venv/bin/python -m pip install --target ../mkenv --no-deps mergekit immutables`, torch and transformers then
come from the venv):  PYTHONPATH=../mkenv .venv/bin/python scripts/mergekit_parity.py [--keep DIR]

Builds base (init seed 0) and two experts = base + N(0, 0.02^2) (seeds 1, 2), float32 safetensors, untied and
tied embeddings; merges each with mergekit's run_merge (DEFAULT options of each method) and prints, per method,
the max abs difference of
  - ours: rs_lightning.soup.merge (or "not available" while it does not exist),
  - spec: a few-line re-implementation of mergekit's conventions as README "Merge methods" states them
    (a check of that description; it should be 0 or ~1e-8).
Also prints, for slerp, the per-tensor cosine closest to mergekit's lerp-fallback threshold 0.9995.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

WEIGHTS = [0.3, 0.7]
DENSITY = 0.5
NOISE_STD = 0.02
METHODS = ["linear", "task_arithmetic", "ties", "slerp"]


# ----------------------------------------------------------------------------- checkpoints
def save_llama(path, tie, noise_seed):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32) * NOISE_STD)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ----------------------------------------------------------------------------- mergekit
def mergekit_config(method, e1, e2, base):
    models = [{"model": e1, "parameters": {"weight": WEIGHTS[0]}}, {"model": e2, "parameters": {"weight": WEIGHTS[1]}}]
    if method == "linear":
        return {"merge_method": "linear", "models": models}
    if method == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "base_model": base, "models": models}
    if method == "ties":
        for m in models:
            m["parameters"]["density"] = DENSITY
        return {"merge_method": "ties", "base_model": base, "models": models}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": e1, "models": [{"model": e1}, {"model": e2}],
                "parameters": {"t": WEIGHTS[1]}}
    raise ValueError(method)


def run_mergekit(method, root, e1, e2, base):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = os.path.join(root, f"out_{method}")
    config = MergeConfiguration.model_validate(mergekit_config(method, e1, e2, base))
    run_merge(config, out, MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True))
    return load(out)


# ----------------------------------------------------------------------------- ours
def run_ours(method, e1, e2, base):
    try:
        from rs_lightning.soup import merge
    except ImportError:
        return None
    experts = [load(e1), load(e2)]
    if method == "linear":
        return merge(experts, WEIGHTS, method="linear")
    if method == "task_arithmetic":
        return merge(experts, WEIGHTS, method="task_arithmetic", base=load(base))
    if method == "ties":
        return merge(experts, WEIGHTS, method="ties", base=load(base), density=DENSITY)
    return merge(experts, WEIGHTS, method="slerp")


# ----------------------------------------------------------------------------- spec (mergekit 0.1.5 conventions)
def spec_linear(xs, ws):  # mergekit/merge_methods/linear.py::linear_merge, normalize=True
    dt = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    w = torch.tensor(ws, dtype=dt)
    acc = torch.zeros_like(xs[0], dtype=dt)
    for x, c in zip(xs, w):
        acc.addcmul_(x, c)  # fp32 accumulate in input order
    return acc.div_(w.sum()).to(xs[0].dtype)


def spec_magnitude(delta, density):  # mergekit/sparsify.py::magnitude
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def spec_gta(base, xs, ws, *, trim, consensus, normalize, lam=1.0):  # generalized_task_arithmetic.py::merge_group
    deltas = torch.stack([spec_magnitude(x - base, DENSITY) if trim else x - base for x in xs])
    w = torch.tensor(ws, dtype=deltas.dtype).reshape(-1, *([1] * base.ndim))
    deltas = deltas * w  # weights BEFORE sign election
    if consensus:
        majority = (deltas.sum(0) >= 0).to(base.dtype) * 2 - 1  # "sum": sign of the weighted sum, 0 -> +1
        mask = deltas.sign() == majority  # zero (trimmed) entries never agree
        mixed = (deltas * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = deltas.sum(0)
        div = w.sum(0)
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def spec_slerp(t, v0, v1, thr=0.9995, eps=1e-8):  # slerp.py::slerp (one tensor = one flattened vector)
    dt = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1).to(dt), v1.reshape(-1).to(dt)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > thr:
        out = (1 - t) * a + t * b
    else:
        th = torch.acos(dot)
        out = torch.sin((1 - t) * th) / torch.sin(th) * a + torch.sin(t * th) / torch.sin(th) * b
    return out.reshape(v0.shape).to(v0.dtype), dot.item()


def run_spec(method, e1, e2, base):
    s1, s2 = load(e1), load(e2)
    sb = load(base)
    out, dots = {}, {}
    for k in s1:
        if method == "linear":
            out[k] = spec_linear([s1[k], s2[k]], WEIGHTS)
        elif method == "task_arithmetic":
            out[k] = spec_gta(sb[k], [s1[k], s2[k]], WEIGHTS, trim=False, consensus=False, normalize=False)
        elif method == "ties":
            out[k] = spec_gta(sb[k], [s1[k], s2[k]], WEIGHTS, trim=True, consensus=True, normalize=True)
        else:
            out[k], dots[k] = spec_slerp(WEIGHTS[1], s1[k], s2[k])
    return out, dots


def maxdiff(a, b):
    if a is None:
        return "not available"
    if set(a) != set(b):
        return f"KEYS DIFFER: only ours {sorted(set(a) - set(b))}, only mergekit {sorted(set(b) - set(a))}"
    bad_dtype = [k for k in b if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape]
    d = max((a[k].detach().cpu().double() - b[k].double()).abs().max().item() for k in b)
    return f"{d:.3e}" + (f"  (dtype/shape differ: {bad_dtype})" if bad_dtype else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="write the checkpoints here instead of a temporary directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        from importlib.metadata import version

        import mergekit  # noqa: F401

        mk_version = version("mergekit")
    except ImportError as e:
        sys.exit(f"mergekit not importable ({e}); put it on PYTHONPATH (see the docstring)")
    print(f"mergekit {mk_version}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        top = args.keep or tmp
        for tie in (False, True):
            root = os.path.join(top, "tied" if tie else "untied")
            os.makedirs(root, exist_ok=True)
            base = save_llama(os.path.join(root, "base"), tie, None)
            e1 = save_llama(os.path.join(root, "e1"), tie, 1)
            e2 = save_llama(os.path.join(root, "e2"), tie, 2)
            print(f"\n== {'tied' if tie else 'untied'} embeddings ({len(load(e1))} tensors)")
            for method in METHODS:
                t0 = time.perf_counter()
                theirs = run_mergekit(method, root, e1, e2, base)
                ours = run_ours(method, e1, e2, base)
                spec, dots = run_spec(method, e1, e2, base)
                line = (f"{method:16s} ours-vs-mergekit {maxdiff(ours, theirs):>14s}   "
                        f"spec-vs-mergekit {maxdiff(spec, theirs)}")
                if dots:
                    k = min(dots, key=lambda n: abs(abs(dots[n]) - 0.9995))
                    n_lerp = sum(abs(v) > 0.9995 for v in dots.values())
                    line += f"   [{n_lerp}/{len(dots)} tensors lerp; closest cos to 0.9995: {dots[k]:.6f} ({k})]"
                print(line + f"   {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
