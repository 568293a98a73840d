"""The whole upload's mask files, made here from the final masks the viewer shows (the chosen threshold and lesion
score), with the server's own writers: the NIfTI by metaseg.imageio.nifti, the DICOM SEG by serve.dicomseg with the
bundle's segment label from GET /info. The model has already run once for the upload; the files ask it nothing."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from metaseg.errors import UserError
from metaseg.imageio.nifti import to_nifti_bytes
from metaseg.imageio.volume import Volume
from serve import dicomseg


def nifti(masks: np.ndarray, volume: Volume) -> bytes:
    """The masks as a gzipped NIfTI-1 in the upload's geometry, as POST /segment/nifti writes them."""
    return to_nifti_bytes(masks, volume)


def seg(masks: np.ndarray, volume: Volume, info: Mapping) -> bytes:
    """The masks as a DICOM SEG referencing the uploaded instances, as POST /segment/seg writes them; a UserError
    where the source cannot be referenced. The viewer's decoded volume is shared between reruns: the SEG writer adds
    attributes to the datasets it gets, so it gets copies."""
    label = info.get(dicomseg.METADATA_KEY)
    what = dicomseg.finding({dicomseg.METADATA_KEY: label} if label else {})
    own = replace(volume, datasets=tuple(copy.deepcopy(ds) for ds in volume.datasets))
    try:
        return dicomseg.segmentation(own, masks, info["model"], info["version"], what)
    except dicomseg.UnreferenceableSource as err:
        raise UserError(f"cannot build a DICOM SEG for this upload: {err}") from None
