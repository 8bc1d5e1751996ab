"""End to end through the engine on every shared head: brain-exact, same grid, same dtype."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import head_files, params
from MRIDeIdentifyLib.errors import Cancelled, InputError
from MRIDeIdentifyLib.pipeline import deidentify
from MRIDeIdentifyLib.reader import read_volume


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetPixelID() == b.GetPixelID()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", params(head_files()))
def test_blur_is_brain_exact_on_every_head(path):
    image = read_volume(path).image
    result = deidentify(image, "blur", seed=1)
    assert_same_grid(image, result.image)
    assert_same_grid(result.brain_mask, sitk.Cast(result.brain_mask, sitk.sitkUInt8))
    before = sitk.GetArrayViewFromImage(image)
    after = sitk.GetArrayViewFromImage(result.image)
    brain = sitk.GetArrayViewFromImage(result.brain_mask) > 0
    # A plausible brain: between 0.8 and 2.6 litres with the margin, and not the whole head.
    litres = brain.sum() * np.prod(image.GetSpacing()) / 1e6
    assert 0.8 < litres < 2.6, litres
    assert np.array_equal(before[brain], after[brain])
    # The method did change the head outside the brain.
    face = sitk.GetArrayViewFromImage(result.face_mask) > 0
    assert face.any() and not (face & brain).any()
    assert np.mean(before[face] != after[face]) > 0.5


def test_skullstrip_keeps_only_the_brain(head_path):
    image = read_volume(head_path).image
    result = deidentify(image, "skullstrip")
    before, after = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(result.image)
    brain = sitk.GetArrayFromImage(result.brain_mask) > 0
    assert np.array_equal(before[brain], after[brain])
    # Outside the brain only air is left: every voxel below the head threshold, the input's noise level.
    from MRIDeIdentifyLib.headmask import head_threshold

    outside = after[~brain].astype(float)
    assert outside.max() < head_threshold(image)


def test_same_seed_same_output_and_seed_changes_background(head_path):
    image = read_volume(head_path).image
    a = sitk.GetArrayFromImage(deidentify(image, "blur", seed=3).image)
    b = sitk.GetArrayFromImage(deidentify(image, "blur", seed=3).image)
    c = sitk.GetArrayFromImage(deidentify(image, "blur", seed=4).image)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_user_mask_on_another_grid_is_resampled_and_margin_grows_it(head_path):
    image = read_volume(head_path).image
    first = deidentify(image, "blur", margin_mm=0.0)
    mask = first.brain_mask
    # The same mask on a 1.3 mm grid five voxels larger on each side: resampled by nearest neighbour.
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    size = [int(np.ceil(n * s / 1.3)) + 10 for n, s in zip(mask.GetSize(), mask.GetSpacing())]
    origin = np.array(mask.GetOrigin()) - direction @ np.full(3, 5 * 1.3)
    coarse = sitk.Resample(
        mask,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        origin.tolist(),
        [1.3] * 3,
        mask.GetDirection(),
        0,
        sitk.sitkUInt8,
    )
    tight = deidentify(image, "blur", brain_mask=coarse, margin_mm=0.0)
    wide = deidentify(image, "blur", brain_mask=coarse, margin_mm=6.0)
    tight_mask = sitk.GetArrayFromImage(tight.brain_mask) > 0
    wide_mask = sitk.GetArrayFromImage(wide.brain_mask) > 0
    original = sitk.GetArrayFromImage(mask) > 0
    assert tight.provenance["brain_mask"] == "user"
    dice = 2 * (tight_mask & original).sum() / (tight_mask.sum() + original.sum())
    assert dice > 0.93  # two nearest-neighbour resamplings between 2 mm and 1.3 mm grids
    assert wide_mask[tight_mask].all() and wide_mask.sum() > 1.2 * tight_mask.sum()
    after = sitk.GetArrayFromImage(wide.image)
    assert np.array_equal(sitk.GetArrayFromImage(image)[wide_mask], after[wide_mask])


def test_mask_that_misses_the_head_is_refused(head_path):
    image = read_volume(head_path).image
    far = sitk.Image([20, 20, 20], sitk.sitkUInt8) + 1
    far.SetOrigin([5000.0, 5000.0, 5000.0])
    with pytest.raises(InputError, match="does not overlap"):
        deidentify(image, "blur", brain_mask=far)


def test_cancel_stops_the_run(head_path):
    image = read_volume(head_path).image
    stages = []

    def cancel() -> bool:
        return "brain mask" in stages

    with pytest.raises(Cancelled):
        deidentify(image, "blur", progress=lambda stage, fraction: stages.append(stage), cancel=cancel)
    assert "composite" not in stages


def test_no_default_method_until_remodel_exists(head_path):
    from MRIDeIdentifyLib.methods import METHODS

    if "remodel" in METHODS:
        pytest.skip("remodel is registered: the default exists")
    with pytest.raises(InputError, match="--method"):
        deidentify(read_volume(head_path).image)


def _dicom_cases() -> list:
    from conftest import dicom_series
    from MRIDeIdentifyLib.dicom import list_series

    cases = []
    for folder in dicom_series():
        for info in list_series(folder):
            cases.append(pytest.param(folder, info.uid, id=f"{folder.name}-{info.uid[-6:]}"))
    return cases or [pytest.param(None, None, marks=pytest.mark.skip(reason="shared DICOM data not found"))]


@pytest.mark.parametrize("folder,uid", _dicom_cases())
def test_dicom_series_are_brain_exact(folder, uid):
    volume = read_volume(folder, uid)
    result = deidentify(volume.image, "blur")
    assert_same_grid(volume.image, result.image)
    brain = sitk.GetArrayViewFromImage(result.brain_mask) > 0
    assert brain.sum() > 1000
    assert np.array_equal(
        sitk.GetArrayViewFromImage(volume.image)[brain], sitk.GetArrayViewFromImage(result.image)[brain]
    )


def test_margin_dilation_is_in_millimetres_on_anisotropic_voxels():
    from MRIDeIdentifyLib.brainmask import dilate_mm

    mask = np.zeros((21, 21, 21), bool)
    mask[10, 10, 10] = True
    # Voxels of 3 mm along k and 1 mm along j, i: a 3 mm margin reaches one voxel along k, three along j.
    grown = dilate_mm(mask, (3.0, 1.0, 1.0), 3.0)
    assert grown[9, 10, 10] and grown[11, 10, 10] and not grown[8, 10, 10]
    assert grown[10, 7, 10] and not grown[10, 6, 10]
    assert not grown[9, 8, 10]  # sqrt(3^2 + 2^2) > 3 mm


def test_margin_dilation_equals_the_distance_transform(head_path):
    """The row-by-row ball dilation is the Euclidean distance transform thresholded at the margin, ties included."""
    from scipy import ndimage

    from MRIDeIdentifyLib.brainmask import dilate_mm

    image = read_volume(head_path).image
    head = sitk.GetArrayViewFromImage(image) > np.percentile(sitk.GetArrayViewFromImage(image), 70)
    for spacing in ((1.0, 1.0, 1.0), (2.0, 0.9, 0.9), (1.2, 1.0, 0.5)):
        for margin in (0.5, 1.0, 2.0, 3.0, 4.5):
            reference = ndimage.distance_transform_edt(~head, sampling=spacing) <= margin + 1e-6 * min(spacing)
            np.testing.assert_array_equal(dilate_mm(head, spacing, margin), reference, err_msg=f"{spacing} {margin}")


@pytest.mark.parametrize("name", ["S01_dcmqa_decubitus_HFS_T1fl2d_sag.nii.gz", "S01_chris_t1_mricron.nii.gz"])
def test_brain_probability_is_resampled_to_native_as_on_the_whole_grid(shared_data, name):
    """Resampling only the native voxels near deepbet's box gives what resampling the whole work grid gives, to
    float rounding (the region's origin is another point, so interpolation weights differ in the last bits)."""
    from MRIDeIdentifyLib.brainmask import _box_to_native, _from_ras_array, _ras_work_image

    image = read_volume(shared_data / "heads" / name).image
    work = _ras_work_image(image)
    size = work.GetSize()
    rng = np.random.default_rng(0)
    # Boxes inside the work grid and touching its faces, as deepbet's may.
    for box in (
        (slice(20, size[0] - 30), slice(15, size[1] // 2), slice(size[2] // 3, size[2] - 5)),
        (slice(0, size[0]), slice(0, 40), slice(size[2] - 50, size[2])),
    ):
        inside = rng.random(tuple(s.stop - s.start for s in box)).astype(np.float32)
        whole = np.zeros(size, np.float32)
        whole[box] = inside
        reference = sitk.GetImageFromArray(_from_ras_array(whole))
        reference.CopyInformation(work)
        expected = sitk.GetArrayFromImage(
            sitk.Resample(reference, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        )
        assert expected.any()
        np.testing.assert_allclose(_box_to_native(inside, box, work, image), expected, rtol=0, atol=1e-6)


def test_a_missing_optional_package_disables_only_its_method():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'quickshear':\n"
        "            raise ModuleNotFoundError(\"No module named 'quickshear'\", name='quickshear')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from MRIDeIdentifyLib.methods import METHODS, get_method\n"
        "assert 'quickshear' not in METHODS and 'blur' in METHODS, list(METHODS)\n"
        "try:\n"
        "    get_method('quickshear')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install quickshear" in done.stdout
