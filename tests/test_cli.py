"""The `metaseg` command line: success paths and one readable line + exit 2 for every user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from conftest import assert_user_error, metaseg


def test_the_installed_entry_point_lists_every_subcommand_and_fails_in_one_line():
    """The one test through a real process: `python -m metaseg.cli`; the others call its `main` in-process."""
    run = [sys.executable, "-m", "metaseg.cli"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120).stdout
    for command in ("synth", "datalist", "train", "evaluate", "predict", "compare", "cv", "serve", "ui"):
        assert command in out
    assert_user_error(subprocess.run([*run, "frobnicate"], capture_output=True, text=True, timeout=120), "invalid choice")


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
