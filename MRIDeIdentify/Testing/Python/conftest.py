"""Shared fixtures: the real head scans in ../shared/data (never copied into the repository).

The one place that says where that folder is: the benchmarks and scripts import SHARED_DATA from here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHARED_DATA = Path(os.environ.get("MRIDEIDENTIFY_SHARED_DATA", REPO.parent / "shared" / "data"))
HEADS_DIR = SHARED_DATA / "heads"
DICOM_DIR = SHARED_DATA / "dicom"
SKIP_REASON = f"shared head scans not found at {SHARED_DATA} (set MRIDEIDENTIFY_SHARED_DATA)"

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def head_files() -> list[Path]:
    """Every 3-D head volume in ../shared/data/heads (empty when the folder is absent)."""
    if not HEADS_DIR.is_dir():
        return []
    return sorted(p for p in HEADS_DIR.iterdir() if p.name.endswith((".nii.gz", ".nii", ".mgz")))


def dicom_series() -> list[Path]:
    if not DICOM_DIR.is_dir():
        return []
    return sorted(p for p in DICOM_DIR.iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not HEADS_DIR.is_dir():
        pytest.skip(SKIP_REASON)
    return SHARED_DATA


@pytest.fixture(scope="session")
def head_path(shared_data: Path):
    """A whole-face 2 mm MPRAGE (P06, 128x128x96): small enough for fast end-to-end tests."""
    return shared_data / "heads" / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz"


def params(paths: list[Path]) -> list:
    """pytest parameters for a list of shared files, or one skipped parameter saying why there are none."""
    if not paths:
        return [pytest.param(None, id="no-shared-data", marks=pytest.mark.skip(reason=SKIP_REASON))]
    return [pytest.param(p, id=p.name) for p in paths]
