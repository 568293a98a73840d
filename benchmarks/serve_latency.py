"""Server latency: a real uvicorn on 127.0.0.1, a bounded number of /segment requests, then it is stopped.

For a 256x256 PNG (a data-set-like RGB slice) and a 256x256 DICOM MR slice: N sequential requests, then N more
at a concurrency of 8; p50/p95 latency, throughput, and the server's peak RSS (VmHWM). In the same run, before the
server starts: the raw cost of the same PNG in this process (decode + the engine's forward pass), the baseline the
HTTP latency is compared with (goal <= 1.2x); and a 40-slice DICOM series sent as one request (goal <= 2 s). The model is the recorded
best (bundles/best.json) when there is one, else attention_unet with seeded random weights at its own input size
(same network, same cost; the results file says which).

    python benchmarks/serve_latency.py                  # 100 + 100 requests per input
    python benchmarks/serve_latency.py --requests 10    # a quick smoke run

Writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from monai.bundle import ConfigParser
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.conventions import BEST_FILE, read_best  # noqa: E402
from metaseg.engine import Engine, bundle_imports  # noqa: E402
from metaseg.imageio import decode  # noqa: E402
from metaseg.files import write_json_atomic  # noqa: E402

CONCURRENCY = 8
HOST = "127.0.0.1"  # loopback only: the benchmark never listens on a network interface


def random_weights(folder: Path) -> Path:
    bundle = REPO / "bundles" / "attention_unet"
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    torch.manual_seed(0)
    with bundle_imports(bundle):
        net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), folder / "model.pt")
    return folder / "model.pt"


def mr_file(pixels: np.ndarray, **attrs) -> bytes:
    """A 12-bit MR Image Storage file of `pixels` (2D, or 3D: multi-frame) with 0.94 mm pixels; `attrs` add to it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelSpacing, ds.SliceThickness = [0.94, 0.94], 5.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_series(slices: int = 40) -> list[tuple[str, bytes]]:
    """One MR series of `slices` 256x256 DICOM files (positions 5 mm apart), as a viewer or PACS exports it."""
    rng = np.random.default_rng(1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    return [
        (f"IM{k:04d}.dcm", mr_file(rng.integers(0, 4096, (256, 256)), StudyInstanceUID=study, SeriesInstanceUID=series,
                                   FrameOfReferenceUID=frame, InstanceNumber=k + 1,
                                   ImagePositionPatient=[0.0, 0.0, 5.0 * k],
                                   ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
        for k in range(slices)
    ]


def raw_latency(engine: Engine, upload: tuple[str, bytes], requests: int) -> dict:
    """The same work without HTTP: decode the bytes and run the engine, in this process."""
    engine.probabilities(decode([upload]).inputs)  # warm-up
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        engine.probabilities(decode([upload]).inputs)
        times.append(time.perf_counter() - start)
    return {"requests": requests, "p50_ms": round(float(np.percentile(times, 50)) * 1000, 1),
            "p95_ms": round(float(np.percentile(times, 95)) * 1000, 1)}


def series_latency(url: str, files: list[tuple[str, bytes]], repeats: int = 5) -> dict:
    with httpx.Client() as client:
        client.post(f"{url}/segment", files=[("file", f) for f in files], timeout=120).raise_for_status()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.post(f"{url}/segment", files=[("file", f) for f in files], timeout=120).raise_for_status()
            times.append(time.perf_counter() - start)
    return {"slices": len(files), "repeats": repeats, "p50_s": round(float(np.median(times)), 3),
            "max_s": round(float(max(times)), 3), "goal_s": 2.0}


def payloads() -> dict[str, tuple[str, bytes]]:
    """A 256x256x3 slice with two bright lesions in its FLAIR channel, as an RGB PNG (the network gets the three
    sequences) and its FLAIR channel alone as a gray DICOM (the network gets it in all three channels)."""
    rng = np.random.default_rng(0)
    flair = rng.normal(90, 15, (256, 256)).clip(0, 255)
    flair[60:80, 150:175] = flair[170:182, 40:50] = 230
    rgb = np.dstack([flair * 0.8, flair, flair * 0.6]).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    dicom = mr_file(rgb[..., 1].astype(np.uint16) * 16)
    return {"png_256x256_rgb": ("slice.png", png.getvalue()), "dicom_256x256_mr": ("slice.dcm", dicom)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_up(server: subprocess.Popen, url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode} before answering")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"server did not answer within {timeout_s} s")


def server_model(folder: Path) -> tuple[str, dict[str, str]]:
    """Which model the benchmark server runs, and the METASEG_* variables that choose it (none: the recorded best)."""
    if BEST_FILE.is_file():
        return f"recorded best model ({BEST_FILE.relative_to(REPO)})", {}
    weights = random_weights(folder)
    return ("attention_unet with seeded random weights (no bundles/best.json yet): same network and cost",
            {"METASEG_BUNDLE": "attention_unet", "METASEG_WEIGHTS": str(weights)})


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """uvicorn serve.main:app on a free loopback port with exactly `env`; returns the process and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "serve.main:app", "--host", HOST, "--port", str(port),
               "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://{HOST}:{port}"
    try:
        wait_until_up(server, url)
    except BaseException:
        stop_server(server)
        raise
    return server, url


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def timed(client: httpx.Client, url: str, upload: tuple[str, bytes]) -> float:
    start = time.perf_counter()
    response = client.post(f"{url}/segment", files={"file": upload}, timeout=120)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed


def run(url: str, upload: tuple[str, bytes], requests: int, concurrency: int) -> dict:
    """`requests` uploads from `concurrency` clients (one keep-alive connection each)."""
    local, clients = threading.local(), []

    def one(_) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
            clients.append(local.client)
        return timed(local.client, url, upload)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1),
        "throughput_rps": round(requests / wall, 2),
    }


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of the server process (Linux); None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per input and phase (100)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_latency.json")
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows in the latencies
    with tempfile.TemporaryDirectory() as tmp:
        model, chosen_env = server_model(Path(tmp))
        env = {key: value for key, value in os.environ.items() if not key.startswith("METASEG_")} | chosen_env
        if chosen_env:
            engine = Engine(REPO / "bundles" / "attention_unet", Path(chosen_env["METASEG_WEIGHTS"]))
        else:
            chosen = read_best()
            engine = Engine(chosen.bundle, chosen.weights, overrides=chosen.overrides)
        raw = raw_latency(engine, payloads()["png_256x256_rgb"], args.requests)
        del engine
        print("raw decode + forward", raw, flush=True)
        server, url = start_server(env)
        try:
            info = httpx.get(f"{url}/info", timeout=10).json()
            health = httpx.get(f"{url}/health", timeout=10).json()
            results = {}
            for name, upload in payloads().items():
                with httpx.Client() as client:
                    timed(client, url, upload)  # warm-up: first-call allocations are not latency
                results[name] = {
                    "sequential": run(url, upload, args.requests, 1),
                    f"concurrency_{CONCURRENCY}": run(url, upload, args.requests, CONCURRENCY),
                }
                print(name, results[name], flush=True)
            results["png_256x256_rgb"]["raw_decode_forward_in_process"] = raw
            results["png_256x256_rgb"]["http_vs_raw_p50"] = round(
                results["png_256x256_rgb"]["sequential"]["p50_ms"] / raw["p50_ms"], 3)
            results["dicom_series_40x256x256"] = series_latency(url, dicom_series(40))
            print("series", results["dicom_series_40x256x256"], flush=True)
            rss = peak_rss_mib(server.pid)
        finally:
            stop_server(server)

    write_json_atomic(args.out, {
        "command": " ".join(["python", "benchmarks/serve_latency.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": load_at_start},
        "model": {"which": model, "name": info["model"], "architecture": info["architecture"],
                  "spatial_size": info["input"]["spatial_size"]},
        "server": {"host": HOST, "uvicorn_workers": 1, "capacity": health["capacity"],
                   "settings": "defaults (METASEG_POOL_SIZE, METASEG_QUEUE_LIMIT unset)"},
        "results": results,
        "server_peak_rss_mib": rss,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
