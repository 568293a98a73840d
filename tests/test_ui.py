"""The Streamlit viewer through Streamlit's AppTest: the sample, a DICOM series segmented once and then scrolled,
thresholded, score-filtered and measured here, the 3D lesion table, its jump to a lesion's slice and the picked
lesion's outline, a single slice and separate pictures (no volume), the series mask files made here, the sequences
as separate files (segmented once, on Segment) or as a DICOM study, NIfTI sequences dropped in the main box, the
sidebar's words and the upload limit, and readable errors; plus the HTTP client, the drawing pieces and `metaseg ui`.

The server is a fake that follows the API contract (GET /health and /info, POST /segment/probabilities) on a real
socket (uvicorn in a thread). It reads and refuses uploads with the real server's code (serve.uploads'
Form, serve.errors' answers); its model is an "echo": the lesion probability is the FLAIR's own brightness / 255, so
every mask is known in advance, and it records each request, so a test sees what the viewer asked and when.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import nibabel
import numpy as np
import pydicom
import pytest
import streamlit as st
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from streamlit.runtime.memory_media_file_storage import _calculate_file_id, get_extension_for_mimetype
from streamlit.testing.v1 import AppTest

from conftest import REPO
from metaseg.cli import main
from metaseg.errors import Mismatch
from metaseg.imageio.limits import Limits
from metaseg.imageio.picture import to_png_bytes
from metaseg.imageio.reader import decode
from metaseg.imageio.volume import Volume
from metaseg.inference.lesions import measure
from metaseg.inference.steps import upload_masks
from serve import dicomseg
from serve.errors import add_handlers
from serve.main import create_app
from serve.uploads import Form
from test_serve import settings_for, weights  # noqa: F401  (module fixture)
from ui import display, findings, series_files
from ui.client import Client, ServerError, Unreachable
from ui.upload import Upload, file_stem, server_limits

APP = str(REPO / "ui" / "app.py")
MiB = 2**20


# --- inputs ---------------------------------------------------------------------------------------------------


def blobs(shape=(48, 64), boxes=((10, 30, 8, 12),), value=200) -> np.ndarray:
    """Background 20 with bright boxes (row, col, height, width): lesions where the echo engine will find them."""
    image = np.full(shape, 20, np.uint8)
    for row, col, height, width in boxes:
        image[row : row + height, col : col + width] = value
    return image


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_series(slices: list[np.ndarray], spacing_mm=(0.5, 0.5), thickness_mm=2.0, description="",
                 number=1, study=None, frame_of_reference=None) -> list[tuple[str, bytes]]:
    """An axial MR series, one file per slice, with the geometry and identities that mm, mL and a SEG need."""
    study, series = study or generate_uid(), generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    files = []
    for z, pixels in enumerate(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "Phantom^Synthetic", "PHANTOM", "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = number, z + 1, ""
        ds.SeriesDescription = description
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z * thickness_mm], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(spacing_mm), thickness_mm
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"S{number}IM{z + 1:04d}", buffer.getvalue()))  # no suffix, as PACS exports often are
    return files


# Three slices; the middle one holds the most lesion, the last none (also the browser test's series).
SERIES = [blobs(boxes=((4, 4, 6, 6),)), blobs(boxes=((10, 30, 10, 12), (30, 5, 4, 4))), blobs(boxes=())]

# Five slices, two lesions: A, 16x16 px on slices 2-4 (1-based), probability 200/255; B, 4x4 px on slice 4 only,
# probability 250/255. At 0.5 x 0.5 x 2 mm, A is 768 voxels = 384 mm³ and 11.3 mm corner to corner (measurable),
# B 16 voxels = 8 mm³ and 2.8 mm.
A, B = (10, 20, 16, 16), (36, 50, 4, 4)


def tumour_slice(*lesions: str) -> np.ndarray:
    image = blobs(boxes=[A] if "A" in lesions else [])
    if "B" in lesions:
        row, col, height, width = B
        image[row : row + height, col : col + width] = 250
    return image


TUMOUR = [tumour_slice(), tumour_slice("A"), tumour_slice("A"), tumour_slice("A", "B"), tumour_slice()]


# --- the fake server ------------------------------------------------------------------------------------------


STEPS = {"flip_tta": False, "threshold": 0.45, "min_lesion_voxels": 0, "min_lesion_mm3": 0, "min_lesion_score": 0,
         "largest_component": False}


@dataclass
class Fake:
    """What the fake server answers, and what it was asked."""

    steps: dict = field(default_factory=lambda: dict(STEPS))
    one_channel_dice_loss: float | None = 0.116
    test_metrics: dict[str, float] | None = None
    busy: int = 0
    max_upload_bytes: int = 2 * MiB
    refusal: tuple[int, str] | None = None  # (status, detail) for every segment route
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, query)
    fields: list[dict[str, int]] = field(default_factory=list)  # the multipart fields of each upload: name -> files

    def posts(self, path: str = "") -> list[tuple[str, dict]]:
        return [(p, q) for method, p, q in self.requests if method == "POST" and p.startswith(path or "/")]

    def info(self) -> dict:
        limits = {"max_upload_bytes": self.max_upload_bytes, "max_pixels": 2048 * 2048, "max_frames": 512,
                  "max_decoded_bytes": 256 * MiB, "inflate_factor": 4, "max_dicom_elements": 200_000,
                  "decode_timeout_s": 30}
        return {
            "model": "echo", "title": "Echo", "architecture": "Echo", "version": "0.0.0", "description": "",
            "intended_use": "Tests only.", "test_metrics": self.test_metrics, "inference_steps": self.steps,
            "segment_label": {"label": "Echo lesion", "description": "what the echo finds",
                              "category": {"code": "49755003", "scheme": "SCT",
                                           "meaning": "Morphologically Abnormal Structure"},
                              "type": {"code": "52988006", "scheme": "SCT", "meaning": "Lesion"}},
            "one_lesion_per_patient": False, "one_channel_dice_loss": self.one_channel_dice_loss,
            "input": {"channels": 3, "channel_def": {"0": "pre-contrast", "1": "FLAIR", "2": "post-contrast"},
                      "spatial_size": 32, "channel_rule": "gray is FLAIR", "formats": ["PNG", "DICOM"],
                      "limits": limits},
        }

    async def volume(self, request: Request) -> Volume:
        """The upload decoded as the server decodes it (its frames are FLAIR's); a UserError is answered as the
        server answers it."""
        form = await request.form()
        upload = {name: [(part.filename, await part.read()) for part in form.getlist(name)] for name in form}
        self.fields.append({name: len(files) for name, files in upload.items()})
        return Form(upload).volume(server_limits(self.info()))


def fake_app(fake: Fake) -> FastAPI:
    app = FastAPI()
    add_handlers(app)

    @app.middleware("http")
    async def record(request: Request, call_next):
        fake.requests.append((request.method, request.url.path, dict(request.query_params)))
        if fake.refusal and request.url.path.startswith("/segment"):
            return JSONResponse({"detail": fake.refusal[1]}, fake.refusal[0])
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": "echo", "version": "0.0.0", "busy": fake.busy, "capacity": 3}

    @app.get("/info")
    def info():
        return fake.info()

    @app.post("/segment/probabilities")
    async def probabilities(request: Request):
        volume = await fake.volume(request)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, probability=np.clip(np.stack(volume.frames), 0, 255).astype(np.uint8))
        return Response(buffer.getvalue(), media_type="application/octet-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    fake: Fake


@pytest.fixture(scope="module")
def server():
    served = Served("", Fake())
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(fake_app(served.fake), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.05)
    served.url = f"http://127.0.0.1:{port}"
    try:
        yield served
    finally:
        uv.should_exit = True
        thread.join(30)


@pytest.fixture
def viewer(server, monkeypatch):
    """The app, pointed at a fresh fake server, with empty caches."""
    monkeypatch.setenv("METASEG_SERVER", server.url)
    server.fake.__init__()
    st.cache_data.clear()
    st.cache_resource.clear()
    return AppTest.from_file(APP, default_timeout=60).run()


def by_label(elements, label):
    return next(e for e in elements if e.label == label)


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def images(at: AppTest) -> list[str]:
    """Media URLs of the shown images: they name the content, so a changed picture gets a new URL."""
    return [url for image in at.image for url in image.value]


def served_as(data: bytes, mime: str, file_name: str) -> str:
    """The media URL of a download button of these bytes and file name (Streamlit's file id hashes both)."""
    return f"/mock/media/{_calculate_file_id(data, mime, file_name)}{get_extension_for_mimetype(mime)}"


def download_labels(at: AppTest) -> list[str]:
    return [button.proto.label for button in at.get("download_button")]


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.main.caption]


def caption(at: AppTest, start: str) -> str:
    return next(text for text in captions(at) if text.startswith(start))


def drop(at: AppTest, files: list[tuple[str, bytes]], uploader: int = 0) -> AppTest:
    """Drop files on an uploader: 0 the main one, 1-3 pre-contrast, FLAIR, post-contrast."""
    kind = "image/png" if files and files[0][1].startswith(b"\x89PNG") else "application/dicom"
    at.file_uploader[uploader].set_value([(name, data, kind) for name, data in files])
    return at.run()


def table(at: AppTest) -> list[dict]:
    return at.dataframe[0].value.to_dict("records")


# --- the app --------------------------------------------------------------------------------------------------


def test_the_sample_is_one_slice_with_an_area_and_no_volume(viewer, server):
    assert not viewer.exception
    assert viewer.sidebar.success[0].value == "Up, model loaded; idle"
    assert any("`echo`" in md.value for md in viewer.sidebar.markdown)  # the model as /info names it
    by_label(viewer.button, "Try a sample").click().run()
    assert not viewer.exception and not viewer.error
    assert len(images(viewer)) == 2 and "Slice" not in [s.label for s in viewer.slider]  # input, overlay
    numbers = metrics(viewer)
    assert int(numbers["Lesions"]) >= 1 and numbers["Total area"].endswith("px")  # a TIFF has no pixel size
    assert "Total volume" not in numbers and "Measurable" not in numbers
    rows = table(viewer)
    assert len(rows) == int(numbers["Lesions"])
    assert {"area (px)", "diameter (px)"} <= set(rows[0]) and "slices" not in rows[0]
    assert not any(key.startswith("volume") for key in rows[0])
    assert caption(viewer, "Volume steps").startswith("Volume steps: none for a single slice")
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG"]
    assert [b.label for b in viewer.button if b.label.startswith("Prepare")] == ["Prepare NIfTI mask"]
    assert caption(viewer, "The model got").startswith("The model got all three sequences")  # a 3-channel TIFF
    assert viewer.radio[0].options == ["FLAIR", "pre-contrast", "post-contrast"]  # each shown from its channel
    assert server.fake.posts() == [("/segment/probabilities", {})]


def test_a_series_is_segmented_once_then_scrolled_and_thresholded_here(viewer, server):
    drop(viewer, dicom_series(TUMOUR))
    assert not viewer.exception and not viewer.error
    assert metrics(viewer) == {"Lesions": "2", "Total volume": "0.392 mL", "Measurable": "1 of 2"}
    first, second = table(viewer)
    assert (first["lesion"], first["slices"], first["volume (mm³)"], first["measurable"]) == (1, "2–4", 384, "yes")
    assert first["diameter (mm)"] == pytest.approx(16 * np.sqrt(2) * 0.5)
    assert first["score"] == pytest.approx(200 / 255) and first["status"] == "kept"
    assert (second["slices"], second["volume (mm³)"], second["measurable"]) == ("4", 8, "no")
    slider = by_label(viewer.slider, "Slice")
    assert (slider.min, slider.max, slider.value) == (1, 5, 2)  # the largest lesion's widest slice
    assert caption(viewer, "Lesion on slices").startswith("Lesion on slices 2–4 of 5")
    assert caption(viewer, "Volume steps").startswith("Volume steps: none on (every lesion is kept)")
    assert caption(viewer, "The model got").startswith("The model got FLAIR; pre-contrast and post-contrast filled")
    assert server.fake.posts() == [("/segment/probabilities", {})]

    asked = list(server.fake.requests)
    shown = images(viewer)
    slider.set_value(4).run()
    assert images(viewer)[0] != shown[0] and images(viewer)[1] != shown[1]  # the input and its overlay follow
    by_label(viewer.slider, "Overlay opacity").set_value(0.9).run()
    by_label(viewer.toggle, "Outline").set_value(False).run()
    by_label(viewer.slider, "Probability threshold").set_value(0.8).run()  # only B (250/255) reaches 0.8
    assert metrics(viewer)["Lesions"] == "1" and table(viewer)[0]["slices"] == "4"
    assert caption(viewer, "Lesion on slices").startswith("Lesion on slices 4 of 5")
    assert not viewer.exception and server.fake.requests == asked  # nothing asked since: not even /health


def test_picking_a_lesion_in_the_table_jumps_to_its_slice_once(viewer):
    drop(viewer, dicom_series(TUMOUR))
    assert by_label(viewer.slider, "Slice").value == 2
    viewer.session_state[viewer.dataframe[0].key] = {"selection": {"rows": [1], "columns": []}}  # lesion B
    viewer.run()
    assert by_label(viewer.slider, "Slice").value == 4  # B's slice
    by_label(viewer.slider, "Slice").set_value(1).run()
    assert by_label(viewer.slider, "Slice").value == 1  # the pick does not hold the slider
    viewer.session_state[viewer.dataframe[0].key] = {"selection": {"rows": [0], "columns": []}}  # lesion A
    viewer.run()
    assert by_label(viewer.slider, "Slice").value == 2


@pytest.fixture
def overlays(monkeypatch) -> list[np.ndarray]:
    """Every overlay the viewer draws (display.blend's answers), in order."""
    drawn = []
    real = display.blend
    monkeypatch.setattr(display, "blend", lambda *args: drawn.append(real(*args)) or drawn[-1])
    return drawn


def edge(lesion: tuple[int, int, int, int]) -> tuple[int, int]:
    return lesion[0], lesion[1]  # its top-left pixel, on its border


def inside(lesion: tuple[int, int, int, int]) -> tuple[int, int]:
    return lesion[0] + 2, lesion[1] + 2


def test_the_picked_lesion_is_outlined_apart_from_the_others_on_its_slice(viewer, overlays):
    drop(viewer, dicom_series(TUMOUR))
    red, yellow = tuple(display.RED.astype(np.uint8)), tuple(display.PICKED.astype(np.uint8))
    by_label(viewer.slider, "Slice").set_value(4).run()  # A and B both on slice 4
    assert tuple(overlays[-1][edge(A)]) == red and tuple(overlays[-1][edge(B)]) == red
    viewer.session_state[viewer.dataframe[0].key] = {"selection": {"rows": [1], "columns": []}}  # lesion B
    viewer.run()
    assert tuple(overlays[-1][edge(B)]) == yellow and tuple(overlays[-1][edge(A)]) == red
    assert tuple(overlays[-1][inside(B)]) != yellow  # outlined, not filled
    assert "yellow outline: lesion 2" in viewer.image[2].proto.imgs[0].caption
    by_label(viewer.toggle, "Outline").set_value(False).run()  # the pick stays outlined without the outlines
    assert tuple(overlays[-1][edge(B)]) == yellow and tuple(overlays[-1][edge(A)]) != red
    viewer.session_state[viewer.dataframe[0].key] = {"selection": {"rows": [0], "columns": []}}  # lesion A
    viewer.run()
    assert tuple(overlays[-1][edge(A)]) == yellow and tuple(overlays[-1][edge(B)]) != yellow


def test_the_lesion_score_filters_here_and_dims_what_it_filters(viewer, server, overlays):
    server.fake.steps["min_lesion_score"] = 0.9  # the model's choice: A (200/255) filtered, B (250/255) kept
    st.cache_data.clear()  # the viewer keeps /info for a minute
    series = dicom_series(TUMOUR)
    drop(viewer, series)
    score = by_label(viewer.slider, "Lesion score")
    assert score.value == pytest.approx(0.9) and not score.disabled
    assert metrics(viewer) == {"Lesions": "1", "Total volume": "0.008 mL", "Measurable": "0 of 1",
                               "Filtered by score": "1"}
    assert [(row["lesion"], row["status"]) for row in table(viewer)] == [(1, "filtered"), (2, "kept")]
    assert by_label(viewer.slider, "Slice").value == 4  # the kept lesion's slice
    overlay, gray = overlays[-1], display.sequence_slices(decode(series))["FLAIR"][3]
    pale, red = tuple(display.PALE.astype(np.uint8)), tuple(display.RED.astype(np.uint8))
    assert tuple(overlay[edge(A)]) == pale and tuple(overlay[edge(B)]) == red
    alpha = display.DIM * 0.4  # dimmed: a fraction of the opacity
    assert tuple(overlay[inside(A)]) == tuple(np.round((1 - alpha) * gray[inside(A)] + alpha * display.PALE))
    assert tuple(overlay[inside(B)]) == tuple(np.round(0.6 * gray[inside(B)] + 0.4 * display.RED))
    assert "pale: under lesion score 0.9" in viewer.image[2].proto.imgs[0].caption

    by_label(viewer.slider, "Lesion score").set_value(0.5).run()  # up to the threshold: nothing filtered
    assert metrics(viewer)["Lesions"] == "2" and "Filtered by score" not in metrics(viewer)
    assert [row["status"] for row in table(viewer)] == ["kept", "kept"] and tuple(overlays[-1][edge(A)]) == red
    by_label(viewer.slider, "Lesion score").set_value(0.99).run()
    assert metrics(viewer)["Lesions"] == "0" and metrics(viewer)["Filtered by score"] == "2"
    assert len(table(viewer)) == 2  # filtered lesions stay listed
    assert server.fake.posts() == [("/segment/probabilities", {})]  # filtered here


def test_the_lesion_score_is_off_for_what_is_no_volume(viewer):
    drop(viewer, [("slice.png", png(TUMOUR[3]))])
    assert by_label(viewer.slider, "Lesion score").disabled
    assert "status" not in table(viewer)[0]


def test_the_sidebar_speaks_a_readers_words(viewer, server):
    server.fake.test_metrics = {"dice_3d": 0.731, "lesionwise_hd95_vox": 3.25, "fp_lesions": 1.16, "new_one": 0.5}
    server.fake.busy = 2
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert at.sidebar.success[0].value == "Up, model loaded; working on 2 requests"
    text = "\n".join([m.value for m in at.sidebar.markdown] + [c.value for c in at.sidebar.caption])
    assert ("Dice per patient (3D): 0.731  \nLesion-wise HD95 (voxels): 3.250  \nFalse lesions per patient: 1.160  "
            "\nNew one: 0.500") in text
    for internal in ("lesionwise_hd95_vox", "fp_lesions", "dice_3d", "SegmentationReport", "slot", "channel_rule"):
        assert internal not in text
    server.fake.busy = 3
    st.cache_data.clear()
    assert AppTest.from_file(APP, default_timeout=60).run().sidebar.success[0].value.startswith(
        "Up, model loaded; full")


def test_every_uploader_states_the_servers_own_limit(viewer, server):
    assert [u.proto.max_upload_size_mb for u in viewer.file_uploader] == [2, 2, 2, 2]  # the fake's 2 MiB
    assert "up to 2 MiB in all" in viewer.file_uploader[0].proto.help
    server.fake.max_upload_bytes = 64 * MiB
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert [u.proto.max_upload_size_mb for u in at.file_uploader] == [64] * 4


def test_a_slice_without_lesion_says_so(viewer):
    drop(viewer, [("blank.png", png(blobs(boxes=())))])
    assert metrics(viewer) == {"Lesions": "0", "Total area": "0 px"} and not viewer.dataframe
    assert "No lesion at this threshold." in captions(viewer)


def test_the_models_volume_steps_are_applied_to_a_volume_and_said(viewer, server):
    server.fake.steps["min_lesion_mm3"] = 10  # B is 8 mm³
    st.cache_data.clear()  # the viewer keeps /info for a minute
    drop(viewer, dicom_series(TUMOUR))
    assert metrics(viewer)["Lesions"] == "1" and table(viewer)[0]["slices"] == "2–4"
    assert caption(viewer, "Volume steps").startswith("Volume steps applied: lesions under 10 mm³ (20 voxels)")


def test_pictures_uploaded_together_are_separate_slices_without_volume_steps(viewer, server):
    server.fake.steps["min_lesion_voxels"] = 100  # B is 16 px: kept, since pictures are no volume
    st.cache_data.clear()  # the viewer keeps /info for a minute
    drop(viewer, [(f"s{z}.png", png(image)) for z, image in enumerate(TUMOUR)])
    assert not viewer.exception and not viewer.error
    assert by_label(viewer.slider, "Slice").value == 2
    assert metrics(viewer) == {"Lesions": "4", "Area on this slice": "256 px"}  # A on each of three slices, and B
    assert [(row["lesion"], row["slices"], row["area (px)"]) for row in table(viewer)] == [
        (1, "2", 256), (2, "3", 256), (3, "4", 256), (4, "4", 16)]
    assert caption(viewer, "Volume steps").startswith("Volume steps: none for separate pictures")


def test_a_single_dicom_slice_has_an_area_in_mm2_and_no_volume(viewer):
    drop(viewer, dicom_series(TUMOUR[3:4]))
    assert not viewer.exception and not viewer.error
    assert metrics(viewer) == {"Lesions": "2", "Total area": "68.0 mm²", "Measurable": "1 of 2"}  # 272 px x 0.25
    assert [row["area (mm²)"] for row in table(viewer)] == [64, 4]
    assert not any(key.startswith("volume") for key in table(viewer)[0])


@pytest.fixture
def made(monkeypatch) -> dict[str, bytes]:
    """The series mask files the viewer makes, as it made them (a download button's bytes are not readable here)."""
    made = {}
    for name in ("nifti", "seg"):
        real = getattr(series_files, name)
        monkeypatch.setattr(series_files, name, lambda *args, real=real, name=name: made.setdefault(name, real(*args)))
    return made


def test_the_series_mask_files_are_made_here_from_the_shown_masks_without_asking_the_server(viewer, server, made):
    server.fake.steps["min_lesion_score"] = 0.9  # A (200/255) is filtered, B (250/255) kept
    st.cache_data.clear()  # the viewer keeps /info for a minute
    series = dicom_series(TUMOUR, number=7)
    drop(viewer, series)
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG"]
    by_label(viewer.button, "Prepare NIfTI mask and DICOM SEG").click().run()
    assert not viewer.exception and not viewer.warning
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG", "NIfTI mask", "DICOM SEG"]
    assert server.fake.posts() == [("/segment/probabilities", {})]  # the model ran once, for the upload

    shown = np.zeros((5, 48, 64), bool)  # what is shown as lesion: B alone
    row, col, height, width = B
    shown[3, row : row + height, col : col + width] = True
    np.testing.assert_array_equal(np.stack(decode([("m.nii.gz", made["nifti"])]).frames) > 0, shown)
    seg = pydicom.dcmread(io.BytesIO(made["seg"]))
    assert seg.SegmentSequence[0].SegmentLabel == "Echo lesion" and int(seg.NumberOfFrames) == 5
    slice_of = [round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) / 2)  # 2 mm apart
                for frame in seg.PerFrameFunctionalGroupsSequence]
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), shown[slice_of])  # one frame per slice
    files = {button.proto.label: button.proto.url for button in viewer.get("download_button")}
    assert files["NIfTI mask"] == served_as(made["nifti"], "application/gzip", "PHANTOM_series7_mask.nii.gz")
    assert files["DICOM SEG"] == served_as(made["seg"], "application/dicom", "PHANTOM_series7_seg.dcm")
    assert files["Mask PNG"] == served_as(to_png_bytes(shown[3]), "image/png", "PHANTOM_series7_slice4_mask.png")

    by_label(viewer.slider, "Slice").set_value(3).run()
    assert download_labels(viewer)[2:] == ["NIfTI mask", "DICOM SEG"]
    by_label(viewer.slider, "Lesion score").set_value(0.5).run()  # the prepared files are of 0.9
    assert download_labels(viewer) == ["Mask PNG", "Overlay PNG"]
    assert server.fake.posts() == [("/segment/probabilities", {})]


def test_a_source_a_seg_cannot_reference_is_a_warning_and_the_nifti_still_comes(viewer, server):
    files = dicom_series(TUMOUR)
    stripped = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.FrameOfReferenceUID
        buffer = io.BytesIO()
        ds.save_as(buffer)
        stripped.append((name, buffer.getvalue()))
    drop(viewer, stripped)
    by_label(viewer.button, "Prepare NIfTI mask and DICOM SEG").click().run()
    assert not viewer.exception
    assert viewer.warning[0].value.startswith("DICOM SEG: cannot build a DICOM SEG for this upload: 5 frames")
    assert download_labels(viewer)[2:] == ["NIfTI mask"] and server.fake.posts() == [("/segment/probabilities", {})]


def sequence_files(looks: dict[str, list[np.ndarray]], described: bool = False) -> dict[str, list]:
    """Each sequence of `looks` (pre_contrast, flair, post_contrast) as a DICOM series of one study and frame of
    reference; `described`: its SeriesDescription names it, so that the study's series are recognised."""
    study, frame = generate_uid(), generate_uid()
    texts = {"pre_contrast": "T1 pre", "flair": "FLAIR", "post_contrast": "T1 post contrast"}
    return {field: dicom_series(images, description=texts[field] if described else "", number=n, study=study,
                                frame_of_reference=frame)
            for n, (field, images) in enumerate(looks.items(), start=1)}


SHIFTED = [np.roll(image, 9, axis=1) for image in TUMOUR]  # post-contrast: other pixels, the same slices


def test_sequences_in_separate_files_are_segmented_once_when_segment_is_pressed(viewer, server):
    sequences = sequence_files({"pre_contrast": TUMOUR, "flair": TUMOUR, "post_contrast": SHIFTED})
    drop(viewer, sequences["pre_contrast"], uploader=1)  # left to right, as a user fills them
    assert by_label(viewer.button, "Segment").disabled  # FLAIR is required; no error while the user chooses
    assert not viewer.error and not viewer.image and not server.fake.posts()
    drop(viewer, sequences["flair"], uploader=2)
    assert not by_label(viewer.button, "Segment").disabled and not viewer.image and not server.fake.posts()
    drop(viewer, sequences["post_contrast"], uploader=3)
    assert not viewer.error and not server.fake.posts()
    by_label(viewer.button, "Segment").click().run()
    assert not viewer.exception and not viewer.error
    assert server.fake.fields == [{"pre_contrast": 5, "flair": 5, "post_contrast": 5}]  # one inference, all three
    assert caption(viewer, "The model got").startswith("The model got all three sequences")
    show = viewer.radio[0]
    assert show.options == ["FLAIR", "pre-contrast", "post-contrast"] and show.value == "FLAIR"
    assert metrics(viewer)["Lesions"] == "2"
    shown = images(viewer)
    show.set_value("pre-contrast").run()
    assert images(viewer) == shown  # the same pixels as FLAIR: the same pictures
    viewer.radio[0].set_value("post-contrast").run()
    strip, picture, overlay = images(viewer)  # the same lesion slices; another input, and the overlay over it
    assert strip == shown[0] and picture != shown[1] and overlay != shown[2]
    by_label(viewer.button, "Segment").click().run()  # again, the same sequences: the answer is kept
    assert len(server.fake.posts()) == 1

    drop(viewer, [], uploader=3)  # a box changed: the result goes until Segment is pressed again
    assert not viewer.image and len(server.fake.posts()) == 1
    by_label(viewer.button, "Segment").click().run()
    assert server.fake.fields[-1] == {"pre_contrast": 5, "flair": 5}
    assert caption(viewer, "The model got").startswith(
        "The model got pre-contrast and FLAIR; post-contrast filled with FLAIR, as in training. FLAIR alone: about "
        "−0.12 per-patient Dice out of fold. Segmented once by the server")
    assert viewer.radio[0].options == ["FLAIR", "pre-contrast"]  # not the post-contrast FLAIR stands in for


def nifti_files(names: list[str]) -> list[tuple[str, bytes]]:
    """TUMOUR as one NIfTI volume per name."""
    image = nibabel.Nifti1Image(np.stack(TUMOUR).transpose(2, 1, 0), np.diag([0.5, 0.5, 2.0, 1.0]))
    return [(name, gzip.compress(image.to_bytes(), mtime=0)) for name in names]


def test_nifti_sequences_dropped_in_the_main_box_are_pointed_to_the_sequence_boxes(viewer, server):
    trio = nifti_files(["t1.nii.gz", "flair.nii.gz", "t1c.nii.gz"])
    drop(viewer, trio)
    assert not viewer.exception and not viewer.error and not viewer.image and not server.fake.posts()
    assert viewer.info[0].value.startswith(
        "These are 3 NIfTI files, and a NIfTI file holds one sequence, so the main box takes only one. Put each in "
        "its box under **Sequences in separate files** below (**pre-contrast**, **FLAIR**, **post-contrast**; FLAIR "
        "is required), then press Segment.")
    assert viewer.expander[0].proto.expanded  # the boxes are open
    drop(viewer, trio[1:2], uploader=2)
    assert viewer.expander[0].proto.expanded  # and stay open while they hold files
    assert not any("NIfTI files" in info.value for info in viewer.info)
    by_label(viewer.button, "Segment").click().run()
    assert not viewer.exception and not viewer.error and not viewer.info
    assert server.fake.fields == [{"flair": 1}] and metrics(viewer)["Lesions"] == "2"


def test_a_dicom_study_of_three_series_goes_under_file_and_is_shown_as_its_sequences(viewer, server):
    sequences = sequence_files({"post_contrast": SHIFTED, "flair": TUMOUR, "pre_contrast": TUMOUR}, described=True)
    drop(viewer, [f for files in sequences.values() for f in files])
    assert not viewer.exception and not viewer.error
    assert server.fake.fields == [{"file": 15}]
    show = viewer.radio[0]
    assert show.options == ["FLAIR", "pre-contrast", "post-contrast"] and show.value == "FLAIR"  # recognised
    assert caption(viewer, "The model got").startswith("The model got all three sequences")
    assert metrics(viewer)["Lesions"] == "2"  # FLAIR's lesions, not the post-contrast series' (shifted)
    shown = images(viewer)
    show.set_value("post-contrast").run()
    assert images(viewer)[1] != shown[1] and server.fake.fields == [{"file": 15}]  # the input: the strip comes first


def study(*descriptions: str) -> list[tuple[str, bytes]]:
    study_uid, frame = generate_uid(), generate_uid()
    return [f for n, text in enumerate(descriptions, start=1)
            for f in dicom_series(TUMOUR, description=text, number=n, study=study_uid, frame_of_reference=frame)]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((("file", study("FLAIR", "T1 post contrast")),),
         "the upload holds 2 DICOM series; send one series, or the sequences in the fields pre_contrast, flair, "
         "post_contrast"),
        ((("file", study("FLAIR", "T2 FLAIR", "T1 post contrast")),),
         "descriptions do not name pre-contrast T1, FLAIR and post-contrast T1 one each"),
        ((("flair", dicom_series(TUMOUR)), ("post_contrast", dicom_series(SHIFTED[:4]))),
         "(post-contrast) has 4 slice(s), FLAIR 5; the sequences must be the same slices"),
        ((("pre_contrast", dicom_series(TUMOUR)), ("flair", [("f.png", png(TUMOUR[0]))])),
         "(pre-contrast) has 5 slice(s), FLAIR 1"),
    ],
    ids=["two-series", "ambiguous-study", "fewer-slices", "one-picture-for-a-series"],
)
def test_sequences_the_server_would_refuse_are_refused_here_with_its_message(viewer, server, parts, message):
    fields = dict(parts)
    if "file" in fields:
        drop(viewer, fields["file"])
    else:
        for uploader, field in ((1, "pre_contrast"), (2, "flair"), (3, "post_contrast")):
            if field in fields:
                drop(viewer, fields[field], uploader=uploader)
        by_label(viewer.button, "Segment").click().run()
    assert not viewer.exception and len(viewer.error) == 1
    shown = viewer.error[0].value
    assert message in shown and "\n" not in shown
    assert not viewer.image and not server.fake.posts()  # refused here, nothing sent
    with pytest.raises(ServerError) as answered:  # what the server's own code answers to the same upload
        Client(server.url).probabilities(tuple((field, tuple(files)) for field, files in parts))
    assert str(answered.value) == f"The server refused the request (422 Unprocessable Entity): {shown}"


def test_without_the_one_channel_cost_the_viewer_leaves_the_number_out(viewer, server):
    server.fake.one_channel_dice_loss = None
    st.cache_data.clear()  # the viewer keeps /info for a minute
    drop(viewer, dicom_series(TUMOUR))
    assert caption(viewer, "The model got").startswith("The model got FLAIR; pre-contrast and post-contrast filled "
                                                       "with FLAIR, as in training. Segmented once")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([("notes.png", b"this is not an image")], "'notes.png': not a recognised image"),
        ([("huge.png", np.random.default_rng(0).bytes(3 * MiB))], "the server takes at most 2.0 MiB"),
        ([("a.png", png(SERIES[0])), ("b.dcm", dicom_series(SERIES[:1])[0][1])], "upload one kind at a time"),
    ],
    ids=["not-an-image", "too-large", "mixed-kinds"],
)
def test_a_bad_upload_is_refused_here_without_sending_it(viewer, server, files, message):
    viewer.file_uploader[0].set_value([(name, data, "image/png") for name, data in files]).run()
    assert not viewer.exception
    assert message in viewer.error[0].value
    assert not viewer.image and not viewer.get("download_button") and not server.fake.posts()


def test_a_refusing_server_is_shown_in_one_line(viewer, server):
    server.fake.refusal = (422, "the sequences differ: FLAIR has 5 slices, post-contrast 4")
    drop(viewer, dicom_series(TUMOUR))
    assert not viewer.exception
    assert viewer.error[0].value == ("The server refused the request (422 Unprocessable Entity): the sequences "
                                     "differ: FLAIR has 5 slices, post-contrast 4")
    assert not viewer.image and not viewer.get("download_button")


def test_without_a_server_the_viewer_says_how_to_start_one(monkeypatch):
    monkeypatch.setenv("METASEG_SERVER", f"http://127.0.0.1:{free_port()}")
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "metaseg serve" in at.sidebar.error[0].value
    by_label(at.button, "Try a sample").click().run()
    assert not at.exception
    assert any("metaseg serve" in error.value for error in at.main.error)


# --- the pieces -----------------------------------------------------------------------------------------------


def respond(status: int, **kwargs) -> Client:
    return Client("http://server.test", transport=httpx.MockTransport(lambda request: httpx.Response(status, **kwargs)))


PARTS = (("file", (("a.png", b"..."),)),)


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (respond(400, json={"detail": "'a.png': truncated"}), "(400 Bad Request): 'a.png': truncated"),
        (respond(503, json={"detail": "the server is busy; retry in 2 s"}), "busy (503): the server is busy"),
        (respond(422, json={"detail": [{"msg": "Input should be less than or equal to 1"}]}), "less than or equal"),
        (respond(502, text="Bad gateway from the proxy"), "(502 Bad Gateway): Bad gateway from the proxy"),
        (respond(404, json={"detail": "Not Found"}), "does not offer /segment/probabilities (404); it is older"),
        (respond(200, content=b"PK\x03\x04 not a zip"), "did not answer with lesion probabilities"),
        (respond(200, content=b"<html>a proxy's page</html>"), "did not answer with lesion probabilities"),
    ],
    ids=["400", "503", "422-validation", "502-not-json", "404-old-server", "broken-npz", "not-npz"],
)
def test_client_turns_every_refusal_and_bad_answer_into_one_readable_line(client, message):
    with pytest.raises(ServerError) as raised:
        client.probabilities(PARTS)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_client_sends_the_fields_and_reads_the_probabilities():
    seen = {}
    probability = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)

    def answer(request):
        seen["body"] = request.read()
        buffer = io.BytesIO()
        np.savez_compressed(buffer, probability=probability)
        return httpx.Response(200, content=buffer.getvalue())

    parts = Upload.sequences({"flair": [("f1", b"F1"), ("f2", b"F2")], "post_contrast": [("p1", b"P1")]}).parts
    got = Client("http://server.test", transport=httpx.MockTransport(answer)).probabilities(parts)
    np.testing.assert_array_equal(got, probability)
    body = seen["body"].decode()
    assert body.count('name="flair"') == 2 and body.count('name="post_contrast"') == 1 and "pre_contrast" not in body

    def floats(request):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, probability=probability / 255)
        return httpx.Response(200, content=buffer.getvalue())

    with pytest.raises(ServerError, match="float64 .* not uint8"):
        Client("http://server.test", transport=httpx.MockTransport(floats)).probabilities(parts)


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


def test_limits_from_a_server_that_does_not_state_them_all_are_a_readable_error():
    stated = Fake().info()
    assert server_limits(stated).max_inflated_bytes == 4 * Fake.max_upload_bytes
    del stated["input"]["limits"]["inflate_factor"]  # a server before the viewer's version
    with pytest.raises(ServerError, match="decoding limits"):
        server_limits(stated)


def test_the_assigned_sequences_decode_by_the_library_and_need_the_flair():
    upload = Upload.sequences({"post_contrast": [("b.png", png(SERIES[1]))], "flair": [("a.png", png(SERIES[0]))]})
    assert [name for name, _ in upload.parts] == ["flair", "post_contrast"]  # channel order, empty ones left out
    volume = upload.volume(Limits())
    assert volume.sequences_given == ("FLAIR", "post-contrast")
    gray = display.sequence_slices(volume)
    assert list(gray) == ["FLAIR", "post-contrast"]
    assert not np.array_equal(gray["FLAIR"][0], gray["post-contrast"][0])
    assert Upload.of([("a.png", png(SERIES[0]))]).volume(Limits()).sequences_given == ("FLAIR",)
    assert list(display.sequence_slices(decode([("a.png", png(SERIES[0]))]))) == ["FLAIR"]
    with pytest.raises(Mismatch, match="FLAIR is missing"):
        Upload.sequences({"pre_contrast": [("a.png", b"a")]}).volume(Limits())


@pytest.mark.parametrize(
    ("patient", "number", "stem"),
    [("PHANTOM", 3, "PHANTOM_series3"), ("../etc/pass wd", 2, "etc_pass_wd_series2"), ("", None, "S1IM0001")],
)
def test_download_names_come_from_patient_and_series_and_are_safe(patient, number, stem):
    files = dicom_series(SERIES[:1])
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    ds.PatientID, ds.SeriesNumber = patient, number
    buffer = io.BytesIO()
    ds.save_as(buffer)
    upload = Upload.of([(files[0][0], buffer.getvalue())])
    assert file_stem(upload, decode(list(upload.files))) == stem
    assert file_stem(Upload.of([("/tmp/x/.scan 1.nii.gz", b"")]), decode([("a.png", png(SERIES[0]))])) == "scan_1"


def test_the_viewers_lesions_are_metaseg_lesions_of_the_final_masks():
    volume = decode(dicom_series(TUMOUR))
    found = findings.find(np.stack(TUMOUR), volume, STEPS, 0.45, 0)
    assert found.lesions == measure(np.stack(TUMOUR) >= 0.45 * 255, np.stack(TUMOUR) / 255, (0.5, 0.5), 2.0)
    assert findings.lesion_slices(found) == "2–4" and findings.start_slice(found) == 1
    assert findings.applied_steps({**STEPS, "min_lesion_score": 0.9}, volume) == [
        "lesions scoring under 0.9 filtered (drawn pale, left out of the counts and the downloads)"]
    scored = findings.find(np.stack(TUMOUR), volume, STEPS, 0.45, 0.9)  # the server's step, as the server applies it
    np.testing.assert_array_equal(scored.masks, upload_masks(np.stack(TUMOUR) / 255, {**STEPS, "threshold": 0.45,
                                                                                       "min_lesion_score": 0.9}, True))
    assert scored.lesions == found.lesions and scored.filtered == {1} and [x.id for x in scored.kept] == [2]
    assert scored.labels[3, A[0], A[1]] == 1 and scored.labels[3, B[0], B[1]] == 2
    pictures = decode([(f"{z}.png", png(image)) for z, image in enumerate(TUMOUR)])
    apart = findings.find(np.stack(TUMOUR), pictures, STEPS, 0.45, 0.9)  # no volume: no score step
    assert not apart.filtered and [x.id for x in apart.lesions] == [1, 2, 3, 4]
    assert apart.labels[3, A[0], A[1]] == 3 and apart.labels[3, B[0], B[1]] == 4  # as measure_upload numbers them
    nothing = findings.find(np.zeros((7, 4, 4), np.uint8), decode([(f"{z}.png", png(SERIES[2][:4, :4]))
                                                                   for z in range(7)]), STEPS, 0.5, 0)
    assert findings.lesion_slices(nothing) == "none" and findings.start_slice(nothing) == 3


def test_the_servers_info_states_the_bundles_segment_label_as_the_seg_writer_reads_it(weights):
    """The viewer writes the DICOM SEG with serve.dicomseg from GET /info: the same segment as POST /segment/seg."""
    with TestClient(create_app(settings_for(weights))) as http:
        stated = http.get("/info").json()["segment_label"]
    metadata = json.loads((REPO / "bundles/attention_unet/configs/metadata.json").read_text())
    served, bundled = (dicomseg.finding({dicomseg.METADATA_KEY: one}) for one in (stated, metadata["segment_label"]))
    assert (served.label, served.description) == (bundled.label, bundled.description) == (
        "FLAIR abnormality (LGG-trained model)", metadata["segment_label"]["description"])
    for concept in ("category", "type", "anatomic_region"):
        assert getattr(served, concept).value == getattr(bundled, concept).value


def test_model_input_says_what_is_missing_and_what_it_costs():
    assert findings.model_input(["FLAIR"], 0.116) == ("The model got FLAIR; pre-contrast and post-contrast filled "
                                                      "with FLAIR, as in training. FLAIR alone: about −0.12 "
                                                      "per-patient Dice out of fold")
    assert findings.model_input(["FLAIR"], -0.02).endswith("about +0.02 per-patient Dice out of fold")
    assert findings.model_input(["pre-contrast", "FLAIR", "post-contrast"], 0.116) == (
        "The model got all three sequences: pre-contrast, FLAIR and post-contrast")


def test_blend_fills_at_the_chosen_opacity_and_outlines_in_red():
    gray = np.full((9, 9), 100, np.uint8)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    np.testing.assert_array_equal(display.blend(gray, mask, 0.0, contour=False), np.dstack([gray] * 3))
    half = display.blend(gray, mask, 0.5, contour=True)
    assert tuple(half[4, 4]) == (178, 50, 50) and tuple(half[2, 2]) == (255, 0, 0) and tuple(half[0, 0]) == (100,) * 3
    other = np.zeros((9, 9), bool)
    other[7:9, 7:9] = True
    both = display.blend(gray, mask, 0.5, True, dimmed=other, picked=mask)
    assert tuple(both[2, 2]) == (255, 215, 0) and tuple(both[4, 4]) == (178, 50, 50)  # picked: outline only
    assert tuple(both[8, 8]) == (255, 170, 170)  # a filtered lesion's outline, pale


def test_the_strip_marks_lesion_slices_and_the_shown_one():
    bar = display.strip(np.array([False, True, True, False]), shown=2, width=40, height=8)
    assert bar.shape == (8, 40, 3)
    middle = bar[4, ::10]
    assert [tuple(c) for c in middle] == [display.STRIP_EMPTY, display.STRIP_LESION, display.STRIP_LESION,
                                          display.STRIP_EMPTY]
    assert tuple(bar[0, 25]) == display.STRIP_SHOWN and tuple(bar[0, 15]) == display.STRIP_LESION


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
