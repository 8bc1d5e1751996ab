"""Re-identification attacks on skin surfaces: a 2-D face recogniser (dlib) on renders, and 3-D ICP matching.

Both attackers compare a *probe* (a de-identified head, or a control) with a *gallery* of original heads
and rank the gallery by distance. :func:`rank_scores` turns those distances into rank-1, mean rank and AUC.

- 2-D: gallery rendered frontally, probes at a slightly different pose and light (``GALLERY_POSE``,
  ``PROBE_POSE``); dlib's 128-d face embedding inside the face box of dlib's HOG detector, or inside the
  original's face box when no face is detected (a failed detection never counts as privacy).
- 3-D: the probe's skin points in a region around the original's nose tip are aligned to each original's
  skin by ICP; the trimmed RMS distance ranks the gallery. A similarity ICP on the facial features
  (nose, eyes, mouth, chin) is the identity attack; a rigid ICP on a large region (forehead to chin) measures
  how much head shape leaks (``FEATURES`` and ``LARGE``).

Realism, not an attack: :func:`detect_face`, dlib's CNN (MMOD) face detector on the frontal render.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from .. import render

# (yaw deg, pitch deg, light azimuth deg, light elevation deg): probes differ in pose and light from the gallery.
GALLERY_POSE = (0.0, 0.0, 15.0, 20.0)
PROBE_POSE = (4.0, -3.0, -30.0, 5.0)
RENDER_SIZE = 512
# The 2-D attack's face box: dlib's HOG detector's best box when it scores above EMBED_SCORE, else the
# original's box. The box stays HOG's, not the CNN's below: the CNN rightly finds no face on the partial
# fields of view (6 of the 11 real shared heads), so their gallery embeddings would be taken in a blind
# centred box and the re-render control fell to rank-1 0.55 (6 of 11) on the shared heads, where HOG's box
# gives 1.00. A CNN box first and HOG's as a second choice passed the controls (0.91) but made no method
# easier to identify (remodel 0.18 instead of 0.27, reface 0.18 instead of 0.09, deface 0.00 both ways) for
# ~2 s more per probe. The fallback keeps a missed detection from ever counting as privacy either way.
EMBED_SCORE = -0.5
# Realism ("face detected"): dlib's CNN (MMOD) face detector on the frontal render (GALLERY_POSE), no
# upsampling, a face when its best detection's confidence exceeds DETECT_CONFIDENCE. Chosen on the shared
# heads' originals at 192-512 px: every whole face (S01 sagittal, S04, S05, both S06, templates T01, T02)
# scores 0.64-1.14; fields of view that end at the eyes or the nose (S01 conformed, S03, S11, S12, S13, T03,
# T05, T07) and the back of every head give no detection at all, except S01 mricron (cut at the nose tip)
# at 0.06-0.10: 0.5 lies mid-gap. No upsampling: the face fills half the render (boxes of 280-340 px at
# 512 px; the detector's window is ~80 px), and one upsampling quadruples the time (1.6 -> 6.5 s a 512 px
# image on one CPU thread) without finding a face more. The probe pose is not used: its grazing light from
# the other side makes the CNN miss S04 and S05, two whole faces, at 512 px. Not HOG (score > 0, the
# previous measure): it finds "faces" where there are none, in 3 of the 11 defaced outputs (probe pose) and
# in the frontal renders of S11 (eyes and up) and T05 (cut at the nose); the CNN fires on none of them.
DETECT_UPSAMPLE = 0
DETECT_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Region:
    """A box in the head's frame around the nose tip (mm): ``lateral`` half-width, ``below``/``above`` the
    tip along superior, ``depth`` behind the tip along anterior; ``mode`` is the ICP's landmark transform."""

    name: str
    lateral: float
    below: float
    above: float
    depth: float
    mode: str


# From the privacy-evaluation notes: the feature region with scale allowed defeats affine average-head
# replacement's head-size cue; the large rigid region shows that cue (a head-shape leak).
FEATURES = Region("features", lateral=45.0, below=60.0, above=35.0, depth=35.0, mode="similarity")
LARGE = Region("large", lateral=75.0, below=90.0, above=75.0, depth=90.0, mode="rigid")
REGIONS = (FEATURES, LARGE)
# Every attack a probe faces: the 2-D face recogniser, then the 3-D surface match in each region.
ATTACKS = ("2d",) + tuple(region.name for region in REGIONS)
# Probe points per region, target points per original (its region grown by TARGET_MARGIN_MM so that an
# aligned probe always finds skin beneath it): enough for sub-millimetre RMS, fast enough for ~3000 pairs.
PROBE_POINTS = 1500
TARGET_POINTS = 20000
TARGET_MARGIN_MM = 25.0
_TRIM = 0.9  # keep the closest 90 % of probe points: the probe's region edge need not exist in the target
_MIN_POINTS = 100
# Overall scale a similarity ICP may apply: adult heads differ by well under 15 % in size, and without a
# bound the closest-point objective shrinks the probe towards a point (distance 0 to any target).
SCALE_RANGE = (0.85, 1.15)


@dataclass
class HeadFrame:
    """A head's anatomical frame in physical LPS mm: ``axes`` rows are lateral (to the subject's left),
    anterior, superior; ``nose`` is the most anterior skin point near the face's midline."""

    axes: np.ndarray
    nose: np.ndarray

    def local(self, points: np.ndarray) -> np.ndarray:
        """Points (N, 3) LPS mm -> (lateral, anterior, superior) mm relative to the nose tip."""
        return (points - self.nose) @ self.axes.T


def head_frame(surface, image: sitk.Image, view: render.FaceView) -> HeadFrame:
    """The frame of a head from its skin surface (``render.skin_surface``) and face view."""
    from vtk.util.numpy_support import vtk_to_numpy

    anterior, superior = view.anterior, view.superior
    lateral = np.cross(superior, anterior)
    points = vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    offset = (points - view.centre) @ lateral
    near_midline = points[np.abs(offset) < 30.0]
    if len(near_midline) == 0:
        near_midline = points
    nose = near_midline[np.argmax(near_midline @ anterior)]
    return HeadFrame(axes=np.stack([lateral, anterior, superior]), nose=nose)


def region_points(surface, frame: HeadFrame, region: Region, margin_mm: float = 0.0) -> np.ndarray:
    """Skin points (LPS mm) of ``surface`` inside ``region`` of ``frame``, grown by ``margin_mm``."""
    from vtk.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(surface.GetPoints().GetData()).astype(np.float64)
    local = frame.local(points)
    inside = (
        (np.abs(local[:, 0]) < region.lateral + margin_mm)
        & (local[:, 2] > -region.below - margin_mm)
        & (local[:, 2] < region.above + margin_mm)
        & (local[:, 1] > -region.depth - margin_mm)
    )
    return points[inside]


def subsample(points: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """At most ``count`` of ``points``, chosen at random with ``seed`` (the same seed, the same subset)."""
    if len(points) <= count:
        return points
    return points[np.random.default_rng(seed).choice(len(points), count, replace=False)]


class Target:
    """An original's skin points (LPS mm) in its head frame, with a k-d tree for closest-point queries."""

    def __init__(self, points: np.ndarray, frame: HeadFrame):
        self.points = points
        self.frame = frame
        self.tree = cKDTree(points) if len(points) else None


def icp_distance(probe: np.ndarray, probe_frame: HeadFrame, target: Target, mode: str, iterations: int = 40) -> float:
    """Trimmed RMS distance (mm) from ``probe`` points (LPS mm) to ``target`` after ICP alignment.

    Starts from the two heads' frames superimposed at the nose tips; each iteration pairs every probe point
    with its closest target point, keeps the closest 90 % (the probe's region edge need not exist in the
    target) and solves the rigid or similarity (``mode``) fit in closed form (Umeyama). NaN when either side
    has too few points. A k-d tree ICP here: VTK's vtkIterativeClosestPointTransform took 1-2 s per pair
    (its cell locator), and a report needs thousands of pairs.
    """
    if len(probe) < _MIN_POINTS or len(target.points) < _MIN_POINTS:
        return float("nan")
    tree = target.tree
    assert tree is not None  # a target with points has its tree
    rotation = target.frame.axes.T @ probe_frame.axes
    moved = (probe - probe_frame.nose) @ rotation.T + target.frame.nose
    keep = max(_MIN_POINTS, int(_TRIM * len(moved)))
    previous = np.inf
    total_scale = 1.0
    for _ in range(iterations):
        distances, index = tree.query(moved)
        order = np.argsort(distances)[:keep]
        rms = float(np.sqrt(np.mean(distances[order] ** 2)))
        if previous - rms < 1e-3:
            break
        previous = rms
        bounds = (SCALE_RANGE[0] / total_scale, SCALE_RANGE[1] / total_scale) if mode == "similarity" else (1.0, 1.0)
        scale, turn, shift = _umeyama(moved[order], target.points[index[order]], bounds)
        total_scale *= scale
        moved = scale * moved @ turn.T + shift
    distances, _ = tree.query(moved)
    return float(np.sqrt(np.mean(np.sort(distances)[:keep] ** 2)))


def _umeyama(
    source: np.ndarray, target: np.ndarray, scale_bounds: tuple[float, float]
) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares (scale, rotation, translation) mapping ``source`` onto ``target`` (Umeyama 1991), the
    scale clipped to ``scale_bounds`` ((1, 1) for a rigid fit)."""
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    a, b = source - mean_s, target - mean_t
    u, sigma, vt = np.linalg.svd(b.T @ a / len(a))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    turn = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign) / np.mean(np.sum(a**2, axis=1)))
    scale = float(np.clip(scale, *scale_bounds))
    return scale, turn, mean_t - scale * turn @ mean_s


@dataclass
class FaceModels:
    """dlib's HOG face detector, 5-point landmarks and ResNet face embedding for the 2-D attack, and its CNN
    (MMOD) face detector for realism (all from face-recognition-models; the 5-point model is made for the
    boxes of either detector)."""

    detector: Any
    landmarks: Any
    encoder: Any
    cnn_detector: Any


@functools.lru_cache(maxsize=1)
def face_models() -> FaceModels:
    """Load dlib's models once per process; a clear error names the 'eval' extra when they are missing."""
    try:
        import dlib
    except ImportError as error:
        raise RuntimeError("the 2-D attack needs dlib: pip install 'mrideidentify[eval]' (dlib-bin)") from error
    # face_recognition_models' __init__ imports pkg_resources, gone from recent setuptools: find its files.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 2-D attack needs dlib's models: pip install face-recognition-models")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    return FaceModels(
        detector=dlib.get_frontal_face_detector(),
        landmarks=dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
        encoder=dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")),
        cnn_detector=dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat")),
    )


def detect_face(picture: np.ndarray) -> float:
    """Confidence of the best face dlib's CNN detector finds in ``picture`` (uint8 RGB), NaN when it finds
    none; a face counts as detected above :data:`DETECT_CONFIDENCE` (:func:`face_detected`). About 0.6 s a
    320 px picture and 1.6 s a 512 px one on one CPU thread."""
    found = face_models().cnn_detector(np.ascontiguousarray(picture), DETECT_UPSAMPLE)
    return max((float(d.confidence) for d in found), default=float("nan"))


def face_detected(confidence: float) -> bool:
    """Whether a :func:`detect_face` confidence counts as a face (NaN, nothing found: no)."""
    return bool(confidence > DETECT_CONFIDENCE)


@dataclass
class FaceEmbedding:
    """One render's face: the 128-d embedding, the box it was taken in (left, top, right, bottom pixels),
    the detector's best score (-inf when nothing was found) and whether the box came from the detector."""

    vector: np.ndarray
    box: tuple[int, int, int, int]
    score: float
    detected: bool


def embed_face(picture: np.ndarray, fallback_box: tuple[int, int, int, int] | None = None) -> FaceEmbedding:
    """dlib embedding of the face in ``picture`` (uint8 RGB). Without a trusted detection the embedding is
    taken inside ``fallback_box`` (the original's face box), or a centred box covering 60 % of the picture."""
    import dlib

    models = face_models()
    boxes, scores, _ = models.detector.run(picture, 1, -1.5)
    best = int(np.argmax(scores)) if len(scores) else -1
    score = float(scores[best]) if best >= 0 else float("-inf")
    if best >= 0 and score > EMBED_SCORE:
        found = boxes[best]
        box = (found.left(), found.top(), found.right(), found.bottom())
        detected = True
    else:
        height, width = picture.shape[:2]
        box = fallback_box or (int(0.2 * width), int(0.2 * height), int(0.8 * width), int(0.8 * height))
        detected = False
    rectangle = dlib.rectangle(*box)
    shape = models.landmarks(picture, rectangle)
    vector = np.asarray(models.encoder.compute_face_descriptor(picture, shape, 0), dtype=np.float64)
    return FaceEmbedding(vector=vector, box=box, score=score, detected=detected)


@dataclass
class RankScores:
    """Identification results over a set of probes (see :func:`rank_scores`)."""

    n: int
    rank1: float
    rank1_low: float
    rank1_high: float
    chance: float
    mean_rank: float
    auc: float
    ranks: np.ndarray


def probe_rank(distances: np.ndarray, genuine: np.ndarray, allowed: np.ndarray) -> tuple[float, float, float]:
    """Rank of the genuine gallery entries for one probe.

    ``distances`` (N,), ``genuine`` and ``allowed`` bool (N,): the gallery is the allowed entries; the rank is
    that of the best genuine entry, ties shared (mean rank), NaN distances (no match possible) last and tied.
    Returns (rank, rank-1 credit in [0, 1], chance of rank 1 = genuine count / gallery size).
    """
    d = np.where(np.isnan(distances), np.inf, distances)[allowed]
    g = genuine[allowed]
    best = d[g].min()
    better = int(np.sum(d[~g] < best))
    tied = int(np.sum(d[~g] == best)) + int(np.sum(d[g] == best))
    # Tied entries share the positions better+1 .. better+tied; genuine ones among them win rank 1 by lot.
    rank = better + (tied + 1) / 2.0
    credit = 0.0 if better else float(np.sum(d[g] == best)) / tied
    return rank, credit, float(g.sum()) / float(len(d))


def rank_scores(
    distance_rows: list[np.ndarray], genuine_rows: list[np.ndarray], allowed_rows: list[np.ndarray]
) -> RankScores:
    """Rank-1 rate with a 95 % Wilson interval and chance level, mean rank, and the AUC of genuine versus
    impostor distances pooled over all probes (1 = every genuine closer than every impostor, 0.5 = chance)."""
    results = [probe_rank(d, g, a) for d, g, a in zip(distance_rows, genuine_rows, allowed_rows)]
    n = len(results)
    if n == 0:
        nan = float("nan")
        return RankScores(0, nan, nan, nan, nan, nan, nan, np.zeros(0))
    ranks = np.array([r[0] for r in results])
    hits = float(sum(r[1] for r in results))
    low, high = wilson_interval(hits, n)
    genuine_d = np.concatenate(
        [np.where(np.isnan(d), np.inf, d)[g & a] for d, g, a in zip(distance_rows, genuine_rows, allowed_rows)]
    )
    impostor_d = np.concatenate(
        [np.where(np.isnan(d), np.inf, d)[~g & a] for d, g, a in zip(distance_rows, genuine_rows, allowed_rows)]
    )
    return RankScores(
        n=n,
        rank1=hits / n,
        rank1_low=low,
        rank1_high=high,
        chance=float(np.mean([r[2] for r in results])),
        mean_rank=float(ranks.mean()),
        auc=auc(genuine_d, impostor_d),
        ranks=ranks,
    )


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``successes / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Probability that a genuine distance is smaller than an impostor one (ties count half)."""
    if len(genuine) == 0 or len(impostor) == 0:
        return float("nan")
    smaller = (genuine[:, None] < impostor[None, :]).sum()
    equal = (genuine[:, None] == impostor[None, :]).sum()
    return float((smaller + 0.5 * equal) / (len(genuine) * len(impostor)))


@dataclass
class Probe:
    """One attacked head: which set it belongs to (a method or a control), its source scan, distances to the
    gallery per attack (:data:`ATTACKS`), which gallery entries are genuine and which are in its gallery, and
    per-scan facts."""

    group: str
    scan: str
    distances: dict[str, np.ndarray]
    genuine: np.ndarray
    allowed: np.ndarray
    facts: dict = field(default_factory=dict)
