"""What the viewer draws: slices in gray, and the server's mask blended over one of them in red.

Blending happens here, with numpy, so that moving the opacity slider never asks the server for anything.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

RED = np.array([255.0, 0.0, 0.0], np.float32)


def grayscale(frames: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 slices windowed to the 1st-99th percentile of the whole upload (sampled), so that scrolling through
    a series keeps one brightness and a few extreme pixels do not wash it out."""
    low, high = np.percentile(np.concatenate([f[::4, ::4].ravel() for f in frames]), [1, 99])
    scale = 255 / (high - low) if high > low else 0.0
    return [np.clip((f - low) * scale, 0, 255).astype(np.uint8) for f in frames]


def read_mask(png: bytes) -> np.ndarray:
    """The server's 0/255 mask PNG as a boolean array."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 127


def blend(gray: np.ndarray, mask: np.ndarray, opacity: float, contour: bool) -> np.ndarray:
    """RGB uint8: the lesion filled with red at `opacity`, and with a solid red outline if `contour`."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    rgb[mask] = (1 - opacity) * rgb[mask] + opacity * RED
    if contour:
        rgb[mask & ~binary_erosion(mask)] = RED
    return np.round(rgb).astype(np.uint8)
