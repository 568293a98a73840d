"""The sidebar's words for the server and its model, in terms a reader knows: how busy the server is, and what the
report behind the model measured, by the metrics' names rather than their keys."""

from __future__ import annotations

from collections.abc import Mapping

METRIC_NAMES = {  # metaseg.evaluation.metrics' METRICS and POOLED keys, as the report's means come in /info
    "dice_3d": "Dice per patient (3D)",
    "lesion_slice_dice": "Dice on lesion slices",
    "lesion_slice_iou": "IoU on lesion slices",
    "hd95_px": "HD95 per slice (pixels)",
    "slice_component_sensitivity": "Lesions found per slice (sensitivity)",
    "slice_component_precision": "Findings per slice that are lesions (precision)",
    "fp_slice_rate": "Slices with a false lesion (rate)",
    "lesionwise_dice": "Lesion-wise Dice",
    "lesionwise_hd95_vox": "Lesion-wise HD95 (voxels)",
    "fp_lesions": "False lesions per patient",
    "lesion_sensitivity_3d": "Lesions found (3D sensitivity)",
    "lesion_precision_3d": "Findings that are lesions (3D precision)",
}


def metric_name(key: str) -> str:
    """A report metric's name for a reader; one this viewer does not know, in words rather than as a key."""
    return METRIC_NAMES.get(key) or key.replace("_", " ").capitalize()


def metrics_text(metrics: Mapping[str, float]) -> str:
    return "  \n".join(f"{metric_name(key)}: {value:.3f}" for key, value in metrics.items())


def server_state(health: Mapping) -> str:
    """The server's load as a reader cares about it: idle, working, or full (new requests are turned away)."""
    busy, capacity = health["busy"], health["capacity"]
    if not busy:
        return "Up, model loaded; idle"
    if busy >= capacity:
        return "Up, model loaded; full: new requests are turned away until one finishes"
    return f"Up, model loaded; working on {busy} request{'s' if busy > 1 else ''}"
