"""Reading head scans: NIfTI, NRRD, MetaImage, FreeSurfer MGZ and DICOM series, checked for usability.

Everything is read into a 3-D scalar ``SimpleITK.Image`` that keeps the stored pixel type and the exact
grid (size, spacing, origin, direction in LPS). Anything unusable raises :class:`errors.InputError`
with one line saying why.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np
import SimpleITK as sitk

from .errors import InputError, itk_reason, without_path

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


def image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """``array`` (KJI, any dtype; copied) as an image on ``reference``'s grid: its spacing (mm), origin and
    direction (LPS). ``array.shape`` must be ``reference``'s size reversed."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


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
    raise InputError(
        f"{path.name}: unsupported file type (use .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, .mgz, "
        "or a DICOM series folder)"
    )


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
        raise InputError(
            f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(colour or vector image); a scalar MRI volume is needed"
        )
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
        raise InputError(
            f"{name}: is only {min(size)} voxel(s) thick ({'x'.join(map(str, size))}); a 3-D head volume is needed"
        )
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
            failure = itk_reason(error, path)
    # MetaIO says what is wrong with a missing or short data file on stderr, and may still return an image;
    # its words beat ITK's exception, which often carries only a stale errno.
    if "".join(messages).strip():
        raise InputError(f"{path.name}: cannot be read completely ({itk_reason(''.join(messages), path)})")
    if failure is not None:
        raise InputError(f"{path.name}: cannot be read as an image ({failure})")
    return image


def _check_nifti(path: Path) -> None:
    """What ITK's NIfTI reader lets through or words in its own terms: a damaged header (dimensions, voxel
    sizes, orientation), damaged gzip, a data section shorter than the header promises (ITK zero-fills it) and
    NaN/inf voxels (ITK turns them into 0, which would break the bit-identical brain)."""
    import nibabel as nib

    fault = _nifti_header_fault(path)
    if fault:
        raise InputError(f"{path.name}: {fault}")
    try:
        with _nibabel_quiet():
            nifti: Any = nib.load(str(path))  # nibabel types load() as the base class, without dataobj
            data = np.asanyarray(nifti.dataobj)
    except (OSError, EOFError) as error:
        what = "gzip stream" if path.name.lower().endswith(".gz") else "voxel data"
        raise InputError(
            f"{path.name}: damaged or truncated {what}, or a header promising more voxels than "
            f"the file holds ({without_path(error, path)})"
        ) from None
    except Exception as error:  # nibabel raises ValueError/ImageFileError/... for inconsistent headers
        raise InputError(f"{path.name}: the NIfTI header is damaged ({without_path(error, path)})") from None
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        raise InputError(f"{path.name}: contains NaN or infinite voxel values")


# The fields of a NIfTI-1 header (348 bytes) that place the voxels in space, at their byte offsets.
_NIFTI1_FIELDS = [
    ("sizeof_hdr", "i4", 0),
    ("dim", "8i2", 40),
    ("pixdim", "8f4", 76),
    ("qform_code", "i2", 252),
    ("sform_code", "i2", 254),
    ("quatern", "6f4", 256),
    ("srow", "12f4", 280),
]


def _nifti_header_fault(path: Path) -> Optional[str]:
    """What is wrong with a NIfTI-1 header's dimensions, voxel sizes or orientation, read from its raw bytes
    (nibabel quietly mends some of them); None when nothing is, or for NIfTI-2, which nibabel checks."""
    import gzip

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as stream:
            raw = stream.read(348)
    except (OSError, EOFError):
        return "damaged gzip stream" if path.name.lower().endswith(".gz") else None
    if len(raw) < 348:
        return f"the file ends inside the NIfTI header ({len(raw)} of 348 bytes)"
    if raw[344:347] not in (b"n+1", b"ni1") and raw[4:7] not in (b"n+2", b"ni2"):
        return "cannot be read as NIfTI: it has no NIfTI header (another kind of file, or a damaged one)"
    for order in "<>":
        layout = np.dtype(
            {
                "names": [n for n, _, _ in _NIFTI1_FIELDS],
                "formats": [order + f for _, f, _ in _NIFTI1_FIELDS],
                "offsets": [o for _, _, o in _NIFTI1_FIELDS],
                "itemsize": 348,
            }
        )
        header = np.frombuffer(raw, layout)[0]
        if header["sizeof_hdr"] == 348:
            break
    else:
        return None
    damaged = "the NIfTI header is damaged: "
    dims = int(header["dim"][0])
    if not 1 <= dims <= 7:
        return damaged + f"its number of dimensions (dim[0] = {dims}) is not 1 to 7"
    if (header["dim"][1 : dims + 1] < 1).any():
        return damaged + f"a dimension is {header['dim'][1 : dims + 1].min()} voxels"
    sizes = header["pixdim"][1 : min(dims, 3) + 1].astype(float)
    shown = ", ".join(f"{v:g}" for v in sizes)
    if not np.isfinite(sizes).all() or (sizes <= 0).any():
        return damaged + f"its voxel sizes (pixdim {shown} mm) must be finite and positive"
    if header["sform_code"] > 0:
        rows = header["srow"].astype(float).reshape(3, 4)
        if not np.isfinite(rows).all():
            return damaged + "its orientation matrix (sform) holds NaN or infinite values"
        scales = np.linalg.norm(rows[:, :3], axis=0)[: sizes.size]
        if abs(np.linalg.det(rows[:, :3])) < 1e-9 * max(1.0, float(np.prod(scales))):
            return damaged + "its orientation matrix (sform) is singular"
        # ITK compares the two too, then quietly takes the qform: that would move the scan in space.
        if not np.allclose(scales, sizes, rtol=1e-3):
            return damaged + (
                f"its voxel sizes (pixdim {shown} mm) disagree with its orientation matrix "
                f"(sform: {', '.join(f'{v:.4g}' for v in scales)} mm)"
            )
    elif header["qform_code"] > 0 and not np.isfinite(header["quatern"]).all():
        return damaged + "its orientation (qform) holds NaN or infinite values"
    return None


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


@contextmanager
def _nibabel_quiet() -> Iterator[None]:
    """nibabel logs the header faults it mends or refuses straight to stderr; the engine reports them itself, in
    the one line of the error contract, so its log is held back while it reads."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_mgh(path: Path) -> sitk.Image:
    """FreeSurfer .mgz/.mgh via nibabel, converted to a SimpleITK image with the same RAS->LPS geometry."""
    import nibabel as nib

    try:
        with _nibabel_quiet():
            mgh: Any = nib.load(str(path))
            data = np.asanyarray(mgh.dataobj)
    except Exception as error:  # nibabel raises many types for damaged files
        raise InputError(f"{path.name}: cannot be read as an MGH/MGZ image ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(
            f"{path.name}: is a {data.ndim}-D image; a 3-D head volume is needed"
            if data.ndim != 4
            else f"{path.name}: is a 4-D series of {data.shape[3]} volumes; give a single 3-D volume"
        )
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
        return str(
            pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        )
    except Exception as error:
        raise InputError(f"{path.name}: not a readable DICOM file ({error})") from None
