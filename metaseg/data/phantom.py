"""Synthetic brain MRI with metastases, written in the exact layout of the users' data set.

It is the data set that ships with the code (demo, tests, benchmarks), so it is made hard the way metastases are
hard: many tiny lesions, FLAIR-bright edema around them that is not lesion, enhancing vessels and FLAIR-bright
white-matter spots that are not lesion, bias fields, Rician noise and scanner-to-scanner contrast differences.
Images are built channel-first (pre-contrast T1, FLAIR, post-contrast T1) and written channel-last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from metaseg.errors import UserError
from metaseg.files import write_json_atomic

SIZE = 256
ROWS, COLS = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
SLICE_GAP_PX = 6.0  # slice spacing in pixels: how many slices a lesion of a given diameter spans
DIAMETERS_PX = (2.5, 28.0)  # drawn log-uniform, so most lesions are small; rasterised ones land in 2..30 px
RING_DIAMETER_PX = 10.0  # larger lesions enhance as a ring around a necrotic core, smaller ones solidly
HEAD_LAYERS = ("csf", "bone", "marrow", "bone", "scalp", "background")  # outwards from the brain surface
HEAD_STEPS_PER_PX = 8  # resolution of the skull-and-scalp lookup table
LESION_HETEROGENEITY = np.array([0.03, 0.12, 0.05], np.float32)[:, None, None]  # texture gain; FLAIR most
TIFF_OPTIONS = {"compression": "zlib", "predictor": True, "compressionargs": {"level": 1}}  # deflate, like the real set

# Signal per tissue as (pre-contrast T1, FLAIR, post-contrast T1), before scanner jitter, bias field and noise.
TISSUE = {name: np.array(values, np.float32) for name, values in {
    "background": (0.0, 0.0, 0.0),
    "scalp": (0.80, 0.55, 0.80),
    "bone": (0.04, 0.03, 0.04),
    "marrow": (0.95, 0.50, 0.95),
    "csf": (0.12, 0.05, 0.12),
    "gray": (0.50, 0.62, 0.52),
    "white": (0.76, 0.44, 0.74),
    "edema": (0.62, 0.90, 0.60),
    "lesion": (0.50, 0.74, 0.98),
    "necrosis": (0.36, 0.84, 0.30),
    "wm_spot": (0.68, 0.86, 0.70),
    "vessel": (0.45, 0.20, 1.00),
}.items()}


@dataclass
class Lesion:
    """A rough sphere: centre pixel, slice range (0-based), radii, and its maps within its bounding box."""

    center: tuple[int, int]
    first: int
    last: int
    radius: float
    edema_radius: float
    box: tuple[slice, slice]  # covers the lesion and its widest edema
    dist: np.ndarray  # distance from the centre, over the box
    outline: np.ndarray  # radius multiplier along each pixel's ray (an irregular outline), over the box

    def section(self, n: int, radius: float) -> float:
        """Radius at slice n of a sphere of this radius centred on the lesion's middle slice (0 where it misses)."""
        z = (n - (self.first + self.last) / 2) * SLICE_GAP_PX
        return float(np.sqrt(max(radius**2 - z**2, 0.0)))


@dataclass
class Patient:
    """Everything drawn once per patient, so that rendering a slice is a few vectorised operations."""

    center: np.ndarray  # brain centre (row, col)
    axes: np.ndarray  # brain semi-axes (rows, cols) in the largest slice
    dist: np.ndarray  # distance of every pixel from the brain centre
    edge: np.ndarray  # brain radius along each pixel's ray in the largest slice
    profile: np.ndarray  # brain size per slice: smaller at the bottom and top of the stack
    ventricles: np.ndarray  # ventricle size per slice, 0 where the slice misses them
    tissue: dict  # this scanner's signal per tissue: TISSUE with contrast jitter
    head: np.ndarray  # (3, steps) skull-and-scalp signal against distance outside the brain
    skull: np.ndarray  # thickness factor of skull and scalp along each pixel's ray
    sulcus_dist: np.ndarray  # px to the nearest sulcus line (gray matter lines the sulci)
    sulcus_depth: np.ndarray  # how deep the sulci reach, px below the brain surface
    texture: np.ndarray  # fine field for tissue heterogeneity
    spread: np.ndarray  # coarse field in [-2, 2] that makes edema lobulated
    bias: np.ndarray  # (3, SIZE, SIZE) multiplicative bias field per channel
    noise: float
    gain: np.ndarray
    lesions: list = field(default_factory=list)
    spots: list = field(default_factory=list)  # (row, col, slice) of FLAIR-bright white-matter spots


def synthesize(out_dir, patients: int, slices: int = 20, seed: int = 0) -> dict:
    """Write `patients` x `slices` image/mask TIFF pairs plus phantom.json under out_dir; return the ground truth.

    Patient i depends only on (seed, i), so a larger phantom extends a smaller one. At most half of each patient's
    slices hold a lesion (all of them when slices == 1) and every patient has at least one lesion slice.
    """
    for name, value, low in (("patients", patients, 1), ("slices", slices, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    patients, slices, seed = int(patients), int(slices), int(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, lesion_slices = [], 0
    for i in range(patients):
        pid = f"SYN_{i:03d}"
        rng = np.random.default_rng([seed, i])
        patient = draw_patient(rng, slices)
        areas = np.zeros(len(patient.lesions))
        (out / pid).mkdir(exist_ok=True)
        for n in range(slices):
            image, masks = render_slice(patient, n, rng)
            areas = np.maximum(areas, masks.sum(axis=(1, 2)))
            mask = masks.any(axis=0)
            lesion_slices += int(mask.any())
            stem = out / pid / f"{pid}_{n + 1}"
            tifffile.imwrite(f"{stem}.tif", image, photometric="rgb", **TIFF_OPTIONS)
            tifffile.imwrite(f"{stem}_mask.tif", mask.astype(np.uint8) * 255, photometric="minisblack", **TIFF_OPTIONS)
        for lesion, area in zip(patient.lesions, areas):
            table.append({"patient": pid, "center_rc": list(lesion.center),
                          "slices": [lesion.first + 1, lesion.last + 1],
                          "max_diameter_px": round(float(np.sqrt(4 * area / np.pi)), 1)})  # equivalent diameter
    truth = {"seed": seed, "patients": patients, "slices_per_patient": slices, "n_slices": patients * slices,
             "n_lesion_slices": lesion_slices, "lesion_free_fraction": 1 - lesion_slices / (patients * slices),
             "lesions": table}
    write_json_atomic(out / "phantom.json", truth)
    return truth


# --- drawing a patient: everything random happens here (and vessel dots and noise per slice) ---


def draw_patient(rng, slices: int) -> Patient:
    """Head geometry, tissue fields, scanner settings, lesions and distractors of one patient."""
    center = np.array([128 + rng.uniform(-5, 5), 128 + rng.uniform(-4, 4)], np.float32)
    axes = np.array([rng.uniform(84, 96), rng.uniform(68, 80)], np.float32)
    angle = np.arctan2(ROWS - center[0], COLS - center[1])
    egg = 1 + 0.04 * np.sin(angle)  # wider at the back (bottom rows) than at the front
    edge = egg * wobble(rng, angle, 0.01) / np.hypot(np.sin(angle) / axes[0], np.cos(angle) / axes[1])
    t = np.linspace(0, 1, slices, dtype=np.float32) if slices > 1 else np.array([0.5], np.float32)
    middle = rng.uniform(0.4, 0.55)
    tissue = {name: value * rng.uniform(0.92, 1.08, 3).astype(np.float32) for name, value in TISSUE.items()}
    patient = Patient(
        center=center, axes=axes, dist=np.hypot(ROWS - center[0], COLS - center[1]), edge=edge,
        profile=np.sqrt(np.clip(1 - ((t - middle) / rng.uniform(0.8, 0.95)) ** 2, 0.49, 1)),
        ventricles=np.sqrt(np.clip(1 - ((t - middle - rng.uniform(-0.05, 0.05)) / 0.22) ** 2, 0, 1)),
        tissue=tissue, head=head_profile(rng, tissue), skull=wobble(rng, angle, 0.08),
        sulcus_dist=sulcus_distance(rng, angle), sulcus_depth=18 + 5 * smooth_field(rng, 10),
        texture=smooth_field(rng, 1.5), spread=np.clip(smooth_field(rng, 6), -2, 2), bias=bias_field(rng),
        noise=rng.uniform(0.008, 0.03), gain=rng.uniform(0.45, 0.7, (3, 1, 1)).astype(np.float32))
    draw_lesions(rng, patient, slices)
    for _ in range(rng.integers(3, 9)):
        n = int(rng.integers(slices))
        patient.spots.append((*brain_point(rng, patient, patient.profile[n], 0.2, 0.7), n))
    return patient


def smooth_field(rng, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation: anatomy-like random structure."""
    noise = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE), dtype=np.float32), sigma)
    return noise / noise.std()


def wobble(rng, angle: np.ndarray, amount: float) -> np.ndarray:
    """1 + random 2nd-4th harmonics of the angle (at most `amount` in all): an irregular, star-shaped outline.

    Higher harmonics are weaker, so outlines are lumpy rather than polygonal.
    """
    result = np.ones_like(angle)
    for k, share in ((2, 0.45), (3, 0.33), (4, 0.22)):
        result += np.float32(amount * share * rng.uniform()) * np.cos(k * angle + np.float32(rng.uniform(0, 2 * np.pi)))
    return result


def bias_field(rng) -> np.ndarray:
    """A random quadratic surface per channel, rescaled to span about 0.7-1.3 like coil shading."""
    y, x = ROWS / (SIZE - 1) * 2 - 1, COLS / (SIZE - 1) * 2 - 1
    fields = []
    for _ in range(3):
        poly = sum(c * term for c, term in zip(rng.standard_normal(5), (x, y, x * y, x * x, y * y)))
        low, high = rng.uniform(0.7, 0.85), rng.uniform(1.15, 1.3)
        fields.append(low + (high - low) * (poly - poly.min()) / np.ptp(poly))
    return np.stack(fields).astype(np.float32)


def head_profile(rng, tissue: dict) -> np.ndarray:
    """Skull and scalp signal against distance outside the brain (a lookup table): random widths, 1 px soft steps."""
    edges = np.cumsum([rng.uniform(1.5, 2.5), rng.uniform(1.5, 2.5), rng.uniform(3, 5.5), rng.uniform(1.2, 2),
                       rng.uniform(4, 7)])
    xp = (edges[:, None] + [-0.5, 0.5]).ravel()
    fp = np.repeat([tissue[name] for name in HEAD_LAYERS], 2, axis=0)[1:-1]
    distance = np.arange(0, edges[-1] + 1, 1 / HEAD_STEPS_PER_PX)
    return np.stack([np.interp(distance, xp, fp[:, c]) for c in range(3)]).astype(np.float32)


def sulcus_distance(rng, angle: np.ndarray) -> np.ndarray:
    """Approximate px distance to the nearest sulcus; sulci are where a wiggly, mostly angular phase is 0 (mod 2 pi).

    Dividing the wrapped phase by its gradient gives lines of even width, with no blobs where the phase is flat.
    """
    wave = np.exp(1j * (int(rng.integers(26, 34)) * angle + 4 * smooth_field(rng, 8) + smooth_field(rng, 3)))
    d_row, d_col = np.gradient(wave)
    return (np.abs(np.angle(wave)) / np.maximum(np.hypot(np.abs(d_row), np.abs(d_col)), 1e-3)).astype(np.float32)


def brain_point(rng, p: Patient, scale: float, inner: float, outer: float, margin: float = 0.0) -> tuple[int, int]:
    """A random pixel between fractions inner..outer of the brain ellipse (scaled, then shrunk by margin px)."""
    u, phi = np.sqrt(rng.uniform(inner**2, outer**2)), rng.uniform(0, 2 * np.pi)
    semi = p.axes * scale * 0.95 - margin  # 0.95: the outline's wobble and egg shape pull it in by up to 5 %
    return int(round(p.center[0] + u * semi[0] * np.sin(phi))), int(round(p.center[1] + u * semi[1] * np.cos(phi)))


def draw_lesions(rng, p: Patient, slices: int) -> None:
    """2-6 non-touching lesions whose slices together stay within 30-50 % of the stack."""
    budget, used = max(1, int(slices * rng.uniform(0.3, 0.5))), set()
    for _ in range(rng.integers(2, 7)):
        radius = np.exp(rng.uniform(*np.log(DIAMETERS_PX))) / 2
        first, last = choose_slices(rng, min(slices, max(1, int(2 * radius // SLICE_GAP_PX))), used, budget, slices)
        scale = p.profile[first : last + 1].min()
        for _ in range(200):  # a free spot practically always exists; if not, this lesion is left out
            center = brain_point(rng, p, scale, 0.45, 1.0, margin=1.25 * radius + 6)
            if all(np.hypot(center[0] - o.center[0], center[1] - o.center[1]) > 1.3 * (radius + o.radius) + 3
                   for o in p.lesions):
                break
        else:
            continue
        used.update(range(first, last + 1))
        edema = radius * rng.uniform(1.2, 2.5) + rng.uniform(2, 6)  # always wider than the lesion
        half = int(np.ceil(edema * 1.12 * 1.6)) + 2  # widest reach: outline wobble x lobulation
        box = tuple(slice(max(0, x - half), min(SIZE, x + half + 1)) for x in center)
        rows, cols = ROWS[box] - center[0], COLS[box] - center[1]
        outline = wobble(rng, np.arctan2(rows, cols), 0.12)
        p.lesions.append(Lesion(center, first, last, radius, edema, box, np.hypot(rows, cols), outline))


def choose_slices(rng, span: int, used: set, budget: int, slices: int) -> tuple[int, int]:
    """A random run of `span` slices that keeps the patient's lesion slices within budget (shorter if it must be)."""
    while True:
        starts = [f for f in range(slices - span + 1) if len(used | set(range(f, f + span))) <= budget]
        if starts:
            first = starts[rng.integers(len(starts))]
            return first, first + span - 1
        span -= 1  # span 1 always fits: on a slice already used, or on any slice while none is


# --- rendering one slice ---


def render_slice(p: Patient, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 image of slice n and one boolean mask per lesion (empty where the lesion misses the slice)."""
    outside = p.dist - p.edge * p.profile[n]  # signed px distance from the brain surface, > 0 outside
    depth = -outside
    steps = np.clip(outside / p.skull * HEAD_STEPS_PER_PX, 0, p.head.shape[1] - 1).astype(np.intp)
    image = np.take(p.head, steps, axis=1)  # (3, SIZE, SIZE), C-contiguous: painting stays fast
    brain = np.clip(depth + 0.5, 0, 1)
    ventricles, nuclei = central_structures(p, p.ventricles[n])
    cortex = np.clip((p.sulcus_depth + 2 - depth) / 2, 0, 1) * np.clip(3.5 - p.sulcus_dist, 0, 1)
    gray = np.maximum(np.maximum(np.clip((3 - depth) / 1.5, 0, 1), cortex), nuclei)
    white = 1 - gray
    tissue = (p.tissue["white"][:, None, None] + gray * (p.tissue["gray"] - p.tissue["white"])[:, None, None])
    paint(image, brain, tissue * (1 + 0.04 * p.texture))
    sulci = np.clip((p.sulcus_depth - depth) / 2, 0, 1) * np.clip(1.2 - p.sulcus_dist, 0, 1)
    fissure = np.clip(1.2 - np.abs(COLS - p.center[1]), 0, 1) * np.clip((30 - depth) / 6, 0, 1)
    csf = np.maximum(np.maximum(sulci, fissure), ventricles)
    paint(image, brain * csf, p.tissue["csf"])
    paint(image, brain * dots([(r, c) for r, c, m in p.spots if m == n], 1.3), p.tissue["wm_spot"])
    masks = np.zeros((len(p.lesions), SIZE, SIZE), bool)
    for k, lesion in enumerate(p.lesions):
        edema = lesion.section(n, lesion.edema_radius)
        if edema > 0:
            reach = edema * lesion.outline * (1 + 0.3 * p.spread[lesion.box])
            coverage = np.clip((reach - lesion.dist) / (0.3 * edema + 1), 0, 1)
            spreads = brain[lesion.box] * (1 - csf[lesion.box]) * (0.5 + 0.5 * white[lesion.box])  # mostly in WM
            paint(image, spreads * coverage, p.tissue["edema"], lesion.box)
        if lesion.first <= n <= lesion.last:
            masks[k][lesion.box] = paint_lesion(image, lesion, n, p)
    vessels = [brain_point(rng, p, p.profile[n], 0.1, 0.95) for _ in range(rng.integers(4, 12))]
    paint(image, dots(vessels, 0.7), p.tissue["vessel"])
    return scan(image, p, rng), masks


def paint(image: np.ndarray, alpha: np.ndarray, tissue: np.ndarray, box=(slice(None), slice(None))) -> None:
    """Blend a tissue (3 values, or 3 channels over the box) into image[:, box] with coverage alpha (soft edges)."""
    region = image[:, box[0], box[1]]
    target = tissue if tissue.ndim == 3 else tissue[:, None, None]
    region += alpha * (target - region)


def central_structures(p: Patient, size: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of the lateral ventricles (CSF) and of the deep gray nuclei, which grow with size (0: none).

    The ventricles are two crescents either side of the midline, indented laterally by the caudate heads; the
    lentiform nuclei lie lateral to them and the thalami behind them.
    """
    csf, gray = np.zeros((SIZE, SIZE), np.float32), np.zeros((SIZE, SIZE), np.float32)
    if size > 0:
        r, c = int(p.center[0]), int(p.center[1])
        box = np.s_[r - 48 : r + 48, c - 48 : c + 48]  # holds them all, and is 7x cheaper than the whole image
        rows, cols = ROWS[box], COLS[box]
        for side in (-1, 1):
            center = (p.center[0] - 4, p.center[1] + side * (4 + 5 * size))
            horn = ellipse(rows, cols, center, (6 + 22 * size, 2 + 5 * size), -side * 0.25)
            caudate = ellipse(rows, cols, (center[0] - 6, center[1] + side * (5 + 5 * size)),
                              (6 + 10 * size, 3 + 3 * size), 0)
            csf[box] = np.maximum(csf[box], horn * (1 - caudate))
            lentiform = ellipse(rows, cols, (p.center[0] - 2, p.center[1] + side * (20 + 6 * size)),
                                (4 + 12 * size, 2 + 5 * size), side * 0.35)
            thalamus = ellipse(rows, cols, (p.center[0] + 16, p.center[1] + side * 9), (3 + 8 * size, 2 + 6 * size), 0)
            gray[box] = np.maximum(gray[box], 0.8 * np.maximum(lentiform, thalamus))
    return csf, gray


def ellipse(rows: np.ndarray, cols: np.ndarray, center, axes, angle: float) -> np.ndarray:
    """Soft coverage of a rotated ellipse on the given pixel grid."""
    dr, dc = rows - center[0], cols - center[1]
    u, v = dr * np.cos(angle) - dc * np.sin(angle), dr * np.sin(angle) + dc * np.cos(angle)
    return np.clip((1 - np.hypot(u / axes[0], v / axes[1])) * min(axes) + 0.5, 0, 1)


def dots(points, sigma: float) -> np.ndarray:
    """Coverage of soft round (gaussian) dots of peak 1 at the given pixels, which lie inside the head."""
    half = int(3 * sigma) + 1
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    stamp = np.exp(-(offsets[:, None] ** 2 + offsets**2) / (2 * sigma**2))
    coverage = np.zeros((SIZE, SIZE), np.float32)
    for r, c in points:
        window = coverage[r - half : r + half + 1, c - half : c + half + 1]
        np.maximum(window, stamp, out=window)
    return coverage


def paint_lesion(image: np.ndarray, lesion: Lesion, n: int, p: Patient) -> np.ndarray:
    """Paint the lesion's cross-section at slice n (ring-enhancing if large); return its mask over lesion.box."""
    radius = max(lesion.section(n, lesion.radius), 1.0)
    reach = np.maximum(radius * lesion.outline, 1.0)  # >= 1 px: at least the centre pixel and its 4 neighbours
    heterogeneous = p.tissue["lesion"][:, None, None] * (1 + LESION_HETEROGENEITY * p.texture[lesion.box])
    paint(image, np.clip(reach - lesion.dist + 0.5, 0, 1), heterogeneous, lesion.box)
    rim = np.clip(0.25 * radius, 1.5, 3.0)
    if 2 * lesion.radius > RING_DIAMETER_PX and radius - rim > 1:
        paint(image, np.clip(reach - rim - lesion.dist + 0.5, 0, 1), p.tissue["necrosis"], lesion.box)
    return lesion.dist <= reach


def scan(signal: np.ndarray, p: Patient, rng) -> np.ndarray:
    """Acquisition: bias field, Rician noise (magnitude of complex gaussian noise), scanner gain; channel-last uint8."""
    real, imaginary = rng.standard_normal((2, 3, SIZE, SIZE), dtype=np.float32) * np.float32(p.noise)
    real += signal * p.bias
    magnitude = np.sqrt(real * real + imaginary * imaginary)  # np.hypot is several times slower
    return np.clip(np.rint(255 * p.gain * magnitude), 0, 255).astype(np.uint8).transpose(1, 2, 0)
