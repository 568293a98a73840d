"""The shipped weights: plain state dicts that load with weights_only=True and segment real slices."""

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


def test_best_record_names_a_shipped_bundle():
    model = read_best()
    assert model.bundle.name in NAMES and model.weights == REPO / "bundles" / model.bundle.name / "models" / "model.pt"


@pytest.mark.parametrize("sequences", ["three", "flair-only"])
@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_segment_real_test_slices(name, sequences, lgg):
    """Both inputs one model serves: the data set's three sequences, and FLAIR alone as a gray upload gives it."""
    bundle = REPO / "bundles" / name
    weights = bundle / "models" / "model.pt"
    assert weights.stat().st_size <= 10 * 2**20
    assert isinstance(torch.load(weights, weights_only=True), dict)
    datalist = json.loads((bundle / "docs" / "datalist_lgg.json").read_text())
    items = [item for item in datalist["test"] if item["lesion_pixels"] > 1000][::4][:6]  # test patients only
    slices = [np.moveaxis(tifffile.imread(lgg / item["image"]), -1, 0) for item in items]  # (3, rows, cols)
    images = slices if sequences == "three" else [s[FLAIR_CHANNEL] for s in slices]
    truth = np.stack([tifffile.imread(lgg / item["label"]) > 0 for item in items])
    probs = Engine(bundle, weights).probabilities(images)
    assert dice_3d(truth, np.stack(probs) > 0.5) > 0.5  # pooled over the slices; the report has the full numbers
