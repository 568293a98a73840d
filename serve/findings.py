"""The findings of an upload from its final masks (metaseg.inference.steps.upload_masks): the lesion table, and each
slice's lesion cross-sections.

A lesion is metaseg.inference.lesions': a 3D connected component of a volume's mask stack, measured there (voxels,
mm3, the RANO-BM longest diameter). Unrelated slices (several pictures uploaded together) are measured one by one, each
component a lesion of one slice, so nothing joins slices that were never neighbours. The volume in mL is the lesions'
volume: only a volume with a known spacing has one (per-slice areas added over slices are not a volume, and a single
slice has none).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from skimage.measure import label, regionprops

from metaseg.inference import lesions
from metaseg.imageio.volume import Volume
from metaseg.inference.steps import applied_volume_steps
from serve.schemas import (
    BoundingBox,
    ImageSize,
    Lesion3D,
    Point,
    SegmentationReport,
    SliceComponent,
    VoxelPoint,
)



def slice_components(mask: np.ndarray, probability: np.ndarray, slice_index: int,
                     pixel_mm2: float | None) -> list[SliceComponent]:
    """The 8-connected components of one slice's mask, in scan order."""
    found = []
    for region in regionprops(label(mask, connectivity=2), intensity_image=probability):
        row_min, col_min, row_end, col_end = region.bbox
        area = int(region.area)
        found.append(
            SliceComponent(
                slice_index=slice_index,
                area_px=area,
                area_mm2=area * pixel_mm2 if pixel_mm2 is not None else None,
                centroid=Point(row=region.centroid[0], col=region.centroid[1]),
                bbox=BoundingBox(row_min=row_min, col_min=col_min, row_max=row_end - 1, col_max=col_end - 1),
                max_probability=float(region.intensity_max),
            )
        )
    return found


def lesion_table(volume: Volume, probabilities: np.ndarray, masks: np.ndarray) -> list[Lesion3D]:
    """The lesions of a volume's stack, or of unrelated slices one slice at a time, numbered 1.. in series order."""
    return [_lesion3d(found) for found in lesions.measure_upload(masks, probabilities, volume.pixel_spacing_mm,
                                                                 volume.slice_thickness_mm, volume.is_volume)]


def _lesion3d(found: lesions.Lesion) -> Lesion3D:
    """A measured lesion as the report states it."""
    slices = list(found.slices)
    row_min, col_min, row_max, col_max = found.bbox
    return Lesion3D(
        id=found.id,
        slices=slices,
        first_slice=slices[0],
        last_slice=slices[-1],
        voxels=found.voxels,
        volume_mm3=found.volume_mm3,
        longest_diameter_px=found.longest_diameter_px,
        longest_diameter_mm=found.longest_diameter_mm,
        diameter_slice=found.diameter_slice,
        measurable=found.measurable,
        max_probability=found.max_probability,
        mean_probability=found.mean_probability,
        centroid=VoxelPoint(slice=found.centroid[0], row=found.centroid[1], col=found.centroid[2]),
        bbox=BoundingBox(row_min=row_min, col_min=col_min, row_max=row_max, col_max=col_max),
    )


def volume_steps(steps: Mapping, volume: Volume) -> list[str]:
    """The component steps upload_masks applied to this upload (metaseg.inference.steps.applied_volume_steps)."""
    return applied_volume_steps(steps, volume.is_volume, volume.voxel_mm3)


def report(
    volume: Volume, probabilities: list[np.ndarray], masks: np.ndarray, steps: Mapping, model: str, inference_ms: float
) -> SegmentationReport:
    """The findings of an upload from its masks, made with `steps` (the threshold and volume steps are reported)."""
    spacing = volume.pixel_spacing_mm
    pixel_mm2 = spacing[0] * spacing[1] if spacing else None
    components = [component for index, (m, p) in enumerate(zip(masks, probabilities))
                  for component in slice_components(m, p, index, pixel_mm2)]
    table = lesion_table(volume, np.stack(probabilities), masks)
    total_px = sum(component.area_px for component in components)
    with_volume = volume.voxel_mm3 is not None  # a volume with a known spacing
    rows, cols = volume.frames[0].shape
    return SegmentationReport(
        model=model,
        kind=volume.kind,
        volume=volume.is_volume,
        image_size=ImageSize(rows=rows, cols=cols),
        slices=len(volume.frames),
        input_channels=volume.channels,
        sequences_given=list(volume.sequences_given),
        threshold=steps["threshold"],
        volume_steps=volume_steps(steps, volume),
        pixel_spacing_mm=spacing,
        slice_thickness_mm=volume.slice_thickness_mm,
        lesion_count=len(table),
        lesions=table,
        volume_ml=sum(lesion.volume_mm3 for lesion in table) / 1000 if with_volume else None,
        slice_components=components,
        total_area_px=total_px,
        total_area_mm2=total_px * pixel_mm2 if pixel_mm2 is not None else None,
        max_probability=max(float(p.max()) for p in probabilities),
        inference_ms=inference_ms,
    )
