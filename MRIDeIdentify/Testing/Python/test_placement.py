"""Placing a face-prior identity from gamma alone (placement.py) on real heads: upright, oblique, partial fields of
view; and fitting the prior to a training head's own face."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from MRIDeIdentifyLib.brainmask import dilate_mm, extract_brain_mask
from MRIDeIdentifyLib.faceprior import load_face_prior
from MRIDeIdentifyLib.headmask import head_mask, head_threshold
from MRIDeIdentifyLib.modelgrid import ModelGrid
from MRIDeIdentifyLib.modelinputs import model_inputs
from MRIDeIdentifyLib.placement import (
    brain_distance,
    draw_face,
    field_of_view,
    fit_identity,
    identity_rng,
    native_skin,
    place,
    register_pose,
    skin_points,
)
from MRIDeIdentifyLib.reader import read_volume

from conftest import HEADS_DIR, SKIP_REASON

pytestmark = pytest.mark.skipif(not HEADS_DIR.is_dir(), reason=SKIP_REASON)


class Scan:
    """A real head as remodel sees it: head and dilated brain masks, its 64³ model grid and gamma."""

    def __init__(self, image: sitk.Image):
        self.image = image
        self.array = sitk.GetArrayFromImage(image).astype(np.float32)
        self.head = head_mask(image, head_threshold(image), array=self.array)
        self.brain = dilate_mm(extract_brain_mask(image, torch.device("cpu")), image.GetSpacing()[::-1], 3.0)
        self.grid = ModelGrid.around(image, self.head, self.brain, size=64, array=self.array)
        self.gamma = model_inputs(
            self.grid.to_model(image), self.grid.mask_to_model(self.brain, image), seed=0
        ).gamma.numpy()

    def face(self, seed: int = 0, image: sitk.Image | None = None) -> np.ndarray:
        return draw_face(
            load_face_prior(),
            seed,
            self.array[self.brain],
            self.gamma,
            self.grid,
            self.image if image is None else image,
            1.0,
        )

    def surface(self) -> cKDTree:
        return cKDTree(skin_points(self.image, self.head, step=1))


def _oblique(image: sitk.Image, degrees: float) -> tuple[sitk.Image, np.ndarray]:
    """The same voxels with direction cosines rotated about the head's centre (pitch about L, then roll about P):
    the head turns in physical space. Returns the copy and the 4x4 map from old to new physical points."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    pitch = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    roll = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rotation = roll @ pitch
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    copy = sitk.Image(image)
    copy.SetDirection(tuple((rotation @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    copy.SetOrigin(tuple(rotation @ (np.array(image.GetOrigin()) - centre) + centre))
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = centre - rotation @ centre
    return copy, transform


def _assert_on_the_head(scan: Scan, vertices: np.ndarray, tolerance_mm: float = 6.0) -> None:
    """The placed skin above the nose, where it lies in the field of view, follows the real head's outline
    (median < ``tolerance_mm``), and the eyes sit inside the head behind its front."""
    prior = load_face_prior()
    surface = scan.surface()
    fov = field_of_view(scan.image, scan.grid)
    index = (vertices - np.asarray(scan.grid.origin)) / scan.grid.spacing
    in_view = (
        ndimage.map_coordinates(ndimage.binary_erosion(fov, iterations=2).astype(float), index[:, ::-1].T, order=0)
        > 0.5
    )
    upper = prior.mean[:, 2] > prior.mean[prior.landmarks[30], 2]
    distance = surface.query(vertices[upper & in_view])[0]
    assert np.median(distance) < tolerance_mm, np.median(distance)
    eye_depth = surface.query(vertices[prior.eyes])[0]
    # An eyeball's centre lies about 15-25 mm behind the real skin where the face is; a posing error adds to it.
    assert np.all((eye_depth > 3.0) & (eye_depth < 24.0 + tolerance_mm)), eye_depth


@pytest.fixture(scope="module")
def s06() -> Scan:
    return Scan(read_volume(HEADS_DIR / "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz").image)


@pytest.mark.parametrize(
    "name, tolerance_mm",
    [
        ("S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz", 6.0),
        ("S05_mne_sample_T1_3mm.mgz", 6.0),
        ("S13_seg3d_MR_T1.nii.gz", 6.0),
        ("S01_dcmqa_decubitus_HFS_T1fl2d_sag.nii.gz", 6.0),
        # Measured 7.2 mm; 8.2 before the pose compared only voxels in the field of view (the face sat too high).
        ("S01_chris_t1_mricron.nii.gz", 7.5),
    ],
)
def test_the_face_sits_where_the_head_is(name, tolerance_mm, s06):
    """Whole-face (S06, S05), partial fields of view (S13: eyes and up; S01 mricron: cut at the nose tip) and thick
    sagittal slices (S01 decubitus): the placed skin follows the real head's outline above the nose (median
    < 6 mm; 7.5 mm for the head cut at the nose), the eyes sit inside the head just behind its front, and no brain
    voxel lies within 6 mm of the new skin."""
    scan = s06 if name.startswith("S06") else Scan(read_volume(HEADS_DIR / name).image)
    prior = load_face_prior()
    vertices = scan.face()
    _assert_on_the_head(scan, vertices, tolerance_mm)
    skin = native_skin(prior, vertices, scan.image, brain_distance(scan.gamma, scan.grid))
    assert skin[scan.brain].max() < 0.0


def test_an_oblique_scan_gets_its_face_on_its_face(s06):
    """Direction cosines turned by 25° pitch and 12.5° roll: the pose turns with the head to within 12° (the
    pose comes from a 4 mm hull and brain, each extracted again from the turned scan: measured 4.4° with the same
    brain mask, 8.4° with deepbet run on the turned copy), and the placed face follows the turned head's outline
    to about a centimetre (measured 9.2 mm median, against 2-5 mm on upright scans: the pose error shows)."""
    prior = load_face_prior()
    turned, transform = _oblique(s06.image, 25.0)
    other = Scan(turned)
    poses = [register_pose(scan.gamma, scan.grid, prior, field_of_view(scan.image, scan.grid)) for scan in (s06, other)]
    relative = poses[1].rotation @ poses[0].rotation.T
    angle = np.degrees(np.arccos(np.clip((np.trace(relative.T @ transform[:3, :3]) - 1) / 2, -1, 1)))
    assert angle < 12.0, angle
    vertices = place(
        prior,
        prior.shape(prior.sample(np.random.default_rng(5))),
        other.gamma,
        other.grid,
        field_of_view(other.image, other.grid),
        poses[1],
    )
    _assert_on_the_head(other, vertices, tolerance_mm=12.0)


def test_placement_reads_no_voxel_of_the_face(s06):
    """Given gamma, the input image lends only its field of view: an all-zero image of the same geometry
    places the same face."""
    blank = sitk.Image(s06.image.GetSize(), s06.image.GetPixelID())
    blank.CopyInformation(s06.image)
    assert np.array_equal(s06.face(seed=2, image=blank), s06.face(seed=2))


def test_identities_differ_between_scans_and_seeds_but_not_between_runs(s06):
    prior = load_face_prior()
    first = prior.sample(identity_rng(0, s06.array[s06.brain]))
    assert np.array_equal(first, prior.sample(identity_rng(0, s06.array[s06.brain])))
    assert not np.array_equal(first, prior.sample(identity_rng(1, s06.array[s06.brain])))
    other = read_volume(HEADS_DIR / "S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz").image
    values = sitk.GetArrayFromImage(other).astype(np.float32)[s06.brain]
    assert not np.array_equal(first, prior.sample(identity_rng(0, values)))


def test_fitting_the_prior_to_a_real_face(s06):
    """Training conditioning: the prior fitted to P06's own skin lies within a few mm of it, closer than the
    mean face placed from gamma alone."""
    prior = load_face_prior()
    points = skin_points(s06.image, s06.head)
    fov = field_of_view(s06.image, s06.grid)
    weights, fitted, error = fit_identity(prior, points, s06.gamma, s06.grid, fov)
    assert error < 3.0
    assert np.abs(weights).max() > 0.1
    face = prior.face_weight > 0.9
    tree = s06.surface()
    mean_placed = draw_face(prior, 0, s06.array[s06.brain], s06.gamma, s06.grid, s06.image, 0.0)
    assert np.median(tree.query(fitted[face])[0]) < np.median(tree.query(mean_placed[face])[0])
