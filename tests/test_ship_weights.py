"""scripts/ship_weights.py ships a finished `metaseg cv` as each bundle's fold ensemble: the fold models byte for
byte where the bundle's inferer reads them, their evidence, the report's steps and figures, and best.json; nothing
from an unfinished or older report."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO
from metaseg.bundles import NAMES
from metaseg.conventions import read_best
from metaseg.inference.engine import Engine
from test_bundles import network_def

FOLDS = 3
STEPS = {"unetpp": {"flip_tta": True, "threshold": 0.4, "min_lesion_voxels": 0, "min_lesion_mm3": 0,
                    "min_lesion_score": 0.8, "largest_component": False},
         "attention_unet": {"flip_tta": False, "threshold": 0.55, "min_lesion_voxels": 0, "min_lesion_mm3": 0,
                            "min_lesion_score": 0, "largest_component": False}}


def ship_weights():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def served(name: str, dice: float) -> dict:
    return {"bundle": name, "mean_dice_3d": dice, "ci95_dice_3d": [dice - 0.05, dice + 0.05],
            "dice_3d_per_patient": {"P0": dice}, "lesion_slice_dice": 0.61234, "fp_slice_rate": 0.04,
            "lesionwise_dice": 0.5, "lesion_sensitivity_3d": 1.0, "fp_lesions_per_patient": 2.5, "n_patients": 6,
            "inference_steps": STEPS[name], "chosen_by": "highest cross-fitted served mean per-patient 3D Dice"}


@pytest.fixture
def finished(tmp_path) -> tuple[Path, Path, Path]:
    """A tiny finished cross-validation (seeded random fold models, no training), its report, and a copy of the
    bundles without weights to ship into."""
    runs, reports, bundles = tmp_path / "runs", tmp_path / "reports", tmp_path / "bundles"
    for name in NAMES:
        shutil.copytree(REPO / "bundles" / name, bundles / name,
                        ignore=shutil.ignore_patterns("*.pt", "*.ts", "fold_*", "training", "__pycache__"))
        for k in range(FOLDS):
            fold = runs / name / f"fold_{k}"
            (fold / "models").mkdir(parents=True)
            torch.manual_seed(k)
            torch.save(network_def(bundles / name).state_dict(), fold / "models" / "model.pt")
            for evidence in ("run.json", "datalist.json", "trained.json", "fold.json"):
                (fold / evidence).write_text(json.dumps({"fold": k, "file": evidence}))
            (fold / "train.log").write_text(f"fold {k} log\n")
    for plan in ("cv_plan.json", "splits_final.json"):
        (runs / plan).write_text("{}")
    per_bundle = {"unetpp": served("unetpp", 0.7), "attention_unet": served("attention_unet", 0.75)}
    reports.mkdir()
    (reports / "cv.json").write_text(json.dumps({
        "complete": True, "folds": FOLDS, "seed": 0, "command": "metaseg cv --data D --folds 3", "recipe": {},
        "models": {name: {"mean_dice_3d": 0.6} for name in NAMES},
        "served_per_bundle": per_bundle, "served": per_bundle["attention_unet"]}))
    return runs, reports / "cv.md", bundles


def test_a_finished_cv_ships_as_each_bundles_fold_ensemble(finished, monkeypatch):
    runs, report, bundles = finished
    module = ship_weights()
    exported = []
    monkeypatch.setattr(module, "export_torchscript", lambda bundle, weights: exported.append(weights))  # tested in
    for name in NAMES:  # training records the checkout's absolute paths
        (runs / name / "fold_0" / "run.json").write_text(json.dumps(
            {"bundle": str(REPO / "bundles" / name), "data": str(REPO.parent / "shared" / "Data")}))
    module.ship_cv(runs, report, bundles)  # tests/test_ensemble.py: here only which files it is asked for
    for name in NAMES:
        bundle = bundles / name
        shipped = [module.fold_weights(bundle, k) for k in range(FOLDS)]
        assert [md5(path) for path in shipped] == [md5(runs / name / f"fold_{k}" / "models" / "model.pt")
                                                   for k in range(FOLDS)]
        assert module.shipped_folds(bundle) == shipped and set(shipped) <= set(exported)
        training = bundle / "docs" / "training"
        assert (training / "fold_2" / "train.log").read_text() == "fold 2 log\n"
        assert json.loads((training / "fold_0" / "run.json").read_text()) == {"bundle": f"bundles/{name}",
                                                                              "data": "../shared/Data"}
        assert json.loads((training / "shipped.json").read_text())["command"] == "metaseg cv --data D --folds 3"
        inference = json.loads((bundle / "configs" / "inference.json").read_text())
        assert {k: v for k, v in inference["inference_steps"].items() if k != "_desc_"} == STEPS[name]
        assert inference["other_folds"]["checkpoints"] == ["$@ckpt_dir + '/fold_1/model.pt'",
                                                           "$@ckpt_dir + '/fold_2/model.pt'"]
        metrics = json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]
        assert metrics["cv_served_crossfitted_dice_3d_per_patient"] == (0.7 if name == "unetpp" else 0.75)
        assert metrics["cv_served_crossfitted_lesion_slice_dice"] == 0.6123
        assert metrics["cv_oof_argmax_dice_3d_per_patient"] == 0.6
        assert Engine(bundle).models == shipped  # the engine serves what was shipped
    best = read_best(bundles / "best.json")
    assert best.bundle.name == "attention_unet"  # the report's `served` (a record names a shipped bundle by name)
    assert best.weights == bundles / "attention_unet" / "models" / "model.pt"


def test_shipping_again_with_fewer_folds_leaves_no_stale_fold(finished, monkeypatch):
    runs, report, bundles = finished
    module = ship_weights()
    monkeypatch.setattr(module, "export_torchscript", lambda bundle, weights: None)
    module.ship_cv(runs, report, bundles)
    cv = json.loads((report.parent / "cv.json").read_text())
    (report.parent / "cv.json").write_text(json.dumps({**cv, "folds": 2}))
    module.ship_cv(runs, report, bundles)
    for name in NAMES:
        assert module.shipped_folds(bundles / name) == [module.fold_weights(bundles / name, k) for k in range(2)]
        assert sorted(p.name for p in (bundles / name / "docs" / "training").iterdir()) == \
            ["cv_plan.json", "fold_0", "fold_1", "shipped.json", "splits_final.json"]


def test_an_unfinished_run_or_report_is_refused_and_nothing_is_shipped(finished):
    runs, report, bundles = finished
    module = ship_weights()
    (runs / "attention_unet" / "fold_1" / "fold.json").unlink()
    with pytest.raises(SystemExit, match="fold_1 is not finished"):
        module.ship_cv(runs, report, bundles)
    cv = json.loads((report.parent / "cv.json").read_text())
    for broken, message in (({**cv, "complete": False}, "partial"), ({**cv, "served": None}, "no cross-fitted")):
        (report.parent / "cv.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit, match=message):
            module.ship_cv(runs, report, bundles)
    (report.parent / "cv.json").unlink()
    with pytest.raises(SystemExit, match="no .*cv.json"):
        module.ship_cv(runs, report, bundles)
    assert not list(bundles.glob("*/models/*.pt")) and not (bundles / "best.json").exists()


def test_one_bundle_ships_alone_from_a_report_of_it_alone(finished, monkeypatch):
    """A report that scored attention_unet only: --bundle attention_unet ships its folds and figures; unetpp keeps its
    weights, figures and evidence, and a ship of every bundle from that report is refused."""
    runs, report, bundles = finished
    module = ship_weights()
    monkeypatch.setattr(module, "export_torchscript", lambda bundle, weights: None)
    module.ship_cv(runs, report, bundles)  # both, from the first report
    kept = {path: md5(path) for path in (bundles / "unetpp").rglob("*") if path.is_file()}
    cv = json.loads((report.parent / "cv.json").read_text())
    alone = {**cv, "command": "metaseg cv --bundle attention_unet", "models": {"attention_unet": {"mean_dice_3d": 0.66}},
             "served_per_bundle": {"attention_unet": served("attention_unet", 0.8)},
             "served": served("attention_unet", 0.8)}
    (report.parent / "cv.json").write_text(json.dumps(alone))
    with pytest.raises(SystemExit, match="no cross-fitted `served` figures for unetpp, attention_unet"):
        module.ship_cv(runs, report, bundles)
    module.ship_cv(runs, report, bundles, names=("attention_unet",))
    assert {path: md5(path) for path in (bundles / "unetpp").rglob("*") if path.is_file()} == kept
    shipped = json.loads((bundles / "attention_unet" / "docs" / "training" / "shipped.json").read_text())
    assert shipped["command"] == "metaseg cv --bundle attention_unet"
    metrics = json.loads((bundles / "attention_unet" / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics["cv_served_crossfitted_dice_3d_per_patient"] == 0.8
    assert metrics["cv_oof_argmax_dice_3d_per_patient"] == 0.66
    record = json.loads((bundles / "best.json").read_text())
    assert record["bundle"] == "attention_unet" and record["cv_served_dice_3d"] == {"attention_unet": 0.8}
    assert record["selected_by"].startswith("the only bundle this cross-validation scored (unetpp not")
