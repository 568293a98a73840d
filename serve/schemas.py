"""Response models: what each route returns, as documented in OpenAPI at /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    detail: str = Field(description="what is wrong with the request, in one line")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str = Field(description="bundle folder name of the loaded model")
    version: str = Field(description="bundle version (metadata.json)")
    busy: int = Field(description="received requests running or waiting for an inference thread")
    capacity: int = Field(description="inference threads + queue places; a received request beyond it gets 503")


class UploadLimits(BaseModel):
    max_upload_bytes: int
    max_pixels: int = Field(description="per frame (rows x columns)")
    max_frames: int = Field(description="per upload, all files together")
    max_decoded_bytes: int = Field(
        description="memory budget per upload: frames x rows x columns x (samples x bytes per sample + 8)"
    )


class InputSpec(BaseModel):
    channels: int = Field(description="network input channels")
    channel_def: dict[str, str] = Field(description="what each input channel holds, e.g. {'1': 'FLAIR'}")
    spatial_size: int = Field(description="every slice is resized to spatial_size x spatial_size for the network")
    channel_rule: str = Field(description="how an upload's channels become the network's input channels")
    formats: list[str]
    limits: UploadLimits


class InferenceSteps(BaseModel):
    """The bundle's inference steps (`inference_steps` in configs/inference.json), chosen by `metaseg cv` on
    out-of-fold predictions. An upload of several slices (a DICOM series or multi-frame file, a NIfTI, a multi-page
    TIFF) is a volume and gets all of them; a single 2D slice gets flip_tta and the threshold only."""

    flip_tta: bool = Field(description="lesion probabilities averaged with those of the left-right mirrored slice")
    threshold: float = Field(description="the default threshold: lesion where the probability is at least this")
    min_lesion_voxels: int = Field(description="volumes without a known spacing: lesions (3D connected components) "
                                   "under this many voxels are dropped (0: off)")
    min_lesion_mm3: float = Field(description="volumes with a known spacing: lesions under this volume are dropped "
                                  "(0: off)")
    largest_component: bool = Field(description="volumes: only the largest lesion is kept (only for a bundle that "
                                    "declares one lesion per patient)")


class ModelInfo(BaseModel):
    model: str = Field(description="bundle folder name")
    title: str = Field(description="bundle name in metadata.json")
    architecture: str = Field(description="network class the bundle instantiates")
    version: str
    description: str
    intended_use: str
    input: InputSpec
    inference_steps: InferenceSteps
    test_metrics: dict[str, float] | None = Field(
        description="means on patients the model never trained on, from the report the best-model record names: test split of `metaseg compare`, or out-of-fold of a complete `metaseg cv`; null if none"
    )


class ImageSize(BaseModel):
    rows: int
    cols: int


class Point(BaseModel):
    row: float
    col: float


class BoundingBox(BaseModel):
    """Pixel rows and columns, both ends inclusive."""

    row_min: int
    col_min: int
    row_max: int
    col_max: int


class Lesion(BaseModel):
    slice_index: int = Field(description="0-based index of the slice in series order")
    area_px: int
    area_mm2: float | None = Field(description="from PixelSpacing; null when the input has none")
    centroid: Point
    bbox: BoundingBox
    max_probability: float


class SegmentationReport(BaseModel):
    model: str
    kind: str = Field(description="input format: png, jpeg, tiff, dicom or nifti")
    image_size: ImageSize
    slices: int
    input_channels: Literal[1, 3] = Field(
        description="what the network was given: 3 = the upload's pre-contrast, FLAIR and post-contrast channels; "
        "1 = one channel, taken as FLAIR (a model of three sequences gets it in all three)"
    )
    sequences_given: list[Literal["pre-contrast", "FLAIR", "post-contrast"]] = Field(
        description="the sequences the network got from the upload, in its channel order; FLAIR stood in for the "
        "others (a one-channel upload: FLAIR alone)"
    )
    threshold: float = Field(description="lesion where the probability is at least this")
    volume_steps: bool = Field(
        description="whether the component steps of /info `inference_steps` (min_lesion_voxels, largest_component) "
        "were applied: only to an upload of several slices, and only when one of them is on"
    )
    pixel_spacing_mm: tuple[float, float] | None = Field(description="(row, column) spacing; null when unknown")
    slice_thickness_mm: float | None
    lesion_count: int = Field(description="connected components (8-connected) of the final mask, counted per slice")
    lesions: list[Lesion]
    total_area_px: int
    total_area_mm2: float | None
    volume_ml: float | None = Field(description="total area x slice thickness; null when either is unknown")
    max_probability: float = Field(description="highest lesion probability over all slices")
    inference_ms: float = Field(description="time spent in the network and its pre/postprocessing")
