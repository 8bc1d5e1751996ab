"""``reface``: everything outside the brain margin replaced by an average head registered to the subject.

The idea of mri_reface (Mayo) and AFNI's ``@afni_refacer_run``, with SimpleITK instead of NiftyReg/ANTs/AFNI:
the average head from the ``pydeface`` wheel (``template.py``) is registered to the subject (similarity,
scaling, then a smooth warp of its skin surface onto the subject's), its intensities are mapped onto the
subject's, and it replaces the subject's face, ears, scalp and skull. The output's outline is the
template's, bent to the subject's head size and shape, so the subject's own face surface is gone.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..template import template_on_subject
from . import MethodContext, MethodOutput, register

# Quantiles matched between the template and the subject (percent): dense enough to follow fat, muscle
# and bone marrow separately, clipped at 1/99 so that a few vessels or artefacts do not set the range.
_QUANTILES = np.linspace(1.0, 99.0, 50)
# Scale (mm) of the local gain between template and subject: the size of a cheek or a scalp region, far above
# that of the features that identify a face.
_GAIN_SIGMA_MM = 12.0
_GAIN_RANGE = (0.5, 4.0)


@register(
    "reface",
    summary="replace face, ears, scalp and skull by an average head registered to the subject",
    role="data-light remodeling baseline (like mri_reface / AFNI refacer)",
)
def run(ctx: MethodContext) -> MethodOutput:
    values, head = template_on_subject(ctx, "image", "head")
    with ctx.stage("intensity match"):
        overlap = head & ctx.head & ~ctx.brain
        values = match_intensities(values, ctx.array, overlap, fallback=ctx.head & ~ctx.brain)
        values *= local_gain(
            values, ctx.array, overlap & (ctx.array > ctx.threshold), np.asarray(ctx.image.GetSpacing()[::-1])
        )
    head |= ctx.brain
    return MethodOutput(values=values, head=head)


def match_intensities(
    values: np.ndarray, reference: np.ndarray, region: np.ndarray, fallback: np.ndarray
) -> np.ndarray:
    """``values`` (float32 KJI, a new array) mapped so their histogram in ``region`` matches ``reference``'s there.

    A monotone quantile map (histogram matching) rather than a linear fit: the template's T1 contrast
    between fat, muscle and bone need not scale linearly onto another scanner's (or a T2's) intensities.
    ``fallback`` replaces ``region`` when it holds too few voxels (less than a thousand) to estimate quantiles.
    """
    if np.count_nonzero(region) < 1000:
        region = fallback
    source = np.percentile(values[region], _QUANTILES)
    target = np.percentile(reference[region], _QUANTILES)
    # np.interp needs strictly increasing sample points; flat stretches of the template's histogram repeat.
    source = np.maximum.accumulate(source) + np.arange(source.size) * 1e-6 * max(1.0, float(np.ptp(source)))
    return np.interp(values, source, target).astype(np.float32)


def local_gain(values: np.ndarray, reference: np.ndarray, region: np.ndarray, spacing_kji: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field (float32 KJI) bringing ``values`` to ``reference``'s local mean over ``region``.

    One histogram map cannot fix regional differences: the average face is dim where misaligned faces were
    averaged with air, and coil shading differs between scanners. Means are normalised convolutions over the
    subject's tissue (Gaussian of ``_GAIN_SIGMA_MM``, ``spacing_kji`` in mm); the gain fades to 1 away from it.
    """
    weight = region.astype(np.float32)
    support = _smooth(weight, spacing_kji, _GAIN_SIGMA_MM)
    mean_reference = _smooth(reference * weight, spacing_kji, _GAIN_SIGMA_MM)
    mean_values = _smooth(values * weight, spacing_kji, _GAIN_SIGMA_MM)
    tiny = 1e-6 * max(1.0, float(np.abs(reference[region]).mean()) if region.any() else 1.0)
    gain = np.clip(mean_reference / np.maximum(mean_values, tiny), *_GAIN_RANGE)
    # Where the subject has little tissue nearby the gain is a guess: blend towards 1 with the support.
    trust = np.clip(support / 0.25, 0.0, 1.0)
    return (1.0 + trust * (gain - 1.0)).astype(np.float32)


def _smooth(array: np.ndarray, spacing_kji: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gaussian of ``sigma_mm`` over a KJI array with voxel size ``spacing_kji`` (mm); a new float32 array.

    A recursive Gaussian: its cost does not grow with sigma, unlike a convolution on a 1 mm grid.
    """
    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.SetSpacing([float(v) for v in np.asarray(spacing_kji, float)[::-1]])
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, sigma_mm))


@register(
    "reface-prior",
    summary="reface with a new face: the average head's tissue inside a face-prior identity "
    "placed from gamma (remodel's geometry without the generator)",
    role="baseline: what the face prior alone gives, to show what the generator adds",
)
def run_prior(ctx: MethodContext) -> MethodOutput:
    from ..faceprior import load_face_prior
    from ..placement import brain_distance, native_skin
    from ..skin import RIM_VOXELS, draw_skin
    from .remodel import draw_new_face, tissue_level

    output = run(ctx)
    # remodel's 4 mm grid: gamma there is what placement was built on.
    ctx.options.setdefault("grid_size", 64)
    grid = ctx.grid()
    prior = load_face_prior(ctx.options.get("face_prior"))
    _, inputs, vertices = draw_new_face(ctx, grid, prior)
    with ctx.stage("skin"):
        skin = native_skin(prior, vertices, ctx.image, brain_distance(inputs.gamma.cpu().numpy(), grid))
        head = skin < 0.5 * RIM_VOXELS * float(max(ctx.image.GetSpacing()))
        tissue = tissue_level(ctx)
        # Where the new face reaches beyond the average head, the template has only air: tissue level there.
        values = np.where(head & ~output.head, np.float32(tissue), output.values)
        values = draw_skin(values, skin, ctx.image.GetSpacing(), float(grid.intensity.denormalise(0.0)), tissue)
    head |= ctx.brain
    return MethodOutput(values=values, head=head, changed=(head | ctx.head) & ~ctx.brain)
