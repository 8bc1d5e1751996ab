"""Head threshold and head mask: where the scan holds tissue rather than air; the binary-mask steps they share
with the brain mask and the composite (largest component, hole filling, 6-connected erosion and dilation)."""

from __future__ import annotations

from typing import Tuple

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
    # One opening pass breaks the thin bridges that background noise makes to the scalp.
    mask = largest_component(dilate(erode(voxels > threshold)))
    # Fill slice by slice along each axis as well as in 3-D: sinuses and ear canals open to the outside
    # are holes in most slices, though not in the volume.
    mask = fill_holes(mask)
    for axis in range(3):
        mask = fill_holes(mask, within_slices_of=axis)
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected (6-neighbour) component of ``mask``; an empty mask is returned as it is."""
    box = _bounding_box(mask, pad=0)
    if box is None:
        return mask.copy()
    labels, count = ndimage.label(mask[box])
    largest = np.zeros_like(mask)
    if count == 1:
        largest[box] = labels.astype(bool)
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        largest[box] = labels == int(sizes.argmax())
    return largest


def fill_holes(mask: np.ndarray, within_slices_of: int | None = None) -> np.ndarray:
    """``mask`` with every background region that does not reach the border filled (face-connected).

    The same result as ``scipy.ndimage.binary_fill_holes``, which grows the outside by repeated dilation;
    labelling the background once is 1.5-3x faster on 0.5 mm heads, and only the mask's bounding box grown by
    one voxel is labelled: the background ring that adds joins everything at the box's edge to the outside.
    ``within_slices_of``: fill each slice across that axis on its own (2-D holes; the border is the slice's edge).
    """
    box = _bounding_box(mask, pad=1)
    if box is None:
        return mask.copy()
    if within_slices_of is None:
        structure = ndimage.generate_binary_structure(3, 1)
        faces: Tuple[int, ...] = (0, 1, 2)
    else:
        structure = np.zeros((3, 3, 3), bool)
        structure[_plane(within_slices_of, 1)] = ndimage.generate_binary_structure(2, 1)
        faces = tuple(axis for axis in range(3) if axis != within_slices_of)
    labels, count = ndimage.label(~mask[box], structure=structure)
    outside = np.zeros(count + 1, bool)
    for axis in faces:
        outside[np.unique(np.take(labels, [0, -1], axis=axis))] = True
    outside[0] = False  # label 0 is the mask itself
    filled = mask.copy()
    filled[box] = ~outside[labels]
    return filled


def erode(mask: np.ndarray) -> np.ndarray:
    """One 6-neighbour erosion of a 3-D bool mask, outside the array counting as background: what
    ``scipy.ndimage.binary_erosion(mask)`` returns, by slicing instead of a structuring-element scan (~9x faster)."""
    eroded = mask.copy()
    for axis in range(3):
        low, high = _shifted(axis, 1), _shifted(axis, -1)
        eroded[low] &= mask[high]
        eroded[high] &= mask[low]
        for edge in (0, -1):
            eroded[_plane(axis, edge)] = False
    return eroded


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``iterations`` 6-neighbour dilations of a 3-D bool mask: what ``scipy.ndimage.binary_dilation(mask,
    iterations=iterations)`` returns (the voxels within that many face steps of the mask), 3-8x faster."""
    grown = mask.copy()
    for _ in range(iterations):
        previous = grown.copy()
        for axis in range(3):
            low, high = _shifted(axis, 1), _shifted(axis, -1)
            grown[low] |= previous[high]
            grown[high] |= previous[low]
    return grown


def _shifted(axis: int, step: int) -> Tuple[slice, ...]:
    """Index of a 3-D array without its first (``step`` 1) or last (``step`` -1) slice along ``axis``."""
    index = [slice(None)] * 3
    index[axis] = slice(1, None) if step > 0 else slice(None, -1)
    return tuple(index)


def _plane(axis: int, at: int) -> Tuple[slice | int, ...]:
    """Index of the 2-D plane ``at`` (a voxel index, negative from the end) across ``axis`` of a 3-D array."""
    index: list[slice | int] = [slice(None)] * 3
    index[axis] = at
    return tuple(index)


def _bounding_box(mask: np.ndarray, pad: int) -> Tuple[slice, ...] | None:
    """The slices of ``mask``'s non-zero bounding box grown by ``pad`` voxels (clipped), or None when empty."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(0, hits[0] - pad), min(mask.shape[axis], hits[-1] + pad + 1)))
    return tuple(box)
