"""Offscreen face renderings: face-on whatever the orientation, same camera before/after, QA files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import head_files, params
from PIL import Image

from MRIDeIdentifyLib import render
from MRIDeIdentifyLib.reader import image_like, read_volume

SIZE = 192


def _synthetic_head(direction: np.ndarray, nose: bool = True) -> sitk.Image:
    """An ellipsoid head (180 x 200 x 220 mm, LPS) with a nose on its anterior side, sampled at 3 mm on a grid
    whose voxel axes follow ``direction`` (columns in LPS): the same physical object in any orientation."""
    size = 90
    image = sitk.Image([size] * 3, sitk.sitkFloat32)
    image.SetSpacing([3.0] * 3)
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((-(direction @ np.full(3, 3.0 * (size - 1) / 2))).tolist())
    k, j, i = np.indices([size] * 3, dtype=np.float64)
    points = (np.stack([i, j, k], -1) * 3.0) @ direction.T + np.asarray(image.GetOrigin())
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    inside = (x / 90) ** 2 + (y / 100) ** 2 + (z / 110) ** 2 < 1
    if nose:  # a cone 30 mm long in front of the face (anterior is -y in LPS), below the eyes' level
        along = -100 - y
        inside |= (along > -10) & (along < 25) & (x**2 + (z + 20) ** 2 < (0.6 * (25 - along)) ** 2)
    out = image_like((100.0 * inside).astype(np.float32), image)
    return out


def _orientations() -> dict[str, np.ndarray]:
    def axes(code: str) -> np.ndarray:  # columns: LPS direction of voxel axes i, j, k for a RAS-style code
        unit = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
        return np.array([unit[c] for c in code], float).T

    angle = np.radians(17.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return {"RAS": axes("RAS"), "LIA": axes("LIA"), "PIR": axes("PIR"), "oblique": tilt @ axes("LPS")}


def test_same_head_renders_alike_in_every_orientation():
    pictures = {}
    for name, direction in _orientations().items():
        head = _synthetic_head(direction)
        pictures[name] = render.render_face(head, 50.0, render.Shot(size=SIZE)).astype(float)
    reference = pictures.pop("RAS")
    assert (reference[..., 0] > 0).mean() > 0.2
    for name, picture in pictures.items():
        silhouette_overlap = np.mean((picture[..., 0] > 0) == (reference[..., 0] > 0))
        if name == "oblique":  # the camera follows the scan's axes, tilted by 17 degrees
            assert silhouette_overlap > 0.85, name
        else:
            assert silhouette_overlap > 0.98, name
            assert np.abs(picture - reference).mean() < 6.0, name


def test_camera_sees_the_face_not_the_back():
    direction = _orientations()["LIA"]
    with_nose, without_nose = _synthetic_head(direction), _synthetic_head(direction, nose=False)
    front = [render.render_face(h, 50.0, render.Shot(size=SIZE)).astype(float) for h in (with_nose, without_nose)]
    view = render.face_view(render.skin_surface(with_nose, 50.0), with_nose)
    back = [
        render.render_face(h, 50.0, render.Shot(yaw_deg=180, size=SIZE), view).astype(float)
        for h in (with_nose, without_nose)
    ]
    # The nose changes the frontal picture near its centre and leaves the back view as it was.
    change = np.abs(front[0] - front[1])[..., 0]
    assert change.mean() > 3.0
    rows, columns = np.nonzero(change > 20)
    assert abs(columns.mean() / SIZE - 0.5) < 0.05
    assert np.abs(back[0] - back[1]).mean() < 0.5


def test_face_direction_matches_the_header_axis_codes():
    for name, direction in _orientations().items():
        anterior, superior = render.face_direction(_synthetic_head(direction, nose=False))
        assert anterior @ np.array([0, -1, 0]) > 0.95 and superior @ np.array([0, 0, 1]) > 0.95, name
        assert abs(anterior @ superior) < 1e-9


@pytest.mark.parametrize("path", params(head_files()))
def test_every_shared_head_renders_face_on(path):
    image = read_volume(path).image
    codes = nib.aff2axcodes(nib.load(str(path)).affine)
    anterior, _ = render.face_direction(image)
    # The axis nibabel calls A (or P) is the one the camera looks along.
    a_axis = codes.index("A") if "A" in codes else codes.index("P")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert abs(anterior @ direction[:, a_axis]) > 0.99

    threshold = render.skin_threshold(image)
    surface = render.skin_surface(image, threshold)
    view = render.face_view(surface, image)
    front = render.render_surface(surface, view, render.Shot(size=SIZE))
    back = render.render_surface(surface, view, render.Shot(yaw_deg=180, size=SIZE))
    silhouette = front[..., 0] > 0
    assert front.dtype == np.uint8 and front.shape == (SIZE, SIZE, 3)
    assert 0.15 < silhouette.mean() < 0.8
    assert abs(np.nonzero(silhouette)[1].mean() / SIZE - 0.5) < 0.06  # centred left-right
    # Seen from the front, the head is further away than from behind (the camera aims at the face).
    assert silhouette.mean() < (back[..., 0] > 0).mean()
    try:
        import dlib
    except ImportError:  # the 'eval' extra is not installed
        return
    # A face detector finds a face more readily in the frontal view than in the back view.
    detector = dlib.get_frontal_face_detector()
    scores = [
        max(detector.run(np.asarray(Image.fromarray(p).resize((512, 512))), 1, -1.5)[1], default=-10.0)
        for p in (front, back)
    ]
    assert scores[0] > scores[1]


def test_write_qa_before_after(head_path, tmp_path):
    before = read_volume(head_path).image
    array = sitk.GetArrayFromImage(before)
    anterior, _ = render.face_direction(before)
    direction = np.asarray(before.GetDirection()).reshape(3, 3)
    k, j, i = np.indices(array.shape, dtype=np.float64)
    depth = (np.stack([i, j, k], -1) * before.GetSpacing()) @ (direction.T @ anterior)
    head = array > render.skin_threshold(before)
    after_array = array.copy()
    after_array[depth > depth[head].max() - 30.0] = 0  # the front 30 mm removed: a crude deface
    after = image_like(after_array, before)

    paths = render.write_qa(before, after, tmp_path / "qa", size=SIZE)
    assert [p.name for p in paths] == [
        "qa_before_frontal.png",
        "qa_before_45deg.png",
        "qa_after_frontal.png",
        "qa_after_45deg.png",
        "qa_before_after.png",
    ]
    pictures = {p.stem: np.asarray(Image.open(p)).astype(float) for p in paths}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert np.abs(pictures["qa_before_frontal"] - pictures["qa_after_frontal"]).mean() > 3.0
    sheet = pictures["qa_before_after"]
    assert sheet.shape[1] == 2 * SIZE and sheet.shape[0] > 2 * SIZE
    # The sheet's bottom-left tile is the before 45-degree view, pasted unchanged.
    assert np.array_equal(sheet[-SIZE:, :SIZE], pictures["qa_before_45deg"])
