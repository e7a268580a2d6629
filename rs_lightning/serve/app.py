"""The FastAPI application of `rs serve`: the page and its JSON API over one `SoupSession`.

    GET  /                        the page (page.html)
    GET  /static/plotly.min.js    plotly.js from the plotly Python package (the page works offline)
    GET  /api/info                experts, reward names, examples count, the download route
    GET  /api/front               the run's rows: kind, name, weights, rewards (+ intervals when computed)
    GET  /api/examples            the fixed test examples (images as PNG data URIs, or prompts) and each expert's
                                  outputs and per-example rewards on them
    POST /api/soup                {"weights": [...]} -> outputs and rewards of that soup on the examples, the
                                  nearest evaluated point, timings
    GET  /api/soup.safetensors?weights=0.7,0.3    the soup as `rs soup` writes it (full-weight experts)
    GET  /api/soup-adapter.zip?weights=0.7,0.3    the same for LoRA experts: the PEFT adapter folder, zipped

Bad weights (wrong length, negative, NaN, off the simplex, not numbers) answer 422 with the problem named; any
other failure answers 500 with its message, and the server goes on serving. Soups are serialised by the
session's lock: concurrent requests never interleave in the one live module. FastAPI runs these plain `def`
handlers in its thread pool, so a slow soup does not block the event loop.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import tempfile
import threading
import zipfile
from pathlib import Path

from rs_lightning.serve.session import SoupResult, SoupSession

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


def _plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package ({path}): reinstall plotly")
    return path


def _png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN: a non-finite reward is shown as missing


def result_json(session: SoupSession, result: SoupResult) -> dict:
    """The JSON of one soup: what POST /api/soup answers and what the page shows."""
    nearest = session.nearest_row(result.weights)
    return {
        "weights": result.weights,
        "outputs": result.outputs,
        "rewards": {k: [_finite(x) for x in v] for k, v in result.rewards.items()},
        "mean_rewards": {k: _finite(v) for k, v in result.mean_rewards().items()},
        "nearest": None if nearest is None else {"kind": nearest["kind"], "name": nearest["name"],
                                                  "weights": nearest["weights"], "rewards": nearest.get("rewards")},
        "seconds": result.seconds,
    }


def parse_weights_query(text: str) -> list:
    """'0.7,0.3' -> [0.7, 0.3]; a part that is not a number stays a string, so the check names it."""
    out: list = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(float(part))
        except ValueError:
            out.append(part)
    return out


def create_app(session: SoupSession):
    """The FastAPI app serving `session` (see the module docstring for the routes)."""
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from rs_lightning.soup import SoupError

    app = FastAPI(title="rs serve", description="Rewarded soups: explore a front with live soups of its experts")
    download_lock = threading.Lock()  # one soup file written at a time: each holds a whole model in memory

    @app.exception_handler(Exception)
    async def _failure(request: Request, err: Exception):  # the message, not a traceback; the server keeps serving
        log.exception("rs serve: %s %s failed", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"{type(err).__name__}: {err}"})

    def weights_or_422(weights) -> list[float]:
        try:
            return session.check_weights(weights)
        except SoupError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/static/plotly.min.js")
    def plotly_js():
        return FileResponse(_plotly_js(), media_type="application/javascript")

    @app.get("/api/info")
    def info():
        return session.info()

    @app.get("/api/front")
    def front():
        return {"rows": session.front_rows(), "rewards": session.info()["rewards"]}

    @app.get("/api/examples")
    def examples():
        views = []
        for view in session.views:
            item = {k: v for k, v in view.items() if k != "image"}
            if "image" in view:
                item["image"] = _png_uri(view["image"])
            views.append(item)
        experts = [dict(name=name, **result_json(session, r))
                   for name, r in zip(session.expert_names, session.expert_results)]
        return {"examples": views, "experts": experts}

    soup_body = Body(..., examples=[{"weights": [0.7, 0.3]}])

    @app.post("/api/soup")
    def soup(payload: dict = soup_body):
        if not isinstance(payload, dict) or "weights" not in payload:
            raise HTTPException(status_code=422, detail='the body must be a JSON object {"weights": [...]}')
        weights = weights_or_422(payload["weights"])
        return result_json(session, session.soup(weights))

    def _download(weights: str, adapter: bool) -> Response:
        from rs_lightning.commands.front_run import write_soup

        ws = weights_or_422(parse_weights_query(weights))
        if adapter != session.adapters:
            kind, other = ("LoRA adapters", "/api/soup-adapter.zip") if session.adapters else (
                "full weights", "/api/soup.safetensors")
            raise HTTPException(status_code=404, detail=f"this run's experts are {kind}: download from {other}")
        label = "_".join(f"{w:.3g}" for w in ws)
        info = {**session.run.info, "experts": [{**e, "path": p} for e, p in
                                                 zip(session.run.info["experts"], session.expert_paths)]}
        with download_lock, tempfile.TemporaryDirectory(prefix="rs-serve-") as tmp:
            out = Path(tmp) / "soup"  # `rs soup` writes a folder
            with contextlib.redirect_stdout(io.StringIO()):  # its "wrote <tmp folder>" line is noise here
                code = write_soup(info, ws, out)
            if code != 0:
                raise HTTPException(status_code=500, detail=f"rs soup exited with {code} (see the server's log)")
            files = sorted(f for f in out.rglob("*") if f.is_file())
            if adapter:
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                    for f in files:
                        z.write(f, f.relative_to(out))
                data, media, name = buf.getvalue(), "application/zip", f"soup_{label}_adapter.zip"
            else:
                weights_files = [f for f in files if f.suffix == ".safetensors"]
                if len(weights_files) != 1:
                    raise HTTPException(status_code=500, detail=f"rs soup wrote {len(weights_files)} safetensors "
                                        "files, expected one")
                data, media = weights_files[0].read_bytes(), "application/octet-stream"
                name = f"soup_{label}.safetensors"
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/api/soup.safetensors")
    def download(weights: str = Query(..., description="comma-separated, aligned with the experts")):
        return _download(weights, adapter=False)

    @app.get("/api/soup-adapter.zip")
    def download_adapter(weights: str = Query(..., description="comma-separated, aligned with the experts")):
        return _download(weights, adapter=True)

    app.state.session = session
    return app

