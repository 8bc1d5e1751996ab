"""Pose a face-prior identity on a scan from gamma alone, and fit the prior to a training head's own face.

Placement (inference) sees only what the privacy transform keeps: the hull c(x) and the dilated brain b(x) on the
model grid, plus which cube voxels the input's field of view covers. The scan's own face never steers it.

1. Pose: a similarity transform (rotation, translation, one scale) registers the scan's gamma labels
   (hull 1, brain 2) to the prior's reference gamma (an average head's, in the prior frame; faceprior.py).
2. Face front: the face slides along its forward axis until its most prominent point touches the hull's front
   (the hull is a superset of the head, tight on the nose, brows and chin), using face vertices in the field
   of view only, so partial fields of view do not push it.
3. Cranium: the cranium and neck (face weight 0) are scaled about the brain's centre, per axis of the pose, onto
   the hull (a 2 mm inset), and blended into the face through the prior's face weight, so the face keeps the
   prior's shape while the back of the head follows the scan's size.

Fitting (training) poses the mean the same way, then alternates a similarity fit and a ridge-regularised
least-squares fit of the identity weights to the head's skin points (ICP), on the part in the field of view.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from .faceprior import FacePrior, similarity_fit
from .modelgrid import ModelGrid

# Starting pitches (degrees about L) for the registration, as registration.py does for whole heads.
_PITCH_STARTS_DEG = (0.0, -20.0, 20.0)
_CRANIUM_INSET_MM = 2.0
_FACE_TOUCH_MM = 1.0
_SCALE_RANGE = (0.75, 1.35)
_NOSE_TIP = 30  # index into the 68 Multi-PIE landmarks
_MIDLINE_MM = 35.0  # half-width of the face strip that touches the hull's front (inner eye corners ~ 16 mm)
# Ridge weight of the identity fit, in units of the weights' prior variance: the fit explains the points as far
# as 1-2 mm residuals allow and no further.
_RIDGE = 100.0


@dataclass(frozen=True)
class Pose:
    """prior frame -> scan LPS mm: ``x_scan = scale * rotation @ x_prior + translation``."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(points, np.float64) @ self.rotation.T + self.translation


def register_pose(gamma: np.ndarray, grid: ModelGrid, prior: FacePrior, fov: Optional[np.ndarray] = None) -> Pose:
    """The similarity that carries the prior frame onto the scan, from ``gamma`` (3, S, S, S) on ``grid``.
    ``fov`` (bool (S, S, S)): the cube voxels inside the input's field of view; only they are compared."""
    labels = sitk.GetImageFromArray((gamma[0] + gamma[1]).astype(np.float32))
    labels.CopyInformation(grid.reference())
    reference = sitk.GetImageFromArray(prior.reference.astype(np.float32))
    reference.SetOrigin(prior.reference_origin)
    reference.SetSpacing((prior.reference_spacing,) * 3)
    # Smoothed labels give the metric a slope a few voxels wide around every edge.
    fixed = sitk.SmoothingRecursiveGaussian(labels, 6.0)
    moving = sitk.SmoothingRecursiveGaussian(reference, 6.0)
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(labels > 1.5, sitk.sitkUInt8),
        sitk.Cast(reference > 1.5, sitk.sitkUInt8),
        sitk.Similarity3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    mask = None
    if fov is not None and fov.any():
        # Beyond a field of view that ends at the nose, the scan's gamma is empty where the reference has a chin
        # and neck: compared there, they pulled the face up by a centimetre or more.
        mask = sitk.GetImageFromArray(ndimage.binary_erosion(fov, iterations=2).astype(np.uint8))
        mask.CopyInformation(grid.reference())
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    # One thread per fit: ITK's per-thread partial sums make multi-threaded fits differ by micrometres between
    # runs. The starts run side by side instead (SimpleITK releases the GIL), each on the coarse level only; the
    # best is refined at full resolution.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        starts = []
        for pitch in _PITCH_STARTS_DEG:
            start = sitk.Similarity3DTransform(initial)
            start.SetRotation((1.0, 0.0, 0.0), float(np.deg2rad(pitch)))
            starts.append(start)
        with ThreadPoolExecutor(len(starts)) as pool:
            coarse = list(pool.map(lambda start: _register(fixed, moving, None, start, shrink=2, sigma_mm=4.0), starts))
        similarity = _register(fixed, moving, None, min(coarse, key=lambda fit: fit[1])[0], shrink=1, sigma_mm=0.0)[0]
        if mask is not None:
            similarity = _register(fixed, moving, mask, similarity, shrink=1, sigma_mm=0.0)[0]
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    # The registration maps scan points to prior points; the pose is its inverse.
    matrix = np.array(similarity.GetMatrix()).reshape(3, 3)
    scale = float(np.cbrt(np.linalg.det(matrix)))
    rotation = matrix / scale
    centre = np.array(similarity.GetCenter())
    translation = np.array(similarity.GetTranslation())
    # x_prior = M (x_scan - c) + c + t  ->  x_scan = M^-1 (x_prior - c - t) + c
    inverse = np.linalg.inv(matrix)
    return Pose(1.0 / scale, rotation.T, centre - inverse @ (centre + translation))


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    mask: Optional[sitk.Image],
    start: sitk.Similarity3DTransform,
    shrink: int,
    sigma_mm: float,
) -> Tuple[sitk.Similarity3DTransform, float]:
    """One mean-squares similarity fit of ``moving`` to ``fixed`` (compared inside ``mask`` only, if given) from
    ``start`` at one resolution level: (the fitted transform, fixed -> moving points; the final metric value)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([shrink])
    method.SetSmoothingSigmasPerLevel([sigma_mm])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=150, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(start, inPlace=False)
    fit = method.Execute(fixed, moving)
    if isinstance(fit, sitk.CompositeTransform):
        fit = fit.GetNthTransform(0)
    return sitk.Similarity3DTransform(fit.Downcast()), method.GetMetricValue()


class _Field:
    """A scalar field on the model grid (KJI array), sampled trilinearly at LPS points (mm)."""

    def __init__(self, array: np.ndarray, grid: ModelGrid, outside: float):
        self.array, self.grid, self.outside = array, grid, outside

    def __call__(self, points: np.ndarray) -> np.ndarray:
        index = (np.asarray(points) - np.asarray(self.grid.origin)) / self.grid.spacing  # x, y, z = i, j, k
        return ndimage.map_coordinates(self.array, index[:, ::-1].T, order=1, mode="constant", cval=self.outside)


def place(
    prior: FacePrior, vertices: np.ndarray, gamma: np.ndarray, grid: ModelGrid, fov: np.ndarray, pose: Pose
) -> np.ndarray:
    """Vertices (V, 3) in scan LPS mm: the prior-frame ``vertices`` posed by ``pose``, then their face front
    and cranium fitted to the hull (see the module's docstring). ``fov`` bool (S, S, S): the cube voxels inside
    the input's field of view."""
    hull = gamma[0] > 0.5
    hull_distance = _Field(_signed_distance(hull, grid.spacing), grid, 50.0)
    # Far enough inside the field of view that the cut planes of a partial one are not mistaken for a hull.
    inside = _Field(ndimage.binary_erosion(fov, iterations=2).astype(np.float32), grid, 0.0)
    brain = np.argwhere(gamma[1] > 0.5)
    centre = np.asarray(grid.origin) + grid.spacing * brain[:, ::-1].mean(0) if len(brain) else pose.translation

    posed = pose.apply(vertices)
    weight = prior.face_weight
    axes = pose.rotation
    # Only the face and the cranium above the nose tip: the hull is tight there, while below it the hull spans
    # the air under the chin and behind the neck down to where the field of view ends.
    upper = prior.mean[:, 2] > prior.mean[prior.landmarks[_NOSE_TIP], 2] - 5.0

    cranium = (weight < 0.1) & upper & (inside(posed) > 0.5)
    if cranium.sum() > 50:
        offsets = (posed[cranium] - centre) @ axes  # coordinates along the pose's L, P, S axes

        def residual(scales: np.ndarray) -> np.ndarray:
            return hull_distance(centre + (offsets * scales) @ axes.T) + _CRANIUM_INSET_MM

        scales = optimize.least_squares(residual, np.ones(3), bounds=_SCALE_RANGE, loss="soft_l1", f_scale=3.0).x
        # Width applies to the face too (a face wider than the head would stick out of the cheeks); length
        # and height only to the cranium, so the face keeps its proportions.
        per_vertex = np.ones((len(posed), 3))
        per_vertex[:, 0] = scales[0]
        per_vertex[:, 1:] += (1.0 - weight)[:, None] * (scales[1:] - 1.0)
        posed = centre + (((posed - centre) @ axes) * per_vertex) @ axes.T

    # The face slides along its forward axis until its midline (nose, brows, forehead) touches the hull's front,
    # the largest slide for which none of those vertices lies outside it (bisection: the distance grows with it).
    midline = (weight > 0.9) & upper & (np.abs(prior.mean[:, 0]) < _MIDLINE_MM) & (inside(posed) > 0.5)
    if midline.sum() > 50:
        forward = axes @ np.array([0.0, -1.0, 0.0])
        low, high = -40.0, 40.0
        for _ in range(30):
            middle = (low + high) / 2
            if hull_distance(posed[midline] + middle * forward).max() > -_FACE_TOUCH_MM:
                high = middle
            else:
                low = middle
        posed = posed + (weight * low)[:, None] * forward
    return posed


def fit_identity(
    prior: FacePrior, points: np.ndarray, gamma: np.ndarray, grid: ModelGrid, fov: np.ndarray, iterations: int = 20
) -> Tuple[np.ndarray, np.ndarray, float]:
    """(identity weights (K,), posed vertices (V, 3) LPS mm, median distance mm) of the prior fitted to a head's
    skin ``points`` (N, 3) LPS mm: the placement of the mean as a start, then ICP of a similarity and the
    identity weights, on face vertices in the field of view (trimmed at the 80th percentile of distances)."""
    tree = cKDTree(points)
    inside = _Field(ndimage.binary_erosion(fov, iterations=2).astype(np.float32), grid, 0.0)
    weights = np.zeros(prior.n_modes)
    posed = place(prior, prior.mean, gamma, grid, fov, register_pose(gamma, grid, prior, fov))
    scale, rotation, translation = similarity_fit(prior.mean, posed)
    used = (prior.face_weight > 0.5) & (inside(posed) > 0.5)
    if used.sum() < 100:
        return weights, posed, float("nan")
    modes = prior.modes[:, used].reshape(prior.n_modes, -1).T  # (3N, K)
    for _ in range(iterations):
        current = prior.mean[used] + np.tensordot(weights, prior.modes[:, used], axes=1)
        moved = scale * current @ rotation.T + translation
        distance, index = tree.query(moved)
        keep = distance <= np.percentile(distance, 80)
        target = points[index]
        scale, rotation, translation = similarity_fit(current[keep], target[keep])
        # Targets back in the prior frame, then the weights that bring the model there.
        local = ((target - translation) @ rotation) / scale
        residual = (local - prior.mean[used]) * keep[:, None]
        design = modes * np.repeat(keep, 3)[:, None]
        weights = np.linalg.solve(design.T @ design + _RIDGE * np.eye(prior.n_modes), design.T @ residual.ravel())
    shape = prior.mean + np.tensordot(weights, prior.modes, axes=1)
    fitted = scale * shape @ rotation.T + translation
    return weights, fitted, float(np.median(tree.query(fitted[used])[0]))


def field_of_view(image: sitk.Image, grid: ModelGrid) -> np.ndarray:
    """bool (S, S, S): cube voxels inside ``image``'s field of view (not padded with background)."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return (
        sitk.GetArrayFromImage(sitk.Resample(ones, grid.reference(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    )


def skin_points(image: sitk.Image, head: np.ndarray, step: int = 2) -> np.ndarray:
    """(N, 3) LPS mm: centres of the head mask's surface voxels (every ``step``-th), for fitting."""
    surface = head & ~ndimage.binary_erosion(head)
    kji = np.argwhere(surface)[::step]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return (direction @ (kji[:, ::-1] * np.array(image.GetSpacing())).T).T + np.array(image.GetOrigin())


def _signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing((spacing,) * 3)
    return sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    )


# Skin kept at least this far outside the (dilated) brain mask: scalp, skull and CSF are rarely thinner, and a
# face-prior skin that cut closer would let the copied brain margin (which keeps the input's own dark bone and CSF)
# cut through the skin layer (skin.SKIN_LAYER_MM plus the rim): seen as craters on foreheads at 6 mm.
_MIN_SCALP_MM = 9.0
_UNION_MM = 8.0


def identity_rng(seed: int, brain_values: np.ndarray) -> np.random.Generator:
    """The random source of a scan's face-prior identity: the user's seed and a digest of the brain's voxels.

    The same scan and seed give the same identity; different scans in one batch (one seed) get different ones.
    The brain is what the output copies anyway, so nothing about the face enters the draw.
    """
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(brain_values).tobytes()).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


def skin_distance(
    prior: FacePrior,
    vertices: np.ndarray,
    reference: sitk.Image,
    brain_distance: sitk.Image,
    spacing_mm: float = 2.0,
    clip_mm: float = 20.0,
) -> np.ndarray:
    """Signed distance (mm, float32 KJI on ``reference``'s grid, clipped to +-``clip_mm``) to the placed skin
    united with a minimal scalp around the brain: ``brain_distance`` is the dilated brain's signed distance (mm,
    any grid, e.g. the cube's). ``spacing_mm``: the working grid (see skin.signed_distance)."""
    from .skin import signed_distance

    # A smooth union: where the prior's skin comes closer to the brain than a minimal scalp, the head swells
    # into a rounded bulge instead of a plateau with the brain mask's outline.
    return signed_distance(
        vertices,
        prior.triangles,
        reference,
        spheres=(vertices[prior.eyes], prior.eye_radius_mm),
        spacing_mm=spacing_mm,
        clip_mm=clip_mm,
        union=brain_distance - _MIN_SCALP_MM,
        union_mm=_UNION_MM,
    )


def brain_distance(gamma: np.ndarray, grid: ModelGrid) -> sitk.Image:
    """The dilated brain's signed distance (mm, negative inside) on the cube, as an image with its geometry,
    smoothed over a cube voxel so that the brain mask's 4 mm steps do not reach the skin."""
    image = sitk.GetImageFromArray(_signed_distance(gamma[1] > 0.5, grid.spacing).astype(np.float32))
    image.CopyInformation(grid.reference())
    return sitk.SmoothingRecursiveGaussian(image, grid.spacing)


def draw_face(
    prior: FacePrior,
    seed: int,
    brain_values: np.ndarray,
    gamma: np.ndarray,
    grid: ModelGrid,
    image: sitk.Image,
    sigma: float,
) -> np.ndarray:
    """A new identity for this scan, placed from gamma: vertices (V, 3) in the scan's LPS mm.

    ``brain_values``: the input's voxels inside the dilated brain (the identity's random source with ``seed``,
    see :func:`identity_rng`); ``image``: the input (its field of view only)."""
    identity = prior.sample(identity_rng(seed, brain_values), sigma)
    fov = field_of_view(image, grid)
    return place(prior, prior.shape(identity), gamma, grid, fov, register_pose(gamma, grid, prior, fov))


def face_prior_record(prior: FacePrior, sigma: float) -> dict:
    """What the sidecar says of the face: that an identity was drawn, from which prior; nothing of the input's."""
    return {
        "sha256": prior.sha256,
        "modes": prior.n_modes,
        "sigma": sigma,
        "identity": "drawn at random from the seed and the brain's voxels",
    }


# Working grid of the native skin (mm): exact distances near the surface make its zero level accurate to a few
# tenths of a millimetre at this spacing, and a finer one costs (2 / s)^3 as much.
_NATIVE_SKIN_SPACING_MM = 1.5


def native_skin(prior: FacePrior, vertices: np.ndarray, image: sitk.Image, brain_distance: sitk.Image) -> np.ndarray:
    """The skin's signed distance on the input grid (float32 KJI, mm), exact over the partial-volume rim and the
    skin layer and clipped just beyond them, which is all the native output needs."""
    from .skin import RIM_VOXELS, SKIN_LAYER_MM

    rim = RIM_VOXELS * float(max(image.GetSpacing()))
    clip = max(2.0 * _NATIVE_SKIN_SPACING_MM, rim + SKIN_LAYER_MM[1])
    return skin_distance(prior, vertices, image, brain_distance, spacing_mm=_NATIVE_SKIN_SPACING_MM, clip_mm=clip)


def cube_skin(prior: FacePrior, vertices: np.ndarray, grid: ModelGrid, scalp: sitk.Image) -> np.ndarray:
    """The skin's signed distance on the model grid (float32 (S, S, S), mm, clipped to +-20): the generator's
    conditioning channel, built the same way for a training head's fitted face and a scan's drawn one.
    ``scalp``: :func:`brain_distance` of the head's gamma."""
    return skin_distance(prior, vertices, grid.reference(), scalp, spacing_mm=grid.spacing)
