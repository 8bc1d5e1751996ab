"""``skullstrip``: the paper's MRI WATERSHED control, everything but the (dilated) brain becomes air."""

from __future__ import annotations

from . import MethodContext, MethodOutput, register


@register(
    "skullstrip",
    summary="keep only the brain (and its margin); everything else becomes background",
    role="control (the paper's MRI WATERSHED): maximal privacy, breaks whole-head analyses",
)
def run(ctx: MethodContext) -> MethodOutput:
    return MethodOutput(values=ctx.array, head=ctx.brain.copy(), changed=ctx.head & ~ctx.brain)
