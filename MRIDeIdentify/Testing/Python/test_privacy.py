"""The privacy transform gamma(x) and probabilistic binary pooling (privacy.py), on the shared heads.

Heads reach the transform as the ``remodel`` method gives them: read, head threshold and mask, model grid.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_files, params
from scipy import ndimage
from scipy.spatial import ConvexHull

from MRIDeIdentifyLib.headmask import head_mask, head_threshold
from MRIDeIdentifyLib.modelgrid import ModelGrid
from MRIDeIdentifyLib.privacy import (
    DEFAULT_ROTATIONS,
    convex_hull_mask,
    privacy_transform,
    probabilistic_binary_pool,
    random_rotations,
    surface_probability,
)
from MRIDeIdentifyLib.reader import read_volume

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The transforms here are small: one thread is as fast, and the suite shares two cores with other runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _on_grid(path: Path, size: int):
    image = read_volume(path).image
    threshold = head_threshold(image)
    head = head_mask(image, threshold)
    grid = ModelGrid.around(image, head, size=size)
    volume = torch.from_numpy(grid.to_model(image))
    head_cube = torch.from_numpy(grid.mask_to_model(head, image))
    # A stand-in brain mask (the transform only copies it): the head eroded well inside the skull.
    brain = torch.from_numpy(ndimage.binary_erosion(head_cube.numpy(), iterations=size // 8))
    return volume, head_cube, brain, float(grid.intensity.normalise(threshold))


def _is_lattice_convex(mask: np.ndarray) -> bool:
    """A voxel set is convex up to discretisation iff it holds every voxel centre of its own convex hull.

    Checked with Qhull's planes, independently of privacy.py's carving: every voxel of the bounding box that
    is not in the set must lie outside some hull plane (voxels outside the box are outside the hull).
    """
    points = np.argwhere(mask & ~ndimage.binary_erosion(mask))  # the boundary has the set's hull
    planes = torch.from_numpy(np.unique(np.round(ConvexHull(points.astype(np.float64)).equations, 9), axis=0))
    low, high = points.min(0), points.max(0) + 1
    box = mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    others = torch.from_numpy((np.argwhere(~box) + low).astype(np.float64))
    separated = torch.zeros(len(others), dtype=torch.bool)
    for chunk in planes.split(256):
        separated |= (others @ chunk[:, :3].T + chunk[:, 3] > 1e-6).any(1)
    return bool(separated.all())


@pytest.mark.parametrize("path", params(head_files()))
def test_hull_contains_the_head_and_is_convex(path):
    volume, head, brain, threshold = _on_grid(path, 64)
    gamma = privacy_transform(volume, brain, threshold, seed=0)
    hull = gamma[0].bool()
    contained = float((hull & head).sum() / head.sum())
    assert contained >= 0.99, f"c(x) holds only {contained:.2%} of the head"
    # A hull, not the whole cube: the model grid's margin around the head is carved away.
    assert hull.sum() < 1.8 * head.sum()
    assert not hull[0, 0, 0] and not hull[-1, -1, -1]
    assert _is_lattice_convex(hull.numpy())


def test_hull_at_128_contains_the_head_and_is_convex(head_path):
    volume, head, brain, threshold = _on_grid(head_path, 128)
    hull = privacy_transform(volume, brain, threshold, seed=3)[0].bool()
    assert float((hull & head).sum() / head.sum()) >= 0.99
    assert hull.sum() < 1.8 * head.sum()
    assert _is_lattice_convex(hull.numpy())


def test_gamma_channels_are_hull_brain_and_brain_intensities(head_path):
    volume, head, brain, threshold = _on_grid(head_path, 64)
    volume, brain = volume.to(CPU), brain.to(CPU)
    volume_before = volume.clone()
    gamma = privacy_transform(volume, brain, threshold, seed=0)
    assert gamma.shape == (3, 64, 64, 64) and gamma.dtype == torch.float32 and gamma.device == CPU
    assert set(torch.unique(gamma[0]).tolist()) == {0.0, 1.0}
    assert torch.equal(gamma[1], brain.float())
    assert torch.equal(gamma[2][brain], volume[brain])
    assert not gamma[2][~brain].any()
    assert torch.equal(volume, volume_before)


def test_equal_seeds_give_equal_transforms_and_different_seeds_differ(head_path):
    volume, head, brain, threshold = _on_grid(head_path, 64)
    first = privacy_transform(volume, brain, threshold, seed=7)
    assert torch.equal(first, privacy_transform(volume, brain, threshold, seed=7))
    other = privacy_transform(volume, brain, threshold, seed=8)
    assert not torch.equal(first[0], other[0])
    # The brain channels carry no randomness.
    assert torch.equal(first[1:], other[1:])


def test_surface_probability_lies_on_the_surface(head_path):
    volume, head, brain, threshold = _on_grid(head_path, 64)
    binary = volume >= threshold
    z = surface_probability(binary, DEFAULT_ROTATIONS, torch.Generator().manual_seed(0))
    assert z.shape == binary.shape and z.dtype == torch.float32
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    # First hits are head voxels next to the air: a ray's step before the hit reads a voxel outside the head,
    # and rounding the two rotated positions to voxels puts them at most 2 voxels apart along each axis.
    assert not z[~binary].any()
    core = torch.from_numpy(ndimage.binary_erosion(binary.numpy(), np.ones((3, 3, 3)), iterations=2))
    assert not z[core].any()
    # ... and most of the outer surface is seen from some direction.
    shell = binary & ~torch.from_numpy(ndimage.binary_erosion(binary.numpy()))
    assert float((z[shell] > 0).float().mean()) > 0.5


def test_ball_hull_is_the_ball():
    """On a digital ball (lattice-convex), the hull of the sampled surface with every facet is the ball, up to
    the few extreme voxels the sampling may miss; 100 facets cut less, around the same samples."""
    grid = torch.arange(48, dtype=torch.float32) - 23.5
    radius = (grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2).sqrt()
    ball = radius <= 18
    z = surface_probability(ball, 16, torch.Generator().manual_seed(0))
    # The same seed draws the same surface points; the facet choice comes after.
    hull = convex_hull_mask(z, facets=100000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(hull & ball, hull)
    assert float(hull.sum() / ball.sum()) >= 0.99
    loose = convex_hull_mask(z, facets=100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loose & hull, hull) and not torch.equal(loose, hull)
    assert float(loose.sum() / ball.sum()) < 1.2


def test_convexity_check_rejects_a_head(head_path):
    # Guards the convexity tests above: the head itself, with its face and ears, is not convex.
    head = _on_grid(head_path, 64)[1].numpy()
    assert not _is_lattice_convex(head)


def test_random_rotations_are_uniform_rotations():
    rotations = random_rotations(20000, torch.Generator().manual_seed(0)).double()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), eye.expand(20000, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(20000, dtype=torch.float64), atol=1e-5)
    # Haar measure on SO(3): every entry has mean 0 and variance 1/3, so the mean of n draws has standard
    # deviation sqrt(1 / (3 n)); allow 5 sigma.
    assert float(rotations.mean(0).abs().max()) < 5 * (1 / (3 * 20000)) ** 0.5
    assert torch.equal(
        random_rotations(4, torch.Generator().manual_seed(1)), random_rotations(4, torch.Generator().manual_seed(1))
    )
    assert not torch.equal(
        random_rotations(4, torch.Generator().manual_seed(1)), random_rotations(4, torch.Generator().manual_seed(2))
    )


def _binary_test_volume() -> torch.Tensor:
    """(2, 3, 16, 16, 16) {0, 1}: random blocks of every density, plus an all-ones and an all-zeros corner."""
    generator = torch.Generator().manual_seed(0)
    density = torch.rand(2, 3, 8, 8, 8, generator=generator).repeat_interleave(2, -1)
    density = density.repeat_interleave(2, -2).repeat_interleave(2, -3)
    binary = torch.rand(density.shape, generator=generator) < density
    binary[..., :4, :4, :4] = True
    binary[..., -4:, -4:, -4:] = False
    return binary


def test_probabilistic_pooling_keeps_the_proportion_of_ones():
    binary = _binary_test_volume()
    mean = torch.nn.functional.avg_pool3d(binary.float().reshape(-1, 1, 16, 16, 16), 2).reshape(2, 3, 8, 8, 8)
    draws = 400
    generator = torch.Generator().manual_seed(1)
    pooled = torch.stack([probabilistic_binary_pool(binary, 2, generator) for _ in range(draws)])
    assert pooled.shape == (draws, 2, 3, 8, 8, 8) and pooled.dtype == torch.bool
    # Each pooled voxel is Bernoulli(mean of its block): the total count of ones over all draws has expectation
    # draws * sum(p) and variance draws * sum(p (1 - p)); allow 5 sigma.
    expected = draws * float(mean.sum())
    sigma = (draws * float((mean * (1 - mean)).sum())) ** 0.5
    assert abs(float(pooled.sum()) - expected) < 5 * sigma
    # The proportion of ones is kept: output ones / output voxels ~ input ones / input voxels.
    assert abs(float(pooled.float().mean()) - float(binary.float().mean())) < 5 * sigma / pooled.numel()
    # Voxel by voxel too (each frequency within 5 sigma of its block mean), and full / empty blocks are certain.
    frequency = pooled.float().mean(0)
    voxel_sigma = (mean * (1 - mean) / draws).sqrt()
    assert bool(((frequency - mean).abs() <= 5 * voxel_sigma + 1e-6).all())
    assert bool(pooled[:, ..., :2, :2, :2].all()) and not pooled[:, ..., -2:, -2:, -2:].any()


def test_probabilistic_pooling_is_binary_seeded_and_checks_its_input():
    binary = _binary_test_volume().float()
    pooled = probabilistic_binary_pool(binary, 4, torch.Generator().manual_seed(5))
    assert pooled.shape == (2, 3, 4, 4, 4) and pooled.dtype == torch.float32
    assert set(torch.unique(pooled).tolist()) <= {0.0, 1.0}
    assert torch.equal(pooled, probabilistic_binary_pool(binary, 4, torch.Generator().manual_seed(5)))
    assert not torch.equal(
        probabilistic_binary_pool(binary, 2, torch.Generator().manual_seed(5)),
        probabilistic_binary_pool(binary, 2, torch.Generator().manual_seed(6)),
    )
    with pytest.raises(ValueError):
        probabilistic_binary_pool(binary[..., :15], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_transform_runs_on_cuda_like_on_the_cpu(head_path):
    volume, head, brain, threshold = _on_grid(head_path, 64)
    cuda = torch.device("cuda")
    on_gpu = privacy_transform(volume.to(cuda), brain.to(cuda), threshold, seed=0)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu, privacy_transform(volume.to(cuda), brain.to(cuda), threshold, seed=0))
    on_cpu = privacy_transform(volume, brain, threshold, seed=0)
    assert torch.equal(on_gpu[1:].cpu(), on_cpu[1:])
    # The draws are the CPU generator's on both devices; only rounding ties of the rotation may differ.
    overlap = float((on_gpu[0].cpu().bool() & on_cpu[0].bool()).sum() / on_cpu[0].bool().sum())
    assert overlap > 0.98
    pooled = probabilistic_binary_pool(head.to(cuda), 2, torch.Generator().manual_seed(0))
    assert pooled.device.type == "cuda" and pooled.dtype == torch.bool
