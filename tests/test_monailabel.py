"""MONAI Label and the bundles: what its writer needs from their inference output (fast, in metaseg's venv), and both
bundles in a real MONAI Label server (scripts/monailabel_check.py) when MONAI Label's own venv exists.

MONAI Label's BundleInferTask runs the bundle's preprocessing (its LoadImaged too), network, inferer and
postprocessing without SaveImaged, then its own Restored (resizes the result when its shape differs from the image's
`spatial_shape` metadata) and Writer, which transposes the array from MONAI's (x, y) order, writes it with ITK in the
input's format (PNG and DICOM: integer pixels only) and treats a 3-axis array as a volume. The first test holds the
postprocessing output to that, and to the masks `metaseg predict` writes.

The server check needs MONAI Label's venv (`make monailabel-check`, about 8 GB: monailabel needs torchvision, which
does not import beside metaseg's torch CPU wheel); `make test` does not build it, so a fresh clone skips that test and
benchmarks/results/monailabel.json keeps the last run.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, SaveImaged

from conftest import REPO, write_dicom
from metaseg.bundles import bundle_imports
from metaseg.inference.engine import Engine
from metaseg.inference.predict import predict
from test_bundles import NAMES
from ui.sample import sample

ML_PYTHON = REPO / ".venv-monailabel" / "bin" / "python"


def as_monai_label(name: str):
    """file -> (the bundle's output as MONAI Label's BundleInferTask has it before Restored and its writer, the
    image's metadata); with model.pt, as BundleInferTask prefers it."""
    bundle = REPO / "bundles" / name
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    with bundle_imports(bundle):
        network = parser.get_parsed_content("network_def")
        pre = parser.get_parsed_content("preprocessing")
        inferer = parser.get_parsed_content("inferer")
        post = parser.get_parsed_content("postprocessing").transforms
    post = Compose([t for t in post if not isinstance(t, SaveImaged)])  # BundleInferTask's post_filter
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()

    def run(file) -> tuple[torch.Tensor, dict]:
        data = pre({"image": str(file)})
        with torch.no_grad():
            data["pred"] = inferer(inputs=data["image"][None], network=network)[0]
        return post(data)["pred"], data["image"].meta

    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The FLAIR of the viewer's phantom sample slice as a gray PNG, cropped to 256x200 (not square: the axis order
    shows) and whole, and as a 16-bit DICOM."""
    folder = tmp_path_factory.mktemp("inputs")
    flair = tifffile.imread(io.BytesIO(sample().files[0][1]))[..., 1]
    PIL.Image.fromarray(np.ascontiguousarray(flair[:, 28:228])).save(folder / "wide.png")
    PIL.Image.fromarray(flair).save(folder / "square.png")
    write_dicom(folder / "square_dicom.dcm", flair.astype(np.uint16) * 16)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_the_output_is_a_label_image_that_monai_label_writes_as_metaseg_predict_does(name, inputs, tmp_path):
    predict(inputs, tmp_path, Engine(REPO / "bundles" / name))
    stated = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
    stated = stated["network_data_format"]["post_processed_outputs"]["pred"]
    task = as_monai_label(name)
    for file in sorted(inputs.iterdir()):
        label, meta = task(file)
        written = np.asarray(PIL.Image.open(tmp_path / f"{file.stem}_seg.png")) > 0
        assert label.dtype == torch.uint8 and str(label.dtype) == f"torch.{stated['dtype']}", file.name  # ITK: no float
        assert label.ndim == 2, file.name  # one 2D image: a third axis would make it a volume
        assert set(label.unique().tolist()) <= set(range(stated["value_range"][0], stated["value_range"][1] + 1))
        if file.suffix == ".png":
            assert tuple(label.shape) == tuple(meta["spatial_shape"]), file.name  # else Restored resizes it
        # MONAI Label's writer transposes from MONAI's (x, y) order: then it is the mask metaseg predict writes
        assert written.sum() > 50, file.name  # the lesion is found: not two empty masks agreeing
        np.testing.assert_array_equal(label.numpy().T > 0, written, err_msg=file.name)


@pytest.mark.skipif(not ML_PYTHON.is_file(), reason="no MONAI Label venv: `make monailabel-check` builds it")
def test_a_monai_label_server_infers_with_and_trains_both_bundles(tmp_path):
    out = tmp_path / "monailabel.json"
    result = subprocess.run(
        [str(ML_PYTHON), "scripts/monailabel_check.py", "--metaseg-python", sys.executable, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["versions"]["monailabel"] == "0.8.5"
    assert set(report["server"]["models"]) == set(report["server"]["trainers"]) == set(report["bundles"]) == set(NAMES)
    for name, bundle in report["bundles"].items():
        for file, infer in bundle["infer"].items():
            assert infer["result_file"] == file[file.rindex("."):], (name, file)  # PNG for a PNG, DICOM for a DICOM
            assert infer["dtype"] == "uint8" and infer["values"] == [0, 1] and infer["same_shape"], (name, file)
            assert infer["dice_vs_metaseg_predict"] == 1.0 and infer["lesion_pixels"] > 0, (name, file, infer)
        assert bundle["train"]["status"] == "DONE" and bundle["train"]["model_pt_rewritten"], name
