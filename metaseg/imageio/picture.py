"""PNG, JPEG and TIFF (also multi-page): decoded with PIL, imagecodecs and tifffile; and a mask written as PNG."""

from __future__ import annotations

import io
import warnings

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from metaseg.errors import TooLarge, Unsupported
from metaseg.imageio.base import assemble, decoder_errors, error, finite_float32, one_channel, reason, three_sequences
from metaseg.imageio.limits import Budget, Limits
from metaseg.imageio.volume import Volume

_EXIF_ORIENTATION = 0x0112  # also the TIFF Orientation tag
_ORIENTATIONS = {  # EXIF/TIFF orientation -> how to turn the stored array into the displayed one
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_PIL_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}  # other modes: 1 byte per sample
_TIFF_AXES = set("YXS")


def to_png_bytes(mask: np.ndarray) -> bytes:
    """Encode a 2D mask (uint8 0/255, or bool) as PNG in memory, for the server and the CLI."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"expected a 2D uint8 or bool mask, got {mask.dtype} {mask.shape}")
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()



def _orient(pixels: np.ndarray, orientation) -> np.ndarray:
    """Apply an EXIF/TIFF orientation to the first two axes of (rows, cols[, channels])."""
    transform = _ORIENTATIONS.get(orientation)
    return transform(pixels) if transform else pixels


def decode_pictures(files: list[tuple[str, bytes]], kind: str, limits: Limits) -> Volume:
    """PNG, JPEG or TIFF files: their frames in upload order."""
    budget = Budget(limits)
    read = _read_tiff if kind == "tiff" else _read_pil
    frames, sequences, sources = [], [], []
    for file_index, (name, data) in enumerate(files):
        for frame_index, pixels in read(name, data, kind, budget):
            budget.tick(name)
            frames.append(finite_float32(name, one_channel(name, pixels)))
            sequences.append(three_sequences(name, pixels))
            sources.append((file_index, frame_index))
    return assemble(kind, files, frames, sources, sequences=sequences)


def _open_pil(name: str, data: bytes, fmt: str) -> Image.Image:
    """Read the header only; PIL's decompression-bomb warning becomes an error like the bomb error.

    (warnings.catch_warnings is process-wide; a concurrent decode at worst also sees the filter.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise error(name, f"cannot read {fmt} header: {reason(exc)}", TooLarge) from None


def _is_16bit_color_png(data: bytes) -> bool:
    """PIL cuts 16-bit RGB(A) and gray+alpha PNGs to 8 bits; IHDR says bit depth and color type."""
    return data[24] == 16 and data[25] in (2, 4, 6)


def _read_pil(name: str, data: bytes, kind: str, budget: Budget) -> list[tuple[int, np.ndarray]]:
    """A PNG or JPEG as [(0, pixels)]; of an animated PNG only the first frame."""
    fmt = _PIL_FORMATS[kind]
    with decoder_errors(name, f"cannot read {fmt} header"):
        image = _open_pil(name, data, fmt)
        samples = 4 if image.mode in ("P", "PA") else len(image.getbands())  # palette: expanded to RGBA
        wide = kind == "png" and _is_16bit_color_png(data)
    budget.reserve(name, 1, image.height, image.width, samples, 2 if wide else _PIL_SAMPLE_BYTES.get(image.mode, 1))
    with decoder_errors(name, f"corrupt or truncated {fmt} image"):
        if wide:
            pixels = imagecodecs.png_decode(data)
        elif image.mode in ("P", "PA"):
            pixels = np.asarray(image.convert("RGBA"))
        else:
            pixels = np.asarray(image)
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    one_channel(name, pixels)  # an unsupported layout fails here, before anything else is done with it
    return [(0, _orient(pixels, orientation))]


def _read_tiff(name: str, data: bytes, kind: str, budget: Budget) -> list[tuple[int, np.ndarray]]:
    """All full-resolution pages of a TIFF as [(page index, pixels)]."""
    with decoder_errors(name, "cannot read TIFF"):
        tiff = tifffile.TiffFile(io.BytesIO(data))
    with tiff:
        frames = []
        for page in _tiff_image_pages(name, tiff, budget):
            budget.tick(name)
            with decoder_errors(name, f"corrupt TIFF page {page.index}"):
                pixels = page.asarray()
            if "S" in page.axes:
                pixels = np.moveaxis(pixels, page.axes.index("S"), -1)
            one_channel(name, pixels)
            pixels = _orient(pixels, _tiff_orientation(page))
            frames.append((page.index, pixels))
    return frames


def _tiff_orientation(page: tifffile.TiffPage) -> int:
    tag = page.tags.get(_EXIF_ORIENTATION)
    return tag.value if tag else 1


def _tiff_image_pages(name: str, tiff: tifffile.TiffFile, budget: Budget) -> list:
    """The pages to decode, each reserved in the budget first; reduced pages are thumbnails."""
    pages = []
    with decoder_errors(name, "corrupt TIFF directory"):
        for page in tiff.pages:
            if page.is_reduced:
                continue
            if not set(page.axes) <= _TIFF_AXES:
                raise error(name, f"TIFF page {page.index} has unsupported axes {page.axes!r}", Unsupported)
            sample_bytes = -(-int(page.bitspersample) // 8)  # 1..8 bits: 1 byte, 12: 2, 64: 8
            budget.reserve(name, 1, page.imagelength, page.imagewidth, page.samplesperpixel, sample_bytes)
            pages.append(page)
    if not pages:
        raise error(name, "TIFF holds no image")
    return pages
