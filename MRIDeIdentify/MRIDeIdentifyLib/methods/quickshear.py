"""``quickshear``: the PyPI ``quickshear`` package (Schimke & Hale 2011) run with our brain mask.

Quickshear fits a plane under the lower convex hull of the brain mask's sagittal projection and removes
everything below it. The package works on nibabel images and permutes/flips their voxel axes to RPS itself
(``nibabel.io_orientation``), so it is handed the input's true voxel->RAS affine and works for any
orientation; an oblique scan is sheared in the voxel frame closest to RPS, which keeps the plane under the
brain. Its buffer is a count of voxels: we give it in mm along the axis it shifts.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import quickshear as quickshear_package

from ..errors import InputError
from ..reader import ras_affine
from . import MethodContext, MethodOutput, register

# Quickshear's default buffer is 10 voxels of a 1 mm scan.
DEFAULT_BUFFER_MM = 10.0


@register(
    "quickshear",
    summary="remove everything below a plane under the brain (the quickshear package)",
    role="removal baseline (quickshear, as recommended where a brain mask must never be cut)",
)
def run(ctx: MethodContext) -> MethodOutput:
    with ctx.stage("shear"):
        keep = shear_mask(
            ctx.brain, ras_affine(ctx.image), float(ctx.options.get("quickshear_buffer_mm", DEFAULT_BUFFER_MM))
        )
    removed = ~keep & ~ctx.brain
    values = np.where(keep, ctx.array, np.float32(0)).astype(np.float32)
    return MethodOutput(values=values, head=ctx.head & keep, changed=removed)


def shear_mask(brain: np.ndarray, affine: np.ndarray, buffer_mm: float = DEFAULT_BUFFER_MM) -> np.ndarray:
    """Bool KJI mask of what quickshear keeps, for ``brain`` (bool KJI) on a grid with voxel->RAS ``affine``."""
    if not brain.any():
        raise InputError("quickshear needs a brain mask, and the brain mask is empty")
    # nibabel's voxel axes are IJK: the KJI array transposed.
    brain_ijk = np.ascontiguousarray(brain.transpose(2, 1, 0)).astype(np.uint8)
    axes = nib.io_orientation(affine)
    superior_axis = int(np.flatnonzero(axes[:, 0] == 2)[0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    buffer_voxels = buffer_mm / float(spacing[superior_axis])
    mask_img = nib.Nifti1Image(brain_ijk, affine)
    ones_img = nib.Nifti1Image(np.ones_like(brain_ijk), affine)
    try:
        with warnings.catch_warnings():
            # numpy 2 deprecates the package's 2-D np.cross, once per hull point; the result is unchanged.
            warnings.simplefilter("ignore", DeprecationWarning)
            sheared = quickshear_package.quickshear(ones_img, mask_img, buffer_voxels)
    except (IndexError, ValueError) as error:
        # The package needs at least two points on the hull of the brain's sagittal profile.
        raise InputError(f"quickshear cannot fit a plane under this brain mask ({error})") from error
    return np.asanyarray(sheared.dataobj).transpose(2, 1, 0) != 0
