"""Merge methods (rs_lightning.soup.methods) against float64 references written here, on awkward sizes.

Each reference is a plain loop over entries in float64, written from the papers' definitions (TIES: trim, elect,
disjoint mean; DARE: drop and rescale; slerp; Fisher averaging), not from the implementation. Results must agree
within one rounding of the output dtype.
"""

import math
import zlib

import pytest
import torch

from rs_lightning.soup import METHODS, SoupError, interpolate, merge

SHAPES = {"w": (7, 13), "b": (13,), "one": (1,), "cube": (3, 5, 2), "scalar": ()}


def _state(seed, dtype=torch.float32, scale=1.0, base=None):
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(s, generator=g, dtype=torch.float64) * scale) for k, s in SHAPES.items()}
    if base is not None:
        sd = {k: base[k].double() + v for k, v in sd.items()}
    return {k: v.to(dtype) for k, v in sd.items()}


def _experts(k, dtype=torch.float32):
    theta0 = _state(100, dtype)
    return theta0, [_state(200 + i, dtype, scale=0.1, base=theta0) for i in range(k)]


def _tol(dtype):
    return {torch.float32: (2e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (8e-3, 1e-2),
            torch.float16: (1e-3, 1e-3)}[dtype]


def _close(got, want64, dtype):
    rtol, atol = _tol(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want64.to(dtype).double(), rtol=rtol, atol=atol)


# -- float64 references -------------------------------------------------------------------------------------

def ref_task_vectors(xs, ws, base, *, trim=None, drop=None, elect=False, normalize=False, scaling=1.0):
    """Entry-by-entry generalized task arithmetic in float64; `drop` = (rate, masks) with masks as given."""
    base = base.double().reshape(-1)
    taus = [x.double().reshape(-1) - base for x in xs]
    if trim is not None:
        trimmed = []
        for t in taus:
            k = max(1, int(trim * t.numel()))
            order = sorted(range(t.numel()), key=lambda j: -abs(float(t[j])))
            keep = set(order[:k])
            trimmed.append(torch.tensor([float(t[j]) if j in keep else 0.0 for j in range(t.numel())],
                                        dtype=torch.float64))
        taus = trimmed
    if drop is not None:
        rate, masks = drop
        taus = [torch.tensor([float(t[j]) / (1 - rate) if bool(m[j]) else 0.0 for j in range(t.numel())],
                             dtype=torch.float64) for t, m in zip(taus, masks)]
    out = []
    for j in range(base.numel()):
        d = [w * float(t[j]) for w, t in zip(ws, taus)]
        agree = [True] * len(d)
        if elect:
            sign = 1.0 if math.fsum(d) >= 0 else -1.0
            agree = [v != 0 and math.copysign(1.0, v) == sign for v in d]
        mixed = math.fsum(v for v, a in zip(d, agree) if a)
        if normalize:
            div = math.fsum(w for w, a in zip(ws, agree) if a)
            mixed = mixed / (div if abs(div) >= 1e-8 else 1.0)
        out.append(float(base[j]) + scaling * mixed)
    return torch.tensor(out, dtype=torch.float64)


def ref_slerp(a, b, t, eps=1e-8, threshold=0.9995):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = math.sqrt(math.fsum(float(v) ** 2 for v in a)), math.sqrt(math.fsum(float(v) ** 2 for v in b))
    ua = [float(v) / na if na > eps else float(v) for v in a]
    ub = [float(v) / nb if nb > eps else float(v) for v in b]
    dot = math.fsum(x * y for x, y in zip(ua, ub))
    if abs(dot) > threshold:
        return torch.tensor([(1 - t) * float(x) + t * float(y) for x, y in zip(a, b)], dtype=torch.float64)
    om = math.acos(dot)
    s0, s1 = math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)
    return torch.tensor([s0 * float(x) + s1 * float(y) for x, y in zip(a, b)], dtype=torch.float64)


def ref_fisher(xs, ws, fs, eps=1e-6):
    xs = [x.double().reshape(-1) for x in xs]
    fs = [f.double().reshape(-1) for f in fs]
    out = []
    for j in range(xs[0].numel()):
        num = math.fsum(w * max(float(f[j]), eps) * float(x[j]) for x, w, f in zip(xs, ws, fs))
        den = math.fsum(w * max(float(f[j]), eps) for w, f in zip(ws, fs))
        out.append(num / den)
    return torch.tensor(out, dtype=torch.float64)


def _dare_masks(seed, key, shapes_n, k, rate):
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    return [(torch.rand(shapes_n, generator=g, dtype=torch.float32) >= rate).reshape(-1) for _ in range(k)]


# -- the methods --------------------------------------------------------------------------------------------

def test_the_registry_names_every_method():
    assert list(METHODS) == ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "fisher"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [2, 3])
def test_task_arithmetic_matches_the_reference(dtype, k):
    theta0, xs = _experts(k, dtype)
    ws = [0.7, -0.2, 0.9][:k]
    got = merge(xs, ws, "task_arithmetic", base=theta0, scaling=0.8, allow_extrapolation=True)
    for key in SHAPES:
        want = ref_task_vectors([x[key] for x in xs], ws, theta0[key], scaling=0.8)
        _close(got[key], want.view(SHAPES[key]), dtype)


def test_task_arithmetic_on_the_simplex_is_the_linear_soup():
    theta0, xs = _experts(3, torch.float64)
    a = merge(xs, [0.2, 0.5, 0.3], "task_arithmetic", base=theta0)
    b = interpolate(xs, [0.2, 0.5, 0.3])
    for key in SHAPES:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_ties_matches_the_reference(dtype, density):
    theta0, xs = _experts(3, dtype)
    ws = [0.5, 0.3, 0.2]
    got = merge(xs, ws, "ties", base=theta0, density=density)
    for key in SHAPES:
        want = ref_task_vectors([x[key] for x in xs], ws, theta0[key], trim=density, elect=True, normalize=True)
        _close(got[key], want.view(SHAPES[key]), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ties_in_half_precision_computes_in_fp32_and_rounds_once(dtype):
    # Half-precision task vectors are coarse, so equal magnitudes at the trim threshold are common and the
    # entry kept among equals is topk's choice: compare with the fp32 merge of the same values instead.
    theta0, xs = _experts(3, dtype)
    got = merge(xs, [0.5, 0.3, 0.2], "ties", base=theta0, density=0.5)
    up = merge([{k: v.float() for k, v in x.items()} for x in xs], [0.5, 0.3, 0.2], "ties",
               base={k: v.float() for k, v in theta0.items()}, density=0.5)
    assert all(torch.equal(got[k], up[k].to(dtype)) for k in SHAPES)


def test_ties_keeps_exactly_k_entries_and_elects_the_weighted_sign():
    base = {"t": torch.zeros(10, dtype=torch.float64)}
    a = {"t": torch.tensor([5.0, -4, 3, -2, 1, 0.5, 0, 0, 0, 0], dtype=torch.float64)}
    b = {"t": torch.tensor([-1.0, 4, -3, 0, 0, 0, 0, 0, 0, 9], dtype=torch.float64)}
    got = merge([a, b], [0.5, 0.5], "ties", base=base, density=0.3)["t"]
    # a keeps 5, -4, 3; b keeps 9, 4, -3; entry 1: -4 vs 4 sums to 0 -> "+" wins; entry 2: 3 vs -3 -> "+".
    torch.testing.assert_close(got, torch.tensor([5.0, 4, 3, 0, 0, 0, 0, 0, 0, 9], dtype=torch.float64))


@pytest.mark.parametrize("name,elect,normalize", [("dare_linear", False, False), ("dare_ties", True, True)])
def test_dare_matches_the_reference_with_its_seeded_masks(name, elect, normalize):
    theta0, xs = _experts(2, torch.float64)
    ws = [0.6, 0.4]
    got = merge(xs, ws, name, base=theta0, drop_rate=0.4, seed=7)
    for key, shape in SHAPES.items():
        masks = _dare_masks(7, key, shape, 2, 0.4)
        want = ref_task_vectors([x[key] for x in xs], ws, theta0[key], drop=(0.4, masks), elect=elect,
                                normalize=normalize)
        _close(got[key], want.view(shape), torch.float64)


def test_dare_is_repeatable_per_key_and_drops_the_asked_fraction():
    theta0 = {"big": torch.zeros(200, 300), "small": torch.zeros(5)}
    xs = [{k: torch.ones_like(v) for k, v in theta0.items()}]
    a = merge(xs, [1.0], "dare_linear", base=theta0, drop_rate=0.9, seed=3)
    b = merge([{"small": xs[0]["small"], "big": xs[0]["big"]}], [1.0], "dare_linear",
              base={"small": theta0["small"], "big": theta0["big"]}, drop_rate=0.9, seed=3)
    assert torch.equal(a["big"], b["big"]) and torch.equal(a["small"], b["small"])  # key order does not matter
    kept = (a["big"] != 0).double().mean().item()
    assert abs(kept - 0.1) < 0.005 and torch.allclose(a["big"][a["big"] != 0], torch.tensor(10.0))
    c = merge(xs, [1.0], "dare_linear", base=theta0, drop_rate=0.9, seed=4)
    assert not torch.equal(a["big"], c["big"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_slerp_matches_the_reference(dtype, t):
    a, b = _state(1, dtype), _state(2, dtype)
    got = merge([a, b], [1 - t, t], "slerp")
    for key in SHAPES:
        _close(got[key], ref_slerp(a[key], b[key], t).view(SHAPES[key]), dtype)
    if t in (0.0, 1.0):
        src = a if t == 0.0 else b
        assert all(torch.equal(got[key], src[key]) for key in SHAPES)


def test_slerp_of_collinear_tensors_is_the_lerp():
    a = {"t": torch.arange(1.0, 8.0, dtype=torch.float64)}
    b = {"t": 3.0 * a["t"]}
    got = merge([a, b], [0.75, 0.25], "slerp")["t"]
    torch.testing.assert_close(got, 0.75 * a["t"] + 0.25 * b["t"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fisher_matches_the_reference(dtype):
    xs = [_state(10 + i, dtype) for i in range(3)]
    fs = [{k: _state(20 + i)[k].abs() ** 3 for k in SHAPES} for i in range(3)]
    fs[1]["w"][0, :5] = 0.0  # below the floor
    ws = [0.2, 0.5, 0.3]
    got = merge(xs, ws, "fisher", fisher=fs)
    for key in SHAPES:
        _close(got[key], ref_fisher([x[key] for x in xs], ws, [f[key] for f in fs]).view(SHAPES[key]), dtype)


def test_fisher_with_equal_fishers_is_the_linear_soup():
    xs = [_state(10 + i, torch.float64) for i in range(2)]
    f = {k: torch.full(s, 0.25, dtype=torch.float64) for k, s in SHAPES.items()}
    got, lin = merge(xs, [0.3, 0.7], "fisher", fisher=[f, f]), interpolate(xs, [0.3, 0.7])
    for key in SHAPES:
        torch.testing.assert_close(got[key], lin[key], rtol=1e-14, atol=1e-14)


def test_linear_is_interpolate_bit_for_bit():
    xs = [_state(i, torch.bfloat16) for i in range(3)]
    a, b = merge(xs, [0.2, 0.3, 0.5]), interpolate(xs, [0.2, 0.3, 0.5])
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)


# -- the shared driver ---------------------------------------------------------------------------------------

def test_non_floating_buffers_follow_the_soup_rule_and_out_is_written_in_place():
    theta0, xs = _experts(2)
    for i, x in enumerate(xs):
        x["steps"] = torch.tensor(10 + i)
    theta0["steps"] = torch.tensor(0)
    out = {k: v.clone() for k, v in xs[0].items()}
    got = merge(xs, [0.3, 0.7], "ties", base=theta0, density=0.5, out=out)
    assert got["steps"].item() == 11 and got["w"].data_ptr() == out["w"].data_ptr()


def test_ties_keeps_an_empty_tensor_empty():
    base = {"e": torch.zeros(0, 3), "w": torch.zeros(4)}
    xs = [{"e": torch.zeros(0, 3), "w": torch.randn(4)} for _ in range(2)]
    got = merge(xs, [0.5, 0.5], "ties", base=base)
    assert got["e"].shape == (0, 3)


def test_writing_into_a_source_reads_it_first():
    theta0, xs = _experts(2, torch.float64)
    want = merge(xs, [0.4, 0.6], "ties", base=theta0, density=0.5)
    aliased = {k: v.clone() for k, v in xs[0].items()}
    merge([aliased, xs[1]], [0.4, 0.6], "ties", base=theta0, density=0.5, out=aliased)
    assert all(torch.equal(aliased[k], want[k]) for k in SHAPES)


BAD = {
    "unknown method": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "magic"), r"unknown merge method 'magic'.*linear"),
    "unknown option": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties", base=t0, densty=0.2),
                       r"no option 'densty'.*density"),
    "density out of range": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties", base=t0, density=1.5),
                             r"density must be in \(0, 1\].*1.5"),
    "drop rate 1": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "dare_ties", base=t0, drop_rate=1.0),
                    r"drop_rate must be in \[0, 1\)"),
    "option of the wrong type": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties", base=t0, density="lots"),
                                 r"density must be a float.*'lots'"),
    "no base": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties"), r"'ties' needs theta_0"),
    "base for linear": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], base=t0), r"'linear' does not use theta_0"),
    "slerp of three": (lambda t0, xs, fs: merge(xs + xs[:1], [0.2, 0.3, 0.5], "slerp"),
                       r"'slerp' merges exactly 2 sources, got 3"),
    "slerp off the simplex": (lambda t0, xs, fs: merge(xs, [0.5, 0.6], "slerp"), r"sum to"),
    "all-zero weights": (lambda t0, xs, fs: merge(xs, [0.0, 0.0], "ties", base=t0), r"all weights are 0"),
    "negative weight": (lambda t0, xs, fs: merge(xs, [-0.5, 1.0], "task_arithmetic", base=t0),
                        r"weight 0 is -0.5 < 0"),
    "no fisher": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "fisher"), r"needs one Fisher file per source"),
    "fisher missing a key": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "fisher",
                                                      fisher=[fs[0], {k: v for k, v in fs[1].items() if k != "b"}]),
                             r"key 'b' is missing from the Fisher of source 1"),
    "negative fisher": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "fisher", fisher=[fs[0], {**fs[1], "b": -fs[1]["b"]}]),
                        r"key 'b': the Fisher of source 1 has negative"),
    "fisher count": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "fisher", fisher=fs[:1]), r"got 1 Fisher files"),
    "base of another shape": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties", base={**t0, "b": torch.zeros(4)}),
                              r"key 'b': base \(theta_0\) has shape \(4,\)"),
    "nan in a source": (lambda t0, xs, fs: merge([{**xs[0], "b": torch.full((13,), float("nan"))}, xs[1]],
                                                 [0.5, 0.5], "ties", base=t0), r"'b'.*NaN"),
    "nan in a zero-weight source": (lambda t0, xs, fs: merge([xs[0], {**xs[1], "b": torch.full((13,), float("nan"))}],
                                                             [1.0, 0.0], "ties", base=t0), r"'b'.*source 1.*NaN"),
    "dot threshold of 1": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "slerp", dot_threshold=1.0),
                           r"dot_threshold must be in \[0, 1\)"),
    "non-integral seed": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "dare_ties", base=t0, seed=1.9),
                          r"seed must be an integer, got 1.9"),
    "negative fisher weight": (lambda t0, xs, fs: merge(xs, [-0.5, 1.5], "fisher", fisher=fs, allow_extrapolation=True),
                               r"'fisher' takes weights >= 0"),
    "impl for ties": (lambda t0, xs, fs: merge(xs, [0.5, 0.5], "ties", base=t0, impl="triton"),
                      r"applies to method 'linear' only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case):
    theta0, xs = _experts(2)
    fs = [{k: v.abs() for k, v in x.items()} for x in xs]
    call, pattern = BAD[case]
    with pytest.raises(SoupError, match=pattern):
        call(theta0, xs, fs)
