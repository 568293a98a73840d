"""The preprocessing steps MONAI has no transform for, and the order of the training chain."""

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor
from scipy import ndimage
from skimage.exposure import equalize_adapthist


def three_sequences(image: torch.Tensor) -> torch.Tensor:
    """The network's three input channels (pre-contrast, FLAIR, post-contrast, as the data set's slices hold them);
    a one-channel image (a gray PNG, a DICOM slice) is taken as FLAIR and copied into all three, as the data set
    does where a sequence is missing."""
    return image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, 1, 1)


def flair_only(image: torch.Tensor, channel: int) -> torch.Tensor:
    """The slice as a one-channel upload arrives: its FLAIR `channel` in all three (training's sequence dropout)."""
    return image[channel : channel + 1].repeat(3, 1, 1)


def brain_box(image: torch.Tensor, channel: int, fraction: float, enabled: bool) -> torch.Tensor:
    """CropForegroundd's select_fn: the brain as the pixels whose FLAIR `channel` exceeds `fraction` of the slice's
    maximum (from the image, never the mask); the whole slice when not `enabled` or when nothing exceeds it (a
    slice with no brain), so that the crop is then the identity. `enabled` must be a bool: on the command line
    `--brain_crop True` (MONAI's fire parses it), where `false` would arrive as a non-empty string."""
    if not isinstance(enabled, bool):
        raise TypeError(f"brain_crop must be True or False, got {enabled!r}")
    flair = image[channel : channel + 1]
    if enabled:
        brain = flair > fraction * flair.max()
        if bool(brain.any()):
            return brain
    return torch.ones_like(flair, dtype=torch.bool)


def brain_mask(image, erosion: float, threshold: float = 0.1) -> np.ndarray:
    """A brain mask from the image alone (never the lesion mask), as brain extraction leaves a slice: the head (the
    pixels whose brightest channel exceeds `threshold` of the slice's 99th percentile, holes filled, its largest
    component) eroded by `erosion` pixels, which takes off scalp and skull. Empty where the slice shows no head."""
    pixels = np.asarray(convert_to_tensor(image, track_meta=False).float().cpu())
    brightest = pixels.max(axis=0)
    top = np.percentile(brightest, 99)
    if top <= 0:
        return np.zeros(brightest.shape, bool)
    labels, count = ndimage.label(ndimage.binary_fill_holes(brightest > threshold * top))
    if count == 0:
        return np.zeros(brightest.shape, bool)
    head = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.distance_transform_edt(head) > erosion


def skull_strip(image: torch.Tensor, erosion: float, threshold: float = 0.1) -> torch.Tensor:
    """The channel-first slice with every pixel outside its brain_mask set to 0, as brain-extracted volumes arrive."""
    keep = convert_to_dst_type(brain_mask(image, erosion, threshold)[None], dst=image)[0]
    return image * keep


class SkullStrippedCopyd(MapTransform):
    """With `enabled`, a skull-stripped copy of `keys` under `<key>_stripped` (scripts.transforms.skull_strip, on the
    raw slice), so that the deterministic steps after it (resize, percentile scaling, CLAHE) treat it exactly as they
    would a brain-extracted upload, and the cache holds both; RandSkullStripd then picks one per draw."""

    def __init__(self, keys: KeysCollection, erosion: float, enabled: bool, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        self.erosion, self.enabled = erosion, enabled

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.enabled:
            for key in self.key_iterator(d):
                d[f"{key}_stripped"] = skull_strip(d[key], self.erosion)
        return d


class RandSkullStripd(RandomizableTransform, MapTransform):
    """Skull-stripping as an augmentation: with probability `prob` the slice trains as its `<key>_stripped` copy
    (SkullStrippedCopyd), so brain-extracted input is as normal to the model as a whole head; the copy is dropped
    either way."""

    def __init__(self, keys: KeysCollection, prob: float = 0.0) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        for key in self.key_iterator(d):
            stripped = d.pop(f"{key}_stripped", None)
            if self._do_transform and stripped is not None:
                d[key] = stripped
        return d


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation of each channel (scikit-image's equalize_adapthist), on a
    channel-first image scaled to [0, 1]; clamped to [0, 1] first, because the percentile scaling before it skips
    its clip on a near-constant slice. Returns a new image of the input's type, dtype and metadata."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, clip_limit: float = 0.01) -> None:
        self.clip_limit = clip_limit

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = convert_to_tensor(img, track_meta=False).clamp(0, 1).cpu().numpy()
        equalised = np.stack([equalize_adapthist(c, clip_limit=self.clip_limit) for c in channels])
        return convert_to_dst_type(equalised, dst=img, dtype=img.dtype)[0]


class CLAHEd(MapTransform):
    """Dictionary version of CLAHE."""

    backend = CLAHE.backend

    def __init__(self, keys: KeysCollection, clip_limit: float = 0.01, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.clahe = CLAHE(clip_limit)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clahe(d[key])
        return d


def training_chain(
    deterministic: Sequence,
    random: Sequence,
    drop_meta: Transform,
    to_device: Transform,
    patch_crop: Transform,
    on_device: bool,
    crop: bool,
) -> list:
    """The training transforms in order: the deterministic steps (cached), then `to_device` if `on_device` (the
    cache and the random steps on the GPU), the metadata dropped (training needs none), `patch_crop` if `crop`
    (patches of the full-size slice), the random steps, and the metadata dropped again (they may add it back)."""
    steps = [*deterministic, *([to_device] if on_device else []), drop_meta]
    return steps + [*([patch_crop] if crop else []), *random, drop_meta]
