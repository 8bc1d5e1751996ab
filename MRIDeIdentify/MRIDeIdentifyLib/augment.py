"""Training augmentation on the model grid: a few heads made to look like many scanners, poses and people.

Volumes are KJI cubes (S, S, S) of the model grid (axis 2 = right->left) in normalised intensity units, where the
background is 0 and the brain's 99th percentile 1. gamma is not augmented: the trainer recomputes it on the
augmented head, as inference computes it on each input. The face-prior skin fitted to the head moves with it.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

# Moderate on purpose: the model grid already centres and orients every head, so the model only needs to
# tolerate the residual pose and shape differences between people and scanners.
MAX_ROTATION_DEG = 12.0
MAX_SCALE = 0.10  # per axis, so heads get longer, wider and rounder
MAX_SHEAR = 0.05
MAX_SHIFT = 0.05  # fraction of the half field of view
BIAS_STRENGTH = 0.25  # log-amplitude of the smooth multiplicative bias field
MAX_LOG_GAMMA = 0.3
MAX_NOISE = 0.03
THICK_SLICE_PROBABILITY = 0.3
MAX_THICK_FACTOR = 3.0


def augment(
    volume: torch.Tensor, brain: torch.Tensor, skin: torch.Tensor, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A randomly transformed copy of a head: (volume float32 (S, S, S), brain bool (S, S, S), skin float32
    (S, S, S), the face-prior skin's signed distance in mm); inputs untouched.

    Spatial: left-right flip, rotation, per-axis scaling, shear and shift (one affine map applied to the volume
    and the skin distance, trilinear, and to the brain mask, trilinear then >= 0.5). Intensity: thick slices
    along a random axis, a smooth bias field, a gamma curve, Gaussian noise. All draws come from ``generator``.
    """

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    size = volume.shape[-1]
    stack = torch.stack([volume.float(), brain.float()])[None]
    distance = skin.float()[None, None]
    if uniform(0, 1) < 0.5:
        stack = stack.flip(-1)
        distance = distance.flip(-1)
    angles = [math.radians(uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)) for _ in range(3)]
    matrix = _rotation(*angles)
    matrix = matrix @ torch.diag(torch.tensor([1.0 + uniform(-MAX_SCALE, MAX_SCALE) for _ in range(3)]))
    shear = torch.eye(3)
    for row, col in ((0, 1), (0, 2), (1, 2)):
        shear[row, col] = uniform(-MAX_SHEAR, MAX_SHEAR)
    matrix = matrix @ shear
    shift = torch.tensor([uniform(-MAX_SHIFT, MAX_SHIFT) for _ in range(3)])
    theta = torch.cat([matrix, shift[:, None]], 1)[None]
    grid = F.affine_grid(theta, list(stack.shape), align_corners=False)
    # Zero padding is the background level of normalised volumes.
    stack = F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # The distance beyond the cube's edge is the edge's (far outside the head, clipped), not 0 (on the skin).
    distance = F.grid_sample(distance, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x, b = stack[:, :1], stack[0, 1] >= 0.5

    if uniform(0, 1) < THICK_SLICE_PROBABILITY:
        axis = int(torch.randint(3, (1,), generator=generator))
        thin = [size] * 3
        thin[axis] = max(2, int(round(size / uniform(1.5, MAX_THICK_FACTOR))))
        x = F.interpolate(
            F.interpolate(x, size=thin, mode="area"), size=[size] * 3, mode="trilinear", align_corners=False
        )
    coarse = torch.randn((1, 1, 4, 4, 4), generator=generator) * BIAS_STRENGTH
    x = x * torch.exp(F.interpolate(coarse, size=[size] * 3, mode="trilinear", align_corners=True))
    power = math.exp(uniform(-MAX_LOG_GAMMA, MAX_LOG_GAMMA))
    x = torch.where(x > 0, x.clamp(min=0) ** power, x)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, MAX_NOISE)
    return x[0, 0].contiguous(), b.contiguous(), distance[0, 0].contiguous()


def _rotation(a: float, b: float, c: float) -> torch.Tensor:
    """Rotation by angles (radians) about the three axes, composed."""
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    rx = torch.tensor([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = torch.tensor([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = torch.tensor([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()
