"""What the viewer draws: the slices of each sequence in gray, a mask blended over one of them in red, and a strip
of the slices that hold lesion; with numpy, so that scrolling, the threshold and the opacity never ask the server for
anything.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from metaseg.conventions import FLAIR_CHANNEL, SEQUENCES
from metaseg.imageio.volume import Volume

RED = np.array([255.0, 0.0, 0.0], np.float32)
PALE = np.array([255.0, 170.0, 170.0], np.float32)  # lesions the lesion score filters out: dimmed, not hidden
PICKED = np.array([255.0, 215.0, 0.0], np.float32)  # the outline of the lesion picked in the table
DIM = 0.35  # a filtered lesion's fill, as a fraction of the chosen opacity
STRIP_EMPTY, STRIP_LESION, STRIP_SHOWN = (225, 225, 225), (220, 40, 40), (30, 30, 30)


def grayscale(frames: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 slices windowed to the 1st-99th percentile of the whole upload (sampled), so that scrolling through
    a series keeps one brightness and a few extreme pixels do not wash it out."""
    low, high = np.percentile(np.concatenate([f[::4, ::4].ravel() for f in frames]), [1, 99])
    scale = 255 / (high - low) if high > low else 0.0
    return [np.clip((f - low) * scale, 0, 255).astype(np.uint8) for f in frames]


def sequence_slices(volume: Volume) -> dict[str, list[np.ndarray]]:
    """Sequence name -> its slices in gray: FLAIR first, then the other sequences the upload gave (Volume.sequences,
    not those FLAIR stands in for), each windowed on its own; a one-channel upload has its frames alone, as FLAIR."""
    flair = SEQUENCES[FLAIR_CHANNEL]
    if volume.channels == 1:
        return {flair: grayscale(volume.frames)}
    shown = [flair, *(name for name in volume.sequences_given if name != flair)]
    return {name: grayscale([s[SEQUENCES.index(name)] for s in volume.sequences]) for name in shown}


def blend(gray: np.ndarray, mask: np.ndarray, opacity: float, contour: bool, dimmed: np.ndarray | None = None,
          picked: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: the lesion filled with red at `opacity`, with a solid red outline if `contour`; the `dimmed`
    (filtered) lesions pale and faint, and the `picked` lesion outlined in yellow whatever `contour` says, so that it
    stands apart from the others on its slice."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for region, colour, alpha in ((dimmed, PALE, DIM * opacity), (mask, RED, opacity)):
        if region is None:
            continue
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        if contour:
            rgb[_edge(region)] = colour
    if picked is not None:
        rgb[_edge(picked)] = PICKED
    return np.round(rgb).astype(np.uint8)


def _edge(region: np.ndarray) -> np.ndarray:
    return region & ~binary_erosion(region)


def strip(has_lesion: np.ndarray, shown: int, width: int = 800, height: int = 14) -> np.ndarray:
    """RGB uint8 bar of the slices left to right: red where a slice holds lesion, light gray where not, with the
    shown slice's cell darkened at the top and bottom, to sit under the slice slider."""
    cells = np.where(np.asarray(has_lesion, bool)[:, None], STRIP_LESION, STRIP_EMPTY).astype(np.uint8)
    cell = max(1, width // len(cells))
    bar = np.repeat(cells[None], height, axis=0)
    bar[: height // 4, shown] = bar[-(height // 4) :, shown] = STRIP_SHOWN
    return np.repeat(bar, cell, axis=1)


def png(image: np.ndarray) -> bytes:
    """A gray or RGB uint8 image as PNG bytes, for a download."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
