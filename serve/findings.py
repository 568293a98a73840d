"""Lesions of an upload's final masks (metaseg.postprocess.upload_masks): 2D connected components per slice, measured
in pixels and mm, with the highest lesion probability inside each."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from skimage.measure import label, regionprops

from metaseg.imageio import Volume
from metaseg.postprocess import has_volume_steps
from serve.schemas import BoundingBox, ImageSize, Lesion, Point, SegmentationReport


def lesions(mask: np.ndarray, probability: np.ndarray, slice_index: int, pixel_mm2: float | None) -> list[Lesion]:
    """The 8-connected components of one slice's mask, in scan order."""
    found = []
    for region in regionprops(label(mask, connectivity=2), intensity_image=probability):
        row_min, col_min, row_end, col_end = region.bbox
        area = int(region.area)
        found.append(
            Lesion(
                slice_index=slice_index,
                area_px=area,
                area_mm2=area * pixel_mm2 if pixel_mm2 is not None else None,
                centroid=Point(row=region.centroid[0], col=region.centroid[1]),
                bbox=BoundingBox(row_min=row_min, col_min=col_min, row_max=row_end - 1, col_max=col_end - 1),
                max_probability=float(region.intensity_max),
            )
        )
    return found


def report(
    volume: Volume, probabilities: list[np.ndarray], masks: np.ndarray, steps: Mapping, model: str, inference_ms: float
) -> SegmentationReport:
    """The findings of an upload from its masks, made with `steps` (the threshold and volume steps are reported)."""
    spacing = volume.pixel_spacing_mm
    pixel_mm2 = spacing[0] * spacing[1] if spacing else None
    found = [lesion for index, (m, p) in enumerate(zip(masks, probabilities))
             for lesion in lesions(m, p, index, pixel_mm2)]
    total_px = sum(lesion.area_px for lesion in found)
    total_mm2 = total_px * pixel_mm2 if pixel_mm2 is not None else None
    thickness = volume.slice_thickness_mm
    rows, cols = volume.frames[0].shape
    return SegmentationReport(
        model=model,
        kind=volume.kind,
        image_size=ImageSize(rows=rows, cols=cols),
        slices=len(volume.frames),
        input_channels=volume.channels,
        sequences_given=list(volume.sequences_given),
        threshold=steps["threshold"],
        volume_steps=volume.is_volume and has_volume_steps(steps),
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        lesion_count=len(found),
        lesions=found,
        total_area_px=total_px,
        total_area_mm2=total_mm2,
        volume_ml=total_mm2 * thickness / 1000 if total_mm2 is not None and thickness else None,
        max_probability=max(float(p.max()) for p in probabilities),
        inference_ms=inference_ms,
    )
