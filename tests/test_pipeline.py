"""The stages over a run folder. `metaseg train` resumes a run folder's checkpoint only when it was trained from the
same bundle configs, data, split and overrides (fingerprint.json); otherwise one clear line, and --restart starts
over. `metaseg evaluate` scores the masks users get, `metaseg compare` records them as the model to serve, and the
bundle's own evaluate.json (plain MONAI) agrees with the engine with the steps off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import PIL.Image
import pytest

from metaseg.training import pipeline
from conftest import REPO, assert_user_error, metaseg
from metaseg.bundles import NAMES, STAGES, bundle_dir
from metaseg.cli import main
from metaseg.data.datalist import by_patient
from metaseg.conventions import default_weights, mask_file, read_best
from metaseg.data.discovery import discover, read_tiff
from metaseg.data.datalist import build_datalist, write_datalist
from metaseg.errors import UserError
from metaseg.files import write_json_atomic
from metaseg.evaluation.metrics import patient_metrics
from metaseg.training.pipeline import FINGERPRINT, STEPS, STEPS_OFF, evaluate, train


@pytest.fixture
def stages(monkeypatch) -> list[dict]:
    """The bundle's training replaced by one that records its overrides and the checkpoint it would resume from
    (`found`: the bytes of ckpt_dir/checkpoint.pt, None without), then writes the checkpoints a real epoch would
    leave; the bundle's own resuming is tests/test_bundles.py's."""
    calls = []

    def fake_run_stage(bundle, stage, log_file, **overrides):
        models = overrides["ckpt_dir"]
        found = models / "checkpoint.pt"
        calls.append(overrides | {"found": found.read_bytes() if found.is_file() else None})
        models.mkdir(parents=True, exist_ok=True)
        (models / "checkpoint.pt").write_bytes(b"resume state")
        (models / "model.pt").write_bytes(b"best")

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    return calls


BUNDLE = REPO / "bundles" / "attention_unet"


def test_same_training_resumes_its_checkpoint(stages, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(BUNDLE, tiny_data, run, seed=0, epochs=2)
    (run / "models" / "checkpoint.pt").write_bytes(b"epoch 1 of this run")  # left by an interrupted run
    train(BUNDLE, tiny_data, run, seed=0, epochs=2)  # same everything: resumed, nothing refused
    assert [call["found"] for call in stages] == [None, b"epoch 1 of this run"]
    assert stages[1]["ckpt_dir"] == (run / "models").resolve() and (run / FINGERPRINT).is_file()


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        ({"seed": 1}, "split"),
        ({"epochs": 3}, "overrides"),
        ({"spatial_size": 64}, "overrides"),
        ({"data": "other"}, "data"),
        ({"bundle": "edited"}, "bundle"),
    ],
)
def test_other_training_into_a_run_folder_is_refused_then_restarted(stages, tiny_data, tmp_path, change, differs):
    run = tmp_path / "run"
    train(BUNDLE, tiny_data, run, seed=0, epochs=2)
    kwargs = {"seed": 0, "epochs": 2} | {k: v for k, v in change.items() if k not in ("data", "bundle")}
    data, bundle = tiny_data, BUNDLE
    if "data" in change:  # the same patients, one slice fewer
        data = tmp_path / "other"
        shutil.copytree(tiny_data, data)
        for path in data.rglob("P00_10*.tif"):
            path.unlink()
    if "bundle" in change:  # the same bundle with an edited recipe
        bundle = tmp_path / "attention_unet"
        shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models"))
        train_json = bundle / "configs" / "train.json"
        train_json.write_text(train_json.read_text().replace('"learning_rate": 0.002', '"learning_rate": 0.003'))
    with pytest.raises(UserError, match=rf"holds a checkpoint of another training \(other [a-z, ]*{differs}") as err:
        train(bundle, data, run, **kwargs)
    assert "--restart" in str(err.value) and "\n" not in str(err.value)
    assert len(stages) == 1 and (run / "models" / "checkpoint.pt").read_bytes() == b"resume state"
    train(bundle, data, run, restart=True, **kwargs)
    train(bundle, data, run, **kwargs)  # the restarted run resumes as its own
    assert [call["found"] for call in stages] == [None, None, b"resume state"]


def test_run_folder_without_fingerprint_is_refused_on_the_command_line(stages, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "checkpoint.pt").write_bytes(b"made before fingerprints")
    args = ["train", "--bundle", "attention_unet", "--data", str(tiny_data), "--out", str(run), "--epochs", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable fingerprint.json" in err and "--restart" in err
    assert not stages
    assert main([*args, "--restart"]) == 0 and len(stages) == 1
    assert (run / "models" / "checkpoint.pt").read_bytes() == b"resume state"


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"patch_size": 40}, "multiple of 16"),
    ({"patch_size": 256}, "spatial_size 128"),  # the bundle's own input size
    ({"spatial_size": 64, "patch_size": 96}, "spatial_size 64"),
])
def test_a_patch_that_does_not_fit_the_slice_is_refused_before_training(stages, tiny_data, tmp_path, overrides,
                                                                          fragment):
    with pytest.raises(UserError, match=fragment):
        train(BUNDLE, tiny_data, tmp_path / "run", **overrides)
    assert not stages and not (tmp_path / "run").exists()
    train(BUNDLE, tiny_data, tmp_path / "run", spatial_size=64, patch_size=32)
    assert stages[-1]["patch_size"] == 32


# --- evaluate -> compare -> serve: what is scored is what is served ---

SIZE = 96  # the networks' input in these runs (the shipped weights are convolutional: they run at any multiple of 16)


@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory) -> dict:
    """A phantom of 6 patients x 3 slices (2 test patients) and, per bundle, a run folder as `metaseg train` leaves
    it, holding the shipped weights as if trained at SIZE: real networks, no training, a quarter of the compute."""
    from metaseg.data.phantom import synthesize

    root = tmp_path_factory.mktemp("shipped")
    data = root / "Data"
    synthesize(data, patients=6, slices=3, seed=1)
    datalist = build_datalist(discover(data), seed=0, test_fraction=0.4)
    for name in NAMES:
        run = root / name
        write_datalist(datalist, run / "datalist.json")
        write_json_atomic(run / "run.json", {"bundle": name, "data": str(data), "seed": 0,
                                             "overrides": {"spatial_size": SIZE}})
        (run / "models").mkdir()
        shutil.copyfile(default_weights(bundle_dir(name)), default_weights(run))
    return {"root": root, "data": data, "datalist": datalist}


def run_copy(shipped_runs: dict, name: str, tmp_path: Path) -> Path:
    """A fresh copy of a bundle's run folder (evaluate writes into its run)."""
    return Path(shutil.copytree(shipped_runs["root"] / name, tmp_path / name))


def read_masks(folder: Path, items: list[dict]) -> np.ndarray:
    """The boolean stack of the `<patient>/<stem>_seg.png` masks under `folder` of these datalist items."""
    paths = [folder / PurePosixPath(item["image"]).parent / mask_file(PurePosixPath(item["image"]).stem)
             for item in items]
    return np.stack([np.asarray(PIL.Image.open(path)) > 0 for path in paths])


def test_the_bundles_evaluate_json_gives_the_engines_masks_with_the_steps_off(shipped_runs, tmp_path):
    """Plain MONAI's evaluate.json (argmax of the class probabilities, no inference steps) writes the masks, and so
    scores the per-patient 3D Dice, of `metaseg evaluate --steps off` (the engine at threshold 0.5, no flip TTA, no
    component steps)."""
    from monai.bundle import ConfigWorkflow

    from metaseg.bundles import bundle_imports

    name = "attention_unet"  # the bundles' configs differ only in network and steps (tests/test_bundle_configs.py)
    bundle, run, data = bundle_dir(name), run_copy(shipped_runs, name, tmp_path), shipped_runs["data"]
    configs = bundle / "configs"
    flow = ConfigWorkflow(
        config_file=[str(configs / file) for file in STAGES["evaluating"]], meta_file=str(configs / "metadata.json"),
        logging_file=False, workflow_type="eval", bundle_root=str(bundle), dataset_dir=str(data),
        datalist=str(run / "datalist.json"), ckpt_dir=str(run / "models"), output_dir=str(tmp_path / "monai"),
        spatial_size=SIZE)
    with bundle_imports(bundle):
        flow.initialize()
        flow.run()
    metrics = json.loads(evaluate(bundle, data, run, "test", steps="off").read_text())
    assert metrics["inference_steps"] == STEPS_OFF and metrics["steps"] == STEPS["off"]
    groups = by_patient(shipped_runs["datalist"]["test"])
    assert [case["patient"] for case in metrics["metric_per_case"]] == list(groups) and len(groups) == 2
    for case in metrics["metric_per_case"]:
        items = groups[case["patient"]]
        plain_monai, engine = read_masks(tmp_path / "monai" / "masks", items), read_masks(run / "test" / "masks", items)
        assert engine.any() and np.array_equal(plain_monai, engine)  # pixel for pixel, not two empty masks agreeing
        truth = np.stack([read_tiff((data / item["label"]).read_bytes()) > 0 for item in items])
        assert patient_metrics(truth, plain_monai)["dice_3d"] == case["dice_3d"]


def test_compare_records_the_model_and_steps_whose_masks_evaluate_scored(shipped_runs, tmp_path):
    """The demo's path: evaluate (the architecture to serve with the steps off, the other with its bundle's steps),
    compare, then `metaseg predict --best` and the server: the served masks are the scored ones."""
    from metaseg.inference.engine import Engine
    from serve.config import Settings
    from serve.model import load

    data, served = shipped_runs["data"], read_best().bundle.name  # the shipped cross-validation's architecture
    other = next(name for name in NAMES if name != served)
    runs = {name: run_copy(shipped_runs, name, tmp_path) for name in NAMES}
    result = metaseg("evaluate", "--bundle", served, "--data", data, "--run", runs[served], "--steps", "off")
    assert result.returncode == 0, result.stderr
    assert "test: per-patient 3D Dice" in result.stdout and "over 2 patients, inference steps off" in result.stdout
    assert metaseg("evaluate", "--bundle", other, "--data", data, "--run", runs[other]).returncode == 0
    chosen = json.loads((runs[other] / "test" / "metrics.json").read_text())
    assert chosen["inference_steps"] == Engine(bundle_dir(other), runs[other] / "models" / "model.pt",
                                               overrides={"spatial_size": SIZE}).inference_steps != STEPS_OFF

    out = tmp_path / "report"
    result = metaseg("compare", "--data", data, *[arg for name in NAMES for arg in ("--run", f"{name}={runs[name]}")],
                     "--out", out, "--bootstrap", 50)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "comparison.json").read_text())
    scored = json.loads((runs[served] / "test" / "metrics.json").read_text())
    assert [p["dice_3d"] for p in report["models"][served]["metric_per_patient"]] == \
        [p["dice_3d"] for p in scored["metric_per_case"]]  # compare scores the very masks evaluate scored
    # evaluate's FROC: the masks' lesions, each kept at the threshold of the steps off (0.5) by its highest probability
    assert report["models"][served]["froc"] == scored["froc"] and set(scored["froc"]) == {"points", "cpm"}
    assert all(point["threshold"] >= 0.5 for point in scored["froc"]["points"])
    model = read_best(out / "best.json")
    assert (model.bundle.name, model.weights) == (served, default_weights(runs[served]).resolve())
    assert model.overrides == {"spatial_size": SIZE, "inference_steps": STEPS_OFF}
    assert "LGG" in json.loads((out / "best.json").read_text())["inference_steps_note"]

    inputs = tmp_path / "inputs"
    for patient in shipped_runs["datalist"]["patients"]["test"]:
        shutil.copytree(data / patient, inputs / patient)
    result = metaseg("predict", inputs, "--out", tmp_path / "served", "--best", out / "best.json")
    assert result.returncode == 0, result.stderr
    items = shipped_runs["datalist"]["test"]
    assert np.array_equal(read_masks(tmp_path / "served", items), read_masks(runs[served] / "test" / "masks", items))
    engine, recorded = load(Settings(best_record=out / "best.json"))  # `metaseg serve --best`
    assert engine.inference_steps == STEPS_OFF
    assert recorded.test_metrics["dice_3d"] == report["models"][served]["mean"]["dice_3d"]


@pytest.mark.parametrize("case", ["other data", "unreadable slice", "no run.json", "unknown steps"])
def test_evaluate_refuses_bad_input_in_one_line_and_keeps_the_last_evaluation(shipped_runs, tiny_data, tmp_path,
                                                                               case):
    run, data = run_copy(shipped_runs, "attention_unet", tmp_path), shipped_runs["data"]
    (run / "test" / "masks").mkdir(parents=True)
    (run / "test" / "metrics.json").write_text("{}")
    fragment = {"other data": "not in the data source", "unreadable slice": "2 test slices could not be segmented",
                "no run.json": "no readable run.json", "unknown steps": "invalid choice"}[case]
    args = ["evaluate", "--bundle", "attention_unet", "--data", data, "--run", run]
    if case == "other data":
        args[4] = tiny_data
    elif case == "unreadable slice":
        args[4] = Path(shutil.copytree(data, tmp_path / "corrupt"))
        patient = shipped_runs["datalist"]["patients"]["test"][0]
        for path in sorted((args[4] / patient).glob(f"{patient}_[12].tif")):
            path.write_bytes(b"not a TIFF")
    elif case == "no run.json":
        (run / "run.json").unlink()
    else:
        args += ["--steps", "most"]
    result = metaseg(*args)
    if case == "unreadable slice":  # found while segmenting: one line after the progress bar
        result.stderr = result.stderr.strip().splitlines()[-1]
    assert_user_error(result, fragment)
    if case != "unreadable slice":  # nothing segmented: the last evaluation is still there
        assert (run / "test" / "metrics.json").read_text() == "{}"
    else:  # its masks are gone with it, so compare cannot score a half-made evaluation
        assert not (run / "test" / "metrics.json").exists()
