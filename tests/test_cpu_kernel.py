"""The fused CPU kernel of the soup (rs_lightning.soup.cpu_kernel): exact to one rounding, alias-safe, optional."""

import pytest
import torch

from rs_lightning.soup import SoupError, cpu_kernel, interpolate, torch_impl, values

# The kernel is on by default; RS_SOUP_NATIVE=1 pins it on whatever the caller's environment says.
pytestmark = pytest.mark.skipif(cpu_kernel.build_library() is None,
                                reason="no C++ compiler here: the torch loop is used")


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
    monkeypatch.setenv("RS_SOUP_NATIVE", "1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Awkward sizes: below and around a vector, a cache line, the stripe alignment, several stripes plus a tail.
SIZES = [1, 7, 63, 65, 1000, (1 << 16) + 3, 3 * (1 << 16) + 17]


def _sources(k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


def _weights(k, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.rand(k, generator=g, dtype=torch.float64)
    return (w / w.sum()).tolist()


def _assert_one_rounding(got, xs, weights):
    """|got - round(fp64 sum)| within one output ulp plus the fp32 (fp64) accumulation error."""
    ref = sum(w * x.double() for w, x in zip(weights, xs))
    dtype = got.dtype
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        return
    eps = torch.finfo(dtype).eps
    scale = sum(abs(w) * x.double().abs() for w, x in zip(weights, xs))
    bound = eps * ref.abs() + (len(xs) + 1) * 2**-24 * scale + torch.finfo(dtype).smallest_normal * eps
    err = (got.double() - ref.to(dtype).double()).abs()
    assert torch.all(err <= bound), (dtype, len(xs), err.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 9, 11])  # 1..8: register loops; 9, 11: the L1 block loop
def test_matches_fp64_reference(dtype, k):
    for n in SIZES:
        xs = _sources(k, n, dtype, seed=n)
        weights = _weights(k, seed=n)
        out = torch.empty_like(xs[0])
        assert cpu_kernel.supported(out, xs)
        cpu_kernel.weighted_sum([(out, xs)], weights)
        _assert_one_rounding(out, xs, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_once_to_nearest_even_like_torch(dtype):
    # x + y of two bf16/fp16 values is exact in fp32, so the kernel's only rounding is the final one:
    # it must equal torch's fp32 -> dtype conversion bit for bit (ties to even, overflow to inf, subnormals).
    n = (1 << 16) + 5
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 1 << 16, (2, n), generator=g, dtype=torch.int32).to(torch.int16)
    x, y = bits[0].view(dtype).clone(), bits[1].view(dtype).clone()
    out = torch.empty_like(x)
    cpu_kernel.weighted_sum([(out, [x, y])], [1.0, 1.0])
    want = (x.float() + y.float()).to(dtype)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))
    if dtype == torch.bfloat16:
        assert torch.all(out[nan].view(torch.int16) == 0x7FC0)  # torch's canonical bf16 NaN


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3, 8, 9])
def test_out_may_be_any_source(dtype, k):
    n = 3 * (1 << 16) + 17
    weights = _weights(k)
    want = torch.empty(n, dtype=dtype)
    cpu_kernel.weighted_sum([(want, _sources(k, n, dtype))], weights)
    for alias in range(k):
        xs = _sources(k, n, dtype)
        out = xs[alias]
        assert cpu_kernel.supported(out, xs)
        cpu_kernel.weighted_sum([(out, xs)], weights)
        assert torch.equal(out.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def test_partial_overlap_and_unsupported_layouts_are_refused():
    buf = torch.randn(1 << 17)
    a, b = buf[: 1 << 16], buf[1000 : 1000 + (1 << 16)]
    assert not cpu_kernel.supported(a, [b, b.clone()])
    x = torch.randn(512, 256)
    assert not cpu_kernel.supported(torch.empty(256, 512).t(), [x, x])  # non-contiguous out
    assert not cpu_kernel.supported(torch.empty(512, 256), [x, x.double()])  # mixed dtypes


def test_bit_identical_across_runs_thread_counts_and_splits():
    k, n = 5, 3 * (1 << 16) + 17
    xs = _sources(k, n, torch.bfloat16)
    weights = _weights(k)
    first = torch.empty_like(xs[0])
    cpu_kernel.weighted_sum([(first, xs)], weights)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            again = torch.empty_like(first)
            cpu_kernel.weighted_sum([(again, xs)], weights)
            assert torch.equal(again.view(torch.int16), first.view(torch.int16))
    finally:
        torch.set_num_threads(threads)
    # Many tensors in one call (stripes cross tensor boundaries) give the same bits as one call per tensor.
    parts = [torch.empty(m, dtype=torch.bfloat16) for m in (70001, 5, 1 << 16, 123457)]
    srcs = [_sources(k, p.numel(), torch.bfloat16, seed=p.numel()) for p in parts]
    cpu_kernel.weighted_sum(list(zip(parts, srcs)), weights)
    for p, s in zip(parts, srcs):
        single = torch.empty_like(p)
        cpu_kernel.weighted_sum([(single, s)], weights)
        assert torch.equal(single.view(torch.int16), p.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_loop_fallback_when_the_kernel_is_unavailable(monkeypatch, dtype):
    k, n = 3, 2 * torch_impl.CHUNK + 17
    xs = _sources(k, n, dtype)
    weights = _weights(k)
    fused = torch.empty_like(xs[0])
    torch_impl.weighted_sum_([fused], [[x] for x in xs], weights)
    monkeypatch.setitem(cpu_kernel._state, "lib", None)
    assert not cpu_kernel.supported(fused, xs) and not cpu_kernel.can_check(fused)
    loop = torch.empty_like(xs[0])
    torch_impl.weighted_sum_([loop], [[x] for x in xs], weights)
    _assert_one_rounding(loop, xs, weights)
    _assert_one_rounding(fused, xs, weights)
    assert values.is_finite(loop)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_check_is_exact(dtype):
    n = (1 << 16) + 3
    t = torch.randn(n).to(dtype)
    t[5] = torch.finfo(dtype).max  # huge but finite: not flagged
    t[6] = -torch.finfo(dtype).max
    t[7] = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # subnormal: not flagged
    assert cpu_kernel.any_nonfinite([t]) == [False]
    for value in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, n // 2, n - 1):
            u = t.clone()
            u[pos] = value
            assert cpu_kernel.any_nonfinite([t, u, t]) == [False, True, False]
            assert not values.is_finite(u)


def test_interpolate_names_the_first_nonfinite_source():
    n = (1 << 16) + 3
    sources = [{"a": torch.randn(n), "b": torch.randn(n)} for _ in range(3)]
    sources[2]["a"][10] = float("nan")
    sources[1]["b"][10] = float("inf")
    with pytest.raises(Exception, match="key 'a'.*NaN"):
        interpolate(sources, [0.2, 0.3, 0.5])


def test_on_by_default_and_the_switch_is_checked(monkeypatch):
    monkeypatch.delenv("RS_SOUP_NATIVE")
    assert cpu_kernel.enabled() and cpu_kernel.load() is not None
    monkeypatch.setenv("RS_SOUP_NATIVE", "0")
    assert not cpu_kernel.enabled() and cpu_kernel.load() is None
    monkeypatch.setenv("RS_SOUP_NATIVE", "yes")
    with pytest.raises(SoupError, match="RS_SOUP_NATIVE must be 0 or 1, got 'yes'"):
        interpolate([{"x": torch.ones(70000)}, {"x": torch.zeros(70000)}], [0.5, 0.5])
