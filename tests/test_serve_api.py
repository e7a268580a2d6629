"""`rs serve`'s JSON API: on the quick demo's run, and on a front of two random CoCas (soups that differ).

The served soups are checked against what `rs front` itself measured (the per-example test rewards in
front.jsonl), the download against the soup engine, and the lock by watching the live module.
"""

import base64
import io
import json
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("open_clip")

from fastapi.testclient import TestClient  # noqa: E402

from rs_lightning.front.errors import FrontError  # noqa: E402
from rs_lightning.front.runs import load_run  # noqa: E402
from rs_lightning.serve import SoupSession  # noqa: E402
from rs_lightning.serve.app import create_app  # noqa: E402
from rs_lightning.serve.session import locate  # noqa: E402
from rs_lightning.soup import interpolate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cases import quick_demo_front, random_experts_front, running_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_session(tmp_path_factory):
    return SoupSession.open(quick_demo_front(tmp_path_factory.mktemp("quick")), examples=8)


@pytest.fixture(scope="module")
def random_session(tmp_path_factory):
    # examples = the sweep's eval batch (6): the same batch shapes, so the same arithmetic as the sweep's test_step.
    return SoupSession.open(random_experts_front(tmp_path_factory.mktemp("random")), examples=6)


@pytest.fixture(scope="module")
def quick(quick_session):
    return TestClient(create_app(quick_session))


@pytest.fixture(scope="module")
def rand(random_session):
    return TestClient(create_app(random_session))


def test_info_front_and_examples_describe_the_quick_demo_run(quick, quick_session):
    # Served as the sweep evaluated: in eval mode (trainer.test's teardown restores train mode), on its device.
    assert not quick_session.module.training
    assert quick_session.module.device == quick_session.trainer.strategy.root_device
    info = quick.get("/api/info").json()
    assert info["experts"] == ["bleu1", "rouge_l"] and info["rewards"] == ["bleu1", "rouge_l"]
    assert info["download"] == "/api/soup.safetensors" and info["n_examples"] == 8
    rows = quick.get("/api/front").json()["rows"]
    run = load_run(quick_session.run_dir)
    assert [(r["kind"], r["name"]) for r in rows] == [(r["kind"], r["name"]) for r in run.rows]
    assert {r["kind"] for r in rows} == {"expert", "soup", "init", "morl"}
    expert = next(r for r in rows if r["kind"] == "expert")
    low, high = expert["intervals"]["bleu1"]  # the sweep's paired-bootstrap interval, from summary.json
    assert low <= expert["rewards"]["bleu1"] <= high
    ex = quick.get("/api/examples").json()
    assert len(ex["examples"]) == 8 and [e["name"] for e in ex["experts"]] == ["bleu1", "rouge_l"]
    from PIL import Image

    for view in ex["examples"]:
        assert view["image"].startswith("data:image/png;base64,") and len(view["references"]) == 5
        image = Image.open(io.BytesIO(base64.b64decode(view["image"].split(",", 1)[1])))
        assert image.size == (64, 64)  # the synthetic set's rendering, untransformed
    for expert in ex["experts"]:
        assert len(expert["outputs"]) == 8 and set(expert["rewards"]) == {"bleu1", "rouge_l"}
    page = quick.get("/")
    assert page.status_code == 200 and "/static/plotly.min.js" in page.text
    js = quick.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000  # the whole library, served offline


def test_served_soups_reproduce_the_sweeps_own_per_example_rewards(rand, random_session):
    rows = [r for r in load_run(random_session.run_dir).rows if r["kind"] in ("soup", "expert")]
    assert len(rows) == 3
    outputs = {}
    for row in rows:
        got = rand.post("/api/soup", json={"weights": row["weights"]})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["weights"] == row["weights"]
        for name in ("bleu1", "rouge_l"):
            assert body["rewards"][name] == row["per_example"][name]  # all 6 test images, bit for bit
            assert body["mean_rewards"][name] == pytest.approx(row["rewards"][name], abs=1e-6)
        assert body["nearest"]["name"] == row["name"]
        assert body["seconds"]["merge"] >= 0 and body["seconds"]["decode"] > 0
        outputs[tuple(row["weights"])] = body["outputs"]
    assert len({tuple(o) for o in outputs.values()}) == 3  # the soups write different captions
    ex = rand.get("/api/examples").json()
    assert ex["experts"][0]["outputs"] == outputs[(1.0, 0.0)]
    assert ex["experts"][1]["outputs"] == outputs[(0.0, 1.0)]
    off_grid = rand.post("/api/soup", json={"weights": [0.7, 0.3]}).json()
    assert off_grid["nearest"]["weights"] == [0.5, 0.5]


@pytest.mark.parametrize("body, message", [
    ({"weights": [1.0]}, "got 1 weights for 2 sources"),
    ({"weights": [1.0, 0.0, 0.0]}, "got 3 weights for 2 sources"),
    ({"weights": [-0.5, 1.5]}, "weight 0 is -0.5: rs serve soups on the simplex"),
    ({"weights": [10 ** 400, 0]}, "too large for a float"),
    ({"weights": [0.3, 0.8]}, "sum to 1.1"),
    ({"weights": ["a", 1.0]}, "weight 0 is 'a', not a number"),
    ({"weights": [True, False]}, "weight 0 is True, not a number"),
    ({"weights": 0.5}, "weights must be a list of 2 numbers"),
    ({"lam": 0.5}, '{"weights": [...]}'),
])
def test_bad_weights_answer_422_naming_the_problem(quick, body, message):
    got = quick.post("/api/soup", json=body)
    assert got.status_code == 422 and message in got.json()["detail"], got.text
    assert quick.post("/api/soup", json={"weights": [0.5, 0.5]}).status_code == 200  # still serving


@pytest.mark.parametrize("raw, message", [("[NaN, 1.0]", "weight 0 is nan"), ("[Infinity, 0]", "weight 0 is inf")])
def test_non_finite_weights_answer_422(quick, raw, message):
    got = quick.post("/api/soup", content=f'{{"weights": {raw}}}', headers={"content-type": "application/json"})
    assert got.status_code == 422 and message in got.json()["detail"], got.text
    got = quick.get("/api/soup.safetensors", params={"weights": raw.strip("[]").replace(" ", "")})
    assert got.status_code == 422 and message in got.json()["detail"], got.text


def test_download_is_the_soup_the_engine_computes(quick, quick_session):
    from safetensors.torch import load

    got = quick.get("/api/soup.safetensors", params={"weights": "0.3,0.7"})
    assert got.status_code == 200, got.text
    assert got.headers["content-disposition"] == 'attachment; filename="soup_0.3_0.7.safetensors"'
    soup = load(got.content)
    want = interpolate(quick_session.experts, [0.3, 0.7])
    assert soup.keys() == want.keys() and all(torch.equal(soup[k], want[k]) for k in want)
    bad = quick.get("/api/soup.safetensors", params={"weights": "0.3,x"})
    assert bad.status_code == 422 and "weight 1 is 'x', not a number" in bad.json()["detail"]
    wrong = quick.get("/api/soup-adapter.zip", params={"weights": "0.3,0.7"})
    assert wrong.status_code == 404 and "full weights: download from /api/soup.safetensors" in wrong.json()["detail"]


def test_concurrent_requests_are_serialised(random_session, monkeypatch):
    """Many clients at once on a real server: the live module runs one soup at a time, and every answer is the
    one a lone request gets."""
    import httpx

    weights = [[1 - lam, lam] for lam in (0.1, 0.35, 0.6, 0.9)]
    alone = {tuple(w): random_session.soup(w).outputs for w in weights}
    active, peak, guard = [0], [0], threading.Lock()
    step = random_session.module.serve_step

    def watched(batch):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return step(batch)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(random_session.module, "serve_step", watched)
    with running_server(create_app(random_session)) as url:
        def ask(w):
            return httpx.post(f"{url}/api/soup", json={"weights": w}, timeout=120).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, weights * 3))
    assert peak[0] == 1
    for w, answer in zip(weights * 3, answers):
        assert answer["outputs"] == alone[tuple(w)]


def test_a_failing_request_answers_500_and_the_server_goes_on(quick, quick_session, monkeypatch):
    step = quick_session.module.serve_step
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("decoder exploded")
        return step(batch)

    monkeypatch.setattr(quick_session.module, "serve_step", flaky)
    client = TestClient(create_app(quick_session), raise_server_exceptions=False)
    got = client.post("/api/soup", json={"weights": [0.5, 0.5]})
    assert got.status_code == 500 and got.json()["detail"] == "RuntimeError: decoder exploded"
    assert client.post("/api/soup", json={"weights": [0.5, 0.5]}).status_code == 200
    assert not quick_session.lock.locked()


def test_folders_that_cannot_be_served_are_refused_naming_the_file(quick_session, tmp_path):
    with pytest.raises(FrontError, match="no such run folder"):
        SoupSession.open(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("front.jsonl", "run.json"):
        shutil.copy(quick_session.run_dir / name, partial / name)
    with pytest.raises(FrontError, match="has no config.yaml: only a finished `rs front` run"):
        SoupSession.open(partial)
    shutil.copy(quick_session.run_dir / "config.yaml", partial / "config.yaml")
    info = json.loads((partial / "run.json").read_text())
    (partial / "run.json").write_text(json.dumps({**info, "method": {"name": "ties"}}))
    with pytest.raises(FrontError, match="swept with front.method 'ties': `rs serve` explores linear soups"):
        SoupSession.open(partial)
    with pytest.raises(FrontError, match="--examples must be at least 1, got 0"):
        SoupSession.open(quick_session.run_dir, examples=0)


def test_cli_refuses_a_missing_run_folder(tmp_path, capsys):
    from rs_lightning.commands.serve import main

    assert main([str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "rs serve: error: " in capsys.readouterr().err
    assert main([str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 0..65535, got 70000" in capsys.readouterr().err


def test_a_moved_run_folder_finds_its_checkpoints(tmp_path):
    old_run = tmp_path / "old" / "rep0" / "front"
    new_run = tmp_path / "new" / "rep0" / "front"
    (new_run.parent / "bleu1").mkdir(parents=True)
    (new_run.parent / "bleu1" / "model.safetensors").write_bytes(b"x")
    recorded = str(old_run.parent / "bleu1" / "model.safetensors")
    assert locate(recorded, str(old_run), new_run) == str(new_run.parent / "bleu1" / "model.safetensors")
    with pytest.raises(FrontError, match="does not exist, nor at"):
        locate(str(old_run.parent / "gone.safetensors"), str(old_run), new_run)


def test_a_text_run_shows_prompts_and_downloads_the_adapter_soup(tmp_path_factory):
    import zipfile

    from serve_cases import text_front

    from rs_lightning.soup.lora_io import load_adapter

    session = SoupSession.open(text_front(tmp_path_factory.mktemp("text")), examples=4)
    client = TestClient(create_app(session))
    info = client.get("/api/info").json()
    assert info["download"] == "/api/soup-adapter.zip" and info["rewards"] == ["e", "a"]
    ex = client.get("/api/examples").json()
    assert all("Write a short review of the drug" in e["prompt"] and "image" not in e for e in ex["examples"])
    for row in [r for r in load_run(session.run_dir).rows if r["kind"] in ("soup", "expert")]:
        body = client.post("/api/soup", json={"weights": row["weights"]}).json()
        assert body["rewards"] == row["per_example"] and len(body["outputs"]) == 4
    got = client.get("/api/soup-adapter.zip", params={"weights": "0.25,0.75"})
    assert got.status_code == 200, got.text
    out = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(io.BytesIO(got.content)) as z:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(z.namelist())
        z.extractall(out)
    # What `rs soup` writes for adapters by default: the factors averaged separately (the paper's LoRA soup).
    soup = load_adapter(out).state_dict
    want = interpolate([load_adapter(p).state_dict for p in session.expert_paths], [0.25, 0.75])
    assert soup.keys() == want.keys() and all(torch.equal(soup[k], want[k]) for k in want)
    wrong = client.get("/api/soup.safetensors", params={"weights": "0.25,0.75"})
    assert wrong.status_code == 404 and "LoRA adapters: download from /api/soup-adapter.zip" in wrong.json()["detail"]


def test_three_experts_soup_on_the_simplex(tmp_path_factory):
    session = SoupSession.open(random_experts_front(tmp_path_factory.mktemp("three"), points=3,
                                                    names=("alpha", "beta", "gamma")), examples=6)
    client = TestClient(create_app(session))
    assert client.get("/api/info").json()["experts"] == ["alpha", "beta", "gamma"]
    rows = {tuple(r["weights"]): r for r in load_run(session.run_dir).rows if r["kind"] in ("soup", "expert")}
    uniform = next(w for w in rows if min(w) > 0.3)  # the uniform soup, as the grid wrote its weights
    assert (0.5, 0.5, 0.0) in rows and uniform == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    for weights in [(0.5, 0.5, 0.0), uniform]:
        body = client.post("/api/soup", json={"weights": list(weights)}).json()
        assert body["rewards"] == rows[weights]["per_example"]
    near = client.post("/api/soup", json={"weights": [0.3, 0.35, 0.35]}).json()["nearest"]
    assert near["weights"] == list(uniform)
    got = client.post("/api/soup", json={"weights": [0.5, 0.5]})
    assert got.status_code == 422 and "got 2 weights for 3 sources" in got.json()["detail"]


def test_cli_refuses_a_port_in_use_before_loading_anything(tmp_path, capsys):
    import socket

    from rs_lightning.commands.serve import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main([str(tmp_path / "nowhere"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
