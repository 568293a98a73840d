"""scripts/ship_weights.py writes each bundle's metadata.json eval_metrics from the cross-validation report, and
nothing else of the file."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from conftest import REPO
from metaseg.bundles import NAMES


def ship_weights():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_metrics_are_the_reports_served_figures_and_the_rest_of_metadata_is_kept(tmp_path):
    module = ship_weights()
    for name in NAMES:
        (tmp_path / name / "configs").mkdir(parents=True)
        shutil.copy(REPO / "bundles" / name / "configs" / "metadata.json", tmp_path / name / "configs")
    served = {"mean_dice_3d": 0.71234, "lesionwise_dice": 0.6, "lesion_sensitivity_3d": 0.9,
              "fp_lesions_per_patient": 1.5, "mean": {"fp_slice_rate": 0.05, "lesion_slice_dice": None}}
    cv = {"models": {**{f"{name} + its inference steps": served for name in NAMES},
                     **{name: {"mean_dice_3d": 0.1} for name in NAMES}}}
    module.write_eval_metrics(cv, tmp_path)
    for name in NAMES:
        before = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
        after = json.loads((tmp_path / name / "configs" / "metadata.json").read_text())
        assert after["eval_metrics"] == {
            "cv_oof_argmax_dice_3d_per_patient": 0.1, "cv_oof_served_dice_3d_per_patient_optimistic": 0.7123,
            "cv_oof_served_lesionwise_dice_optimistic": 0.6, "cv_oof_served_lesion_sensitivity_3d_optimistic": 0.9,
            "cv_oof_served_fp_lesions_per_patient_optimistic": 1.5, "cv_oof_served_fp_slice_rate_optimistic": 0.05}
        assert {k: v for k, v in after.items() if k != "eval_metrics"} == \
            {k: v for k, v in before.items() if k != "eval_metrics"}


def test_a_partial_or_missing_report_is_refused(tmp_path):
    module = ship_weights()
    with pytest.raises(SystemExit, match="no .*cv.json"):
        module.read_cv(tmp_path / "cv.md")
    (tmp_path / "cv.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(SystemExit, match="partial"):
        module.read_cv(tmp_path / "cv.md")
