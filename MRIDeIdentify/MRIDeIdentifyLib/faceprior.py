"""The face prior: a statistical model of face and head shape (ICT Face Model Light, MIT) from which ``remodel``
draws a new identity for every scan.

The paper's generator learns what a face looks like from thousands of scans; we take face *shape* from a linear
morphable model built from light-stage scans of many people, and let C-DeID-GAN learn MRI *appearance* around it.

The prior file (``weights/faceprior.safetensors``, with a JSON card and the MIT notice beside it) is built once by
``scripts/build_face_prior.py`` from ``shared/data/ict-facekit``. Its frame, the *prior frame*, has SimpleITK's LPS
axes in millimetres (the ICT mesh's x = left, y = up, z = forward in cm become L = x, P = -z, S = y in mm). It holds:

- ``mean`` (V, 3) and ``modes`` (K, V, 3): a closed skin surface of face, head and neck. The eye openings, the mouth
  slit and the neck cut are closed by one extra vertex each, the centroid of the opening's border; a centroid is
  linear in the vertices, so the extra vertices are just more rows of ``mean`` and ``modes``.
- ``triangles`` (T, 3): the closed surface, outward-facing.
- ``eyes`` (2,) vertex indices of the eyeball centres (also linear rows) and ``eye_radius_mm``: the eyeballs, as
  spheres, fill the eye openings so that the rendered face has eyes under closed lids.
- ``face_weight`` (V,): 1 on the face (where the prior's shape must be kept), falling to 0 over the cranium and
  neck (which placement fits to the scan's hull).
- ``landmarks`` (68,): Multi-PIE landmark vertices.
- ``reference`` (R, R, R) uint8 with ``reference_origin`` and ``reference_spacing`` (prior frame): an average head's
  convex hull (1) and brain (2), so that a scan's gamma can be registered to the prior frame (placement.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import InputError

PRIOR_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_PRIOR = PRIOR_DIR / "faceprior.safetensors"
# A sampled identity is w ~ N(0, sigma^2 I), each weight clipped to +-CLIP_SIGMAS sigma: at sigma 1.5 ICT faces
# start to look like caricatures and at 2 they are grotesque (measured with dlib before this was built), while
# sigma 1 keeps them as far apart as different real people's MRI faces.
DEFAULT_SIGMA = 1.0
CLIP_SIGMAS = 2.0


@dataclass(frozen=True)
class FacePrior:
    """The loaded prior (arrays are float32 / int32 / uint8 numpy, shared by every caller: do not modify)."""

    mean: np.ndarray
    modes: np.ndarray
    triangles: np.ndarray
    eyes: np.ndarray
    eye_radius_mm: float
    face_weight: np.ndarray
    landmarks: np.ndarray
    reference: np.ndarray
    reference_origin: Tuple[float, float, float]
    reference_spacing: float
    sha256: str
    card: dict

    @property
    def n_modes(self) -> int:
        return int(self.modes.shape[0])

    def shape(self, weights: np.ndarray) -> np.ndarray:
        """Vertices (V, 3) float64, prior frame mm, of identity ``weights`` (K,), aligned to the mean's position,
        rotation and size (Procrustes).

        Mode 0 is mostly global size (85 % of its variance): placement decides a head's size and pose from the
        scan's hull and brain, so an identity contributes only its shape.
        """
        weights = np.asarray(weights, np.float64)
        if weights.shape != (self.n_modes,):
            raise ValueError(f"identity needs {self.n_modes} weights, got shape {weights.shape}")
        vertices = self.mean + np.tensordot(weights, self.modes, axes=1)
        return similarity_align(vertices, self.mean)

    def sample(self, rng: np.random.Generator, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
        """A random identity: (K,) weights ~ N(0, sigma^2), each clipped to +-CLIP_SIGMAS * sigma."""
        return np.clip(rng.standard_normal(self.n_modes) * sigma, -CLIP_SIGMAS * sigma, CLIP_SIGMAS * sigma)


def similarity_align(points: np.ndarray, target: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """``points`` (N, 3) moved by the rotation, uniform scale and translation that best fit them to ``target``
    (N, 3) in the least-squares sense (Umeyama), optionally weighted per point. Returns a new float64 array."""
    scale, rotation, translation = similarity_fit(points, target, weights)
    return scale * np.asarray(points, np.float64) @ rotation.T + translation


def similarity_fit(
    source: np.ndarray, target: np.ndarray, weights: Optional[np.ndarray] = None
) -> Tuple[float, np.ndarray, np.ndarray]:
    """(scale, rotation (3, 3), translation (3,)) minimising sum w |s R source + t - target|^2 (Umeyama 1991)."""
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s, mu_t = w @ source, w @ target
    a, b = source - mu_s, target - mu_t
    covariance = (b * w[:, None]).T @ a
    u, singular, vt = np.linalg.svd(covariance)
    flip = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        flip[-1] = -1.0
    rotation = u @ np.diag(flip) @ vt
    variance = float((w * (a**2).sum(1)).sum())
    scale = float((singular * flip).sum() / variance) if variance > 0 else 1.0
    return scale, rotation, mu_t - scale * rotation @ mu_s


def load_face_prior(path: Optional[str | Path] = None) -> FacePrior:
    """Read and verify the face prior (default: the shipped file); cached per path. Raises InputError when the
    file or its JSON card is missing, or the file's sha256 is not the card's."""
    file = Path(path) if path is not None else DEFAULT_PRIOR
    # The file's size and time are part of the key, so a file replaced in place is read (and verified) again.
    stamp = (file.stat().st_size, file.stat().st_mtime_ns) if file.is_file() else None
    return _load(str(file), stamp)


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp: Optional[Tuple[int, int]]) -> FacePrior:
    from safetensors.numpy import load_file

    from .model import file_sha256

    file = Path(path)
    card_path = file.with_suffix(".json")
    if not file.is_file() or not card_path.is_file():
        raise InputError(f"face prior not found: {file} (and its .json card beside it)")
    try:
        card = json.loads(card_path.read_text())
        expected = card["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{card_path.name}: not a valid face-prior card ({type(error).__name__}: {error})") from None
    sha256 = file_sha256(file)
    if sha256 != expected:
        raise InputError(f"face prior {file.name} does not match the sha256 in {card_path.name}")
    arrays = load_file(str(file))
    return FacePrior(
        mean=arrays["mean"].astype(np.float64),
        modes=arrays["modes"].astype(np.float64),
        triangles=arrays["triangles"].astype(np.int64),
        eyes=arrays["eyes"].astype(np.int64),
        eye_radius_mm=float(card["eye_radius_mm"]),
        face_weight=arrays["face_weight"].astype(np.float64),
        landmarks=arrays["landmarks"].astype(np.int64),
        reference=arrays["reference"],
        reference_origin=(
            float(card["reference_origin"][0]),
            float(card["reference_origin"][1]),
            float(card["reference_origin"][2]),
        ),
        reference_spacing=float(card["reference_spacing"]),
        sha256=sha256,
        card=card,
    )
