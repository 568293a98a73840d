"""Both bundles inside a real MONAI Label app: its BundleInferTask segments a PNG and a DICOM slice, its
BundleTrainTask trains one epoch on phantom slices. Writes what happened, with versions, to a JSON file.

Runs in the MONAI Label virtualenv (`make monailabel-check` builds it), never in metaseg's: monailabel pulls
torchvision, whose PyPI wheels do not import beside metaseg's torch 2.13.0 CPU wheel. metaseg itself runs in its own
venv (--metaseg-python) for the phantom and for the reference masks of `metaseg predict`.

    .venv-monailabel/bin/python scripts/monailabel_check.py --metaseg-python .venv/bin/python \
        --out benchmarks/results/monailabel.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
NAMES = ("unetpp", "attention_unet")


def metaseg(python: str, *args) -> None:
    subprocess.run([python, "-m", "metaseg.cli", *map(str, args)], cwd=REPO, check=True)


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit MR slice, written with pydicom 2 (monailabel's pydicom-seg needs pydicom < 3)."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=bytes(128))
    ds.is_little_endian, ds.is_implicit_VR = True, False
    rows, cols = pixels.shape
    for keyword, value in dict(SOPClassUID=MRImageStorage, SOPInstanceUID=uid, Modality="MR", Rows=rows, Columns=cols,
                               SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
                               BitsStored=16, HighBit=15, PixelRepresentation=0,
                               PixelData=pixels.astype("<u2").tobytes()).items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def prepare(work: Path, python: str) -> tuple[Path, Path]:
    """A MONAI Label datastore of phantom slices (RGB PNG + 0/255 PNG label) and the richest slice's FLAIR as a
    gray PNG and a 16-bit DICOM, for inference."""
    metaseg(python, "synth", work / "phantom", "--patients", 4, "--slices", 8, "--seed", 0)
    studies, inputs = work / "studies", work / "inputs"
    (studies / "labels" / "final").mkdir(parents=True)
    inputs.mkdir()
    richest, most = None, -1
    for mask in sorted((work / "phantom").glob("*/*_mask.tif")):
        image = mask.with_name(mask.name.replace("_mask", ""))
        rgb, label = np.asarray(Image.open(image)), np.asarray(Image.open(mask))
        stem = image.stem
        Image.fromarray(rgb).save(studies / f"{stem}.png")
        Image.fromarray(label).save(studies / "labels" / "final" / f"{stem}.png")
        if np.count_nonzero(label) > most:
            richest, most = rgb, np.count_nonzero(label)
    Image.fromarray(richest[..., 1]).save(inputs / "slice.png")
    write_dicom(inputs / "slice_dicom.dcm", richest[..., 1].astype(np.uint16) * 16)
    return studies, inputs


def make_app(app_dir: Path, studies: Path):
    from monailabel.datastore.local import LocalDatastore
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.tasks.infer.bundle import BundleInferTask
    from monailabel.tasks.train.bundle import BundleTrainTask

    class MetasegApp(MONAILabelApp):
        """A MONAI Label app serving the bundles copied into its model folder, as MONAI Label's bundle apps do."""

        def init_datastore(self):
            return LocalDatastore(self.studies, extensions=("*.png",))

        def init_infers(self):
            return {name: BundleInferTask(str(app_dir / "model" / name), self.conf) for name in NAMES}

        def init_trainers(self):
            return {name: BundleTrainTask(str(app_dir / "model" / name), self.conf) for name in NAMES}

    return MetasegApp(str(app_dir), str(studies), {"preload": "false"}, name="metaseg")


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
    ours, reference = np.squeeze(ours) > 0, reference > 0
    if ours.shape != reference.shape:
        return {"shape": list(ours.shape), "reference_shape": list(reference.shape), "same_shape": False}
    both = np.logical_and(ours, reference).sum()
    return {
        "shape": list(ours.shape),
        "same_shape": True,
        "lesion_pixels": int(ours.sum()),
        "reference_lesion_pixels": int(reference.sum()),
        "dice_vs_metaseg_predict": float(2 * both / max(ours.sum() + reference.sum(), 1)),
        "pixel_agreement": float((ours == reference).mean()),
    }


def check(python: str) -> dict:
    result = {"versions": {p: version(p) for p in ("monailabel", "monai", "torch", "torchvision", "pytorch-ignite")},
              "bundles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies, inputs = prepare(work, python)
        for name in NAMES:
            metaseg(python, "predict", inputs, "--out", work / "reference" / name, "--bundle", name)
            shutil.copytree(REPO / "bundles" / name, work / "app" / "model" / name,
                            ignore=shutil.ignore_patterns("eval", "__pycache__", "checkpoint.pt"))
        app = make_app(work / "app", studies)
        for name in NAMES:
            report = result["bundles"][name] = {"loaded": name in app.info()["models"], "infer": {}, "train": {}}
            for file in ("slice.png", "slice_dicom.dcm"):
                try:
                    start = time.perf_counter()
                    mask, _ = app._infers[name]({"model": name, "image": str(inputs / file), "device": "cpu",
                                                 "result_write_to_file": False})
                    reference = np.asarray(Image.open(work / "reference" / name / f"{Path(file).stem}_seg.png"))
                    report["infer"][file] = {**compare(mask, reference), "seconds": round(time.perf_counter() - start, 2)}
                except Exception:  # the record says exactly what failed, and the other checks still run
                    report["infer"][file] = {"error": traceback.format_exc(limit=4)}
            weights = work / "app" / "model" / name / "models" / "model.pt"
            before = weights.read_bytes()
            try:
                start = time.perf_counter()
                app.train({"model": name, "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.25,
                           "pretrained": True})
                report["train"] = {"epochs": 1, "slices": len(list(studies.glob("*.png"))),
                                   "model_pt_rewritten": weights.read_bytes() != before,
                                   "seconds": round(time.perf_counter() - start, 1)}
            except Exception:
                report["train"] = {"error": traceback.format_exc(limit=6)}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metaseg-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the Python of metaseg's own venv (for `metaseg synth` and `metaseg predict`)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    args = parser.parse_args()
    outcome = check(args.metaseg_python)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(outcome, indent=2) + "\n")
    print(json.dumps(outcome, indent=2))
    failed = [f"{n}: {k}" for n, r in outcome["bundles"].items() for k in ("infer", "train") if "error" in json.dumps(r[k])]
    sys.exit(1 if failed else 0)
