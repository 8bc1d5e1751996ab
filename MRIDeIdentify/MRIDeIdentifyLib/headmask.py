"""Head threshold and head mask: where the scan holds tissue rather than air."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def head_threshold(image: sitk.Image) -> float:
    """The paper's binarisation level delta, in the image's own intensity units.

    Half of Otsu's level separates skin from air in T1 and T2 scans alike: Otsu alone splits tissue classes
    inside the head on scans with little background, and half of it stays above the background noise
    (Rician noise rarely reaches half the mean tissue level).
    """
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.Cast(image, sitk.sitkFloat32))
    return 0.5 * float(otsu.GetThreshold())


def head_mask(image: sitk.Image, threshold: float | None = None, array: np.ndarray | None = None) -> np.ndarray:
    """Boolean KJI mask of the head: voxels above ``threshold``, the largest connected component, cavities filled.

    ``array`` may pass the image's voxels (KJI) when the caller already holds them; it is not modified.
    """
    if threshold is None:
        threshold = head_threshold(image)
    voxels = sitk.GetArrayViewFromImage(image) if array is None else array
    mask = voxels > threshold
    # One opening pass breaks the thin bridges that background noise makes to the scalp.
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(sizes.argmax())
    # Fill slice by slice along each axis as well as in 3-D: sinuses and ear canals open to the outside
    # are holes in most slices, though not in the volume.
    mask = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        mask |= _fill_slices(mask, axis)
    return mask


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    structure = np.zeros((3, 3, 3), bool)
    index = [slice(None)] * 3
    index[axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(mask, structure=structure)
