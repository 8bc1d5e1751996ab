"""Writing a de-identified DICOM series in the layout of the series it came from.

It keeps the input's layout (classic stays classic, enhanced stays enhanced, same frame order, same
Rows/Columns, positions, orientation, spacing) and its rescale: the stored values written are
``round((value - intercept) / slope)``, so a voxel copied from the input gets back its stored value bit for
bit; Bits Stored grows if a written value needs it. Output is always Explicit VR Little Endian.
The headers are cleaned by :mod:`.confidentiality` (PS3.15 Basic profile).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from ..errors import InputError
from .confidentiality import UIDMap, deidentify_dataset, mark_deidentified
from .reading import PIXEL_DATA, DicomSource

_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def write_series(
    image: sitk.Image,
    source: DicomSource,
    out_dir: Path,
    *,
    method: str,
    tool_version: str,
    uid_map: UIDMap,
    date_shift_days: Optional[int] = None,
) -> List[Path]:
    """Write ``image`` (on the source grid) as a de-identified DICOM series into the new folder ``out_dir``.

    Same frame layout, geometry and rescale as the source; headers cleaned (PS3.15 Basic profile, see the
    module docstring); new UIDs from ``uid_map``. Atomic: the files are written into a temporary folder
    beside ``out_dir`` that is renamed at the end; on any error nothing is left. Returns the files written.
    """
    out_dir = Path(out_dir)
    _check_grid(image, source)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir}: the output folder exists and is not empty")
    stored = _stored_values(sitk.GetArrayFromImage(image), source)
    bits = _bits_needed(stored, source.datasets[0])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        if source.enhanced:
            frames = np.empty_like(stored)
            frames[np.asarray(source.frame_of_slice)] = stored
            names = [
                _write_file(
                    source.datasets[0],
                    frames,
                    bits,
                    staging / "0001.dcm",
                    method,
                    tool_version,
                    uid_map,
                    date_shift_days,
                )
            ]
        else:
            names = [
                _write_file(
                    ds, stored[k], bits, staging / f"{k + 1:04d}.dcm", method, tool_version, uid_map, date_shift_days
                )
                for k, ds in enumerate(source.datasets)
            ]
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the series from other users of a share
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in names]


def _check_grid(image: sitk.Image, source: DicomSource) -> None:
    if image.GetDimension() != 3 or tuple(image.GetSize()) != tuple(source.size):
        raise ValueError(f"image size {image.GetSize()} differs from the DICOM source {source.size}")
    for have, want, what in (
        (image.GetOrigin(), source.origin, "origin"),
        (image.GetSpacing(), source.spacing, "spacing"),
        (image.GetDirection(), source.direction, "direction"),
    ):
        if not np.allclose(have, want, rtol=1e-6, atol=1e-4):
            raise ValueError(f"image {what} {have} differs from the DICOM source {want}")


def _stored_values(values: np.ndarray, source: DicomSource) -> np.ndarray:
    """KJI real-world values -> stored values of the source's type, ``round((value - intercept) / slope)``."""
    header = source.datasets[0]
    signed = int(header.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{int(header.BitsAllocated) // 8}")
    info = np.iinfo(dtype)
    if source.rescale == (1.0, 0.0) and values.dtype.kind in "iu":
        return np.clip(values, info.min, info.max).astype(dtype)
    slope, intercept = source.rescale
    stored = np.rint((np.nan_to_num(values.astype(np.float64)) - intercept) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _bits_needed(stored: np.ndarray, header: Dataset) -> int:
    """Bits Stored: the source's, or more when a written value needs it (never above Bits Allocated)."""
    low, high = int(stored.min()), int(stored.max())
    signed = int(header.get("PixelRepresentation", 0)) == 1
    needed = max(high.bit_length(), (-low - 1).bit_length()) + (1 if signed else 0)
    return min(int(header.BitsAllocated), max(int(header.BitsStored), needed))


def _write_file(
    template: Dataset,
    pixels: np.ndarray,
    bits: int,
    path: Path,
    method: str,
    tool_version: str,
    uid_map: UIDMap,
    date_shift_days: Optional[int],
) -> str:
    ds = _copy_header(template)
    enhanced = str(ds.SOPClassUID) == _ENHANCED_MR or "PerFrameFunctionalGroupsSequence" in ds
    deidentify_dataset(ds, uid_map, date_shift_days, enhanced=enhanced)
    mark_deidentified(ds, method, tool_version, date_shift_days)
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    ds[PIXEL_DATA].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta
    _save(ds, path)
    return path.name


def _copy_header(template: Dataset) -> Dataset:
    """Deep copies of the public elements in a fresh Dataset: no file preamble (vendors hide text there), no
    private blocks, and the source stays usable for another write."""
    ds = Dataset()
    for tag in template.keys():
        if not tag.is_private:
            ds.add(copy.deepcopy(template[tag]))
    return ds


def _save(ds: Dataset, path: Path) -> None:
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:  # pydicom 2.x (Slicer 5.8's Python 3.9)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
