"""Segment an upload: lesion findings as JSON, one slice's mask or overlay as PNG, all slices' masks as DICOM SEG or
NIfTI, or all slices' lesion probabilities (NPZ) for a client that thresholds and measures them itself.

Each route reads the upload in memory (serve.uploads), then, once a pool thread is free (serve.pool), decodes
(`_decode`, the one place an upload becomes a Volume) and encodes the answer on it, with the model run in between on
the model thread (serve.pool.on_model_thread), so the event loop keeps answering /health while the CPU works.
Decoding and inference each have a time limit, checked between frames and between batches of slices: a file too
costly to decode is refused as the client's (413), inference past its deadline as the server's load (503 +
Retry-After, as a full queue). Nothing is written to disk: every answer is built in memory.

Masks are the bundle's chosen inference steps (metaseg.inference.steps.upload_masks, as `metaseg predict` makes them),
with the request's `threshold` in place of the chosen one when given: a volume (metaseg.imageio: a DICOM series or
multi-frame file, a NIfTI, one multi-page TIFF) gets the component steps; a single slice, and several pictures
uploaded together, do not.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, HTTPException, Response

from metaseg.inference.engine import Engine
from metaseg.imageio.nifti import to_nifti_bytes
from metaseg.imageio.picture import to_png_bytes
from metaseg.imageio.volume import Volume
from metaseg.inference.steps import has_volume_steps, upload_masks, with_threshold
from serve import dicomseg, findings
from serve.config import Settings
from serve.deps import EngineDep, PoolDep, SettingsDep, SliceIndex, Threshold, Upload
from serve.errors import ERROR_RESPONSES
from serve.overlay import overlay_png
from serve.pool import Busy, on_model_thread
from serve.schemas import SegmentationReport
from serve.uploads import REQUEST_BODY, Form

log = logging.getLogger(__name__)


router = APIRouter(prefix="/segment", tags=["segment"], responses=ERROR_RESPONSES)


class PNGResponse(Response):
    media_type = "image/png"


class DICOMResponse(Response):
    media_type = "application/dicom"


class NPZResponse(Response):
    media_type = "application/octet-stream"


class GzipResponse(Response):
    media_type = "application/gzip"


@router.post("", response_model=SegmentationReport, openapi_extra=REQUEST_BODY)
async def segment(
    files: Upload, engine: EngineDep, pool: PoolDep, settings: SettingsDep, threshold: Threshold = None
) -> SegmentationReport:
    """The lesion table: per lesion (a 3D connected component of a volume's mask; of unrelated slices, a component of
    one slice) the slices it spans, its volume in mm³, its longest axial diameter and whether RANO-BM counts it
    measurable (>= 10 mm), its highest probability; their count and total volume in mL (a volume with known spacing
    only), and each slice's lesion cross-sections (`slice_components`)."""
    return await pool.run(_report, engine, files, settings, threshold)


@router.post("/mask", response_class=PNGResponse, openapi_extra=REQUEST_BODY)
async def mask(
    files: Upload,
    engine: EngineDep,
    pool: PoolDep,
    settings: SettingsDep,
    threshold: Threshold = None,
    slice_index: SliceIndex = 0,
) -> PNGResponse:
    """The 0/255 lesion mask of one slice as a gray PNG, at the input's own size and orientation.

    A PNG holds one slice, so for a series, a multi-frame DICOM or a NIfTI volume the `slice` query picks it:
    0-based, in series order (POST /segment's `slice_index` and lesion `slices`), default 0; past the last slice is a
    422.
    It is that slice of the volume's mask (the whole volume is segmented when a component step is on).
    All slices at once: POST /segment/nifti, or /segment/seg for DICOM input.
    """
    return PNGResponse(await pool.run(_mask_png, engine, files, settings, threshold, slice_index))


@router.post("/overlay", response_class=PNGResponse, openapi_extra=REQUEST_BODY)
async def overlay(
    files: Upload,
    engine: EngineDep,
    pool: PoolDep,
    settings: SettingsDep,
    threshold: Threshold = None,
    slice_index: SliceIndex = 0,
) -> PNGResponse:
    """One slice as an RGB PNG: gray, windowed to its 1st-99th percentile, with the lesion in semi-transparent
    red and a red contour. `slice` picks the slice as for /segment/mask."""
    return PNGResponse(await pool.run(_overlay_png, engine, files, settings, threshold, slice_index))


@router.post("/seg", response_class=DICOMResponse, openapi_extra=REQUEST_BODY)
async def seg(
    files: Upload, engine: EngineDep, pool: PoolDep, settings: SettingsDep, threshold: Threshold = None
) -> DICOMResponse:
    """A DICOM Segmentation (BINARY, one segment coded as what the model learnt, from its bundle's metadata.json
    `segment_label`) with one frame per uploaded slice, referencing the uploaded instances. DICOM input only (else
    415).

    Geometry is the source's: plane positions where it has a frame of reference and positions. A single frame
    without them (e.g. Secondary Capture) gets a SEG without plane positions, aligned pixel for pixel. Several
    frames without them, or an image lacking the FrameOfReferenceUID its IOD requires, is a 422: the frames
    could not be told apart, or geometry would have to be invented.
    """
    return DICOMResponse(await pool.run(_seg_bytes, engine, files, settings, threshold))


@router.post("/nifti", response_class=GzipResponse, openapi_extra=REQUEST_BODY)
async def nifti(
    files: Upload, engine: EngineDep, pool: PoolDep, settings: SettingsDep, threshold: Threshold = None
) -> GzipResponse:
    """The final 0/1 mask of every slice as one NIfTI-1 image (.nii.gz, uint8), any input format.

    A NIfTI upload's mask is on its own grid: the same shape, voxel order and affine (of FLAIR's, for sequences sent
    in fields), so that it stacks onto the input voxel for voxel. Otherwise geometry is the source's where it has one
    (DICOM positions, orientation and spacing), else the pixel spacing and slice thickness where known, else 1 mm.
    Reading it back with metaseg.imageio gives the masks in series order (for a DICOM series, when its slices are axial
    as usually stored)."""
    return GzipResponse(await pool.run(_nifti_bytes, engine, files, settings, threshold))


@router.post("/probabilities", response_class=NPZResponse, openapi_extra=REQUEST_BODY)
async def probabilities(files: Upload, engine: EngineDep, pool: PoolDep, settings: SettingsDep) -> NPZResponse:
    """The lesion probability of every pixel of every slice, before any threshold or component step, as an NPZ
    (`numpy.savez_compressed`; read it with `numpy.load(io.BytesIO(body), allow_pickle=False)`) holding
    `probability`: uint8 (slices, rows, cols) = round(255 p), in series order, at the input's own size.

    A client that keeps it can change the threshold without asking again: `metaseg.inference.steps.upload_masks(
    probability / 255, steps, volume.is_volume, volume.voxel_mm3)` with the steps of GET /info and the upload decoded
    by metaseg.imageio, then `metaseg.inference.lesions.measure`, is what POST /segment does."""
    return NPZResponse(await pool.run(_probabilities_npz, engine, files, settings))


# --- the blocking work, run on a pool thread ----------------------------------------------------------------


def _decode(files: Form, settings: Settings) -> Volume:
    """The upload as one Volume, under the server's limits: every route decodes here (metaseg.imageio.sequences for the
    sequence fields or a DICOM study of three sequence series, else metaseg.imageio)."""
    return files.volume(settings.limits())


def _infer(engine: Engine, frames: list[np.ndarray], limit_s: float) -> tuple[list[np.ndarray], float]:
    """Probabilities of all frames, and the milliseconds they took; Busy (503) once past `limit_s`: the time depends
    on the server's load as much as on the upload.

    A batch of the engine's `batch_size` slices at a time (its measured fastest), on the model thread (serve.pool):
    every fold model's forward takes the whole batch at once, the time limit is checked between batches, and another
    request's batch may go between two of this one's."""
    start = time.perf_counter()
    probabilities = []
    for first in range(0, len(frames), engine.batch_size):
        if time.perf_counter() - start > limit_s:
            raise Busy(f"segmenting took more than the limit of {limit_s:g} s; fewer slices take less")
        probabilities += on_model_thread(engine.probabilities, frames[first : first + engine.batch_size])
    return probabilities, (time.perf_counter() - start) * 1000


def _log(route: str, form: Form, volume: Volume, inference_ms: float) -> None:
    """Sizes, kind and timing only: file names and DICOM attributes may identify the patient."""
    rows, cols = volume.frames[0].shape
    size = sum(len(data) for _, data in form.files)
    log.info(
        "%s: %s, %d file(s), %d bytes, %d slice(s) of %dx%d, inference %.0f ms",
        route, volume.kind, len(form.files), size, len(volume.frames), rows, cols, inference_ms,
    )


@dataclass(frozen=True)
class _Segmented:
    probabilities: list[np.ndarray]
    masks: np.ndarray  # bool (slices, rows, cols)
    steps: dict  # the bundle's, with the request's threshold
    inference_ms: float


def _segment(engine: Engine, files: Form, volume: Volume, settings: Settings, threshold: float | None,
             route: str) -> _Segmented:
    """Probabilities and final masks of every slice of a decoded upload."""
    probabilities, ms = _infer(engine, volume.inputs, settings.inference_timeout_s)
    _log(route, files, volume, ms)
    steps = with_threshold(engine.inference_steps, threshold)
    return _Segmented(probabilities, upload_masks(probabilities, steps, volume.is_volume, volume.voxel_mm3), steps, ms)


def _report(engine: Engine, files: Form, settings: Settings, threshold: float | None) -> SegmentationReport:
    volume = _decode(files, settings)
    done = _segment(engine, files, volume, settings, threshold, "segment")
    return findings.report(volume, done.probabilities, done.masks, done.steps, engine.name, done.inference_ms)


def _one_slice(
    engine: Engine, files: Form, settings: Settings, threshold: float | None, index: int, route: str
) -> tuple[np.ndarray, np.ndarray]:
    """(frame, mask) of the slice `index`: the volume's mask there, computing that slice alone when no component
    step is on (then a slice's mask depends on that slice only)."""
    volume = _decode(files, settings)
    if index >= len(volume.frames):
        count = len(volume.frames)
        raise HTTPException(422, f"slice {index} does not exist: the upload has {count} slice(s), 0 to {count - 1}")
    steps = with_threshold(engine.inference_steps, threshold)
    whole = volume.is_volume and has_volume_steps(steps)
    probabilities, ms = _infer(engine, volume.inputs if whole else [volume.inputs[index]], settings.inference_timeout_s)
    _log(route, files, volume, ms)
    return volume.frames[index], upload_masks(probabilities, steps, whole, volume.voxel_mm3)[index if whole else 0]


def _mask_png(engine: Engine, files: Form, settings: Settings, threshold: float | None, index: int) -> bytes:
    _, lesion = _one_slice(engine, files, settings, threshold, index, "segment/mask")
    return to_png_bytes(lesion)


def _overlay_png(engine: Engine, files: Form, settings: Settings, threshold: float | None, index: int) -> bytes:
    return overlay_png(*_one_slice(engine, files, settings, threshold, index, "segment/overlay"))


def _seg_bytes(engine: Engine, files: Form, settings: Settings, threshold: float | None) -> bytes:
    volume = _decode(files, settings)
    if volume.kind != "dicom":
        raise HTTPException(415, f"a DICOM SEG references DICOM instances; this upload is {volume.kind}")
    masks = _segment(engine, files, volume, settings, threshold, "segment/seg").masks
    version = str(engine.metadata.get("version", ""))
    try:
        return dicomseg.segmentation(volume, masks, engine.name, version, dicomseg.finding(engine.metadata))
    except dicomseg.UnreferenceableSource as err:
        raise HTTPException(422, f"cannot build a DICOM SEG for this upload: {err}") from None


def _nifti_bytes(engine: Engine, files: Form, settings: Settings, threshold: float | None) -> bytes:
    volume = _decode(files, settings)
    return to_nifti_bytes(_segment(engine, files, volume, settings, threshold, "segment/nifti").masks, volume)


def _probabilities_npz(engine: Engine, files: Form, settings: Settings) -> bytes:
    volume = _decode(files, settings)
    probabilities, ms = _infer(engine, volume.inputs, settings.inference_timeout_s)
    _log("segment/probabilities", files, volume, ms)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probability=np.round(np.stack(probabilities) * 255).astype(np.uint8))
    return buffer.getvalue()
