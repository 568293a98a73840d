"""`metaseg ui`: registered through the `metaseg.commands` entry point (pyproject.toml), so metaseg never imports
the viewer. Streamlit runs as a child process, and stopping `metaseg ui` (Ctrl-C, SIGTERM) stops it too."""

from __future__ import annotations

import sys

from metaseg.cli import extra_imports
from metaseg.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the Streamlit viewer, a client of a running `metaseg serve`")
    p.add_argument("--server", help="the server's URL (default: METASEG_SERVER, else http://127.0.0.1:8000)")
    p.add_argument("--host", default="127.0.0.1", help="address the viewer listens on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=ui)


def ui(args) -> None:
    import os
    import signal
    import subprocess

    with extra_imports("ui"):
        import streamlit  # noqa: F401  (it runs in the child: missing, it is this one line, not the child's traceback)

        from ui import APP
        from ui.client import DEFAULT_SERVER

    server = args.server or os.environ.get("METASEG_SERVER") or DEFAULT_SERVER
    print(f"viewer on http://{args.host}:{args.port}, a client of the metaseg server at {server}", flush=True)
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
               "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "viewer"]
    # SIGTERM interrupts like Ctrl-C, and subprocess.run kills its child on an interrupt: no orphaned Streamlit
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        exit_code = subprocess.run(command, env={**os.environ, "METASEG_SERVER": server}).returncode
    finally:
        signal.signal(signal.SIGTERM, previous)
    if exit_code:
        raise UserError(f"streamlit stopped with exit code {exit_code}")
