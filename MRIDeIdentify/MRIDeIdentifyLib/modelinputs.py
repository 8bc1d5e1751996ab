"""What the generator is given on the model grid, built by one function for training and inference alike.

gamma(x) (privacy.py) needs the head level delta; it is computed here, on the cube itself, for a training head
and for a scan being de-identified. (Training used to recompute it on the cube while inference took the native
image's, 0.67-0.93 times the cube's on the shared heads, so the hulls the model learnt from were not the ones it
was given.) The face prior's skin enters as a fourth channel: its signed distance, clipped and scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from .headmask import head_threshold
from .privacy import privacy_transform
from .settings import DEFAULT_FACETS, DEFAULT_ROTATIONS
from .skin import DEFAULT_CLIP_MM


@dataclass(frozen=True)
class ModelInputs:
    """gamma (3, S, S, S) float32 = [hull, brain, brain * x] and the head level delta used for the hull
    (normalised units, computed on the cube)."""

    gamma: torch.Tensor
    threshold: float


def model_inputs(
    volume: torch.Tensor | np.ndarray,
    brain: torch.Tensor | np.ndarray,
    *,
    seed: int,
    rotations: int = DEFAULT_ROTATIONS,
    facets: int = DEFAULT_FACETS,
) -> ModelInputs:
    """gamma of a head on the model grid: ``volume`` float (S, S, S) normalised, ``brain`` bool (S, S, S).

    Inputs are not modified; gamma is on ``volume``'s device.
    """
    volume = torch.as_tensor(volume)
    brain = torch.as_tensor(brain)
    threshold = head_threshold(sitk.GetImageFromArray(volume.detach().cpu().numpy()))
    gamma = privacy_transform(volume, brain, threshold, rotations=rotations, facets=facets, seed=seed)
    return ModelInputs(gamma, threshold)


def condition(gamma: torch.Tensor, skin_mm: Optional[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """The generator's conditioning (4, S, S, S): gamma and the skin's signed distance (mm, negative inside)
    clipped to +-``skin.DEFAULT_CLIP_MM`` and scaled to [-1, 1]. A new tensor on gamma's device."""
    skin = torch.as_tensor(skin_mm, dtype=torch.float32, device=gamma.device)
    return torch.cat([gamma, (skin / DEFAULT_CLIP_MM).clamp(-1.0, 1.0)[None]], 0)
