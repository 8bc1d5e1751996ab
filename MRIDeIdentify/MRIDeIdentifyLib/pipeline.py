"""``deidentify``: one scan through the engine's stages, in order, with timings, progress and cancellation.

Stages: head mask -> brain mask (+ margin) -> the method -> composite. Reading and writing belong to the
callers (the command line reads files; the Slicer Logic converts volume nodes), so this function works on
``SimpleITK`` images only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import SimpleITK as sitk

from . import provenance
from .brainmask import dilate_mm, extract_brain_mask, load_user_mask
from .composite import composite
from .devices import resolve_device
from .errors import InputError
from .headmask import head_mask, head_threshold
from .methods import MethodContext, ProgressCallback, Stages, get_method
from .reader import check_volume, image_like
from .settings import DEFAULT_DEVICE, DEFAULT_MARGIN_MM, DEFAULT_SEED


@dataclass
class Result:
    """A de-identified scan. ``image`` has the input's grid and pixel type; the masks are uint8 on that grid:
    ``brain_mask`` is exactly the region copied bit for bit, ``face_mask`` the region the method changed."""

    image: sitk.Image
    brain_mask: sitk.Image
    face_mask: sitk.Image
    provenance: Dict[str, Any]
    device: str


def deidentify(
    image: sitk.Image,
    method: Optional[str] = None,
    *,
    brain_mask: Optional[sitk.Image] = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
    seed: int = DEFAULT_SEED,
    device: str = DEFAULT_DEVICE,
    options: Optional[Dict[str, Any]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> Result:
    """De-identify ``image`` (3-D scalar; not modified) with ``method`` (None = the default method).

    ``brain_mask``: optional user mask (any grid overlapping the head; non-zero = brain). ``margin_mm``: the
    brain mask is dilated by this many millimetres and the dilated region is copied exactly. ``device``:
    auto|cpu|cuda|mps. ``options``: method settings (e.g. ``model`` path, ``rotations``, ``facets``).
    ``progress(stage, fraction)`` is called as stages start and end; ``cancel()`` returning True stops the
    run with :class:`errors.Cancelled`.
    """
    chosen = get_method(method)
    if margin_mm < 0 or not np.isfinite(margin_mm):
        raise InputError(f"the brain margin must be a non-negative number of mm, not {margin_mm}")
    image = check_volume(image)
    torch_device = resolve_device(device)
    chosen.check(dict(options or {}), torch_device)
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)
    stages = Stages(progress, cancel)
    start = time.perf_counter()
    with stages.stage("head mask"):
        threshold = head_threshold(image)
        head = head_mask(image, threshold, array=array)
    with stages.stage("brain mask"):
        if brain_mask is not None:
            found = load_user_mask(brain_mask, image, head)
            source = "user"
        else:
            found = extract_brain_mask(image, torch_device)
            source = "deepbet"
        brain = dilate_mm(found, image.GetSpacing()[::-1], margin_mm)
    ctx = MethodContext(
        image=image,
        array=array,
        brain=brain,
        head=head,
        threshold=threshold,
        seed=int(seed),
        device=torch_device,
        options=dict(options or {}),
        stages=stages,
    )
    output = chosen.run(ctx)
    stages.check_cancel()
    with stages.stage("composite"):
        result = composite(image, brain, head, output, threshold, seed=ctx.seed)
    changed = output.changed if output.changed is not None else (output.head | head) & ~brain
    stages.timings["total"] = time.perf_counter() - start
    record = provenance.record(
        method=chosen.name,
        seed=ctx.seed,
        margin_mm=float(margin_mm),
        device=str(torch_device),
        brain_mask_source=source,
        timings=stages.timings,
        image=image,
        extra=ctx.provenance,
    )
    return Result(
        result,
        image_like(brain.view(np.uint8), image),
        image_like((changed & ~brain).view(np.uint8), image),
        record,
        str(torch_device),
    )
