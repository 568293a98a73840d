"""The server under hostile and heavy traffic: each format's bomb refused from its headers before decoding and
within a small memory peak, slow uploads that lock nobody out (a live uvicorn), the bounded queue with its
deadline, the optional bearer token, and `metaseg serve`'s warning on a public address without one.

Uploads that claim much and carry little are built here by patching the size fields of small valid files.
"""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import pytest
import uvicorn
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from metaseg.cli import main
from metaseg.errors import UserError
from serve import allocator
from serve.errors import status_for
from test_imageio import tiff_declaring
from test_serve import (  # noqa: F401  (weights: a module fixture)
    MiB,
    PNG,
    SHIPPED,
    SLICE,
    EchoEngine,
    SlowEngine,
    dcm,
    mr,
    png_declaring,
    post,
    serving,
    settings_for,
    uvicorn_server,
    weights,
)
from ui.upload import Upload, server_limits

UPLOAD_LIMIT = 4 * MiB  # the inflate cap is 4 x this
HOSTILE = {"max_upload_bytes": UPLOAD_LIMIT, "max_decoded_bytes": 48 * MiB, "max_dicom_elements": 50_000}


# --- bombs: small files whose headers claim much -------------------------------------------------------------


def png16_rgba_declaring(width: int, height: int) -> bytes:
    """A 1x1 16-bit RGBA PNG whose IHDR (with a valid CRC) claims width x height."""
    data = imagecodecs.png_encode(np.zeros((1, 1, 4), np.uint16))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def codestream_claiming(name: str, marker: bytes, offset: int, fmt: str, rows: int, cols: int) -> bytes:
    """A shipped encapsulated DICOM whose codestream's frame header claims rows x cols (its header unchanged)."""
    ds = pydicom.dcmread(SHIPPED / name)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.index(marker) + offset
    struct.pack_into(fmt, frame, at, *((cols, rows) if fmt == ">II" else (rows, cols)))
    ds.PixelData = encapsulate([bytes(frame)])
    return dcm(ds)


def jpeg_claiming(rows: int, cols: int) -> bytes:  # SOF0: marker, length, precision, then rows and columns
    return codestream_claiming("SC_rgb_jpeg_dcmtk.dcm", b"\xff\xc0", 5, ">HH", rows, cols)


def j2k_claiming(rows: int, cols: int) -> bytes:  # SOC, SIZ marker, Lsiz, Rsiz, then Xsiz (columns), Ysiz (rows)
    return codestream_claiming("MR_small_jp2klossless.dcm", b"\xff\x4f\xff\x51", 8, ">II", rows, cols)


def private_elements(count: int) -> bytes:
    """`count` tiny private elements (explicit VR little endian), 10 bytes each."""
    return b"".join(struct.pack("<HH2sHh", 0x0009 + 2 * (i // 0xF000), 0x1000 + i % 0xF000, b"SS", 2, 0)
                    for i in range(count))


def element_flood(count: int, deflated: bool = False) -> bytes:
    """A valid 40x56 MR slice with `count` private elements before its pixel data, optionally deflated."""
    ds = mr(SLICE)
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = dcm(ds)
    stream = io.BytesIO(data)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    head, body = data[: stream.tell()], data[stream.tell():]
    if deflated:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    at = body.index(b"\xe0\x7f\x10\x00OW")  # PixelData
    body = body[:at] + private_elements(count) + body[at:]
    if deflated:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    return head + body


def deflate_bomb() -> bytes:
    """A small slice with 32 MiB of zeros in a private element, deflated to ~35 KB: over 4 x the upload limit."""
    ds = mr(SLICE)
    ds.add_new((0x0009, 0x1000), "OB", bytes(32 * MiB))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return dcm(ds)


def nifti_gz_bomb() -> bytes:
    """As the issue's case: ~254 KiB of gzip that declares (and holds) a 2048x2048x64 uint8 volume, 256 MiB."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((2048, 2048, 64))
    header["vox_offset"] = 352
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(header.binaryblock + bytes(4))]
    zeros = bytes(16 * MiB)
    parts += [packer.compress(zeros) for _ in range(16)]
    return b"".join(parts) + packer.flush()


def nifti_declaring(shape, dtype) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4 + 64)


def dicom_declaring(**attrs) -> bytes:
    return dcm(mr(np.zeros((2, 2), np.uint16), **attrs))


def series_of(count: int) -> list[tuple[str, bytes]]:
    one = dcm(mr(np.zeros((2, 2), np.uint16)))
    return [(f"{k}.dcm", one) for k in range(count)]


BOMBS = [  # id, files, status, words of the detail
    ("tiff-4-samples-of-64-bits", lambda: [("a.tif", tiff_declaring(2000, 2000, np.float64, 4))], 413, "memory"),
    ("tiff-same-size-1-byte-is-no-bomb", lambda: [("a.tif", tiff_declaring(2000, 2000))], 400, "TIFF"),
    ("png-16-bit-rgba", lambda: [("a.png", png16_rgba_declaring(2000, 2000))], 413, "memory"),
    ("png-same-size-gray-is-no-bomb", lambda: [("a.png", png_declaring(2000, 2000))], 400, "PNG"),
    ("dicom-3-samples-of-32-bits",
     lambda: [("a.dcm", dicom_declaring(Rows=2048, Columns=2048, SamplesPerPixel=3, BitsAllocated=32,
                                        BitsStored=32, HighBit=31, PhotometricInterpretation="RGB",
                                        PlanarConfiguration=0))], 413, "memory"),
    ("dicom-jpeg-codestream-larger-than-header", lambda: [("a.dcm", jpeg_claiming(60000, 60000))], 413,
     "60000x60000"),
    ("dicom-j2k-codestream-larger-than-header", lambda: [("a.dcm", j2k_claiming(40000, 40000))], 413,
     "40000x40000"),
    ("dicom-j2k-codestream-smaller-than-header", lambda: [("a.dcm", j2k_claiming(32, 32))], 400, "declares 64x64"),
    ("dicom-element-flood", lambda: [("a.dcm", element_flood(60_000))], 413, "DICOM data elements"),
    ("dicom-deflate-bomb", lambda: [("a.dcm", deflate_bomb())], 413, "decompresses to more than"),
    ("dicom-deflated-element-flood", lambda: [("a.dcm", element_flood(60_000, deflated=True))], 413,
     "DICOM data elements"),
    ("dicom-flood-spread-over-a-series", lambda: [(f"{k}.dcm", element_flood(10_000)) for k in range(7)], 413,
     "DICOM data elements"),
    ("dicom-513-series-files", lambda: series_of(513), 413, "too many files"),
    ("nifti-gz-bomb", lambda: [("a.nii.gz", nifti_gz_bomb())], 413, "memory"),
    ("nifti-float64-declared", lambda: [("a.nii", nifti_declaring((2048, 2048, 4), np.float64))], 413, "memory"),
]


@pytest.fixture(scope="module")
def hostile(weights):
    with serving(settings_for(weights, **HOSTILE)) as client:
        yield client


def peak_rss_rise(call):
    """call(), and how far it raised this process's peak resident memory (Linux: VmHWM, reset by clear_refs)."""
    def status(key: str) -> int:
        line = next(line for line in open("/proc/self/status") if line.startswith(key))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")
    before = status("VmRSS:")
    result = call()
    return result, status("VmHWM:") - before


@pytest.mark.parametrize(("make", "status", "words"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_bomb_is_refused_before_decoding_with_a_small_memory_peak(hostile, make, status, words):
    files = make()
    assert sum(len(data) for _, data in files) < UPLOAD_LIMIT
    response, rise = peak_rss_rise(lambda: post(hostile, "/segment", *files))
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert rise < 256 * MiB  # the whole request in this process (upload, parsing, refusal): a quarter of the goal


def test_the_viewer_decodes_under_exactly_the_servers_limits(weights, hostile):
    assert server_limits(hostile.get("/info").json()) == settings_for(weights, **HOSTILE).limits()


@pytest.mark.parametrize(("make", "status", "words"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_the_viewer_refuses_each_bomb_as_the_server_does(hostile, make, status, words):
    """The viewer decodes an upload before it sends it: the same refusal (the class behind the server's status),
    with the same small memory peak."""
    upload, limits = Upload.of(make()), server_limits(hostile.get("/info").json())

    def refusal() -> UserError | None:
        try:
            upload.volume(limits)
        except UserError as error:
            return error
        return None

    refused, rise = peak_rss_rise(refusal)
    assert refused is not None and status_for(refused) == status and words in str(refused)
    assert rise < 256 * MiB


def multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A multipart body of (headers, data) parts with the boundary 'xyz'."""
    return b"".join(b"--xyz\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts) + b"--xyz--\r\n"


FILE_PART = b'Content-Disposition: form-data; name="file"; filename="a.png"'


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (multipart([(FILE_PART, b"")] * 40_000), "more than 1024 parts"),
        (multipart([(b'Content-Disposition: form-data; name="note"', b"x")] * 2000 + [(FILE_PART, PNG)]),
         "more than 1024 parts"),
        (multipart([(FILE_PART + b"".join(b"\r\nX-Pad-%d: " % i + b"a" * 500 for i in range(100)), PNG)]),
         "header count"),  # python-multipart's own bound: 8 header lines of at most 4 KiB per part
        (multipart([(FILE_PART + b"\r\nX-Pad: " + b"a" * 20_000, PNG)]), "header size"),
    ],
    ids=["40000-empty-file-parts", "2000-other-fields", "100-header-lines", "20-KiB-header-line"],
)
def test_multipart_floods_are_refused_while_parsing(hostile, body, words):
    assert len(body) < UPLOAD_LIMIT
    response, rise = peak_rss_rise(
        lambda: hostile.post("/segment", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    )
    assert response.status_code == (413 if "parts" in words else 400) and words in response.json()["detail"]
    assert rise < 64 * MiB


# --- slow uploads against a live server ----------------------------------------------------------------------


def stalled_upload(url: str, sent: int = 100) -> socket.socket:
    """A client that sends the headers of a 100 kB upload and its first `sent` bytes, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST /segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    sock.sendall(head + b"--xyz\r\n" + FILE_PART + b"\r\n\r\n" + bytes(sent))
    return sock


def test_slow_uploads_lock_nobody_out_and_are_cut_off(weights):
    """40 clients stall mid-upload; the old server gave the next client a 503 at once. Now the stalled bodies hold
    no inference thread or queue place, a normal client is served at once, and each stalled one gets a 408 once
    it falls behind the minimum rate (here within 5 s: 2 s of grace + 100 bytes at 50 bytes/s)."""
    with uvicorn_server(weights, body_timeout_s="5", min_body_rate="50", pool_size="1", queue_limit="2") as url:
        stalled = [stalled_upload(url) for _ in range(40)]
        try:
            started = time.monotonic()
            time.sleep(0.5)  # all 40 are in the middle of their bodies
            health = httpx.get(f"{url}/health", timeout=10).json()
            served = httpx.post(f"{url}/segment", files={"file": ("a.png", PNG)}, timeout=30)
            served_after = time.monotonic() - started
            answers = [sock.recv(4096).split(b"\r\n", 1)[0] for sock in stalled]
            cut_after = time.monotonic() - started
        finally:
            for sock in stalled:
                sock.close()
    assert health["busy"] == 0
    assert served.status_code == 200 and served_after < 3.5
    assert answers == [b"HTTP/1.1 408 Request Timeout"] * 40 and cut_after < 15


# --- the queue -------------------------------------------------------------------------------------------------


def test_queue_serves_waiting_requests_in_turn_and_refuses_beyond_its_length(weights):
    engine = SlowEngine()
    with serving(settings_for(weights, pool_size=1, queue_limit=2), engine) as c:
        with ThreadPoolExecutor(3) as background:
            first = background.submit(post, c, "/segment", ("a.png", PNG))
            assert engine.started.wait(30)
            waiting = [background.submit(post, c, "/segment", ("b.png", PNG)) for _ in range(2)]
            deadline = time.monotonic() + 30
            while c.get("/health").json()["busy"] < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = post(c, "/segment", ("c.png", PNG))  # the queue is full
            engine.release.set()
            statuses = [f.result().status_code for f in (first, *waiting)]
    assert statuses == [200, 200, 200]
    assert refused.status_code == 503 and "requests are waiting" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0


def test_queued_request_gives_up_after_the_queue_deadline(weights):
    engine = SlowEngine()
    with serving(settings_for(weights, pool_size=1, queue_limit=4, queue_timeout_s=0.5), engine) as c:
        with ThreadPoolExecutor(1) as background:
            first = background.submit(post, c, "/segment", ("a.png", PNG))
            assert engine.started.wait(30)
            start = time.monotonic()
            late = post(c, "/segment", ("b.png", PNG))
            waited = time.monotonic() - start
            engine.release.set()
            assert first.result().status_code == 200
    assert late.status_code == 503 and "within 0.5 s" in late.json()["detail"] and 0.4 < waited < 10


SEGMENT_ROUTES = ("/segment", "/segment/mask", "/segment/overlay", "/segment/seg", "/segment/nifti",
                  "/segment/probabilities")


def test_inference_past_its_deadline_is_a_documented_503_with_retry_after(weights):
    """Inference time is the server's load, not the upload's fault: 503 + Retry-After, as a full queue."""
    series = ("a.dcm", dcm(mr(np.stack([SLICE] * 40))))
    with serving(settings_for(weights, inference_timeout_s=0.01), _Sleepy()) as c:
        late = {path: post(c, path, series) for path in ("/segment", "/segment/nifti", "/segment/probabilities")}
        one = post(c, "/segment", ("a.png", PNG))  # a single step is never cut short
        document = c.get("/openapi.json").json()
    for path, answer in late.items():
        assert answer.status_code == 503, (path, answer.text)
        assert "more than the limit of 0.01 s" in answer.json()["detail"]
        assert int(answer.headers["retry-after"]) > 0
    assert one.status_code == 200
    for path in SEGMENT_ROUTES:
        busy = document["paths"][path]["post"]["responses"]["503"]
        assert "Retry-After" in busy["headers"] and "inference" in busy["description"], path
        assert "inference" not in document["paths"][path]["post"]["responses"]["413"]["description"], path


class _Sleepy(EchoEngine):
    def probabilities(self, frames):
        time.sleep(0.05)
        return super().probabilities(frames)


# --- the bearer token ----------------------------------------------------------------------------------------


def test_token_guards_every_route_but_health(weights):
    token = "s3cret-t0ken"
    with serving(settings_for(weights, api_token=token)) as c:
        good, bad = {"Authorization": f"Bearer {token}"}, {"Authorization": "Bearer wrong"}
        assert c.get("/health").status_code == 200
        for headers in ({}, bad, {"Authorization": f"Basic {token}"}):
            for path in ("/info", "/openapi.json", "/docs", "/redoc"):
                refused = c.get(path, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
            for path in ("/segment", "/segment/nifti", "/segment/probabilities"):
                refused = c.post(path, files={"file": ("a.png", PNG)}, headers=headers)
                assert refused.status_code == 401 and "bearer token" in refused.json()["detail"], path
        assert c.get("/info", headers=good).status_code == 200
        assert c.post("/segment", files={"file": ("a.png", PNG)}, headers=good).json()["slices"] == 1
        document = c.get("/openapi.json", headers=good).json()
        assert c.get("/docs", headers=good).status_code == 200
    assert "401" in document["paths"]["/segment"]["post"]["responses"]
    assert "401" in document["paths"]["/info"]["get"]["responses"]
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
    assert document["paths"]["/info"]["get"]["security"] == [{"HTTPBearer": []}]


def test_without_a_token_everything_is_open_and_docs_can_be_turned_off(weights):
    with serving(settings_for(weights)) as c:
        assert c.get("/info").status_code == 200 and c.get("/docs").status_code == 200
        assert "security" not in c.get("/openapi.json").json()["paths"]["/info"]["get"]
    with serving(settings_for(weights, docs=False)) as c:
        assert [c.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404] * 3
        assert c.get("/info").status_code == 200


@pytest.mark.parametrize(("host", "token", "warned"), [("0.0.0.0", None, True), ("192.168.1.20", None, True),
                                                        ("0.0.0.0", "t", False), ("127.0.0.1", None, False),
                                                        ("::1", None, False), ("localhost", None, False)])
def test_serve_warns_on_a_public_address_without_a_token(weights, monkeypatch, capsys, host, token, warned):
    started = []  # malloc is tuned (here: recorded, so this process keeps its own), then uvicorn builds the app
    monkeypatch.setattr(allocator, "tune_server_process", lambda: started.append("malloc tuned"))
    monkeypatch.setattr(uvicorn, "run", lambda app, factory=False, **kwargs: started.append((app, factory)))
    for key in ("METASEG_BUNDLE", "METASEG_WEIGHTS", "METASEG_BEST_RECORD"):
        monkeypatch.setenv(key, "")  # `metaseg serve` exports its choices; empty counts as unset, restored after
    monkeypatch.setenv("METASEG_API_TOKEN", token or "")
    assert main(["serve", "--bundle", "attention_unet", "--weights", str(weights), "--host", host]) == 0
    err = capsys.readouterr().err
    assert started == ["malloc tuned", ("serve.main:create_app", True)]
    assert ("without METASEG_API_TOKEN" in err) == warned
    if warned:
        assert host in err and "127.0.0.1" in err and err.count("\n") == 1
