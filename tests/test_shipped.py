"""The shipped weights and choices: plain state dicts that load with weights_only=True and segment real slices; the
inference steps and the best model are the ones the cross-validation report chose."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import REPO
from metaseg.bundles import NAMES
from metaseg.conventions import FLAIR_CHANNEL, read_best
from metaseg.engine import Engine
from metaseg.metrics import dice_3d


CV = REPO / "reports" / "cv.json"


def test_best_record_names_a_shipped_bundle():
    model = read_best()
    assert model.bundle.name in NAMES and model.weights == REPO / "bundles" / model.bundle.name / "models" / "model.pt"


def test_best_model_and_inference_steps_are_the_cross_validated_ones():
    """bundles/best.json names the bundle with the higher out-of-fold mean, and each bundle's inference.json records
    the steps chosen for it on the out-of-fold predictions (reports/cv.json, a complete run over every patient)."""
    report = json.loads(CV.read_text())
    assert report["complete"] is True
    dice = {name: report["models"][name]["mean_dice_3d"] for name in NAMES}
    assert read_best().bundle.name == max(dice, key=dice.get)
    for name in NAMES:
        steps = json.loads((REPO / "bundles" / name / "configs" / "inference.json").read_text())["inference_steps"]
        chosen = report["postprocessing_per_model"][name]["inference_steps"]
        assert {k: v for k, v in steps.items() if k != "_desc_"} == chosen, name


@pytest.mark.parametrize("sequences", ["three", "flair-only"])
@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_segment_real_test_slices(name, sequences, lgg):
    """Both inputs one model serves: the data set's three sequences, and FLAIR alone as a gray upload gives it.

    The shipped weights trained on every development patient (`metaseg cv --train-all`), so these are training
    slices: this checks that the weights work; reports/cv.md has the numbers on unseen patients."""
    bundle = REPO / "bundles" / name
    weights = bundle / "models" / "model.pt"
    assert weights.stat().st_size <= 10 * 2**20
    assert isinstance(torch.load(weights, weights_only=True), dict)
    datalist = json.loads((bundle / "docs" / "datalist_lgg.json").read_text())
    items = [item for item in datalist["training"] if item["lesion_pixels"] > 1000][::15][:6]
    slices = [np.moveaxis(tifffile.imread(lgg / item["image"]), -1, 0) for item in items]  # (3, rows, cols)
    images = slices if sequences == "three" else [s[FLAIR_CHANNEL] for s in slices]
    truth = np.stack([tifffile.imread(lgg / item["label"]) > 0 for item in items])
    probs = Engine(bundle, weights).probabilities(images)
    assert dice_3d(truth, np.stack(probs) > 0.5) > 0.5  # pooled over the slices; the report has the full numbers


@pytest.mark.parametrize("name", NAMES)
def test_metadata_figures_are_the_reports_served_ones(name):
    """metadata.json eval_metrics are written by scripts/ship_weights.py from reports/cv.json: each bundle's
    out-of-fold figures at argmax and, marked optimistic, with its own inference steps, as served."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    report = json.loads(CV.read_text())
    metrics = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics == {key: round(ship.figure(report, name, row, path), 4)
                       for key, (row, path) in ship.EVAL_METRICS.items()}
    assert metrics["cv_oof_served_lesion_sensitivity_3d_optimistic"] >= 0.99  # the served steps lose no lesion
