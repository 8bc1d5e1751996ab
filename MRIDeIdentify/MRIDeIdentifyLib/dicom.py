"""DICOM in (classic single-frame series and enhanced multi-frame files) and de-identified DICOM out.

Reading: pydicom reads every header (pixel data deferred) to group files by series, check the frame layout
and compute the geometry (LPS mm) from Image Position/Orientation (Patient), per file or per frame
(enhanced functional groups). SimpleITK (GDCM) reads the pixels, so compressed transfer syntaxes work, and
gives the real-world values: stored values when Rescale Slope/Intercept are the identity (the stored pixel
type is kept, e.g. uint16), ``slope * stored + intercept`` in SimpleITK's pixel type otherwise. The frames are
put in spatial order and the image gets the geometry computed from the headers (GDCM's own is not trusted for
enhanced files, whose frames need not be stored in spatial order).

Writing keeps the input's layout (classic stays classic, enhanced stays enhanced, same frame order, same
Rows/Columns, positions, orientation, spacing) and its rescale: the stored values written are
``round((value - intercept) / slope)``, so a voxel copied from the input gets back its stored value bit for
bit; Bits Stored grows if a written value needs it. Output is always Explicit VR Little Endian.

Header cleaning follows DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile. The action
for each attribute (X remove, Z empty, D dummy, U new UID, and the X/Z, X/D, Z/D, X/Z/D, X/Z/U* choices)
comes from Table E.1-1 as shipped, generated from the standard, by the ``dicom-anonymizer`` package
(KitwareMedical, BSD-3); its own ``anonymize_dataset`` is not used because it does not recurse into sequences
(enhanced per-frame groups keep their Frame Acquisition DateTime), keeps a process-wide UID table, and cannot
shift dates. The table is applied here, recursively, with:

- a choice of X/Z/D by what the two MR IODs require (``_REQUIRED``), otherwise the strongest action;
- private attributes removed (no Retain Safe Private Option);
- a safety net for attributes the table does not list: person names emptied, dates removed, free text
  (LT/ST/UT/UC) removed;
- dates removed or replaced by 19000101, or with ``date_shift_days`` every date shifted by that many days
  and times kept (Retain Longitudinal Temporal Information with Modified Dates Option, 113107); the birth
  date is emptied either way;
- UIDs replaced through :class:`UIDMap` (same input UID -> same new UID within one run), and Patient's
  Name and ID set to a per-run pseudonym of the patient (``DEID-`` + 12 hex digits);
- (0012,0062) YES, (0012,0063) naming MRIDeIdentify, its version and the method, (0012,0064) with 113100,
  113102 (the face is remodelled or removed) and 113107 when dates are shifted.

Options left out: Retain Patient Characteristics (113108), Retain Device Identity (113109), Retain UIDs
(113110), Retain Safe Private (113111), Retain Institution Identity (113112), Clean Descriptors (113105: the
descriptors are removed instead), Clean Structured Content (113104), Clean Pixel Data (113101: MR carries no
burned-in text; Burned In Annotation is kept as the scanner wrote it).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import os
import pkgutil
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .errors import InputError

# Elements larger than this stay on disk while headers are scanned: the pixel data, never needed here.
_DEFER_SIZE = "1 MB"
# Image Position (Patient) along the slice normal: relative spread allowed in slice steps, and the
# in-plane drift allowed between slices (a tilted/sheared stack is refused), both in mm.
_SPACING_TOLERANCE = 0.01
_TILT_TOLERANCE_MM = 0.01
_DUMMY_TEXT = "DEIDENTIFIED"
_DUMMY_DATE = "19000101"
_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
_PIXEL_DATA = 0x7FE00010
_PERSON_NAME, _DATES, _FREE_TEXT = ("PN",), ("DA", "DT"), ("LT", "ST", "UT", "UC")


@dataclass
class SeriesInfo:
    """One series found in a folder: its UID, description, modality and size (files, frames)."""

    uid: str
    description: str
    modality: str
    files: int
    frames: int

    def summary(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {self.modality}, {self.frames} frames)"


@dataclass
class DicomSource:
    """What writing needs from the input series (headers only: pixel data dropped to save memory).

    ``datasets``: classic: one header per file in output slice order (slice k of the image is
    ``datasets[k]``); enhanced: the single multi-frame header. ``frame_of_slice[k]`` is the frame index in
    the enhanced file that holds image slice k (classic: ``k``). ``rescale`` is the (slope, intercept) of
    every slice. ``origin``/``spacing``/``direction`` are the SimpleITK geometry (LPS mm) of the image read.
    """

    series_uid: str
    enhanced: bool
    datasets: List[Dataset]
    frame_of_slice: List[int]
    rescale: Tuple[float, float]
    origin: Tuple[float, float, float]
    spacing: Tuple[float, float, float]
    direction: Tuple[float, ...]
    size: Tuple[int, int, int]
    files: List[Path] = field(default_factory=list)


class UIDMap:
    """Maps input UIDs to new UIDs: the same input UID gives the same new UID within one run (one map).

    New UIDs are pydicom's (its root, then digits of a SHA-512 hash of a per-run random secret and the input
    UID), so a second run (another secret) gives other UIDs and nobody without the secret can link them.
    The same secret gives each patient a pseudonym (:meth:`pseudonym`), so that a PACS or Slicer's DICOM
    browser keeps one patient's series together without learning who it is.
    """

    def __init__(self, secret: Optional[str] = None) -> None:
        self._secret = secret if secret is not None else secrets.token_hex(32)

    def __call__(self, uid: str) -> str:
        uid = str(uid).strip()
        return str(generate_uid(entropy_srcs=[self._secret, uid])) if uid else uid

    def pseudonym(self, identity: str) -> str:
        """``DEID-`` and 12 hex digits, the same for the same ``identity`` within one run."""
        digest = hashlib.sha256(f"{self._secret}|patient|{identity}".encode()).hexdigest()
        return f"DEID-{digest[:12].upper()}"


# ---------------------------------------------------------------------------------------------- reading

def list_series(folder: Path) -> List[SeriesInfo]:
    """The image series in ``folder`` (searched recursively), largest first."""
    groups = _scan(Path(folder))
    infos = []
    for uid, entries in groups.items():
        first = entries[0][1]
        infos.append(SeriesInfo(uid, str(first.get("SeriesDescription", "")), str(first.get("Modality", "")),
                                len(entries), sum(_frames(ds) for _, ds in entries)))
    return sorted(infos, key=lambda info: (-info.frames, info.uid))


def read_series(folder: Path, series_uid: Optional[str] = None) -> Tuple[sitk.Image, DicomSource]:
    """Read one series of ``folder`` as a 3-D image (LPS geometry, SimpleITK's values) and its DicomSource.

    Several series in the folder need ``series_uid``; anything unusable raises InputError (one line).
    """
    folder = Path(folder)
    groups = _scan(folder)
    if series_uid is None and len(groups) > 1:
        listing = ", ".join(info.summary() for info in list_series(folder))
        raise InputError(f"{folder.name}: folder holds {len(groups)} series: {listing}; choose one with --series UID")
    if series_uid is not None and series_uid not in groups:
        listing = ", ".join(info.summary() for info in list_series(folder))
        raise InputError(f"{folder.name}: no series {series_uid}; the folder holds: {listing}")
    uid = series_uid if series_uid is not None else next(iter(groups))
    entries = groups[uid]
    for path, ds in entries:
        _check_pixel_data(path, ds)
    multi = [entry for entry in entries
             if _frames(entry[1]) > 1 or "PerFrameFunctionalGroupsSequence" in entry[1]]
    if multi:
        if len(entries) != 1:
            raise InputError(f"{folder.name}: series {uid} has {len(entries)} files of which {len(multi)} "
                             "multi-frame (enhanced); one enhanced file per series is supported")
        return _read_enhanced(*entries[0])
    return _read_classic(uid, entries)


def _scan(folder: Path) -> Dict[str, List[Tuple[Path, Dataset]]]:
    """The image series under ``folder``: files grouped by SeriesInstanceUID. Files that are not DICOM, and
    series without pixel data (structured reports, presentation states), are passed over: exports put
    viewers, indexes and notes beside the images. A file that starts as DICOM but cannot be parsed is an
    error."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
    if not paths:
        raise InputError(f"{folder.name}: the folder holds no files")
    groups: Dict[str, List[Tuple[Path, Dataset]]] = {}
    for path in paths:
        ds = _read_header(path)
        if ds is None:
            continue
        if "SeriesInstanceUID" not in ds:  # type 1 in every IOD: the header is cut short or damaged
            raise InputError(f"{path.name}: not a readable DICOM file (no SeriesInstanceUID: truncated or damaged)")
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    # A series with no pixel data at all is not an image; a slice missing its pixels in an image series is
    # damage, reported when the series is read.
    groups = {uid: entries for uid, entries in groups.items() if any("PixelData" in ds for _, ds in entries)}
    if not groups:
        raise InputError(f"{folder.name}: no DICOM image files among its {len(paths)} files")
    return groups


def _read_header(path: Path) -> Optional[Dataset]:
    """The file's DICOM dataset (large values deferred), or None for a file that is not DICOM."""
    try:
        return pydicom.dcmread(str(path), defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        pass  # no 'DICM' preamble: not DICOM, or DICOM written without one (older exports)
    except Exception as error:  # pydicom raises many types for damaged files
        raise InputError(f"{path.name}: not a readable DICOM file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    try:
        ds = pydicom.dcmread(str(path), defer_size=_DEFER_SIZE, force=True)
        # A forced read of a text or binary file yields a dataset of nonsense: real ones name their class.
        return ds if "SOPClassUID" in ds else None
    except Exception:
        return None


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _check_pixel_data(path: Path, ds: Dataset) -> None:
    """Refuse files without pixel data or whose pixel data is cut short (a truncated copy)."""
    if _PIXEL_DATA not in ds:
        raise InputError(f"{path.name}: has no pixel data (not an image, or the file is truncated)")
    raw = ds.get_item(_PIXEL_DATA)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if length == 0xFFFFFFFF:
        return  # encapsulated (compressed): GDCM checks it when reading
    expected = int(ds.Rows) * int(ds.Columns) * _frames(ds) * int(ds.get("SamplesPerPixel", 1)) \
        * int(ds.BitsAllocated) // 8
    if value is None:
        available = path.stat().st_size - int(raw.value_tell)
        actual = min(int(length), available)
    else:
        actual = len(value)
    if actual < expected:
        raise InputError(f"{path.name}: pixel data is truncated ({actual} of {expected} bytes)")


def _vector(values: Sequence, n: int, what: str, name: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in values], float)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.shape != (n,):
        raise InputError(f"{name}: missing or malformed {what}")
    return array


def _geometry(name: str, orientations: List[np.ndarray], positions: List[np.ndarray], pixel_spacing: np.ndarray,
              thickness: Optional[float]) -> Tuple[np.ndarray, Tuple, Tuple, Tuple]:
    """Spatial order of the slices and the SimpleITK geometry (origin, spacing, direction) in LPS mm."""
    orientation = orientations[0]
    if any(np.abs(o - orientation).max() > 1e-4 for o in orientations):
        raise InputError(f"{name}: the slices have different orientations (a localizer or a multi-stack series)")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1) > 1e-3:
        raise InputError(f"{name}: Image Orientation (Patient) is not a pair of orthogonal unit vectors")
    # Headers round the cosines to a few digits; SimpleITK and NIfTI want an orthonormal direction.
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    positions_array = np.asarray(positions)
    along = positions_array @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    if len(steps) and steps.min() < 1e-3:
        raise InputError(f"{name}: several slices share one position (a 4-D, multi-echo or repeated series)")
    if len(steps):
        step = float(steps.mean())
        if np.abs(steps - step).max() > _SPACING_TOLERANCE * step:
            raise InputError(f"{name}: uneven slice spacing ({steps.min():.3f} to {steps.max():.3f} mm)")
        offsets = positions_array[order] - positions_array[order[0]]
        drift = offsets - np.outer(offsets @ normal, normal)
        if np.abs(drift).max() > _TILT_TOLERANCE_MM + 1e-3 * step:
            raise InputError(f"{name}: the slices are not stacked along their normal (gantry tilt); not supported")
    else:
        step = float(thickness or 1.0)
    origin = tuple(float(v) for v in positions_array[order[0]])
    spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), step)
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())
    return order, origin, spacing, direction


def _rescale_of(item: Dataset) -> Tuple[float, float]:
    return float(item.get("RescaleSlope", 1) or 1), float(item.get("RescaleIntercept", 0) or 0)


def _read_classic(uid: str, entries: List[Tuple[Path, Dataset]]) -> Tuple[sitk.Image, DicomSource]:
    name = entries[0][0].parent.name
    first = entries[0][1]
    for path, ds in entries:
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise InputError(f"{path.name}: {ds.Rows}x{ds.Columns} pixels, unlike the rest of series {uid}")
    orientations = [_vector(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)", p.name)
                    for p, ds in entries]
    positions = [_vector(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)", p.name) for p, ds in entries]
    spacing = _vector(first.get("PixelSpacing"), 2, "Pixel Spacing", entries[0][0].name)
    order, origin, spacing3, direction = _geometry(name, orientations, positions, spacing,
                                                   first.get("SliceThickness"))
    ordered = [entries[i] for i in order]
    rescale = _uniform_rescale(name, [_rescale_of(ds) for _, ds in ordered])
    try:
        image = sitk.ReadImage([str(p) for p, _ in ordered])
    except RuntimeError as error:
        raise InputError(f"{name}: SimpleITK cannot read the series ({_first_line(error)})") from None
    array = sitk.GetArrayFromImage(image)
    datasets = [_header_only(ds) for _, ds in ordered]
    source = DicomSource(uid, False, datasets, list(range(len(ordered))), rescale, origin, spacing3, direction,
                         (int(first.Columns), int(first.Rows), len(ordered)), [p for p, _ in ordered])
    return _image(array, source), source


def _read_enhanced(path: Path, ds: Dataset) -> Tuple[sitk.Image, DicomSource]:
    frames = _frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != frames:
        raise InputError(f"{path.name}: multi-frame file without one Per-frame Functional Group per frame")
    shared_item = shared[0] if shared else Dataset()

    def group(index: int, keyword: str, required: bool = True) -> Dataset:
        for item in (per_frame[index], shared_item):
            if keyword in item and len(item[keyword].value):
                return item[keyword].value[0]
        if required:
            raise InputError(f"{path.name}: frame {index + 1} has no {keyword}")
        return ds  # Pixel Value Transformation may sit at the top level instead

    orientations = [_vector(group(i, "PlaneOrientationSequence").get("ImageOrientationPatient"), 6,
                            "Image Orientation (Patient)", path.name) for i in range(frames)]
    positions = [_vector(group(i, "PlanePositionSequence").get("ImagePositionPatient"), 3,
                         "Image Position (Patient)", path.name) for i in range(frames)]
    measures = group(0, "PixelMeasuresSequence")
    spacing = _vector(measures.get("PixelSpacing"), 2, "Pixel Spacing", path.name)
    order, origin, spacing3, direction = _geometry(path.name, orientations, positions, spacing,
                                                   measures.get("SliceThickness"))
    rescale = _uniform_rescale(path.name, [_rescale_of(group(i, "PixelValueTransformationSequence", False))
                                           for i in range(frames)])
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path.name}: SimpleITK cannot read the file ({_first_line(error)})") from None
    array = sitk.GetArrayFromImage(image)
    if array.shape[0] != frames:
        raise InputError(f"{path.name}: SimpleITK read {array.shape[0]} of {frames} frames")
    source = DicomSource(str(ds.SeriesInstanceUID), True, [_header_only(ds)], [int(i) for i in order], rescale,
                         origin, spacing3, direction, (int(ds.Columns), int(ds.Rows), frames), [path])
    return _image(array[order], source), source


def _uniform_rescale(name: str, rescale: List[Tuple[float, float]]) -> Tuple[float, float]:
    # SimpleITK applies one slope/intercept to the whole volume; per-frame values would be read wrongly.
    if len(set(rescale)) > 1:
        raise InputError(f"{name}: Rescale Slope/Intercept differ between slices; not supported")
    return rescale[0]


def _header_only(ds: Dataset) -> Dataset:
    if _PIXEL_DATA in ds:
        del ds[_PIXEL_DATA]
    return ds


def _image(array: np.ndarray, source: DicomSource) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(source.origin)
    image.SetSpacing(source.spacing)
    image.SetDirection(source.direction)
    return image


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------- writing

def write_series(image: sitk.Image, source: DicomSource, out_dir: Path, *, method: str, tool_version: str,
                 uid_map: UIDMap, date_shift_days: Optional[int] = None) -> List[Path]:
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
            names = [_write_file(source.datasets[0], frames, bits, staging / "0001.dcm", method, tool_version,
                                 uid_map, date_shift_days)]
        else:
            names = [_write_file(ds, stored[k], bits, staging / f"{k + 1:04d}.dcm", method, tool_version, uid_map,
                                 date_shift_days) for k, ds in enumerate(source.datasets)]
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
    for have, want, what in ((image.GetOrigin(), source.origin, "origin"), (image.GetSpacing(), source.spacing,
                             "spacing"), (image.GetDirection(), source.direction, "direction")):
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


def _write_file(template: Dataset, pixels: np.ndarray, bits: int, path: Path, method: str, tool_version: str,
                uid_map: UIDMap, date_shift_days: Optional[int]) -> str:
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
    ds[_PIXEL_DATA].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
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


# ------------------------------------------------------------------------------------- PS3.15 cleaning

# Attributes the Basic profile gives a choice for (X/Z, X/D, Z/D, X/Z/D) that the MR Image and Enhanced MR
# Image IODs require: Type 1 gets a dummy value (D), Type 2 an empty one (Z). Everything else takes the
# strongest action (X, else Z).
_REQUIRED = {
    False: {"ContentDate": "Z", "ContentTime": "Z"},
    True: {"ContentDate": "D", "ContentTime": "D", "AcquisitionDateTime": "D", "DeviceSerialNumber": "D",
           "AcquisitionContextSequence": "Z"},
}
_CATEGORIES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
               "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


@lru_cache(maxsize=1)
def profile_table() -> Tuple[str, Dict[int, str], Tuple[Tuple[int, int, str], ...]]:
    """PS3.15 Table E.1-1 (newest edition ``dicom-anonymizer`` ships): (edition, {tag: action}, masked rows).

    Masked rows (repeating groups such as 50xx curves, 60xx overlay data) are (value, mask, action) on the
    32-bit tag.
    """
    from dicomanonymizer import dicom_anonymization_databases as databases
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    edition = max(module.name for module in pkgutil.iter_modules(databases.__path__))
    table = dicom_anonymization_database_selector(edition)
    actions: Dict[int, str] = {}
    masked = []
    for category, action in _CATEGORIES.items():
        for row in table[category]:
            if len(row) == 2:
                actions[(row[0] << 16) | row[1]] = action
            else:
                masked.append((((row[0] << 16) | row[1]), ((row[2] << 16) | row[3]), action))
    return edition, actions, tuple(masked)


def deidentify_dataset(ds: Dataset, uid_map: UIDMap, date_shift_days: Optional[int] = None, *,
                       enhanced: bool = False) -> None:
    """Clean ``ds`` in place (recursively, file meta excluded) following PS3.15's Basic profile.

    Patient's Name and ID become the run's pseudonym of the original ID and name (a dummy value, which the
    profile's Z and Z/D actions allow) instead of empty: PACS often refuse an empty Patient ID.
    """
    _, actions, masked = profile_table()
    required = {tag_for_keyword(k): v for k, v in _REQUIRED[enhanced].items()}
    identity = f"{ds.get('PatientID', '')}|{ds.get('PatientName', '')}"
    _clean(ds, actions, masked, required, uid_map, date_shift_days)
    ds.PatientID = ds.PatientName = uid_map.pseudonym(identity)


def _clean(ds: Dataset, actions: Dict[int, str], masked: Tuple, required: Dict[int, str], uid_map: UIDMap,
           shift: Optional[int]) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        element = ds[tag]
        action = _action(int(tag), element.VR, actions, masked, required, shift)
        if action == "X":
            del ds[tag]
        elif action == "Z":
            element.value = DicomSequence() if element.VR == "SQ" else _empty(element.VR)
        elif action == "D":
            element.value = _dummy(element, uid_map)
        elif action == "U":
            element.value = _map_uids(element.value, uid_map)
        elif action == "shift":
            element.value = _shift_dates(element.value, element.VR, shift)
        if tag in ds and ds[tag].VR == "SQ":
            for item in ds[tag].value:
                _clean(item, actions, masked, required, uid_map, shift)


def _action(tag: int, vr: str, actions: Dict[int, str], masked: Tuple, required: Dict[int, str],
            shift: Optional[int]) -> str:
    """'X', 'Z', 'D', 'U', 'shift' or 'keep' for one attribute."""
    if tag == 0x00100030:  # Patient's Birth Date: emptied even when the other dates are kept shifted
        return "Z"
    action = actions.get(tag)
    if action is None:
        action = next((a for value, mask, a in masked if tag & mask == value), None)
    if shift is not None and vr in _DATES:
        return "shift"
    if shift is not None and vr == "TM":
        return "keep"
    if action is None:
        if vr in _PERSON_NAME:
            return "Z"
        if vr in _DATES or vr in _FREE_TEXT or vr == "TM":
            return "X"
        return "keep"
    if action == "X/Z/U*":
        return "keep"  # the sequence stays; the UIDs inside are replaced (U) as the walk goes on
    if "/" in action:
        return required.get(tag, "X" if action.startswith("X") else "Z")
    return action


def _empty(vr: str):
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"):
        return None
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    return ""


def _dummy(element, uid_map: UIDMap):
    vr = element.VR
    if vr == "UI":
        return _map_uids(element.value, uid_map)
    if vr == "SQ":
        return element.value  # kept: its items are cleaned by the recursive walk
    return {"DA": _DUMMY_DATE, "DT": _DUMMY_DATE + "000000", "TM": "000000", "AS": "000Y", "DS": "0", "IS": "0",
            "UR": "http://deidentified.invalid"}.get(vr, _DUMMY_TEXT if vr in (
                "AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT") else _empty(vr))


def _map_uids(value, uid_map: UIDMap):
    if isinstance(value, (list, MultiValue)):
        return [uid_map(v) for v in value]
    return uid_map(value) if value else value


def _shift_dates(value, vr: str, days: int):
    if isinstance(value, (list, MultiValue)):
        return [_shift_date(str(v), vr, days) for v in value]
    return _shift_date(str(value), vr, days) if value else value


def _shift_date(text: str, vr: str, days: int) -> str:
    """Shift a DA (YYYYMMDD) or the date part of a DT by ``days``; unparsable dates become empty."""
    text = text.strip()
    try:
        date = datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    shifted = (date + datetime.timedelta(days=days)).strftime("%Y%m%d")
    return shifted if vr == "DA" else shifted + text[8:]


def mark_deidentified(ds: Dataset, method: str, tool_version: str, date_shift_days: Optional[int]) -> None:
    """Add the de-identification attributes (0012,0062-0064), (0028,0303) and a series description.

    Image Type stays as the scanner wrote it: DERIVED would make the Enhanced MR pulse-sequence attributes
    forbidden (dciodvfy errors) and PS3.15 does not ask for it.
    """
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = f"MRIDeIdentify {tool_version} ({method}); DICOM PS3.15 Basic Profile"[:64]
    codes = [("113100", "Basic Application Confidentiality Profile"),
             ("113102", "Clean Recognizable Visual Features Option")]
    if date_shift_days is not None:
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if date_shift_days is not None else "REMOVED"
    ds.SeriesDescription = f"de-identified ({method})"[:64]
