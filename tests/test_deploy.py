"""The shipped bundles used in memory the way MONAI Deploy's MonaiBundleInferenceOperator uses a bundle, and their
TorchScript models.

monai-deploy-app-sdk 4.0.0 needs holoscan-cu13 (a CUDA runtime), so its operator is not installed here; `deploy`
below repeats what the operator's `compute` does (monai/deploy/operators/monai_bundle_inference_operator.py):
read `configs/inference.json` alone, drop every transform whose class name contains LoadImage or SaveImage from
`preprocessing` and `postprocessing`, prefer `models/model.ts` over `model.pt`, call the bundle's `inferer` with keyword
arguments (`inferer(inputs=..., network=...)`: the bundle's flip TTA inferer is a config lambda with those names), and
post-process the first output together with the pre-processed input (which `Invertd` needs); the postprocessing ends
in the mask at the bundle's `inference_steps` threshold.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from conftest import REPO, write_dicom
from metaseg.cli import main
from metaseg.bundles import bundle_imports
from test_bundles import NAMES
from ui.sample import sample

DISALLOW_LOAD_SAVE = ("LoadImage", "SaveImage")  # the operator's own list


def without(compose: Compose, names: tuple[str, ...]) -> Compose:
    return Compose([t for t in compose.transforms if not any(n in type(t).__name__ for n in names)])


def deploy(bundle: Path, image: np.ndarray, network: torch.nn.Module | None = None) -> np.ndarray:
    """One channel-first image in memory -> the bundle's mask, as MONAI Deploy's bundle operator computes it (with
    `network` in place of the bundle's models/model.ts, for a test bundle without one). The postprocessing gives a
    2D label image in MONAI's (x, y) order; returned as (1, rows, cols) like the input."""
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    with bundle_imports(bundle):
        device = parser.get_parsed_content("device")
        inferer = parser.get_parsed_content("inferer")
        pre = without(parser.get_parsed_content("preprocessing"), DISALLOW_LOAD_SAVE)
        post = without(parser.get_parsed_content("postprocessing"), DISALLOW_LOAD_SAVE)
    if network is None:
        network = torch.jit.load(str(bundle / "models" / "model.ts"), map_location=device).eval()
    inputs = pre({"image": MetaTensor(torch.as_tensor(np.array(image), dtype=torch.float32))})
    with torch.no_grad():
        output = inferer(inputs=inputs["image"][None].to(device), network=network)
    return post({"pred": output[0], "image": inputs["image"]})["pred"].numpy().T[None]


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> dict:
    """The viewer's phantom sample slice as a 3-channel TIFF, its FLAIR as an 8-bit PNG and as a 16-bit DICOM."""
    folder = tmp_path_factory.mktemp("inputs")
    tif = tifffile.imread(io.BytesIO(sample().files[0][1]))  # (rows, cols, 3)
    tifffile.imwrite(folder / "phantom.tif", tif, photometric="rgb")
    PIL.Image.fromarray(tif[..., 1]).save(folder / "flair.png")
    write_dicom(folder / "flair_dicom.dcm", tif[..., 1].astype(np.uint16) * 16)
    return {
        "phantom": np.moveaxis(tifffile.imread(folder / "phantom.tif"), -1, 0),
        "flair": np.asarray(PIL.Image.open(folder / "flair.png"))[None],
        "flair_dicom": pydicom.dcmread(folder / "flair_dicom.dcm").pixel_array[None],
        "folder": folder,
    }


@pytest.mark.parametrize("name", NAMES)
def test_in_memory_bundle_gives_the_masks_of_metaseg_predict(name, slices, tmp_path):
    assert main(["predict", str(slices["folder"]), "--out", str(tmp_path), "--bundle", name]) == 0
    for stem in ("phantom", "flair", "flair_dicom"):
        ours = deploy(REPO / "bundles" / name, slices[stem])[0] > 0
        written = np.asarray(PIL.Image.open(tmp_path / f"{stem}_seg.png")) > 0
        assert ours.shape == written.shape == slices[stem].shape[1:], stem
        assert ours.sum() > 50, stem  # the trained model finds the phantom's lesion: not two empty masks agreeing
        assert (ours != written).mean() < 1e-3, stem  # TorchScript vs eager: only pixels at p = 0.5 may differ


@pytest.mark.parametrize("name", NAMES)
def test_shipped_torchscript_equals_the_eager_network_and_carries_the_bundle(name):
    bundle = REPO / "bundles" / name
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    with bundle_imports(bundle):
        eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), _extra_files=extra)
    x = torch.randn(2, parser["network_def"]["in_channels"], 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-4)
    assert (bundle / "models" / "model.ts").stat().st_size <= 10 * 2**20
    assert sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) <= 50 * 2**20
    assert b'"network_def"' in extra["inference.json"] and b'"version"' in extra["metadata.json"]
