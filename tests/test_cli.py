"""The `metaseg` command line: success paths and one readable line + exit 2 for every user mistake."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import assert_user_error, metaseg
from test_serve import free_port


def test_the_installed_entry_point_lists_every_subcommand_and_fails_in_one_line():
    """The one test through a real process: `python -m metaseg.cli`; the others call its `main` in-process."""
    run = [sys.executable, "-m", "metaseg.cli"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120).stdout
    for command in ("synth", "datalist", "train", "evaluate", "predict", "compare", "cv", "retention", "serve", "ui"):
        assert command in out
    assert_user_error(subprocess.run([*run, "frobnicate"], capture_output=True, text=True, timeout=120), "invalid choice")


def running(pid: str) -> bool:
    """Whether a process exists and has not exited (a zombie has: it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stopping_metaseg_ui_stops_its_streamlit_child(tmp_path):
    """SIGTERM to `metaseg ui` alone (a service manager's stop, not Ctrl-C at a terminal, which reaches the whole
    group): it exits as interrupted, and the Streamlit it started is gone, not left running without a parent."""
    port = free_port()
    with (tmp_path / "viewer.log").open("wb") as log:
        viewer = subprocess.Popen([sys.executable, "-m", "metaseg.cli", "ui", "--port", str(port), "--server",
                                   f"http://127.0.0.1:{free_port()}"], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert viewer.poll() is None and time.monotonic() < deadline, (tmp_path / "viewer.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        children = Path(f"/proc/{viewer.pid}/task/{viewer.pid}/children").read_text().split()
        assert len(children) == 1
        viewer.send_signal(signal.SIGTERM)
        assert viewer.wait(timeout=60) == 130
        deadline = time.monotonic() + 30
        while running(children[0]):  # killed; init reaps it once its parent is gone
            assert time.monotonic() < deadline, f"streamlit {children[0]} still runs after `metaseg ui` stopped"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group, were the test to fail
            os.killpg(viewer.pid, signal.SIGKILL)
        viewer.wait()


def test_datalist_writes_json_and_summary(tiny_data, tmp_path):
    out = tmp_path / "nested" / "datalist.json"
    result = metaseg("datalist", tiny_data, "--out", out, "--seed", "2")
    assert result.returncode == 0, result.stderr
    datalist = json.loads(out.read_text())
    assert datalist["seed"] == 2 and datalist["counts"]["patients"] == {"training": 7, "validation": 1, "test": 2}
    assert "training" in result.stdout and "7 patients" in result.stdout


def test_synth_then_datalist(tmp_path):
    syn = tmp_path / "SYN"
    assert metaseg("synth", syn, "--patients", 6, "--slices", 8).returncode == 0
    result = metaseg("datalist", syn, "--out", tmp_path / "datalist.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "datalist.json").read_text())["counts"]["patients"]["test"] == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["datalist", "{tmp}/missing", "--out", "{tmp}/d.json"], "data not found"),
        (["datalist", "{tmp}/empty", "--out", "{tmp}/d.json"], "no image/mask pairs"),
        (["datalist", "{tmp}/nopairs.zip", "--out", "{tmp}/d.json"], "no image/mask pairs"),
        (["datalist", "{tmp}/notzip.zip", "--out", "{tmp}/d.json"], "not a folder or a .zip"),
        (["datalist", "{data}", "--out", "{tmp}/file.txt/d.json"], "cannot write"),
        (["datalist", "{data}", "--out", "{tmp}/d.json", "--test-fraction", "abc"], "not a number"),
        (["datalist", "{data}", "--out", "{tmp}/d.json", "--val-fraction", "1.5"], "must be in [0, 1)"),
        (["datalist", "{data}"], "--out"),
        (["synth", "{tmp}/s", "--patients", "0"], "must be at least 1"),
        (["evaluate", "--bundle", "unetpp", "--data", "{data}", "--run", "{tmp}", "--steps", "some"], "invalid choice"),
        (["evaluate", "--bundle", "unetpp", "--data", "{data}", "--run", "{tmp}"], "no datalist.json"),
        (["retention", "--run", "nope={tmp}", "--out", "{tmp}/r.json"], "--run must be NAME=RUN_DIR"),
        (["retention", "--run", "unetpp={tmp}/none", "--out", "{tmp}/r.json"], "no readable run.json"),
        (["retention", "--run", "unetpp={tmp}"], "--out"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(args, fragment, tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("a file where a folder is expected")
    (tmp_path / "notzip.zip").write_text("not a zip")
    with zipfile.ZipFile(tmp_path / "nopairs.zip", "w") as zf:
        zf.writestr("Data/P1/readme.txt", "no images")
    args = [a.format(tmp=tmp_path, data=tiny_data) for a in args]
    assert_user_error(metaseg(*args), fragment)
    assert not (tmp_path / "d.json").exists()
