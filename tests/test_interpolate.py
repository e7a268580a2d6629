"""The soup engine's contract: values against an fp64 reference, one-hot exactness, aliasing, errors."""

import pytest
import torch
from torch import nn

from rs_lightning.soup import SoupError, cpu_kernel, interpolate, torch_impl


@pytest.fixture(autouse=True, params=["kernel", "loop"])
def cpu_path(request, monkeypatch):
    """Every contract below holds on both CPU paths: the fused kernel (the default where a C++ compiler is
    found) and the chunked torch loop (RS_SOUP_NATIVE=0, the fallback)."""
    if request.param == "kernel" and cpu_kernel.build_library() is None:
        pytest.skip("no C++ compiler here: only the torch loop runs")
    monkeypatch.setenv("RS_SOUP_NATIVE", "1" if request.param == "kernel" else "0")
    return request.param

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Awkward sizes: 0-d, odd, prime, just past the packing threshold, several chunks with a ragged tail.
SHAPES = [(), (1,), (7,), (3, 5), (257, 3), (torch_impl.SMALL + 3,), (2 * torch_impl.CHUNK + 17,)]


def random_state(seed: int, dtype=torch.float32, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for i, s in enumerate(shapes)}


def reference(sources, weights, key):
    """fp64 sum rounded once to the dtype: what a perfect implementation returns."""
    acc = sum(w * s[key].double() for w, s in zip(weights, sources))
    return acc.to(sources[0][key].dtype)


def assert_close_to_reference(result, sources, weights):
    for key, got in result.items():
        ref = reference(sources, weights, key)
        dtype = got.dtype
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        else:
            # One final rounding (<= 1 ulp of the output dtype) plus the fp32 accumulation error:
            # K+1 fp32 roundings (weights and partial sums), each <= 2^-24 relative to sum |w_i x_i|.
            eps = torch.finfo(dtype).eps
            scale = sum(abs(w) * s[key].double().abs() for w, s in zip(weights, sources))
            subnormal_ulp = torch.finfo(dtype).smallest_normal * eps
            bound = eps * ref.double().abs() + (len(sources) + 1) * 2**-24 * scale + subnormal_ulp
            err = (got.double() - ref.double()).abs()
            assert torch.all(err <= bound), (key, dtype, err.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_fp64_reference(dtype, k):
    sources = [random_state(i, dtype) for i in range(k)]
    g = torch.Generator().manual_seed(100 + k)
    w = torch.rand(k, generator=g, dtype=torch.float64)
    weights = (w / w.sum()).tolist()
    weights[-1] = 1.0 - sum(weights[:-1])
    assert_close_to_reference(interpolate(sources, weights), sources, weights)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_reproduces_each_source_bit_for_bit(dtype):
    sources = [random_state(i, dtype) for i in range(3)]
    sources[0]["t2"][0] = float("inf")  # a zero weight must not turn this into NaN elsewhere
    for i in range(3):
        weights = [0.0, 0.0, 0.0]
        weights[i] = 1.0
        # Source 0 holds an inf on purpose: let it through (refusing it is tested in test_soup_safety.py).
        result = interpolate(sources, weights, allow_nonfinite=True)
        for key in sources[i]:
            assert torch.equal(result[key].view(-1).view(torch.uint8), sources[i][key].view(-1).view(torch.uint8))


def test_bf16_accumulates_in_fp32_and_rounds_once():
    # Many small contributions: a bf16-accumulating sum loses them, fp32 accumulation keeps them.
    k = 8
    base = torch.full((1000,), 1.0, dtype=torch.bfloat16)
    bump = torch.full((1000,), 1.0 + 2**-7, dtype=torch.bfloat16)
    sources = [{"x": base}] * (k - 1) + [{"x": bump}]
    sources = [{"x": s["x"].clone()} for s in sources]
    weights = [1.0 / k] * k
    result = interpolate(sources, weights)["x"]
    assert torch.equal(result, reference(sources, weights, "x"))


def test_extrapolation_needs_the_flag_and_then_is_exact():
    a, b = random_state(0), random_state(1)
    with pytest.raises(SoupError, match="weight 0 is -0.5"):
        interpolate([a, b], [-0.5, 1.5])
    result = interpolate([a, b], [-0.5, 1.5], allow_extrapolation=True)
    assert_close_to_reference(result, [a, b], [-0.5, 1.5])


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.25, 0.75]])
@pytest.mark.parametrize("alias", [0, 1, 2])
def test_out_may_alias_a_source(alias, weights):
    k = len(weights)
    alias = min(alias, k - 1)
    sources = [random_state(i) for i in range(k)]
    expected = {key: reference(sources, weights, key) for key in sources[0]}
    originals = [{key: v.clone() for key, v in s.items()} for s in sources]
    result = interpolate(sources, weights, out=sources[alias])
    for key in expected:
        assert result[key] is sources[alias][key]
        torch.testing.assert_close(result[key], expected[key], rtol=1e-6, atol=1e-6)
    for i in range(k):
        if i != alias:
            for key in sources[i]:
                assert torch.equal(sources[i][key], originals[i][key])


def test_out_module_written_in_place_without_reallocating():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.Linear(9, 3)) for _ in range(2)]
    for e in experts:
        e[1].num_batches_tracked.fill_(4)
        e[1].running_mean.normal_()
    live = nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.Linear(9, 3))
    ptrs = {k: v.data_ptr() for k, v in live.state_dict().items()}
    interpolate(experts, [0.3, 0.7], out=live)
    sds = [e.state_dict() for e in experts]
    for key, value in live.state_dict().items():
        assert value.data_ptr() == ptrs[key]
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.3 * sds[0][key] + 0.7 * sds[1][key])
        else:
            assert torch.equal(value, sds[0][key])


def test_non_floating_tensors_taken_from_the_heaviest_source_when_they_differ():
    a = {"w": torch.zeros(3), "steps": torch.tensor(10)}
    b = {"w": torch.ones(3), "steps": torch.tensor(20)}
    c = {"w": torch.ones(3), "steps": torch.tensor(30)}
    assert interpolate([a, b, c], [0.2, 0.5, 0.3])["steps"].item() == 20
    assert interpolate([a, b, c], [0.4, 0.2, 0.4])["steps"].item() == 10  # ties: the first


def test_tied_weights_in_an_aliased_out_are_written_once():
    shared = torch.randn(4, 6)
    src0 = {"embed": shared, "head": shared}  # one storage under two names, as in tied LM heads
    other = torch.randn(4, 6)
    src1 = {"embed": other, "head": other.clone()}
    expected = 0.5 * shared + 0.5 * other
    interpolate([src0, src1], [0.5, 0.5], out=src0)
    torch.testing.assert_close(src0["head"], expected)


def test_many_small_tensors_take_few_ops():
    # 300 LoRA-sized tensors must not cost ~K ops each: count the torch calls through the profiler.
    sources = [{f"l{i}": torch.randn(8, 33) for i in range(300)} for _ in range(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = interpolate(sources, [0.2, 0.3, 0.5])
    n_add = sum(e.count for e in prof.key_averages() if e.key == "aten::add_")
    assert n_add <= 4
    assert_close_to_reference(result, sources, [0.2, 0.3, 0.5])


def test_non_contiguous_tensors():
    base = [torch.randn(300, 400) for _ in range(2)]
    sources = [{"t": b.t()} for b in base]  # transposed views
    out = {"t": torch.empty(300, 400).t()}
    interpolate(sources, [0.25, 0.75], out=out)
    torch.testing.assert_close(out["t"], 0.25 * base[0].t() + 0.75 * base[1].t())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("t1"), "key 't1' of source 0 is missing from source 1"),
        (lambda s: s.update(extra=torch.zeros(1)), "key 'extra' of source 1 is missing from source 0"),
        (lambda s: s.update(t2=torch.zeros(4)), r"key 't2': source 1 has shape \(4,\), source 0 has \(7,\)"),
        (lambda s: s.update(t2=s["t2"].half()), "key 't2': source 1 has dtype torch.float16"),
    ],
)
def test_incompatible_sources_name_the_key_and_source(mutate, message):
    a, b = random_state(0), random_state(1)
    mutate(b)
    with pytest.raises(SoupError, match=message):
        interpolate([a, b], [0.5, 0.5])


@pytest.mark.parametrize(
    "weights, message",
    [
        ([0.5], "got 1 weights for 2 sources"),
        ([0.5, 0.6], "sum to"),
        ([float("nan"), 1.0], "weight 0 is nan"),
        ([float("inf"), 1.0], "weight 0 is inf"),
        ([], "weights is empty"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(SoupError, match=message):
        interpolate([random_state(0), random_state(1)], weights)


def test_bad_out_and_impl():
    a, b = random_state(0), random_state(1)
    with pytest.raises(SoupError, match="key 't0' of the sources is missing from `out`"):
        interpolate([a, b], [0.5, 0.5], out={})
    bad = {k: v.clone() for k, v in a.items()}
    bad["t3"] = torch.zeros(5, 3)
    with pytest.raises(SoupError, match=r"key 't3': `out` has shape \(5, 3\)"):
        interpolate([a, b], [0.5, 0.5], out=bad)
    with pytest.raises(SoupError, match="impl must be one of"):
        interpolate([a, b], [0.5, 0.5], impl="cuda")
    with pytest.raises(SoupError, match="no sources"):
        interpolate([], [])
    assert isinstance(SoupError("x"), ValueError)


def test_sum_tolerance_is_1e_6():
    a, b = random_state(0), random_state(1)
    interpolate([a, b], [0.5, 0.5 + 5e-7])
    with pytest.raises(SoupError):
        interpolate([a, b], [0.5, 0.5 + 5e-6])


def test_triton_dispatch_matches_torch_path():
    pytest.importorskip("triton")
    from rs_lightning.soup import triton_impl

    if not triton_impl.supports(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    shapes = [(), (7,), (3, 5), (1000,)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        sources = [random_state(i, dtype, shapes) for i in range(3)]
        weights = [0.2, 0.3, 0.5]
        got = interpolate(sources, weights, impl="triton")
        ref = interpolate(sources, weights, impl="torch")
        for key in ref:
            # The interpreter truncates fp32 -> bf16 (the GPU rounds): one bf16 ulp apart at most.
            tol = 2**-7 if dtype == torch.bfloat16 else torch.finfo(dtype).eps
            torch.testing.assert_close(got[key].float(), ref[key].float(), rtol=tol, atol=tol)
        assert_close_to_reference(got, sources, weights)
    sources = [random_state(i, torch.float32, shapes) for i in range(triton_impl.MAX_K + 1)]
    with pytest.raises(SoupError, match="impl='triton' cannot take"):
        interpolate(sources, [1.0 / len(sources)] * len(sources), impl="triton")
