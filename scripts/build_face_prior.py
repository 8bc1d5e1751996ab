"""Build the face prior shipped with the engine (``MRIDeIdentifyLib/weights/faceprior.safetensors`` + JSON card).

    python scripts/build_face_prior.py [--ict ../shared/data/ict-facekit] [--modes 60]

Reads the ICT Face Model Light arrays (MIT; see their README and LICENSE) and writes what ``faceprior.py`` loads:
the closed skin surface of face, head and neck (eye openings, mouth slit and neck cut closed by centroid fans),
the eyeballs as two spheres, the mean and the first K identity modes (float16, LPS mm), landmarks, a per-vertex
face weight, and a reference gamma (an average head's hull and brain) in the prior's frame for placement.

K is chosen by measurement: with K = 60 the modes left out move a sampled (sigma 1) skin by 0.75 mm RMS, under a
1 mm voxel, and the kept ones hold 99 % of the identity variance (figures printed by the script).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MRIDeIdentify"))

# Vertex ranges of the ICT mesh (its README): face and head/neck form the skin; the eyeballs are sclera + iris,
# left then right.
SKIN_VERTICES = 11248
NARROW_FACE = 6706
EYEBALLS = (21451, 24591)
LANDMARKS = [
    1225,
    1888,
    1052,
    367,
    1719,
    1722,
    2199,
    1447,
    966,
    3661,
    4390,
    3927,
    3924,
    2608,
    3272,
    4088,
    3443,
    268,
    493,
    1914,
    2044,
    1401,
    3615,
    4240,
    4114,
    2734,
    2509,
    978,
    4527,
    4942,
    4857,
    1140,
    2075,
    1147,
    4269,
    3360,
    1507,
    1542,
    1537,
    1528,
    1518,
    1511,
    3742,
    3751,
    3756,
    3721,
    3725,
    3732,
    5708,
    5695,
    2081,
    0,
    4275,
    6200,
    6213,
    6346,
    6461,
    5518,
    5957,
    5841,
    5702,
    5711,
    5533,
    6216,
    6207,
    6470,
    5517,
    5966,
]
# The face keeps the prior's shape; the weight falls to 0 over this distance (mm) beyond the narrow face area,
# where placement bends the cranium onto the scan's hull.
FACE_FALLOFF_MM = 60.0
EYE_BULGE_MM = 2.5
REFERENCE_SIZE = 64


def to_lps_mm(points: np.ndarray) -> np.ndarray:
    """ICT axes (x left, y up, z forward; cm) -> LPS mm."""
    return np.stack([points[..., 0], -points[..., 2], points[..., 1]], -1) * 10.0


def closed_skin(faces: np.ndarray):
    """Outward triangles of the skin and, per border loop, its vertices in order (for the centroid fans)."""
    quads = faces[faces.max(1) < SKIN_VERTICES]
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    directed = {}
    for t in triangles:
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            directed[(a, b)] = True
    border = [(a, b) for (a, b) in directed if (b, a) not in directed]
    following = {b: a for a, b in border}  # walk each loop against the triangles' direction
    loops, seen = [], set()
    for start in following:
        if start in seen:
            continue
        loop, vertex = [], start
        while vertex not in seen:
            seen.add(vertex)
            loop.append(vertex)
            vertex = following[vertex]
        loops.append(loop)
    return triangles, loops


def build(ict: Path, n_modes: int) -> tuple[dict, dict]:
    data = np.load(ict / "ict_face_model_light.npz")
    neutral = data["neutral"].astype(np.float64)
    targets = data["identity_targets"][:n_modes].astype(np.float64)
    modes_all = data["identity_targets"].astype(np.float64) - neutral
    energy = (to_lps_mm(modes_all[:, :SKIN_VERTICES]) ** 2).sum(-1).mean(-1)
    print(
        f"{n_modes} modes: {energy[:n_modes].sum() / energy.sum():.2%} of the identity variance; the rest moves "
        f"a sigma-1 skin by {np.sqrt(energy[n_modes:].sum()):.2f} mm RMS",
        file=sys.stderr,
    )

    triangles, loops = closed_skin(data["faces"])
    mean = to_lps_mm(neutral[:SKIN_VERTICES])
    modes = to_lps_mm(targets[:, :SKIN_VERTICES] - neutral[:SKIN_VERTICES])
    caps = []
    for loop in loops:
        centre = len(mean) + len(caps)
        caps.append(loop)
        # The loop runs against its neighbours' winding, so (a, b, centre) closes it facing outwards.
        triangles = np.concatenate(
            [triangles, [[loop[n], loop[(n + 1) % len(loop)], centre] for n in range(len(loop))]]
        )
    eyes = [np.arange(*EYEBALLS)[:1570], np.arange(*EYEBALLS)[1570:]]
    rows = caps + [list(e) for e in eyes]
    mean = np.concatenate([mean, [to_lps_mm(neutral[r]).mean(0) for r in rows]])
    modes = np.concatenate([modes, np.stack([to_lps_mm(targets[:, r] - neutral[r]).mean(1) for r in rows], 1)], 1)
    eye_rows = np.array([len(mean) - 2, len(mean) - 1])
    # The eyeballs bulge the closed lids by a few millimetres, as closed eyes do: a sphere about the eyeball's
    # centre reaching EYE_BULGE_MM past the centre of the lid opening (whole eyeballs, 14 mm, look like goggles).
    lid_centres = [
        mean[SKIN_VERTICES + c]
        for c in range(len(caps))
        if abs(mean[SKIN_VERTICES + c, 0]) > 10 and mean[SKIN_VERTICES + c, 2] > 0
    ]
    eye_radius = (
        float(np.mean([min(np.linalg.norm(mean[r] - lid) for lid in lid_centres) for r in eye_rows])) + EYE_BULGE_MM
    )
    # The mesh must enclose a positive volume with outward triangles (the voxeliser does not care, distances do).
    a, b, c = (mean[triangles[:, n]] for n in range(3))
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    if volume < 0:
        triangles = triangles[:, ::-1]
    print(
        f"closed skin: {len(mean)} vertices, {len(triangles)} triangles, {len(loops)} openings closed, "
        f"volume {abs(volume) / 1e6:.2f} L, eyeball radius {eye_radius:.1f} mm",
        file=sys.stderr,
    )

    from scipy.spatial import cKDTree

    narrow = cKDTree(mean[:NARROW_FACE])
    distance = narrow.query(mean)[0]
    falloff = np.clip(1.0 - distance / FACE_FALLOFF_MM, 0.0, 1.0)
    face_weight = falloff * falloff * (3.0 - 2.0 * falloff)  # smoothstep: no crease where it ends
    face_weight[len(mean) - 2 - len(caps) :] = 1.0  # caps of eyes and mouth, eyeballs
    neck_cap = len(mean) - 2 - len(caps) + int(np.argmin([mean[loop, 2].mean() for loop in caps]))
    face_weight[neck_cap] = 0.0

    reference, origin, spacing = reference_gamma(mean, triangles)
    arrays = {
        "mean": mean.astype(np.float32),
        "modes": modes.astype(np.float16),
        "triangles": triangles.astype(np.int32),
        "eyes": eye_rows.astype(np.int32),
        "face_weight": face_weight.astype(np.float32),
        "landmarks": np.array(LANDMARKS, np.int32),
        "reference": reference,
    }
    card = {
        "model": "MRIDeIdentify face prior",
        "source": "ICT Face Model Light (ICT-FaceKit, FaceXModel), "
        "commit da5f95a607f5e6b37755b38d3385d7f2853732e5, via shared/data/ict-facekit",
        "licence": (ict / "LICENSE").read_text(),
        "modes": n_modes,
        "vertices": int(len(mean)),
        "eye_radius_mm": eye_radius,
        "reference_origin": [float(v) for v in origin],
        "reference_spacing": spacing,
        "frame": "LPS millimetres (ICT x, -z, y times 10)",
    }
    return arrays, card


def reference_gamma(mean: np.ndarray, triangles: np.ndarray):
    """The average head's gamma (hull 1, dilated brain 2) resampled into the prior frame on a 4 mm cube.

    The mean ICT skin is fitted (similarity ICP) to the average head's skin, then the average head's hull and
    brain, computed exactly as ``remodel`` computes them for a scan, are carried into the prior frame.
    """
    import SimpleITK as sitk
    import torch
    from scipy.spatial import cKDTree

    from MRIDeIdentifyLib.brainmask import dilate_mm, extract_brain_mask
    from MRIDeIdentifyLib.faceprior import similarity_fit
    from MRIDeIdentifyLib.modelinputs import model_inputs
    from MRIDeIdentifyLib.placement import skin_points
    from MRIDeIdentifyLib.modelgrid import ModelGrid
    from MRIDeIdentifyLib.template import load_template

    template = load_template()
    image = template.image
    head = sitk.GetArrayFromImage(template.head) > 0
    brain = dilate_mm(extract_brain_mask(image, torch.device("cpu")), image.GetSpacing()[::-1], 3.0)
    grid = ModelGrid.around(image, head, brain, size=REFERENCE_SIZE)
    inputs = model_inputs(grid.to_model(image), grid.mask_to_model(brain, image), seed=0)
    labels = (inputs.gamma[0] + inputs.gamma[1]).numpy().astype(np.uint8)

    points = skin_points(image, head, step=3)
    tree = cKDTree(points)
    skin = mean[mean[:, 2] > mean[:, 2].min() + 60.0]  # the neck is cut elsewhere in the template
    # Start with the crowns, the midlines and the face fronts together.
    shift = np.array(
        [
            points[:, 0].mean() - skin[:, 0].mean(),
            points[:, 1].min() - skin[:, 1].min(),
            points[:, 2].max() - skin[:, 2].max(),
        ]
    )
    scale, rotation, translation = 1.0, np.eye(3), shift
    for _ in range(60):
        moved = scale * skin @ rotation.T + translation
        distance, index = tree.query(moved)
        keep = distance <= np.percentile(distance, 80)
        scale, rotation, translation = similarity_fit(skin[keep], points[index[keep]])
    moved = scale * skin @ rotation.T + translation
    residual = tree.query(moved)[0]
    print(
        f"mean face on the average head: scale {scale:.3f}, median distance {np.median(residual):.1f} mm",
        file=sys.stderr,
    )

    spacing = 4.0
    # Centred on the head above the neck, whose 10 cm would otherwise push the crown out of the cube.
    head = mean[mean[:, 2] > mean[:, 2].min() + 100.0]
    centre = (head.min(0) + head.max(0)) / 2
    origin = centre - spacing * (REFERENCE_SIZE - 1) / 2
    reference = sitk.Image([REFERENCE_SIZE] * 3, sitk.sitkUInt8)
    reference.SetOrigin(tuple(origin))
    reference.SetSpacing((spacing,) * 3)
    source = sitk.GetImageFromArray(labels)
    source.CopyInformation(grid.reference())
    # prior-frame point p -> average-head point s R p + t
    transform = sitk.Similarity3DTransform()
    transform.SetMatrix(tuple((rotation).ravel()))
    transform.SetScale(scale)
    transform.SetTranslation(tuple(translation))
    carried = sitk.Resample(source, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(carried), origin, spacing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict", type=Path, default=ROOT.parent / "shared" / "data" / "ict-facekit")
    parser.add_argument("--modes", type=int, default=60)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "MRIDeIdentify" / "MRIDeIdentifyLib" / "weights" / "faceprior.safetensors"
    )
    args = parser.parse_args()
    from safetensors.numpy import save_file

    from MRIDeIdentifyLib.model import file_sha256

    arrays, card = build(args.ict, args.modes)
    save_file(arrays, str(args.out))
    card["sha256"] = file_sha256(args.out)
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"{args.out} ({args.out.stat().st_size / 1e6:.1f} MB), sha256 {card['sha256']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
