"""`rs serve`: explore a finished front in the browser, with live soups of its experts.

    rs serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--examples 8]

RUN_DIR is the `front.out_dir` of a finished `rs front` run (front.jsonl, run.json, config.yaml). The task module
and the experts are loaded once; every move of the weight slider soups in place into the live module and decodes
the fixed test examples (rs_lightning/serve). Open the printed address; the JSON API is listed in the README.
Needs the `serve` extra (fastapi, uvicorn, plotly): `pip install 'rs_lightning[serve]'`.
"""

from __future__ import annotations

import argparse
import sys

PROG = "rs serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="Weights are aligned with the run's experts; two experts: lam = weight of the "
                                       "SECOND.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `rs front` run folder (its front.out_dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--examples", type=int, default=8, help="test examples shown with every soup (default 8)")
    return p


def _port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now, or None (port 0: the system picks a free one)."""
    import socket

    if port == 0:
        return None
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        return err.strerror or str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    from rs_lightning.commands.messages import fail

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not 0 <= args.port <= 65535:
        return fail(PROG, f"--port must be in 0..65535, got {args.port}")
    try:
        import fastapi  # noqa: F401
        import plotly  # noqa: F401
        import uvicorn
    except ImportError as err:
        return fail(PROG, f"{err.name} is not installed: `pip install 'rs_lightning[serve]'` "
                          "(fastapi, uvicorn, plotly)")
    from rs_lightning.serve.app import create_app
    from rs_lightning.serve.session import SoupSession
    from rs_lightning.soup import SoupError

    busy = _port_in_use(args.host, args.port)  # before the slow load, not after it
    if busy:
        return fail(PROG, f"cannot listen on {args.host}:{args.port}: {busy} (pick another --port, or 0 for any)")
    try:
        session = SoupSession.open(args.run_dir, examples=args.examples,
                                   progress=lambda text: print(f"{PROG}: {text}", file=sys.stderr))
    except SoupError as err:  # FrontError included
        return fail(PROG, err)
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # the task failed to build or to decode
        return fail(PROG, f"{args.run_dir}: the run's task could not be prepared: {type(err).__name__}: {err}", 1)
    app = create_app(session)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None):
        await original(sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"{PROG}: serving {args.run_dir} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)

    server.startup = startup
    server.run()
    return 0
