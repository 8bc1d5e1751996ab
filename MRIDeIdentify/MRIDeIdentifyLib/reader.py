"""Reading head scans: NIfTI, NRRD, MetaImage, FreeSurfer MGZ and DICOM series, checked for usability.

Everything is read into a 3-D scalar ``SimpleITK.Image`` that keeps the stored pixel type and the exact
grid (size, spacing, origin, direction in LPS). Anything unusable raises :class:`errors.InputError`
with one line saying why.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MGH_SUFFIXES = (".mgz", ".mgh")
DICOM_SUFFIXES = (".dcm", ".ima")
IMAGE_SUFFIXES = ITK_SUFFIXES + MGH_SUFFIXES


def image_stem(path: Path) -> str:
    """The file name without its image suffix (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``); other names as they are."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
# Fewer voxels than this along an axis is a slice or a line, not a head volume.
MIN_VOXELS_PER_AXIS = 4


@dataclass
class Volume:
    """A scan as read: ``image`` (3-D scalar, stored pixel type), its ``format`` family, and for DICOM the
    ``dicom`` source needed to write a de-identified series back (``dicom.DicomSource``)."""

    image: sitk.Image
    format: str
    dicom: Optional[Any] = None


def format_of(path: Path) -> str:
    """The format family of a path: 'nifti', 'nrrd', 'metaimage', 'mgh' or 'dicom' (folders are DICOM)."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    if name.endswith(MGH_SUFFIXES):
        return "mgh"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    raise InputError(f"{path.name}: unsupported file type (use .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .mgz, "
                     "or a DICOM series folder)")


def read_volume(path: Path, series_uid: Optional[str] = None) -> Volume:
    """Read ``path`` (file or DICOM folder) into a checked :class:`Volume`; the file is never modified."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    kind = format_of(path)
    if kind == "dicom":
        from . import dicom
        folder, uid = (path, series_uid) if path.is_dir() else (path.parent, series_uid or _series_of(path))
        image, source = dicom.read_series(folder, uid)
        return Volume(check_volume(image, path.name), "dicom", source)
    if path.is_dir():
        raise InputError(f"{path}: is a folder but holds no DICOM series")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: the file is empty")
    if kind == "mgh":
        image = _read_mgh(path)
    else:
        image = _read_itk(path)
    return Volume(check_volume(image, path.name), kind)


def check_volume(image: sitk.Image, name: str = "input") -> sitk.Image:
    """Return a 3-D scalar image usable as a head scan, or raise InputError saying what is wrong.

    A 4-D image holding a single volume is reduced to 3-D (same grid); a true time series is refused.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector image); a scalar MRI volume is needed")
    dimension = image.GetDimension()
    if dimension == 4:
        volumes = image.GetSize()[3]
        if volumes != 1:
            raise InputError(f"{name}: is a 4-D series of {volumes} volumes; give a single 3-D volume")
        image = image[:, :, :, 0]
    elif dimension != 3:
        raise InputError(f"{name}: is a {dimension}-D image; a 3-D head volume is needed")
    size = image.GetSize()
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{name}: is only {min(size)} voxel(s) thick ({'x'.join(map(str, size))}); "
                         "a 3-D head volume is needed")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{name}: contains NaN or infinite voxel values")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{name}: every voxel has the same value ({low}); there is no head to de-identify")
    return image


def _read_itk(path: Path) -> sitk.Image:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    failure = None
    with _captured_stderr() as messages:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            failure = _itk_reason(error)
    # MetaIO says what is wrong with a missing or short data file on stderr, and may still return an image;
    # its words beat ITK's exception, which often carries only a stale errno.
    complaint = "".join(messages).strip()
    if complaint:
        raise InputError(f"{path.name}: cannot be read completely ({' '.join(complaint.split())[:200]})")
    if failure is not None:
        raise InputError(f"{path.name}: cannot be read as an image ({failure})")
    return image


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader lets through: damaged gzip, a data section shorter than the header promises
    (zero-filled) and NaN/inf voxels (turned into 0, which would break the bit-identical brain)."""
    import nibabel as nib
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except (OSError, EOFError) as error:
        what = "gzip stream" if path.name.lower().endswith(".gz") else "data"
        raise InputError(f"{path.name}: damaged or truncated {what} ({error})") from None
    except Exception as error:  # nibabel raises ValueError/ImageFileError/... for inconsistent headers
        raise InputError(f"{path.name}: cannot be read as NIfTI ({str(error).splitlines()[0]})") from None
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        raise InputError(f"{path.name}: contains NaN or infinite voxel values")


@contextmanager
def _captured_stderr() -> Iterator[List[str]]:
    """Collect what native code writes to file descriptor 2 (ITK's MetaIO warnings) instead of printing it.

    The yielded list holds the captured text once the block has ended.
    """
    sys.stderr.flush()
    captured: List[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read())


def _itk_reason(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else "unknown reason"


def _read_mgh(path: Path) -> sitk.Image:
    """FreeSurfer .mgz/.mgh via nibabel, converted to a SimpleITK image with the same RAS->LPS geometry."""
    import nibabel as nib
    try:
        mgh = nib.load(str(path))
        data = np.asanyarray(mgh.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files
        raise InputError(f"{path.name}: cannot be read as an MGH/MGZ image ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path.name}: is a {data.ndim}-D image; a 3-D head volume is needed"
                         if data.ndim != 4 else
                         f"{path.name}: is a 4-D series of {data.shape[3]} volumes; give a single 3-D volume")
    # MGH stores big-endian voxels; SimpleITK takes native byte order only (same values, same dtype).
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    set_ras_affine(image, mgh.affine)
    return image


def set_ras_affine(image: sitk.Image, affine: np.ndarray) -> None:
    """Give ``image`` the geometry of a nibabel voxel->RAS ``affine`` (SimpleITK stores LPS)."""
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    flip = np.diag([-1.0, -1.0, 1.0])
    image.SetSpacing(spacing.tolist())
    image.SetDirection((flip @ direction).ravel().tolist())
    image.SetOrigin((flip @ affine[:3, 3]).tolist())


def ras_affine(image: sitk.Image) -> np.ndarray:
    """The nibabel voxel->RAS affine of ``image`` (the inverse of :func:`set_ras_affine`)."""
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = flip @ np.asarray(image.GetOrigin(), float)
    return affine


def _series_of(path: Path) -> str:
    import pydicom
    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                   .SeriesInstanceUID)
    except Exception as error:
        raise InputError(f"{path.name}: not a readable DICOM file ({error})") from None
