"""`metaseg train` resumes a run folder's checkpoint only when it was trained from the same bundle configs, data,
split and overrides (fingerprint.json); otherwise one clear line, and --restart starts over."""

from __future__ import annotations

import shutil

import pytest

import metaseg.pipeline
from conftest import REPO
from metaseg.cli import main
from metaseg.errors import UserError
from metaseg.pipeline import FINGERPRINT, train


@pytest.fixture
def stages(monkeypatch) -> list[dict]:
    """The bundle's training replaced by one that only writes the checkpoints a real epoch would leave."""
    calls = []

    def fake_run_stage(bundle, stage, log_file, **overrides):
        calls.append(overrides)
        models = overrides["ckpt_dir"]
        models.mkdir(parents=True, exist_ok=True)
        (models / "checkpoint.pt").write_bytes(b"resume state")
        (models / "model.pt").write_bytes(b"best")

    monkeypatch.setattr(metaseg.pipeline, "run_stage", fake_run_stage)
    return calls


BUNDLE = REPO / "bundles" / "attention_unet"


def test_same_training_resumes_its_checkpoint(stages, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(BUNDLE, tiny_data, run, seed=0, epochs=2)
    (run / "models" / "checkpoint.pt").write_bytes(b"epoch 1 of this run")
    train(BUNDLE, tiny_data, run, seed=0, epochs=2)  # same everything: resumed, nothing refused
    assert len(stages) == 2 and (run / FINGERPRINT).is_file()


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
        train_json.write_text(train_json.read_text().replace('"epochs": 30', '"epochs": 31'))
    with pytest.raises(UserError, match=rf"holds a checkpoint of another training \(other [a-z, ]*{differs}") as err:
        train(bundle, data, run, **kwargs)
    assert "--restart" in str(err.value) and "\n" not in str(err.value)
    assert len(stages) == 1 and (run / "models" / "checkpoint.pt").read_bytes() == b"resume state"
    train(bundle, data, run, restart=True, **kwargs)
    assert len(stages) == 2
    train(bundle, data, run, **kwargs)  # the restarted run resumes as its own
    assert len(stages) == 3


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
