"""NIfTI-1 (.nii, .nii.gz): read as axial slices in the radiological view, and a mask stack written back in the
upload's geometry (the package docstring of metaseg.imageio)."""

from __future__ import annotations

import gzip
import io
import math

import nibabel as nib
import numpy as np

from metaseg.errors import Unsupported, UserError
from metaseg.imageio.base import assemble, decoder_errors, error, zero_non_finite
from metaseg.imageio.detect import GZIP_MAGIC, GZIP_WBITS, gunzip_head
from metaseg.imageio.limits import Budget, Limits, inflate
from metaseg.imageio.volume import Volume


def to_nifti_bytes(masks: np.ndarray, volume: Volume) -> bytes:
    """A (frames, rows, cols) mask stack of `volume` as gzipped NIfTI-1, uint8 0/1, in the volume's geometry (see the
    package docstring): a NIfTI upload's mask on its own voxels (shape, voxel order, affine), and `decode` of any gives
    the masks back in the volume's frame order."""
    masks = np.asarray(masks)
    rows, cols = volume.frames[0].shape
    if masks.shape != (len(volume.frames), rows, cols):
        raise ValueError(f"expected {len(volume.frames)} masks of {rows}x{cols}, got shape {masks.shape}")
    to_voxel = volume.voxel_index if volume.voxel_index is not None else frame_to_nifti(rows, cols)
    affine = volume.affine if volume.affine is not None else _grid_affine(volume)
    stored = np.ascontiguousarray(_regrid((masks != 0).astype(np.uint8), to_voxel))
    image = nib.Nifti1Image(stored, affine @ np.linalg.inv(to_voxel))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code="aligned")  # aligned to the upload; the sform says the same
    image.set_sform(image.affine, code="aligned")
    return gzip.compress(image.to_bytes(), compresslevel=6)


_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "micron": 1e-3, "meter": 1e3}
_AS_STORED = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)  # the orientation that keeps the voxels as stored


def decode_nifti(files: list[tuple[str, bytes]], limits: Limits) -> Volume:
    """One NIfTI-1 image (.nii or .nii.gz, 2D or 3D) as axial slices (see the package docstring)."""
    if len(files) > 1:
        raise UserError(f"upload one NIfTI file at a time ({len(files)} were uploaded)")
    name, data = files[0]
    gzipped = data.startswith(GZIP_MAGIC)
    header, shape, needed = _nifti_header(name, gunzip_head(name, data) if gzipped else data)
    Budget(limits).reserve(name, shape[2], shape[1], shape[0], 1, header.get_data_dtype().itemsize)
    if gzipped:  # only now that the header's size fits the budget
        data = inflate(name, data, GZIP_WBITS, limits.max_inflated_bytes)
    if len(data) < needed:
        raise error(name, f"NIfTI image is truncated ({len(data)} of {needed} bytes)")
    with decoder_errors(name, "corrupt NIfTI image"):
        image = nib.Nifti1Image.from_bytes(data)
        voxels = image.get_fdata(dtype=np.float32).reshape(shape)
        affine = image.affine
        orientation = nib.orientations.io_orientation(affine)
    del image, data  # the raw bytes are not needed beyond here
    zooms = _nifti_zooms_mm(header)
    if np.isnan(orientation).any():  # a degenerate affine leaves the data as stored, and says nothing of geometry
        orientation, affine = _AS_STORED, None
    ras_axes = np.argsort(orientation[:, 0])  # the stored axis along R, A, S
    x, y, _ = (shape[i] for i in ras_axes)
    zooms = tuple(zooms[i] for i in ras_axes)
    voxel_index = nib.orientations.inv_ornt_aff(orientation, shape) @ frame_to_nifti(y, x)
    voxels = zero_non_finite(voxels)  # in place (get_fdata made a float32 copy): one copy of the volume fewer
    stack = _regrid(voxels, np.linalg.inv(voxel_index))  # (frames, rows, cols), a view
    frames = [np.ascontiguousarray(frame) for frame in stack]
    sources = [(0, k) for k in range(len(frames))]
    spacing = (zooms[1], zooms[0]) if None not in zooms[:2] else None
    affine = None if affine is None else affine @ voxel_index
    return assemble("nifti", files, frames, sources, spacing, zooms[2], affine=affine, voxel_index=voxel_index)


def frame_to_nifti(rows: int, cols: int) -> np.ndarray:
    """(frame, row, col, 1) -> the voxel (x, y, z, 1) of the RAS+ array it was read from: frame k is
    `data[:, :, k].T[::-1, ::-1]` (package docstring)."""
    return np.array([[0, 0, -1, cols - 1], [0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _regrid(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`array` laid out on the grid its voxel indices go to by `index` (4x4, axes permuted and flipped, never
    resampled): the one step between a NIfTI's own voxels and the frames, both ways."""
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(index))


def _grid_affine(volume: Volume) -> np.ndarray:
    """For a volume without geometry: frames on a grid of its pixel spacing and slice thickness (else 1 mm), laid out
    as the reading convention reads a NIfTI whose affine is that diagonal."""
    rows, cols = volume.frames[0].shape
    row_mm, col_mm = volume.pixel_spacing_mm or (1.0, 1.0)
    return np.diag([col_mm, row_mm, volume.slice_thickness_mm or 1.0, 1.0]) @ frame_to_nifti(rows, cols)


def _nifti_header(name: str, data: bytes) -> tuple[nib.Nifti1Header, tuple[int, int, int], int]:
    """The header, the (x, y, z) shape and the bytes the image needs, read before any voxel."""
    with decoder_errors(name, "invalid NIfTI header"):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(data), check=True)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        needed = int(header["vox_offset"]) + math.prod(shape) * dtype.itemsize
    if dtype.kind not in "biuf":
        raise error(name, f"unsupported NIfTI data type {dtype}", Unsupported)
    if len(shape) < 2:
        raise error(name, f"NIfTI image has {len(shape)} dimension(s), need 2 or 3")
    volumes = math.prod(shape[3:])
    if volumes != 1:
        problem = f"NIfTI image of shape {shape} holds {volumes} volumes; upload one 3D volume"
        raise error(name, problem)
    return header, (shape + (1,))[:3], needed


def _nifti_zooms_mm(header: nib.Nifti1Header) -> tuple[float | None, float | None, float | None]:
    """Voxel size along x, y, z in mm; None where the header gives no usable size."""
    mm = _MM_PER_UNIT.get(header.get_xyzt_units()[0], 1.0)
    pixdim = header["pixdim"][1:4]
    return tuple(float(z) * mm if np.isfinite(z) and z > 0 else None for z in pixdim)
