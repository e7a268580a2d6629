"""Triton soup kernel: values against a float64 reference, tile/offset math, aliasing, layouts, launches.

CPU tests run the kernel under TRITON_INTERPRET=1 (set in conftest.py) with small tensors and a small BLOCK
so that many tiles and tails are covered cheaply; the `gpu` test runs the compiled kernel at 1e7 elements.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
ti = pytest.importorskip("rs_lightning.soup.triton_impl")

BLOCK = 64  # small tiles: a 200-element tensor spans four programs, the last one masked
SHAPES = [(), (1,), (7,), (3 * BLOCK + 1,), (33, 5), (4, 2, 8)]
# Relative width of one unit in the last place of each dtype (upper bound of ulp(v) / |v|).
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

needs_cpu_kernel = pytest.mark.skipif(not ti.supports(torch.device("cpu")),
                                      reason="needs TRITON_INTERPRET=1 at import")


def _inputs(shapes, dtype, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(k)]


def _assert_soup(out, xs, weights, rtol=None):
    """out ~ sum_k w_k x_k: within one ulp of the float64 value, plus the fp32 accumulation error.

    One ulp covers both round-to-nearest (GPU, fp16) and the interpreter's truncation to bf16."""
    terms = [w * x.double() for w, x in zip(weights, xs)]
    ref = sum(terms)
    scale = sum(t.abs() for t in terms)
    rtol = ULP[out.dtype] if rtol is None else rtol
    tol = rtol * ref.abs() + 4 * len(xs) * 2.0**-24 * scale + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= tol).all()), f"{out.dtype} {tuple(out.shape)}: max error {err.max().item():.3g}"


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_matches_float64_reference(dtype, k):
    xs = _inputs(SHAPES, dtype, k, seed=k)
    weights = [(-1.0) ** i * (0.25 + 0.5 * i) for i in range(k)]  # negative weights included
    outs = [torch.full(s, float("nan"), dtype=dtype) for s in SHAPES]
    ti.weighted_sum_(outs, xs, weights, block=BLOCK)
    for j, out in enumerate(outs):
        _assert_soup(out, [x[j] for x in xs], weights)


@needs_cpu_kernel
def test_default_block_and_fp32_is_tight():
    n = 2 * ti.BLOCK + 3
    xs = _inputs([(n,)], torch.float32, 3)
    out = torch.empty(n)
    ti.weighted_sum_([out], xs, [0.2, 0.3, 0.5])
    ref = sum(w * x[0].double() for w, x in zip([0.2, 0.3, 0.5], xs))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("alias", [0, 2])
def test_output_may_be_a_source(alias):
    xs = _inputs(SHAPES, torch.bfloat16, 3)
    before = [[t.clone() for t in x] for x in xs]
    weights = [0.5, -0.25, 0.75]
    outs = list(xs[alias])
    ti.weighted_sum_(outs, xs, weights, block=BLOCK)
    for j, out in enumerate(outs):
        assert out.data_ptr() == xs[alias][j].data_ptr()
        _assert_soup(out, [x[j] for x in before], weights)


@needs_cpu_kernel
def test_non_contiguous_and_permuted_layouts():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 40, 30, generator=g).to(torch.float16)
    weights = [1.5, -0.5]
    # Source transposed against a contiguous output: copied into the output's layout.
    out = torch.empty(30, 40, dtype=torch.float16)
    ti.weighted_sum_([out], [[a.t()], [b.t().contiguous()]], weights, block=BLOCK)
    _assert_soup(out, [a.t(), b.t()], weights)
    # Everything transposed the same way: dense, used in place without copies.
    out_t = torch.empty(40, 30, dtype=torch.float16).t()
    ti.weighted_sum_([out_t], [[a.t()], [b.t()]], weights, block=BLOCK)
    _assert_soup(out_t, [a.t(), b.t()], weights)
    # Strided output (every other column) that is also source 0.
    base = torch.randn(30, 80, generator=g).to(torch.float16)
    strided = base[:, ::2]
    x0, other = strided.clone(), base[:, 1::2]
    ti.weighted_sum_([strided], [[strided], [other]], weights, block=BLOCK)
    _assert_soup(strided, [x0, other], weights)
    assert torch.equal(base[:, 1::2], other)  # the columns in between are untouched


def _count_launches(monkeypatch):
    launches = []
    kernel = ti._weighted_sum_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ti, "_weighted_sum_kernel", Counting())
    return launches


@needs_cpu_kernel
def test_one_launch_per_dtype_group(monkeypatch):
    launches = _count_launches(monkeypatch)
    shapes = [(1 + 3 * i,) for i in range(50)]
    xs = _inputs(shapes, torch.float32, 3)
    outs = [torch.empty(s) for s in shapes]
    ti.weighted_sum_(outs, xs, [0.2, 0.3, 0.5], block=BLOCK)
    assert len(launches) == 1
    for j, out in enumerate(outs):
        _assert_soup(out, [x[j] for x in xs], [0.2, 0.3, 0.5])
    # Mixed dtypes (alternating bf16 / fp32) and an empty tensor: one launch per dtype, none for the empty one.
    launches.clear()
    mixed = [[t.to(torch.bfloat16) if j % 2 else t for j, t in enumerate(x)] + [torch.empty(0)] for x in xs]
    outs = [torch.empty_like(t) for t in mixed[0]]
    ti.weighted_sum_(outs, mixed, [1.0, -2.0, 2.0], block=BLOCK)
    assert len(launches) == 2
    for j, out in enumerate(outs[:-1]):
        _assert_soup(out, [x[j] for x in mixed], [1.0, -2.0, 2.0])


@needs_cpu_kernel
def test_misaligned_views_get_their_own_launch(monkeypatch):
    launches = _count_launches(monkeypatch)
    flats = [torch.randn(301, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    views = [[f[:100], f[101:301]] for f in flats]  # f[101:] starts 404 bytes in: 4-byte aligned only
    outs = [torch.empty(100), torch.empty(200)]
    ti.weighted_sum_(outs, views, [0.7, 0.3], block=BLOCK)
    assert len(launches) == 2
    for j, out in enumerate(outs):
        _assert_soup(out, [v[j] for v in views], [0.7, 0.3])


@needs_cpu_kernel
def test_new_weights_reuse_cached_tables(monkeypatch):
    # A fresh cache, so what is in it after the first call is this test's tables only.
    monkeypatch.setattr(ti, "_table_cache", type(ti._table_cache)())
    xs = _inputs(SHAPES, torch.float32, 2)
    outs = [torch.empty(s) for s in SHAPES]
    first = None
    for lam in (0.0, 0.3, 1.0, 1.7):
        ti.weighted_sum_(outs, xs, [1.0 - lam or 1e-3, lam or 1e-3], block=BLOCK)
        for j, out in enumerate(outs):
            _assert_soup(out, [x[j] for x in xs], [1.0 - lam or 1e-3, lam or 1e-3])
        # The same tensors with new weights (a front sweep's next lam): the very same table tensors, no new entry.
        tables = {key: (id(meta), id(tiles), n) for key, (meta, tiles, n) in ti._table_cache.items()}
        assert tables, "the launch cached no table"
        first = first or tables
        assert tables == first, f"lam={lam}: new weights built new tables instead of reusing the cached ones"


def test_tile_tables():
    first, tiles = ti.tile_tables([0, 1, 64, 65, 3], block=64)
    assert first == [0, 0, 1, 2, 4]
    assert tiles == [0, 1, 1, 2, 1]


@triton.jit
def _tile_start_probe(out_ptr, pid, first_block, BLOCK: tl.constexpr):
    tl.store(out_ptr, ti._tile_start(pid, first_block, BLOCK))


@needs_cpu_kernel
def test_tile_start_is_int64_past_2_31_elements():
    # The largest int32 program id: pid * BLOCK overflows int32 unless the math is done in int64.
    out = torch.zeros(2, dtype=torch.int64)
    _tile_start_probe[(1,)](out, 2**31 - 1, 5, BLOCK=4096)
    _tile_start_probe[(1,)](out[1:], 2**31 - 1, 2**31 - 3, BLOCK=1024)
    assert out.tolist() == [(2**31 - 6) * 4096, 2 * 1024]


def test_argument_errors():
    xs = [[torch.zeros(3)] for _ in range(ti.MAX_K + 1)]
    with pytest.raises(NotImplementedError):
        ti.weighted_sum_([torch.zeros(3)], xs, [1.0] * (ti.MAX_K + 1))
    with pytest.raises(ValueError):
        ti.weighted_sum_([torch.zeros(3)], xs[:2], [0.5, 0.5], block=48)


@pytest.mark.gpu
def test_gpu_parity_with_torch_bf16():
    if not ti.supports(torch.device("cuda")):
        pytest.skip("the compiled kernel needs TRITON_INTERPRET unset when the module is imported")
    from rs_lightning.soup import torch_impl

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(10_000_000 - 4099,), (4096,), (3,), (1,), (63, 65)]
    xs = [[torch.randn(s, generator=g, device="cuda").to(torch.bfloat16) for s in shapes] for _ in range(3)]
    weights = [0.6, -0.1, 0.5]
    outs = [torch.empty_like(t) for t in xs[0]]
    expected = [torch.empty_like(t) for t in xs[0]]
    ti.weighted_sum_(outs, xs, weights)
    torch_impl.weighted_sum_(expected, xs, weights)
    for j, out in enumerate(outs):
        _assert_soup(out, [x[j] for x in xs], weights, rtol=2.0**-8)  # round to nearest: half an ulp
        diff = (out.float() - expected[j].float()).abs()
        assert bool((diff <= 2.0**-7 * expected[j].float().abs() + 1e-6).all())  # at most one ulp apart
