"""The template and removal baselines (reface, deface, quickshear) on real heads, through the composite.

Three whole-face heads: S06 (2 mm MPRAGE, PIL), S05 (3 mm FreeSurfer .mgz, LIA) and S06 re-labelled with an
oblique geometry (the same voxels on a grid rotated 25 degrees about L and 10 about S, so the head is tilted in
physical space and no voxel axis is anatomical). Each scan's brain mask is computed once and handed to
every method as a user mask, so the deepbet cost is paid once per scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MRIDeIdentifyLib.brainmask import extract_brain_mask
from MRIDeIdentifyLib.headmask import head_mask, head_threshold
from MRIDeIdentifyLib.methods.reface import local_gain, match_intensities
from MRIDeIdentifyLib.pipeline import deidentify
from MRIDeIdentifyLib.reader import image_like, ras_affine, read_volume
from MRIDeIdentifyLib.registration import register, warp
from MRIDeIdentifyLib.template import fit_template, load_template
from MRIDeIdentifyLib.methods.quickshear import shear_mask

METHODS = ("reface", "deface", "quickshear")
CASES = ("S06_2mm_PIL", "S05_3mm_mgz", "S06_oblique")


def _tilt() -> np.ndarray:
    """The oblique copy's rotation (LPS): 25 degrees about L, then 10 about S."""
    about_l, about_s = sitk.VersorRigid3DTransform(), sitk.VersorRigid3DTransform()
    about_l.SetRotation((1.0, 0.0, 0.0), np.deg2rad(25.0))
    about_s.SetRotation((0.0, 0.0, 1.0), np.deg2rad(10.0))
    return np.array(about_s.GetMatrix()).reshape(3, 3) @ np.array(about_l.GetMatrix()).reshape(3, 3)


def _oblique(image: sitk.Image) -> sitk.Image:
    """``image``'s voxels on a grid rotated by :func:`_tilt` about its centre: a tilted head, oblique slices."""
    matrix = _tilt()
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    out = sitk.Image(image)
    out.SetDirection((matrix @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    out.SetOrigin((centre + matrix @ (np.array(image.GetOrigin()) - centre)).tolist())
    return out


def _with_geometry(mask: sitk.Image, like: sitk.Image) -> sitk.Image:
    out = sitk.Image(mask)
    out.CopyInformation(like)
    return out


@pytest.fixture(scope="module")
def scans(shared_data: Path):
    """name -> (image, brain mask image, head rotation): the brain mask as deepbet finds it, not dilated.

    The rotation (3 x 3, LPS) takes the anatomical axes of the scanner's frame to the head's: identity for the
    scans as acquired (their headers are right), the tilt for the oblique copy.
    """
    heads = shared_data / "heads"
    s06 = read_volume(heads / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz").image
    s05 = read_volume(heads / "S05_mne_sample_T1_3mm.mgz").image
    out = {}
    for name, image in (("S06_2mm_PIL", s06), ("S05_3mm_mgz", s05)):
        brain = image_like(extract_brain_mask(image).astype(np.uint8), image)
        out[name] = (image, brain, np.eye(3))
    oblique = _oblique(s06)
    # Re-labelling the grid moves voxels and mask together: the S06 mask stays exact on the oblique copy.
    out["S06_oblique"] = (oblique, _with_geometry(out["S06_2mm_PIL"][1], oblique), _tilt())
    return out


@pytest.fixture(scope="module")
def results(scans):
    """(case, method) -> pipeline Result, each method run once per scan."""
    return {
        (case, method): deidentify(scans[case][0], method, brain_mask=scans[case][1], seed=5)
        for case in CASES
        for method in METHODS
    }


def _physical(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """LPS mm coordinates (N x 3) of the voxels of a bool KJI ``mask``."""
    kji = np.argwhere(mask)
    index_to_point = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return kji[:, ::-1] @ index_to_point.T + np.array(image.GetOrigin())


def _regions(image: sitk.Image, brain: np.ndarray, rotation: np.ndarray):
    """Bool KJI tissue masks of the nose (within 12 mm of its tip) and of the back of the head.

    Directions are anatomical: ``rotation`` takes LPS anterior and superior to the head's. The nose tip is
    the most anterior tissue point 10 to 80 mm below the brain's centre and within 15 mm of its midline;
    the back of the head is the tissue more than 60 mm behind the brain's centre and above it.
    """
    array = sitk.GetArrayFromImage(image)
    tissue = head_mask(image) & (array > head_threshold(image))
    points = _physical(image, tissue)
    brain_centre = _physical(image, brain).mean(axis=0)
    left, forward, up = (rotation @ np.array(axis) for axis in ((1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)))
    relative = points - brain_centre
    height, depth, side = relative @ up, relative @ forward, relative @ left
    candidates = (height < -10.0) & (height > -80.0) & (np.abs(side) < 15.0)
    tip = points[candidates][np.argmax(depth[candidates])]
    nose = np.linalg.norm(points - tip, axis=1) < 12.0
    back = (depth < -60.0) & (height > 0.0)
    return tuple(_scatter(tissue, selection) for selection in (nose, back))


def _scatter(tissue: np.ndarray, selection: np.ndarray) -> np.ndarray:
    out = np.zeros_like(tissue)
    out[tuple(np.argwhere(tissue)[selection].T)] = True
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_brain_exact_on_the_input_grid(scans, results, case, method):
    image = scans[case][0]
    result = results[case, method]
    for name, get in (
        ("size", "GetSize"),
        ("spacing", "GetSpacing"),
        ("origin", "GetOrigin"),
        ("direction", "GetDirection"),
    ):
        np.testing.assert_allclose(getattr(result.image, get)(), getattr(image, get)(), rtol=0, atol=1e-9, err_msg=name)
    assert result.image.GetPixelID() == image.GetPixelID()
    before, after = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(result.image)
    brain = sitk.GetArrayViewFromImage(result.brain_mask) > 0
    given = sitk.GetArrayViewFromImage(scans[case][1]) > 0
    assert brain[given].all()
    assert np.array_equal(before[brain], after[brain])
    face = sitk.GetArrayViewFromImage(result.face_mask) > 0
    assert face.any() and not (face & brain).any()


@pytest.mark.parametrize("method", ("deface", "quickshear"))
@pytest.mark.parametrize("case", CASES)
def test_removal_empties_the_nose_and_keeps_the_back_of_the_head(scans, results, case, method):
    image, brain_image, rotation = scans[case]
    nose, back = _regions(image, sitk.GetArrayFromImage(brain_image) > 0, rotation)
    assert nose.sum() > 20 and back.sum() > 500
    before = sitk.GetArrayFromImage(image)
    after = sitk.GetArrayFromImage(results[case, method].image)
    threshold = head_threshold(image)
    # The nose drops to the air background; the occiput and parietal scalp are untouched voxel for voxel.
    assert np.mean(after[nose] < threshold) > 0.95
    assert np.mean(after[back] == before[back]) > 0.99
    face = sitk.GetArrayFromImage(results[case, method].face_mask) > 0
    assert face[nose].mean() > 0.95 and not face[back].any()


@pytest.mark.parametrize("case", CASES)
def test_reface_replaces_the_face_surface_with_a_head_shaped_one(scans, results, case):
    image, brain_image, rotation = scans[case]
    brain = sitk.GetArrayFromImage(brain_image) > 0
    result = results[case, "reface"]
    threshold = head_threshold(image)
    before = sitk.GetArrayFromImage(image).astype(np.float32)
    after = sitk.GetArrayFromImage(result.image).astype(np.float32)
    head_before = head_mask(image, threshold)
    head_after = head_mask(result.image, threshold)
    # Head-shaped: the average head was fitted to this head's size and outline.
    dice = 2 * (head_before & head_after).sum() / (head_before.sum() + head_after.sum())
    assert dice > 0.85, dice
    # The face is new: within 40 mm of the nose tip, outside the brain margin, the skin surface (where
    # tissue begins) has moved and the intensities are the template's, not the subject's.
    nose, _ = _regions(image, brain, rotation)
    tip = _physical(image, nose).mean(axis=0)
    outside = ~(sitk.GetArrayFromImage(result.brain_mask) > 0)
    near = np.zeros_like(brain)
    everything = np.ones_like(brain)
    near[tuple(np.argwhere(everything)[np.linalg.norm(_physical(image, everything) - tip, axis=1) < 40.0].T)] = True
    face = near & outside
    tissue_before, tissue_after = (before > threshold) & face, (after > threshold) & face
    moved = (tissue_before ^ tissue_after).sum() / (tissue_before | tissue_after).sum()
    assert moved > 0.4, moved
    tissue = tissue_before | tissue_after
    scale = np.percentile(before[head_before], 95)
    assert np.mean(np.abs(after[tissue] - before[tissue])) > 0.1 * scale
    # ... and it is still a face, not a removal: tissue fills most of what was tissue there.
    assert tissue_after.sum() > 0.6 * tissue_before.sum()


@pytest.mark.parametrize("case", ("S05_3mm_mgz", "S06_oblique"))
def test_registration_puts_the_template_brain_on_the_subject_brain(scans, case):
    image, brain_image, _ = scans[case]
    template = load_template()
    template_brain = image_like(extract_brain_mask(template.image).astype(np.uint8), template.image)
    transform = fit_template(image, head_mask(image), seed=0)
    warped = sitk.GetArrayFromImage(warp(template_brain, image, transform, sitk.sitkNearestNeighbor)) > 0
    brain = sitk.GetArrayFromImage(brain_image) > 0
    dice = 2 * (warped & brain).sum() / (warped.sum() + brain.sum())
    assert dice > 0.85, dice


def test_registration_is_reproducible(scans):
    image = scans["S05_3mm_mgz"][0]
    template = load_template()
    head = image_like(head_mask(image).astype(np.uint8), image)
    points = [(0.0, 80.0, -40.0), (30.0, -60.0, 20.0)]
    # On 8 mm copies to keep it quick; the same code runs at 4 mm.
    first, second = (register(image, template.image, head, template.head, spacing_mm=8.0, seed=3) for _ in range(2))
    assert [first.TransformPoint(p) for p in points] == [second.TransformPoint(p) for p in points]


def test_histogram_matching_maps_template_quantiles_onto_the_subject():
    rng = np.random.default_rng(0)
    template = rng.gamma(2.0, 50.0, 20000).astype(np.float32)
    subject = (3.0 * np.sqrt(template) + 7.0).astype(np.float32)  # monotone, non-linear
    region = np.ones(template.shape, bool)
    mapped = match_intensities(template, subject, region, fallback=region)
    inner = (template > np.percentile(template, 2)) & (template < np.percentile(template, 98))
    np.testing.assert_allclose(mapped[inner], subject[inner], rtol=0.03)
    # Too few voxels in the region: the fallback region sets the map.
    tiny = np.zeros_like(region)
    tiny[:10] = True
    np.testing.assert_allclose(match_intensities(template, subject, tiny, fallback=region), mapped)


def test_local_gain_corrects_regional_brightness_and_fades_away_from_tissue():
    # A template half as bright as the subject on one side of a slab, equal on the other.
    reference = np.full((40, 40, 80), 100.0, np.float32)
    values = reference.copy()
    values[:, :, :40] *= 0.5
    region = np.zeros(reference.shape, bool)
    region[10:30, 10:30, 5:75] = True
    gain = local_gain(values, reference, region, np.array([1.0, 1.0, 1.0]))
    assert abs(gain[20, 20, 12] - 2.0) < 0.1 and abs(gain[20, 20, 68] - 1.0) < 0.1
    # Far from any subject tissue the gain is 1: nothing there to match.
    far = np.zeros_like(region)
    far[:, :, 70:] = True
    gain = local_gain(values, reference, far, np.array([1.0, 1.0, 1.0]))
    assert abs(gain[20, 20, 5] - 1.0) < 1e-3


def test_quickshear_plane_follows_the_anatomy_not_the_voxel_axes(scans):
    image, brain_image, _ = scans["S06_2mm_PIL"]
    brain = sitk.GetArrayFromImage(brain_image) > 0
    keep = shear_mask(brain, ras_affine(image), 10.0)
    # The same mask with the voxel axes reversed along K: the kept region is the same anatomy, reversed.
    flipped_affine = ras_affine(image) @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, brain.shape[0] - 1], [0, 0, 0, 1]], float
    )
    keep_flipped = shear_mask(brain[::-1], flipped_affine, 10.0)
    assert np.array_equal(keep, keep_flipped[::-1])
    assert keep[brain].all() and (~keep).sum() > 0.1 * keep.size
