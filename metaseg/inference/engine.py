"""Segment slices held in memory with a bundle's own network, weights and preprocessing.

The engine reads the bundle as MONAI Label and MONAI Deploy do: `configs/inference.json` alone, taking its
`network_def`, `preprocessing` without the file loader (the caller has already decoded the upload, and
metaseg.imageio gives arrays in the same row/column order as the bundle's readers), its `inferer` (class
probabilities averaged over the bundle's fold models, and flip-averaged when its `inference_steps` say so), and its `postprocessing` up to the
probability map: the lesion channel and the `Invertd` back to each slice's own size. What follows in the bundle (the
mask and the writer) is left to the caller: metaseg.inference.steps.upload_masks applies `inference_steps` (the
threshold, and the component steps for a volume), and a caller may pick another threshold.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import (
    AsDiscreted,
    Compose,
    LoadImaged,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from metaseg.bundles import bundle_imports, config
from metaseg.conventions import checked_steps, default_weights
from metaseg.errors import UserError

if TYPE_CHECKING:
    from monai.bundle import ConfigParser


FOLDS = "other_folds#checkpoints"  # inference.json: the fold models the inferer adds to models/model.pt
VIEWS = ("plain", "mirrored")  # the bundle's `probabilities`: of the input, and of its mirror mirrored back


def _first_line(err: Exception, limit: int = 300) -> str:
    """The line of a loading error that says what is wrong (a state dict's first size mismatch, else its missing or
    unexpected keys, else its first line), shortened: a user sees one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    telling = ("size mismatch", "Missing key", "Unexpected key")
    line = next((line for prefix in telling for line in lines if line.startswith(prefix)), lines[0])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def inference_parser(bundle: Path, overrides: dict | None = None) -> ConfigParser:
    """The bundle's inference config (with `overrides`), refused with one line if it predates the chosen steps."""
    parser = config(bundle, "inference", overrides)  # overrides: e.g. the spatial_size a test model was trained at
    missing = [key for key in ("inference_steps", "probabilities") if key not in parser]
    if missing:
        raise UserError(f"{bundle.name}: configs/inference.json has no {' or '.join(missing)}: a bundle from "
                        f"before the chosen inference steps; copy them from a shipped bundle's inference.json")
    return parser


def _load(network: torch.nn.Module, weights: Path, bundle: str) -> None:
    """`weights` into `network`, or one line saying why they are not a model of this bundle."""
    if not weights.is_file():
        raise UserError(f"{bundle}: fold model {weights} is missing (configs/inference.json {FOLDS}): ship every "
                        f"fold with scripts/ship_weights.py, or set {FOLDS} to []")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:  # what torch.load raises for non-weights
        raise UserError(f"cannot read weights {weights}: {_first_line(err)}") from None
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:  # e.g. one-channel weights of a bundle before 0.4.0
        raise UserError(f"weights {weights} do not fit the {bundle} network: {_first_line(err)}") from None


class OneSortPercentiles(ScaleIntensityRangePercentiles):
    """MONAI's channel-wise ScaleIntensityRangePercentiles with both percentiles of every channel from one
    torch.quantile call, one sort of all channels instead of two sorts per channel (a third of the time), then MONAI's
    own ScaleIntensityRange per channel: the same values bit for bit (tests/test_engine.py). Whatever MONAI does
    otherwise (not channel-wise, relative, or a channel of over 10^6 pixels, where it uses numpy) it does itself."""

    @classmethod
    def like(cls, scaler: ScaleIntensityRangePercentiles) -> ScaleIntensityRangePercentiles:
        return cls(scaler.lower, scaler.upper, scaler.b_min, scaler.b_max, scaler.clip, scaler.relative,
                   scaler.channel_wise, scaler.dtype)

    def __call__(self, img):
        img = convert_to_tensor(img, track_meta=get_track_meta())
        img_t = convert_to_tensor(img, track_meta=False)
        if not self.channel_wise or self.relative or img_t.ndim < 2 or img_t[0].numel() > 1_000_000:
            return super().__call__(img)
        q = torch.as_tensor(np.array([self.lower, self.upper]) / 100.0, dtype=img_t.dtype)  # as MONAI's percentile
        low, high = torch.quantile(img_t.flatten(1), q, dim=1)
        scaled = [convert_to_tensor(ScaleIntensityRange(a, b, self.b_min, self.b_max, self.clip, self.dtype)(c),
                                    track_meta=False) for c, a, b in zip(img_t, low, high)]
        return convert_to_dst_type(torch.stack(scaled), dst=img, dtype=self.dtype)[0]


def fast_preprocessing(steps: Sequence) -> list:
    """The bundle's preprocessing steps with MONAI's percentile scaling computed by OneSortPercentiles (same
    result, faster); the bundle's own config is untouched, so MONAI users run MONAI's."""
    for step in steps:
        if isinstance(step, ScaleIntensityRangePercentilesd) and type(step.scaler) is ScaleIntensityRangePercentiles:
            step.scaler = OneSortPercentiles.like(step.scaler)
    return list(steps)


class Engine:
    """One bundle, loaded once: `probabilities(frames)` returns a lesion probability map per 2D frame.

    A frame is (rows, cols), one channel, or (channels, rows, cols), e.g. the three sequences of metaseg.imageio's
    `Volume.inputs`; the bundle's own preprocessing makes the network's input channels from either.
    `inference_steps` are the bundle's chosen steps (metaseg.conventions.BUNDLE_STEPS), for upload_masks.
    `weights`: the bundle's own models/model.pt (the default) serves its fold ensemble (`models`: fold 0 and the
    folds of inference.json `other_folds`); any other model.pt (a fold of `metaseg cv`, a `metaseg train` run) is
    served alone. `batch_size` 4: slices per forward; per slice on a 2-core CPU (U-Net++, 3 folds, flip TTA) 4
    took 160 ms, 8 185 ms, 16 268 ms (benchmarks/serve_latency.py's measurement; larger batches leave the caches).
    """

    def __init__(self, bundle: Path, weights: Path | None = None, batch_size: int = 4, overrides: dict | None = None):
        bundle = Path(bundle).resolve()
        weights = Path(weights) if weights else default_weights(bundle)
        if not weights.is_file():
            raise UserError(f"no trained weights at {weights}: train the bundle or pass its model.pt")
        parser = inference_parser(bundle, overrides)
        shipped = weights.resolve() == default_weights(bundle).resolve()
        if not shipped:  # another model.pt (a fold of `metaseg cv`, a run of `metaseg train`): it alone
            parser[FOLDS] = []
        folds = [Path(path) for path in parser.get_parsed_content(FOLDS)]
        self.one_lesion_per_patient = bool(parser.get("one_lesion_per_patient", False))
        self.inference_steps = checked_steps(parser.get_parsed_content("inference_steps"), bundle.name,
                                             self.one_lesion_per_patient)
        with bundle_imports(bundle):
            network = parser.get_parsed_content("network_def")
            for path in [*folds, weights]:  # a bad fold is one line before the inferer loads it; `weights` last
                _load(network, path, bundle.name)
            self.inferer = parser.get_parsed_content("inferer")
            views = parser.get_parsed_content("probabilities")
            steps = parser.get_parsed_content("preprocessing").transforms
            post = parser.get_parsed_content("postprocessing").transforms
        self.views = {name: views[name] for name in VIEWS}
        self.device = parser.get_parsed_content("device")
        self.network = network.to(self.device).eval()
        self.preprocess = Compose(fast_preprocessing([t for t in steps if not isinstance(t, LoadImaged)]))
        self.restore = Compose(post[: next(i for i, t in enumerate(post) if isinstance(t, AsDiscreted))])
        self.bundle = bundle
        self.weights = weights
        self.models = [weights, *folds]  # the fold ensemble the inferer averages (one model unless `shipped`)
        self.metadata = parser["_meta_"]
        self.spatial_size = parser["spatial_size"]
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.bundle.name

    def probabilities(self, frames: Sequence[np.ndarray], view: str | None = None) -> list[np.ndarray]:
        """Lesion probability (float32, 0..1) for each 2D frame, at that frame's own size and orientation.

        By the bundle's `inferer` (with flip TTA when its inference_steps say so); `view` "plain" or "mirrored" runs
        that one of the bundle's `probabilities` alone instead, which metaseg cv keeps apart to choose flip TTA.
        In batches of `batch_size`: `prepare`, `forward`, `restored`.
        """
        maps = []
        for start in range(0, len(frames), self.batch_size):
            items, batch = self.prepare(frames[start : start + self.batch_size])
            maps += self.restored(items, self.forward(batch, view))
        return maps

    def warm_up(self) -> None:
        """One slice through every step, so that torch's one-time set-up (oneDNN's kernels for these shapes, the
        allocator's pools) is not paid by the first caller's timing."""
        side = int(self.spatial_size)
        self.probabilities([np.arange(side * side, dtype=np.float32).reshape(side, side) % 251])

    def prepare(self, frames: Sequence[np.ndarray]) -> tuple[list[dict], torch.Tensor]:
        """The bundle's preprocessing of each frame (kept for `restored`, which inverts it) and the network's input
        batch of them all, on the engine's device."""
        items = [self._prepare(frame) for frame in frames]
        return items, torch.stack([item["image"].as_tensor() for item in items]).to(self.device)

    def forward(self, batch: torch.Tensor, view: str | None = None) -> torch.Tensor:
        """The bundle's `inferer` (every fold model; or the `view` of its `probabilities`) on a prepared batch: class
        probabilities (batch, classes, size, size), float32 on the CPU."""
        infer = self.inferer if view is None else self.views[view]
        with torch.inference_mode():
            return infer(batch, self.network).float().cpu()

    def restored(self, items: Sequence[dict], probs: torch.Tensor) -> list[np.ndarray]:
        """The lesion channel of `forward`'s probabilities, back at each prepared frame's own size and orientation
        (the bundle's postprocessing up to its mask: the inverse of its preprocessing)."""
        maps = []
        for item, prob in zip(items, probs):
            restored = self.restore({"image": item["image"], "pred": MetaTensor(prob)})["pred"]
            maps.append(np.clip(restored[0].numpy(), 0.0, 1.0).astype(np.float32))
        return maps

    def _prepare(self, frame: np.ndarray) -> dict:
        if frame.ndim not in (2, 3) or min(frame.shape) < 1 or (frame.ndim == 3 and frame.shape[0] > 4):
            raise UserError(f"expected a 2D slice (rows, cols) or (channels, rows, cols), got shape {frame.shape}")
        image = torch.as_tensor(np.ascontiguousarray(frame), dtype=torch.float32)
        return self.preprocess({"image": MetaTensor(image if frame.ndim == 3 else image[None])})
