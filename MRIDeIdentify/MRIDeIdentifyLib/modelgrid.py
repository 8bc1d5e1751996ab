"""The model grid: an isotropic cube in canonical orientation around the head, and the way back.

The generator always sees heads at the same physical scale and orientation, whatever the scanner wrote:
the cube has identity direction (voxel axes along L, P, S in SimpleITK's LPS space), so its KJI array has
axis 0 = inferior->superior, axis 1 = anterior->posterior, axis 2 = right->left. Both directions of the
mapping are resamplings in physical space with an identity transform, so going to the cube and back onto
the input grid involves no registration and no approximation of geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from .reader import image_like

DEFAULT_SIZE = 128
# 256 mm holds an adult head from crown to chin; a larger head widens the field instead of being cropped.
DEFAULT_FOV_MM = 256.0


@dataclass(frozen=True)
class IntensityScale:
    """Linear map between the input's intensity units and the model's: ``normalised = (x - offset) / scale``."""

    offset: float
    scale: float

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.offset) / self.scale).astype(np.float32)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float32) * self.scale + self.offset).astype(np.float32)

    @classmethod
    def fit(cls, array: np.ndarray, head: np.ndarray, brain: np.ndarray | None = None) -> "IntensityScale":
        """Background level -> 0 and the brain's 99th percentile (the head's, without a brain mask) -> 1.

        The brain sets the scale because its contrast is the most consistent part of a T1 across scanners;
        fat and vessels outside it vary too much to anchor on.
        """
        background = array[~head]
        offset = float(np.median(background)) if background.size else float(array.min())
        region = brain if brain is not None and brain.any() else head
        values = array[region] if region.any() else array.ravel()
        top = float(np.percentile(values, 99.0))
        scale = top - offset
        if not np.isfinite(scale) or scale <= 0:
            scale = float(np.ptp(array)) or 1.0
        return cls(offset, scale)


@dataclass(frozen=True)
class ModelGrid:
    """A ``size``³ cube of isotropic ``spacing`` mm voxels, identity direction, centred on the head.

    ``origin`` is the LPS position (mm) of voxel (0, 0, 0)'s centre. ``intensity`` maps the input's units to
    the model's.
    """

    size: int
    spacing: float
    origin: Tuple[float, float, float]
    intensity: IntensityScale

    @classmethod
    def around(
        cls,
        image: sitk.Image,
        head: np.ndarray,
        brain: np.ndarray | None = None,
        size: int = DEFAULT_SIZE,
        fov_mm: float = DEFAULT_FOV_MM,
        array: np.ndarray | None = None,
    ) -> "ModelGrid":
        """The cube centred on the bounding box of ``head`` (bool KJI on ``image``'s grid).

        The field of view is ``fov_mm``, widened to the head's largest extent plus 5 % when the head is
        larger, so the whole head always fits. ``array`` may pass the image's voxels (KJI).
        """
        voxels = sitk.GetArrayViewFromImage(image) if array is None else array
        low, high = _physical_bounds(image, head)
        extent = float(np.max(high - low)) * 1.05
        fov = max(fov_mm, extent)
        spacing = fov / size
        centre = (low + high) / 2.0
        origin = centre - spacing * (size - 1) / 2.0
        scale = IntensityScale.fit(np.asarray(voxels, np.float32), head, brain)
        return cls(size, spacing, (float(origin[0]), float(origin[1]), float(origin[2])), scale)

    def reference(self) -> sitk.Image:
        """An empty image with the cube's geometry, for SimpleITK resampling."""
        ref = sitk.Image([self.size] * 3, sitk.sitkUInt8)
        ref.SetSpacing([self.spacing] * 3)
        ref.SetOrigin(self.origin)
        ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
        return ref

    def to_model(self, image: sitk.Image) -> np.ndarray:
        """``image`` resampled into the cube (linear, anti-aliased), normalised; float32 KJI (S, S, S).

        Outside the input's field of view the cube holds the background level (0 after normalisation).
        """
        return self.intensity.normalise(self.to_model_raw(image, default=self.intensity.offset))

    def mask_to_model(self, mask: np.ndarray, reference: sitk.Image) -> np.ndarray:
        """A bool KJI mask on ``reference``'s grid, resampled into the cube: bool (S, S, S).

        The mask is averaged, not picked by nearest neighbour, so thin structures survive a coarser cube; a cube
        voxel is inside when at least half of it is.
        """
        fraction = self.to_model_raw(image_like(mask.astype(np.float32), reference))
        return fraction >= 0.5

    def to_model_raw(self, image: sitk.Image, default: float = 0.0) -> np.ndarray:
        """Like :meth:`to_model` without intensity normalisation (for masks and probabilities)."""
        source = sitk.Cast(image, sitk.sitkFloat32)
        # Averaging bins of voxels first (each bin at most half a cube voxel) is anti-aliasing by itself and leaves
        # the Gaussian a grid 8-64x smaller: on a 1 mm head that is most of the cost of entering the cube.
        bins = [max(1, int(self.spacing / (2.0 * s))) for s in image.GetSpacing()]
        if max(bins) > 1:
            source = sitk.BinShrink(source, bins)
        for axis, (sigma, spacing, n) in enumerate(
            zip(_antialias_sigma(image.GetSpacing(), self.spacing), image.GetSpacing(), bins)
        ):
            # What the bin average (variance s^2 (n^2 - 1) / 12) left to remove.
            sigma = float(np.sqrt(max(sigma**2 - spacing**2 * (n**2 - 1) / 12.0, 0.0)))
            # Axis by axis: thick slices already coarser than the cube need no smoothing along them.
            if sigma > 0.2 * self.spacing:
                source = sitk.RecursiveGaussian(source, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
        resampled = sitk.Resample(
            source, self.reference(), sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32
        )
        return sitk.GetArrayFromImage(resampled)

    def to_native(
        self,
        array: np.ndarray,
        reference: sitk.Image,
        interpolator: int = sitk.sitkLinear,
        default: float = 0.0,
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        """A cube array (S, S, S) resampled back onto ``reference``'s grid: float32 KJI, same units as ``array``.

        Input voxels outside the cube get ``default``. ``within`` (bool KJI on ``reference``'s grid): only the
        box around it is resampled, the rest is ``default`` (a cubic B-spline over a whole 1 mm grid costs seconds).
        """
        cube = sitk.GetImageFromArray(np.asarray(array, np.float32))
        cube.CopyInformation(self.reference())
        start, stop = np.zeros(3, int), np.array(reference.GetSize()[::-1])
        if within is not None and within.any():
            ranges = [np.flatnonzero(within.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            start, stop = np.array([r[0] for r in ranges]), np.array([r[-1] + 1 for r in ranges])
        grid = sitk.Image([int(v) for v in (stop - start)[::-1]], sitk.sitkUInt8)
        grid.SetSpacing(reference.GetSpacing())
        grid.SetDirection(reference.GetDirection())
        grid.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in start[::-1]]))
        steps = [max(1, int(self.spacing / (2.0 * s))) for s in reference.GetSpacing()]
        if interpolator not in (sitk.sitkLinear, sitk.sitkNearestNeighbor) and max(steps) > 1:
            # A higher-order interpolator onto every voxel of a fine grid costs seconds. The cube holds nothing
            # finer than two of its voxels, so it goes onto a grid at least half a cube voxel apart with that
            # interpolator, then linearly onto the input's voxels.
            coarse = sitk.Image([-(-n // f) + 1 for n, f in zip(grid.GetSize(), steps)], sitk.sitkUInt8)
            coarse.SetSpacing([s * f for s, f in zip(reference.GetSpacing(), steps)])
            coarse.SetDirection(grid.GetDirection())
            coarse.SetOrigin(grid.GetOrigin())
            cube = sitk.Resample(cube, coarse, sitk.Transform(), interpolator, default, sitk.sitkFloat32)
            interpolator = sitk.sitkLinear
        back = sitk.GetArrayFromImage(
            sitk.Resample(cube, grid, sitk.Transform(), interpolator, default, sitk.sitkFloat32)
        )
        if within is None:
            return back
        full = np.full(reference.GetSize()[::-1], default, np.float32)
        full[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = back
        return full


def _antialias_sigma(input_spacing, cube_spacing: float):
    """Per-axis Gaussian sigma (mm) that removes what the coarser cube cannot represent (0: nothing to remove)."""
    return [0.5 * float(np.sqrt(max(cube_spacing**2 - s**2, 0.0))) for s in input_spacing]


def _physical_bounds(image: sitk.Image, mask: np.ndarray):
    """LPS bounding box (mm) of a KJI mask's voxel centres: the box of its index box's 8 corners."""
    if not mask.any():
        mask = np.ones(mask.shape, bool)
    ranges = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    k, j, i = ([r[0], r[-1]] for r in ranges)
    corners = np.array(
        [image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))) for x in i for y in j for z in k]
    )
    return corners.min(axis=0), corners.max(axis=0)
