"""The Volume type: the slices of one upload in series order, with their geometry (conventions in
metaseg/imageio/__init__.py), and the size of one voxel."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from metaseg.conventions import FLAIR_CHANNEL, SEQUENCES


def voxel_mm3(pixel_spacing_mm: tuple[float, float] | None, slice_spacing_mm: float | None) -> float | None:
    """Volume of one voxel, or None when the in-plane or the slice spacing is unknown."""
    if pixel_spacing_mm is None or not slice_spacing_mm:
        return None
    return float(pixel_spacing_mm[0] * pixel_spacing_mm[1] * slice_spacing_mm)


@dataclass(frozen=True)
class Volume:
    """The slices of one upload, in series order (see the package docstring for conventions).

    ``source_frame[i]`` is ``(index into the uploaded files, frame index within that file)`` of
    ``frames[i]``. ``datasets`` holds one pydicom Dataset per DICOM file in series order, which is
    the order in which the files first appear in ``source_frame``; it is empty for other kinds.
    """

    kind: str  # 'png' | 'jpeg' | 'tiff' | 'dicom' | 'nifti'
    frames: list[np.ndarray] = field(repr=False)  # 2D float32 (rows, cols), C-contiguous
    source_frame: list[tuple[int, int]] = field(repr=False)
    pixel_spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing)
    slice_thickness_mm: float | None = None
    datasets: tuple[Dataset, ...] = field(default=(), repr=False)
    sequences: list[np.ndarray | None] | None = field(default=None, repr=False)  # per frame (3, rows, cols) or None
    affine: np.ndarray | None = field(default=None, repr=False)  # 4x4: (frame, row, col, 1) -> RAS+ mm; None: unknown
    given: tuple[str, ...] | None = None  # of sequences stacked from separate uploads (imageio.sequences), those sent
    voxel_index: np.ndarray | None = field(default=None, repr=False)  # NIfTI: 4x4 (frame, row, col, 1) -> own voxel

    @property
    def inputs(self) -> list[np.ndarray]:
        """The network input of each frame: the three sequences (3, rows, cols) when every frame has them, else the
        frames; one upload is one kind of input, so the `channels` a report states holds for all its slices."""
        return self.sequences if self.channels == 3 else self.frames

    @property
    def is_volume(self) -> bool:
        """Whether the frames are one volume (a DICOM series or multi-frame file, a NIfTI, one multi-page TIFF), whose
        lesions are 3D (metaseg.inference.lesions); several pictures, or DICOM files without a SeriesInstanceUID,
        uploaded together are unrelated slices."""
        if len(self.frames) < 2:
            return False
        if len({file_index for file_index, _ in self.source_frame}) == 1:
            return True
        # several files: decode has refused DICOM files of different series; each must name its series
        return self.kind == "dicom" and all(ds.get("SeriesInstanceUID") for ds in self.datasets)

    @property
    def voxel_mm3(self) -> float | None:
        """One voxel's volume where the in-plane spacing and the slice thickness are known (a volume only)."""
        return voxel_mm3(self.pixel_spacing_mm, self.slice_thickness_mm) if self.is_volume else None

    @property
    def channels(self) -> int:
        """3 when every frame brought three sequences, else 1 (frames that are one channel are used as FLAIR)."""
        return 3 if self.sequences is not None and all(s is not None for s in self.sequences) else 1

    @property
    def sequences_given(self) -> tuple[str, ...]:
        """The sequences (conventions.SEQUENCES) the network gets from the upload; FLAIR stands in for the others."""
        if self.given is not None:
            return self.given
        return SEQUENCES if self.channels == 3 else (SEQUENCES[FLAIR_CHANNEL],)
