"""Provenance: the JSON sidecar and the de-identification marker written into image headers.

Nothing here records the input's path or file name: both often carry a patient's name or ID.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Dict

import SimpleITK as sitk

from . import __version__

TOOL = "MRIDeIdentify"


def marker(method: str) -> str:
    """The header text marking an image as de-identified (fits NIfTI's 80-byte ``descrip``)."""
    return f"de-identified by {TOOL} {__version__} ({method})"[:79]


def describe_grid(image: sitk.Image) -> Dict[str, Any]:
    return {
        "size": list(image.GetSize()),
        "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "origin_lps_mm": [round(v, 6) for v in image.GetOrigin()],
        "direction": [round(v, 6) for v in image.GetDirection()],
        "pixel_type": image.GetPixelIDTypeAsString(),
    }


def record(
    *,
    method: str,
    seed: int,
    margin_mm: float,
    device: str,
    brain_mask_source: str,
    timings: Dict[str, float],
    image: sitk.Image,
    extra: Dict[str, Any],
) -> Dict[str, Any]:
    """The provenance dictionary for one de-identified scan (the sidecar's content)."""
    return {
        "tool": TOOL,
        "version": __version__,
        "method": method,
        "seed": seed,
        "brain_margin_mm": margin_mm,
        "brain_mask": brain_mask_source,
        "device": device,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "grid": describe_grid(image),
        "python": platform.python_version(),
        **extra,
    }


def sidecar_path(output: Path) -> Path:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w.json`` (BIDS style); a DICOM folder gets ``<folder>.json`` beside it."""
    from .reader import image_stem

    return output.with_name(image_stem(output) + ".json")


def to_json(provenance: Dict[str, Any]) -> str:
    return json.dumps(provenance, indent=2, sort_keys=False) + "\n"
