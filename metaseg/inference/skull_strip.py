"""The skull-stripped view: slices as brain-extracted volumes (BraTS and its kin) arrive, everything outside a brain
mask from the image set to 0, by the bundle's own scripts.transforms.skull_strip (the function its training
augmentation uses), so that the view and the augmentation are one implementation."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metaseg.bundles import bundle_imports
from metaseg.conventions import SKULL_STRIP_EROSION


@functools.cache
def _skull_strip(bundle: Path):
    """The bundle's scripts.transforms.skull_strip, imported once (the function outlives its dropped module)."""
    with bundle_imports(bundle):
        return importlib.import_module("scripts.transforms").skull_strip


def skull_stripped(bundle: Path, frames: Sequence[np.ndarray], erosion: float = SKULL_STRIP_EROSION) -> list[np.ndarray]:
    """Each frame (channel-first sequences, or one 2D slice) with everything outside its brain mask set to 0."""
    strip = _skull_strip(bundle)
    return [strip(f[None], erosion)[0] if f.ndim == 2 else strip(f, erosion) for f in frames]
