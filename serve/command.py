"""`metaseg serve`: registered through the `metaseg.commands` entry point (pyproject.toml), so metaseg never imports
the server; its packages are imported only when the command runs, and a missing one names the `serve` extra."""

from __future__ import annotations

import sys
from pathlib import Path

from metaseg.cli import extra_imports, positive_int
from metaseg.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn); other settings: METASEG_* variables")
    p.add_argument("--bundle", help="unetpp, attention_unet or a bundle folder (default: the recorded best)")
    p.add_argument("--weights", type=Path, help="model.pt to serve (default: the bundle's or the record's)")
    p.add_argument("--best", type=Path, help="a best-model record written by `metaseg compare` (default: bundles/best.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=positive_int, default=1, help="server processes, each loading the model (1)")
    p.set_defaults(func=serve)


def serve(args) -> None:
    import copy
    import os

    with extra_imports("serve"):
        import uvicorn
        from pydantic import ValidationError

        from serve.allocator import tune_server_process
        from serve.config import Settings
        from serve.model import resolve

    chosen = {"METASEG_BUNDLE": args.bundle, "METASEG_WEIGHTS": args.weights, "METASEG_BEST_RECORD": args.best}
    os.environ.update({key: str(value) for key, value in chosen.items() if value is not None})  # for every worker
    try:
        settings = Settings()
        model = resolve(settings)  # a missing model is one line here, not a traceback from every worker
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"bad METASEG_{str(first['loc'][0]).upper()} setting: {first['msg']}") from None
    if settings.api_token is None and not _is_loopback(args.host):
        print(f"metaseg: warning: serving on {args.host} without METASEG_API_TOKEN: anyone who can reach this "
              "address can use the model and send it images. Set METASEG_API_TOKEN (the viewer sends it too), or "
              "bind to 127.0.0.1.", file=sys.stderr, flush=True)
    print(f"serving {model.bundle.name} ({model.weights}) on http://{args.host}:{args.port}/docs", flush=True)
    tune_server_process()  # before the model and the first request allocate; workers inherit it (serve/allocator.py)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # uvicorn's, plus the request log of serve/metaseg
    for name in ("serve", "metaseg"):
        log_config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run("serve.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_config=log_config)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
