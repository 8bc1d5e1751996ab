"""Which scans a folder or a BIDS dataset holds: what ``batch`` de-identifies and what ``train`` learns from.

A BIDS dataset contributes its T1-weighted images (``sub-*/[ses-*/]anat/*_T1w.*``), optionally only those of
some participants and sessions (the BIDS-app ``--participant-label`` and ``--session-label``); its other
images are counted as skipped, by BIDS suffix. Any other folder contributes every image file under it and
one scan per image series of each folder holding DICOM files.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import InputError
from .reader import DICOM_SUFFIXES, IMAGE_SUFFIXES, image_stem

# sub-<label>[/ses-<label>]/<datatype>/<file>: the BIDS raw-data layout.
_BIDS_PATTERNS = ("sub-*/*/*", "sub-*/ses-*/*/*")
# The BIDS suffix: the last "_" entity before the extension (sub-01_ses-1_T2w.nii.gz -> T2w).
_SUFFIX = re.compile(r"_([A-Za-z0-9]+)$")


def is_bids(root: Path) -> bool:
    """Whether ``root`` is laid out as a BIDS dataset (a description file or ``sub-*/[ses-*/]anat`` folders)."""
    return (
        (root / "dataset_description.json").is_file()
        or any(root.glob("sub-*/anat"))
        or any(root.glob("sub-*/ses-*/anat"))
    )


@dataclass(frozen=True)
class Scan:
    """One scan: an image file, or one series of a DICOM folder (``series``: its SeriesInstanceUID, None when
    the folder holds a single series)."""

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


@dataclass
class Inventory:
    """What :func:`inventory` found: ``scans`` in a stable order, whether the root is ``bids``, and how many
    BIDS images were ``skipped`` as not T1-weighted, by BIDS suffix (``{"T2w": 3, "bold": 12}``)."""

    scans: List[Scan]
    bids: bool
    skipped: Dict[str, int] = field(default_factory=dict)


def find_scans(root: Path) -> Tuple[List[Scan], bool]:
    """The scans under ``root`` in a stable order, and whether ``root`` is a BIDS dataset."""
    found = inventory(root)
    return found.scans, found.bids


def inventory(root: Path, participants: Sequence[str] = (), sessions: Sequence[str] = ()) -> Inventory:
    """The scans under ``root`` (see the module). ``participants``/``sessions``: BIDS labels, with or without
    their ``sub-``/``ses-`` prefix, that restrict a BIDS dataset; a label matching nothing is an InputError."""
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if is_bids(root):
        return _bids_inventory(root, _labels(participants, "sub-"), _labels(sessions, "ses-"))
    if participants or sessions:
        raise InputError(
            f"{root}: --participant-label and --session-label select from a BIDS dataset, and this "
            "folder is not one (no dataset_description.json, no sub-*/anat)"
        )
    return Inventory(_folder_scans(root), False)


def _labels(labels: Sequence[str], prefix: str) -> List[str]:
    return [label if label.startswith(prefix) else prefix + label for label in labels]


def _bids_inventory(root: Path, participants: List[str], sessions: List[str]) -> Inventory:
    images = sorted(
        p
        for pattern in _BIDS_PATTERNS
        for p in root.glob(pattern)
        if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    )
    for label, depth, flag in ((participants, 0, "--participant-label"), (sessions, 1, "--session-label")):
        present = {p.relative_to(root).parts[depth] for p in images}
        missing = [name for name in label if name not in present]
        if missing:
            raise InputError(f"{root}: {flag} {' '.join(missing)}: not in this dataset")
    selected = [
        p
        for p in images
        if (not participants or p.relative_to(root).parts[0] in participants)
        and (not sessions or p.relative_to(root).parts[1] in sessions)
    ]
    scans: List[Scan] = []
    skipped: Counter[str] = Counter()
    for path in selected:
        suffix = _SUFFIX.search(image_stem(path))
        kind = suffix.group(1) if suffix else "no BIDS suffix"
        if kind == "T1w" and path.parent.name == "anat":
            scans.append(Scan(path))
        else:
            skipped[kind] += 1
    return Inventory(scans, True, dict(sorted(skipped.items())))


def _folder_scans(root: Path) -> List[Scan]:
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
    return scans


def _series_scans(folder: Path) -> List[Scan]:
    """One scan per image series of a DICOM folder (its subfolders included, as the reader searches them),
    largest first."""
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
