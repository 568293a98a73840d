"""The shipped fold ensembles and choices: each bundle's fold models are the ones the cross-validation report scored
(checked on real held-out patients), its inference steps, figures and best.json are the report's, and its weights stay
within the size limits. Each bundle's report is the one its docs/training/shipped.json names (a bundle shipped alone
keeps its own), best.json's the one it names."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from metaseg.bundles import NAMES
from metaseg.conventions import read_best
from metaseg.data.discovery import discover, open_source, read_tiff
from metaseg.inference.engine import Engine
from metaseg.imageio.reader import decode
from metaseg.evaluation.metrics import dice_3d
from metaseg.inference import steps as inference_steps

MAX_FILE, MAX_BUNDLE = 10 * 2**20, 50 * 2**20


def ship_weights():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(name: str | None = None) -> dict:
    """The cross-validation report of bundle `name`'s shipped folds (its docs/training/shipped.json names it, from the
    repository root), or without a name the one bundles/best.json names (from bundles/)."""
    if name is None:
        file = REPO / "bundles" / json.loads((REPO / "bundles" / "best.json").read_text())["report"]
    else:
        file = REPO / json.loads((REPO / "bundles" / name / "docs" / "training" / "shipped.json").read_text())["report"]
    return json.loads(Path(file).with_suffix(".json").read_text())


def test_best_record_names_the_served_bundle_of_the_report_with_its_ensemble():
    model, cv = read_best(), report()
    assert cv["complete"] is True and model.bundle.name == cv["served"]["bundle"]
    assert model.weights == REPO / "bundles" / model.bundle.name / "models" / "model.pt"
    assert len(Engine(model.bundle, model.weights).models) == cv["folds"]  # the record serves the whole ensemble


@pytest.mark.parametrize("name", NAMES)
def test_each_bundle_ships_the_folds_and_steps_of_the_report(name):
    cv, ship = report(name), ship_weights()
    bundle = REPO / "bundles" / name
    shipped = ship.shipped_folds(bundle)
    assert shipped == [ship.fold_weights(bundle, k) for k in range(cv["folds"])]
    files = [*shipped, *(path.with_suffix(".ts") for path in shipped)]
    assert all(path.stat().st_size <= MAX_FILE for path in files)
    assert sum(path.stat().st_size for path in bundle.rglob("models/**/*") if path.is_file()) <= MAX_BUNDLE
    for path in shipped:
        assert isinstance(torch.load(path, weights_only=True), dict)
    evidence = json.loads((bundle / "docs" / "training" / "shipped.json").read_text())
    assert evidence["command"] == cv["command"] and evidence["folds"] == cv["folds"]
    steps = json.loads((bundle / "configs" / "inference.json").read_text())["inference_steps"]
    # a report older than a step scored it off (U-Net++'s 44-patient report predates min_lesion_score)
    chosen = {"min_lesion_score": 0, **cv["served_per_bundle"][name]["inference_steps"]}
    assert {k: v for k, v in steps.items() if k != "_desc_"} == chosen


@pytest.mark.parametrize("name", NAMES)
def test_metadata_figures_are_the_reports(name):
    """metadata.json eval_metrics are written by scripts/ship_weights.py from reports/cv.json: the cross-fitted
    estimate of what the bundle serves, and its fold models' argmax figure."""
    cv, ship = report(name), ship_weights()
    metrics = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics == {key: round(ship.figure(cv, name, entry, field), 4)
                       for key, (entry, field) in ship.EVAL_METRICS.items()}
    # the shipped steps were chosen to lose no lesion that the fold models find at argmax (on the patients they were
    # chosen on; cross-fitted, a threshold chosen on two folds may lose one on the third: cv.md shows it)
    chosen_on_all = cv["models"][f"{name} + its inference steps"]
    assert chosen_on_all["config"]["models"] == [name]
    assert chosen_on_all["lesion_sensitivity_3d"] >= cv["models"][name]["lesion_sensitivity_3d"]


@pytest.mark.parametrize("k", range(3))
@pytest.mark.parametrize("name", NAMES)
def test_a_shipped_fold_scores_its_held_out_patient_as_the_report_says(name, k, lgg, tmp_path):
    """The real-data tier: each fold's shipped model on the smallest patient it never trained on (from the shipped
    splits) gives the report's out-of-fold argmax Dice for that patient: the shipped files are the ones the report
    scored. The report's probabilities were stored as uint8, hence the tolerance."""
    cv, ship = report(name), ship_weights()
    assert cv["folds"] == 3
    bundle = REPO / "bundles" / name
    splits = json.loads((bundle / "docs" / "training" / "splits_final.json").read_text())
    found = discover(lgg)
    pairs = {p: sorted((x for x in found.pairs if x.patient == p), key=lambda x: x.slice) for p in splits[k]["val"]}
    patient = min(pairs, key=lambda p: len(pairs[p]))
    weights = shutil.copy(ship.fold_weights(bundle, k), tmp_path / "model.pt")  # alone, not the ensemble
    engine = Engine(bundle, weights, overrides={"spatial_size": cv["recipe"].get("spatial_size", 128)})
    with open_source(lgg) as files:
        images = [decode([(x.image, files.read(x.image))]).inputs[0] for x in pairs[patient]]  # as metaseg cv reads
        truth = np.stack([read_tiff(files.read(x.label)) > 0 for x in pairs[patient]])
    probs = np.stack(engine.probabilities(images, view="plain"))
    expected = cv["models"][name]["dice_3d_per_patient"][patient]
    assert dice_3d(truth, probs >= 0.5) == pytest.approx(expected, abs=0.01)


def test_the_shipped_files_are_distinct_fold_models():
    for name in NAMES:
        digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in ship_weights().shipped_folds(REPO / "bundles" / name)]
        assert len(set(digests)) == len(digests), name


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_lesion_score_keeps_the_phantom_lesions_its_fold_models_find(name):
    """A min_lesion_score ships only where the report measured the bundle's fold models on the reference phantom,
    and at most the score that keeps 99% of the phantom lesions they find at the shipped threshold and flip TTA."""
    steps = json.loads((REPO / "bundles" / name / "configs" / "inference.json").read_text())["inference_steps"]
    if inference_steps.seeded(steps):
        caps = report(name)["postprocessing_per_model"][name]["reference_score_caps"]
        assert steps["min_lesion_score"] <= caps[str(float(steps["threshold"]))]
