"""The evaluation run: de-identify every scan with every method, attack the outputs, check the controls.

Scans are the image files of one folder. Files whose names share the prefix before the first ``_`` are the
same person (``S06_..._ser5`` and ``S06_..._ser6``); a prefix starting with ``T`` marks a template (an
average head): templates join the gallery as distractors and are the negative control's probes, and are not
de-identified. A folder without a template (a user's own scans) gets the shipped average head (pydeface's
mean head, the one ``reface`` and the demo use) in that role. Work files (brain masks, outputs, timings) go to ``OUT/work`` and are reused when present,
so an interrupted run resumes.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import render
from ..errors import InputError
from ..reader import IMAGE_SUFFIXES, image_like, image_stem, read_volume
from . import attacks, fidelity, report

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Scan:
    """One input file: ``name`` is its file name without the image suffix."""

    name: str
    path: Path
    person: str
    template: bool


def discover(data_dir: Path) -> list[Scan]:
    """The readable image files directly in ``data_dir`` (sorted by name), with person and template flags."""
    scans = []
    for path in sorted(Path(data_dir).iterdir()):
        if not path.name.lower().endswith(IMAGE_SUFFIXES) or path.is_dir() or path.name.startswith("."):
            continue
        name = image_stem(path)
        person = name.split("_")[0]
        scans.append(Scan(name, path, person, person.upper().startswith("T")))
    if not any(not scan.template for scan in scans):
        raise InputError(f"{data_dir}: no scan to de-identify (only templates, or no image files)")
    return scans


# The shipped average head's name in the gallery and the report when the data brings no template.
SHIPPED_TEMPLATE = "T00_shipped_average_head"


def with_template(scans: list[Scan]) -> list[Scan]:
    """``scans``, plus the shipped average head as a template when none of them is one: the average-face
    control and a distractor for any folder of scans."""
    if any(scan.template for scan in scans):
        return scans
    from ..template import HEAD_FILE, template_dir

    return [*scans, Scan(SHIPPED_TEMPLATE, template_dir() / HEAD_FILE, SHIPPED_TEMPLATE.split("_")[0], True)]


# --- de-identification, in child processes (their peak memory is the method's) -------------------------


def _brain_mask_worker(jobs: list[tuple[str, str]], device: str) -> None:
    from ..brainmask import extract_brain_mask

    for scan_path, mask_path in jobs:
        image = read_volume(Path(scan_path)).image
        mask = image_like(extract_brain_mask(image, device).astype(np.uint8), image)
        sitk.WriteImage(mask, mask_path, True)


def _method_worker(method: str, jobs: list[tuple[str, str, str]], seed: int, device: str) -> None:
    """De-identify each scan; beside each output ``.nii.gz`` write ``.json`` (runtime, peak RSS, error)
    as soon as it is done, so that an interrupted run resumes scan by scan."""
    from ..pipeline import deidentify

    for scan_path, mask_path, out_path in jobs:
        record = Path(out_path.replace(".nii.gz", ".json"))
        image = read_volume(Path(scan_path)).image
        start = time.perf_counter()
        try:
            result = deidentify(image, method, brain_mask=sitk.ReadImage(mask_path), seed=seed, device=device)
        except Exception as error:  # noqa: BLE001 (a failing method is a finding of the report)
            record.write_text(json.dumps({"error": f"{type(error).__name__}: {error}".splitlines()[0]}))
            continue
        runtime = time.perf_counter() - start
        sitk.WriteImage(result.image, out_path, True)
        sitk.WriteImage(result.brain_mask, out_path.replace(".nii.gz", "_copied.nii.gz"), True)
        # ru_maxrss is the process's peak so far (kB on Linux): an upper bound for this scan.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        record.write_text(json.dumps({"runtime_s": runtime, "peak_rss_mb": peak, "error": None}))


def _in_child(function, *args):
    """Run ``function(*args)`` in a fresh process (spawned: no copy of this process's memory or GL state)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --- what the attackers see of one head ---------------------------------------------------------------


@dataclass
class Head:
    """A head as the attacks see it. For an output, ``view``, ``frame`` and ``threshold`` are its original's.
    ``face_confidence``: the CNN detector's confidence on the frontal render (NaN: no face), for realism."""

    threshold: float
    view: render.FaceView
    frame: attacks.HeadFrame
    probe: attacks.FaceEmbedding
    regions: dict[str, np.ndarray]
    thumbnail: np.ndarray
    gallery: attacks.FaceEmbedding | None = None
    targets: dict[str, attacks.Target] = field(default_factory=dict)
    face_confidence: float = float("nan")

    @property
    def face_detected(self) -> bool:
        return attacks.face_detected(self.face_confidence)

    def gallery_embedding(self) -> attacks.FaceEmbedding:
        """The frontal embedding an original joins the gallery with (a de-identified output has none)."""
        if self.gallery is None:
            raise ValueError("only an original head has a gallery embedding")
        return self.gallery


def original_head(image: sitk.Image, size: int, seed: int = 0) -> Head:
    """Gallery and probe features of an original scan at its own skin threshold."""
    threshold = render.skin_threshold(image)
    surface = render.skin_surface(image, threshold)
    view = render.face_view(surface, image)
    frame = attacks.head_frame(surface, image, view)
    frontal = _render(surface, view, attacks.GALLERY_POSE, size)
    gallery = attacks.embed_face(frontal)
    head = _probe(surface, threshold, view, frame, gallery.box, size, seed)
    head.gallery = gallery
    head.thumbnail = _thumbnail(frontal)
    head.face_confidence = attacks.detect_face(frontal)  # realism is judged on the gallery's picture
    head.targets = {
        region.name: attacks.Target(
            attacks.subsample(
                attacks.region_points(surface, frame, region, attacks.TARGET_MARGIN_MM), attacks.TARGET_POINTS, seed + 1
            ),
            frame,
        )
        for region in attacks.REGIONS
    }
    return head


def output_head(image: sitk.Image, original: Head, size: int, seed: int = 0) -> Head:
    """Probe features of a de-identified scan, seen as its original was (same threshold, camera, regions)."""
    try:
        surface = render.skin_surface(image, original.threshold)
    except ValueError:  # nothing left above the skin level: the attackers see an empty picture
        blank = np.zeros((size, size, 3), np.uint8)
        return Head(
            original.threshold,
            original.view,
            original.frame,
            attacks.embed_face(blank, original.gallery_embedding().box),
            {region.name: np.zeros((0, 3)) for region in attacks.REGIONS},
            _thumbnail(blank),
        )
    head = _probe(
        surface, original.threshold, original.view, original.frame, original.gallery_embedding().box, size, seed
    )
    frontal = _render(surface, original.view, attacks.GALLERY_POSE, size)
    head.thumbnail = _thumbnail(frontal)
    head.face_confidence = attacks.detect_face(frontal)  # as its original's, at the same pose and size
    return head


def _probe(surface, threshold, view, frame, fallback_box, size, seed) -> Head:
    picture = _render(surface, view, attacks.PROBE_POSE, size)
    regions = {
        region.name: attacks.subsample(attacks.region_points(surface, frame, region), attacks.PROBE_POINTS, seed)
        for region in attacks.REGIONS
    }
    return Head(threshold, view, frame, attacks.embed_face(picture, fallback_box), regions, np.zeros(0))


def _render(surface, view, pose, size) -> np.ndarray:
    yaw, pitch, azimuth, elevation = pose
    return render.render_surface(surface, view, render.Shot(yaw, pitch, (azimuth, elevation), size))


def _thumbnail(picture: np.ndarray, size: int = 192) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(picture).resize((size, size), Image.Resampling.BILINEAR))


def distances(probe: Head, gallery: list[Head]) -> dict[str, np.ndarray]:
    """Distances from ``probe`` to every gallery head: "2d" (embedding, Euclidean) and one per ICP region."""
    rows = {"2d": np.array([np.linalg.norm(probe.probe.vector - g.gallery_embedding().vector) for g in gallery])}
    for region in attacks.REGIONS:
        rows[region.name] = np.array(
            [
                attacks.icp_distance(probe.regions[region.name], probe.frame, g.targets[region.name], region.mode)
                for g in gallery
            ]
        )
    return rows


# --- the run -----------------------------------------------------------------------------------------


def evaluate(
    data_dir: Path,
    methods: list[str],
    out_dir: Path,
    *,
    size: int = attacks.RENDER_SIZE,
    run_fidelity: bool = True,
    fidelity_spacing_mm: float = fidelity.ANALYSIS_SPACING_MM,
    seed: int = 0,
    device: str = "auto",
    progress: Progress = print,
) -> tuple[Path, bool]:
    """Run the whole evaluation and write the report into ``out_dir``.

    ``device`` is one of ``devices.DEVICE_CHOICES``, resolved here once for every child process.
    Returns the Markdown summary's path and whether the controls passed."""
    from ..devices import resolve_device
    from ..methods import method_names

    device = str(resolve_device(device))
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(method_names())}")
    scans = with_template(discover(data_dir))
    real = [scan for scan in scans if not scan.template]
    work = Path(out_dir) / "work"
    (work / "brainmasks").mkdir(parents=True, exist_ok=True)

    masks = {scan.name: work / "brainmasks" / f"{scan.name}.nii.gz" for scan in real}
    todo = [(str(scan.path), str(masks[scan.name])) for scan in real if not masks[scan.name].is_file()]
    if todo:
        progress(f"brain masks for {len(todo)} scans")
        _in_child(_brain_mask_worker, todo, device)

    runs: dict[tuple[str, str], dict] = {}
    for method in methods:
        folder = work / "outputs" / method
        folder.mkdir(parents=True, exist_ok=True)
        pending = [scan for scan in real if not (folder / f"{scan.name}.json").is_file()]
        if pending:
            progress(f"{method}: de-identifying {len(pending)} scans")
            jobs = [(str(s.path), str(masks[s.name]), str(folder / f"{s.name}.nii.gz")) for s in pending]
            _in_child(_method_worker, method, jobs, seed, device)
        for scan in real:
            runs[method, scan.name] = json.loads((folder / f"{scan.name}.json").read_text())

    progress(f"originals: rendering and embedding {len(scans)} heads")
    images = {}
    heads = []
    for scan in scans:
        image = read_volume(scan.path).image
        heads.append(original_head(image, size, seed))
        if not scan.template:
            images[scan.name] = image
    names = [scan.name for scan in scans]
    persons = np.array([scan.person for scan in scans])
    index = {name: i for i, name in enumerate(names)}

    probes: list[attacks.Probe] = []
    original_rows = {scan.name: distances(heads[index[scan.name]], heads) for scan in scans}
    for scan in real:
        i = index[scan.name]
        same = persons == scan.person
        own = np.arange(len(scans)) == i
        probes.append(
            attacks.Probe(
                "control: re-render",
                scan.name,
                original_rows[scan.name],
                own,
                ~same | own,
                {"detected": heads[i].face_detected, "face_confidence": heads[i].face_confidence},
            )
        )
        if same.sum() > 1:
            probes.append(attacks.Probe("control: same person", scan.name, original_rows[scan.name], same & ~own, ~own))
    for template in (scan for scan in scans if scan.template):
        t = index[template.name]
        for scan in real:
            # The claimed identity's gallery, as for a method's probe of that scan, minus the template itself.
            own = np.arange(len(scans)) == index[scan.name]
            allowed = (~(persons == scan.person) | own) & (np.arange(len(scans)) != t)
            probes.append(
                attacks.Probe(
                    "control: average face", f"{template.name}->{scan.name}", original_rows[template.name], own, allowed
                )
            )

    analyses: dict[str, fidelity.Analysis] = {}

    def downstream(scan: Scan, output: sitk.Image, method: str) -> dict:
        """The fidelity row of one output, cached in the work folder (the originals analysed on demand)."""
        cached = work / "outputs" / method / f"{scan.name}_fidelity_{fidelity_spacing_mm:g}mm.json"
        if not cached.is_file():
            if scan.name not in analyses:
                analyses[scan.name] = fidelity.analyse(images[scan.name], fidelity_spacing_mm, seed)
            row = fidelity.compare(analyses[scan.name], fidelity.analyse(output, fidelity_spacing_mm, seed))
            cached.write_text(json.dumps({**row, "original_error": analyses[scan.name].error}))
        return json.loads(cached.read_text())

    thumbnails: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for method in methods:
        progress(f"{method}: attacking {len(real)} outputs" + (" and analysing them" if run_fidelity else ""))
        thumbnails[method] = []
        for scan in real:
            i = index[scan.name]
            run = runs[method, scan.name]
            facts = {"runtime_s": run.get("runtime_s"), "peak_rss_mb": run.get("peak_rss_mb"), "error": run["error"]}
            if run["error"] is not None:
                probes.append(attacks.Probe(method, scan.name, {}, np.zeros(0, bool), np.zeros(0, bool), facts))
                continue
            out_path = work / "outputs" / method / f"{scan.name}.nii.gz"
            output = sitk.ReadImage(str(out_path))
            copied = sitk.GetArrayFromImage(sitk.ReadImage(str(out_path).replace(".nii.gz", "_copied.nii.gz"))) > 0
            facts.update(exactness(images[scan.name], output, copied))
            head = output_head(output, heads[i], size, seed)
            # Realism as issue 10 words it: is a face found in the output where its original showed one?
            facts["detected"] = head.face_detected
            facts["face_confidence"] = head.face_confidence
            facts["original_detected"] = heads[i].face_detected
            facts["embedding"] = head.probe.vector
            if run_fidelity:
                facts.update(downstream(scan, output, method))
            same = persons == scan.person
            own = np.arange(len(scans)) == i
            probes.append(attacks.Probe(method, scan.name, distances(head, heads), own, ~same | own, facts))
            thumbnails[method].append((scan.name, heads[i].thumbnail, head.thumbnail))

    originals = {scan.name: heads[index[scan.name]].probe.vector for scan in real}
    return report.write(
        Path(out_dir),
        probes,
        methods,
        originals,
        thumbnails,
        n_gallery=len(scans),
        n_templates=len(scans) - len(real),
        data_dir=Path(data_dir),
        shipped_template=any(scan.name == SHIPPED_TEMPLATE for scan in scans),
        fidelity_failures={p.scan: p.facts["original_error"] for p in probes if p.facts.get("original_error")},
    )


def exactness(original: sitk.Image, output: sitk.Image, copied: np.ndarray) -> dict:
    """``grid_equal``: same size, spacing, origin, direction and pixel type; ``brain_exact``: every voxel of
    the copied region (KJI bool) bit-identical; ``changed_fraction``: share of voxels that differ at all."""
    grid = (
        original.GetSize() == output.GetSize()
        and original.GetPixelID() == output.GetPixelID()
        and np.allclose(original.GetSpacing(), output.GetSpacing(), atol=1e-6)
        and np.allclose(original.GetOrigin(), output.GetOrigin(), atol=1e-4)
        and np.allclose(original.GetDirection(), output.GetDirection(), atol=1e-6)
    )
    if not grid:
        return {"grid_equal": False, "brain_exact": False, "changed_fraction": float("nan")}
    a, b = sitk.GetArrayViewFromImage(original), sitk.GetArrayViewFromImage(output)
    return {
        "grid_equal": True,
        "brain_exact": bool(copied.any() and np.array_equal(a[copied], b[copied])),
        "changed_fraction": float(np.mean(a != b)),
    }
