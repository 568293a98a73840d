"""The Streamlit viewer through Streamlit's AppTest: the sample, uploads of a PNG series and a DICOM series,
the threshold, opacity and slice controls, caching, downloads, and readable errors from a refusing or absent
server; plus the HTTP client's error messages and `metaseg ui`.

The server is the real FastAPI app on a real socket (uvicorn in a thread) whose engine is an "echo": the lesion
probability is the slice's own brightness, so every mask is known in advance and each inference is counted.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import streamlit as st
import uvicorn
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from streamlit.testing.v1 import AppTest

from conftest import REPO, flair
from metaseg.cli import main
from serve.config import Settings, get_settings
from serve.deps import get_engine
from serve.main import create_app
from test_engine import random_weights
from ui import display, findings
from ui.client import Client, ServerError, Unreachable

APP = str(REPO / "ui" / "app.py")
MiB = 2**20


# --- inputs ---------------------------------------------------------------------------------------------------


def blobs(shape=(48, 64), boxes=((10, 30, 8, 12),)) -> np.ndarray:
    """Background 20 with bright boxes (row, col, height, width): lesions where the echo engine will find them."""
    image = np.full(shape, 20, np.uint8)
    for row, col, height, width in boxes:
        image[row : row + height, col : col + width] = 200
    return image


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_series(slices: list[np.ndarray], spacing_mm=(0.5, 0.5), thickness_mm=2.0) -> list[tuple[str, bytes]]:
    """An axial MR series, one file per slice, with the geometry and identities that mm, mL and a SEG need."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    files = []
    for z, pixels in enumerate(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Phantom^Synthetic", "PHANTOM", "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 1, z + 1, ""
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z * thickness_mm], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(spacing_mm), thickness_mm
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"IM{z + 1:04d}", buffer.getvalue()))  # no suffix, as PACS exports often are
    return files


# Three slices; the middle one holds the most lesion, the last none.
SERIES = [blobs(boxes=((4, 4, 6, 6),)), blobs(boxes=((10, 30, 10, 12), (30, 5, 4, 4))), blobs(boxes=())]


# --- the server -----------------------------------------------------------------------------------------------


class Echo:
    """Stands for the network in /info."""


class EchoEngine:
    """Probability = brightness / 255, so a threshold of t marks every pixel brighter than 255 t."""

    name = "echo"
    network = Echo()
    metadata = {"version": "0.0.0"}
    spatial_size = 32
    inference_steps = {"flip_tta": False, "threshold": 0.45, "min_lesion_voxels": 0, "largest_component": False}

    def __init__(self):
        self.calls = 0

    def probabilities(self, frames):
        self.calls += 1
        return [np.clip(flair(f) / 255, 0, 1).astype(np.float32) for f in frames]


@dataclass
class Served:
    url: str
    engine: EchoEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weights = random_weights("attention_unet", tmp_path_factory.mktemp("model"))  # the lifespan loads a model
    settings = Settings(bundle="attention_unet", weights=weights, spatial_size=32, max_upload_bytes=2 * MiB)
    engine = EchoEngine()
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_engine] = lambda: engine
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.1)
    try:
        yield Served(f"http://127.0.0.1:{port}", engine)
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.fixture
def viewer(server, monkeypatch):
    """The app, pointed at the test server, with empty caches."""
    monkeypatch.setenv("METASEG_SERVER", server.url)
    st.cache_data.clear()
    return AppTest.from_file(APP, default_timeout=60).run()


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def images(at: AppTest) -> list[str]:
    """Media URLs of the shown images: they name the content, so a changed picture gets a new URL."""
    return [url for image in at.image for url in image.value]


def download_labels(at: AppTest) -> list[str]:
    return [button.proto.label for button in at.get("download_button")]


def input_caption(at: AppTest) -> str:
    """The sentence saying which input the model got (from the report's input_channels)."""
    return next(c.value for c in at.main.caption if c.value.startswith("Input: ")).split(". ")[0]


# --- the app --------------------------------------------------------------------------------------------------


def test_sample_shows_the_slice_its_overlay_findings_and_downloads(viewer, server):
    assert not viewer.exception
    assert viewer.sidebar.success[0].value.startswith("Up, model loaded")
    assert any("`echo`" in md.value for md in viewer.sidebar.markdown)  # the model as /info names it
    by_label(viewer.button, "Try a sample").click().run()
    assert not viewer.exception and not viewer.error
    assert len(images(viewer)) == 2  # the input and the overlay
    numbers = metrics(viewer)
    assert int(numbers["Lesions"]) >= 1 and numbers["Total area"].endswith("px")  # a TIFF has no pixel size
    table = viewer.dataframe[0].value
    assert len(table) == int(numbers["Lesions"]) and "area (px)" in table and "area (mm²)" not in table
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG"]  # no DICOM SEG for a TIFF
    assert input_caption(viewer) == "Input: three sequences (pre-contrast, FLAIR, post-contrast)"  # a 3-channel TIFF


def test_threshold_goes_to_the_server_opacity_stays_here_and_views_are_cached(viewer, server):
    by_label(viewer.button, "Try a sample").click().run()
    assert by_label(viewer.slider, "Probability threshold").value == 0.45  # the model's chosen threshold (/info)
    area_at = {0.45: int(metrics(viewer)["Total area"].split()[0])}
    shown = images(viewer)
    calls = server.engine.calls

    by_label(viewer.slider, "Overlay opacity").set_value(0.9).run()
    assert server.engine.calls == calls  # blended here, from the cached mask
    assert images(viewer)[0] == shown[0] and images(viewer)[1] != shown[1]

    by_label(viewer.toggle, "Outline").set_value(False).run()
    assert server.engine.calls == calls and images(viewer)[1] != shown[1]

    by_label(viewer.slider, "Probability threshold").set_value(0.6).run()
    assert server.engine.calls > calls  # a new threshold is a new request
    area_at[0.6] = int(metrics(viewer)["Total area"].split()[0])
    assert area_at[0.6] < area_at[0.45]  # the echo engine: fewer pixels are brighter than 0.6 x 255
    assert images(viewer)[1] != shown[1]

    calls = server.engine.calls
    by_label(viewer.slider, "Probability threshold").set_value(0.45).run()
    assert server.engine.calls == calls  # a view seen before is not recomputed
    assert int(metrics(viewer)["Total area"].split()[0]) == area_at[0.45]


def test_a_png_series_gets_a_slice_slider_that_starts_at_the_most_lesion(viewer):
    viewer.file_uploader[0].set_value([(f"s{z}.png", png(image), "image/png") for z, image in enumerate(SERIES)])
    viewer.run()
    assert not viewer.exception and not viewer.error
    slider = by_label(viewer.slider, "Slice")
    assert (slider.min, slider.max, slider.value) == (1, 3, 2)
    table = viewer.dataframe[0].value
    assert sorted(table["slice"]) == [1, 2, 2]
    assert sorted(table["area (px)"]) == [16, 36, 120]
    middle = images(viewer)
    slider.set_value(3).run()
    assert all(a != b for a, b in zip(images(viewer), middle))  # both the input and the overlay follow the slider
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG"]
    assert input_caption(viewer) == "Input: one channel, used as FLAIR in all three sequence channels"  # gray PNGs


def test_a_dicom_series_is_measured_in_mm_and_ml_and_offers_a_dicom_seg(viewer):
    viewer.file_uploader[0].set_value([(name, data, "application/dicom") for name, data in dicom_series(SERIES)])
    viewer.run()
    assert not viewer.exception and not viewer.error
    numbers = metrics(viewer)
    # (16 + 120 + 36) px x 0.25 mm² = 43 mm², x 2 mm = 86 mm³ = 0.086 mL
    assert (numbers["Lesions"], numbers["Total area"], numbers["Volume"]) == ("3", "43.0 mm²", "0.09 mL")
    assert sorted(viewer.dataframe[0].value["area (mm²)"]) == [4.0, 9.0, 30.0]
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG", "DICOM SEG"]


@pytest.mark.parametrize(
    ("files", "status", "detail"),
    [
        ([("notes.png", b"this is not an image", "image/png")], "415", "not a recognised image"),
        ([("huge.png", png(np.random.default_rng(0).integers(0, 255, (1800, 1800), np.uint8)), "image/png")],
         "413", "larger than the limit"),
        ([("a.png", png(SERIES[0]), "image/png"), ("b.dcm", dicom_series(SERIES[:1])[0][1], "application/dicom")],
         "400", "one kind at a time"),
    ],
    ids=["not-an-image", "too-large", "mixed-kinds"],
)
def test_a_refused_upload_shows_the_servers_detail(viewer, files, status, detail):
    viewer.file_uploader[0].set_value(files).run()
    assert not viewer.exception
    message = viewer.error[0].value
    assert f"({status} " in message and detail in message.lower()
    assert not viewer.image and not viewer.get("download_button")


def test_without_a_server_the_viewer_says_how_to_start_one(monkeypatch):
    monkeypatch.setenv("METASEG_SERVER", f"http://127.0.0.1:{free_port()}")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "metaseg serve" in at.sidebar.error[0].value
    by_label(at.button, "Try a sample").click().run()
    assert not at.exception
    assert any("metaseg serve" in error.value for error in at.main.error)


# --- the pieces -----------------------------------------------------------------------------------------------


def respond(status: int, **kwargs) -> Client:
    return Client("http://server.test", transport=httpx.MockTransport(lambda request: httpx.Response(status, **kwargs)))


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (respond(400, json={"detail": "'a.png': truncated"}), "(400 Bad Request): 'a.png': truncated"),
        (respond(503, json={"detail": "the server is busy; retry in 2 s"}), "busy (503): the server is busy"),
        (respond(422, json={"detail": [{"msg": "Input should be less than or equal to 1"}]}), "less than or equal"),
        (respond(502, text="Bad gateway from the proxy"), "(502 Bad Gateway): Bad gateway from the proxy"),
    ],
    ids=["400", "503", "422-validation", "502-not-json"],
)
def test_client_turns_every_refusal_into_one_readable_line(client, message):
    with pytest.raises(ServerError) as raised:
        client.segment((("a.png", b"..."),), 0.5)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_client_sends_the_servers_token(monkeypatch):
    seen = []

    def record(request):
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("METASEG_API_TOKEN", "from-env")
    Client("http://server.test", transport=httpx.MockTransport(record)).health()
    Client("http://server.test", transport=httpx.MockTransport(record), token="given").health()
    monkeypatch.setenv("METASEG_API_TOKEN", "")
    Client("http://server.test", transport=httpx.MockTransport(record)).health()
    assert seen == ["Bearer from-env", "Bearer given", None]
    with pytest.raises(ServerError, match=r"asks for an API token \(401\).*METASEG_API_TOKEN"):
        respond(401, json={"detail": "this server needs a bearer token"}).info()


def test_client_says_how_to_start_an_absent_server():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(Unreachable, match="metaseg serve"):
        Client("http://server.test", transport=httpx.MockTransport(refuse)).health()


def test_blend_fills_at_the_chosen_opacity_and_outlines_in_red():
    gray = np.full((9, 9), 100, np.uint8)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    np.testing.assert_array_equal(display.blend(gray, mask, 0.0, contour=False), np.dstack([gray] * 3))
    half = display.blend(gray, mask, 0.5, contour=True)
    assert tuple(half[4, 4]) == (178, 50, 50) and tuple(half[2, 2]) == (255, 0, 0) and tuple(half[0, 0]) == (100,) * 3
    assert display.read_mask(png(mask.astype(np.uint8) * 255)).tolist() == mask.tolist()


def test_a_series_without_lesions_starts_in_the_middle():
    assert findings.busiest_slice({"slices": 7, "lesions": []}) == 3


def test_metaseg_ui_runs_streamlit_headless_with_the_server_url(monkeypatch):
    ran = {}

    def run(command, env):
        ran.update(command=command, env=env)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr("subprocess.run", run)
    assert main(["ui", "--server", "http://gpu-box:8000", "--port", "8600"]) == 0
    command = " ".join(ran["command"])
    assert f"-m streamlit run {APP} --server.port 8600" in command and "--server.headless true" in command
    assert ran["env"]["METASEG_SERVER"] == "http://gpu-box:8000"
