"""A picture for people: the slice in gray, the lesion in semi-transparent red with a solid red contour."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

RED = np.array([255.0, 0.0, 0.0])
OPACITY = 0.4


def window(frame: np.ndarray) -> np.ndarray:
    """uint8 gray from the 1st-99th percentile range, so a few extreme pixels do not wash out the slice."""
    low, high = np.percentile(frame, [1, 99])
    scaled = (frame - low) / (high - low) if high > low else np.zeros_like(frame)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_png(frame: np.ndarray, mask: np.ndarray) -> bytes:
    rgb = np.repeat(window(frame)[..., None], 3, axis=2).astype(np.float64)
    rgb[mask] = (1 - OPACITY) * rgb[mask] + OPACITY * RED
    rgb[mask & ~binary_erosion(mask)] = RED
    buffer = io.BytesIO()
    Image.fromarray(np.round(rgb).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
