"""Brain mask on the input grid: deepbet's learned extractor, or a mask the user supplies; margin dilation.

The dilated mask is the region the composite copies bit for bit from the input, so it errs on the side of
keeping too much: the margin (mm) covers the brain extractor's boundary uncertainty.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import InputError
from .headmask import fill_holes

# deepbet's networks see the brain's bounding box resized to this cube, its coarse localiser the whole head.
_DEEPBET_SHAPE = (256, 256, 256)
_DEEPBET_SMALL = (128, 128, 128)
# deepbet was trained on ~1 mm RAS volumes; working on a 1 mm RAS copy makes any orientation, obliquity and
# slice thickness look like its training data.
_WORK_SPACING_MM = 1.0


@functools.lru_cache(maxsize=2)
def _deepbet_models(device: str):
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise InputError("the brain extractor deepbet is not installed: run `pip install --no-deps deepbet` "
                         "(or pass --brain-mask)")
    # deepbet's wheel installs its TorchScript weights in a data/ folder beside the package.
    models = Path(spec.origin).resolve().parents[1] / "data" / "models"
    load = functools.partial(torch.jit.load, map_location=device)
    return load(str(models / "bbox_model.pt")).eval(), load(str(models / "model.pt")).eval()


def extract_brain_mask(image: sitk.Image, device: torch.device | str = "cpu") -> np.ndarray:
    """deepbet brain mask of ``image``, as bool KJI on ``image``'s own grid (not dilated)."""
    device = torch.device(device)
    work = _ras_work_image(image)
    x = torch.from_numpy(_ras_array(work)).to(device)
    probability = _deepbet_probability(x, device)
    prob_image = sitk.GetImageFromArray(_from_ras_array(probability.cpu().numpy()))
    prob_image.CopyInformation(work)
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    native = sitk.GetArrayFromImage(sitk.Resample(prob_image, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    mask = native > 0.5
    if not mask.any():
        raise InputError("no brain found in the input (the brain extractor returned an empty mask); "
                         "pass a mask with --brain-mask")
    return _largest_filled(mask)


def _deepbet_probability(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """deepbet's two-stage inference on a RAS array (I, J, K), returning the brain probability."""
    bbox_model, model = _deepbet_models(str(device))
    x = torch.nan_to_num(x.float())
    small = F.interpolate(x[None, None], _DEEPBET_SMALL, mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    with torch.no_grad():
        coarse = bbox_model(_normalise(small, low, high)[None, None])[0, 1] > 0.5
    coarse = torch.from_numpy(_largest_filled(coarse.cpu().numpy())).to(device)
    if not coarse.any():
        raise InputError("no brain found in the input (the brain localiser found nothing); pass --brain-mask")
    box = _bounding_box(coarse, x.shape)
    crop = F.interpolate(x[box][None, None], _DEEPBET_SHAPE, mode="nearest-exact")
    with torch.no_grad():
        fine = model(_normalise(crop, low, high))[0, 1]
    probability = torch.zeros_like(x)
    probability[box] = F.interpolate(fine[None, None], probability[box].shape, mode="trilinear",
                                     align_corners=False)[0, 0]
    return probability


def _normalise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    # deepbet's own normalisation: clip to robust range, standardise, then map to ImageNet-like statistics.
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def _bounding_box(coarse: torch.Tensor, shape, margin: float = 0.1):
    """The coarse mask's bounding box on the full array, grown by ``margin`` of its size on each side."""
    scale = torch.tensor(shape, dtype=torch.float32) / torch.tensor(coarse.shape, dtype=torch.float32)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(coarse.float().mean(other) > 0.02).flatten()
        if hits.numel() == 0:
            hits = torch.nonzero(coarse.any(dim=other[1]).any(dim=other[0])).flatten()
        low, high = float(hits.min()) * scale[axis], float(hits.max() + 1) * scale[axis]
        grow = margin * (high - low)
        box.append(slice(max(0, int(low - grow)), min(shape[axis], int(high + grow) + 1)))
    return tuple(box)


def _ras_work_image(image: sitk.Image) -> sitk.Image:
    """``image`` resampled onto a 1 mm grid with RAS voxel axes covering the same physical box."""
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                        for i in (-0.5, image.GetSize()[0] - 0.5)
                        for j in (-0.5, image.GetSize()[1] - 0.5)
                        for k in (-0.5, image.GetSize()[2] - 0.5)])
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = [max(1, int(np.ceil((h - lo) / _WORK_SPACING_MM))) for lo, h in zip(low, high)]
    # LPS identity direction flipped on x and y gives voxel axes pointing R, A, S.
    direction = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    origin = (high[0] - _WORK_SPACING_MM / 2, high[1] - _WORK_SPACING_MM / 2, low[2] + _WORK_SPACING_MM / 2)
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([_WORK_SPACING_MM] * 3)
    ref.SetDirection(direction)
    ref.SetOrigin(origin)
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)


def _ras_array(work: sitk.Image) -> np.ndarray:
    """The work image's voxels as an (I, J, K) = (R, A, S) array, the layout deepbet was trained on."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(work).transpose(2, 1, 0))


def _from_ras_array(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(2, 1, 0))


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return fill_holes(mask)


def load_user_mask(mask_image: sitk.Image, reference: sitk.Image, head: np.ndarray | None = None) -> np.ndarray:
    """A user's mask (any non-zero voxel is brain) as bool KJI on ``reference``'s grid.

    A mask on the same physical grid is taken as is; on another grid it is resampled by nearest neighbour.
    Raises InputError when the mask is empty there or does not overlap the head.
    """
    if mask_image.GetDimension() != 3:
        raise InputError(f"the brain mask must be 3-D, it has {mask_image.GetDimension()} dimensions")
    if same_grid(mask_image, reference):
        mask = sitk.GetArrayFromImage(mask_image) != 0
    else:
        grid = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
        grid.CopyInformation(reference)
        binary = sitk.Cast(mask_image != 0, sitk.sitkUInt8)
        mask = sitk.GetArrayFromImage(sitk.Resample(binary, grid, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                    0, sitk.sitkUInt8)) != 0
    if not mask.any():
        raise InputError("the brain mask does not overlap the input's field of view")
    if head is not None and not (mask & head).any():
        raise InputError("the brain mask does not overlap the head in the input")
    return mask


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tolerance`` mm)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def dilate_mm(mask: np.ndarray, spacing_kji, margin_mm: float) -> np.ndarray:
    """``mask`` (bool KJI) grown by ``margin_mm`` millimetres (Euclidean, honouring anisotropic voxels).

    ``spacing_kji`` is the voxel size in mm in KJI order (SimpleITK's GetSpacing() reversed).
    """
    if margin_mm <= 0 or not mask.any():
        return mask.copy()
    spacing = np.asarray(spacing_kji, float)
    pad = np.ceil(margin_mm / spacing).astype(int) + 1
    ranges = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    box = tuple(slice(max(0, r[0] - p), min(n, r[-1] + p + 1)) for r, p, n in zip(ranges, pad, mask.shape))
    # Distance from every voxel of the box to the nearest mask voxel; only the box can be within the margin.
    distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
    grown = np.zeros_like(mask)
    # A margin equal to the voxel size must reach the next voxel despite float rounding of the distances.
    grown[box] = distance <= margin_mm + 1e-6 * spacing.min()
    return grown
