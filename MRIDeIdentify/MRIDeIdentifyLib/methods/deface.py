"""``deface``: the face region of a template face mask, registered to the subject, is removed.

pydeface's approach (its own average head and face mask, from its PyPI wheel) with SimpleITK registration
instead of FSL FLIRT: no FSL install, any orientation, and a smooth warp after the linear fit so the mask
follows the subject's face outline. The removal baseline that most shared datasets use.
"""

from __future__ import annotations

from ..template import template_on_subject
from . import MethodContext, MethodOutput, register


@register(
    "deface",
    summary="remove the face with pydeface's face mask registered to the subject (no FSL)",
    role="removal baseline (pydeface-like)",
)
def run(ctx: MethodContext) -> MethodOutput:
    (face,) = template_on_subject(ctx, "face")
    face &= ~ctx.brain
    values = ctx.array.copy()
    values[face] = 0.0
    return MethodOutput(values=values, head=ctx.head & ~face, changed=face)
