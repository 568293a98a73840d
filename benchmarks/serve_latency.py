"""Server latency against its floor: a real uvicorn on 127.0.0.1, a bounded number of /segment requests, then it is
stopped.

The floor is what no server of this model can avoid: decoding the upload and the engine's forward of the preprocessed
batch (metaseg.inference.engine.Engine.forward: the bundle's inferer, every fold model of the served ensemble, k
forwards), run in this process the way the server runs it (serve.allocator's malloc settings, the model on one thread
with the same torch thread count, serve.pool.on_model_thread). Everything else the server does (the bundle's preprocessing and its
inverse, the findings, HTTP) is the overhead that the goal bounds: server p50 <= 1.2x the floor's p50.

For a 256x256 PNG (a data-set-like RGB slice) and a 256x256 DICOM MR slice: N sequential requests, measured in
blocks alternating with the floor (so that the load of anything else on the machine weighs on both alike), then N
at a concurrency of 8; p50/p95 latency, throughput, the server's peak RSS (VmHWM); and a 40-slice DICOM series sent
as one request (goal <= 2 s), with its own floor (decode + the forwards of its batches of the engine's batch_size). Also
in-process medians of each step of one slice (decode, prepare, forward, restored, findings), where the overhead is.
The model is the recorded best (bundles/best.json, the bundle's fold ensemble) when there is one, else
attention_unet with seeded random weights at its own input size (one model; the results file says which).

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
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.bundles import bundle_imports, config  # noqa: E402
from metaseg.conventions import BEST_FILE, read_best  # noqa: E402
from metaseg.inference.engine import Engine  # noqa: E402
from metaseg.files import write_json_atomic  # noqa: E402
from metaseg.imageio.reader import decode  # noqa: E402
from metaseg.inference.steps import upload_masks  # noqa: E402
from serve import findings  # noqa: E402
from serve.allocator import tune_server_process  # noqa: E402
from serve.pool import on_model_thread, set_torch_threads  # noqa: E402

CONCURRENCY = 8
BLOCK = 10  # sequential requests per block, alternating with as many floor measurements
HOST = "127.0.0.1"  # loopback only: the benchmark never listens on a network interface


def random_weights(folder: Path) -> Path:
    bundle = REPO / "bundles" / "attention_unet"
    parser = config(bundle, "training")
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


def ms(seconds: list[float] | np.ndarray, q: float = 50) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 1)


def floor_once(engine: Engine, files: list[tuple[str, bytes]], batch: torch.Tensor) -> float:
    """Seconds to decode `files` and run the engine's forward on `batch` (their preprocessed slices, prepared once
    beforehand) in batches of the engine's batch_size, on the model thread as the server runs it."""
    start = time.perf_counter()
    decode(files)
    for first in range(0, len(batch), engine.batch_size):
        on_model_thread(engine.forward, batch[first : first + engine.batch_size])
    return time.perf_counter() - start


def prepared(engine: Engine, files: list[tuple[str, bytes]]) -> torch.Tensor:
    return on_model_thread(engine.prepare, decode(files).inputs)[1]


def steps_ms(engine: Engine, upload: tuple[str, bytes], repeats: int) -> dict:
    """Median milliseconds of each step of one slice in this process, on the model thread where the server runs it."""
    times: dict[str, list[float]] = {}

    def clock(name, func, *args):
        start = time.perf_counter()
        result = func(*args)
        times.setdefault(name, []).append(time.perf_counter() - start)
        return result

    for _ in range(repeats + 1):
        volume = clock("decode", decode, [upload])
        items, batch = clock("prepare", on_model_thread, engine.prepare, volume.inputs)
        probs = clock("forward", on_model_thread, engine.forward, batch)
        maps = clock("restored", on_model_thread, engine.restored, items, probs)
        masks = clock("masks", upload_masks, maps, engine.inference_steps, volume.is_volume, volume.voxel_mm3)
        clock("findings", findings.report, volume, maps, masks, engine.inference_steps, engine.name, 0.0)
    return {name: ms(values[1:]) for name, values in times.items()}  # the first is a warm-up


def series_latency(url: str, engine: Engine, files: list[tuple[str, bytes]], repeats: int = 5) -> dict:
    """The series as one request, `repeats` times after a warm-up, each after its floor."""
    batch = prepared(engine, files)
    floor_once(engine, files, batch)  # warm-up
    floors, times = [], []
    with httpx.Client() as client:
        client.post(f"{url}/segment", files=[("file", f) for f in files], timeout=120).raise_for_status()  # warm-up
        for _ in range(repeats):
            floors.append(floor_once(engine, files, batch))
            start = time.perf_counter()
            client.post(f"{url}/segment", files=[("file", f) for f in files], timeout=120).raise_for_status()
            times.append(time.perf_counter() - start)
    return {"slices": len(files), "repeats": repeats, "batch_size": engine.batch_size,
            "p50_s": round(float(np.median(times)), 3), "max_s": round(float(max(times)), 3),
            "floor_p50_s": round(float(np.median(floors)), 3),
            "server_vs_floor_p50": round(float(np.median(times) / np.median(floors)), 3), "goal_s": 2.0}


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
    """uvicorn serve.main:create_app on a free loopback port with exactly `env`; returns the process and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "serve.main:create_app", "--host", HOST, "--port",
               str(port), "--log-level", "warning"]
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


def against_floor(url: str, engine: Engine, upload: tuple[str, bytes], requests: int) -> dict:
    """`requests` sequential uploads on one keep-alive connection and as many floor measurements of the same bytes,
    in alternating blocks of BLOCK; p50/p95 of each and the ratio of the p50s."""
    batch = prepared(engine, [upload])
    floors, latencies = [], []
    with httpx.Client() as client:
        timed(client, url, upload)  # warm-up: first-call allocations are not latency
        floor_once(engine, [upload], batch)
        while len(latencies) < requests:
            block = min(BLOCK, requests - len(latencies))
            floors += [floor_once(engine, [upload], batch) for _ in range(block)]
            latencies += [timed(client, url, upload) for _ in range(block)]
    return {
        "sequential": {"requests": requests, "concurrency": 1, "p50_ms": ms(latencies), "p95_ms": ms(latencies, 95),
                       "throughput_rps": round(1 / float(np.mean(latencies)), 2)},
        "floor_decode_forward": {"requests": requests, "p50_ms": ms(floors), "p95_ms": ms(floors, 95)},
        "server_vs_floor_p50": round(float(np.median(latencies) / np.median(floors)), 3),
    }


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
        "p50_ms": ms(latencies),
        "p95_ms": ms(latencies, 95),
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
    malloc = tune_server_process()  # as `metaseg serve` does: the floor, and the server through its environment
    torch_threads = set_torch_threads(None)  # torch's default, as the server's unset METASEG_TORCH_THREADS
    with tempfile.TemporaryDirectory() as tmp:
        model, chosen_env = server_model(Path(tmp))
        env = {key: value for key, value in os.environ.items() if not key.startswith("METASEG_")} | chosen_env
        if chosen_env:
            engine = on_model_thread(Engine, REPO / "bundles" / "attention_unet", Path(chosen_env["METASEG_WEIGHTS"]))
        else:
            chosen = read_best()
            engine = on_model_thread(lambda: Engine(chosen.bundle, chosen.weights, overrides=chosen.overrides))
        on_model_thread(engine.warm_up)
        server, url = start_server(env)
        try:
            info = httpx.get(f"{url}/info", timeout=10).json()
            health = httpx.get(f"{url}/health", timeout=10).json()
            results = {}
            for name, upload in payloads().items():
                results[name] = against_floor(url, engine, upload, args.requests)
                results[name][f"concurrency_{CONCURRENCY}"] = run(url, upload, args.requests, CONCURRENCY)
                print(name, results[name], flush=True)
            results["dicom_series_40x256x256"] = series_latency(url, engine, dicom_series(40))
            print("series", results["dicom_series_40x256x256"], flush=True)
            rss = peak_rss_mib(server.pid)
        finally:
            stop_server(server)
        steps = steps_ms(engine, payloads()["png_256x256_rgb"], args.requests)
        print("in-process steps of one PNG slice (ms)", steps, flush=True)

    write_json_atomic(args.out, {
        "command": " ".join(["python", "benchmarks/serve_latency.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "model": {"which": model, "name": info["model"], "architecture": info["architecture"],
                  "spatial_size": info["input"]["spatial_size"], "fold_models_k": info["fold_models"]},
        "server": {"host": HOST, "uvicorn_workers": 1, "capacity": health["capacity"],
                   "torch_threads": info["torch_threads"], "floor_torch_threads": torch_threads,
                   "malloc": malloc, "settings": "defaults (METASEG_POOL_SIZE, METASEG_QUEUE_LIMIT unset)"},
        "goal": "server p50 <= 1.2x the floor's p50 (decode + the k forwards of the preprocessed batch)",
        "results": results,
        "in_process_steps_png_ms": steps,
        "server_peak_rss_mib": rss,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
