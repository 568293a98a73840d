"""The server's findings (POST /segment JSON) as the viewer shows them: a lesion table and a few headline numbers."""

from __future__ import annotations

from collections import Counter

import pandas as pd


def lesion_table(report: dict) -> pd.DataFrame:
    """One row per lesion; slices counted from 1 as viewers do, sizes in mm² where the input gives a pixel size."""
    rows = [
        {
            "slice": lesion["slice_index"] + 1,
            "area (mm²)": lesion["area_mm2"],
            "area (px)": lesion["area_px"],
            "centre (r, c)": f"{lesion['centroid']['row']:.0f}, {lesion['centroid']['col']:.0f}",
            "max prob.": lesion["max_probability"],
        }
        for lesion in report["lesions"]
    ]
    columns = ["slice", "area (mm²)", "area (px)", "centre (r, c)", "max prob."]
    table = pd.DataFrame(rows, columns=columns)
    if report["pixel_spacing_mm"] is None:
        table = table.drop(columns="area (mm²)")
    if report["slices"] == 1:
        table = table.drop(columns="slice")
    return table


MODEL_INPUT = {  # the report's input_channels -> what the network was given (serve/schemas.py SegmentationReport)
    3: "three sequences (pre-contrast, FLAIR, post-contrast)",
    1: "one channel, used as FLAIR in all three sequence channels",
}


def model_input(report: dict) -> str:
    """Which input the model got, so a reader knows a gray upload was segmented from FLAIR alone."""
    return f"Input: {MODEL_INPUT[report['input_channels']]}"


def headline(report: dict) -> dict[str, str]:
    """Metric label -> value: lesion count, total area (mm² if known, else px), volume for a series, time."""
    numbers = {"Lesions": str(report["lesion_count"])}
    if report["total_area_mm2"] is not None:
        numbers["Total area"] = f"{report['total_area_mm2']:.1f} mm²"
    else:
        numbers["Total area"] = f"{report['total_area_px']} px"
    if report["volume_ml"] is not None:
        numbers["Volume"] = f"{report['volume_ml']:.2f} mL"
    numbers["Inference"] = f"{report['inference_ms']:.0f} ms"
    return numbers


def busiest_slice(report: dict) -> int:
    """0-based slice with the most lesion area, where a reader starts; the middle slice when there is none."""
    area = Counter()
    for lesion in report["lesions"]:
        area[lesion["slice_index"]] += lesion["area_px"]
    return area.most_common(1)[0][0] if area else report["slices"] // 2
