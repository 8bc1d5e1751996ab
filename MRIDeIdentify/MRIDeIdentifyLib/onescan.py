"""One scan, file to file: read, de-identify, write the image, the masks asked for, the QA renders and the sidecar.

``run``, ``batch`` and ``demo`` all come here with one :class:`settings.Settings`; nothing here parses a
command line. Every file of one scan is written through one ``writer.OutputSet``, so a failure leaves none of
them and the input is never touched.
"""

from __future__ import annotations

import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from . import __version__, provenance
from .errors import PROG, InputError
from .settings import Settings


@dataclass(frozen=True)
class DicomRun:
    """What every DICOM series of one invocation shares, so that series of a study stay together: the secret
    the UID map and patient pseudonyms derive from, and the date offset in days (intervals between studies
    survive, the absolute dates do not; None = dates removed). Picklable, for ``batch --jobs`` workers."""

    secret: str
    date_shift_days: Optional[int] = None

    @classmethod
    def new(cls, shift_dates: bool = False) -> "DicomRun":
        """A fresh secret and, with ``shift_dates``, a random offset of 1 to 3650 days into the past."""
        return cls(secrets.token_hex(32), -(secrets.randbelow(3650) + 1) if shift_dates else None)


def check_method(settings: Settings) -> None:
    """Fail at once on an unusable method, device or model (InputError), before any scan is read."""
    from .devices import resolve_device
    from .methods import get_method

    get_method(settings.method).check(settings.method_options(), resolve_device(settings.device))


def progress_printer(label: str = "") -> Callable[[str, float], None]:
    """Progress on stderr: one line per stage start (``batch`` draws a bar over scans instead)."""

    def report(stage: str, fraction: float) -> None:
        if fraction == 0.0:
            print(f"{PROG}: {label}{stage}...", file=sys.stderr, flush=True)

    return report


def run_one(
    input_path: Path,
    output: Path,
    settings: Settings,
    *,
    quiet: bool = False,
    save_brain_mask: Optional[Path] = None,
    save_face_mask: Optional[Path] = None,
    qa_dir: Optional[Path] = None,
    dicom_run: Optional[DicomRun] = None,
) -> Dict[str, Any]:
    """Read ``input_path``, de-identify it with ``settings`` and write ``output``; returns its provenance.

    ``output`` is an image file, or a folder for a DICOM series. ``save_brain_mask``/``save_face_mask``: uint8
    masks on the input grid; ``qa_dir``: before/after renders; ``dicom_run``: shared by the series of one
    invocation (default: a new one). The output itself is moved into place last, so where it exists, its
    sidecar, masks and renders exist too. Raises InputError for unusable input or output paths.
    """
    from .pipeline import deidentify
    from .reader import format_of, read_volume
    from .writer import OutputSet, check_output_path, write_image

    started = time.perf_counter()
    check_output_path(output, input_path)
    for extra in (save_brain_mask, save_face_mask):
        if extra is not None:
            check_output_path(extra, input_path)
            format_of(extra)
    out_format = "dicom" if not _has_image_suffix(output) else format_of(output)
    if out_format == "dicom" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: the DICOM output folder exists and is not empty")
    if qa_dir is not None:
        from . import render  # noqa: F401  (fail before the work when the renderer cannot load)
    check_method(settings)

    volume = read_volume(input_path, settings.series)
    if out_format == "dicom" and volume.format != "dicom":
        raise InputError(f"{output}: DICOM output needs DICOM input; give an output file name such as scan_deid.nii.gz")
    read_seconds = time.perf_counter() - started
    mask = read_volume(settings.brain_mask).image if settings.brain_mask is not None else None
    result = deidentify(
        volume.image,
        settings.method,
        brain_mask=mask,
        margin_mm=settings.margin_mm,
        seed=settings.seed,
        device=settings.device,
        options=settings.method_options(),
        progress=None if quiet else progress_printer(),
    )
    record = result.provenance
    record["timings_s"] = {"read": round(read_seconds, 4), **record["timings_s"]}
    marker = provenance.marker(record["method"])

    write_start = time.perf_counter()
    with OutputSet() as outputs:
        staged_output = outputs.path(output)  # asked for first, so moved into place last
        if out_format == "dicom":
            from . import dicom

            dicom_run = dicom_run or DicomRun.new(settings.shift_dates)
            assert volume.dicom is not None  # read_volume keeps the source of every DICOM input
            dicom.write_series(
                result.image,
                volume.dicom,
                staged_output,
                method=record["method"],
                tool_version=__version__,
                uid_map=dicom.UIDMap(dicom_run.secret),
                date_shift_days=dicom_run.date_shift_days,
            )
        else:
            write_image(result.image, staged_output, marker)
        if save_brain_mask is not None:
            write_image(result.brain_mask, outputs.path(save_brain_mask), marker)
        if save_face_mask is not None:
            write_image(result.face_mask, outputs.path(save_face_mask), marker)
        if qa_dir is not None:
            from .render import write_qa

            write_qa(volume.image, result.image, outputs.path(qa_dir))
        record["timings_s"]["write"] = round(time.perf_counter() - write_start, 4)
        record["timings_s"]["wall"] = round(time.perf_counter() - started, 4)
        outputs.path(provenance.sidecar_path(output)).write_text(provenance.to_json(record), encoding="utf-8")
    return record


def _has_image_suffix(path: Path) -> bool:
    from .reader import IMAGE_SUFFIXES

    return path.name.lower().endswith(IMAGE_SUFFIXES)
