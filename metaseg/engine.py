"""Segment slices held in memory with a bundle's own network, weights and preprocessing.

The engine reads the bundle exactly as `python -m monai.bundle run` does for inference (train.json merged with
inference.json) and takes from it `network_def` and `preprocessing`. Only the file loader is left out, because the
caller has already decoded the upload (metaseg.imageio gives arrays in the same row/column order as the bundle's
readers); the resampling back to each slice's own size is the bundle's `Invertd`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged

from metaseg.bundles import STAGES
from metaseg.errors import UserError


@contextmanager
def bundle_imports(bundle: Path):
    """Make `bundle/scripts` importable while its network is built, as MONAI's workflow does.

    Every bundle's package is called `scripts`, so a cached one from another bundle is dropped first and after.
    """

    def forget_scripts():
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    forget_scripts()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        forget_scripts()


class Engine:
    """One bundle, loaded once: `probabilities(frames)` returns a lesion probability map per 2D frame."""

    def __init__(self, bundle: Path, weights: Path | None = None, batch_size: int = 16, overrides: dict | None = None):
        bundle = Path(bundle).resolve()
        weights = Path(weights) if weights else bundle / "models" / "model.pt"
        if not weights.is_file():
            raise UserError(f"no trained weights at {weights}: train the bundle or pass its model.pt")
        parser = ConfigParser()
        parser.read_meta(str(bundle / "configs" / "metadata.json"))
        parser.read_config([str(bundle / "configs" / name) for name in STAGES["inference"][1]])
        parser["bundle_root"] = str(bundle)
        for key, value in (overrides or {}).items():  # e.g. the spatial_size a test model was trained at
            parser[key] = value
        with bundle_imports(bundle):
            network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.device = parser.get_parsed_content("device")
        self.network = network.to(self.device).eval()
        steps = parser.get_parsed_content("preprocessing").transforms
        self.preprocess = Compose([t for t in steps if not isinstance(t, LoadImaged)])
        self.restore = Invertd(keys="pred", transform=self.preprocess, orig_keys="image", nearest_interp=False)
        self.bundle = bundle
        self.weights = weights
        self.metadata = parser["_meta_"]
        self.spatial_size = parser["spatial_size"]
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.bundle.name

    def probabilities(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lesion probability (float32, 0..1) for each 2D frame, at that frame's own size and orientation."""
        maps = []
        for start in range(0, len(frames), self.batch_size):
            items = [self._prepare(frame) for frame in frames[start : start + self.batch_size]]
            batch = torch.stack([item["image"].as_tensor() for item in items]).to(self.device)
            with torch.inference_mode():
                probs = torch.softmax(self.network(batch).float(), dim=1).cpu()
            for item, prob in zip(items, probs):
                restored = self.restore({"image": item["image"], "pred": MetaTensor(prob)})["pred"]
                maps.append(np.clip(restored[1].numpy(), 0.0, 1.0).astype(np.float32))
        return maps

    def _prepare(self, frame: np.ndarray) -> dict:
        if frame.ndim != 2 or min(frame.shape) < 1:
            raise UserError(f"expected a 2D slice, got an array of shape {frame.shape}")
        image = MetaTensor(torch.as_tensor(np.ascontiguousarray(frame), dtype=torch.float32)[None])
        return self.preprocess({"image": image})
