"""The ``remodel`` method (C-DeID-GAN with the face prior) through the engine's pipeline on a real head."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MRIDeIdentifyLib.errors import InputError
from MRIDeIdentifyLib.methods import default_method, method_names
from MRIDeIdentifyLib.model import DEFAULT_WEIGHTS, file_sha256
from MRIDeIdentifyLib.pipeline import deidentify
from MRIDeIdentifyLib.reader import read_volume


@pytest.fixture(scope="module")
def image(head_path) -> sitk.Image:
    return read_volume(head_path).image


@pytest.fixture(scope="module")
def first(image):
    return deidentify(image, "remodel", seed=0, device="cpu")


def _again(image, first, **kwargs):
    """Another run on exactly the first run's brain region (a user mask with no extra margin; no brain extractor)."""
    return deidentify(image, "remodel", brain_mask=first.brain_mask, margin_mm=0.0, device="cpu", **kwargs)


def test_remodel_is_registered_as_the_default():
    assert "remodel" in method_names()
    assert default_method() == "remodel"


def test_output_keeps_the_grid_and_every_brain_voxel(image, first):
    out = first.image
    assert out.GetSize() == image.GetSize()
    assert out.GetPixelID() == image.GetPixelID()
    assert np.allclose(out.GetSpacing(), image.GetSpacing()) and np.allclose(out.GetOrigin(), image.GetOrigin())
    assert np.allclose(out.GetDirection(), image.GetDirection())
    before, after = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(out)
    brain = sitk.GetArrayFromImage(first.brain_mask).astype(bool)
    assert brain.sum() > 0.05 * brain.size
    assert np.array_equal(after[brain], before[brain])


def test_the_face_is_regenerated(image, first):
    before = sitk.GetArrayFromImage(image).astype(np.float32)
    after = sitk.GetArrayFromImage(first.image).astype(np.float32)
    face = sitk.GetArrayFromImage(first.face_mask).astype(bool)
    assert face.sum() > 0.05 * face.size
    # Regenerated, not copied: the changed region differs from the input by a good share of the tissue level.
    tissue = np.percentile(before[before > 0], 90)
    assert np.abs(after[face] - before[face]).mean() > 0.05 * tissue
    # ...and it is a head, not air: a large part of the changed region is tissue in the output.
    assert (after[face] > 0.25 * tissue).mean() > 0.3


def test_same_seed_same_output_and_the_seed_matters(image, first):
    same = _again(image, first, seed=0)
    other = _again(image, first, seed=1)
    assert np.array_equal(sitk.GetArrayFromImage(same.image), sitk.GetArrayFromImage(first.image))
    assert not np.array_equal(sitk.GetArrayFromImage(other.image), sitk.GetArrayFromImage(first.image))


def test_model_option_and_provenance(image, first):
    record = first.provenance
    text = repr(record)
    sha = file_sha256(DEFAULT_WEIGHTS)
    assert sha in text
    explicit = _again(image, first, seed=0, options={"model": str(DEFAULT_WEIGHTS)})
    assert np.array_equal(sitk.GetArrayFromImage(explicit.image), sitk.GetArrayFromImage(first.image))


def test_a_missing_model_fails_before_the_brain_mask(image, tmp_path):
    """The model is checked first: a user must not wait for the brain extractor to learn the path is wrong."""
    stages = []
    with pytest.raises(InputError, match="not found"):
        deidentify(
            image,
            "remodel",
            device="cpu",
            options={"model": str(tmp_path / "missing.safetensors")},
            progress=lambda stage, fraction: stages.append(stage),
        )
    assert stages == []


def test_the_remodelled_head_covers_the_brain(image, first):
    """No brain showing through the skin: on the held-out P06 MPRAGE, whose tissue is far brighter relative
    to its brain than the training heads', the generated head fell under the head threshold until the tissue
    gain (41 % of the brain's surface lay within 3 mm of air; 0 % in the input)."""
    from scipy import ndimage

    from MRIDeIdentifyLib.headmask import head_mask, head_threshold

    brain = sitk.GetArrayFromImage(first.brain_mask) > 0
    surface = brain & ~ndimage.binary_erosion(brain)
    outside = ~head_mask(first.image, head_threshold(image))
    distance = ndimage.distance_transform_edt(~outside, sampling=image.GetSpacing()[::-1])
    assert (distance[surface] <= 3.0).mean() < 0.01
    assert 0.5 <= first.provenance["tissue_gain"] <= 2.0


def test_the_sidecar_says_an_identity_was_drawn_and_nothing_more(first):
    from MRIDeIdentifyLib.faceprior import load_face_prior

    record = first.provenance["face_prior"]
    assert set(record) == {"sha256", "modes", "sigma", "identity"}
    assert record["sha256"] == load_face_prior().sha256 and record["modes"] == 60 and record["sigma"] == 1.0
    for stage in ("privacy transform", "face prior", "skin", "generator", "to native"):
        assert stage in first.provenance["timings_s"]


def test_the_skin_is_the_sampled_surface_at_native_resolution(image, first):
    """The output's air/skin boundary is the drawn face's own surface: a new outline (not the input's) that is
    sharp on the input grid, tissue on one side and air on the other within the rim, not a 4 mm ramp."""
    from scipy import ndimage

    from MRIDeIdentifyLib.headmask import head_mask, head_threshold

    threshold = head_threshold(image)
    before, after = head_mask(image, threshold), head_mask(first.image, threshold)
    face = sitk.GetArrayFromImage(first.face_mask).astype(bool) & (before | after)
    changed = (before ^ after) & face
    assert changed.sum() > 0.05 * face.sum()  # a new outline, not the old one
    values = sitk.GetArrayFromImage(first.image).astype(np.float32)
    inner = after & ~ndimage.binary_erosion(after)  # the skin's voxels
    outer = ndimage.binary_dilation(after) & ~after  # the air touching them
    assert np.median(values[inner]) > 1.5 * threshold and np.median(values[outer]) < threshold
