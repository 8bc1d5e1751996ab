"""The evaluation: rank statistics, ICP matching, exactness checks, fidelity, and a small end-to-end report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from MRIDeIdentifyLib import render
from MRIDeIdentifyLib.reader import image_like, image_stem, read_volume

attacks = pytest.importorskip("MRIDeIdentifyLib.evaluation.attacks")
pytest.importorskip("dlib", reason="the evaluation needs the 'eval' extra (dlib-bin)")


def test_wilson_interval_known_values():
    low, high = attacks.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = attacks.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-3)


def test_probe_rank_ties_nan_and_gallery_exclusion():
    genuine = np.array([True, False, False, False])
    everyone = np.ones(4, bool)
    assert attacks.probe_rank(np.array([0.1, 0.5, 0.7, 0.9]), genuine, everyone) == (1.0, 1.0, 0.25)
    assert attacks.probe_rank(np.array([0.8, 0.5, 0.7, 0.9]), genuine, everyone)[:2] == (3.0, 0.0)
    # No match possible (NaN everywhere): the genuine entry ties with all, expected rank and credit by lot.
    rank, credit, _ = attacks.probe_rank(np.full(4, np.nan), genuine, everyone)
    assert rank == 2.5 and credit == pytest.approx(0.25)
    # An excluded entry (another scan of the same person) neither helps nor hurts.
    allowed = np.array([True, False, True, True])
    assert attacks.probe_rank(np.array([0.6, 0.1, 0.7, 0.9]), genuine, allowed) == (1.0, 1.0, pytest.approx(1 / 3))


def test_rank_scores_auc_and_chance():
    genuine = [np.array([True, False, False]), np.array([False, True, False])]
    allowed = [np.ones(3, bool)] * 2
    perfect = attacks.rank_scores([np.array([0.1, 0.5, 0.6]), np.array([0.5, 0.2, 0.6])], genuine, allowed)
    assert perfect.rank1 == 1.0 and perfect.mean_rank == 1.0 and perfect.auc == 1.0
    assert perfect.chance == pytest.approx(1 / 3)
    worst = attacks.rank_scores([np.array([0.9, 0.5, 0.6]), np.array([0.5, 0.9, 0.6])], genuine, allowed)
    assert worst.rank1 == 0.0 and worst.mean_rank == 3.0 and worst.auc == 0.0


@pytest.fixture(scope="module")
def s06(shared_data):
    heads = {}
    for name in ("S06_dcmqa_xa30_T1w_ser5_2mm", "S06_dcmqa_xa30_T1w_ser6_2mm", "S05_mne_sample_T1_3mm"):
        suffix = ".mgz" if name.startswith("S05") else ".nii.gz"
        image = read_volume(shared_data / "heads" / f"{name}{suffix}").image
        surface = render.skin_surface(image, render.skin_threshold(image))
        view = render.face_view(surface, image)
        heads[name] = (image, surface, attacks.head_frame(surface, image, view))
    return heads


def test_icp_undoes_a_similarity_and_finds_the_same_person(s06):
    image, surface, frame = s06["S06_dcmqa_xa30_T1w_ser5_2mm"]
    region = attacks.FEATURES
    target = attacks.Target(attacks.region_points(surface, frame, region, 25.0), frame)
    probe = attacks.subsample(attacks.region_points(surface, frame, region), 1500, seed=3)
    # The same face moved by 6 degrees, 5 mm and scaled by 1.04 comes back to ~0 mm with a similarity ICP.
    turn = Rotation.from_euler("xyz", [4, -3, 3], degrees=True).as_matrix()
    moved = 1.04 * (probe - frame.nose) @ turn.T + frame.nose + np.array([3.0, -2.0, 3.0])
    assert attacks.icp_distance(moved, frame, target, "similarity") < 0.3
    assert attacks.icp_distance(moved, frame, target, "rigid") > attacks.icp_distance(
        moved, frame, target, "similarity"
    )
    # The second series of the same person is closer than another person's face.
    distances = {}
    for name, (_, other_surface, other_frame) in s06.items():
        if name.endswith("ser5"):
            continue
        distances[name] = attacks.icp_distance(
            attacks.subsample(attacks.region_points(other_surface, other_frame, region), 1500),
            other_frame,
            target,
            region.mode,
        )
    assert distances["S06_dcmqa_xa30_T1w_ser6_2mm"] < distances["S05_mne_sample_T1_3mm"]
    # The similarity's scale is bounded: another face is not shrunk onto a point to reach distance 0.
    assert distances["S05_mne_sample_T1_3mm"] > 1.0
    # An empty region cannot be matched: NaN, which ranks as a tie with everything.
    assert np.isnan(attacks.icp_distance(np.zeros((0, 3)), frame, target, "rigid"))


def _frontal(path: Path, size: int = 256, yaw_deg: float = 0.0) -> np.ndarray:
    """The head at ``path`` rendered as the gallery sees it (``GALLERY_POSE``), turned by ``yaw_deg``."""
    image = read_volume(path).image
    surface = render.skin_surface(image, render.skin_threshold(image))
    yaw, pitch, azimuth, elevation = attacks.GALLERY_POSE
    view = render.face_view(surface, image)
    return render.render_surface(surface, view, render.Shot(yaw + yaw_deg, pitch, (azimuth, elevation), size))


@pytest.mark.parametrize(
    ("name", "face"),
    [
        ("S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz", True),  # whole face, 2 mm MPRAGE
        ("S04_robex_ref_T1.nii.gz", True),  # whole face, noisy background, 4-D (missed under the probe light)
        ("S01_chris_t1_mricron.nii.gz", False),  # cut at the nose tip: the closest miss (confidence ~0.1)
        ("S03_niivue_T1_2mm_mni.nii.gz", False),  # partial field of view, cut at the nose
    ],
)
def test_realism_detector_sees_whole_faces_not_partial_ones(shared_data, name, face):
    """dlib's CNN detector at the evaluation's settings, on real heads rendered small (256 px) as the gallery
    sees them: a whole face is detected, a field of view cut at the eyes or the nose is not."""
    confidence = attacks.detect_face(_frontal(shared_data / "heads" / name))
    assert attacks.face_detected(confidence) is face, (name, confidence)
    if face:  # with a margin: the threshold sits mid-gap, not at the edge of a whole face's confidence
        assert confidence > attacks.DETECT_CONFIDENCE + 0.2, confidence


def test_realism_detector_sees_no_face_on_the_back_of_a_head_or_a_blank(head_path):
    assert attacks.face_detected(attacks.detect_face(_frontal(head_path)))
    back = attacks.detect_face(_frontal(head_path, yaw_deg=180.0))
    assert not attacks.face_detected(back), back
    assert np.isnan(attacks.detect_face(np.zeros((256, 256, 3), np.uint8)))
    assert attacks.face_models() is attacks.face_models(), "dlib's models are loaded once per process"


def test_realism_counts_only_outputs_whose_original_shows_a_face():
    from MRIDeIdentifyLib.evaluation.report import summarise

    def output(detected, original_detected):
        facts = {"detected": detected, "original_detected": original_detected}
        return attacks.Probe(
            "m", "s", {a: np.zeros(2) for a in attacks.ATTACKS}, np.array([True, False]), np.ones(2, bool), facts
        )

    probes = [output(True, True), output(False, True), output(True, False), output(False, False)]
    row = summarise(probes, {})
    assert (row["n_faced"], row["n_faced_detected"]) == (2, 1)
    assert row["detection_rate_faced"] == 0.5 and row["detection_rate"] == 0.5
    row = summarise([output(True, True), output(True, True), output(False, False)], {})
    assert row["detection_rate_faced"] == 1.0 and row["detection_rate"] == pytest.approx(2 / 3)


def test_exactness_catches_a_changed_brain_voxel_and_a_moved_grid(s06):
    from MRIDeIdentifyLib.evaluation.runner import exactness

    image = s06["S06_dcmqa_xa30_T1w_ser5_2mm"][0]
    array = sitk.GetArrayFromImage(image)
    brain = np.zeros(array.shape, bool)
    brain[40:60, 50:80, 50:80] = True
    changed = array.copy()
    changed[~brain] = 0
    output = image_like(changed, image)
    assert exactness(image, output, brain) == {
        "grid_equal": True,
        "brain_exact": True,
        "changed_fraction": pytest.approx(np.mean(changed != array)),
    }
    changed[50, 60, 60] += 1
    tampered = image_like(changed, image)
    assert exactness(image, tampered, brain)["brain_exact"] is False
    output.SetOrigin(np.add(image.GetOrigin(), 0.5).tolist())
    assert exactness(image, output, brain)["grid_equal"] is False


def test_fidelity_same_scan_agrees_and_a_stripped_head_drifts(s06):
    pytest.importorskip("ants", reason="the downstream analysis needs antspyx (the 'eval' extra)")
    from MRIDeIdentifyLib.evaluation import fidelity

    image = s06["S06_dcmqa_xa30_T1w_ser5_2mm"][0]
    original = fidelity.analyse(image, spacing_mm=4.0)
    assert original.error is None and original.brain.sum() * original.voxel_ml > 800  # a brain, in mL
    again = fidelity.compare(original, fidelity.analyse(image, spacing_mm=4.0))
    # ANTs' multi-threaded registration is not bit-reproducible: the same scan twice gives brain Dice
    # 0.97-0.98 (the metric's noise floor), never less than 0.95 in repeated runs.
    assert again["failed"] == 0.0 and again["dice_brain"] > 0.95 and again["dice_wm"] > 0.9
    array = sitk.GetArrayFromImage(image)
    head = array > render.skin_threshold(image)
    from scipy import ndimage

    stripped = np.where(ndimage.binary_erosion(head, iterations=8), array, 0).astype(array.dtype)
    scalp_gone = image_like(stripped, image)
    drift = fidelity.compare(original, fidelity.analyse(scalp_gone, spacing_mm=4.0))
    # Without scalp the whole-head registration drifts, or Atropos gives up: either is what the report flags.
    assert drift["failed"] == 1.0 or drift["dice_brain"] < again["dice_brain"] - 0.01


def _small_dataset(shared_data, folder):
    """Two series of one person, one other person and one template, with crude brain masks put where the
    run looks for them (so this test skips deepbet and exercises resuming)."""
    names = [
        "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz",
        "S06_dcmqa_xa30_T1w_ser6_2mm.nii.gz",
        "S05_mne_sample_T1_3mm.mgz",
        "T02_MNI152_T1_2mmEXT.nii.gz",
    ]
    data = folder / "data"
    data.mkdir()
    for name in names:
        (data / name).symlink_to(shared_data / "heads" / name)
    masks = folder / "out" / "work" / "brainmasks"
    masks.mkdir(parents=True)
    from scipy import ndimage

    for name in names[:3]:
        image = read_volume(data / name).image
        head = sitk.GetArrayFromImage(image) > render.skin_threshold(image)
        spacing = min(image.GetSpacing())
        brain = ndimage.binary_erosion(ndimage.binary_fill_holes(head), iterations=int(round(25 / spacing)))
        mask = image_like(brain.astype(np.uint8), image)
        sitk.WriteImage(mask, str(masks / f"{image_stem(Path(name))}.nii.gz"))
    return data, folder / "out"


def test_evaluate_small_report(shared_data, tmp_path, capsys):
    from MRIDeIdentifyLib.evaluation import main

    data, out = _small_dataset(shared_data, tmp_path)
    status = main(
        [
            "--data",
            str(data),
            "--methods",
            "blur,skullstrip",
            "--out",
            str(out),
            "--no-fidelity",
            "--render-size",
            "320",
        ]
    )
    assert status == 0, "the controls should pass"
    summary = (out / "summary.md").read_text()
    assert "Controls passed: **yes**" in summary and "gallery of 4 original heads (1 templates" in summary
    # Realism as the criterion words it (among outputs whose original shows a face), then over all outputs.
    (skullstrip_row,) = [line for line in summary.splitlines() if line.startswith("| skullstrip | 3 |")]
    assert "| 0 % (0/3) | 0 % |" in skullstrip_row, skullstrip_row
    assert "The originals themselves: 100 % (3/3) have a detected face" in summary
    for name in (
        "per_scan.csv",
        "summary.csv",
        "plots/rank1.png",
        "plots/cost.png",
        "montage_blur.png",
        "montage_skullstrip.png",
    ):
        assert (out / name).is_file(), name
    with (out / "per_scan.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    groups = [row["group"] for row in rows]
    assert groups.count("blur") == 3 and groups.count("skullstrip") == 3
    assert groups.count("control: re-render") == 3 and groups.count("control: same person") == 2
    assert groups.count("control: average face") == 3
    for row in rows:
        if row["group"] in ("blur", "skullstrip"):
            assert row["brain_exact"] == "True" and row["grid_equal"] == "True", row
        if row["group"] in ("control: re-render", "control: same person"):
            assert float(row["features_rank"]) == 1.0, row
        if row["group"] == "control: re-render":
            # The three real heads show a whole face: the realism detector finds it in the originals.
            assert row["detected"] == "True" and float(row["face_confidence"]) > 0.5, row
        if row["group"] == "skullstrip":
            # No face left: no face found, and no skin in the feature region for ICP to match.
            assert row["detected"] == "False" and row["face_confidence"] == "", row
            assert row["original_detected"] == "True" and row["features_genuine_distance"] == ""
    # A second run reuses every work file.
    capsys.readouterr()
    assert (
        main(["--data", str(data), "--methods", "blur", "--out", str(out), "--no-fidelity", "--render-size", "320"])
        == 0
    )
    assert "de-identifying" not in capsys.readouterr().err


def test_evaluate_rejects_unknown_method_and_missing_folder(tmp_path, capsys):
    from MRIDeIdentifyLib.cli import main

    assert (
        main(["evaluate", "--data", str(tmp_path / "absent"), "--methods", "blur", "--out", str(tmp_path / "o")]) == 2
    )
    assert capsys.readouterr().err.startswith("mri-deidentify: error: ")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "S01_x.nii.gz").symlink_to(tmp_path / "nowhere")  # discovered by name only
    assert (
        main(["evaluate", "--data", str(tmp_path / "d"), "--methods", "nosuchmethod", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "mri-deidentify: error: " in capsys.readouterr().err


FIVE_PEOPLE = [
    "S03_niivue_T1_2mm_mni.nii.gz",
    "S04_robex_ref_T1.nii.gz",
    "S05_mne_sample_T1_3mm.mgz",
    "S06_dcmqa_xa30_T1w_ser5_2mm.nii.gz",
    "S12_colin27_ch2.nii.gz",
]


def test_a_folder_without_template_gets_the_shipped_average_head(shared_data, tmp_path):
    """Five scans of five people, no template: the shipped average head joins as distractor and control."""
    from MRIDeIdentifyLib.evaluation.runner import SHIPPED_TEMPLATE, discover, with_template
    from MRIDeIdentifyLib.template import HEAD_FILE

    for name in FIVE_PEOPLE:
        (tmp_path / name).symlink_to(shared_data / "heads" / name)
    scans = with_template(discover(tmp_path))
    assert [s.name for s in scans if not s.template] == [image_stem(Path(n)) for n in FIVE_PEOPLE]
    (template,) = [s for s in scans if s.template]
    assert template.name == SHIPPED_TEMPLATE and template.path.name == HEAD_FILE
    assert read_volume(template.path).image.GetSize() == (176, 256, 256)
    # A folder that brings its own template keeps it and gets no second one.
    (tmp_path / "T02_MNI152_T1_2mmEXT.nii.gz").symlink_to(shared_data / "heads" / "T02_MNI152_T1_2mmEXT.nii.gz")
    assert [s.name for s in with_template(discover(tmp_path)) if s.template] == ["T02_MNI152_T1_2mmEXT"]


def test_controls_pass_without_a_same_person_pair_but_not_without_the_average_face():
    from MRIDeIdentifyLib.evaluation.report import controls_passed

    rerender, average, same = (
        ("control: re-render", (True, "")),
        ("control: average face", (True, "")),
        ("control: same person", (True, "")),
    )
    assert controls_passed(dict([rerender, average]))
    assert controls_passed(dict([rerender, average, same]))
    assert not controls_passed(dict([rerender, same]))
    assert not controls_passed(dict([rerender, average, ("control: same person", (False, ""))]))
