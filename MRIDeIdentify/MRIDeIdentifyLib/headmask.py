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
    mask = fill_holes(mask)
    for axis in range(3):
        mask = fill_holes(mask, within_slices_of=axis)
    return mask


def fill_holes(mask: np.ndarray, within_slices_of: int | None = None) -> np.ndarray:
    """``mask`` with every background region that does not reach the border filled (face-connected).

    The same result as ``scipy.ndimage.binary_fill_holes``, which grows the outside by repeated dilation;
    labelling the background once is 1.5-3x faster on 0.5 mm heads. ``within_slices_of``: fill each slice
    across that axis on its own (2-D holes; the border is the slice's edge).
    """
    if within_slices_of is None:
        structure, faces = ndimage.generate_binary_structure(3, 1), (0, 1, 2)
    else:
        structure = np.zeros((3, 3, 3), bool)
        index = [slice(None)] * 3
        index[within_slices_of] = 1
        structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
        faces = tuple(axis for axis in range(3) if axis != within_slices_of)
    labels, count = ndimage.label(~mask, structure=structure)
    outside = np.zeros(count + 1, bool)
    for axis in faces:
        outside[np.unique(np.take(labels, [0, -1], axis=axis))] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]
