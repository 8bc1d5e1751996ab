"""The average head and its face mask that ``reface`` and ``deface`` register to each subject.

Both come from the PyPI ``pydeface`` wheel (MIT; installed with ``--no-deps``, since only its data is
used): ``pydeface/data/mean_reg2mean.nii.gz``, a T1 average of several heads with the whole face and neck,
and ``pydeface/data/facemask.nii.gz`` on the same grid (1 = keep, 0 = face, as pydeface multiplies it in).
An average face identifies no one, which is what makes it a legal replacement at run time.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List

import numpy as np
import SimpleITK as sitk

from .headmask import head_mask
from .reader import image_like
from .registration import register, warp

if TYPE_CHECKING:
    from .methods import MethodContext

HEAD_FILE = "mean_reg2mean.nii.gz"
FACE_MASK_FILE = "facemask.nii.gz"


@dataclass(frozen=True)
class Template:
    """The average head on its own 1 x 0.98 x 0.98 mm RAS grid (LPS physical space as SimpleITK reads it).

    ``image`` is float32 in the template's T1 units; ``head`` and ``face`` are uint8 images on the same grid
    (1 = tissue, 1 = the region pydeface removes). All three are shared by every caller: do not modify.
    """

    image: sitk.Image
    head: sitk.Image
    face: sitk.Image


def template_dir() -> Path:
    """The ``data`` folder of the installed ``pydeface`` package, found without importing it."""
    spec = importlib.util.find_spec("pydeface")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the average head comes from the 'pydeface' package: pip install --no-deps pydeface")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    for name in (HEAD_FILE, FACE_MASK_FILE):
        if not (folder / name).is_file():
            raise RuntimeError(f"{folder / name} is missing: reinstall with pip install --no-deps pydeface")
    return folder


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the average head and face mask once per process (about 0.5 s) and keep them."""
    folder = template_dir()
    image = sitk.ReadImage(str(folder / HEAD_FILE), sitk.sitkFloat32)
    face_keep = sitk.ReadImage(str(folder / FACE_MASK_FILE), sitk.sitkFloat32)
    # The mask's header differs from the head's in the 7th decimal of its spacing; share one grid exactly.
    face_keep.CopyInformation(image)
    face = sitk.Cast(face_keep < 0.5, sitk.sitkUInt8)
    head = image_like(head_mask(image).astype(np.uint8), image)
    return Template(image=image, head=head, face=face)


def fit_template(image: sitk.Image, head: np.ndarray, seed: int = 0) -> sitk.Transform:
    """The average head registered to ``image`` (similarity, then a smooth surface warp; see registration.py).

    ``head`` is the subject's bool KJI head mask on ``image``'s grid. The warp fits the template's scalp, chin
    and neck to the subject's but not its face: copying the subject's face outline onto the average face
    would bring back what ``reface`` removes, and ``deface``'s mask is a block that needs no outline.
    The transform maps the subject's physical points (LPS mm) into the template:
    ``registration.warp(load_template().face, image, transform)`` puts the face mask on the subject's grid.
    """
    template = load_template()
    subject_head = image_like(head.astype(np.uint8), image)
    return register(image, template.image, subject_head, template.head, keep_shape=template.face, seed=seed)


def template_on_subject(ctx: "MethodContext", *layers: str) -> List[np.ndarray]:
    """The average head registered to ``ctx``'s subject (stages "register" and "warp"); returns the named
    ``layers`` of it on the subject's grid as KJI arrays: "image" float32 in the template's T1 units (linear
    interpolation), "head" and "face" bool (nearest neighbour)."""
    template = load_template()
    with ctx.stage("register"):
        transform = fit_template(ctx.image, ctx.head, seed=ctx.seed)
    with ctx.stage("warp"):
        arrays = []
        for name in layers:
            if name == "image":
                arrays.append(sitk.GetArrayFromImage(warp(template.image, ctx.image, transform)))
            else:
                mask = warp(getattr(template, name), ctx.image, transform, sitk.sitkNearestNeighbor)
                arrays.append(sitk.GetArrayFromImage(mask) > 0)
    return arrays
