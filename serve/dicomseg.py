"""The mask as a DICOM Segmentation (highdicom) that references the uploaded instances, for PACS and viewers.

One SEG frame per source frame, lesion or not, in series order. Geometry only as the source has it:
- a frame of reference and plane positions: the SEG carries them; SliceThickness, which it then requires, is
  taken from the spacing of the slice positions when the source omits it (as metaseg.imageio measures it);
- one frame without a frame of reference (e.g. Secondary Capture) or without position/orientation: a SEG
  without plane positions, aligned pixel for pixel with its source frame (standard-conformant; highdicom 0.28's
  own reader still asks for a SliceThickness such a SEG need not have, pydicom reads it);
- several frames or slices without frame of reference or positions, or an image lacking the
  FrameOfReferenceUID its IOD requires: refused (UnreferenceableSource, a 422), since the frames could not be
  told apart and geometry would have to be invented.
Whatever else highdicom refuses or fails on becomes the same 422 with one fixed message: its own messages may
quote attribute values of the source, and only the exception's type is logged.
Type 2 patient/study attributes that a source omits are added empty, as type 2 allows.
"""

from __future__ import annotations

import io
import logging

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import metaseg
from metaseg.imageio import Volume

log = logging.getLogger(__name__)

REFUSED = "highdicom refused the source images (geometry, series or attributes a DICOM SEG requires)"
METASTASIS = hd.sr.CodedConcept("14799000", "SCT", "Neoplasm, metastatic")
ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")

# Type 2 attributes highdicom copies from the source; a file that omits them gets them empty, as type 2 allows.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class UnreferenceableSource(Exception):
    """The uploaded DICOM cannot be referenced by a SEG; the message says why."""


def segmentation(volume: Volume, masks: np.ndarray, model: str, model_version: str) -> bytes:
    """A BINARY SEG with one segment (metastatic neoplasm) over all `masks` (frames, rows, cols) of a decoded
    DICOM upload (one multi-frame dataset, or one dataset per slice, in series order)."""
    datasets = volume.datasets
    if "FrameOfReferenceUID" not in datasets[0] and len(masks) > 1:  # highdicom would keep only the first frame
        raise UnreferenceableSource(f"{len(masks)} frames without a frame of reference cannot be told apart")
    for ds in datasets:
        missing = [keyword for keyword in _REQUIRED_UIDS if not ds.get(keyword)]
        if missing:
            raise UnreferenceableSource(f"the DICOM source has no {', '.join(missing)}")
    try:
        return _encode(volume, masks, model, model_version)
    except Exception as err:  # any failure of highdicom or of writing: the source is what it could not handle
        log.info("DICOM SEG refused: %s", type(err).__name__)
        raise UnreferenceableSource(REFUSED) from None


def _encode(volume: Volume, masks: np.ndarray, model: str, model_version: str) -> bytes:
    datasets = volume.datasets
    for ds in datasets:
        for keyword in _TYPE2_SOURCE_ATTRIBUTES:  # the request's own datasets, discarded after it
            if keyword not in ds:
                setattr(ds, keyword, None)
        if not ds.get("SliceThickness") and volume.slice_thickness_mm:  # measured from the slice positions
            ds.SliceThickness = round(volume.slice_thickness_mm, 6)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="metastasis",
        segmented_property_category=ABNORMAL_STRUCTURE,
        segmented_property_type=METASTASIS,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model, family=codes.cid7162.ArtificialIntelligence, version=model_version
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=masks.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="metaseg",
        manufacturer_model_name=model,
        software_versions=metaseg.__version__,
        device_serial_number="none",
        omit_empty_frames=False,  # one SEG frame per source frame, lesion or not
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()
