"""Reading DICOM: classic single-frame series and enhanced multi-frame files, as a 3-D image and its source.

pydicom reads every header (pixel data deferred) to group files by series, check the frame layout
and compute the geometry (LPS mm) from Image Position/Orientation (Patient), per file or per frame
(enhanced functional groups). SimpleITK (GDCM) reads the pixels, so compressed transfer syntaxes work, and
gives the real-world values: stored values when Rescale Slope/Intercept are the identity (the stored pixel
type is kept, e.g. uint16), ``slope * stored + intercept`` in SimpleITK's pixel type otherwise. The frames are
put in spatial order and the image gets the geometry computed from the headers (GDCM's own is not trusted for
enhanced files, whose frames need not be stored in spatial order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError, itk_reason

# Elements larger than this stay on disk while headers are scanned: the pixel data, never needed here.
_DEFER_SIZE = "1 MB"
# Image Position (Patient) along the slice normal: relative spread allowed in slice steps, and the
# in-plane drift allowed between slices (a tilted/sheared stack is refused), both in mm.
_SPACING_TOLERANCE = 0.01
_TILT_TOLERANCE_MM = 0.01
PIXEL_DATA = 0x7FE00010


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


def list_series(folder: Path) -> List[SeriesInfo]:
    """The image series in ``folder`` (searched recursively), largest first."""
    groups = _scan(Path(folder))
    infos = []
    for uid, entries in groups.items():
        first = entries[0][1]
        infos.append(
            SeriesInfo(
                uid,
                str(first.get("SeriesDescription", "")),
                str(first.get("Modality", "")),
                len(entries),
                sum(_frames(ds) for _, ds in entries),
            )
        )
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
    multi = [entry for entry in entries if _frames(entry[1]) > 1 or "PerFrameFunctionalGroupsSequence" in entry[1]]
    if multi:
        if len(entries) != 1:
            raise InputError(
                f"{folder.name}: series {uid} has {len(entries)} files of which {len(multi)} "
                "multi-frame (enhanced); one enhanced file per series is supported"
            )
        return _read_enhanced(*entries[0])
    return _read_classic(uid, entries)


def _scan(folder: Path) -> Dict[str, List[Tuple[Path, Dataset]]]:
    """The image series under ``folder``: files grouped by SeriesInstanceUID. Files that are not DICOM, and
    series without pixel data (structured reports, presentation states), are passed over: exports put
    viewers, indexes and notes beside the images. A file that starts as DICOM but cannot be parsed is an
    error."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
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
        raise InputError(
            f"{path.name}: not a readable DICOM file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'})"
        ) from None
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
    if PIXEL_DATA not in ds:
        raise InputError(f"{path.name}: has no pixel data (not an image, or the file is truncated)")
    raw = ds.get_item(PIXEL_DATA)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if length == 0xFFFFFFFF:
        return  # encapsulated (compressed): GDCM checks it when reading
    expected = (
        int(ds.Rows) * int(ds.Columns) * _frames(ds) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    )
    if isinstance(raw, RawDataElement) and value is None:  # deferred: still on disk
        available = path.stat().st_size - int(raw.value_tell)
        actual = min(int(raw.length), available)
    else:
        actual = len(value or b"")
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


def _geometry(
    name: str,
    orientations: List[np.ndarray],
    positions: List[np.ndarray],
    pixel_spacing: np.ndarray,
    thickness: Optional[float],
) -> Tuple[np.ndarray, Tuple, Tuple, Tuple]:
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
    orientations = [
        _vector(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)", p.name) for p, ds in entries
    ]
    positions = [_vector(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)", p.name) for p, ds in entries]
    spacing = _vector(first.get("PixelSpacing"), 2, "Pixel Spacing", entries[0][0].name)
    order, origin, spacing3, direction = _geometry(name, orientations, positions, spacing, first.get("SliceThickness"))
    ordered = [entries[i] for i in order]
    rescale = _uniform_rescale(name, [_rescale_of(ds) for _, ds in ordered])
    try:
        image = sitk.ReadImage([str(p) for p, _ in ordered])
    except RuntimeError as error:
        raise InputError(
            f"{name}: SimpleITK cannot read the series ({itk_reason(error, entries[0][0].parent)})"
        ) from None
    array = sitk.GetArrayFromImage(image)
    datasets = [_header_only(ds) for _, ds in ordered]
    source = DicomSource(
        uid,
        False,
        datasets,
        list(range(len(ordered))),
        rescale,
        origin,
        spacing3,
        direction,
        (int(first.Columns), int(first.Rows), len(ordered)),
        [p for p, _ in ordered],
    )
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

    orientations = [
        _vector(
            group(i, "PlaneOrientationSequence").get("ImageOrientationPatient"),
            6,
            "Image Orientation (Patient)",
            path.name,
        )
        for i in range(frames)
    ]
    positions = [
        _vector(group(i, "PlanePositionSequence").get("ImagePositionPatient"), 3, "Image Position (Patient)", path.name)
        for i in range(frames)
    ]
    measures = group(0, "PixelMeasuresSequence")
    spacing = _vector(measures.get("PixelSpacing"), 2, "Pixel Spacing", path.name)
    order, origin, spacing3, direction = _geometry(
        path.name, orientations, positions, spacing, measures.get("SliceThickness")
    )
    rescale = _uniform_rescale(
        path.name, [_rescale_of(group(i, "PixelValueTransformationSequence", False)) for i in range(frames)]
    )
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path.name}: SimpleITK cannot read the file ({itk_reason(error, path)})") from None
    array = sitk.GetArrayFromImage(image)
    if array.shape[0] != frames:
        raise InputError(f"{path.name}: SimpleITK read {array.shape[0]} of {frames} frames")
    source = DicomSource(
        str(ds.SeriesInstanceUID),
        True,
        [_header_only(ds)],
        [int(i) for i in order],
        rescale,
        origin,
        spacing3,
        direction,
        (int(ds.Columns), int(ds.Rows), frames),
        [path],
    )
    return _image(array[order], source), source


def _uniform_rescale(name: str, rescale: List[Tuple[float, float]]) -> Tuple[float, float]:
    # SimpleITK applies one slope/intercept to the whole volume; per-frame values would be read wrongly.
    if len(set(rescale)) > 1:
        raise InputError(f"{name}: Rescale Slope/Intercept differ between slices; not supported")
    return rescale[0]


def _header_only(ds: Dataset) -> Dataset:
    if PIXEL_DATA in ds:
        del ds[PIXEL_DATA]
    return ds


def _image(array: np.ndarray, source: DicomSource) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(source.origin)
    image.SetSpacing(source.spacing)
    image.SetDirection(source.direction)
    return image
