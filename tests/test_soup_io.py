"""Checkpoint I/O of the soup engine: every source format, sharded atomic output, streaming merge, errors.

The streaming test runs a real merge of 3 x 256 MiB checkpoints in a subprocess and bounds its peak RSS.
"""

import json
import os
import pathlib
import random
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rs_lightning.soup import SoupError, io, sources, writer
from rs_lightning.soup.io import check_sources, merge_files, open_source, save_safetensors


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny network's state dict: fp32 weights, a bf16 copy, an int64 BatchNorm counter."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    net[1].num_batches_tracked.fill_(seed + 1)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["head.weight"] = torch.randn(3, 8).bfloat16()
    return sd


def assert_same(got, want):
    assert set(got.keys()) == set(want.keys())
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def write_format(fmt: str, sd: dict, folder: pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """Save `sd` in format `fmt` under `folder`; return (source path, prefix to read it back)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors-file":
        save_file(sd, folder / "w.safetensors")
        return folder / "w.safetensors", None
    if fmt == "hf-folder":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return folder, None
    if fmt == "hf-sharded":
        keys = list(sd)
        shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, folder / name)
        weight_map = {k: name for name, ks in shards.items() for k in ks}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return folder, None
    if fmt == "lightning-ckpt":
        # What Lightning writes: the module's attributes prefix the keys; hparams hold non-tensor objects
        # (a pathlib.Path here) that torch.load(weights_only=True) refuses on its own.
        ckpt = {"state_dict": {f"policy.{k}": v for k, v in sd.items()} | {"critic.w": torch.ones(2)},
                "epoch": 0, "hyper_parameters": {"out": pathlib.Path("/tmp/x")}, "optimizer_states": []}
        torch.save(ckpt, folder / "m.ckpt")
        return folder / "m.ckpt", "policy."
    if fmt in ("pt", "bin"):
        torch.save(sd, folder / f"w.{fmt}")
        return folder / f"w.{fmt}", None
    if fmt == "pytorch_model.bin-folder":
        torch.save(sd, folder / "pytorch_model.bin")
        return folder, None
    raise AssertionError(fmt)


FORMATS = ["safetensors-file", "hf-folder", "hf-sharded", "lightning-ckpt", "pt", "bin", "pytorch_model.bin-folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_source_round_trip(tmp_path, fmt):
    sd = tiny_state(0)
    path, prefix = write_format(fmt, sd, tmp_path / fmt)
    with open_source(path, prefix=prefix) as src:
        assert {k: src.info(k) for k in sd} == {k: io.TensorInfo(tuple(v.shape), v.dtype) for k, v in sd.items()}
        assert_same(dict(src), sd)
        assert src.total_bytes == sum(v.numel() * v.element_size() for v in sd.values())


def test_peft_adapter_folder_opens_through_lora(tmp_path):
    sd = {"base_model.model.l.lora_A.weight": torch.randn(2, 4), "base_model.model.l.lora_B.weight": torch.randn(4, 2)}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(sd, tmp_path / "adapter_model.safetensors")
    src = open_source(tmp_path)
    assert src.kind == "peft-adapter" and src.adapter.config["r"] == 2
    assert_same(dict(src), sd)


class Noisy:
    """A pickled object whose unpickling has a side effect (touches a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        pathlib.Path(state["marker"]).touch()


def test_ckpt_foreign_objects_never_run_their_code(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"x": Noisy(tmp_path / "ran")}},
               tmp_path / "noisy.ckpt")
    assert list(open_source(tmp_path / "noisy.ckpt")) == ["w"]  # Noisy became an inert stand-in
    assert not (tmp_path / "ran").exists()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(SoupError, match="evil.ckpt pickles a call to posix.system, which no checkpoint needs"):
        open_source(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("prefix", [None, "net."])
def test_metadata_and_validation_read_no_tensor(tmp_path, monkeypatch, prefix):
    sds = [{f"{prefix or ''}{k}": v for k, v in tiny_state(i).items()} for i in range(2)]
    paths = [write_format("hf-sharded", sd, tmp_path / str(i))[0] for i, sd in enumerate(sds)]
    monkeypatch.setattr(sources.SafetensorsSource, "__getitem__", lambda self, k: pytest.fail(f"read {k}"))
    srcs = [open_source(p, prefix=prefix) for p in paths]
    assert check_sources(srcs) == list(srcs[0]) and "0.weight" in srcs[0]
    assert srcs[0].infos()["0.weight"] == io.TensorInfo((8, 4), torch.float32)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 100])
def test_save_safetensors_single_and_sharded(tmp_path, max_shard_bytes):
    sd = tiny_state(0)
    res = save_safetensors(sd, tmp_path / "out", max_shard_bytes=max_shard_bytes, metadata={"note": "x"})
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert sorted(res.files) == files and res.n_tensors == len(sd)
    if max_shard_bytes > 10**6:
        assert files == ["model.safetensors"] and not (tmp_path / "out" / sources.INDEX_FILE).exists()
    else:
        n = len(files)
        assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == res.total_bytes == sum(v.nbytes for v in sd.values())
        assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == set(files)
        for name, file in index["weight_map"].items():  # each tensor is where the index says, per safetensors
            assert torch.equal(load_file(tmp_path / "out" / file)[name], sd[name])
    for f in files:
        with safe_open(tmp_path / "out" / f, "pt") as h:
            assert h.metadata() == {"format": "pt", "note": "x"}
    assert_same(dict(open_source(tmp_path / "out")), sd)


def test_save_safetensors_from_iterator(tmp_path):
    sd = tiny_state(1)
    save_safetensors(iter(sd.items()), tmp_path / "out", max_shard_bytes=64)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert_same(dict(open_source(tmp_path / "out")), sd)
    with pytest.raises(SoupError, match="'a' is given twice"):
        save_safetensors(iter([("a", torch.ones(1)), ("a", torch.ones(1))]), tmp_path / "dup")


def reference_soup(sds, weights):
    out = {}
    for k, t in sds[0].items():
        if t.is_floating_point():
            out[k] = sum(w * sd[k].double() for w, sd in zip(weights, sds)).to(t.dtype)
        else:
            out[k] = sds[max(range(len(weights)), key=lambda i: weights[i])][k]
    return out


def test_merge_files_values_formats_and_soup_json(tmp_path):
    sds = [tiny_state(i) for i in range(3)]
    paths = [write_format(fmt, sd, tmp_path / fmt)[0] for fmt, sd in zip(["hf-folder", "hf-sharded", "pt"], sds)]
    (tmp_path / "hf-folder" / "config.json").write_text(json.dumps({"model_type": "x", "torch_dtype": "float32"}))
    ws = [0.2, 0.3, 0.5]
    res = merge_files(paths, ws, tmp_path / "out", max_shard_bytes=200)
    got, ref = dict(open_source(tmp_path / "out")), reference_soup(sds, ws)
    assert set(got) == set(ref) and res.n_tensors == len(ref) and len(res.files) > 1
    for k in ref:
        assert got[k].dtype == ref[k].dtype
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0 if got[k].dtype == torch.int64 else 1e-2)
    torch.testing.assert_close(got["0.weight"], ref["0.weight"], rtol=1e-6, atol=1e-6)
    record = json.loads((tmp_path / "out" / "soup.json").read_text())
    assert record["weights"] == ws and record["sources"] == [str(p) for p in paths] and record["mode"] == "full"
    assert record["rs_lightning_version"] and record["created"] and record["dtype"] is None
    assert record["dtypes"] == {"bfloat16": 1, "float32": 8, "int64": 1}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "x"  # config copied


def test_merge_files_one_hot_is_exact_and_skips_the_rest(tmp_path, monkeypatch):
    sds = [tiny_state(i) for i in range(2)]
    paths = [write_format("safetensors-file", sd, tmp_path / str(i))[0] for i, sd in enumerate(sds)]
    merge_files(paths, [0.0, 1.0], tmp_path / "out")
    assert_same(dict(open_source(tmp_path / "out")), sds[1])


def test_merge_files_dtype_cast_and_extrapolation(tmp_path):
    sds = [tiny_state(i) for i in range(2)]
    paths = [write_format("safetensors-file", sd, tmp_path / str(i))[0] for i, sd in enumerate(sds)]
    with pytest.raises(SoupError, match="allow_extrapolation"):
        merge_files(paths, [-0.5, 1.5], tmp_path / "x")
    merge_files(paths, [-0.5, 1.5], tmp_path / "out", dtype="float32", allow_extrapolation=True)
    got = dict(open_source(tmp_path / "out"))
    assert got["head.weight"].dtype == torch.float32  # bf16 widened BEFORE the sum: exact in fp32
    want = -0.5 * sds[0]["head.weight"].double() + 1.5 * sds[1]["head.weight"].double()
    torch.testing.assert_close(got["head.weight"], want.float(), rtol=1e-6, atol=1e-6)
    assert got["1.num_batches_tracked"].dtype == torch.int64
    merge_files(paths, [0.5, 0.5], tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in dict(open_source(tmp_path / "bf16")).values()} == {torch.bfloat16, torch.int64}


def test_merge_files_lightning_ckpt_with_prefix(tmp_path):
    sds = [tiny_state(i) for i in range(2)]
    paths = [write_format("lightning-ckpt", sd, tmp_path / str(i))[0] for i, sd in enumerate(sds)]
    merge_files(paths, [0.5, 0.5], tmp_path / "out", prefix="policy.")
    assert set(open_source(tmp_path / "out")) == set(sds[0])


def fail_after_first_shard(monkeypatch):
    real, calls = writer._write_file, []

    def flaky(*args, **kwargs):
        if calls:
            raise RuntimeError("disk full")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_file", flaky)


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    paths = [write_format("safetensors-file", tiny_state(i), tmp_path / str(i))[0] for i in range(2)]
    fail_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_files(paths, [0.5, 0.5], tmp_path / "out", max_shard_bytes=100)
    with pytest.raises(RuntimeError, match="disk full"):
        save_safetensors(tiny_state(0), tmp_path / "out", max_shard_bytes=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]  # no output, no temporary folder


def test_overwrite_rules_and_failed_overwrite_keeps_old(tmp_path, monkeypatch):
    paths = [write_format("safetensors-file", tiny_state(i), tmp_path / str(i))[0] for i in range(2)]
    merge_files(paths, [1.0, 0.0], tmp_path / "out")
    with pytest.raises(FileExistsError, match="out"):
        merge_files(paths, [0.0, 1.0], tmp_path / "out")
    with pytest.raises(SoupError, match="out_dir .* is the input .*out: writing there would overwrite"):
        merge_files([tmp_path / "out", paths[1]], [0.5, 0.5], tmp_path / "out", overwrite=True)
    fail_after_first_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        merge_files(paths, [0.0, 1.0], tmp_path / "out", overwrite=True, max_shard_bytes=100)
    assert_same(dict(open_source(tmp_path / "out")), tiny_state(0))
    monkeypatch.undo()
    merge_files(paths, [0.0, 1.0], tmp_path / "out", overwrite=True)
    assert_same(dict(open_source(tmp_path / "out")), tiny_state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "out"]


def test_errors_name_the_key_and_the_file(tmp_path):
    a = write_format("safetensors-file", tiny_state(0), tmp_path / "a")[0]
    variants = {
        "missing": {k: v for k, v in tiny_state(1).items() if k != "2.bias"},
        "extra": tiny_state(1) | {"zz.extra": torch.ones(1)},
        "shape": tiny_state(1) | {"2.bias": torch.ones(4)},
        "dtype": tiny_state(1) | {"2.bias": torch.ones(3, dtype=torch.float16)},
    }
    expected = {"missing": "'2.bias' of source 0 .* is missing from source 1", "extra": "'zz.extra' of source 1",
                "shape": "'2.bias': source 1 .* has shape", "dtype": "'2.bias': source 1 .* has dtype"}
    for name, sd in variants.items():
        b = write_format("safetensors-file", sd, tmp_path / name)[0]
        with pytest.raises(SoupError, match=expected[name]) as err:
            merge_files([a, b], [0.5, 0.5], tmp_path / "out")
        assert str(b) in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SoupError, match="2 weights for 3 sources"):
        merge_files([a, a, a], [0.5, 0.5], tmp_path / "out")


def test_source_errors(tmp_path):
    junk = random.Random(0).randbytes(64)
    with pytest.raises(SoupError, match="no such file or folder: .*nope.safetensors"):
        open_source(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(SoupError, match="unknown checkpoint format '.onnx'"):
        open_source(tmp_path / "w.onnx")
    (tmp_path / "junk.safetensors").write_bytes(junk)
    with pytest.raises(SoupError, match="junk.safetensors is not a valid safetensors file"):
        open_source(tmp_path / "junk.safetensors")
    save_file(tiny_state(0), tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(SoupError, match="cut.safetensors is not a valid safetensors file"):
        open_source(tmp_path / "cut.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(junk)
    with pytest.raises(SoupError, match="junk.ckpt is neither a zip-format torch checkpoint"):
        open_source(tmp_path / "junk.ckpt")
    torch.save({"epoch": 0}, tmp_path / "nosd.ckpt")
    with pytest.raises(SoupError, match="no 'state_dict'"):
        open_source(tmp_path / "nosd.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoupError, match="not a model or adapter folder"):
        open_source(tmp_path / "empty")
    bad_prefix = "prefix 'model.' matches no key of .*w.safetensors; its keys start with: 0., 1., 2., head."
    with pytest.raises(SoupError, match=bad_prefix):
        open_source(write_format("safetensors-file", tiny_state(0), tmp_path / "ok")[0], prefix="model.")
    sharded = write_format("hf-sharded", tiny_state(0), tmp_path / "sh")[0]
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SoupError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        open_source(sharded)


# The child imports exactly what a user of `rs soup` would, merges three one-tensor files once (the one-time cost of
# a first merge: the CPU kernel's library and threads, OpenMP, code pages, allocator arenas), then merges the models;
# it reports its RSS right before that merge and its peak RSS (VmHWM) after it.
CHILD = textwrap.dedent("""
    import json, sys, threading, time
    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
    import torch, safetensors
    from rs_lightning.soup.io import merge_files
    warm = sys.argv[2:5]
    merge_files(warm, [0.2, 0.3, 0.5], sys.argv[1] + "-warm-up")
    # RssAnon is the memory the merge allocates; VmRSS also counts the pages of the memory-mapped sources that
    # the kernel keeps resident (page cache, reclaimable, and machine-state dependent). Its peak is sampled.
    peak_anon, done = [status("RssAnon")], threading.Event()
    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            time.sleep(0.0005)
    base_rss, base_peak, base_anon = status("VmRSS"), status("VmHWM"), status("RssAnon")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    res = merge_files(sys.argv[5:], [0.2, 0.3, 0.5], sys.argv[1], max_shard_bytes=64 * 2**20)
    done.set()
    sampler.join()
    heavy = sorted(m for m in ("lightning", "pytorch_lightning", "peft", "transformers") if m in sys.modules)
    print(json.dumps({"base_rss": base_rss, "base_peak": base_peak, "peak": status("VmHWM"), "files": res.files,
                      "base_anon": base_anon, "peak_anon": peak_anon[0], "heavy": heavy}))
""")


def test_streaming_merge_peak_memory(tmp_path):
    """K=3 files of 256 MiB (32 tensors of 8 MiB): the merge's peak RSS grows by a few tensors, not models."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"expert{i}.safetensors")
        noise = torch.randn(1024, 2048, generator=g)  # one draw per file, shifted per tensor: cheap to make
        save_file({f"layer{j}.weight": noise + j for j in range(32)}, paths[-1])
    file_bytes = paths[0].stat().st_size
    warm = []
    for i in range(3):  # one 8 MiB tensor each: the warm-up merge
        warm.append(tmp_path / f"warm{i}.safetensors")
        save_file({"layer0.weight": torch.randn(1024, 2048, generator=g)}, warm[-1])
    # glibc keeps freed 8 MiB blocks in its heap once its mmap threshold has adapted, so RSS would measure the
    # allocator's caching (40-96 MiB seen) as much as what the merge holds: large blocks are mmapped here, and
    # returned when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), *map(str, warm), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = {k: v / 2**20 for k, v in report.items() if k in ("base_rss", "base_peak", "peak")}
    growth = report["peak"] - report["base_rss"]  # stricter than peak - base_peak (import transients)
    anon = report["peak_anon"] - report["base_anon"]
    print(f"\nstreaming merge of 3 x {file_bytes / 2**20:.0f} MiB: RSS before {mib['base_rss']:.0f} MiB "
          f"(peak after imports {mib['base_peak']:.0f} MiB), merge peak {mib['peak']:.0f} MiB, "
          f"growth {growth / 2**20:.1f} MiB (allocated: {anon / 2**20:.1f} MiB)")
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 >= report["peak"]
    # Holding the models would allocate 3 x 256 MiB. Streaming allocates (K+1) x 8 MiB of tensors whatever the
    # model size (32 MiB measured): a third of one file bounds what the merge allocates (RssAnon, sampled). The
    # whole RSS, which may also count resident pages of the memory-mapped sources, must stay below one model.
    assert anon < file_bytes / 3, f"the merge allocated {anon / 2**20:.0f} MiB at its peak"
    assert growth < file_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert report["heavy"] == [], "the soup engine must not import Lightning, peft or transformers"
    assert len(report["files"]) == 4  # 256 MiB of output in 64 MiB shards
    handles = [safe_open(p, "pt") for p in paths]
    out = open_source(tmp_path / "out")
    assert sorted(out) == sorted(handles[0].keys())
    for k in out:
        want = sum(w * h.get_tensor(k) for w, h in zip([0.2, 0.3, 0.5], handles))
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=1e-6)
