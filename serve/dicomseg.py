"""The mask as a DICOM Segmentation (highdicom) that references the uploaded instances, for PACS and viewers.

The one segment says what the model learnt, as its bundle states it (`Finding`, from metadata.json `segment_label`):
the shipped weights learnt FLAIR abnormality of lower-grade gliomas, so their segment is a "Lesion" labelled "FLAIR
abnormality (LGG-trained model)", not a metastasis.

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
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import metaseg
from metaseg.errors import UserError
from metaseg.imageio.volume import Volume

log = logging.getLogger(__name__)

REFUSED = "highdicom refused the source images (geometry, series or attributes a DICOM SEG requires)"
METADATA_KEY = "segment_label"  # in a bundle's configs/metadata.json


@dataclass(frozen=True)
class Finding:
    """What the segment holds: its SegmentLabel (at most 64 characters), a free-text SegmentDescription, and its codes
    (category from CID 7150, type from CID 7151, optionally an anatomic region)."""

    label: str
    description: str
    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    anatomic_region: hd.sr.CodedConcept | None = None


# A bundle that does not say what it learnt: a lesion, and nothing more.
LESION = Finding("lesion", "", hd.sr.CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure),
                 hd.sr.CodedConcept.from_code(codes.SCT.Lesion))


def finding(metadata: Mapping) -> Finding:
    """The bundle's `segment_label` (metadata.json) as a Finding, LESION where it has none; a malformed entry is a
    UserError naming the key (the server checks it at startup, so that no SEG request fails on it).

        "segment_label": {"label": ..., "description": ...,
                          "category": {"code": ..., "scheme": ..., "meaning": ...}, "type": {...},
                          "anatomic_region": {...}}     (anatomic_region optional)
    """
    entry = metadata.get(METADATA_KEY)
    if entry is None:
        return LESION
    try:
        label = str(entry["label"])
        if not 0 < len(label) <= 64:
            raise ValueError(f"label must have 1 to 64 characters, has {len(label)}")
        region = _concept(entry["anatomic_region"]) if "anatomic_region" in entry else None
        return Finding(label, str(entry.get("description", "")), _concept(entry["category"]), _concept(entry["type"]),
                       region)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"configs/metadata.json {METADATA_KEY} is not usable ({type(err).__name__}: {err}); it needs "
                        f"a label and category/type codes with code, scheme and meaning") from None


def _concept(code: Mapping) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(str(code["code"]), str(code["scheme"]), str(code["meaning"]))

# Type 2 attributes highdicom copies from the source; a file that omits them gets them empty, as type 2 allows.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class UnreferenceableSource(Exception):
    """The uploaded DICOM cannot be referenced by a SEG; the message says why."""


def segmentation(volume: Volume, masks: np.ndarray, model: str, model_version: str, what: Finding = LESION) -> bytes:
    """A BINARY SEG with one segment (`what` the model finds) over all `masks` (frames, rows, cols) of a decoded
    DICOM upload (one multi-frame dataset, or one dataset per slice, in series order)."""
    datasets = volume.datasets
    if "FrameOfReferenceUID" not in datasets[0] and len(masks) > 1:  # highdicom would keep only the first frame
        raise UnreferenceableSource(f"{len(masks)} frames without a frame of reference cannot be told apart")
    for ds in datasets:
        missing = [keyword for keyword in _REQUIRED_UIDS if not ds.get(keyword)]
        if missing:
            raise UnreferenceableSource(f"the DICOM source has no {', '.join(missing)}")
    try:
        return _encode(volume, masks, model, model_version, what)
    except Exception as err:  # any failure of highdicom or of writing: the source is what it could not handle
        log.info("DICOM SEG refused: %s", type(err).__name__)
        raise UnreferenceableSource(REFUSED) from None


def _encode(volume: Volume, masks: np.ndarray, model: str, model_version: str, what: Finding) -> bytes:
    datasets = volume.datasets
    for ds in datasets:
        for keyword in _TYPE2_SOURCE_ATTRIBUTES:  # the request's own datasets, discarded after it
            if keyword not in ds:
                setattr(ds, keyword, None)
        if not ds.get("SliceThickness") and volume.slice_thickness_mm:  # measured from the slice positions
            ds.SliceThickness = round(volume.slice_thickness_mm, 6)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=what.label,
        segmented_property_category=what.category,
        segmented_property_type=what.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model, family=codes.cid7162.ArtificialIntelligence, version=model_version
        ),
        anatomic_regions=[what.anatomic_region] if what.anatomic_region else None,
    )
    if what.description:
        segment.SegmentDescription = what.description[:1024]  # type 3, ST
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
        content_description=what.label,
        omit_empty_frames=False,  # one SEG frame per source frame, lesion or not
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()
