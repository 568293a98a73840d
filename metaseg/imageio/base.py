"""What every format reader shares: errors that name the file, decoder exceptions wrapped as the user's problem,
float32 frames without non-finite values, the channel rule and the assembly of a Volume."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
from pydicom.dataset import Dataset

from metaseg.conventions import FLAIR_CHANNEL
from metaseg.errors import Unsupported, UserError
from metaseg.imageio.volume import Volume

log = logging.getLogger(__name__)

def error(name: str, problem: str, category: type[UserError] = UserError) -> UserError:
    """A UserError (or subclass) naming the file; the name is quoted so that it cannot break the line."""
    return category(f"{str(name)[:100]!r}: {problem}")


def reason(exc: BaseException) -> str:
    """A decoder's exception as one short line, without the repr of our in-memory buffer."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))
    return " ".join(text.split())[:300] or type(exc).__name__


@contextlib.contextmanager
def decoder_errors(name: str, what: str) -> Iterator[None]:
    """Third-party decoders raise anything on hostile bytes; report it as the user's problem."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise error(name, f"{what}: {reason(exc)}") from exc



def finite_float32(name: str, pixels: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy in which NaN/inf became 0 (see the package docstring)."""
    if pixels.dtype.kind not in "biuf":
        raise error(name, f"unsupported pixel type {pixels.dtype}", Unsupported)
    with np.errstate(over="ignore", invalid="ignore"):  # float64 beyond float32 becomes inf
        values = np.array(pixels, dtype=np.float32, order="C")
    return zero_non_finite(values)


def zero_non_finite(values: np.ndarray) -> np.ndarray:
    """Replace NaN/inf by 0 in place (see the package docstring)."""
    non_finite = ~np.isfinite(values)
    if non_finite.any():
        log.warning("replaced %d non-finite pixel values with 0", int(non_finite.sum()))
        values[non_finite] = 0.0
    return values


def assemble(
    kind: str,
    files: list[tuple[str, bytes]],
    frames: list[np.ndarray],
    sources: list[tuple[int, int]],
    spacing: tuple[float, float] | None = None,
    thickness: float | None = None,
    datasets: Sequence[Dataset] = (),
    sequences: list[np.ndarray | None] | None = None,
    affine: np.ndarray | None = None,
    voxel_index: np.ndarray | None = None,
) -> Volume:
    """Assemble the result, insisting that all slices share one size, as slices of a series do."""
    rows, cols = frames[0].shape
    for frame, (file_index, _) in zip(frames, sources):
        if frame.shape != (rows, cols):
            size = "x".join(map(str, frame.shape))
            problem = f"slice of {size} differs from the first, {rows}x{cols}"
            raise error(files[file_index][0], problem)
    if sequences is not None and all(s is None for s in sequences):
        sequences = None
    return Volume(kind, frames, sources, spacing, thickness, tuple(datasets), sequences, affine,
                  voxel_index=voxel_index)



_CHANNEL_BY_COUNT = {1: 0, 2: 0, 3: FLAIR_CHANNEL, 4: FLAIR_CHANNEL}  # gray(+alpha): gray; RGB(A): FLAIR


def one_channel(name: str, pixels: np.ndarray) -> np.ndarray:
    """(rows, cols[, channels]) -> (rows, cols) by the channel rule of the package docstring."""
    if pixels.ndim == 2:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] in _CHANNEL_BY_COUNT:
        return pixels[:, :, _CHANNEL_BY_COUNT[pixels.shape[2]]]
    raise error(name, f"unsupported pixel layout {pixels.shape}", Unsupported)


def three_sequences(name: str, pixels: np.ndarray) -> np.ndarray | None:
    """(rows, cols, 3+) -> channels 0-2 as float32 (3, rows, cols); None for a one- or two-channel image."""
    if pixels.ndim != 3 or pixels.shape[2] < 3:
        return None
    return finite_float32(name, np.moveaxis(pixels[:, :, :3], -1, 0))
