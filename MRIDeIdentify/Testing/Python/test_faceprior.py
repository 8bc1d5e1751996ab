"""The face prior (faceprior.py), its surface as a signed distance (skin.py), and its build script."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MRIDeIdentifyLib.errors import InputError
from MRIDeIdentifyLib.faceprior import CLIP_SIGMAS, DEFAULT_PRIOR, load_face_prior, similarity_fit
from MRIDeIdentifyLib.skin import _closest_on_triangles, draw_skin, signed_distance

from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def prior():
    return load_face_prior()


def test_the_shipped_prior_is_small_verified_and_carries_its_licence(prior):
    assert DEFAULT_PRIOR.stat().st_size <= 8 * 2**20
    card = json.loads(DEFAULT_PRIOR.with_suffix(".json").read_text())
    assert "MIT" in card["licence"] and "USC Institute for Creative Technologies" in card["licence"]
    assert prior.n_modes == card["modes"] == 60
    model_card = (DEFAULT_PRIOR.parent / "MODEL_CARD.md").read_text()
    assert "ICT Face Model" in model_card and "Permission is hereby granted" in model_card


def test_a_damaged_prior_is_refused(tmp_path):
    copy = tmp_path / "faceprior.safetensors"
    shutil.copy(DEFAULT_PRIOR, copy)
    shutil.copy(DEFAULT_PRIOR.with_suffix(".json"), copy.with_suffix(".json"))
    assert load_face_prior(copy).sha256 == load_face_prior().sha256
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the sha256"):
        load_face_prior(copy)
    copy.with_suffix(".json").unlink()
    with pytest.raises(InputError, match="not found"):
        load_face_prior(copy)


def test_the_skin_is_closed_and_faces_outwards(prior):
    edges = Counter()
    for a, b, c in prior.triangles:
        for edge in ((a, b), (b, c), (c, a)):
            edges[edge] += 1
    # Watertight and consistently oriented: every directed edge once, its reverse once.
    assert all(count == 1 and edges[(b, a)] == 1 for (a, b), count in edges.items())
    a, b, c = (prior.mean[prior.triangles[:, n]] for n in range(3))
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    assert 3.0e6 < volume < 8.0e6  # mm³: a head and neck, outward normals
    # LPS: the nose tip (landmark 30) is the most anterior (lowest P) point of the face, above the chin (8).
    nose, chin = prior.mean[prior.landmarks[30]], prior.mean[prior.landmarks[8]]
    assert nose[1] < prior.mean[:, 1].min() + 5.0 and chin[2] < nose[2]
    assert prior.face_weight[prior.landmarks].min() == 1.0 and prior.face_weight.min() == 0.0


def test_identities_are_clipped_reproducible_and_carry_shape_only(prior):
    first = prior.sample(np.random.default_rng(3))
    assert np.array_equal(first, prior.sample(np.random.default_rng(3)))
    assert not np.array_equal(first, prior.sample(np.random.default_rng(4)))
    many = np.stack([prior.sample(np.random.default_rng(s)) for s in range(200)])
    assert np.abs(many).max() <= CLIP_SIGMAS and 0.8 < many.std() < 1.0
    face = prior.shape(first)
    # Position, rotation and size are the mean's (Procrustes): what is left is shape.
    scale, rotation, translation = similarity_fit(face, prior.mean)
    assert abs(scale - 1.0) < 1e-6 and np.allclose(rotation, np.eye(3), atol=1e-6)
    assert np.abs(translation).max() < 1e-6
    assert np.sqrt(((face - prior.mean) ** 2).sum(1).mean()) > 2.0  # yet a different face, by millimetres


def _icosphere(radius: float, centre: np.ndarray):
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    source = vtk.vtkSphereSource()
    source.SetRadius(radius)
    source.SetCenter(*centre)
    source.SetThetaResolution(96)
    source.SetPhiResolution(96)
    source.Update()
    mesh = source.GetOutput()
    points = vtk_to_numpy(mesh.GetPoints().GetData()).astype(np.float64)
    cells = vtk_to_numpy(mesh.GetPolys().GetConnectivityArray()).reshape(-1, 3)
    return points, cells


@pytest.mark.parametrize("oblique", [False, True])
def test_signed_distance_of_a_sphere_on_any_grid(oblique):
    centre = np.array([3.0, -5.0, 7.0])
    vertices, triangles = _icosphere(40.0, centre)
    grid = sitk.Image([90, 80, 70], sitk.sitkUInt8)
    grid.SetSpacing((1.1, 1.3, 2.2))
    grid.SetOrigin((-50.0, -55.0, -70.0))
    if oblique:
        angle = np.deg2rad(25.0)
        grid.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
        grid.SetOrigin((-30.0, -85.0, -70.0))
    distance = signed_distance(vertices, triangles, grid, spacing_mm=1.5, clip_mm=10.0)
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.GetSize()[::-1]], indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel()], 1).astype(float)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    points = (direction @ (index * grid.GetSpacing()).T).T + grid.GetOrigin()
    exact = (np.linalg.norm(points - centre, axis=1) - 40.0).reshape(distance.shape)
    near = np.abs(exact) < 3.0
    assert near.sum() > 10000
    assert np.abs(distance[near] - exact[near]).mean() < 0.15
    assert np.abs(distance[near] - exact[near]).max() < 0.8
    # The sign is right everywhere and far voxels are clipped.
    far = np.abs(exact) > 2.0
    assert np.array_equal(distance[far] < 0, exact[far] < 0)
    assert distance.min() >= -10.0 and distance.max() <= 10.0


def test_spheres_unite_with_the_mesh_and_the_rim_fades_into_air():
    vertices, triangles = _icosphere(30.0, np.zeros(3))
    grid = sitk.Image([60, 60, 60], sitk.sitkUInt8)
    grid.SetOrigin((-59.0, -59.0, -59.0))
    grid.SetSpacing((2.0, 2.0, 2.0))
    eye = np.array([[0.0, -40.0, 0.0]])
    distance = signed_distance(vertices, triangles, grid, spheres=(eye, 8.0), spacing_mm=2.0)
    # A voxel 3 mm inside the sphere standing off the mesh is inside the united surface.
    assert distance[29, 9, 29] < 0 and distance[29, 3, 29] > 0
    values = np.full(distance.shape, 100.0, np.float32)
    values[distance < -8.0] = 40.0  # darker tissue deeper in: the skin layer must rise above it
    drawn = draw_skin(values, distance, (2.0, 2.0, 2.0), 10.0, 100.0)
    assert drawn[(distance < -1.6) & (distance > -2.9)].min() == 100.0  # the layer, full to the rim's edge
    assert drawn[distance < -9.0].max() == 40.0  # the generator's values below it
    assert drawn[distance > 2.0].max() == 10.0  # air
    rim = np.abs(distance) < 1.0
    assert 10.0 < drawn[rim].mean() < 100.0


@pytest.mark.skipif(
    not (SHARED_DATA / "ict-facekit" / "ict_face_model_light.npz").is_file(),
    reason=f"the ICT face model arrays are not at {SHARED_DATA / 'ict-facekit'}",
)
def test_the_build_script_reproduces_the_shipped_surface(tmp_path, prior):
    """The shipped file is what scripts/build_face_prior.py makes from shared/data/ict-facekit (the arrays that
    do not depend on the brain extractor: surface, modes, weights, landmarks)."""
    import sys

    root = Path(__file__).resolve().parents[3]
    sys.path.insert(0, str(root / "scripts"))
    try:
        import build_face_prior
    finally:
        sys.path.pop(0)
    triangles, loops = build_face_prior.closed_skin(
        np.load(SHARED_DATA / "ict-facekit" / "ict_face_model_light.npz")["faces"]
    )
    assert len(loops) == 4  # two eye openings, the mouth slit, the neck cut
    assert len(triangles) + sum(len(loop) for loop in loops) == len(prior.triangles)


def test_closest_points_on_triangles_in_every_voronoi_region():
    """The closest point on a triangle, checked against a dense barycentric sampling of it: points spread so that
    the face, all three edges and all three corners are each the answer for some of them."""
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(0.0, 10.0, (400, 3)) for _ in range(3))
    points = (a + b + c) / 3.0 + rng.normal(0.0, 15.0, (400, 3))
    closest = _closest_on_triangles(points, a, b, c)
    u, v = np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201), indexing="ij")
    keep = u + v <= 1.0
    u, v = u[keep], v[keep]
    regions = set()
    for n in range(len(points)):
        lattice = a[n] + u[:, None] * (b[n] - a[n]) + v[:, None] * (c[n] - a[n])
        brute = np.linalg.norm(lattice - points[n], axis=1)
        found = np.linalg.norm(closest[n] - points[n])
        # Never farther than the best lattice point, never nearer than the triangle allows (lattice step ~0.2 mm).
        assert found <= brute.min() + 1e-9
        assert found >= brute.min() - 0.2
        best = np.argmin(brute)
        regions.add((u[best] == 0) + 2 * (v[best] == 0) + 4 * (u[best] + v[best] >= 1.0 - 1e-9))
    assert len(regions) == 7, regions


def test_collapsed_triangles_leave_no_gap_in_the_distance():
    """A mesh with collapsed triangles (two corners on one point: the closest-point formula divides by zero for
    some points) still gives finite distances everywhere."""
    vertices, triangles = _icosphere(30.0, np.zeros(3))
    vertices = vertices.copy()
    for triangle in triangles[::50]:
        vertices[triangle[2]] = vertices[triangle[1]]
    grid = sitk.Image([40, 40, 40], sitk.sitkUInt8)
    grid.SetOrigin((-39.0, -39.0, -39.0))
    grid.SetSpacing((2.0, 2.0, 2.0))
    distance = signed_distance(vertices, triangles, grid, spacing_mm=1.5, clip_mm=5.0)
    assert np.isfinite(distance).all()
    assert distance[20, 20, 20] == -5.0 and distance[0, 0, 0] == 5.0
