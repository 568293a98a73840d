"""The metaseg wheel installed into a fresh venv from the wheelhouse `make setup` fills, with no index: pyproject's
dependencies and extras decide what gets installed, not the lock. Plain, the library imports, `metaseg --help` works
and `metaseg serve` / `metaseg ui` name their extra in one line; with [serve], `metaseg serve` segments a PNG.

One test, as short as it gets: the plain install is checked first, then the serve extra is added to the same venv (76 s
on 2 busy cores, a minute of CPU: torch installed, torch and MONAI imported twice, the model served once).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import tifffile

from conftest import REPO
from metaseg.data.phantom import synthesize
from test_serve import free_port

WHEELS = Path(sys.prefix) / "wheels"  # every pinned wheel: `make setup` downloads them there
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the venv's packages, not the checkout's
IMPORT_ALL = "import importlib, pkgutil, metaseg; [importlib.import_module(m.name) for m in pkgutil.walk_packages(metaseg.__path__, 'metaseg.')]"

pytestmark = pytest.mark.skipif(not WHEELS.is_dir(), reason=f"no wheelhouse at {WHEELS} (`make setup` fills it)")


def build_wheel(folder: Path) -> Path:
    """The metaseg wheel, built from a copy of the sources (a build in the checkout would leave build/ there)."""
    source = folder / "source"
    for package in ("metaseg", "serve", "ui"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    folder / "dist", source], check=True, capture_output=True, timeout=300)
    return next((folder / "dist").glob("metaseg-*.whl"))


def install(venv: Path, requirement: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
                    "--no-index", "--find-links", WHEELS, "--no-compile", requirement], env=ENV, check=True, timeout=600)


def run(venv: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([venv / "bin" / command[0], *command[1:]], cwd=venv.parent, env=ENV, capture_output=True,
                          text=True, timeout=300)


def phantom_png(folder: Path) -> bytes:
    """The phantom's slice with the most lesion, as the RGB PNG a user uploads (FLAIR in the green channel)."""
    synthesize(folder, patients=1, slices=8, seed=0)
    richest = max(folder.glob("*/*_mask.tif"), key=lambda mask: np.count_nonzero(tifffile.imread(mask)))
    buffer = io.BytesIO()
    PIL.Image.fromarray(tifffile.imread(richest.with_name(richest.name.replace("_mask", "")))).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_wheel_installs_its_core_plain_and_serves_with_the_serve_extra(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)  # pip from outside: faster

    install(venv, str(wheel))
    done = run(venv, "python", "-c", IMPORT_ALL + "; import fastapi")  # every metaseg module, and nothing beyond
    assert done.stderr.splitlines()[-1] == "ModuleNotFoundError: No module named 'fastapi'", done.stderr
    done = run(venv, "metaseg", "--help")
    assert done.returncode == 0 and "serve" in done.stdout and "ui" in done.stdout, done.stderr
    for command, extra in (("serve", "serve"), ("ui", "ui")):
        done = run(venv, "metaseg", command)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("metaseg: error:") and f"pip install 'metaseg[{extra}]'" in done.stderr

    install(venv, f"{wheel}[serve]")
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([venv / "bin" / "metaseg", "serve", "--bundle", REPO / "bundles" / "attention_unet",
                                   "--port", str(port)], cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        png = phantom_png(tmp_path / "phantom")
        response = httpx.post(f"{url}/segment/mask", files=[("file", ("slice.png", png, "image/png"))], timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert response.status_code == 200, response.text
    mask = np.asarray(PIL.Image.open(io.BytesIO(response.content)))
    assert mask.shape == np.asarray(PIL.Image.open(io.BytesIO(png))).shape[:2]
    assert set(np.unique(mask)) == {0, 255}  # the served model finds the phantom's lesion, and not everywhere
