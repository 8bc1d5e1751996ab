"""The brain-exact composite at native resolution.

Whatever a method did, the output is rebuilt here on the input's grid: inside the dilated brain mask the
input's stored voxels are copied bit for bit (same dtype, no rescaling); outside it the method's values,
rounded and clipped into the input's dtype and range; outside the method's head an air background drawn
from the input's own background voxels, so the noise floor looks like the scanner's.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .headmask import dilate
from .methods import MethodOutput
from .reader import image_like

# Background is sampled this far (voxels) from the head, beyond the skin's partial-volume rim.
_BACKGROUND_GAP_VOXELS = 3


def composite(
    image: sitk.Image, brain: np.ndarray, head: np.ndarray, output: MethodOutput, threshold: float, seed: int = 0
) -> sitk.Image:
    """The de-identified image: ``image``'s grid, pixel type and metadata-free header.

    ``brain`` (bool KJI) is the region copied exactly; ``head`` (bool KJI) and ``threshold`` (the head
    threshold, input units) find the input's background. The returned image shares no memory with ``image``.
    """
    original = sitk.GetArrayViewFromImage(image)
    # One float32 working copy; air voxels are overwritten by the background.
    values = np.array(output.values, dtype=np.float32)
    air = ~output.head
    if air.any():
        values[air] = _background_sample(original, head, threshold, int(air.sum()), seed)
    result = _to_dtype(values, original)
    result[brain] = original[brain]
    return image_like(result, image)


def _background_sample(original: np.ndarray, head: np.ndarray, threshold: float, count: int, seed: int) -> np.ndarray:
    """``count`` values drawn at random from the input's background: its noise level without its structure.

    Only voxels below the head threshold count as air: ghosts and stray tissue bits outside the head mask
    would otherwise be sprinkled over the background as bright specks.
    """
    far = ~dilate(head, _BACKGROUND_GAP_VOXELS)
    pool = original[far & (original < threshold)]
    if pool.size == 0:
        return np.full(count, original.min(), np.float32)
    rng = np.random.default_rng(seed)
    return pool[rng.integers(0, pool.size, count)].astype(np.float32)


def _to_dtype(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``values`` (float32, rounded in place) in ``like``'s dtype: rounded and clipped to ``like``'s range for
    integers. The clip keeps numpy's own result type: for int32 or float64 inputs it computes in float64."""
    if like.dtype.kind in "iu":
        np.rint(values, out=values)
    return np.clip(values, like.min(), like.max()).astype(like.dtype, copy=False)
