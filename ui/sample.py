"""The "Try a sample" slice: drawn by metaseg.data.phantom with a fixed seed, so the viewer ships no patient data."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from metaseg.data.phantom import synthesize
from ui.upload import Upload

SEED = 0
SLICES = 8  # enough for the phantom's first patient to reach its lesions (slices 7 and 8 at seed 0)


@functools.lru_cache(maxsize=1)
def sample() -> Upload:
    """The phantom slice with the most lesion, as the 3-channel TIFF the bundles train on (FLAIR in channel 1)."""
    with tempfile.TemporaryDirectory() as folder:
        synthesize(folder, patients=1, slices=SLICES, seed=SEED)
        masks = sorted(Path(folder).glob("*/*_mask.tif"))
        richest = max(masks, key=lambda mask: np.count_nonzero(tifffile.imread(mask)))
        image = richest.with_name(richest.name.replace("_mask", ""))
        return Upload.of([(f"phantom_{image.name}", image.read_bytes())])
