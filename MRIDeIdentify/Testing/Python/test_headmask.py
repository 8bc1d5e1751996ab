"""Head mask: the fast hole filling, largest component, erosion and dilation equal scipy's on real heads and on
random masks (hole filling in 3-D and per slice)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MRIDeIdentifyLib.headmask import dilate, erode, fill_holes, head_mask, head_threshold, largest_component
from MRIDeIdentifyLib.reader import read_volume


def _planar(axis: int) -> np.ndarray:
    structure = np.zeros((3, 3, 3), bool)
    index = [slice(None)] * 3
    index[axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return structure


def _masks(head_path):
    image = read_volume(head_path).image
    array = sitk.GetArrayFromImage(image)
    # The raw threshold has many cavities (sinuses, ventricles below the level, noise gaps): a hard case.
    yield "real head", array > head_threshold(image)
    rng = np.random.default_rng(0)
    for shape in ((40, 33, 27), (12, 50, 31)):
        yield f"random {shape}", ndimage.binary_closing(rng.random(shape) < 0.45, iterations=1)
    # Touching the array's faces: the bounding-box crops must not invent a border there.
    border = np.zeros((9, 11, 13), bool)
    border[0, :, :] = border[:, 0, :] = border[:, :, -1] = True
    border[4:7, 4:7, 4:7] = True
    yield "on the faces", border


def test_fill_holes_equals_scipy_in_3d_and_within_slices(head_path):
    for name, mask in _masks(head_path):
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask), err_msg=name)
        for axis in range(3):
            np.testing.assert_array_equal(
                fill_holes(mask, within_slices_of=axis),
                ndimage.binary_fill_holes(mask, structure=_planar(axis)),
                err_msg=f"{name}, slices across axis {axis}",
            )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_hole_open_in_the_volume_is_filled_within_slices(axis):
    """A canal open at one end is no 3-D hole, but each slice across it shows a closed ring."""
    mask = np.zeros((20, 20, 20), bool)
    mask[3:17, 3:17, 3:17] = True
    canal = [slice(8, 12)] * 3
    canal[axis] = slice(0, 12)
    mask[tuple(canal)] = False
    assert not fill_holes(mask)[10, 10, 10]
    assert fill_holes(mask, within_slices_of=axis)[10, 10, 10]


def test_head_mask_has_no_enclosed_background(head_path):
    image = read_volume(head_path).image
    mask = head_mask(image)
    assert mask.any() and np.array_equal(ndimage.binary_fill_holes(mask), mask)


def test_erosion_dilation_and_largest_component_equal_scipy(head_path):
    for name, mask in _masks(head_path):
        np.testing.assert_array_equal(erode(mask), ndimage.binary_erosion(mask), err_msg=name)
        for iterations in (1, 3):
            np.testing.assert_array_equal(
                dilate(mask, iterations),
                ndimage.binary_dilation(mask, iterations=iterations),
                err_msg=f"{name}, {iterations} dilations",
            )
        labels, count = ndimage.label(mask)
        assert count > 1 or name.startswith("random"), name  # the real head's noise specks, the cube apart
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        np.testing.assert_array_equal(largest_component(mask), labels == sizes.argmax(), err_msg=name)


def test_empty_masks_stay_empty():
    empty = np.zeros((6, 7, 8), bool)
    for result in (largest_component(empty), fill_holes(empty), fill_holes(empty, within_slices_of=1)):
        assert result.shape == empty.shape and not result.any() and result is not empty
