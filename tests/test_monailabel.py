"""Both bundles in a real MONAI Label app (scripts/monailabel_check.py), when MONAI Label's own venv exists.

That venv (`make monailabel-check`, about 8 GB: monailabel needs torchvision, which does not import beside metaseg's
torch CPU wheel) is not built by `make test`, so a fresh clone skips this; the committed result of the last run is
benchmarks/results/monailabel.json.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

ML_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"


@pytest.mark.skipif(not ML_PYTHON.is_file(), reason="no MONAI Label venv: `make monailabel-check` builds it")
def test_monai_label_infers_with_and_trains_both_bundles(tmp_path):
    out = tmp_path / "monailabel.json"
    result = subprocess.run(
        [str(ML_PYTHON), "scripts/monailabel_check.py", "--metaseg-python", sys.executable, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["versions"]["monailabel"] == "0.8.5" and set(report["bundles"]) == {"unetpp", "attention_unet"}
    for name, bundle in report["bundles"].items():
        assert bundle["loaded"], name
        for file, infer in bundle["infer"].items():
            assert infer["same_shape"] and infer["lesion_pixels"] > 0, (name, file)
            assert infer["dice_vs_metaseg_predict"] > 0.95, (name, file, infer)  # the same bundle, another loader
        assert bundle["train"]["model_pt_rewritten"], name
