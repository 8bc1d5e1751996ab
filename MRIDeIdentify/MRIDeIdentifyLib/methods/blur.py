"""``blur``: the paper's BLURRED control, a heavy Gaussian blur of everything outside the brain margin."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..reader import image_like
from . import MethodContext, MethodOutput, register

# 8 mm already defeats 2-D face recognisers often but not 3-D surface matching (privacy-evaluation.md):
# the control shows what blurring can and cannot do.
DEFAULT_SIGMA_MM = 8.0


@register(
    "blur",
    summary="heavy Gaussian blur outside the brain margin",
    role="control (the paper's BLURRED): shows that blurring leaves the head shape identifiable",
)
def run(ctx: MethodContext) -> MethodOutput:
    sigma = float(ctx.options.get("blur_sigma_mm", DEFAULT_SIGMA_MM))
    with ctx.stage("blur"):
        source = image_like(ctx.array, ctx.image)
        values = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(source, sigma)).astype(np.float32)
    # The blurred head spreads into the air; keep the output's tissue where the blurred image is above delta.
    head = values > ctx.threshold
    return MethodOutput(values=values, head=head)
