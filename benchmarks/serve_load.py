"""The server under heavy and hostile traffic: a real uvicorn on 127.0.0.1 with default settings, then stopped.

1. Load: 1, 8 and 50 concurrent clients, each sending ceil(100 / clients) (at least 2) requests of one 256x256 PNG
   to POST /segment: status counts (503 = turned away), p50/p99 latency, throughput, and the server's peak memory
   (VmHWM, reset before each phase through /proc/<pid>/clear_refs). Goal: 50 x 2 -> 0 errors, at most 5 turned away.
2. Slow clients: 40 connections send the headers and 100 bytes of an upload, then stall; meanwhile one client sends
   20 requests. Its p50 against phase 1's single client, and how the stalled ones end (408 once under the
   minimum body rate).
3. Hostile and largest accepted uploads, one at a time: status and the rise of the server's peak memory per request.
   Goal: no request raises it by more than 1 GiB.

    python benchmarks/serve_load.py                # ~3 min on 2 CPU cores
    python benchmarks/serve_load.py --phase-requests 20   # quicker

Writes benchmarks/results/serve_load.json. All traffic goes to 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import socket
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from serve_latency import REPO, mr_file, payloads, peak_rss_mib, server_model, start_server, stop_server

sys.path.insert(0, str(REPO))
from metaseg.files import write_json_atomic  # noqa: E402
from serve.allocator import tune_server_process  # noqa: E402

MiB = 2**20
CLIENTS = (1, 8, 50)
STALLED = 40


def reset_peak(pid: int) -> float:
    """Reset the server's VmHWM to its current RSS (Linux clear_refs 5); returns that RSS in MiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise SystemExit("no VmRSS: this benchmark needs Linux /proc")


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 1)}


def load_phase(url: str, pid: int, clients: int, per_client: int, upload: tuple[str, bytes]) -> dict:
    """`clients` threads, each with its own connection, released together, each sending `per_client` requests."""
    start_line = threading.Barrier(clients)

    def client(_) -> list[tuple[int, float]]:
        results = []
        with httpx.Client(timeout=120) as http:
            start_line.wait()
            for _ in range(per_client):
                began = time.perf_counter()
                try:
                    status = http.post(f"{url}/segment", files={"file": upload}).status_code
                except httpx.TransportError:
                    status = 0  # no answer at all
                results.append((status, time.perf_counter() - began))
        return results

    base = reset_peak(pid)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - began
    statuses = {str(code): sum(1 for s, _ in results if s == code) for code in sorted({s for s, _ in results})}
    return {
        "clients": clients,
        "requests_per_client": per_client,
        "requests": len(results),
        "statuses": statuses,
        "turned_away_503": statuses.get("503", 0),
        "errors_not_200_or_503": sum(n for code, n in statuses.items() if code not in ("200", "503")),
        **percentiles([t for s, t in results if s == 200]),
        "throughput_rps": round(len(results) / wall, 2),
        "server_rss_before_mib": base,
        "server_peak_rss_mib": peak_rss_mib(pid),
    }


def stalled_upload(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(b"POST /segment HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: multipart/form-data; "
                 b"boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\nContent-Disposition: form-data; "
                 b'name="file"; filename="a.png"\r\n\r\n' + bytes(100))
    return sock


def slow_clients_phase(url: str, upload: tuple[str, bytes]) -> dict:
    stalled = [stalled_upload(url) for _ in range(STALLED)]
    began = time.perf_counter()
    try:
        times, statuses = [], []
        with httpx.Client(timeout=120) as http:
            for _ in range(20):
                start = time.perf_counter()
                statuses.append(http.post(f"{url}/segment", files={"file": upload}).status_code)
                times.append(time.perf_counter() - start)
        endings = {}
        for sock in stalled:
            try:
                line = sock.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
            except OSError as err:
                line = type(err).__name__
            endings[line] = endings.get(line, 0) + 1
        stalled_for = time.perf_counter() - began
    finally:
        for sock in stalled:
            sock.close()
    return {"stalled_clients": STALLED, "normal_requests": len(times),
            "normal_statuses": {str(s): statuses.count(s) for s in set(statuses)}, **percentiles(times),
            "stalled_answers": endings, "stalled_all_answered_within_s": round(stalled_for, 1)}


def nifti_gz_bomb() -> bytes:
    """The issue's case: ~254 KiB of gzip holding a declared 4096x4096x16 uint8 volume (256 MiB)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((4096, 4096, 16))
    header["vox_offset"] = 352
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as gz:
        gz.write(header.binaryblock + bytes(4))
        for _ in range(16):
            gz.write(bytes(16 * MiB))
    return buffer.getvalue()


def with_elements(dicom: bytes, elements: bytes) -> bytes:
    """A DICOM file with raw `elements` inserted before its pixel data."""
    at = dicom.index(b"\xe0\x7f\x10\x00OW")
    return dicom[:at] + elements + dicom[at:]


def element_flood(count: int) -> bytes:
    elements = b"".join(struct.pack("<HH2sHh", 0x0009 + 2 * (i // 0xF000), 0x1000 + i % 0xF000, b"SS", 2, 0)
                        for i in range(count))
    return with_elements(mr_file(np.zeros((64, 64))), elements)


def hostile_uploads() -> dict:
    """name -> (file name, bytes): bombs, and the largest uploads the default budget (256 MiB) accepts."""
    rng = np.random.default_rng(0)
    frames = (256 * MiB) // (256 * 256 * (2 + 8))  # int16 slices of 256x256 that fit the budget: 409
    volume = rng.integers(0, 1000, (256, 256, frames)).astype(np.int16)
    return {
        "nifti_gz_bomb_4096x4096x16": ("bomb.nii.gz", nifti_gz_bomb()),
        "dicom_element_flood_250k": ("flood.dcm", element_flood(250_000)),
        "largest_accepted_nifti_256x256x409_int16": ("big.nii", nib.Nifti1Image(volume, np.eye(4)).to_bytes()),
        "largest_accepted_frame_dicom_2048x2048_uint16": ("big.dcm", mr_file(rng.integers(0, 4096, (2048, 2048)))),
        "over_the_pixel_limit_dicom_4096x4096_uint16": ("huge.dcm", mr_file(rng.integers(0, 4096, (4096, 4096)))),
    }


def hostile_phase(url: str, pid: int) -> dict:
    results = {}
    for name, upload in hostile_uploads().items():
        base = reset_peak(pid)
        began = time.perf_counter()
        response = httpx.post(f"{url}/segment", files={"file": upload}, timeout=600)
        peak = peak_rss_mib(pid)
        results[name] = {"upload_bytes": len(upload[1]), "status": response.status_code,
                         "detail": response.json().get("detail") if response.status_code != 200 else None,
                         "seconds": round(time.perf_counter() - began, 2),
                         "server_peak_rise_mib": round(peak - base, 1)}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-requests", type=int, default=100, help="about this many requests per load phase")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    parser.add_argument("--hostile-only", action="store_true",
                        help="only phase 3, merged into an existing --out (phases 1-2 kept from their run)")
    args = parser.parse_args()

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_at_start": load_at_start}
    command = " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])
    results = json.loads(args.out.read_text()) if args.hostile_only else {}
    tune_server_process()  # as `metaseg serve` does: the server gets the malloc settings through its environment
    with tempfile.TemporaryDirectory() as tmp:
        model, chosen_env = server_model(Path(tmp))
        env = {key: value for key, value in os.environ.items() if not key.startswith("METASEG_")} | chosen_env
        server, url = start_server(env)
        try:
            if not args.hostile_only:
                upload = payloads()["png_256x256_rgb"]
                httpx.post(f"{url}/segment", files={"file": upload}, timeout=60).raise_for_status()  # warm-up
                results = {
                    "command": command, "machine": machine, "model": model,
                    "server": {"host": "127.0.0.1", "uvicorn_workers": 1, "settings": "defaults (no METASEG_* limits)",
                               "capacity": httpx.get(f"{url}/health", timeout=10).json()["capacity"]},
                    "load": {},
                }
                for clients in CLIENTS:
                    per_client = max(2, math.ceil(args.phase_requests / clients))
                    results["load"][f"clients_{clients}"] = load_phase(url, server.pid, clients, per_client, upload)
                    print(results["load"][f"clients_{clients}"], flush=True)
                results["slow_clients"] = slow_clients_phase(url, upload)
                print("slow clients", results["slow_clients"], flush=True)
            results["hostile_and_largest_uploads"] = {"command": command, "machine": machine,
                                                      **hostile_phase(url, server.pid)}
        finally:
            stop_server(server)
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
