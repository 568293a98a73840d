"""A bundle's fold ensemble: every consumer (metaseg's engine, plain `monai.bundle run`, the k TorchScript files)
averages the same k fold models and gives the same mask; a missing or foreign fold is one readable line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO
from metaseg.bundles import bundle_imports
from metaseg.inference.engine import Engine
from metaseg.errors import UserError
from metaseg.imageio.reader import decode
from test_bundles import NAMES, blocker, monai_bundle, network_def, ok  # noqa: F401 (blocker: a fixture)

SIZE = 32
FOLDS = 3


def ship_weights():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fold_files(bundle: Path) -> list[Path]:
    """Where a bundle keeps fold k's model.pt (fold 0: models/model.pt), as ship_weights writes them."""
    return [ship_weights().fold_weights(bundle, k) for k in range(FOLDS)]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    """U-Net++ copied out of the repo with three fold models of different seeded random weights, and their TorchScript
    exports, laid out as scripts/ship_weights.py ships them; flip TTA on (the view these tests average), whatever
    inference steps the cross-validation chose for the shipped bundle."""
    bundle = Path(shutil.copytree(REPO / "bundles" / "unetpp", tmp_path_factory.mktemp("ens") / "unetpp",
                                  ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "__pycache__")))
    inference = bundle / "configs" / "inference.json"
    configs = json.loads(inference.read_text())
    configs["inference_steps"]["flip_tta"] = True
    inference.write_text(json.dumps(configs, indent=4))
    for seed, path in enumerate(fold_files(bundle)):
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(network_def(bundle).state_dict(), path)
        ship_weights().export_torchscript(bundle, path)
    return bundle


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """Three data-set-like RGB slices of different sizes, as PNG files."""
    folder = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(64, 64), (80, 48), (40, 72)]):
        image = rng.integers(0, 60, (*shape, 3)).astype(np.uint8)
        image[10:30, 12:28] += 150  # a bright blob for the networks to see
        PIL.Image.fromarray(image).save(folder / f"s{i}.png")
    return folder


def frames(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: decode([(p.name, p.read_bytes())]).inputs[0] for p in sorted(folder.glob("*.png"))}


def test_the_engine_averages_every_fold_of_the_shipped_bundle(ensemble, slices, tmp_path):
    """The bundle's own models/model.pt means its ensemble; any other model.pt is served alone."""
    engine = Engine(ensemble, overrides={"spatial_size": SIZE})
    assert engine.models == fold_files(ensemble) and engine.inference_steps["flip_tta"] is True
    assert Engine(ensemble, weights=fold_files(ensemble)[0], overrides={"spatial_size": SIZE}).models == engine.models
    copies = [Path(shutil.copy(path, tmp_path / f"fold_{k}.pt")) for k, path in enumerate(fold_files(ensemble))]
    singles = [Engine(ensemble, weights=path, overrides={"spatial_size": SIZE}) for path in copies]
    assert [single.models for single in singles] == [[path] for path in copies]
    inputs = list(frames(slices).values())
    each = [single.probabilities(inputs) for single in singles]  # each fold with the bundle's flip TTA
    for i, ours in enumerate(engine.probabilities(inputs)):
        mean = np.mean([maps[i] for maps in each], axis=0)
        np.testing.assert_allclose(ours, mean, atol=1e-5)  # the Invertd between is linear (bilinear)
        assert not np.allclose(mean, each[0][i], atol=1e-3)  # the folds really differ


def test_monai_bundle_run_and_torchscript_give_the_engines_masks(ensemble, slices, blocker, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    ok(monai_bundle("run", "--meta_file", ensemble / "configs/metadata.json", "--config_file",
                    ensemble / "configs/inference.json", "--bundle_root", ensemble, "--input_dir", slices,
                    "--output_dir", out, "--spatial_size", SIZE, cwd=tmp_path, blocker=blocker))
    engine = Engine(ensemble, overrides={"spatial_size": SIZE})
    threshold = engine.inference_steps["threshold"]
    scripted = [torch.jit.load(str(path.with_suffix(".ts"))) for path in fold_files(ensemble)]
    for stem, frame in frames(slices).items():
        ours = engine.probabilities([frame])[0] >= threshold
        theirs = np.asarray(PIL.Image.open(out / f"{stem}_seg.png")) > 0
        assert ours.shape == theirs.shape and (ours == theirs).mean() > 0.99, stem  # float ties at p = t may differ
        batch = engine._prepare(frame)["image"].as_tensor()[None]  # the bundle's own preprocessing
        with torch.inference_mode():
            views = [torch.softmax(ts(x), 1) for ts in scripted for x in (batch, batch.flip(-1))]
            torchscript = torch.stack([v if i % 2 == 0 else v.flip(-1) for i, v in enumerate(views)]).mean(0)
            torch.testing.assert_close(torchscript, engine.inferer(batch, engine.network), rtol=1e-4, atol=1e-5)


def test_the_inferer_of_no_other_fold_is_the_plain_network(ensemble):
    """The bundle's two `probabilities` views (what metaseg cv predicts per fold) are what its inferer averages."""
    parser = ConfigParser()
    parser.read_config(str(ensemble / "configs" / "inference.json"))
    parser["bundle_root"], parser["other_folds#checkpoints"] = str(ensemble), []
    with bundle_imports(ensemble):
        network = parser.get_parsed_content("network_def").eval()
        inferer, views = parser.get_parsed_content("inferer"), parser.get_parsed_content("probabilities")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(inferer(x, network), (views["plain"](x, network) + views["mirrored"](x, network)) / 2)
        inferer.flip_tta = False
        torch.testing.assert_close(inferer(x, network), views["plain"](x, network))


def test_a_missing_or_foreign_fold_is_one_line(ensemble, tmp_path):
    bundle = Path(shutil.copytree(ensemble, tmp_path / "unetpp"))
    (bundle / "models" / "fold_2" / "model.pt").unlink()
    with pytest.raises(UserError, match=r"fold model .*fold_2/model.pt is missing"):
        Engine(bundle, overrides={"spatial_size": SIZE})
    torch.save({"weight": torch.zeros(1)}, bundle / "models" / "fold_2" / "model.pt")
    with pytest.raises(UserError, match=r"fold_2/model.pt do not fit the unetpp network"):
        Engine(bundle, overrides={"spatial_size": SIZE})


def test_both_bundles_carry_the_same_ensemble_code():
    code = {name: (REPO / "bundles" / name / "scripts" / "ensemble.py").read_text() for name in NAMES}
    assert code["unetpp"] == code["attention_unet"]
