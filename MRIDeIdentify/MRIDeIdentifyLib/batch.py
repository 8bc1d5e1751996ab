"""Batch de-identification of a folder or a BIDS dataset, resumable and shardable for cluster array jobs.

A BIDS dataset (``sub-*/[ses-*/]anat/*_T1w.*``) is written as a BIDS derivatives dataset with the same
relative paths; a plain folder is mirrored file by file (DICOM series folders become DICOM series folders).
A scan that fails is reported and the batch goes on; the exit status says whether all succeeded.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from tqdm import tqdm

from . import __version__
from .errors import InputError
from .reader import DICOM_SUFFIXES, IMAGE_SUFFIXES, image_stem
# The detached-header formats list their header file only; the data file is found through it.
_DATA_FILES = (".raw", ".zraw", ".img")


def is_bids(root: Path) -> bool:
    return (root / "dataset_description.json").is_file() or any(root.glob("sub-*/anat")) \
        or any(root.glob("sub-*/ses-*/anat"))


@dataclass(frozen=True)
class Scan:
    """One scan of a batch: an image file, or one series of a DICOM folder (``series``: its SeriesInstanceUID,
    None when the folder holds a single series)."""

    path: Path
    series: Optional[str] = None

    @property
    def is_dicom(self) -> bool:
        return self.path.is_dir()

    @property
    def name(self) -> str:
        """The file or folder name, without image suffixes, plus the series UID where the folder holds several."""
        name = image_stem(self.path)
        return f"{name}.{self.series}" if self.series else name

    def describe(self, root: Path) -> str:
        relative = str(self.path.relative_to(root))
        return f"{relative} (series {self.series})" if self.series else relative


def find_scans(root: Path) -> Tuple[List[Scan], bool]:
    """The scans under ``root`` in a stable order, and whether ``root`` is a BIDS dataset.

    A folder holding DICOM files is one scan per image series in it (its subfolders included, as the DICOM
    reader searches them); the series are listed from their headers, largest first.
    """
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if is_bids(root):
        scans = [p for pattern in ("sub-*/anat/*_T1w.*", "sub-*/ses-*/anat/*_T1w.*") for p in root.glob(pattern)
                 if p.name.lower().endswith(IMAGE_SUFFIXES)]
        return [Scan(p) for p in sorted(scans)], True
    scans: List[Scan] = []
    dicom_folders: List[Path] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or any(f in path.parents for f in dicom_folders):
            continue
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            scans.append(Scan(path))
        elif path.is_dir() and _holds_dicom(path):
            dicom_folders.append(path)
            scans.extend(_series_scans(path))
    return scans, False


def _series_scans(folder: Path) -> List[Scan]:
    from .dicom import list_series
    try:
        series = list_series(folder)
    except InputError:
        # An unreadable file: the scan is kept so that reading it reports why, like any other broken scan.
        return [Scan(folder)]
    if len(series) <= 1:
        return [Scan(folder)]
    return [Scan(folder, info.uid) for info in series]


def _holds_dicom(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file()]
    return bool(files) and any(p.name.lower().endswith(DICOM_SUFFIXES) or _has_dicm_preamble(p) for p in files[:5])


def _has_dicm_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def parse_shard(text: str) -> Tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like I/N (e.g. 0/4), not {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


def write_dataset_description(output: Path) -> None:
    description = {
        "Name": "MRIDeIdentify de-identified derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "MRIDeIdentify", "Version": __version__,
                         "Description": "face and head outside the brain remodeled; brain voxels bit-identical"}],
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def run_batch(args: argparse.Namespace) -> int:
    """The ``batch`` command. Exit 0 when every scan succeeded or was already done."""
    from .cli import DicomRun, check_method, run_one

    root, output = args.input, args.output
    scans, bids = find_scans(root)
    # DICOM series are written to folders named by position: export folder names often carry the patient's name.
    numbers = {scan: n for n, scan in enumerate(s for s in scans if s.is_dicom)}
    targets = {scan: output / (f"dicom-series-{numbers[scan]:04d}" if scan in numbers else scan.path.relative_to(root))
               for scan in scans}
    if args.shard:
        index, count = parse_shard(args.shard)
        scans = scans[index::count]
    if not scans:
        raise InputError(f"{root}: no scans found (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders)")
    if output.resolve() == root.resolve() or root.resolve() in output.resolve().parents:
        raise InputError(f"{output}: the output folder may not be the input folder or inside it")
    # A bad method or model would fail every scan alike: say so once, before writing anything.
    check_method(args)
    if bids:
        write_dataset_description(output)
    dicom_run = DicomRun(args.shift_dates) if any(scan.is_dicom for scan in scans) else None
    done = skipped = 0
    failures: List[Tuple[str, str]] = []
    bar = tqdm(scans, desc="de-identifying", unit="scan", file=sys.stderr, disable=None)
    for scan in bar:
        described = scan.describe(root)
        target = targets[scan]
        if target.exists():
            skipped += 1
            continue
        bar.set_postfix_str(described)
        relative = target.relative_to(output)
        qa = args.qa / relative.parent / image_stem(relative) if args.qa else None
        try:
            run_one(scan.path, target, args, quiet=True, qa_dir=qa, dicom_run=dicom_run, series=scan.series)
            done += 1
        except InputError as error:
            failures.append((described, str(error)))
            tqdm.write(f"mri-deidentify: {described}: {error}", file=sys.stderr)
        except Exception as error:  # one broken scan must not stop a night's batch
            failures.append((described, f"internal error: {type(error).__name__}: {error}"))
            tqdm.write(f"mri-deidentify: {described}: internal error: {error}", file=sys.stderr)
    bar.close()
    print(f"mri-deidentify: batch: {done} de-identified, {skipped} already done, {len(failures)} failed "
          f"(of {len(scans)} scans)", file=sys.stderr)
    for relative, reason in failures:
        print(f"  failed: {relative}: {reason}", file=sys.stderr)
    return 1 if failures else 0
