"""Sequences as users hold them (metaseg.imageio.sequences, the segment routes' fields): a DICOM study's three
single-sequence series, under `file` or in the fields pre_contrast/flair/post_contrast, reach the network as the three channels of
their RGB TIFF, in the network's order; sequences that are not the same slices, several series that are not such a
trio, and forms of the wrong fields are refused with a 4xx saying what to send; the upload limits hold across fields.

Model: the attention_unet bundle around a 1x1 convolution that weighs all three channels differently (lesion where
2 post-contrast + FLAIR - pre-contrast is high), so that a sequence in the wrong channel changes the mask.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import torch
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from conftest import PLAIN_STEPS
from metaseg.imageio import sequences
from metaseg.errors import Mismatch, TooLarge
from metaseg.imageio.limits import Limits
from metaseg.imageio.reader import decode
from serve.config import Settings
from serve.main import create_app
from test_inference_steps import BRIGHT_NET, bundle_with, png
from test_serve import blobs, dcm, mr

ROWS, COLS, SLICES = 24, 32, 3
# Per slice, each sequence with its own bright box (row, col, height, width): the mask depends on which is which.
PHANTOM = np.stack([  # (slices, rows, cols, sequences), channels in the network's order
    np.stack([blobs((ROWS, COLS), ((2 + 3 * z, 2, 7, 7),)),  # pre-contrast
              blobs((ROWS, COLS), ((4 + 2 * z, 12, 8, 6), (14, 3, 6, 6))),  # FLAIR
              blobs((ROWS, COLS), ((12, 20 + z, 7, 8), (14, 3, 6, 6)))], axis=-1)  # post-contrast
    for z in range(SLICES)
])
DESCRIPTIONS = ("T1 pre", "FLAIR", "T1 post Gd")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    bundle = bundle_with(tmp_path_factory.mktemp("sequences"), PLAIN_STEPS, BRIGHT_NET)
    weight = torch.zeros(2, 3, 1, 1)
    weight[1, :, 0, 0] = torch.tensor([-1.0, 1.0, 2.0])  # lesion logit: -pre + FLAIR + 2 post - 1.5
    torch.save({"weight": weight, "bias": torch.tensor([0.0, -1.5])}, bundle / "models" / "model.pt")
    settings = Settings(bundle=str(bundle), weights=bundle / "models" / "model.pt", max_upload_bytes=2**21)
    with TestClient(create_app(settings)) as c:
        yield c


def tiff(channels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, channels, photometric="rgb")
    return buffer.getvalue()


def series(channel: int, description: str | None = None, z0: float = 0.0, **attrs) -> list[tuple[str, bytes]]:
    """One sequence of the phantom as a DICOM series of its own, one file per slice, slices in reverse order."""
    uid = generate_uid()
    files = []
    for z in reversed(range(SLICES)):
        ds = mr(PHANTOM[z, ..., channel], z=z0 + z, SeriesInstanceUID=uid, **attrs)
        if description is not None:
            ds.SeriesDescription = description
        files.append((f"{('pre', 'flair', 'post')[channel]}{z}.dcm", dcm(ds)))
    return files


def described_series(channel: int) -> list[tuple[str, bytes]]:
    return series(channel, DESCRIPTIONS[channel])


def masks(client, files: list[tuple[str, tuple[str, bytes]]]) -> np.ndarray:
    return np.stack([png(client.post("/segment/mask", files=files, params={"slice": z})) > 0 for z in range(SLICES)])


def as_file(files) -> list[tuple[str, tuple[str, bytes]]]:
    return [("file", f) for f in files]


def as_fields(by_field: dict) -> list[tuple[str, tuple[str, bytes]]]:
    return [(field, f) for field, files in by_field.items() for f in files]


def refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert all(word in detail for word in words), detail
    return detail


# --- three series reach the network as three channels, in its order -------------------------------------------------


def test_three_single_sequence_series_give_the_mask_of_their_rgb_tiff(client):
    by_tiff = masks(client, as_file([("phantom.tif", tiff(PHANTOM))]))
    assert 0.02 < by_tiff.mean() < 0.5  # both classes
    swapped = masks(client, as_file([("swapped.tif", tiff(PHANTOM[..., ::-1]))]))
    assert (swapped != by_tiff).mean() > 0.01  # pre- and post-contrast in each other's place: another mask
    flair_only = masks(client, as_file([("flair.tif", tiff(PHANTOM[..., [1, 1, 1]]))]))
    assert (flair_only != by_tiff).mean() > 0.01

    study = [f for trio in zip(*(described_series(c) for c in (2, 0, 1))) for f in trio]  # interleaved, post first
    np.testing.assert_array_equal(masks(client, as_file(study)), by_tiff)
    report = client.post("/segment", files=as_file(study)).json()
    assert report["sequences_given"] == ["pre-contrast", "FLAIR", "post-contrast"]
    assert (report["input_channels"], report["slices"], report["kind"]) == (3, SLICES, "dicom")
    assert report["total_area_px"] == by_tiff.sum()
    tiff_report = client.post("/segment", files=as_file([("phantom.tif", tiff(PHANTOM))])).json()
    assert tiff_report["sequences_given"] == ["pre-contrast", "FLAIR", "post-contrast"]


def test_the_same_sequences_in_the_fields_and_flair_standing_in_for_a_missing_one(client):
    by_tiff = masks(client, as_file([("phantom.tif", tiff(PHANTOM))]))
    fields = {"post_contrast": series(2), "flair": series(1), "pre_contrast": series(0)}
    np.testing.assert_array_equal(masks(client, as_fields(fields)), by_tiff)  # no descriptions needed

    without_pre = {"flair": series(1), "post_contrast": series(2)}
    expected = masks(client, as_file([("filled.tif", tiff(PHANTOM[..., [1, 1, 2]]))]))
    assert (expected != by_tiff).mean() > 0.01
    np.testing.assert_array_equal(masks(client, as_fields(without_pre)), expected)
    report = client.post("/segment", files=as_fields(without_pre)).json()
    assert (report["sequences_given"], report["input_channels"]) == (["FLAIR", "post-contrast"], 3)

    alone = client.post("/segment", files=as_fields({"flair": series(1)})).json()
    assert (alone["sequences_given"], alone["input_channels"]) == (["FLAIR"], 1)
    one_series = client.post("/segment", files=as_file(described_series(1))).json()  # one series under `file`, as ever
    assert (one_series["sequences_given"], one_series["input_channels"]) == (["FLAIR"], 1)


# --- refusals -------------------------------------------------------------------------------------------------------

MISMATCHES = [  # id, post-contrast series, words of the answer
    ("positions", lambda: series(2, z0=2.5), ("'post2.dcm' and 2 more (post-contrast)", "slice positions")),
    ("orientation", lambda: series(2, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]), ("orientation",)),
    ("spacing", lambda: series(2, PixelSpacing=[0.6, 0.8]), ("pixel spacing of 0.6 x 0.8 mm",)),
    ("slices", lambda: series(2)[:2], ("has 2 slice(s), FLAIR 3",)),
    ("size", lambda: [(n, dcm(mr(PHANTOM[0, :20, :, 2], z=z))) for z, n in enumerate("abc")], ("20x32", "24x32")),
    ("tiff-beside-dicom", lambda: [("post.tif", tiff(np.zeros((SLICES, ROWS, COLS + 1, 3), np.uint8)))], ("24x33",)),
]


@pytest.mark.parametrize(("post", "words"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
def test_sequences_that_are_not_the_same_slices_are_a_422_naming_what_differs(client, post, words):
    response = client.post("/segment", files=as_fields({"flair": series(1), "post_contrast": post()}))
    refused(response, 422, "resample to FLAIR", *words)


ASK = "send one series, or the sequences in the fields pre_contrast, flair, post_contrast"


@pytest.mark.parametrize(
    ("descriptions", "words"),
    [
        (("T1 by Dr Smith", "T1", "FLAIR"), ("not name pre-contrast T1, FLAIR and post-contrast T1 one each",)),
        (("T1 pre", "T2 TSE Smith", "T1 post Gd"), ("'flair2.dcm' and 2 more: not recognised",)),
        (("AX T1 FLAIR", "AX T2 FLAIR", "AX T1 FLAIR +C"), ("not recognised",)),  # T1 FLAIR is not FLAIR
        (("T1 pre", "FLAIR"), ("holds 2 DICOM series",)),
    ],
    ids=["two-t1-without-contrast", "t2-instead-of-flair", "t1-flair", "two-series"],
)
def test_several_series_that_are_not_the_three_sequences_are_a_422_asking_for_the_fields(client, descriptions, words):
    study = [f for channel, text in enumerate(descriptions) for f in series(channel, text)]
    detail = refused(client.post("/segment/mask", files=as_file(study)), 422, ASK, *words)
    assert "Smith" not in detail  # tag values never reach a message


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"file": series(1), "flair": series(1)}, ("not both",)),
        ({"pre_contrast": series(0), "post_contrast": series(2)}, ("'flair' is missing",)),
        ({"image": series(1)}, ("no 'file' field", "'pre_contrast', 'flair', 'post_contrast'")),
        ({"flair": [("rgb.tif", tiff(PHANTOM))]}, ("(FLAIR) is a colour image of several sequences",)),
    ],
    ids=["file-and-fields", "no-flair", "other-field", "colour-image-as-one-sequence"],
)
def test_forms_of_the_wrong_fields_are_a_422(client, fields, words):
    refused(client.post("/segment", files=as_fields(fields)), 422, *words)


def test_the_body_limits_hold_across_the_fields(client):
    third = [("x.dcm", bytes(800_000))]  # each under the 2 MiB limit, together over it
    response = client.post("/segment", files=as_fields({"pre_contrast": third, "flair": third, "post_contrast": third}))
    refused(response, 413, "larger than the limit of 2097152 bytes")
    tiny = [("x.dcm", b"x")] * 400  # 1200 parts over three fields, the limit is 1024 parts
    response = client.post("/segment", files=as_fields({"pre_contrast": tiny, "flair": tiny, "post_contrast": tiny}))
    refused(response, 413, "more than 1024 parts")


# --- metaseg.imageio.sequences ------------------------------------------------------------------------------------------


def test_decoding_limits_are_shared_by_the_sequences():
    by_sequence = {"pre-contrast": series(0), "FLAIR": series(1), "post-contrast": series(2)}
    one = decode(by_sequence["FLAIR"])
    needed = SLICES * ROWS * COLS * (2 + 8)  # 16-bit samples, + the frame and its probability map as float32
    assert sequences.stack({"FLAIR": by_sequence["FLAIR"]}, Limits(max_decoded_bytes=needed)).frames[0].shape == \
        one.frames[0].shape
    with pytest.raises(TooLarge, match="limit of 15360 bytes"):  # a third of the budget each: FLAIR alone would fit
        sequences.stack(by_sequence, Limits(max_decoded_bytes=2 * needed))
    with pytest.raises(TooLarge, match="more than the limit of 0 s"):
        sequences.stack(by_sequence, Limits(max_seconds=0))
    stacked = sequences.stack(by_sequence, Limits(max_decoded_bytes=3 * needed))
    assert [s.shape for s in stacked.inputs] == [(3, ROWS, COLS)] * SLICES and stacked.is_volume
    np.testing.assert_array_equal(np.stack(stacked.inputs), np.moveaxis(PHANTOM, -1, 1).astype(np.float32))
    np.testing.assert_array_equal(np.stack(stacked.frames), np.stack(one.frames))  # FLAIR's frames, in series order


def described(text: str | None, **attrs) -> Dataset:
    ds = Dataset()
    if text is not None:
        ds.SeriesDescription = text
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("ds", "sequence"),
    [
        (described("T2_FLAIR_tra"), "FLAIR"),
        (described("t2_tirm_tra_dark-fluid"), "FLAIR"),
        (described("AX FLAIR pre"), "FLAIR"),
        (described("T1 pre-contrast"), "pre-contrast"),
        (described("T1 without contrast"), "pre-contrast"),
        (described("3D MPRAGE"), "pre-contrast"),
        (described("AX T1 SE"), "pre-contrast"),
        (described("T1_MPRAGE_POST"), "post-contrast"),
        (described("Ax T1 +C"), "post-contrast"),
        (described("T1CE"), "post-contrast"),
        (described("t1_fl3d_tra KM"), "post-contrast"),
        (described("T1 post-contrast"), "post-contrast"),
        (described("AX T1 SE", ContrastBolusAgent="Gadovist"), "post-contrast"),
        (described(None, ProtocolName="T1 Gd"), "post-contrast"),
        (described("T1 pre", ContrastBolusAgent="Gadovist"), None),  # says pre, has an agent
        (described("T1 pre post"), None),
        (described("AX T1 FLAIR"), None),  # T1-weighted FLAIR: not the network's FLAIR
        (described("FLAIR post Gd"), None),
        (described("T2 TSE"), None),
        (described("DWI b1000"), None),
        (described("Posterior fossa T2"), None),
        (described(None), None),
    ],
)
def test_a_series_is_recognised_only_from_an_unambiguous_description(ds, sequence):
    assert sequences.sequence_of(ds) == sequence


def test_stack_refuses_what_is_not_the_same_slices_without_a_server():
    with pytest.raises(Mismatch, match="FLAIR is missing"):
        sequences.stack({"pre-contrast": series(0)})
    with pytest.raises(Mismatch, match=r"\(pre-contrast\) has slice 0 .* away from FLAIR's"):
        sequences.stack({"pre-contrast": series(0, z0=1.0), "FLAIR": series(1)})
    with pytest.raises(Mismatch, match="holds 2 DICOM series"):
        sequences.decode(described_series(0) + described_series(1))
