"""Both bundles in a MONAI Label server, used over its REST API as MONAI Label's clients use it.

`monailabel start_server` serves an app on a free local port: this file, copied as the app's main.py, with a
BundleInferTask and a BundleTrainTask for each bundle (copies in the app's model/ folder, as MONAI Label's bundle apps
hold them) and a datastore of phantom slices with their labels (labels/final). Then, for each bundle:
  `POST /infer/<model>?output=image` with a gray PNG, a PNG that is not square and a 16-bit DICOM slice: the result
  file MONAI Label writes (its writer picks the input's format) is read back and compared with `metaseg predict`'s
  mask of the same file;
  `POST /train/<model>`: one epoch on the datastore, in MONAI Label's training subprocess, polled on `GET /train/` as
  its clients poll it; the bundle's models/model.pt must be rewritten.
No NIfTI volume is sent: the bundles are 2D and read PNG/TIFF/JPEG and DICOM slices only (volumes are metaseg's
engine's).
What happened, with versions and times, goes to a JSON file; the exit status is 1 if any step failed.

Runs in the MONAI Label virtualenv (`make monailabel-check` builds it), never in metaseg's: monailabel pulls
torchvision, whose PyPI wheels do not import beside metaseg's torch 2.13.0 CPU wheel. metaseg itself runs in its own
venv (--metaseg-python) for the phantom and for the reference masks of `metaseg predict`.

    .venv-monailabel/bin/python scripts/monailabel_check.py --metaseg-python .venv/bin/python \
        --out benchmarks/results/monailabel.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pydicom
import requests
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
NAMES = ("unetpp", "attention_unet")
INPUTS = ("slice.png", "wide.png", "slice_dicom.dcm")
TRAIN = {"max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.25, "pretrained": True}
STARTUP_S, TRAIN_S = 600, 1800  # on two shared cores


class MetasegApp(MONAILabelApp):
    """The app `monailabel start_server` loads from main.py: each bundle in model/ for inference and training."""

    def __init__(self, app_dir: str, studies: str, conf: dict):
        super().__init__(app_dir, studies, conf, name="metaseg", description="metaseg's two MONAI bundles")

    def init_datastore(self):
        return LocalDatastore(self.studies, extensions=("*.png",))

    def init_infers(self):
        return {name: BundleInferTask(os.path.join(self.app_dir, "model", name), self.conf) for name in NAMES}

    def init_trainers(self):
        return {name: BundleTrainTask(os.path.join(self.app_dir, "model", name), self.conf) for name in NAMES}


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
    """A MONAI Label datastore of phantom slices (RGB PNG + 0/255 PNG label), and the richest slice's FLAIR as a gray
    PNG, cropped to 256x200 (a non-square PNG: the axis order must survive) and as a 16-bit DICOM, for inference."""
    metaseg(python, "synth", work / "phantom", "--patients", 4, "--slices", 8, "--seed", 0)
    studies, inputs = work / "studies", work / "inputs"
    (studies / "labels" / "final").mkdir(parents=True)
    inputs.mkdir()
    richest, most = None, -1
    for mask in sorted((work / "phantom").glob("*/*_mask.tif")):
        image = mask.with_name(mask.name.replace("_mask", ""))
        rgb, label = np.asarray(Image.open(image)), np.asarray(Image.open(mask))
        Image.fromarray(rgb).save(studies / f"{image.stem}.png")
        Image.fromarray(label).save(studies / "labels" / "final" / f"{image.stem}.png")
        if np.count_nonzero(label) > most:
            richest, most = rgb, np.count_nonzero(label)
    flair = richest[..., 1]
    Image.fromarray(flair).save(inputs / "slice.png")
    Image.fromarray(np.ascontiguousarray(flair[:, 28:228])).save(inputs / "wide.png")
    write_dicom(inputs / "slice_dicom.dcm", flair.astype(np.uint16) * 16)
    return studies, inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Path, studies: Path, log: Path) -> tuple[subprocess.Popen, str, float]:
    """`monailabel start_server` in the background; returns it, its URL and the seconds until /info/ answered."""
    port = free_port()
    command = ["monailabel", "start_server", "--app", str(app), "--studies", str(studies), "--conf", "preload", "false",
               "--host", "127.0.0.1", "--port", str(port)]
    venv = Path(sys.executable).parent  # as activated: the `monailabel` script runs the `python` it finds on PATH
    env = dict(os.environ, PATH=f"{venv}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv.parent))
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - start < STARTUP_S:
        if server.poll() is not None:
            raise RuntimeError(f"monailabel start_server exited ({server.returncode}):\n{tail(log)}")
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                return server, url, time.perf_counter() - start
        except requests.ConnectionError:
            pass
        time.sleep(1)
    stop(server)
    raise RuntimeError(f"monailabel start_server did not answer in {STARTUP_S} s:\n{tail(log)}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def read_result(content: bytes, suffix: str) -> np.ndarray:
    """A result file as a (rows, cols) array."""
    if suffix == ".dcm":
        return np.squeeze(pydicom.dcmread(io.BytesIO(content)).pixel_array)
    return np.asarray(Image.open(io.BytesIO(content)))


def compare(ours: np.ndarray, reference: np.ndarray) -> dict:
    found = {"dtype": str(ours.dtype), "values": np.unique(ours).tolist(), "shape": list(ours.shape)}
    ours, reference = ours > 0, reference > 0
    if ours.shape != reference.shape:
        return {**found, "reference_shape": list(reference.shape), "same_shape": False}
    both = np.logical_and(ours, reference).sum()
    return {
        **found,
        "same_shape": True,
        "lesion_pixels": int(ours.sum()),
        "reference_lesion_pixels": int(reference.sum()),
        "dice_vs_metaseg_predict": round(float(2 * both / max(ours.sum() + reference.sum(), 1)), 4),
        "pixel_agreement": round(float((ours == reference).mean()), 6),
    }


def infer(url: str, name: str, file: Path, reference: Path) -> dict:
    """`POST /infer/<model>?output=image` with the file uploaded, as MONAI Label's clients send one."""
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/{name}", params={"output": "image"},
                             files={"file": (file.name, file.read_bytes())},
                             data={"params": json.dumps({"device": "cpu"})})
    seconds = round(time.perf_counter() - start, 2)
    if not response.ok:
        return {"error": f"HTTP {response.status_code}: {response.text[:500]}", "seconds": seconds}
    result = Path(response.headers["content-disposition"].split("filename=")[-1].strip('"'))
    mask = read_result(response.content, result.suffix)
    return {"result_file": result.suffix, "content_type": response.headers["content-type"],
            **compare(mask, np.asarray(Image.open(reference))), "seconds": seconds}


def train(url: str, name: str, weights: Path) -> dict:
    """`POST /train/<model>`, then `GET /train/` until MONAI Label's training subprocess has finished."""
    before = weights.read_bytes()
    start = time.perf_counter()
    response = requests.post(f"{url}/train/{name}", json=TRAIN)
    if not response.ok:
        return {"error": f"HTTP {response.status_code}: {response.text[:500]}"}
    task = response.json()
    while task["status"] in ("SUBMITTED", "RUNNING") and time.perf_counter() - start < TRAIN_S:
        time.sleep(2)
        task = requests.get(f"{url}/train/").json()
    report = {"status": task["status"], "params": TRAIN, "model_pt_rewritten": weights.read_bytes() != before,
              "seconds": round(time.perf_counter() - start, 1)}
    if task["status"] != "DONE":
        report["error"] = "\n".join(task.get("details", [])) or f"still {task['status']} after {TRAIN_S} s"
    return report


def check(python: str) -> dict:
    begin = time.perf_counter()
    packages = ("monailabel", "monai", "torch", "torchvision", "pytorch-ignite", "itk")
    result = {"versions": {p: version(p) for p in packages}, "server": {}, "bundles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies, inputs = prepare(work, python)
        app = work / "app"
        for name in NAMES:
            metaseg(python, "predict", inputs, "--out", work / "reference" / name, "--bundle", name)
            shutil.copytree(REPO / "bundles" / name, app / "model" / name,
                            ignore=shutil.ignore_patterns("eval", "__pycache__", "checkpoint.pt"))
        shutil.copy(__file__, app / "main.py")
        server, url, startup = start_server(app, studies, work / "server.log")
        try:
            models = requests.get(f"{url}/info/").json()
            result["server"] = {"command": "monailabel start_server --app APP --studies STUDIES --conf preload false",
                                "startup_seconds": round(startup, 1), "models": sorted(models["models"]),
                                "trainers": sorted(models["trainers"]),
                                "datastore_slices": len(list(studies.glob("*.png"))),
                                "nifti_volume": "not sent: the bundles are 2D (PNG/TIFF/JPEG and DICOM slices)"}
            for name in NAMES:
                report = result["bundles"][name] = {"infer": {}}
                for file in INPUTS:
                    report["infer"][file] = infer(url, name, inputs / file,
                                                  work / "reference" / name / f"{Path(file).stem}_seg.png")
                report["train"] = train(url, name, app / "model" / name / "models" / "model.pt")
        finally:
            stop(server)
        if any("error" in json.dumps(b) for b in result["bundles"].values()):
            result["server_log_tail"] = tail(work / "server.log")
    result["seconds"] = round(time.perf_counter() - begin, 1)
    return result


def failures(result: dict) -> list[str]:
    failed = []
    for name, bundle in result["bundles"].items():
        for file, infer_ in bundle["infer"].items():
            if infer_.get("dice_vs_metaseg_predict", 0) < 0.9995 or infer_.get("dtype") != "uint8":  # 1.000
                failed.append(f"{name} infer {file}")
        if bundle["train"].get("status") != "DONE" or not bundle["train"].get("model_pt_rewritten"):
            failed.append(f"{name} train")
    return failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metaseg-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the Python of metaseg's own venv (for `metaseg synth` and `metaseg predict`)")
    parser.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # here, not at the top: the server loads this file from its app folder as main.py
    from metaseg.files import write_json_atomic

    outcome = check(args.metaseg_python)
    write_json_atomic(args.out, outcome)
    print(json.dumps(outcome, indent=2))
    failed = failures(outcome)
    if failed:
        sys.exit(f"monailabel check failed: {', '.join(failed)}")
