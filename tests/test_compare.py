"""`metaseg compare` and its metrics: known answers on hand-made masks, then the CLI on synthetic runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, metaseg
from metaseg.bundles import NAMES, bundle_dir
from metaseg.evaluation.comparison import compare
from metaseg.evaluation.figures import curves_from_events, curves_from_log
from metaseg.evaluation.froc import froc
from metaseg.data.discovery import discover, read_tiff
from metaseg.conventions import read_best, write_best
from metaseg.errors import UserError
from metaseg.data.datalist import build_datalist
from metaseg.files import write_json_atomic
from metaseg.training.pipeline import STEPS, STEPS_OFF
from metaseg.evaluation.metrics import (bootstrap_ci, dice_3d, fp_slice_rate, hd95_per_slice, lesion_slice_dice_iou,
                                        paired_difference, patient_metrics, slice_component_detection, slice_dice)

SHIFT = 3  # px the imperfect model's masks are moved by


def square(slices: int = 1, size: int = 16, at=(4, 4), side: int = 4, on=(0,)) -> np.ndarray:
    masks = np.zeros((slices, size, size), bool)
    for n in on:
        masks[n, at[0] : at[0] + side, at[1] : at[1] + side] = True
    return masks


# --- metrics: known answers ---


def test_perfect_prediction_scores_perfectly():
    gt = square(3, on=(0, 1))
    m = patient_metrics(gt, gt)
    assert m["dice_3d"] == m["lesion_slice_dice"] == m["lesion_slice_iou"] == 1.0
    assert m["hd95_px"] == 0.0 and m["hd95_empty_prediction_slices"] == 0
    assert m["slice_component_sensitivity"] == m["slice_component_precision"] == 1.0 and m["fp_slice_rate"] == 0.0
    assert (m["n_slices"], m["n_lesion_slices"], m["n_gt_slice_components"]) == (3, 2, 2)


def test_empty_versus_empty_is_perfect_3d_and_undefined_per_slice():
    empty = np.zeros((2, 8, 8), bool)
    assert dice_3d(empty, empty) == 1.0
    assert np.isnan(slice_dice(empty, empty)).all()
    assert all(np.isnan(lesion_slice_dice_iou(empty, empty)))
    m = patient_metrics(empty, empty)
    assert np.isnan(m["slice_component_sensitivity"]) and np.isnan(m["slice_component_precision"])
    assert np.isnan(m["hd95_px"])
    assert m["fp_slice_rate"] == 0.0


def test_false_positive_on_lesion_free_slices():
    gt = np.zeros((4, 8, 8), bool)
    pred = gt.copy()
    pred[2, 3, 3] = True
    assert dice_3d(gt, pred) == 0.0
    assert fp_slice_rate(gt, pred) == 0.25
    assert slice_dice(gt, pred)[2] == 0.0 and np.isnan(slice_dice(gt, pred)[0])
    # on a patient with a lesion the false positive slice lowers the pooled Dice but not the lesion-slice Dice
    gt, pred = square(2, on=(0,)), square(2, on=(0, 1))
    assert dice_3d(gt, pred) == pytest.approx(2 * 16 / (2 * 16 + 16))
    assert lesion_slice_dice_iou(gt, pred) == (1.0, 1.0) and fp_slice_rate(gt, pred) == 1.0


def test_half_overlap_dice_and_iou_are_exact():
    gt, pred = square(), square(at=(4, 6))  # 16 px each, 8 shared
    assert dice_3d(gt, pred) == 0.5
    dice, iou = lesion_slice_dice_iou(gt, pred)
    assert dice == 0.5 and iou == pytest.approx(1 / 3)


def test_lesion_slice_means_are_per_slice_then_per_patient():
    gt = square(3, on=(0, 1))
    pred = gt.copy()
    pred[1] = square(at=(4, 6))[0]  # slice 1 at Dice 0.5, slice 0 perfect, slice 2 lesion-free and empty
    assert lesion_slice_dice_iou(gt, pred) == (0.75, pytest.approx((1 + 1 / 3) / 2))


def test_slice_component_detection_counts_2d_components_with_8_connectivity():
    gt = np.zeros((2, 16, 16), bool)
    gt[0, 1:3, 1:3] = gt[0, 10:12, 10:12] = True  # two lesions on slice 0
    gt[1, 1:3, 1:3] = True  # the same spot on slice 1 is a third lesion (components are 2D)
    pred = np.zeros_like(gt)
    pred[0, 2, 2] = pred[0, 3, 3] = True  # one component (diagonal neighbours) touching the first lesion
    pred[1, 12, 12] = True  # a false component on slice 1
    assert slice_component_detection(gt, pred) == (3, 1, 2, 1)
    m = patient_metrics(gt, pred)
    assert m["slice_component_sensitivity"] == pytest.approx(1 / 3) and m["slice_component_precision"] == 0.5


def test_hd95_of_a_shifted_square_is_the_shift_and_empty_predictions_are_counted():
    gt = square(3, size=32, side=8, on=(0, 1, 2))
    pred = np.zeros_like(gt)
    pred[0] = square(size=32, at=(4, 7), side=8)[0]  # shifted by 3 columns
    pred[1] = gt[1]
    assert hd95_per_slice(gt, pred)[:2].tolist() == [3.0, 0.0] and np.isnan(hd95_per_slice(gt, pred)[2])
    m = patient_metrics(gt, pred)
    assert m["hd95_px"] == 1.5 and m["hd95_empty_prediction_slices"] == 1


def test_bootstrap_ci_contains_the_mean_and_is_reproducible():
    values = np.random.default_rng(3).uniform(0.4, 0.9, 20)
    low, high = bootstrap_ci(values, 1000, seed=7)
    assert low < values.mean() < high
    assert bootstrap_ci(values, 1000, seed=7) == (low, high) and bootstrap_ci(values, 1000, seed=8) != (low, high)
    assert bootstrap_ci([0.5, np.nan, 0.5]) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([np.nan])))


def test_paired_difference_sign_and_untestable_cases():
    better = np.linspace(0.6, 0.9, 10)
    result = paired_difference(better, better - np.linspace(0.05, 0.1, 10), 500, 0)
    assert result["mean_difference"] > 0 and result["ci95"][0] > 0 and result["wilcoxon_p"] < 0.05
    assert paired_difference(better - 0.1, better, 500, 0)["mean_difference"] == pytest.approx(-0.1)
    same = paired_difference(better, better)
    assert same["wilcoxon_p"] is None and "all per-patient differences are zero" in same["note"]
    few = paired_difference([0.9, 0.8], [0.7, 0.8])
    assert few["wilcoxon_p"] is None and "only 1 non-zero" in few["note"]
    assert few["mean_difference"] == pytest.approx(0.1)


def test_training_curves_from_tensorboard_events_and_from_train_log(tmp_path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(tmp_path))
    events = [(1, 1, "train_loss", 1.0), (2, 2, "train_loss", 0.8), (3, 1, "val_mean_dice", 0.5),
              (4, 3, "train_loss", 0.6), (5, 4, "train_loss", 0.4), (6, 2, "val_mean_dice", 0.7),
              (7, 5, "train_loss", 0.3)]
    for wall, step, tag, value in events:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        writer.add_event(Event(wall_time=wall, step=step, summary=summary))
    writer.close()
    curves = curves_from_events(tmp_path)
    assert curves["train_loss"][0] == [1, 2, 3] and curves["train_loss"][1] == pytest.approx([0.9, 0.5, 0.3])
    assert curves["val_mean_dice"] == ([1, 2], pytest.approx([0.5, 0.7]))
    assert curves_from_events(tmp_path / "none") is None

    log = tmp_path / "train.log"
    log.write_text(
        "Epoch [1/2]: [1/2]  50%|#####  [00:01<00:01]2026-01-01 - INFO - Epoch: 1/2, Iter: 1/2 -- train_loss: 1.0000 \n"
        "\rEpoch: 1/2, Iter: 2/2 -- train_loss: 0.5000 \n"
        "2026-01-01 - INFO - Epoch[1] Metrics -- val_lesion_dice: 0.2500 val_mean_dice: 0.6000\n"
        "Epoch: 2/2, Iter: 1/2 -- train_loss: 0.2500 \n"
    )
    curves = curves_from_log(log)
    assert curves["train_loss"] == ([1, 2], pytest.approx([0.75, 0.25]))
    assert curves["val_mean_dice"] == ([1], [0.6]) and curves["val_lesion_dice"] == ([1], [0.25])


# --- the command on synthetic runs ---


def imperfect(gt: np.ndarray) -> np.ndarray:
    """A patient's ground truth moved SHIFT columns right, plus a 5x5 false blob on its first lesion-free slice."""
    pred = np.roll(gt, SHIFT, axis=2)
    pred[np.flatnonzero(~gt.any(axis=(1, 2)))[0], 40:45, 40:45] = True
    return pred


def truth_of(data: Path, datalist: dict, split: str) -> dict[str, np.ndarray]:
    return {
        patient: np.stack([read_tiff((data / i["label"]).read_bytes()) > 0 for i in datalist[split]
                           if i["patient"] == patient])
        for patient in datalist["patients"][split]
    }


CHOSEN = {"flip_tta": True, "threshold": 0.6, "min_lesion_voxels": 0, "min_lesion_mm3": 0, "min_lesion_score": 0,
          "largest_component": False}


def write_run(run: Path, data: Path, datalist: dict, perfect_on: str, steps: str) -> None:
    """A run folder as `metaseg train` + `evaluate` leave it, with masks derived from the ground truth and the
    inference steps `evaluate` records (`steps`: "off", or "chosen" standing for a bundle's CHOSEN steps)."""
    write_json_atomic(run / "datalist.json", datalist)
    for split in ("validation", "test"):
        cases = []
        for patient, gt in truth_of(data, datalist, split).items():
            items = [i for i in datalist[split] if i["patient"] == patient]
            pred = gt if split == perfect_on else imperfect(gt)
            cases.append((gt, pred.astype(np.float32), pred))
            for item, mask in zip(items, pred):
                out = run / split / "masks" / patient / f"{Path(item['image']).stem}_seg.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(out)
        write_json_atomic(run / split / "metrics.json", {"steps": STEPS[steps], "froc": froc(cases),
                                                         "inference_steps": STEPS_OFF if steps == "off" else CHOSEN})
    (run / "models").mkdir()
    (run / "models" / "model.pt").write_bytes(b"weights")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Synthetic data and two runs: unetpp is perfect on test and worse on validation, attention_unet the reverse."""
    from metaseg.data.phantom import synthesize

    root = tmp_path_factory.mktemp("compare")
    data = root / "SYN"
    synthesize(data, patients=6, slices=6, seed=1)
    datalist = build_datalist(discover(data), seed=0)
    write_run(root / "unetpp", data, datalist, perfect_on="test", steps="chosen")
    write_run(root / "attention_unet", data, datalist, perfect_on="validation", steps="off")
    write_json_atomic(root / "attention_unet" / "run.json", {"overrides": {"spatial_size": 64, "epochs": 2}})
    (root / "unetpp" / "train.log").write_text(
        "Epoch: 1/2, Iter: 1/1 -- train_loss: 0.9000 \nEpoch[1] Metrics -- val_lesion_dice: 0.4 val_mean_dice: 0.6\n"
        "Epoch: 2/2, Iter: 1/1 -- train_loss: 0.7000 \nEpoch[2] Metrics -- val_lesion_dice: 0.5 val_mean_dice: 0.7\n"
    )
    return {"root": root, "data": data, "datalist": datalist}


def record_naming(bundle: str, folder: Path) -> Path:
    """A best-model record as the shipped cross-validation writes it, naming `bundle`."""
    return write_best(folder / "cv_best.json", bundle, folder / "model.pt", {}, selected_by="cross-validation")


def test_compare_end_to_end_serves_the_cross_validated_architecture_not_the_best_on_test(runs, tmp_path):
    """unetpp is perfect on the test patients; the cross-validation's record names attention_unet, which is served."""
    root, out = runs["root"], tmp_path / "reports"
    report = compare(runs["data"], [("unetpp", root / "unetpp"), ("attention_unet", root / "attention_unet")],
                     out=out, n_resamples=200, architecture_record=record_naming("attention_unet", tmp_path))
    for name in ("comparison.json", "comparison.md", "qualitative.png", "training_curves.png", "froc.png",
                 "best.json"):
        assert (out / name).stat().st_size > 0
    assert report["best"] == "attention_unet" and report["split"] == "test" and "validation" not in report
    assert report["patients"] == {s: runs["datalist"]["patients"][s] for s in ("test", "validation", "training")}
    assert report["command"].startswith("metaseg compare --data")

    perfect, shifted = report["models"]["unetpp"], report["models"]["attention_unet"]
    assert perfect["mean"]["dice_3d"] == perfect["mean"]["slice_component_sensitivity"] == 1.0 > shifted["mean"]["dice_3d"]
    assert perfect["mean"]["hd95_px"] == 0.0 and perfect["mean"]["fp_slice_rate"] == 0.0
    truth = truth_of(runs["data"], runs["datalist"], "test")
    expected = [2 * (gt & p).sum() / (gt.sum() + p.sum()) for gt, p in ((gt, imperfect(gt)) for gt in truth.values())]
    assert [p["dice_3d"] for p in shifted["metric_per_patient"]] == pytest.approx(expected)
    assert shifted["mean"]["fp_slice_rate"] == pytest.approx(np.mean([1 / (~gt.any(axis=(1, 2))).sum()
                                                                      for gt in truth.values()]))
    entry = shifted["metric_per_patient"][0]
    assert entry["prediction_dir"].endswith(f"test/masks/{entry['patient']}") and entry["n_slices"] == 6
    gt = next(iter(truth.values()))
    assert set(patient_metrics(gt, gt)) <= set(entry)  # every metric of metaseg.evaluation.metrics, whatever it holds
    assert (perfect["inference_steps"], shifted["inference_steps"]) == (CHOSEN, STEPS_OFF)
    paired = report["paired_test"]
    assert paired["models"] == ["unetpp", "attention_unet"] and paired["mean_difference"] > 0
    assert paired["wilcoxon_p"] is None and paired["note"]  # one test patient: untestable, said so
    assert json.loads((out / "comparison.json").read_text())["models"]["unetpp"]["steps"] == STEPS["chosen"]

    md = (out / "comparison.md").read_text()
    assert "| unetpp | 1.000 [1.000, 1.000]" in md and "Model to serve: **attention_unet**" in md
    assert "the 1 test patients only report" in md and f"- attention_unet: {STEPS['off']}" in md
    assert "Empty slices:" in md and "(qualitative.png)" in md and "(training_curves.png)" in md
    # each model's FROC as `metaseg evaluate` computed it: the perfect masks find every lesion and nothing else
    assert perfect["froc"] == {"points": [{"threshold": 1.0, "sensitivity": 1.0, "fp_per_patient": 0.0}], "cpm": 1.0}
    assert "| unetpp |" + " 1.000 |" * 8 in md and "(froc.png)" in md

    best = json.loads((out / "best.json").read_text())
    assert best["selected_by"] == report["selected_by"] and best["report"] == "comparison.md"
    assert "architecture: attention_unet, the one the patient cross-validation chose" in best["selected_by"]
    assert best["inference_steps_note"] == STEPS["off"] and "LGG" in best["inference_steps_note"]
    assert best["test_dice_3d"]["unetpp"] > best["test_dice_3d"]["attention_unet"]  # reported, not used
    model = read_best(out / "best.json")
    assert model.bundle == bundle_dir("attention_unet")
    assert model.weights == (root / "attention_unet/models/model.pt").resolve()
    # inference repeats the training input size (run.json) and the steps the masks were scored with: the demo's none
    assert model.overrides == {"spatial_size": 64, "inference_steps": STEPS_OFF}


def test_the_shipped_cross_validation_chooses_even_where_the_compared_split_would_pick_the_other(runs, tmp_path):
    """Compared on the split where the other run is perfect (validation for unetpp, the architecture shipped today),
    bundles/best.json's architecture is served, with its own run's steps."""
    shipped = read_best().bundle.name
    other = next(name for name in NAMES if name != shipped)
    split = {"attention_unet": "validation", "unetpp": "test"}[other]  # where `other` is perfect (see `runs`)
    root, out = runs["root"], tmp_path / "reports"
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={root / 'unetpp'}",
                     "--run", f"attention_unet={root / 'attention_unet'}", "--split", split, "--out", out,
                     "--bootstrap", 50)
    assert result.returncode == 0, result.stderr
    assert f"model to serve: {shipped} (architecture: {shipped}, the one the patient cross-validation chose " \
           f"(bundles/best.json" in result.stdout
    report = json.loads((out / "comparison.json").read_text())
    dice = {name: model["mean"]["dice_3d"] for name, model in report["models"].items()}
    assert dice[other] == 1.0 > dice[shipped] and report["best"] == shipped
    best = json.loads((out / "best.json").read_text())
    steps = {"unetpp": "chosen", "attention_unet": "off"}[shipped]
    assert best["overrides"]["inference_steps"] == (CHOSEN if steps == "chosen" else STEPS_OFF)
    assert best["inference_steps_note"] == STEPS[steps] and f"{split} patients only report" in best["selected_by"]


def test_the_report_has_a_column_for_every_metric(runs, tmp_path, monkeypatch):
    """A metric added to metaseg.evaluation.metrics.METRICS reaches the tables of comparison.md and comparison.json."""
    import metaseg.evaluation.reports

    monkeypatch.setattr(metaseg.evaluation.reports, "METRICS", (*metaseg.evaluation.reports.METRICS, "gt_lesions"))
    root, out = runs["root"], tmp_path / "reports"
    report = compare(runs["data"], [("unetpp", root / "unetpp"), ("attention_unet", root / "attention_unet")],
                     out=out, n_resamples=50)
    header = next(line for line in (out / "comparison.md").read_text().splitlines() if line.startswith("| model"))
    assert "| `dice_3d` |" in header and header.endswith("| `gt_lesions` | lesion slices without prediction |")
    n_gt = [p["gt_lesions"] for p in report["models"]["unetpp"]["metric_per_patient"]]
    assert report["models"]["unetpp"]["mean"]["gt_lesions"] == np.mean(n_gt) > 0


def test_a_zip_serves_too_and_best_out_may_be_elsewhere(runs, tmp_path):
    root = runs["root"]
    zipped = shutil.make_archive(str(tmp_path / "Data"), "zip", root, "SYN")  # the zip, with a top folder
    report = compare(Path(zipped), [("unetpp", root / "unetpp"), ("attention_unet", root / "attention_unet")],
                     out=tmp_path / "r", best_out=tmp_path / "elsewhere" / "best.json", n_resamples=50)
    assert report["models"]["unetpp"]["mean"]["dice_3d"] == 1.0
    best = read_best(tmp_path / "elsewhere" / "best.json")
    assert best.weights == (root / report["best"] / "models/model.pt").resolve()


def test_a_record_naming_an_architecture_not_compared_is_one_line(runs, tmp_path):
    other = tmp_path / "other_bundle"
    shutil.copytree(bundle_dir("unetpp") / "configs", other / "configs")
    record = tmp_path / "cv.json"
    record.write_text(json.dumps({"bundle": str(other), "weights": "model.pt", "overrides": {}}))
    root = runs["root"]
    with pytest.raises(UserError, match=r"the cross-validation chose other_bundle \(.*cv.json\), which is not among "
                                        r"the compared runs \(unetpp, attention_unet\)"):
        compare(runs["data"], [("unetpp", root / "unetpp"), ("attention_unet", root / "attention_unet")],
                out=tmp_path / "r", architecture_record=record)
    assert not (tmp_path / "r").exists()


def copy_run(runs: dict, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs["root"] / name, tmp_path / name))


def test_bad_run_argument_is_one_line(runs, tmp_path):
    assert_user_error(metaseg("compare", "--data", runs["data"], "--run", "unetpp", "--run", "attention_unet=x"),
                      "--run must be NAME=RUN_DIR")


def test_run_without_datalist_is_one_line(runs, tmp_path):
    run = copy_run(runs, "unetpp", tmp_path)
    (run / "datalist.json").unlink()
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={run}",
                     "--run", f"attention_unet={runs['root'] / 'attention_unet'}", "--out", tmp_path / "r")
    assert_user_error(result, "no datalist.json")


def test_run_without_masks_of_the_split_is_one_line(runs, tmp_path):
    run = copy_run(runs, "attention_unet", tmp_path)
    shutil.rmtree(run / "test")
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={runs['root'] / 'unetpp'}",
                     "--run", f"attention_unet={run}", "--out", tmp_path / "r")
    assert_user_error(result, "no test masks")


def test_missing_masks_are_counted_by_patient(runs, tmp_path):
    run = copy_run(runs, "attention_unet", tmp_path)
    patient = runs["datalist"]["patients"]["test"][0]
    for png in sorted((run / "test" / "masks" / patient).glob("*.png"))[:2]:
        png.unlink()
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={runs['root'] / 'unetpp'}",
                     "--run", f"attention_unet={run}", "--out", tmp_path / "r")
    assert_user_error(result, f"2 of 6 test masks missing in {run} (attention_unet; by patient: {patient}: 2)")


@pytest.mark.parametrize("recorded", [None, {"threshold": 0.5}, "not json"])
def test_masks_without_their_inference_steps_are_not_scored(runs, tmp_path, recorded):
    """Masks of an older `metaseg evaluate` (MONAI's evaluate.json: argmax, no steps) are not what is served."""
    run = copy_run(runs, "attention_unet", tmp_path)
    metrics = run / "test" / "metrics.json"
    if recorded is None:
        metrics.unlink()
    else:
        metrics.write_text(json.dumps({"val_dice": 0.5, "inference_steps": recorded}) if isinstance(recorded, dict)
                           else recorded)
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={runs['root'] / 'unetpp'}",
                     "--run", f"attention_unet={run}", "--out", tmp_path / "r")
    assert_user_error(result, "does not name the inference steps that made the test masks of attention_unet")
    assert "rerun `metaseg evaluate --bundle attention_unet" in result.stderr and not (tmp_path / "r").exists()


def test_runs_with_different_test_patients_are_not_comparable(runs, tmp_path):
    run = copy_run(runs, "attention_unet", tmp_path)
    datalist = json.loads((run / "datalist.json").read_text())
    datalist["patients"]["test"], datalist["patients"]["training"][0] = (
        datalist["patients"]["training"][:1], datalist["patients"]["test"][0])
    write_json_atomic(run / "datalist.json", datalist)
    result = metaseg("compare", "--data", runs["data"], "--run", f"unetpp={runs['root'] / 'unetpp'}",
                     "--run", f"attention_unet={run}", "--out", tmp_path / "r")
    assert_user_error(result, "runs not comparable")
