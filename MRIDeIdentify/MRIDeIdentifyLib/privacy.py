"""The privacy transform gamma(x) (paper 3.1) and probabilistic binary pooling (paper 3.2).

gamma(x) = [c(x), b(x), b(x)*x] on the model grid: c(x) a convex volume enclosing the head, carved out of a
volume of ones by randomly chosen facets of the convex hull of sampled surface points, b(x) the brain mask,
b(x)*x the brain intensities. It keeps the brain and the rough size and pose of the head, and nothing of the
face. Everything runs in torch on the device of the input tensors, except the hull itself (Qhull, CPU), which
only sees the sampled surface points (~20k at 128^3).

Arrays are KJI volumes of the model grid (axis 0 = k, axis 2 = i); coordinates are voxel indices. Randomness
comes from an explicit ``torch.Generator``: random numbers are drawn on the generator's device and then moved
to the data's device, so a CPU generator gives the same draws whether the volumes live on the CPU or a GPU.
``generator=None`` uses torch's global generator.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import ConvexHull, QhullError

from .settings import DEFAULT_FACETS, DEFAULT_ROTATIONS

# Voxel centres lying exactly on a hull plane belong to the hull; this absorbs float64 rounding only.
_PLANE_TOLERANCE = 1e-6


def random_rotations(k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` rotation matrices (k, 3, 3) float32 drawn uniformly from SO(3), on the generator's device.

    A normalised 4-D standard normal vector is a uniform unit quaternion, and q and -q give the same
    rotation, so the matrices are uniform (Haar) on SO(3).
    """
    q = torch.randn(k, 4, generator=generator, device=_generator_device(generator), dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).unbind(1)
    rotation = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=1,
    )
    return rotation.reshape(k, 3, 3).to(torch.float32)


def surface_probability(
    binary: torch.Tensor, rotations: int = DEFAULT_ROTATIONS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Surface probability Z in [0, 1] (float32, same shape and device as ``binary``), paper eqs. 1-5.

    ``binary`` is the bool KJI head mask 1[x >= delta]. For each of ``rotations`` uniform random rotations the
    mask is rotated (nearest neighbour), rays are cast along +-k, +-j, +-i of the rotated frame and the first
    voxel each ray meets is marked; the six first-hit maps are averaged (Lambda), rotated back and averaged
    over the rotations. Voxels on the outside of the head that many directions see get high values; the
    inside of the head and the air get 0.
    """
    if binary.dim() != 3:
        raise ValueError(f"binary must be a 3-D volume, got shape {tuple(binary.shape)}")
    device = binary.device
    shape = torch.tensor(binary.shape, device=device)
    numel = binary.numel()
    volume = binary[None, None].to(torch.float32)
    # The voxels first hit along the grid's own axes include every extreme point of the head (beyond an
    # extreme point in direction u, the ray along any axis with u_a != 0 meets no more head), so they give
    # the exact extent of the head under any rotation, at the cost of O(S^2) points.
    outer = torch.cat([_hit_voxels(hits, depth, axis) for hits, depth, axis in _first_hits(volume[0, 0])])
    if outer.shape[0] == 0:
        return torch.zeros(binary.shape, dtype=torch.float32, device=device)
    outer = outer.to(torch.float32)
    centre = (outer.amin(0) + outer.amax(0)) / 2
    # grid_sample's own unnormalisation (align_corners=True) of (x, y, z) = (i, j, k) coordinates.
    half_extent = (shape.flip(0) - 1).to(torch.float32) / 2
    count = torch.zeros(numel + 1, dtype=torch.int32, device=device)
    for rotation in random_rotations(rotations, generator).to(device):
        # The rotated frame is the box around the rotated head plus 2 voxels, so no rotation clips the head
        # (a clipped head would lose its true surface and the hull would cut into it), and no more: the
        # frame's size sets the cost. Frame point u shows the model-grid point u @ R + centre.
        turned = (outer - centre) @ rotation.T
        low, high = (turned.amin(0).floor() - 2).tolist(), (turned.amax(0).ceil() + 2).tolist()
        axes = [torch.arange(a, b + 1, device=device, dtype=torch.float32) for a, b in zip(low, high)]
        grid = _affine_grid(axes, rotation.T, centre, shape)[0]
        rotated = F.grid_sample(volume, grid[None], mode="nearest", align_corners=True)[0, 0]
        for hits, depth, axis in _first_hits(rotated):
            # Rotating Lambda back maps each hit to the model-grid voxel the nearest-neighbour rotation read
            # it from: exact, and it touches only the hits (O(S^2) per rotation) instead of a whole volume.
            # The voxel is found as grid_sample found it (same arithmetic, round half to even), so it is a
            # voxel of the head.
            source = ((grid[_ray_index(depth, axis)] + 1) * half_extent).round_().flip(-1)
            source = torch.minimum(source.clamp_(min=0).to(torch.int64), shape - 1)
            index = (source[..., 0] * shape[1] + source[..., 1]) * shape[2] + source[..., 2]
            # Rays that meet nothing count in one extra bin, dropped below: no data-dependent indexing.
            index = torch.where(hits, index, numel).flatten()
            # Integer sums: Z does not depend on the order of the scatter (on a GPU either).
            count.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))
    # Two rays of one direction can meet the same source voxel (nearest neighbour duplicates voxels when it
    # rotates), so a count can exceed 6 per rotation: rare, and clamped to keep Z a probability.
    return (count[:numel].reshape(binary.shape).to(torch.float32) / (6 * rotations)).clamp_(max=1.0)


def _affine_grid(
    axes: list[torch.Tensor], matrix: torch.Tensor, centre: torch.Tensor, shape: torch.Tensor
) -> torch.Tensor:
    """grid_sample grid (1, n0, n1, n2, 3) reading the input at ``u @ matrix.T + centre`` for u in the
    product of ``axes`` (KJI voxel coordinates; ``shape`` the input's). The grid is affine, so it is the
    broadcast sum of one term per output axis with the normalisation folded in: cheaper than F.affine_grid or
    a matrix product per voxel."""
    # grid_sample wants (x, y, z) = (i, j, k) normalised to [-1, 1] over the input's voxel centres.
    scale = 2 / (shape.to(torch.float32) - 1)
    terms = [(axes[a][:, None] * matrix[:, a] * scale).flip(-1) for a in range(3)]
    offset = (centre * scale - 1).flip(-1)
    grid = (terms[0][:, None, None] + (terms[1][None, :, None] + offset)) + terms[2][None, None, :]
    return grid[None]


def _first_hits(mask: torch.Tensor):
    """The first-hit maps of Lambda (eqs. 2-4) along the three axes of a {0, 1} float volume, both directions.

    Eq. 2 reconstructed (the extraction is garbled): zeta_{a,d}(k) = k_a for d = +1 and S - 1 - k_a for
    d = -1, the distance a ray entering along axis a from side d has travelled; eq. 3 marks a voxel when it is
    1 and has the smallest zeta among the 1-voxels of its ray, i.e. the first 1 the ray meets. ``max`` along
    an axis returns the first maximum, so one reduction finds that voxel on every ray, and one on the volume
    reversed along all axes finds the first voxel from the other side.

    Yields, per axis a: hits (2, m, n) bool, the ray meets the head; depth (2, m, n), the hit's index along a
    for d = +1 and d = -1; a. The maps are indexed by the two other axes in order.
    """
    reversed_ = mask.flip((0, 1, 2))
    for axis in range(3):
        hit, first = mask.max(axis)
        # Reversal flipped the two remaining axes of the map too: flip them back.
        last = mask.shape[axis] - 1 - reversed_.max(axis)[1].flip((0, 1))
        yield (hit > 0.5).expand(2, *hit.shape), torch.stack([first, last]), axis


def _ray_index(depth: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
    """Index of the voxels at ``depth`` (2, m, n) along ``axis``, one per ray of a first-hit map."""
    across = [torch.arange(n, device=depth.device) for n in depth.shape[1:]]
    index = [across[0][:, None], across[1][None, :]]
    index.insert(axis, depth)
    return tuple(index)


def _hit_voxels(hits: torch.Tensor, depth: torch.Tensor, axis: int) -> torch.Tensor:
    """(n, 3) KJI voxel coordinates of the first hits of one axis (both directions)."""
    index = torch.stack(torch.broadcast_tensors(*_ray_index(depth, axis)), -1)
    return index[hits]


def convex_hull_mask(
    z: torch.Tensor, facets: int = DEFAULT_FACETS, generator: torch.Generator | None = None
) -> torch.Tensor:
    """c(x): bool KJI volume (same shape and device as ``z``), ones carved by ``facets`` random hull planes.

    Surface points are drawn voxel-wise from Bernoulli(min(2 Z, 1)), their convex hull is computed with Qhull,
    and starting from a volume of ones, each of ``facets`` randomly chosen hull planes sets its outward
    half-space to 0. The result is convex (an intersection of half-spaces and the grid) and contains the hull
    of the sampled points, hence the head up to the extreme points the sampling missed.
    """
    if z.dim() != 3:
        raise ValueError(f"z must be a 3-D volume, got shape {tuple(z.shape)}")
    device = z.device
    if not bool((z > 0).any()):
        # No surface (an empty head): there is no hull to carve with, so nothing is carved.
        return torch.ones(z.shape, dtype=torch.bool, device=device)
    # Paper: sample from Bernoulli(Z). A point on the convex outside of the head, where the hull's vertices
    # lie, is the first hit for one of the two directions of each axis, so Z ~ 0.5 there (Z's 99th percentile
    # is 0.5 on the shared heads, its median 0.2). Sampling with 2Z makes those points certain and keeps the
    # rest random: the hull of the sample then holds >= 99.5 % of every shared head at 64^3, against 98.9 %
    # with Z itself (exact hulls, before carving), and Qhull still takes < 0.1 s on the ~20k points at 128^3.
    keep = _uniform(z.shape, generator, device) < 2 * z
    points = keep.nonzero().cpu().numpy().astype(np.float64)
    planes = _hull_planes(points)
    if planes.shape[0] > facets:
        chosen = torch.randperm(planes.shape[0], generator=generator, device=_generator_device(generator))
        planes = planes[chosen[:facets].cpu().numpy()]
    return _carve(torch.as_tensor(planes, device=device), z.shape)


def _hull_planes(points: np.ndarray) -> np.ndarray:
    """Distinct outward planes (n, offset) of the points' convex hull, n . p + offset <= 0 inside.

    Qhull triangulates coplanar facets (many on a voxel lattice), so several triangles share a plane; picking
    among distinct planes rather than triangles keeps every chosen facet a real cut. Flat or too few points
    (a degenerate hull) are joggled by Qhull's QJ option.
    """
    if points.shape[0] < 4:
        raise ValueError(f"{points.shape[0]} surface points cannot span a convex hull")
    try:
        hull = ConvexHull(points)
    except QhullError:
        hull = ConvexHull(points, qhull_options="QJ")
    return np.unique(np.round(hull.equations, 9), axis=0)


def _carve(planes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool volume of the voxels inside every plane (float64 (F, 4) rows n_k, n_j, n_i, offset).

    The inside of a convex set along each i-row is one interval, so the planes are solved for the row's
    bounds on (K, J) maps and the volume is filled by one comparison per voxel, instead of evaluating F planes
    at every voxel. Planes go 16 at a time to bound the (16, K, J) temporaries.
    """
    device = planes.device
    k = torch.arange(shape[0], device=device, dtype=torch.float64)[None, :, None]
    j = torch.arange(shape[1], device=device, dtype=torch.float64)[None, None, :]
    upper = torch.full(shape[:2], math.inf, dtype=torch.float64, device=device)
    lower = torch.full(shape[:2], -math.inf, dtype=torch.float64, device=device)
    for chunk in planes.split(16):
        normal_k, normal_j, normal_i, offset = (chunk[:, c, None, None] for c in range(4))
        # Each plane reads normal_i * i <= slack on the row (k, j).
        slack = _PLANE_TOLERANCE - (normal_k * k + normal_j * j + offset)
        rising, falling = normal_i >= 1e-9, normal_i <= -1e-9
        bound = slack / torch.where(rising | falling, normal_i, torch.ones_like(normal_i))
        upper = torch.minimum(upper, torch.where(rising, bound.floor(), math.inf).amin(0))
        lower = torch.maximum(lower, torch.where(falling, bound.ceil(), -math.inf).amax(0))
        # A plane parallel to the rows either keeps or removes a whole row.
        parallel_outside = (~(rising | falling) & (slack < 0)).any(0)
        upper = torch.where(parallel_outside, -math.inf, upper)
    i = torch.arange(shape[2], device=device, dtype=torch.float64)
    return (i >= lower[..., None]) & (i <= upper[..., None])


def privacy_transform(
    volume: torch.Tensor,
    brain: torch.Tensor,
    threshold: float,
    *,
    rotations: int = DEFAULT_ROTATIONS,
    facets: int = DEFAULT_FACETS,
    seed: int = 0,
) -> torch.Tensor:
    """gamma(x): float32 (3, S, S, S) = [c(x), b(x), b(x) * x] on the device of ``volume``.

    ``volume``: float KJI intensities on the model grid (normalised units); ``brain``: bool KJI brain mask on
    the same grid; ``threshold``: the head level delta in ``volume``'s units. The inputs are not modified;
    the result is a new tensor. Equal seeds give identical results on a given device.

    As in the paper, the head is 1[x >= delta] with no clean-up: delta must lie above the background noise
    (headmask.head_threshold). Stray voxels above it can only enlarge c(x), never cut into the head.
    """
    if volume.dim() != 3 or volume.shape != brain.shape:
        raise ValueError(
            f"volume and brain must be 3-D volumes of one shape, got {tuple(volume.shape)} and {tuple(brain.shape)}"
        )
    generator = torch.Generator().manual_seed(seed)
    brain = brain.to(device=volume.device, dtype=torch.bool)
    z = surface_probability(volume >= threshold, rotations, generator)
    hull = convex_hull_mask(z, facets, generator)
    values = volume.to(torch.float32)
    return torch.stack([hull.to(torch.float32), brain.to(torch.float32), torch.where(brain, values, 0.0)])


def probabilistic_binary_pool(
    binary: torch.Tensor, factor: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Downsample a {0, 1} tensor (..., D, H, W) by ``factor`` and keep it binary (paper 3.2).

    Each output voxel is 1 with probability the mean of its ``factor``^3 input block (average pooling read as
    a Bernoulli parameter), so the proportion of ones is kept in expectation and a block of all ones (zeros)
    stays 1 (0). Leading dimensions are batch/channel dimensions; the result has the input's dtype.
    """
    if binary.dim() < 3:
        raise ValueError(f"binary needs three spatial dimensions, got shape {tuple(binary.shape)}")
    spatial = binary.shape[-3:]
    if any(n % factor for n in spatial):
        raise ValueError(f"spatial shape {tuple(spatial)} is not divisible by the pooling factor {factor}")
    flat = binary.reshape(-1, 1, *spatial).to(torch.float32)
    mean = F.avg_pool3d(flat, factor)
    pooled = _uniform(mean.shape, generator, binary.device) < mean
    return pooled.reshape(*binary.shape[:-3], *mean.shape[2:]).to(binary.dtype)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=generator, device=_generator_device(generator)).to(device)
