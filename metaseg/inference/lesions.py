"""What a lesion is, in one place: a 3D connected component of one patient's (or one series') boolean mask stack.

A mask stack is `(slices, rows, cols)` in series order. Two voxels belong to one lesion when they touch by a face, an
edge or a corner (`CONNECTIVITY` = 3, the 26-neighbourhood of scipy/scikit-image/MONAI), so a metastasis drawn on five
adjacent slices is one lesion, not five. The metrics (metaseg.evaluation.metrics), the inference steps
(metaseg.inference.steps), the server's lesion table and the reports all label lesions with `label` below.

One uploaded 2D slice is a stack of one slice: its lesions are its 2D components (8-connected), with an area but no
volume. Sizes: voxels always; mm3 and mL only where the input gives the spacing (DICOM, NIfTI), since pictures and
the development TIFFs carry none. The longest axial diameter is RANO-BM's measure (a lesion is *measurable* from
10 mm): the longest in-plane distance across the lesion on any one slice, edge to edge (pixel corners), in mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from metaseg.imageio.volume import voxel_mm3

CONNECTIVITY = 3  # voxels sharing a face, an edge or a corner are neighbours (26-neighbourhood)
_STRUCTURE = ndimage.generate_binary_structure(3, CONNECTIVITY)
MEASURABLE_MM = 10.0  # RANO-BM: a metastasis is measurable from a longest diameter of 10 mm
SIZE_BINS_ML = (0.1, 1.0)  # lesion-size bins where the spacing is known: < 0.1 mL, 0.1-1 mL, > 1 mL
SIZE_BINS_VOXELS = (100, 1000)  # where it is not: < 100, 100-1000, > 1000 voxels
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # a pixel is on the border when a 4-neighbour in its slice is not
_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Lesion labels 1..n of a boolean stack (slices, rows, cols) (0 = background), and n; a 2D mask is one slice.

    Labels run in scan order of each lesion's first voxel (slice, then row, then column), so they are stable."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) mask, got shape {mask.shape}")
    labels, n = ndimage.label(mask, _STRUCTURE)
    return labels, int(n)


def size_bin(voxels: int, voxel_volume_mm3: float | None) -> str:
    """The size bin of a lesion: by volume in mL where the voxel volume is known, else by voxel count."""
    if voxel_volume_mm3 is not None:
        low, high = SIZE_BINS_ML
        ml = voxels * voxel_volume_mm3 / 1000
        return f"<{low:g} mL" if ml < low else f"{low:g}-{high:g} mL" if ml <= high else f">{high:g} mL"
    low, high = SIZE_BINS_VOXELS
    return f"<{low} voxels" if voxels < low else f"{low}-{high} voxels" if voxels <= high else f">{high} voxels"


def size_bins(voxel_volume_mm3: float | None) -> tuple[str, str, str]:
    """The three bin names of `size_bin`, smallest first."""
    if voxel_volume_mm3 is not None:
        low, high = SIZE_BINS_ML
        return f"<{low:g} mL", f"{low:g}-{high:g} mL", f">{high:g} mL"
    low, high = SIZE_BINS_VOXELS
    return f"<{low} voxels", f"{low}-{high} voxels", f">{high} voxels"


@dataclass(frozen=True)
class Lesion:
    """One lesion of a stack: where it is and how big. Slices are 0-based indices in series order."""

    id: int  # 1-based, in scan order of its first voxel
    slices: tuple[int, ...]  # every slice it appears on
    voxels: int
    volume_mm3: float | None  # None for a single slice or an unknown spacing
    longest_diameter_px: float  # longest in-plane distance on one slice, edge to edge, in pixels
    longest_diameter_mm: float | None  # the same in mm (None where the pixel spacing is unknown)
    diameter_slice: int  # the slice of that diameter
    measurable: bool | None  # RANO-BM: longest diameter >= 10 mm (None where mm are unknown)
    max_probability: float | None  # highest lesion probability inside it (None without probabilities)
    mean_probability: float | None  # mean lesion probability over its voxels (None without probabilities)
    centroid: tuple[float, float, float]  # (slice, row, col)
    bbox: tuple[int, int, int, int]  # (row_min, col_min, row_max, col_max), inclusive, over all its slices


def scores(labels: np.ndarray, n: int, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The highest and the mean probability of each lesion 1..n of `label`'s labels, in label order: how sure the
    network is of a lesion as a whole, what a reader (and a FROC, metaseg.evaluation.froc) ranks lesions by."""
    probability = np.asarray(probability, np.float32).reshape(labels.shape)
    top, mean = np.zeros(n), np.full(n, np.nan)  # a label with no voxel: 0 and NaN, as ndimage's maximum and mean
    for i, box in enumerate(ndimage.find_objects(labels, n)):  # within each lesion's box: ndimage.maximum sorts it all
        if box is not None:
            values = probability[box][labels[box] == i + 1]
            top[i], mean[i] = values.max(), values.mean(dtype=np.float64)
    return top, mean


def _longest_diameter(coords: np.ndarray, scale: tuple[float, float]) -> float:
    """Longest distance between two pixel corners of a 2D region (rows, cols coordinates), in `scale` units."""
    corners = np.unique((coords[:, None, :] + _CORNERS[None]).reshape(-1, 2), axis=0) * np.asarray(scale)
    try:
        corners = corners[ConvexHull(corners).vertices]
    except QhullError:  # fewer than three points off one line: every point is on the hull
        pass
    return float(pdist(corners).max()) if len(corners) > 1 else 0.0


def measure(mask: np.ndarray, probability: np.ndarray | None = None,
            pixel_spacing_mm: tuple[float, float] | None = None, slice_spacing_mm: float | None = None) -> list[Lesion]:
    """The lesions of a boolean stack (slices, rows, cols), with sizes in mm where the spacing is given.

    `probability`: the lesion probabilities of the same stack, for each lesion's highest and mean (`scores`). A
    stack of one slice has no volume (its lesions are areas)."""
    labels, n = label(mask)
    highest, mean = scores(labels, n, probability) if probability is not None else (None, None)
    cell = voxel_mm3(pixel_spacing_mm, slice_spacing_mm) if labels.shape[0] > 1 else None
    found = []
    for lesion_id, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == lesion_id
        offset = np.array([s.start for s in box])
        points = np.argwhere(inside) + offset
        edge = inside & ~ndimage.binary_erosion(inside, _IN_PLANE, border_value=0)  # the hull needs its border only
        diameters = {}
        for index in np.unique(points[:, 0]):
            coords = np.argwhere(edge[index - offset[0]]) + offset[1:]
            diameters[int(index)] = (_longest_diameter(coords, (1.0, 1.0)),
                                     _longest_diameter(coords, pixel_spacing_mm) if pixel_spacing_mm else None)
        key = (lambda i: diameters[i][1]) if pixel_spacing_mm else (lambda i: diameters[i][0])
        widest = max(diameters, key=key)
        px, mm = diameters[widest]
        found.append(Lesion(
            id=lesion_id,
            slices=tuple(sorted(diameters)),
            voxels=len(points),
            volume_mm3=len(points) * cell if cell is not None else None,
            longest_diameter_px=px,
            longest_diameter_mm=mm,
            diameter_slice=widest,
            measurable=None if mm is None else mm >= MEASURABLE_MM,
            max_probability=float(highest[lesion_id - 1]) if highest is not None else None,
            mean_probability=float(mean[lesion_id - 1]) if mean is not None else None,
            centroid=tuple(float(c) for c in points.mean(axis=0)),
            bbox=(int(points[:, 1].min()), int(points[:, 2].min()), int(points[:, 1].max()), int(points[:, 2].max())),
        ))
    return found


def measure_upload(masks: np.ndarray, probability: np.ndarray | None, pixel_spacing_mm: tuple[float, float] | None,
                   slice_spacing_mm: float | None, is_volume: bool) -> list[Lesion]:
    """The lesions of an upload's masks: a volume's 3D lesions; of unrelated slices (several pictures), each slice's
    own, numbered on across the slices, with the upload's slice indices (what the server and the viewer list)."""
    if is_volume:
        return measure(masks, probability, pixel_spacing_mm, slice_spacing_mm)
    found = []
    for index, mask in enumerate(masks):
        prob = None if probability is None else probability[index][None]
        for lesion in measure(mask[None], prob, pixel_spacing_mm):
            found.append(replace(lesion, id=len(found) + 1, slices=(index,), diameter_slice=index,
                                 centroid=(float(index), *lesion.centroid[1:])))
    return found


def min_voxels(min_mm3: float, voxel_volume_mm3: float) -> int:
    """The voxel count of a minimum lesion size in mm3 (a lesion of at least `min_mm3` is never below it)."""
    return math.floor(min_mm3 / voxel_volume_mm3 + 1e-9)
