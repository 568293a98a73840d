"""`make clean` on a copy of the Makefile in a scratch folder: it takes what is rebuilt, never a trained model."""

from __future__ import annotations

import shutil
import subprocess

from conftest import REPO


def test_make_clean_keeps_trained_models_and_removes_what_is_rebuilt(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    kept = ["runs/Data/attention_unet/models/model.pt", "runs/Data/best.json", "runs/cv/fold_0/unetpp/models/model.pt",
            "bundles/attention_unet/models/model.pt", "reports/cv.json"]
    removed = [".venv/bin/python", ".venv/wheels/torch.whl", "runs/demo/best.json", "runs/demo/data/P0/P0_1.tif",
               "build/lib/metaseg/cli.py", "dist/metaseg.whl", "metaseg.egg-info/PKG-INFO", ".pytest_cache/README.md",
               "metaseg/__pycache__/cli.cpython-311.pyc", "runs/Data/attention_unet/scripts/__pycache__/x.pyc"]
    for name in kept + removed:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    subprocess.run(["make", "--no-print-directory", "clean"], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert [name for name in kept if not (tmp_path / name).exists()] == []
    assert [name for name in removed if (tmp_path / name).exists()] == []
    assert not (tmp_path / "runs" / "demo").exists() and not (tmp_path / ".venv").exists()
