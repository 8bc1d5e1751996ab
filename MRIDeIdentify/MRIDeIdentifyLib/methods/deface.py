"""``deface``: the face region of a template face mask, registered to the subject, is removed.

pydeface's approach (its own average head and face mask, from its PyPI wheel) with SimpleITK registration
instead of FSL FLIRT: no FSL install, any orientation, and a smooth warp after the linear fit so the mask
follows the subject's face outline. The removal baseline that most shared datasets use.
"""
from __future__ import annotations

import SimpleITK as sitk

from ..registration import warp
from ..template import fit_template, load_template
from . import MethodContext, MethodOutput, register


@register("deface", summary="remove the face with pydeface's face mask registered to the subject (no FSL)",
          role="removal baseline (pydeface-like)")
def run(ctx: MethodContext) -> MethodOutput:
    template = load_template()
    with ctx.stage("register"):
        transform = fit_template(ctx.image, ctx.head, seed=ctx.seed)
    with ctx.stage("warp"):
        face = sitk.GetArrayFromImage(warp(template.face, ctx.image, transform, sitk.sitkNearestNeighbor)) > 0
    face &= ~ctx.brain
    values = ctx.array.copy()
    values[face] = 0.0
    return MethodOutput(values=values, head=ctx.head & ~face, changed=face)
