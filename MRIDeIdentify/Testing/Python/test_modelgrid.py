"""The model grid: canonical orientation whatever the scan's, the whole head inside, an exact way back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import head_files, params
from MRIDeIdentifyLib.headmask import head_mask
from MRIDeIdentifyLib.modelgrid import ModelGrid
from MRIDeIdentifyLib.reader import read_volume


def _reoriented(image: sitk.Image) -> sitk.Image:
    """The same physical volume stored with permuted and flipped voxel axes (another scanner orientation)."""
    return sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])


def test_cube_is_the_same_whatever_the_storage_orientation(head_path):
    image = read_volume(head_path).image
    other = _reoriented(image)
    assert other.GetDirection() != image.GetDirection()
    cubes = []
    for img in (image, other):
        grid = ModelGrid.around(img, head_mask(img), size=64)
        cubes.append(grid.to_model(img))
    np.testing.assert_allclose(cubes[0], cubes[1], atol=1e-3)


def test_cube_axes_are_superior_anterior_right(head_path):
    image = read_volume(head_path).image
    grid = ModelGrid.around(image, head_mask(image), size=64)
    cube = grid.to_model(image) > 0.3
    k, j, i = np.nonzero(cube)
    # LPS identity: axis 0 grows superior, axis 1 posterior, axis 2 left; check with physical points.
    ref = grid.reference()
    p0 = np.array(ref.TransformIndexToPhysicalPoint((0, 0, 0)))
    p1 = np.array(ref.TransformIndexToPhysicalPoint((1, 1, 1)))
    assert np.allclose(p1 - p0, grid.spacing)
    assert len(k) > 0


@pytest.mark.parametrize("path", params(head_files()))
def test_whole_head_fits_in_the_cube(path):
    image = read_volume(path).image
    head = head_mask(image)
    grid = ModelGrid.around(image, head, size=64)
    cube_head = grid.mask_to_model(head, image)
    native_ml = head.sum() * np.prod(image.GetSpacing()) / 1000
    cube_ml = cube_head.sum() * grid.spacing**3 / 1000
    assert abs(cube_ml - native_ml) / native_ml < 0.05
    for axis in range(3):
        assert not np.take(cube_head, 0, axis).any() and not np.take(cube_head, -1, axis).any()


def test_to_native_inverts_to_model(head_path):
    image = read_volume(head_path).image
    head = head_mask(image)
    grid = ModelGrid.around(image, head, size=128)
    cube = grid.to_model(image)
    back = grid.intensity.denormalise(grid.to_native(cube, image))
    original = sitk.GetArrayFromImage(image).astype(np.float32)
    # Both resamplings blur at the cube's 2 mm scale; inside the head the round trip stays close.
    error = np.abs(back - original)[head]
    assert np.median(error) < 0.08 * np.percentile(original[head], 99)
    assert back.shape == original.shape


def test_intensity_scale_maps_background_to_zero_and_brain_to_one(head_path):
    image = read_volume(head_path).image
    head = head_mask(image)
    grid = ModelGrid.around(image, head, brain=head, size=32)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    normalised = grid.intensity.normalise(array)
    assert abs(np.median(normalised[~head])) < 0.05
    assert abs(np.percentile(normalised[head], 99) - 1.0) < 1e-3
    np.testing.assert_allclose(grid.intensity.denormalise(normalised), array, rtol=1e-5, atol=1e-2)
