"""Response models: what each route returns, as documented in OpenAPI at /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    detail: str = Field(description="what is wrong with the request, in one line")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str = Field(description="bundle folder name of the loaded model")
    version: str = Field(description="bundle version (metadata.json)")
    busy: int = Field(description="received requests running or waiting for an inference thread")
    capacity: int = Field(description="inference threads + queue places; a received request beyond it gets 503")


class UploadLimits(BaseModel):
    """The server's decoding limits, all of them: metaseg.imageio.limits.request_limits(**these) is what it decodes
    under, and what the viewer decodes under before it sends an upload."""

    max_upload_bytes: int
    max_pixels: int = Field(description="per frame (rows x columns)")
    max_frames: int = Field(description="per upload, all files together")
    max_decoded_bytes: int = Field(
        description="memory budget per upload: frames x rows x columns x (samples x bytes per sample + 8)"
    )
    inflate_factor: int = Field(description="a .nii.gz or deflated DICOM may inflate to this x max_upload_bytes")
    max_dicom_elements: int = Field(description="DICOM data elements per upload, all files together")
    decode_timeout_s: float = Field(description="most seconds to decode an upload")


class InputSpec(BaseModel):
    channels: int = Field(description="network input channels")
    channel_def: dict[str, str] = Field(description="what each input channel holds, e.g. {'1': 'FLAIR'}")
    spatial_size: int = Field(description="every slice is resized to spatial_size x spatial_size for the network")
    channel_rule: str = Field(description="how an upload's channels become the network's input channels")
    formats: list[str]
    limits: UploadLimits


class InferenceSteps(BaseModel):
    """The bundle's inference steps (`inference_steps` in configs/inference.json), chosen by `metaseg cv` on
    out-of-fold predictions. A volume (a DICOM series or multi-frame file, a NIfTI, one multi-page TIFF) gets all of
    them; a single 2D slice, and several pictures uploaded together (unrelated slices), get flip_tta and the
    threshold only."""

    flip_tta: bool = Field(description="lesion probabilities averaged with those of the left-right mirrored slice")
    threshold: float = Field(description="the default threshold: lesion where the probability is at least this")
    min_lesion_voxels: int = Field(description="volumes without a known spacing: lesions (3D connected components) "
                                   "under this many voxels are dropped (0: off)")
    min_lesion_mm3: float = Field(description="volumes with a known spacing: lesions under this volume are dropped "
                                  "(0: off)")
    min_lesion_score: float = Field(description="volumes: lesions whose highest probability (their max_probability) "
                                    "is under this are dropped (0, or a value up to the threshold: off)")
    largest_component: bool = Field(description="volumes: only the largest lesion is kept (only for a bundle that "
                                    "declares one lesion per patient)")


class Code(BaseModel):
    model_config = ConfigDict(coerce_numbers_to_str=True)  # as serve.dicomseg.finding reads a bundle's codes

    code: str
    scheme: str = Field(description="coding scheme designator, e.g. SCT")
    meaning: str


class SegmentLabel(BaseModel):
    """What the model's segment holds, as its bundle states it (metadata.json `segment_label`), for a client that
    writes the DICOM SEG itself (serve.dicomseg.finding reads it)."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    label: str
    description: str = ""
    category: Code = Field(description="segmented property category (DICOM CID 7150)")
    type: Code = Field(description="segmented property type (DICOM CID 7151)")
    anatomic_region: Code | None = None


class ModelInfo(BaseModel):
    model: str = Field(description="bundle folder name")
    title: str = Field(description="bundle name in metadata.json")
    architecture: str = Field(description="network class the bundle instantiates")
    version: str
    description: str
    intended_use: str
    input: InputSpec
    inference_steps: InferenceSteps
    one_lesion_per_patient: bool = Field(
        description="the bundle declares its data one lesion per patient (configs/inference.json), the only case in "
        "which largest_component may be a step; metastases come several to a patient"
    )
    fold_models: int = Field(
        description="how many models the served inferer averages: the bundle's fold ensemble (its k cross-validation "
        "fold models), or 1 for a single model.pt"
    )
    torch_threads: int = Field(
        description="intra-op threads (torch) of the one thread the model runs on, for every request in turn"
    )
    test_metrics: dict[str, float] | None = Field(
        description="means on patients the model never trained on, from the report the best-model record names: test split of `metaseg compare`, or out-of-fold of a complete `metaseg cv`; null if none"
    )
    segment_label: SegmentLabel | None = Field(
        None, description="the bundle's segment label of its DICOM SEG; null: a plain lesion (serve.dicomseg.LESION)"
    )
    one_channel_dice_loss: float | None = Field(
        description="what a one-channel input (FLAIR alone, as a gray picture or a single DICOM series arrives) costs "
        "in out-of-fold per-patient 3D Dice against the three sequences, from the same report (`metaseg cv`'s "
        "one_channel_loss); null if unknown"
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


class VoxelPoint(BaseModel):
    slice: float = Field(description="in slice indices, series order")
    row: float
    col: float


class Lesion3D(BaseModel):
    """One lesion (metaseg.inference.lesions): a 3D connected component (26-neighbourhood) of a volume's final masks,
    so one tumour drawn on seven slices is one lesion; of unrelated slices, a connected component of one slice."""

    id: int = Field(description="1-based, in series order of the lesion's first voxel (slice, then row, then column)")
    slices: list[int] = Field(description="0-based indices (series order) of every slice the lesion appears on")
    first_slice: int
    last_slice: int
    voxels: int = Field(description="its size in voxels (pixels for a lesion of one unrelated slice)")
    volume_mm3: float | None = Field(
        description="voxels x voxel volume (pixel spacing x slice thickness) of a volume; null for a single slice or "
        "unrelated slices, or where the spacing is unknown (then `voxels` is its size)"
    )
    longest_diameter_px: float = Field(
        description="longest in-plane distance across the lesion on any one slice, edge to edge, in pixels"
    )
    longest_diameter_mm: float | None = Field(description="the same in mm (RANO-BM's measure); null without spacing")
    diameter_slice: int = Field(description="the slice (series order) of that longest diameter")
    measurable: bool | None = Field(description="RANO-BM: longest diameter >= 10 mm; null where mm are unknown")
    max_probability: float = Field(description="highest lesion probability inside the lesion")
    mean_probability: float = Field(description="mean lesion probability over the lesion's voxels")
    centroid: VoxelPoint
    bbox: BoundingBox = Field(description="rows and columns over all its slices")


class SliceComponent(BaseModel):
    """A connected component (8-connected) of one slice's final mask: a lesion's cross-section on that slice."""

    slice_index: int = Field(description="0-based index of the slice in series order")
    area_px: int
    area_mm2: float | None = Field(description="from PixelSpacing; null when the input has none")
    centroid: Point
    bbox: BoundingBox
    max_probability: float


SequenceName = Literal["pre-contrast", "FLAIR", "post-contrast"]
VolumeStep = Literal["min_lesion_voxels", "min_lesion_mm3", "min_lesion_score", "largest_component"]


class SegmentationReport(BaseModel):
    model: str
    kind: str = Field(description="input format: png, jpeg, tiff, dicom or nifti")
    volume: bool = Field(
        description="the upload is one volume (a DICOM series, a multi-frame DICOM, a NIfTI, one multi-page TIFF): its "
        "lesions are 3D; several pictures uploaded together are unrelated slices, each with lesions of its own"
    )
    image_size: ImageSize
    slices: int
    input_channels: Literal[1, 3] = Field(
        description="what the network was given: 3 = the upload's pre-contrast, FLAIR and post-contrast channels; "
        "1 = one channel, taken as FLAIR (a model of three sequences gets it in all three)"
    )
    sequences_given: list[SequenceName] = Field(
        description="the sequences the network got from the upload, in its channel order; FLAIR stood in for the others (a one-channel upload: FLAIR alone)"
    )
    threshold: float = Field(description="lesion where the probability is at least this")
    volume_steps: list[VolumeStep] = Field(
        description="the component steps of /info `inference_steps` applied to the masks: only to a volume, and only "
        "those that are on (the minimum size in mm3 where the voxel volume is known, else in voxels); empty for none"
    )
    pixel_spacing_mm: tuple[float, float] | None = Field(description="(row, column) spacing; null when unknown")
    slice_thickness_mm: float | None
    lesion_count: int = Field(description="number of `lesions`")
    lesions: list[Lesion3D] = Field(description="the lesions of the final masks, in order of `id`")
    volume_ml: float | None = Field(
        description="sum of the lesions' volume_mm3 in mL; null unless the upload is a volume with known spacing"
    )
    slice_components: list[SliceComponent] = Field(description="each slice's lesion cross-sections, slice by slice")
    total_area_px: int = Field(description="sum of the slice components' areas (an area per slice, not a volume)")
    total_area_mm2: float | None
    max_probability: float = Field(description="highest lesion probability over all slices")
    inference_ms: float = Field(description="time spent in the network and its pre/postprocessing")
