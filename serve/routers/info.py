"""What the loaded model is and what it expects, so that clients need not read the bundle."""

from fastapi import APIRouter, Request

from serve.dicomseg import METADATA_KEY
from serve.deps import EngineDep, RecordedDep, SettingsDep
from serve.schemas import InferenceSteps, InputSpec, ModelInfo, SegmentLabel

router = APIRouter(prefix="/info", tags=["info"])

FORMATS = ["PNG", "JPEG", "TIFF", "DICOM", "NIfTI-1"]
CHANNEL_RULE = (  # the bundles' preprocessing (configs/inference.json), for clients that do not read it
    "a 3- or 4-channel image (RGB, RGBA, RGB DICOM/TIFF) gives channels 0-2 as pre-contrast, FLAIR and post-contrast, "
    "as in the training slices; a gray image is taken as FLAIR and copied into all three (the model was trained with "
    "such inputs too); SegmentationReport.input_channels says which an upload got"
)


@router.get("", response_model=ModelInfo)
def info(request: Request, engine: EngineDep, settings: SettingsDep, recorded: RecordedDep) -> ModelInfo:
    """The model's identity (from the bundle's metadata.json), its input expectations, its chosen inference steps,
    the server's limits, and what the report behind the served model measured."""
    meta = engine.metadata
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    return ModelInfo(
        model=engine.name,
        title=meta.get("name", engine.name),
        architecture=type(engine.network).__name__,
        version=str(meta.get("version", "")),
        description=meta.get("description", ""),
        intended_use=meta.get("intended_use", ""),
        input=InputSpec(
            channels=image.get("num_channels", 1),
            channel_def=image.get("channel_def", {}),
            spatial_size=engine.spatial_size,
            channel_rule=CHANNEL_RULE,
            formats=FORMATS,
            limits=settings.upload_limits(),
        ),
        inference_steps=InferenceSteps(**engine.inference_steps),
        one_lesion_per_patient=engine.one_lesion_per_patient,
        segment_label=SegmentLabel(**meta[METADATA_KEY]) if METADATA_KEY in meta else None,
        fold_models=len(engine.models),
        torch_threads=request.app.state.torch_threads,
        test_metrics=recorded.test_metrics,
        one_channel_dice_loss=recorded.one_channel_dice_loss,
    )
