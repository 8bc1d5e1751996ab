"""Training data: each scan once onto its model grid, with the face prior fitted to its own skin, cached on disk.

A scan is read and put on its model grid with the engine's own headmask / brainmask / modelgrid, exactly as the
``remodel`` method puts it, so training sees what inference sees; the face prior is fitted to the head's own skin
(placement.fit_identity: identity weights and pose) and kept as the skin's signed distance on the cube. The
result, a :class:`Head`, is cached as ``CACHE/<scan>.s<size>.m<margin>.face.npz`` (a scan that cannot be
prepared leaves a ``.skip`` file with the reason), and the dilated brain mask on the scan's own grid as
``CACHE/<scan>.brain.m<margin>.npz``, so that another model size does not run the brain extractor again.
train.py reads the heads through :func:`load_heads`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .modelgrid import ModelGrid


@dataclass
class Head:
    """One cached scan on the model grid (KJI, S³ voxels): ``volume`` float32 normalised, ``brain`` bool (the
    dilated brain mask), ``skin`` float32: the face prior fitted to this head, as a signed distance in mm."""

    name: str
    volume: np.ndarray
    brain: np.ndarray
    skin: np.ndarray


def preprocess(
    path: Path,
    size: int,
    margin_mm: float,
    device: torch.device | str = "cpu",
    brain_cache: Optional[Path] = None,
    series: Optional[str] = None,
) -> Head:
    """Read a scan and put it on its model grid of ``size``³ voxels exactly as the ``remodel`` method does (brain
    dilated by ``margin_mm`` millimetres).

    ``brain_cache``: an .npz file keeping the dilated brain mask on the scan's own grid (KJI), so that building
    the cache for another model size does not run the brain extractor again. ``series``: the DICOM series of a
    folder holding several.
    """
    from .brainmask import dilate_mm, extract_brain_mask
    from .headmask import head_mask, head_threshold
    from .modelgrid import ModelGrid
    from .reader import read_volume
    from .scans import Scan

    image = read_volume(path, series).image
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    head = head_mask(image, head_threshold(image), array=array)
    if brain_cache is not None and brain_cache.exists():
        with np.load(brain_cache) as data:
            brain = np.unpackbits(data["bits"], count=array.size).reshape(array.shape).astype(bool)
    else:
        brain = dilate_mm(extract_brain_mask(image, device), image.GetSpacing()[::-1], margin_mm)
        if brain_cache is not None:
            np.savez_compressed(brain_cache, bits=np.packbits(brain))
    grid = ModelGrid.around(image, head, brain, size=size, array=array)
    volume, cube_brain = grid.to_model(image), grid.mask_to_model(brain, image)
    skin, fit = fit_skin(image, head, grid, volume, cube_brain)
    print(f"  face prior fitted: median distance {fit:.1f} mm", file=sys.stderr)
    return Head(Scan(path, series).name, volume, cube_brain, skin)


def fit_skin(
    image: sitk.Image, head: np.ndarray, grid: ModelGrid, volume: np.ndarray, brain: np.ndarray
) -> Tuple[np.ndarray, float]:
    """The face prior fitted to a training head's own skin (pose and identity weights, on the part of the face
    in its field of view), as the signed distance (mm, float32 KJI on the cube) the generator is conditioned on,
    and the fit's median distance (mm).

    ``head``: bool KJI on ``image``'s grid; ``volume`` (normalised) and ``brain`` (bool): the head on ``grid``'s
    cube. The same placement, skin and scalp rules as ``remodel`` apply, so the generator learns on the kind of
    surface it is given at inference."""
    from .faceprior import load_face_prior
    from .modelinputs import model_inputs
    from .placement import brain_distance, cube_skin, field_of_view, fit_identity, skin_points

    prior = load_face_prior()
    gamma = model_inputs(volume, brain, seed=0).gamma.numpy()
    _, vertices, error = fit_identity(prior, skin_points(image, head), gamma, grid, field_of_view(image, grid))
    return cube_skin(prior, vertices, grid, brain_distance(gamma, grid)), error


def load_heads(
    data: Path,
    cache: Path,
    size: int,
    margin_mm: float,
    exclude: Tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    rank: int = 0,
) -> List[Head]:
    """The heads of the scans under ``data`` (a folder or BIDS dataset) but those whose names start with one of
    ``exclude``, on ``size``³ cubes with the brain dilated by ``margin_mm`` mm; scans not yet in ``cache`` are
    prepared first (by rank 0; under torchrun the other ranks wait for it)."""
    from .scans import find_scans

    scans, _ = find_scans(data)
    scans = [s for s in scans if not s.name.startswith(tuple(exclude))]
    if not scans:
        raise SystemExit(f"no training scans under {data} (after excluding {exclude})")
    files = [cache / f"{s.name}.s{size}.m{margin_mm:g}.face.npz" for s in scans]
    if rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
        for scan, file in zip(scans, files):
            if file.exists() or file.with_suffix(".skip").exists():
                continue
            print(f"preprocessing {scan.name}", file=sys.stderr)
            try:
                head = preprocess(
                    scan.path, size, margin_mm, device, cache / f"{scan.name}.brain.m{margin_mm:g}.npz", scan.series
                )
            except Exception as error:  # one unusable scan must not stop a run over a whole dataset
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                print(f"skipping {scan.name}: {reason}", file=sys.stderr)
                file.with_suffix(".skip").write_text(reason + "\n")
                continue
            tmp = file.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, volume=head.volume, brain=head.brain, skin=head.skin)
            tmp.replace(file)
    if dist.is_initialized():
        dist.barrier()
    heads = []
    for file in files:
        if not file.exists():
            continue
        with np.load(file) as arrays:
            heads.append(Head(file.name.split(".s")[0], arrays["volume"], arrays["brain"], arrays["skin"]))
    return heads
